"""SelfSpeculativeDecoder with draft trees: lossless greedy and sampling, layer passes, caches, bad input."""
from __future__ import annotations

import functools

import pytest
import torch

from fastvlm_kernels.decoding import SelfSpeculativeDecoder
from fastvlm_kernels.decoding.tree_step import TreeDrafter
from fastvlm_kernels.imitation import ImitationNetwork

from .models import FAMILIES, NUM_LAYERS, assert_lossless, build, patch_acceptance, sharpen
from .test_decoder import (_exact_marginals, _sampling_case, assert_in_top_2, assert_one_read_per_step,
                           generate_counting_layer_passes, sampled_counts)

MAX_NEW = 12
STATIC = [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 1, 0)]
TREES = {
    "static": dict(tree=STATIC, draft_len=3),
    "dynamic": dict(tree="dynamic", draft_len=3, tree_width=3, tree_budget=5),
    "dynamic-full": dict(tree="dynamic", draft_len=4, tree_width=2),
    "adaptive": dict(tree="dynamic", draft_len="adaptive", max_draft_len=4, tree_width=3, tree_budget=6,
                     adaptive_window=2),
}


def tree_decoder(model, exit_layer, tree, **kwargs):
    """The decoder of TREES[tree]. "adaptive": its policy is told that plain steps took 100x their time (as on
    a machine where plain steps are dear), so that after its calibration steps (plain, then depth 1) the
    adaptive depth keeps drafting trees on these tiny models, where a plain step is the cheapest."""
    decoder = SelfSpeculativeDecoder(model, exit_layer=exit_layer, **TREES[tree], **kwargs)
    if tree == "adaptive":
        update = decoder.policy.update
        decoder.policy.update = lambda k, accepted, seconds: update(k, accepted, seconds * (100 if k == 0 else 1))
    return decoder


@functools.lru_cache(maxsize=None)
def _case_and_expected(family, batch, seed=0):
    case = build(family, seed=seed, batch=batch)
    if seed == 0:
        sharpen(case.model, 1, scale=0.1)
    return case, case.model.generate(**case.inputs, max_new_tokens=MAX_NEW, do_sample=False)


@pytest.mark.parametrize("tree", list(TREES))
@pytest.mark.parametrize("exit_layer", range(1, NUM_LAYERS))
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_trees_are_token_identical_to_generate(family, exit_layer, tree):
    """Every supported family (Qwen2-VL's M-RoPE included), exit layers 1 .. N-1, static and dynamic trees
    (reranked to a budget, or verified whole), adaptive depth; 4 ragged rows with images."""
    case, expected = _case_and_expected(family, 4)
    decoder = tree_decoder(case.model, exit_layer, tree)
    out = decoder.generate(**case.inputs, max_new_tokens=MAX_NEW)
    assert_lossless(case, out.sequences, expected, f"{family} E={exit_layer} {tree}", [])
    assert out.stats.steps > 0 and out.stats.plain_steps < out.stats.steps


@pytest.mark.parametrize("tree", list(TREES))
@pytest.mark.parametrize("family", ["llama", "llava", "qwen2_vl"])
def test_greedy_trees_at_batch_1_and_on_random_weights(family, tree):
    """Batch 1 on the sharpened model (drafts kept) and 4 rows of random weights (mostly rejected)."""
    for batch, seed in ((1, 0), (4, 1)):
        case, expected = _case_and_expected(family, batch, seed)
        out = tree_decoder(case.model, 2, tree).generate(**case.inputs, max_new_tokens=MAX_NEW)
        assert_lossless(case, out.sequences, expected, f"{family} B={batch} seed={seed} {tree}", [])


@pytest.mark.parametrize("family", FAMILIES)
def test_sharpened_models_accept_tree_drafts(family):
    """The lossless tests exercise tree acceptance only if nodes are kept: more than one per step here."""
    case, _ = _case_and_expected(family, 4)
    out = SelfSpeculativeDecoder(case.model, exit_layer=1, **TREES["dynamic"]).generate(**case.inputs,
                                                                                        max_new_tokens=MAX_NEW)
    assert out.stats.mean_accepted > 1.0, out.stats.accepted


