"""Teacher-forced acceptance equals the decoder's own accepted lengths."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fastvlm_kernels import ImitationNetwork, SelfSpeculativeDecoder
from fastvlm_kernels.imitation.data import Encoder, generate_responses, load_examples
from fastvlm_kernels.imitation.evaluation import accepted_by_walk, teacher_forced_acceptance
from fastvlm_kernels.imitation.teacher import model_fingerprint
from tests.decoding.models import build, sharpen

from .helpers import tokenizer, write_prompts


def test_accepted_by_walk_by_hand():
    # position 0 is the prefill's token; steps start at 1
    matches = [False, True, True, False, True, False, False, True]
    assert accepted_by_walk(matches, 2) == [2, 1, 0, 1]     # p=1: 2 ok -> p=4: 1 -> p=6: 0 -> p=7: 1
    assert accepted_by_walk(matches, 1) == [1, 0, 1, 0, 1]
    assert accepted_by_walk(matches, 4) == [2, 1, 0, 1]
    with pytest.raises(ValueError, match="draft_len"):
        accepted_by_walk(matches, 0)


MAX_NEW = 16


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "network"])
def profiled(request, tmp_path_factory):
    """A sharpened tiny Llama's greedy answers to 8 prompts and the teacher-forced agreement along them, of plain
    early exit or of an (untrained) imitation network over a draft vocabulary, at exit layer 2."""
    root = tmp_path_factory.mktemp("profiled")
    case = build("llama", seed=2)
    sharpen(case.model, 2, scale=0.5)
    write_prompts(root / "data", 8, seed=0)
    encoder = Encoder(tokenizer())
    examples = load_examples(root / "data")
    generate_responses(case.model, encoder, examples, root / "responses.jsonl", max_new_tokens=MAX_NEW,
                       fingerprint=model_fingerprint(case.model), progress=False)
    torch.manual_seed(0)
    network = ImitationNetwork.from_model(case.model, 2) if request.param else None
    draft_vocab = torch.arange(0, case.model.config.vocab_size, 2) if request.param else None
    profile = teacher_forced_acceptance(case.model, encoder, examples, 2, network, draft_vocab=draft_vocab,
                                        draft_lens=(1, 2, 4), batch_size=3)
    return SimpleNamespace(model=case.model, encoder=encoder, examples=examples, network=network,
                           draft_vocab=draft_vocab, profile=profile)


def test_teacher_forced_profile_counts_every_position(profiled):
    profile = profiled.profile
    assert profile.positions == sum(len(row) - 1 for row in profile.per_example)
    assert 0 < profile.agreement < 1


@pytest.mark.parametrize("draft_len", [1, 2, 4])
def test_teacher_forced_acceptance_is_the_decoders(profiled, draft_len):
    """Along the model's own greedy answers, the walk over teacher-forced agreement gives the decoder's accepted
    count at every step but the last (where the decoder drafts past max_new_tokens, the answer ends)."""
    decoder = SelfSpeculativeDecoder(profiled.model, 2, imitation=profiled.network, draft_len=draft_len,
                                     draft_vocab=profiled.draft_vocab)
    compared = 0
    for example, row in zip(profiled.examples, profiled.profile.per_example):
        out = decoder.generate(**profiled.encoder.prompt_inputs(example), max_new_tokens=MAX_NEW)
        got = [a for step in out.stats.accepted for a in step]
        walked = accepted_by_walk(row, draft_len)
        assert got[:-1] == walked[:-1], (got, walked)
        compared += len(walked) - 1
    assert compared > 50   # 68 to 85 steps here: the comparison is not vacuous
