"""model.generate's logits processors and stopping criteria in the decoder: every option gives the output
model.generate gives (greedy: token-identical; sampling: the same distribution), the processors seeing each
verified position's own prefix, the draft processed alike; stopping criteria checked at every emitted token."""
from __future__ import annotations

import functools

import pytest
import torch
from transformers import (EpsilonLogitsWarper, EtaLogitsWarper, LogitsProcessor, LogitsProcessorList,
                          MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, StoppingCriteria, StoppingCriteriaList,
                          TopPLogitsWarper, TypicalLogitsWarper)

from fastvlm_kernels.decoding import SelfSpeculativeDecoder
from fastvlm_kernels.decoding.processing import Processing
from fastvlm_kernels.imitation import ImitationNetwork

from .models import VOCAB, assert_lossless, build, sharpen
from .test_decoder import _chi_square_p_value, _exact_marginals, _sampling_case

MAX_NEW = 12


class LengthDependentBias(LogitsProcessor):
    """A custom processor whose effect depends on the prefix length: it favours a different token at each
    position, so a position processed with another position's prefix gets another token."""

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, (input_ids.shape[-1] * 7) % scores.shape[-1]] += 6.0
        return scores


class StopAfterToken(StoppingCriteria):
    """Stops a row after any of ``tokens``."""

    def __init__(self, *tokens: int):
        self.tokens = torch.tensor(tokens)

    def __call__(self, input_ids, scores, **kwargs):
        return torch.isin(input_ids[:, -1], self.tokens.to(input_ids.device))


@functools.lru_cache(maxsize=None)
def _case(family: str, batch: int):
    """A sharpened model (drafts after layer 1 are often accepted) and its plain greedy output."""
    case = build(family, seed=0, batch=batch)
    sharpen(case.model, 1, scale=0.1)
    case.model.generation_config.eos_token_id = None       # every row runs MAX_NEW tokens unless an option ends it
    return case, case.model.generate(**case.inputs, max_new_tokens=MAX_NEW, do_sample=False)


def _options(name: str, case, base: torch.Tensor) -> dict:
    """The option ``name`` with a value that changes model.generate's output on this case (tokens taken from
    the plain output: its first and third new tokens, ...)."""
    prompt_len = case.inputs["input_ids"].shape[1]
    first, second, third = (int(base[0, prompt_len + i]) for i in range(3))
    fifth = int(base[0, prompt_len + 4])
    return {
        "repetition_penalty": dict(repetition_penalty=1.8),
        "no_repeat_ngram_size": dict(no_repeat_ngram_size=2),
        "min_new_tokens": dict(eos_token_id=third, min_new_tokens=8),
        "min_length": dict(eos_token_id=third, min_length=prompt_len + 8),
        "bad_words_ids": dict(bad_words_ids=[[first], [second, third]]),
        "suppress_tokens": dict(suppress_tokens=[first, third]),
        "begin_suppress_tokens": dict(begin_suppress_tokens=[first]),
        "sequence_bias": dict(sequence_bias={(third,): 3.0, (first, second): -5.0}),
        "forced_eos_token_id": dict(forced_eos_token_id=5),
        "exponential_decay_length_penalty": dict(eos_token_id=fifth, exponential_decay_length_penalty=(0, 30.0)),
        "encoder_repetition_penalty": dict(encoder_repetition_penalty=2.5),
        "renormalize_logits": dict(renormalize_logits=True, repetition_penalty=1.5),
        "custom_processor": dict(logits_processor=LogitsProcessorList([LengthDependentBias()])),
        "prefix_allowed_tokens_fn": dict(prefix_allowed_tokens_fn=lambda batch_id, ids: [
            t for t in range(VOCAB) if (t + int(ids[-1]) + batch_id) % 3 != 0]),
        # the first row stops after its 5th token, the second (if any) after its 3rd
        "stopping_criteria": dict(stopping_criteria=StoppingCriteriaList([StopAfterToken(
            fifth, *(int(base[1, prompt_len + 2]) for _ in range(base.shape[0] - 1)))])),
        "max_time": dict(max_time=1e-9),
    }[name]


OPTIONS = ("repetition_penalty", "no_repeat_ngram_size", "min_new_tokens", "min_length", "bad_words_ids",
           "suppress_tokens", "begin_suppress_tokens", "sequence_bias", "forced_eos_token_id",
           "exponential_decay_length_penalty", "encoder_repetition_penalty", "renormalize_logits", "custom_processor",
           "prefix_allowed_tokens_fn", "stopping_criteria", "max_time")
