"""ImitationNetwork construction."""
from __future__ import annotations

import torch

from fastvlm_kernels import ImitationNetwork, SelfSpeculativeDecoder
from tests.decoding.models import build, sharpen


def test_identity_init_drafts_exactly_as_plain_early_exit():
    """With zeroed output projections the untrained network returns its input: the decoder's drafts (and
    accepted lengths) equal plain early exit's; training can then only move away from there."""
    case = build("llava", seed=2)
    sharpen(case.model, 2)
    network = ImitationNetwork.from_model(case.model, 2, identity_init=True)
    assert network.config.identity_init
    assert all(not layer.self_attn.o_proj.weight.detach().any() for layer in network.layers)
    plain = SelfSpeculativeDecoder(case.model, 2, draft_len=3).generate(**case.inputs, max_new_tokens=12)
    imitated = SelfSpeculativeDecoder(case.model, 2, imitation=network, draft_len=3).generate(**case.inputs,
                                                                                              max_new_tokens=12)
    assert torch.equal(plain.sequences, imitated.sequences)
    assert plain.stats.accepted == imitated.stats.accepted
