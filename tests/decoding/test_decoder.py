"""SelfSpeculativeDecoder: lossless greedy and sampling, layer calls, caches, bad input, memory."""
from __future__ import annotations

import dataclasses
import functools
import gc
import math

import pytest
import torch

from fastvlm_kernels.decoding import SelfSpeculativeDecoder, UnsupportedModelError
from fastvlm_kernels.decoding.policy import StepCosts
from fastvlm_kernels.imitation import ImitationNetwork

from .models import FAMILIES, NUM_LAYERS, assert_lossless, build, find_layers, patch_acceptance, sharpen

DRAFT_LENS = (1, 3, 8, "adaptive")
MAX_NEW = 12
@functools.lru_cache(maxsize=None)
def _case_and_expected(family, batch, seed):
    """A model of the family (seed 0: deep layers shrunk, so drafts are accepted; seed 1: random weights, mostly
    rejections) and model.generate's greedy output, built once per module for every (E, k) test."""
    case = build(family, seed=seed, batch=batch)
    if seed == 0:
        sharpen(case.model, 1, scale=0.1)
    return case, case.model.generate(**case.inputs, max_new_tokens=MAX_NEW, do_sample=False)


@pytest.mark.parametrize("draft_len", DRAFT_LENS)
@pytest.mark.parametrize("exit_layer", range(1, NUM_LAYERS))
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_is_token_identical_to_generate(family, batch, seed, exit_layer, draft_len):
    """Every supported family, exit layers 1 .. N-1, draft_len 1, 3, 8 and adaptive, batch 1 and 4 ragged
    rows with images."""
    case, expected = _case_and_expected(family, batch, seed)
    decoder = SelfSpeculativeDecoder(case.model, exit_layer=exit_layer, draft_len=draft_len)
    out = decoder.generate(**case.inputs, max_new_tokens=MAX_NEW)
    ties = []
    assert_lossless(case, out.sequences, expected, f"{family} B={batch} E={exit_layer} k={draft_len}", ties)
    if ties:
        print("floating-point ties:", *ties, sep="\n  ")


@pytest.mark.parametrize("family", FAMILIES)
def test_sharpened_models_accept_drafts(family):
    """The lossless test above exercises the acceptance path only if drafts are kept: on the sharpened
    models an exit after layer 1 keeps more than one drafted token per step."""
    case, expected = _case_and_expected(family, 4, 0)
    out = SelfSpeculativeDecoder(case.model, exit_layer=1, draft_len=3).generate(**case.inputs,
                                                                                 max_new_tokens=MAX_NEW)
    assert out.stats.mean_accepted > 1.0, out.stats.accepted


@pytest.mark.parametrize("draft_len", [0, 3, "adaptive"])
@pytest.mark.parametrize("kind", ["layers", "mlp"])
@pytest.mark.parametrize("family", ["llama", "llava", "qwen2_vl"])
def test_untrained_imitation_network_keeps_output_identical(family, kind, draft_len):
    case, expected = _case_and_expected(family, 4, 1)
    imitation = ImitationNetwork.from_model(case.model, exit_layer=2, kind=kind, num_layers=2 if kind == "layers" else 0)
    decoder = SelfSpeculativeDecoder(case.model, exit_layer=2, imitation=imitation, draft_len=draft_len,
                                     adaptive_window=2)
    out = decoder.generate(**case.inputs, max_new_tokens=MAX_NEW)
    assert_lossless(case, out.sequences, expected, f"{family} imitation={kind} k={draft_len}", [])
    if kind == "layers" and draft_len != 0:
        # the imitation layers own cache layers N, N+1 and were rolled back with the rest (plain steps
        # of adaptive drafting included)
        lengths = decoder._cache.host_lengths
        assert lengths[NUM_LAYERS] == lengths[0] and lengths[NUM_LAYERS + 1] == lengths[0]


@pytest.mark.gpu
@pytest.mark.parametrize("draft_len", [0, 3, "adaptive"])
@pytest.mark.parametrize("exit_layer", [1, 2])
@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "llama"])
def test_greedy_on_gpu_is_token_identical_to_generate(family, exit_layer, draft_len):
    """fp32 on the GPU: the decoder's attention runs the GPU backends (Triton / CUDA) over the cache."""
    case = build(family, seed=0, batch=4)
    sharpen(case.model, 1, scale=0.1)
    case.model.cuda()
    case.inputs = {name: value.cuda() for name, value in case.inputs.items()}
    expected = case.model.generate(**case.inputs, max_new_tokens=MAX_NEW, do_sample=False)
    decoder = SelfSpeculativeDecoder(case.model, exit_layer=exit_layer, draft_len=draft_len)
    out = decoder.generate(**case.inputs, max_new_tokens=MAX_NEW)
    assert out.sequences.device.type == "cuda"
    ties = []
    assert_lossless(case, out.sequences, expected, f"cuda {family} E={exit_layer} k={draft_len}", ties)
    if ties:
        print("floating-point ties:", *ties, sep="\n  ")