CONFIGS = {"E1-k3": dict(exit_layer=1, draft_len=3), "E2-adaptive": dict(exit_layer=2, draft_len="adaptive"),
           "E1-tree": dict(exit_layer=1, draft_len=3, tree="dynamic", tree_width=2),
           "E1-static-tree": dict(exit_layer=1, draft_len=2, tree=[(0,), (1,), (0, 0), (1, 0)]),
           "E2-imitation-k2": dict(exit_layer=2, draft_len=2, imitation=True)}


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("family", ["llama", "qwen2_vl"])
@pytest.mark.parametrize("option", OPTIONS)
def test_each_option_is_token_identical_to_generate(option, family, batch):
    """Each option (and a custom processor whose effect depends on the prefix length), batch 1 and ragged
    batch 2 (with images for Qwen2-VL), several exit layers and draft lengths, chains and trees, with and
    without an imitation network. Every option changes model.generate's output here (the test would see it
    ignored), but forced_eos and max_time only where they act."""
    case, base = _case(family, batch)
    options = _options(option, case, base)
    expected = case.model.generate(**case.inputs, max_new_tokens=MAX_NEW, do_sample=False, **options)
    if option != "max_time":
        reference = {k: v for k, v in options.items() if k == "eos_token_id"}
        plain = case.model.generate(**case.inputs, max_new_tokens=MAX_NEW, do_sample=False, **reference)
        assert not torch.equal(expected, plain), f"{option} changes nothing on this case"
    else:
        assert expected.shape[1] == case.inputs["input_ids"].shape[1] + 1     # stops after the first token
    for label, config in CONFIGS.items():
        config = dict(config)
        if config.pop("imitation", False):
            torch.manual_seed(3)
            config["imitation"] = ImitationNetwork.from_model(case.model, exit_layer=config["exit_layer"],
                                                              kind="layers", num_layers=1)
        decoder = SelfSpeculativeDecoder(case.model, **config)
        out = decoder.generate(**case.inputs, max_new_tokens=MAX_NEW, do_sample=False, **options)
        assert_lossless(case, out.sequences, expected, f"{option} {family} B={batch} {label}", [])


def test_the_draft_is_processed_too():
    """A sequence bias that makes one token the full model's choice everywhere: a draft that sees the same
    processors proposes it and every drafted token is kept (an unprocessed draft would be rejected)."""
    case, _ = _case("llama", 1)
    decoder = SelfSpeculativeDecoder(case.model, exit_layer=1, draft_len=4)
    out = decoder.generate(**case.inputs, max_new_tokens=11, sequence_bias={(17,): 100.0})
    assert out.sequences[0, case.inputs["input_ids"].shape[1]:].tolist() == [17] * 11
    assert out.stats.mean_accepted == 4.0, out.stats.accepted


def test_stopping_criteria_stop_inside_a_step_where_generate_stops():
    """A step that accepts several tokens stops at the token that meets the criterion, not at the step's end:
    somewhere a row ends on a drafted token (its step emits only kept drafts, no verifier token)."""
    case, base = _case("llama", 1)
    prompt_len = case.inputs["input_ids"].shape[1]
    inside = 0
    for index in range(1, MAX_NEW - 1):
        stop = StoppingCriteriaList([StopAfterToken(int(base[0, prompt_len + index]))])
        expected = case.model.generate(**case.inputs, max_new_tokens=MAX_NEW, do_sample=False, stopping_criteria=stop)
        out = SelfSpeculativeDecoder(case.model, exit_layer=1, draft_len=8).generate(
            **case.inputs, max_new_tokens=MAX_NEW, stopping_criteria=stop)
        assert torch.equal(out.sequences, expected)
        last_kept, last_emitted = out.stats.accepted[-1][0], out.stats.emitted[-1][0]
        inside += last_kept == last_emitted > 0
    assert inside > 0


def test_qwen2_vl_shipped_generation_config_runs_and_matches_generate():
    """Qwen2-VL / Qwen2.5-VL Instruct checkpoints ship do_sample with top_k=1, top_p=0.001, temperature=0.1
    and repetition_penalty=1.05: greedy in effect, sampling in form. The decoder runs it as loaded."""
    for batch in (1, 2):
        case = build("qwen2_vl", seed=0, batch=batch)
        sharpen(case.model, 1, scale=0.1)
        config = case.model.generation_config
        config.do_sample, config.top_k, config.top_p, config.temperature = True, 1, 0.001, 0.1
        config.repetition_penalty = 1.05
        expected = case.model.generate(**case.inputs, max_new_tokens=MAX_NEW)
        for draft_len in (0, 3, "adaptive"):
            decoder = SelfSpeculativeDecoder(case.model, exit_layer=1, draft_len=draft_len)
            out = decoder.generate(**case.inputs, max_new_tokens=MAX_NEW, generator=torch.Generator().manual_seed(1))
            assert_lossless(case, out.sequences, expected, f"B={batch} k={draft_len}", [])


def test_the_tiny_vlm_with_its_network_under_processors():
    """Real acceptance under processors: the tiny VLM and its shipped network with a repetition penalty and
    n-gram blocking, identical to model.generate, still keeping most drafts."""
    from fastvlm_kernels.models import tiny
    if not tiny.is_built():
        pytest.skip("the tiny VLM is not built")
    model, processor = tiny.load()
    network = tiny.load_imitation(model)
    accepted = []
    for seed in (3, 4):
        image, prompt = tiny.scene(seed, kind="describe")
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        options = dict(max_new_tokens=40, do_sample=False, repetition_penalty=1.2, no_repeat_ngram_size=4)
        expected = model.generate(**inputs, **options)
        assert not torch.equal(expected, model.generate(**inputs, max_new_tokens=40, do_sample=False))
        out = SelfSpeculativeDecoder(model, imitation=network, draft_len=6).generate(**inputs, **options)
        assert torch.equal(out.sequences, expected)
        accepted.append(out.stats.mean_accepted)
    assert sum(accepted) / len(accepted) > 1.5, accepted