@pytest.mark.parametrize("tree", ["static", "dynamic", "adaptive"])
@pytest.mark.parametrize("kind", ["layers", "mlp"])
def test_trees_with_an_imitation_network_and_a_draft_vocab(kind, tree):
    """An (untrained) imitation network, whose layers own cache layers N, N+1, and draft vocabularies that
    cover or miss the emitted tokens: output identical, every cache layer at the same length afterwards."""
    case, expected = _case_and_expected("llava", 4)
    emitted = torch.unique(expected[:, case.inputs["input_ids"].shape[1]:])
    imitation = ImitationNetwork.from_model(case.model, exit_layer=2, kind=kind,
                                            num_layers=2 if kind == "layers" else 0)
    for subset in (None, torch.cat([emitted, torch.tensor([3, 50, 99])]), torch.cat([emitted[::2], torch.arange(4, 9)])):
        decoder = tree_decoder(case.model, 2, tree, imitation=imitation, draft_vocab=subset)
        out = decoder.generate(**case.inputs, max_new_tokens=MAX_NEW)
        label = f"imitation={kind} {tree} subset={None if subset is None else subset.numel()}"
        assert_lossless(case, out.sequences, expected, label, [])
        lengths = decoder._cache.host_lengths
        assert all(layer == lengths[0] for layer in lengths), lengths
        assert decoder._cache.lengths.tolist() == lengths


def test_a_chain_tree_is_the_chain():
    """The tree of paths (0,), (0, 0), (0, 0, 0) drafts and keeps exactly what the chain of 3 does."""
    case, expected = _case_and_expected("llama", 4)
    chain = SelfSpeculativeDecoder(case.model, exit_layer=1, draft_len=3).generate(**case.inputs,
                                                                                   max_new_tokens=MAX_NEW)
    tree = SelfSpeculativeDecoder(case.model, exit_layer=1, draft_len=3, tree=[(0,), (0, 0), (0, 0, 0)]).generate(
        **case.inputs, max_new_tokens=MAX_NEW)
    assert torch.equal(chain.sequences, tree.sequences)
    assert chain.stats.accepted == tree.stats.accepted


@pytest.mark.parametrize("tree", ["static", "dynamic"])
def test_each_node_runs_below_exit_once_and_caches_end_at_the_accepted_length(tree):
    """Below E: the prompt, then each depth's nodes in one pass (every drafted node exactly once). From E on:
    one pass per step over the verified nodes. Every cache layer ends at the prompt plus x0 and the accepted
    nodes of every step."""
    case = build("llama", seed=5, batch=1)
    sharpen(case.model, 1, scale=0.2)
    exit_layer = 2
    decoder = SelfSpeculativeDecoder(case.model, exit_layer=exit_layer, **TREES[tree])
    out, tokens_seen, passes, _ = generate_counting_layer_passes(case, decoder)
    stats = out.stats
    prompt_len = int(case.inputs["attention_mask"].sum())
    if tree == "static":
        drafted, verified, depth = 1 + len(STATIC), 1 + len(STATIC), 3
    else:
        options = TREES[tree]
        drafted, verified, depth = 1 + options["tree_width"] * 3, 1 + options["tree_budget"], 3
    for index in range(exit_layer):
        assert tokens_seen[index] == prompt_len + stats.steps * drafted
        assert passes[index] == 1 + stats.steps * (depth + 1)
    for index in range(exit_layer, NUM_LAYERS):
        assert tokens_seen[index] == prompt_len + stats.steps * verified
        assert passes[index] == 1 + stats.steps
    kept = sum(a + 1 for step in stats.accepted for a in step)
    assert decoder._cache.host_lengths == [[prompt_len + kept]] * NUM_LAYERS
    assert decoder._cache.lengths.tolist() == [[prompt_len + kept]] * NUM_LAYERS
    assert stats.mean_accepted > 0.5