def test_draft_len_zero_is_the_model_itself():
    case = build("llava", seed=4, batch=4)
    expected = case.model.generate(**case.inputs, max_new_tokens=20, do_sample=False)
    out = SelfSpeculativeDecoder(case.model, exit_layer=2, draft_len=0).generate(**case.inputs, max_new_tokens=20)
    assert_lossless(case, out.sequences, expected, "k=0", [])
    assert out.stats.drafted == 0


# ---- layer calls and cache lengths ---------------------------------------------------------------------

def generate_counting_layer_passes(case, decoder, max_new_tokens: int = 24):
    """decoder.generate with forward hooks on the model's layers: (output, tokens each layer ran, its passes,
    its passes over more than one token)."""
    tokens_seen, passes, passes_with_many = [0] * NUM_LAYERS, [0] * NUM_LAYERS, [0] * NUM_LAYERS
    handles = []
    for index, layer in enumerate(find_layers(case.model)):
        def hook(module, args, kwargs, output, index=index):
            hidden = args[0] if args else kwargs["hidden_states"]
            tokens_seen[index] += hidden.shape[0] * hidden.shape[1]
            passes[index] += 1
            passes_with_many[index] += hidden.shape[1] > 1
        handles.append(layer.register_forward_hook(hook, with_kwargs=True))
    try:
        out = decoder.generate(**case.inputs, max_new_tokens=max_new_tokens, eos_token_id=[])
    finally:
        for handle in handles:
            handle.remove()
    return out, tokens_seen, passes, passes_with_many


def test_layers_below_exit_run_once_per_token_and_caches_end_at_the_accepted_length():
    case = build("llama", seed=5, batch=1)
    sharpen(case.model, 1, scale=0.2)
    exit_layer, draft_len = 2, 3
    decoder = SelfSpeculativeDecoder(case.model, exit_layer=exit_layer, draft_len=draft_len)
    out, tokens_seen, _, calls_with_many = generate_counting_layer_passes(case, decoder)
    stats = out.stats
    prompt_len = int(case.inputs["attention_mask"].sum())
    # Below E: the prompt once, then x0 and each draft exactly once per step (k + 1 single-token passes).
    per_step = sum(k + 1 for k in stats.draft_lens)
    for index in range(exit_layer):
        assert tokens_seen[index] == prompt_len + per_step
        assert calls_with_many[index] == 1                      # only the prefill passes more than one token
    # From E on: the prompt, then one (k + 1)-token verification pass per step.
    for index in range(exit_layer, NUM_LAYERS):
        assert tokens_seen[index] == prompt_len + per_step
        assert calls_with_many[index] == 1 + stats.steps
    # Every cache layer ends at the prompt plus x0 and the accepted drafts of every step.
    kept = sum(a + 1 for step in stats.accepted for a in step)
    assert decoder._cache.host_lengths == [[prompt_len + kept]] * NUM_LAYERS
    assert decoder._cache.lengths.tolist() == [[prompt_len + kept]] * NUM_LAYERS
    assert stats.mean_accepted > 0.5


# ---- sampling ------------------------------------------------------------------------------------------