@pytest.mark.parametrize("tree", [None, "dynamic"], ids=["chain", "tree"])
@pytest.mark.parametrize("wrong", [False, True])
def test_sampling_with_a_repetition_penalty_and_top_p_preserves_the_distribution(wrong, tree, monkeypatch):
    """Sampling with repetition_penalty=2 and top_p=0.8: the 2nd and 3rd tokens (from speculative steps) follow
    the exact distribution (chi-square); processors shown every position with the step's own prefix only (the
    drafts before it left out) fail the same test."""
    model, prompt = _sampling_case()
    sharpen(model, 1, scale=0.2)           # drafts after layer 1 often kept: the later positions get tested
    marginals = _exact_marginals(model, prompt, 1.0, processors=LogitsProcessorList([
        RepetitionPenaltyLogitsProcessor(2.0), TopPLogitsWarper(0.8)]))
    if wrong:
        real = Processing.scores

        def without_drafts(self, logits, tokens, extras, active):
            return real(self, logits, tokens, [[()] * len(row) for row in extras], active)
        monkeypatch.setattr(Processing, "scores", without_drafts)
    decoder = SelfSpeculativeDecoder(model, exit_layer=1, draft_len=3, tree=tree)
    counts = [torch.zeros(model.config.vocab_size) for _ in marginals]
    generator = torch.Generator().manual_seed(7)
    for _ in range(10):
        out = decoder.generate(prompt.repeat(256, 1), max_new_tokens=len(marginals), do_sample=True, top_k=0,
                               top_p=0.8, repetition_penalty=2.0, generator=generator)
        new = out.sequences[:, prompt.shape[1]:]
        for position, count in enumerate(counts):
            count += torch.bincount(new[:, position], minlength=model.config.vocab_size)
    p_values = [_chi_square_p_value(count, marginal) for count, marginal in zip(counts, marginals)]
    assert p_values[0] > 1e-4, p_values
    if wrong:
        assert min(p_values[1:]) < 1e-6, f"processors shown the wrong prefix went undetected: {p_values}"
    else:
        assert min(p_values[1:]) > 1e-4, p_values
        assert out.stats.mean_accepted > 0.3, out.stats.accepted


@pytest.mark.parametrize("option, warper", [
    ("min_p", lambda: MinPLogitsWarper(0.15)), ("typical_p", lambda: TypicalLogitsWarper(0.6)),
    ("epsilon_cutoff", lambda: EpsilonLogitsWarper(0.03)), ("eta_cutoff", lambda: EtaLogitsWarper(0.03)),
], ids=["min_p", "typical_p", "epsilon_cutoff", "eta_cutoff"])
def test_sampling_warpers_keep_every_token_in_their_support(option, warper):
    """Sampling with min_p / typical_p / epsilon / eta: every sampled token (speculative steps included) is
    one the warper allows after that token's own prefix, and the warper allows more than one somewhere (so
    the test samples, not the argmax)."""
    model, prompt = _sampling_case()
    value = {"min_p": 0.15, "typical_p": 0.6, "epsilon_cutoff": 0.03, "eta_cutoff": 0.03}[option]
    decoder = SelfSpeculativeDecoder(model, exit_layer=1, draft_len=3)
    out = decoder.generate(prompt.repeat(64, 1), max_new_tokens=6, do_sample=True, top_k=0,
                           generator=torch.Generator().manual_seed(0), **{option: value})
    sequences = out.sequences
    with torch.no_grad():
        logits = model(sequences).logits[:, prompt.shape[1] - 1:-1].float()
    allowed_counts = []
    for position in range(logits.shape[1]):
        prefix = sequences[:, :prompt.shape[1] + position]
        scores = warper()(prefix, logits[:, position].clone())
        allowed = torch.isfinite(scores)
        token = sequences[:, prompt.shape[1] + position]
        assert allowed.gather(1, token[:, None]).all(), f"{option}: a token outside the support at {position}"
        allowed_counts.append(int(allowed.sum(-1).max()))
    assert max(allowed_counts) > 1, allowed_counts
    assert len(set(sequences[:, prompt.shape[1]:].flatten().tolist())) > 1


def test_a_generation_config_object_is_honoured():
    from transformers import GenerationConfig
    case, _ = _case("llama", 2)
    config = GenerationConfig(max_new_tokens=9, repetition_penalty=1.6, no_repeat_ngram_size=2, do_sample=False)
    expected = case.model.generate(**case.inputs, generation_config=config)
    out = SelfSpeculativeDecoder(case.model, exit_layer=1, draft_len=3).generate(**case.inputs, generation_config=config)
    assert torch.equal(out.sequences, expected) and expected.shape[1] == case.inputs["input_ids"].shape[1] + 9
