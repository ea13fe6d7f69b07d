"""The decoder's lean layer path is bit-identical to the model's own layer modules."""
from __future__ import annotations

import pytest
import torch

from fastvlm_kernels import KVCache, SelfSpeculativeDecoder
from fastvlm_kernels.decoding import lean
from fastvlm_kernels.decoding.adapters import adapter_for
from fastvlm_kernels.decoding.attention import STATE_KWARG, StepState, attention_implementation

from .models import build, find_layers, sharpen


def _cache(model, batch, prefix, generator, dtype):
    adapter = adapter_for(model)
    config = adapter.text_config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    cache = KVCache(adapter.num_layers, batch, config.num_key_value_heads, head_dim, 64, dtype, "cpu")
    for layer in range(adapter.num_layers):
        shape = (batch, config.num_key_value_heads, prefix, head_dim)
        cache.append(layer, torch.randn(shape, generator=generator).to(dtype),
                     torch.randn(shape, generator=generator).to(dtype))
    return adapter, cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "llava", "llava-qwen2"])
def test_lean_layers_are_bit_identical_to_the_modules(family, dtype):
    model = build(family, seed=3).model.to(dtype)
    batch, prefix, tokens = 3, 7, 5
    adapter, cache_a = _cache(model, batch, prefix, torch.Generator().manual_seed(10), dtype)
    _, cache_b = _cache(model, batch, prefix, torch.Generator().manual_seed(10), dtype)
    generator = torch.Generator().manual_seed(11)
    if family.startswith("llava"):   # the bias of Qwen2's projections is exercised with random values
        for layer in adapter.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                if proj.bias is not None:
                    proj.bias.data.normal_(generator=generator)
    hidden = torch.randn(batch, tokens, adapter.text_config.hidden_size, generator=generator).to(dtype)
    positions = torch.arange(prefix, prefix + tokens)[None].expand(batch, -1)
    rotary = adapter.rotary_emb(hidden, positions)
    layers, reason = lean.lean_layers(adapter.layers)
    assert reason is None
    starts = torch.full((batch,), prefix, dtype=torch.int32)
    with torch.no_grad(), attention_implementation(adapter.attention_configs()):
        state_a, state_b = StepState(cache_a, starts), StepState(cache_b, starts)
        expected = hidden
        for layer in adapter.layers:
            out = layer(expected, attention_mask=None, position_embeddings=rotary, **{STATE_KWARG: state_a})
            expected = out[0] if isinstance(out, tuple) else out
        actual = lean.run(layers, hidden, rotary, state_b)
    assert torch.equal(actual, expected)
    assert torch.equal(cache_a.buffer, cache_b.buffer) and torch.equal(cache_a.lengths, cache_b.lengths)


def test_unsupported_layers_keep_their_modules_and_say_why():
    qwen2_vl = build("qwen2_vl", seed=0).model
    layers, reason = lean.lean_layers(find_layers(qwen2_vl))
    assert layers is None and "Qwen2VLDecoderLayer" in reason
    model = build("llama", seed=0).model
    handle = find_layers(model)[2].mlp.register_forward_hook(lambda module, args, out: out)
    try:
        assert "hooks" in lean.lean_layers(find_layers(model))[1]
    finally:
        handle.remove()
    assert lean.lean_layers(find_layers(model))[1] is None


@pytest.mark.parametrize("use_lean", [True, False], ids=["lean", "modules"])
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_decoder_output_is_the_same_with_and_without_the_lean_path(family, use_lean):
    case = build(family, seed=4, batch=2)
    sharpen(case.model, 2)
    expected = case.model.generate(**case.inputs, max_new_tokens=12, do_sample=False)
    decoder = SelfSpeculativeDecoder(case.model, 2, draft_len=3, lean_layers=use_lean)
    out = decoder.generate(**case.inputs, max_new_tokens=12)
    assert torch.equal(out.sequences, expected)
    assert (decoder.lean_reason is None) == (use_lean and family == "llava")


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_lean_layers_with_skinny_linear_match_the_modules(family):
    """With skinny_linear's CPU kernel for the projections (the decoder's default on fp32 CPU weights) the
    lean layers agree with the modules to fp32 rounding (another summation order), for few and many rows."""
    from fastvlm_kernels.ops.linear import BACKENDS
    from ..helpers import skip_unless_runnable
    skip_unless_runnable("cpu", BACKENDS[0].not_supported_reasons(torch.empty(1)))
    model = build(family, seed=3).model
    adapter = adapter_for(model)
    linear = lean.linear_for(adapter.layers, "auto")
    assert linear is not torch.nn.functional.linear
    layers, reason = lean.lean_layers(adapter.layers, linear)
    assert reason is None
    for batch, tokens in ((1, 1), (1, 5), (3, 5), (2, 9)):        # 1, 5, 15 and 18 rows
        _, cache_a = _cache(model, batch, 7, torch.Generator().manual_seed(10), torch.float32)
        _, cache_b = _cache(model, batch, 7, torch.Generator().manual_seed(10), torch.float32)
        generator = torch.Generator().manual_seed(batch * 100 + tokens)
        hidden = torch.randn(batch, tokens, adapter.text_config.hidden_size, generator=generator)
        rotary = adapter.rotary_emb(hidden, torch.arange(7, 7 + tokens)[None].expand(batch, -1))
        starts = torch.full((batch,), 7, dtype=torch.int32)
        with torch.no_grad(), attention_implementation(adapter.attention_configs()):
            expected = hidden
            for layer in adapter.layers:
                out = layer(expected, attention_mask=None, position_embeddings=rotary,
                            **{STATE_KWARG: StepState(cache_a, starts)})
                expected = out[0] if isinstance(out, tuple) else out
            actual = lean.run(layers, hidden, rotary, StepState(cache_b, starts))
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    assert lean.linear_for(adapter.layers, "torch") is torch.nn.functional.linear
    with pytest.raises(ValueError, match="fp32"):
        lean.linear_for([layer.to(torch.bfloat16) for layer in adapter.layers], "cpu")