def _chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test of counts against probs, cells with expected count < 5 pooled."""
    expected = probs.double() * counts.sum()
    small = expected < 5
    observed = torch.cat([counts[~small].double(), counts[small].double().sum()[None]])
    expected = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = expected > 0
    statistic = float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(statistic / 2, dtype=torch.float64)))


def _sampling_case():
    import transformers
    torch.manual_seed(11)
    config = transformers.LlamaConfig(vocab_size=12, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                      bos_token_id=1, eos_token_id=None, pad_token_id=0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)   # peaked but not degenerate distributions
    prompt = torch.tensor([[1, 5, 7, 3]])
    return model, prompt


def _exact_marginals(model, prompt, temperature, depth=3, processors=None):
    """Exact distributions of the 1st .. depth-th sampled tokens, by enumerating every prefix (with
    ``processors``: each prefix's logits through them, with its own ids, instead of the temperature)."""
    vocab = model.config.vocab_size
    prefixes = prompt
    weights = torch.ones(1, dtype=torch.float64)
    marginals = []
    for _ in range(depth):
        with torch.no_grad():
            logits = model(prefixes).logits[:, -1].double()
        if processors is not None:
            step = torch.softmax(processors(prefixes, logits.float()).double(), -1)
        else:
            step = torch.softmax(logits / temperature, -1)              # [P, V]
        joint = weights[:, None] * step
        marginals.append(joint.sum(0))
        weights = joint.reshape(-1)
        prefixes = torch.cat([prefixes.repeat_interleave(vocab, 0), torch.arange(vocab).repeat(len(prefixes))[:, None]], 1)
    return marginals


def sampled_counts(decoder, model, prompt, marginals, seed: int, rounds: int = 12, rows: int = 256,
                   temperature: float = 1.0):
    """The first len(marginals) sampled tokens of ``rounds`` seeded calls of ``rows`` copies of the prompt:
    (counts per position, chi-square p-values against the exact marginals, the last call's stats)."""
    counts = [torch.zeros(model.config.vocab_size) for _ in marginals]
    generator = torch.Generator().manual_seed(seed)
    for _ in range(rounds):
        out = decoder.generate(prompt.repeat(rows, 1), max_new_tokens=len(marginals), do_sample=True,
                               temperature=temperature, top_k=0, top_p=1.0, generator=generator)
        new = out.sequences[:, prompt.shape[1]:]
        for position, count in enumerate(counts):
            count += torch.bincount(new[:, position], minlength=model.config.vocab_size)
    return counts, [_chi_square_p_value(count, marginal) for count, marginal in zip(counts, marginals)], out.stats


def assert_in_top_2(model, prompt, sequences) -> None:
    """Every new token of ``sequences`` is among the model's top 2 after its prefix (what top_k=2 allows)."""
    with torch.no_grad():
        logits = model(sequences).logits[:, prompt.shape[1] - 1:-1]
    allowed = torch.topk(logits, 2, dim=-1).indices
    assert (allowed == sequences[:, prompt.shape[1]:, None]).any(-1).all()


@pytest.mark.parametrize("wrong", [False, True])
def test_sampling_preserves_the_model_distribution(wrong, monkeypatch):
    """The 2nd and 3rd tokens come from speculative steps (the 1st from the prefill): their empirical
    distribution over many seeded runs matches the exact one (chi-square); a deliberately wrong acceptance
    rule (every draft accepted) fails the same test."""
    model, prompt = _sampling_case()
    temperature = 1.0
    marginals = _exact_marginals(model, prompt, temperature)
    rows = 256
    decoder = SelfSpeculativeDecoder(model, exit_layer=1, draft_len=3)
    if wrong:
        def accept_everything(run, drafts, draft_probs, target_probs, generator=None):
            batch, k = drafts.shape
            bonus = torch.multinomial(target_probs[:, k], 1, generator=generator)
            return torch.full((batch,), k, dtype=torch.int32), torch.cat([drafts, bonus], 1)
        patch_acceptance(monkeypatch, "accept_sampling", accept_everything)
    _, p_values, _ = sampled_counts(decoder, model, prompt, marginals, seed=2024, rows=rows, temperature=temperature)
    assert p_values[0] > 1e-4, p_values       # the prefill's own sample
    if wrong:
        assert min(p_values[1:]) < 1e-6, f"a wrong acceptance rule went undetected: p-values {p_values}"
    else:
        assert min(p_values[1:]) > 1e-4, f"speculative samples do not follow the model: p-values {p_values}"


@pytest.mark.parametrize("draft_vocab", [None, [0, 3, 4, 8, 10]], ids=["full", "subset"])
@pytest.mark.parametrize("top_p", [None, 0.9])
def test_sampling_with_top_k_top_p_respects_the_filter(top_p, draft_vocab):
    """Every sampled token is among the model's top 2 where top_k=2 (with or without top_p, with the full
    vocabulary or a draft vocabulary)."""
    model, prompt = _sampling_case()
    subset = torch.tensor(draft_vocab) if draft_vocab is not None else None
    decoder = SelfSpeculativeDecoder(model, exit_layer=1, draft_len=4, draft_vocab=subset)
    out = decoder.generate(prompt.repeat(64, 1), max_new_tokens=6, do_sample=True, temperature=0.7, top_k=2,
                           top_p=top_p, generator=torch.Generator().manual_seed(0))
    assert_in_top_2(model, prompt, out.sequences)


# ---- bad input -----------------------------------------------------------------------------------------

def test_bad_exit_layer_and_draft_len():
    case = build("llama", seed=0)
    for exit_layer in (0, NUM_LAYERS, -1):
        with pytest.raises(ValueError, match="exit_layer"):
            SelfSpeculativeDecoder(case.model, exit_layer=exit_layer)
    with pytest.raises(TypeError, match="exit_layer"):
        SelfSpeculativeDecoder(case.model, exit_layer="2")
    with pytest.raises(ValueError, match="draft_len"):
        SelfSpeculativeDecoder(case.model, exit_layer=2, draft_len=-1)
    with pytest.raises(ValueError, match="tree"):
        SelfSpeculativeDecoder(case.model, exit_layer=2, tree="binary")
    imitation = ImitationNetwork.from_model(case.model, exit_layer=1)
    with pytest.raises(ValueError, match="exit layer"):
        SelfSpeculativeDecoder(case.model, exit_layer=2, imitation=imitation)


def test_unsupported_models_are_named():
    import transformers
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="gpt2.*supported: llava"):
        SelfSpeculativeDecoder(model, exit_layer=1)
    sliding = transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=50, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, sliding_window=8))
    with pytest.raises(UnsupportedModelError, match="sliding window"):
        SelfSpeculativeDecoder(sliding, exit_layer=1)


