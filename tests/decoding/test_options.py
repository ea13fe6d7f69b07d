"""generate's options as model.generate resolves and validates them: defaults for what neither the call nor the
model's generation config sets, misspelt and unsupported options named, inputs the model cannot use refused."""
from __future__ import annotations

import pytest
import torch
from transformers import StoppingCriteriaList

from fastvlm_kernels.decoding import SelfSpeculativeDecoder
from fastvlm_kernels.decoding.options import resolve

from .models import build


def _resolved(model, **call):
    return resolve(model, torch.ones((1, 7), dtype=torch.long), None, call)[0]


def test_unset_options_take_transformers_defaults():
    """The test models' generation configs leave max_length, temperature, top_k and top_p unset, as SmolLM2's
    and the tiny VLM's do: model.generate then generates 20 new tokens (its default max_length, counted after
    the prompt when nothing sets it) and samples at temperature 1.0, top_k 50 (top_p 1.0)."""
    model = build("llama", seed=1, batch=1).model
    assert model.generation_config.max_length is None and model.generation_config.temperature is None
    options = _resolved(model, do_sample=True)
    assert options.max_new_tokens == 20
    assert options.sampling.temperature == 1.0 and options.sampling.top_k == 50 and options.sampling.top_p is None
    assert _resolved(model, do_sample=True, top_k=0).sampling.top_k is None            # 0 disables top-k
    assert _resolved(model, max_length=12).max_new_tokens == 5                         # the prompt counts
    assert _resolved(model, max_length=12, max_new_tokens=3).max_new_tokens == 3       # max_new_tokens wins


@pytest.mark.parametrize("call", [dict(), dict(max_length=16)], ids=["no-length", "max_length"])
def test_generate_without_max_new_tokens_matches_model_generate(call):
    case = build("llama", seed=4, batch=1)
    expected = case.model.generate(**case.inputs, do_sample=False, **call)
    out = SelfSpeculativeDecoder(case.model, exit_layer=1, draft_len=2).generate(**case.inputs, **call)
    assert torch.equal(out.sequences, expected)


def test_sampling_without_a_temperature_samples_at_the_default():
    case = build("llama", seed=4, batch=1)
    out = SelfSpeculativeDecoder(case.model, exit_layer=1, draft_len=2).generate(
        **case.inputs, max_new_tokens=6, do_sample=True, generator=torch.Generator().manual_seed(0))
    assert out.sequences.shape[1] == case.inputs["input_ids"].shape[1] + 6


@pytest.mark.parametrize("option, value, message", [
    ("num_return_sequences", 2, "num_return_sequences"),
    ("num_beams", 2, "num_beams=2: beam search"),
    ("penalty_alpha", 0.6, "contrastive search"),
    ("guidance_scale", 1.5, "guidance"),
    ("output_scores", True, "output_scores"),
    ("assistant_model", object(), "assistant_model"),
    ("synced_gpus", True, "synced_gpus"),
])
def test_generate_options_the_decoder_cannot_honour_raise_naming_them(option, value, message):
    case = build("llama", seed=4, batch=1)
    decoder = SelfSpeculativeDecoder(case.model, exit_layer=1, draft_len=2)
    with pytest.raises(ValueError, match=message):
        decoder.generate(**case.inputs, max_new_tokens=4, **{option: value})


def test_a_generation_config_the_decoder_cannot_honour_names_the_field():
    case = build("llama", seed=4, batch=1)
    case.model.generation_config.num_beams = 3
    decoder = SelfSpeculativeDecoder(case.model, exit_layer=1, draft_len=2)
    with pytest.raises(ValueError, match="generation_config num_beams"):
        decoder.generate(**case.inputs, max_new_tokens=4)
    out = decoder.generate(**case.inputs, max_new_tokens=4, num_beams=1)      # overridden by the call
    assert out.sequences.shape[1] == case.inputs["input_ids"].shape[1] + 4


def test_inactive_generate_options_are_accepted():
    case = build("llama", seed=4, batch=1)
    expected = case.model.generate(**case.inputs, max_new_tokens=5, do_sample=False)
    out = SelfSpeculativeDecoder(case.model, exit_layer=1, draft_len=2).generate(
        **case.inputs, max_new_tokens=5, num_return_sequences=1, stopping_criteria=StoppingCriteriaList(),
        logits_processor=[], use_cache=True, return_dict_in_generate=True, output_scores=False, num_beams=1,
        repetition_penalty=1.0, synced_gpus=False)
    assert torch.equal(out.sequences, expected)


def test_misspelt_options_and_inputs_the_model_cannot_use_raise_naming_them():
    case = build("llama", seed=4, batch=1)
    decoder = SelfSpeculativeDecoder(case.model, exit_layer=1, draft_len=2)
    with pytest.raises(ValueError, match="max_new_tokenz"):
        decoder.generate(**case.inputs, max_new_tokenz=5)
    with pytest.raises(ValueError, match="pixel_values"):      # a text-only model
        decoder.generate(**case.inputs, max_new_tokens=4, pixel_values=torch.randn(1, 3, 8, 8))
    out = decoder.generate(**case.inputs, max_new_tokens=4)     # still usable
    assert out.sequences.shape[1] == case.inputs["input_ids"].shape[1] + 4


def test_the_exit_layer_defaults_to_the_imitation_networks():
    from fastvlm_kernels.imitation import ImitationNetwork
    case = build("llama", seed=4, batch=1)
    network = ImitationNetwork.from_model(case.model, exit_layer=2, kind="layers", num_layers=1)
    assert SelfSpeculativeDecoder(case.model, imitation=network).exit_layer == 2
    with pytest.raises(TypeError, match="exit_layer is required"):
        SelfSpeculativeDecoder(case.model)
    with pytest.raises(ValueError, match="exit layer 2"):
        SelfSpeculativeDecoder(case.model, 1, imitation=network)


@pytest.mark.parametrize("family", ["llama", "llava", "qwen2_vl"])
def test_several_samples_per_prompt_expand_the_rows_as_generate_does(family):
    """num_return_sequences=3 with sampling: 3 rows per prompt row, in generate's order (each prompt's copies
    together), each copy its own sample; with top_k=1 every copy is the greedy answer, as in generate."""
    case = build(family, seed=4, batch=2)
    decoder = SelfSpeculativeDecoder(case.model, exit_layer=1, draft_len=2)
    prompt = case.inputs["input_ids"].repeat_interleave(3, 0)
    expected = case.model.generate(**case.inputs, max_new_tokens=6, do_sample=True, top_k=1, num_return_sequences=3)
    out = decoder.generate(**case.inputs, max_new_tokens=6, do_sample=True, top_k=1, num_return_sequences=3,
                           generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.sequences, expected) and torch.equal(out.sequences[:, :prompt.shape[1]], prompt)
    out = decoder.generate(**case.inputs, max_new_tokens=6, do_sample=True, top_k=0, num_return_sequences=3,
                           generator=torch.Generator().manual_seed(0))
    new = out.sequences[:, prompt.shape[1]:]
    assert out.sequences.shape[0] == 6 and not torch.equal(new[0], new[1])
