"""The decoder's step functions trace whole under torch.compile(fullgraph=True) (issue 24's CPU part): no host
sync, no data-dependent Python control flow and no untraceable call inside a step, which is what capturing a
step in a CUDA graph needs. Traced with the aot_eager backend, which also runs every custom op's fake
implementation; the compiled step gives the eager step's outcome (greedy), and a valid one when sampling."""
from __future__ import annotations

import pytest
import torch

from fastvlm_kernels.decoding import SelfSpeculativeDecoder
from fastvlm_kernels.decoding.attention import attention_implementation
from fastvlm_kernels.decoding.options import resolve

from .models import build, sharpen

STEPS = ("plain", "chain", "tree")


def _run_step(case, kind: str, sampling: bool, compiled: bool):
    """A fresh decoder's prefill, then one step of ``kind`` (eager or compiled): (accept_len, emitted)."""
    decoder = SelfSpeculativeDecoder(case.model, exit_layer=1, draft_len=3, tree="dynamic" if kind == "tree" else None)
    inputs = dict(case.inputs)
    ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
    options, _ = resolve(case.model, ids, mask, {"max_new_tokens": 20, "do_sample": sampling, "top_k": 0})
    decoder._processing = None
    with torch.no_grad(), attention_implementation(decoder._attention_configs()):
        decoder._prepare_lean()
        rows, state = decoder.prefill(ids, mask, inputs, options, None, None)
        subset = decoder._subset_head(ids.device, options.sampling)
        # generator=None: dynamo cannot trace a torch.Generator argument (torch 2.14); the compiled step draws
        # from the default generator
        step = {"plain": lambda: decoder.plain_step(rows, state, options.sampling, None),
                "chain": lambda: decoder.speculative_step(rows, state, 3, options.sampling, None, subset),
                "tree": lambda: decoder.tree_step(rows, state, 3, options.sampling, None, subset)[:2]}[kind]
        if compiled:
            torch._dynamo.reset()
            step = torch.compile(step, fullgraph=True, backend="aot_eager")
        return step()


@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampling"])
@pytest.mark.parametrize("kind", STEPS)
@pytest.mark.parametrize("family", ["llama", "qwen2_vl"])
def test_every_step_compiles_whole(family, kind, sampling):
    case = build(family, seed=0, batch=2)
    sharpen(case.model, 1, scale=0.1)
    accept_len, emitted = _run_step(case, kind, sampling, compiled=True)
    if not sampling:
        want_len, want_emitted = _run_step(case, kind, sampling, compiled=False)
        assert torch.equal(emitted, want_emitted)
        assert (accept_len is None and want_len is None) or torch.equal(accept_len, want_len)
        if kind != "plain":
            assert int(accept_len.max()) > 0       # the sharpened model keeps drafts: acceptance was exercised
    kept = emitted if accept_len is None else emitted.gather(1, accept_len.long()[:, None])
    assert ((kept >= 0) & (kept < case.model.get_output_embeddings().weight.shape[0])).all()


COMPILED = {"backend": "aot_eager"}      # compile_steps on the CPU: the same tracing as a CUDA capture, no graphs


@pytest.mark.parametrize("config", [dict(draft_len=3), dict(draft_len="adaptive"), dict(draft_len=0),
                                    dict(draft_len=3, tree="dynamic"), dict(draft_len=2, imitation=True)],
                         ids=["k3", "adaptive", "plain", "tree", "imitation"])
def test_generate_with_compiled_steps_is_identical(config):
    from fastvlm_kernels.imitation import ImitationNetwork
    case = build("qwen2_vl", seed=0, batch=2)
    sharpen(case.model, 1, scale=0.1)
    expected = case.model.generate(**case.inputs, max_new_tokens=16, do_sample=False)
    config = dict(config)
    if config.pop("imitation", False):
        torch.manual_seed(3)
        config["imitation"] = ImitationNetwork.from_model(case.model, exit_layer=1, kind="layers", num_layers=1)
    decoder = SelfSpeculativeDecoder(case.model, exit_layer=1, compile_steps=COMPILED, **config)
    for _ in range(2):                                  # the second call replays what the first compiled
        out = decoder.generate(**case.inputs, max_new_tokens=16)
        assert decoder.cuda_graphs_reason is None and torch.equal(out.sequences, expected)
    assert decoder._compiled, "nothing was compiled"


def test_calls_that_cannot_be_compiled_run_eagerly_and_say_why():
    case = build("llama", seed=0, batch=1)
    decoder = SelfSpeculativeDecoder(case.model, exit_layer=1, draft_len=2, compile_steps=COMPILED)
    decoder.generate(**case.inputs, max_new_tokens=4, do_sample=True, generator=torch.Generator().manual_seed(0))
    assert "torch.Generator" in decoder.cuda_graphs_reason
    decoder.generate(**case.inputs, max_new_tokens=4, repetition_penalty=1.3)
    assert "logits processors" in decoder.cuda_graphs_reason
    decoder.generate(**case.inputs, max_new_tokens=4, do_sample=True)                 # the default generator
    assert decoder.cuda_graphs_reason is None
    plain = SelfSpeculativeDecoder(case.model, exit_layer=1, draft_len=2)               # cuda_graphs="auto"
    plain.generate(**case.inputs, max_new_tokens=4)
    assert "not a CUDA device" in plain.cuda_graphs_reason and not plain._compiled
    with pytest.raises(ValueError, match="cuda_graphs=True: this call cannot be captured: the model is on cpu"):
        SelfSpeculativeDecoder(case.model, exit_layer=1, cuda_graphs=True).generate(**case.inputs, max_new_tokens=4)
    with pytest.raises(ValueError, match="cuda_graphs must be"):
        SelfSpeculativeDecoder(case.model, exit_layer=1, cuda_graphs="yes")
    with pytest.raises(TypeError, match="compile_steps must be a dict"):
        SelfSpeculativeDecoder(case.model, exit_layer=1, compile_steps="inductor")
