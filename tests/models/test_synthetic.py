"""Acceptance-controlled models of 7B shapes (issue 24): the shapes' parameter counts, exact agreement at
residual scale 0, a calibrated agreement rate, and the decoder identical to generate either way."""
import pytest
import torch

from fastvlm_kernels.decoding import SelfSpeculativeDecoder
from fastvlm_kernels.models import synthetic

SMALL = dict(num_hidden_layers=6, hidden_size=128, intermediate_size=256, num_attention_heads=2,
             num_key_value_heads=2, vocab_size=512)


def test_the_shapes_are_the_real_models_text_shapes():
    """Vicuna-7B (LLaVA-1.5-7B's language model) has 6.74 B parameters, Qwen2-7B (Qwen2-VL-7B's) 7.62 B."""
    assert synthetic.parameter_count("llava-1.5-7b") == pytest.approx(6.74e9, rel=0.005)
    assert synthetic.parameter_count("qwen2-vl-7b") == pytest.approx(7.62e9, rel=0.005)
    qwen = synthetic.config("qwen2-vl-7b")
    assert (qwen.num_attention_heads, qwen.num_key_value_heads, qwen.hidden_size // qwen.num_attention_heads) == (28, 4, 128)


@pytest.mark.parametrize("shape", list(synthetic.SHAPES))
def test_scale_zero_agrees_everywhere_and_the_decoder_keeps_every_draft(shape):
    model = synthetic.build(shape, exit_layer=2, residual_scale=0.0, **SMALL)
    ids = torch.randint(3, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    assert synthetic.agreement(model, 2, ids) == 1.0
    prompt = ids[:1, :10]
    expected = model.generate(prompt, max_new_tokens=31, do_sample=False)
    out = SelfSpeculativeDecoder(model, exit_layer=2, draft_len=4).generate(prompt, max_new_tokens=31)
    assert torch.equal(out.sequences, expected)
    assert out.stats.accepted == [[4]] * 6            # 1 token from the prefill, then 6 steps of 4 drafts + 1


@pytest.mark.parametrize("shape", list(synthetic.SHAPES))
def test_calibration_reaches_the_target_agreement(shape):
    model = synthetic.build(shape, exit_layer=2, residual_scale=1.0, **SMALL)
    fresh = torch.randint(3, 512, (4, 64), generator=torch.Generator().manual_seed(9))
    assert synthetic.agreement(model, 2, fresh) < 0.3                 # random layers: the early exit rarely agrees
    scale, measured = synthetic.calibrate(model, 2, 0.7)
    assert 0 < scale < 1 and measured == pytest.approx(0.7, abs=0.02)
    assert synthetic.agreement(model, 2, fresh) == pytest.approx(0.7, abs=0.1)   # on other sequences too
    prompt = fresh[:1, :12]
    expected = model.generate(prompt, max_new_tokens=24, do_sample=False)
    out = SelfSpeculativeDecoder(model, exit_layer=2, draft_len=4).generate(prompt, max_new_tokens=24)
    assert torch.equal(out.sequences, expected)
    assert 0.5 < out.stats.mean_accepted < 4.0


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="shape must be one of"):
        synthetic.build("llama-70b", exit_layer=2, **SMALL)
    with pytest.raises(ValueError, match="exit_layer must be in"):
        synthetic.build("llava-1.5-7b", exit_layer=6, **SMALL)
    with pytest.raises(ValueError, match="target must be in"):
        synthetic.calibrate(synthetic.build("llava-1.5-7b", exit_layer=2, **SMALL), 2, 0.0)
    model = synthetic.build("llava-1.5-7b", exit_layer=2, residual_scale=0.0, **SMALL)
    with pytest.raises(ValueError, match="build the model again"):
        synthetic.set_residual_scale(model, 2, 0.5)