@pytest.mark.parametrize("head_dim", [16, 32])
@pytest.mark.parametrize("batch", [1, 2])
def test_a_head_dim_the_kernels_do_not_take_runs_through_the_reference(head_dim, batch):
    """A LLaVA whose text attention has head dim 16 (32): a one-line warning at construction, then output
    identical to model.generate, chains and trees."""
    import warnings
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    from .models import IMAGE_TOKEN, TEXT
    case = build("llava", seed=2, batch=batch)
    torch.manual_seed(2)
    text = LlamaConfig(**dict(TEXT, hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2))
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=28, patch_size=14)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text,
                                                      image_token_id=IMAGE_TOKEN)).eval()
    sharpen(model, 1, scale=0.1)
    expected = model.generate(**case.inputs, max_new_tokens=MAX_NEW, do_sample=False)
    for config in (dict(draft_len=3), dict(draft_len="adaptive"), dict(draft_len=3, tree="dynamic")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            decoder = SelfSpeculativeDecoder(model, exit_layer=1, **config)
        messages = [str(w.message) for w in caught if "head dim" in str(w.message)]
        assert len(messages) == 1 and f"head dim is {head_dim}" in messages[0] and "\n" not in messages[0]
        out = decoder.generate(**case.inputs, max_new_tokens=MAX_NEW)
        assert_lossless(dataclasses.replace(case, model=model), out.sequences, expected, str(config), [])
        if config["draft_len"] != "adaptive":
            assert out.stats.mean_accepted > 0.5, out.stats.accepted


def test_bad_inputs_raise_and_leave_the_decoder_usable():
    case = build("llava", seed=6, batch=2)
    decoder = SelfSpeculativeDecoder(case.model, exit_layer=2, draft_len=3, max_cache_len=64)
    inputs = case.inputs
    wrong_image_tokens = dict(inputs, input_ids=inputs["input_ids"].clone())
    wrong_image_tokens["input_ids"][:, 11] = 119                        # 5 image tokens for 4 features
    with pytest.raises(ValueError, match="[Ii]mage"):
        decoder.generate(**wrong_image_tokens, max_new_tokens=4)
    with pytest.raises(ValueError, match="[Ii]mage"):                   # 2 rows with image tokens, 1 image
        decoder.generate(**dict(inputs, pixel_values=inputs["pixel_values"][:1]), max_new_tokens=4)
    with pytest.raises(ValueError, match="max_cache_len"):
        decoder.generate(**inputs, max_new_tokens=60)
    with pytest.raises(ValueError, match="max_new_tokens"):
        decoder.generate(**inputs, max_new_tokens=0)
    right_padded = dict(inputs, attention_mask=inputs["attention_mask"].flip(1))
    with pytest.raises(ValueError, match="left-padded"):
        decoder.generate(**right_padded, max_new_tokens=4)
    with pytest.raises(ValueError, match="num_beams=2: beam search"):
        decoder.generate(**inputs, max_new_tokens=4, num_beams=2)
    with pytest.raises(TypeError, match="input_ids"):
        decoder.generate(inputs["input_ids"].float(), max_new_tokens=4)
    # Still usable, still exact, and the model's own attention is untouched.
    expected = case.model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    out = decoder.generate(**inputs, max_new_tokens=MAX_NEW)
    assert_lossless(case, out.sequences, expected, "after errors", [])
    assert case.model.config.text_config._attn_implementation != "fastvlm_kernels"


def test_streamer_receives_the_prompt_then_the_tokens():
    case = build("llama", seed=7, batch=1)
    received = []

    class Streamer:
        def put(self, value):
            received.append(value.tolist())

        def end(self):
            received.append("end")

    out = SelfSpeculativeDecoder(case.model, exit_layer=2, draft_len=3).generate(
        **case.inputs, max_new_tokens=10, streamer=Streamer())
    assert received[0] == case.inputs["input_ids"].tolist() and received[-1] == "end"
    streamed = [token for chunk in received[1:-1] for token in chunk]
    assert streamed == out.sequences[0, case.inputs["input_ids"].shape[1]:].tolist()


# ---- memory --------------------------------------------------------------------------------------------

def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def test_repeated_generate_does_not_grow_memory():
    case = build("llava", seed=8, batch=2)
    decoder = SelfSpeculativeDecoder(case.model, exit_layer=2, draft_len=3)
    for _ in range(20):
        decoder.generate(**case.inputs, max_new_tokens=6)
    gc.collect()
    rss_before, objects_before = _rss_bytes(), len(gc.get_objects())
    for _ in range(200):
        decoder.generate(**case.inputs, max_new_tokens=6)
    gc.collect()
    rss_growth = _rss_bytes() - rss_before
    object_growth = len(gc.get_objects()) - objects_before
    assert rss_growth < 8 * 2 ** 20, f"RSS grew by {rss_growth / 2 ** 20:.1f} MiB over 200 calls"
    assert object_growth < 500, f"{object_growth} more live Python objects after 200 calls"


@pytest.mark.parametrize("profile", [False, True])
def test_stats_are_consistent(profile):
    case = build("qwen2_vl", seed=0, batch=4)
    sharpen(case.model, 1, scale=0.1)
    decoder = SelfSpeculativeDecoder(case.model, exit_layer=1, draft_len=4, profile=profile)
    stats = decoder.generate(**case.inputs, max_new_tokens=16).stats
    assert stats.steps == len(stats.accepted) == len(stats.draft_lens) > 0 and stats.plain_steps == 0
    assert stats.draft_lens == [4] * stats.steps
    assert all(0 <= a <= 4 for step in stats.accepted for a in step)
    assert stats.drafted == 4 * sum(len(step) for step in stats.accepted)
    # every row emits x0 from the prefill, then its kept drafts + 1 per step while it runs; the step in which
    # it ends (EOS, max_new_tokens) counts only the tokens it kept
    assert [len(step) for step in stats.emitted] == [len(step) for step in stats.accepted]
    assert all(e in (a, a + 1) for s, step in enumerate(stats.emitted) for a, e in zip(stats.accepted[s], step))
    assert len(stats.new_tokens) == 4 and all(1 <= n <= 16 for n in stats.new_tokens)
    assert sum(stats.new_tokens) == 4 + sum(e for step in stats.emitted for e in step)
    emitted = [e for step in stats.emitted for e in step]
    assert math.isclose(stats.mean_emitted, sum(emitted) / len(emitted))
    assert 0 < stats.prefill_time < stats.total_time
    assert math.isclose(stats.tokens_per_s, sum(stats.new_tokens) / stats.total_time)
    if profile:   # the split needs a sync: only when asked for, and inside the call's own time
        steps_time = stats.total_time - stats.prefill_time
        assert stats.prefill_time + stats.draft_time + stats.verify_time <= stats.total_time
        # the layers run inside draft and verify: most of the steps' time is theirs
        assert stats.draft_time + stats.verify_time > 0.5 * steps_time, (stats.draft_time, stats.verify_time,
                                                                          steps_time)
        assert "verify" in stats.summary()
    else:
        assert stats.draft_time == stats.verify_time == 0.0 and "verify" not in stats.summary()


def test_stats_count_only_the_tokens_kept():
    """A step that agrees on more drafts than the answer has room for: the stats count what was kept (the
    report that said "8.00 drafted tokens accepted per step (9.00 emitted)" for a 7-token answer)."""
    case = build("llama", seed=0, batch=1)
    sharpen(case.model, 1, scale=0.1)
    decoder = SelfSpeculativeDecoder(case.model, exit_layer=1, draft_len=8)
    stats = decoder.generate(**case.inputs, max_new_tokens=4).stats
    assert sum(stats.new_tokens) == 4 and stats.steps >= 1
    assert sum(e for step in stats.emitted for e in step) == 3               # x0 came from the prefill
    assert sum(a for step in stats.accepted for a in step) <= 3
    assert stats.mean_emitted <= 3 and f"({stats.mean_emitted:.2f} emitted)" in stats.summary()
    plain = SelfSpeculativeDecoder(case.model, exit_layer=1, draft_len=0).generate(**case.inputs, max_new_tokens=4)
    assert "no drafting step" in plain.stats.summary() and plain.stats.mean_emitted == 0.0


# ---- the adaptive draft policy ---------------------------------------------------------------------------

@pytest.mark.parametrize("max_draft_len, probe_every", [(8, 2), (2, 7)])
def test_adaptive_mixes_plain_and_drafting_steps_exactly(max_draft_len, probe_every):
    """The adaptive decoder times a step's parts at its first call (on the real state, undone: the output is
    identical to generate's) and shows its choices; with costs that make plain steps cheap, plain steps and
    drafting probes mix, still exactly, with an imitation network whose layers catch up on the plain steps'
    tokens before each draft, or within a run of plain steps (max_draft_len 2: every 3 plain steps)."""
    case = build("llava", seed=9, batch=4)
    expected = case.model.generate(**case.inputs, max_new_tokens=40, do_sample=False)
    network = ImitationNetwork.from_model(case.model, exit_layer=1, kind="layers", num_layers=1)
    decoder = SelfSpeculativeDecoder(case.model, exit_layer=1, imitation=network, draft_len="adaptive",
                                     adaptive_window=3, max_draft_len=max_draft_len)
    out = decoder.generate(**case.inputs, max_new_tokens=40)
    assert_lossless(case, out.sequences, expected, "adaptive", [])
    stats, costs = out.stats, decoder.policy.current_costs
    assert stats.step_costs == costs.as_dict() and costs.plain > 0 and costs.first > 0
    assert len(stats.step_draft_lens) == len(stats.step_estimates) == stats.steps
    calibration = decoder.policy.calibration_steps
    assert stats.step_draft_lens[:2 * calibration] == [0] * calibration + [1] * calibration   # timing steps
    assert all(estimates == {} for estimates in stats.step_estimates[:2 * calibration])
    assert all(set(estimates) == set(range(decoder.max_draft_len + 1))
               for estimates in stats.step_estimates[2 * calibration:])
    assert [k for k in stats.step_draft_lens if k] == stats.draft_lens
    assert stats.steps == stats.plain_steps + len(stats.accepted)
    decoder.policy.probe_every = probe_every
    decoder.policy.costs[(4, False)] = dataclasses.replace(costs, plain=costs.step(1) / 20)
    again = decoder.generate(**case.inputs, max_new_tokens=40)     # no new timing: the costs are kept
    assert_lossless(case, again.sequences, expected, "adaptive with plain steps", [])
    assert again.stats.step_costs == dict(out.stats.step_costs, plain=costs.step(1) / 20)
    assert again.stats.plain_steps >= 3 and len(again.stats.accepted) >= 2


def test_adaptive_choices_are_the_same_given_the_same_measured_costs():
    """Two decoders given the same step costs choose the same draft length at every step (the rule reads
    nothing that varies from run to run, such as the steps' wall times), and show it in their stats."""
    case = build("llava", seed=3, batch=2)
    sharpen(case.model, 1, scale=0.1)
    costs = StepCosts(plain=0.010, first=0.011, draft_per_token=0.001, verify_points=((2, 0.008), (9, 0.012)),
                      nodes=list(range(1, 10)))          # drafting pays: lengths follow acceptance
    runs = []
    for _ in range(2):
        decoder = SelfSpeculativeDecoder(case.model, exit_layer=1, draft_len="adaptive")
        decoder.policy.costs = {(2, False): costs}
        runs.append(decoder.generate(**case.inputs, max_new_tokens=30))
    out, again = runs
    assert torch.equal(out.sequences, again.sequences)
    assert out.stats.measure_time == again.stats.measure_time == 0.0
    assert out.stats.step_draft_lens == again.stats.step_draft_lens
    assert len(set(out.stats.step_draft_lens)) > 1, out.stats.step_draft_lens
    assert out.stats.step_estimates == again.stats.step_estimates


class _Schedule:
    """A draft policy that runs a given list of draft lengths (then plain steps)."""

    def __init__(self, lengths, max_draft_len=8):
        self.lengths, self.max_draft_len, self.step = list(lengths), max_draft_len, 0

    def start(self, batch, sampling=False):
        self.step = 0

    def needs_costs(self, context_len):
        return False

    def draft_len(self):
        self.step += 1
        return self.lengths[self.step - 1] if self.step <= len(self.lengths) else 0

    def update(self, draft_len, accepted, seconds):
        pass


def test_plain_steps_tokens_reach_the_imitation_layers_in_one_catch_up_pass(monkeypatch):
    """Plain steps leave their tokens waiting for the imitation layers; the catch-up pass (before a draft,
    or when as many wait as a step may append) writes the same keys and values as running the imitation
    layers at every plain step, at every position, in ragged rows."""
    case = build("llama", seed=2, batch=3)
    network = ImitationNetwork.from_model(case.model, exit_layer=1, kind="layers", num_layers=2)
    schedule = [0] * 13 + [2] + [0] * 4 + [1]        # 13 plain steps: a catch-up at the 9th, then at the draft
    caches = []
    for every_step in (False, True):
        decoder = SelfSpeculativeDecoder(case.model, exit_layer=1, imitation=network, draft_len="adaptive",
                                         linear_backend="torch")
        decoder.policy = _Schedule(schedule)
        if not every_step:     # the lengths up to which the lagging layers are complete, at each catch-up
            catch_up, complete = decoder._catch_up_imitation, []

            def recorded(rows, state, catch_up=catch_up, complete=complete):
                catch_up(rows, state)
                complete.append(list(rows.host_lengths))
            monkeypatch.setattr(decoder, "_catch_up_imitation", recorded)
        else:                  # the reference: the imitation layers inside every plain step, at its positions

            def eager(rows, state, sampling, generator, decoder=decoder):
                hidden = decoder.adapter.embed_tokens(rows.x0)[:, None]
                rotary = decoder._rotary(hidden, rows.positions(1))
                state.prefix_lens = rows.lengths
                hidden = decoder._run_layers(hidden, 0, decoder.exit_layer, rotary, state)
                decoder._imitate(hidden, rotary, state)
                hidden = decoder._run_layers(hidden, decoder.exit_layer, decoder.adapter.num_layers, rotary, state)
                return None, decoder._target_tokens(hidden[:, 0], None, sampling, generator)[0][:, None]
            monkeypatch.setattr(decoder, "plain_step", eager)
        out = decoder.generate(**case.inputs, max_new_tokens=len(schedule) + 4)
        caches.append((decoder._cache, out.sequences))
    (lagged, first), (eager_cache, second) = caches
    assert torch.equal(first, second)
    assert lagged.host_lengths == eager_cache.host_lengths
    lengths = complete[-1]         # the plain steps after the last draft never needed a catch-up
    assert len(complete) >= 3 and min(lengths) > min(complete[0])
    num_layers = case.model.config.text_config.num_hidden_layers if hasattr(case.model.config, "text_config") \
        else case.model.config.num_hidden_layers
    for layer in range(num_layers, lagged.num_layers):
        for b, length in enumerate(lengths):
            torch.testing.assert_close(lagged.buffer[layer, :, b, :, :length],
                                       eager_cache.buffer[layer, :, b, :, :length], rtol=1e-5, atol=1e-5)


def test_measuring_step_costs_leaves_the_state_and_the_random_stream_alone(monkeypatch):
    """measure_step_costs runs every part on the real state: afterwards the rows, every cache layer's length
    and its positions below them, and the caller's generator are as before."""
    case = build("llava", seed=4, batch=2)
    decoder = SelfSpeculativeDecoder(case.model, exit_layer=1, draft_len="adaptive")
    generator = torch.Generator().manual_seed(5)
    original, checked = decoder.measure_step_costs, []

    def measured(rows, state, *args, **kwargs):
        lengths, cache = rows.lengths.clone(), rows.cache
        host = [list(layer) for layer in cache.host_lengths]
        kept = [cache.buffer[:, :, b, :, :n].clone() for b, n in enumerate(rows.host_lengths)]
        random_state, x0 = generator.get_state(), rows.x0.clone()
        costs = original(rows, state, *args, **kwargs)
        assert torch.equal(rows.lengths, lengths) and torch.equal(rows.x0, x0)
        assert cache.host_lengths == host and torch.equal(cache.lengths.cpu(), torch.tensor(host, dtype=torch.int32))
        assert all(torch.equal(cache.buffer[:, :, b, :, :n], before)
                   for b, (n, before) in enumerate(zip(rows.host_lengths, kept)))
        assert torch.equal(generator.get_state(), random_state)
        checked.append(costs)
        return costs

    monkeypatch.setattr(decoder, "measure_step_costs", measured)
    decoder.generate(**case.inputs, max_new_tokens=12, do_sample=True, temperature=1.0, generator=generator)
    assert len(checked) == 1
    decoder.generate(**case.inputs, max_new_tokens=12, do_sample=True, temperature=1.0, generator=generator)
    assert len(checked) == 1      # kept for this batch size and mode


# ---- draft vocabulary subset -----------------------------------------------------------------------------

def _record_drafts(monkeypatch, name):
    """Wraps the decoder's acceptance op ``name`` to record what it is given (the real op still decides)."""
    calls = []

    def recording(run, drafts, *args, **kwargs):
        calls.append((drafts.clone(),) + tuple(arg.clone() if isinstance(arg, torch.Tensor) else arg for arg in args))
        return run(drafts, *args, **kwargs)
    patch_acceptance(monkeypatch, name, recording)
    return calls


@pytest.mark.parametrize("subset_kind", ["covers", "misses", "single"])
def test_greedy_with_a_draft_vocab_is_token_identical(subset_kind, monkeypatch):
    """A draft vocabulary that covers what the model emits, one that misses half of it (the verifier emits
    those tokens itself), and a single token: output identical for exit layers 1 .. N-1, several draft
    lengths, with and without an imitation network; every drafted token lies in the subset."""
    case = build("llama", seed=0, batch=4)
    sharpen(case.model, 1, scale=0.1)
    expected = case.model.generate(**case.inputs, max_new_tokens=MAX_NEW, do_sample=False)
    emitted = torch.unique(expected[:, case.inputs["input_ids"].shape[1]:])
    if subset_kind == "covers":
        subset = torch.cat([emitted, torch.tensor([3, 50, 99])])
    elif subset_kind == "misses":
        subset = torch.cat([emitted[::2], torch.tensor([7, 8])])
        assert len(set(emitted.tolist()) - set(subset.tolist())) >= 2
    else:
        subset = emitted[:1].to(torch.int32)
    allowed = set(subset.tolist())
    calls = _record_drafts(monkeypatch, "accept_greedy")
    imitation = ImitationNetwork.from_model(case.model, exit_layer=2, kind="layers", num_layers=1)
    ties, accepted = [], []
    for exit_layer, network in [(e, None) for e in range(1, NUM_LAYERS)] + [(2, imitation)]:
        for draft_len in (1, 3, "adaptive"):
            decoder = SelfSpeculativeDecoder(case.model, exit_layer=exit_layer, imitation=network,
                                             draft_len=draft_len, draft_vocab=subset)
            out = decoder.generate(**case.inputs, max_new_tokens=MAX_NEW)
            label = f"subset {subset_kind} E={exit_layer} k={draft_len} imitation={network is not None}"
            assert_lossless(case, out.sequences, expected, label, ties)
            accepted.append(out.stats.mean_accepted)
    drafted = torch.cat([drafts.reshape(-1) for drafts, *_ in calls])
    assert drafted.numel() > 0 and set(drafted.tolist()) <= allowed
    if subset_kind == "covers":
        assert max(accepted) > 1.0, "drafts from the subset should be accepted on the sharpened model"


@pytest.mark.parametrize("wrong", [False, True])
def test_sampling_with_a_draft_vocab_preserves_the_model_distribution(wrong, monkeypatch):
    """Sampling with a draft vocabulary that misses likely tokens: the draft distribution q handed to the
    acceptance is the one the drafts were drawn from (zero outside the subset, sums to 1), and the emitted
    tokens follow the model's exact distribution (chi-square). Acceptance given another q (the uniform one)
    while drafting from the subset fails the same test."""
    model, prompt = _sampling_case()
    marginals = _exact_marginals(model, prompt, 1.0)
    likely = torch.argsort(marginals[1], descending=True)
    subset = torch.sort(torch.cat([likely[1:3], likely[5:9]])).values     # misses the most likely token
    outside = torch.ones(model.config.vocab_size, dtype=torch.bool)
    outside[subset] = False
    seen = []

    def checking(run, drafts, draft_probs, target_probs, generator=None):
        seen.append(draft_probs.shape[1])
        assert bool(outside[drafts].any()) is False, "a draft outside the subset"
        assert float(draft_probs[..., outside].abs().max()) == 0.0
        assert torch.allclose(draft_probs.sum(-1), torch.ones_like(draft_probs.sum(-1)), atol=1e-5)
        if wrong:
            draft_probs = torch.full_like(draft_probs, 1.0 / draft_probs.shape[-1])
        return run(drafts, draft_probs, target_probs, generator=generator)
    patch_acceptance(monkeypatch, "accept_sampling", checking)
    decoder = SelfSpeculativeDecoder(model, exit_layer=1, draft_len=3, draft_vocab=subset)
    counts, p_values, _ = sampled_counts(decoder, model, prompt, marginals, seed=7)
    assert seen
    # tokens outside the subset are still emitted, by the verifier, as often as the model says
    assert float(counts[1][outside].sum()) > 0
    if wrong:
        assert min(p_values[1:]) < 1e-6, f"acceptance with another q went undetected: p-values {p_values}"
    else:
        assert min(p_values) > 1e-4, f"speculative samples do not follow the model: p-values {p_values}"


def test_bad_draft_vocab():
    case = build("llama", seed=0)
    for bad, error, words in ((torch.tensor([1.0, 2.0]), TypeError, "integer tensor"),
                              ([1, 2], TypeError, "integer tensor"),
                              (torch.tensor([[1, 2]]), ValueError, "1-D"),
                              (torch.tensor([], dtype=torch.int64), ValueError, "empty"),
                              (torch.tensor([5, 120]), ValueError, r"outside the model's vocabulary \[0, 120\)"),
                              (torch.tensor([-1, 5]), ValueError, "outside")):
        with pytest.raises(error, match=words):
            SelfSpeculativeDecoder(case.model, exit_layer=1, draft_vocab=bad)
    decoder = SelfSpeculativeDecoder(case.model, exit_layer=1, draft_vocab=torch.tensor([9, 3, 3, 7], dtype=torch.int32))
    assert decoder.draft_vocab.tolist() == [3, 7, 9] and decoder.draft_vocab.dtype == torch.int64


# ---- host reads ----------------------------------------------------------------------------------------

_READS = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")


def _count_host_reads(monkeypatch):
    """Counts the tensor methods that read values back to the host (each a device sync on a GPU)."""
    counter = {"reads": 0}
    for name in _READS:
        real = getattr(torch.Tensor, name)

        def counting(self, *args, _real=real, **kwargs):
            counter["reads"] += 1
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counting)
    return counter