@pytest.mark.parametrize("tree", ["static", "dynamic"])
def test_a_tree_step_reads_the_device_once(tree, monkeypatch):
    case = build("llava", seed=2, batch=4)
    sharpen(case.model, 1, scale=0.1)
    decoder = SelfSpeculativeDecoder(case.model, exit_layer=1, **TREES[tree])
    assert_one_read_per_step(decoder, case, monkeypatch)


# ---- sampling ------------------------------------------------------------------------------------------

SAMPLING_TREES = {
    "static": dict(tree=[(0,), (1,), (2,), (3,), (0, 0), (1, 0)], draft_len=2),
    "dynamic": dict(tree="dynamic", draft_len=2, tree_width=4),
}


@pytest.mark.parametrize("wrong", [False, True], ids=["independent-siblings", "distinct-siblings"])
@pytest.mark.parametrize("tree", list(SAMPLING_TREES))
def test_sampling_with_trees_preserves_the_model_distribution(tree, wrong, monkeypatch):
    """The 2nd and 3rd tokens come from tree steps: their empirical distribution over many seeded runs
    matches the exact one (chi-square). Siblings drawn distinct (without replacement, as a top-k tree would
    be) under the same acceptance rule fail the same test: the rule is exact for independent draws only."""
    model, prompt = _sampling_case()
    marginals = _exact_marginals(model, prompt, 1.0)
    if wrong:
        monkeypatch.setattr(TreeDrafter, "draw_children", staticmethod(
            lambda q, count, generator: torch.multinomial(q, count, replacement=False, generator=generator)))
    decoder = SelfSpeculativeDecoder(model, exit_layer=1, **SAMPLING_TREES[tree])
    _, p_values, stats = sampled_counts(decoder, model, prompt, marginals, seed=2025, rounds=24)
    assert p_values[0] > 1e-4, p_values
    if wrong:
        assert min(p_values[1:]) < 1e-6, f"distinct siblings went undetected: p-values {p_values}"
    else:
        assert min(p_values[1:]) > 1e-4, f"tree samples do not follow the model: p-values {p_values}"
        assert stats.mean_accepted > 0.3


@pytest.mark.parametrize("tree", list(SAMPLING_TREES))
def test_sampling_trees_hand_independent_children_to_the_acceptance(tree, monkeypatch):
    """What the tree acceptance receives: each drafting node's draft distribution (rows sum to 1), children
    its parent's q can draw, and (top_k=2) only tokens in the model's top 2 emitted."""
    model, prompt = _sampling_case()
    seen = []

    def checking(run, tokens, parents, draft_probs, target_probs, generator=None):
        seen.append(tokens.shape[1])
        assert parents[:, 0].eq(-1).all() and (parents[:, 1:] >= 0).all()
        drawn_from = draft_probs.gather(1, parents[:, 1:, None].expand(-1, -1, draft_probs.shape[-1]))
        assert (drawn_from.gather(2, tokens[:, 1:, None]) > 0).all(), "a child its parent's q cannot draw"
        rows = draft_probs[:, :5].sum(-1)           # the root's and the 4 first-depth nodes' q
        assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5)
        return run(tokens, parents, draft_probs, target_probs, generator=generator)
    patch_acceptance(monkeypatch, "accept_sampling_tree", checking)
    decoder = SelfSpeculativeDecoder(model, exit_layer=1, **SAMPLING_TREES[tree])
    out = decoder.generate(prompt.repeat(32, 1), max_new_tokens=6, do_sample=True, temperature=0.7, top_k=2,
                           generator=torch.Generator().manual_seed(0))
    assert seen
    assert_in_top_2(model, prompt, out.sequences)


# ---- bad input -----------------------------------------------------------------------------------------