@pytest.mark.parametrize("draft_len", [0, 3, "adaptive"])
def test_a_step_reads_the_device_once(draft_len, monkeypatch):
    """Each step, speculative or plain, reads one tensor back to the host (accept_len and emitted together):
    the reads of two calls that differ only in their number of steps differ by exactly that number."""
    case = build("llava", seed=2, batch=4)
    sharpen(case.model, 1, scale=0.1)
    decoder = SelfSpeculativeDecoder(case.model, exit_layer=1, draft_len=draft_len, adaptive_window=2)
    assert_one_read_per_step(decoder, case, monkeypatch)


def assert_one_read_per_step(decoder, case, monkeypatch) -> None:
    """Two calls that differ only in their number of steps differ by exactly that many host reads."""
    decoder.generate(**case.inputs, max_new_tokens=4, eos_token_id=[])      # the first call picks backends
    counter = _count_host_reads(monkeypatch)
    reads, steps = [], []
    for max_new in (6, 30):
        counter["reads"] = 0
        out = decoder.generate(**case.inputs, max_new_tokens=max_new, eos_token_id=[])
        reads.append(counter["reads"])
        steps.append(out.stats.steps)
    monkeypatch.undo()
    assert steps[1] > steps[0]
    assert reads[1] - reads[0] == steps[1] - steps[0], (reads, steps)


@pytest.mark.gpu
@pytest.mark.parametrize("draft_len", [0, 3, "adaptive"])
def test_a_step_synchronises_once_on_the_gpu(draft_len):
    """On a GPU the one read per step is the step's only synchronisation (CUDA's sync debug mode counts them):
    two calls that differ only in their number of steps differ by exactly that many syncs."""
    import warnings
    case = build("llava", seed=2, batch=4)
    sharpen(case.model, 1, scale=0.1)
    case.model.cuda()
    case.inputs = {name: value.cuda() for name, value in case.inputs.items()}
    decoder = SelfSpeculativeDecoder(case.model, exit_layer=1, draft_len=draft_len, adaptive_window=2)
    decoder.generate(**case.inputs, max_new_tokens=4, eos_token_id=[])
    syncs, steps = [], []
    for max_new in (6, 30):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                out = decoder.generate(**case.inputs, max_new_tokens=max_new, eos_token_id=[])
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs.append(sum("synchroniz" in str(w.message) for w in caught))
        steps.append(out.stats.steps)
    assert syncs[1] - syncs[0] == steps[1] - steps[0], (syncs, steps)