def test_bad_tree_arguments_raise_naming_them_before_anything_runs():
    case = build("llama", seed=0)
    model = case.model
    cases = [
        (dict(tree=[(0,), (1, 0)]), ValueError, r"tree: .*\(1, 0\) has no parent: \(1,\) is missing"),
        (dict(tree=[(0,), (-1,)]), ValueError, r"tree: .*child ranks must be >= 0"),
        (dict(tree=[(r,) for r in range(64)], draft_len=1), ValueError, r"tree: .*exceed the 64 tokens"),
        (dict(tree="dynamic", tree_budget=0), ValueError, r"tree_budget must be >= 1"),
        (dict(tree="dynamic", tree_budget=-3), ValueError, r"tree_budget must be >= 1"),
        (dict(tree="dynamic", tree_width=20, draft_len=4), ValueError, r"tree_width=20 .*more than the 64"),
        (dict(tree="dynamic", tree_width=0), ValueError, r"tree_width must be >= 1"),
        (dict(tree="dynamic", tree_budget=2.5), TypeError, r"tree_budget must be an int"),
        (dict(tree="wide"), ValueError, r"tree must be None, 'dynamic' or a list of paths"),
        (dict(tree=[(0,), (0, 0), (0, 0, 0)], draft_len=2), ValueError, r"tree: its depth 3 exceeds the draft length 2"),
        (dict(tree=STATIC, tree_budget=4), ValueError, r"tree_budget: a static tree is verified whole"),
        (dict(tree_budget=4), ValueError, r"tree_budget: only a dynamic tree"),
        (dict(tree="dynamic", draft_len=0), ValueError, r"draft_len=0 drafts nothing"),
        (dict(tree="dynamic", tree_width=4, draft_vocab=torch.tensor([3, 4, 5])), ValueError,
         r"tree_width=4 exceeds the draft vocabulary's 3"),
        (dict(tree=[(0,), (1,), (2,)], draft_vocab=torch.tensor([3, 4])), ValueError, r"tree: a node needs 3 candidates"),
        (dict(tree=[[0, "a"]]), TypeError, r"tree: .*child ranks must be ints"),
    ]
    for kwargs, error, words in cases:
        with pytest.raises(error, match=words):
            SelfSpeculativeDecoder(model, exit_layer=1, **kwargs)


def test_a_cache_too_small_for_the_tree_raises_before_running():
    case = build("llama", seed=0)
    prompt_len = case.inputs["input_ids"].shape[1]
    decoder = SelfSpeculativeDecoder(case.model, exit_layer=1, tree="dynamic", draft_len=3, tree_width=4,
                                     max_cache_len=prompt_len + 10 + 3 + 12)
    with pytest.raises(ValueError, match=r"max_new_tokens=10: .*one step's positions \(13\).*max_cache_len"):
        decoder.generate(**case.inputs, max_new_tokens=10)
    assert decoder._cache is None
    out = decoder.generate(**case.inputs, max_new_tokens=9)
    assert out.sequences.shape[1] <= prompt_len + 9


@pytest.mark.gpu
@pytest.mark.parametrize("tree", ["static", "dynamic", "adaptive"])
@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "llama"])
def test_greedy_trees_on_gpu_are_token_identical_to_generate(family, tree):
    """fp32 on the GPU: tree attention, top-k draft heads, tree acceptance and kv_compact on the GPU backends."""
    case = build(family, seed=0, batch=4)
    sharpen(case.model, 1, scale=0.1)
    case.model.cuda()
    case.inputs = {name: value.cuda() for name, value in case.inputs.items()}
    expected = case.model.generate(**case.inputs, max_new_tokens=MAX_NEW, do_sample=False)
    decoder = tree_decoder(case.model, 1, tree)
    out = decoder.generate(**case.inputs, max_new_tokens=MAX_NEW)
    assert out.sequences.device.type == "cuda"
    assert_lossless(case, out.sequences, expected, f"cuda {family} {tree}", [])
    lengths = decoder._cache.host_lengths
    assert decoder._cache.lengths.tolist() == lengths
