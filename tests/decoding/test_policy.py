"""AdaptiveDraftLen: choices from timed step parts and acceptance per depth; deterministic; StepCosts pricing."""
from __future__ import annotations

import dataclasses
import random

import pytest

from fastvlm_kernels.decoding.policy import AdaptiveDraftLen, StepCosts


def _costs(plain_ms, draft_base_ms, per_token_ms, verify_ms_at_2, verify_slope_ms, max_k=8, context_len=50):
    """StepCosts of a chain whose draft loop costs draft_base + k per_token and whose verification is linear in
    the positions (k + 1)."""
    first = draft_base_ms + per_token_ms + verify_ms_at_2
    return StepCosts(plain=plain_ms / 1e3, first=first / 1e3, draft_per_token=per_token_ms / 1e3,
                     verify_points=((2, verify_ms_at_2 / 1e3), (max_k + 1, (verify_ms_at_2 + verify_slope_ms
                                                                              * (max_k - 1)) / 1e3)),
                     nodes=list(range(1, max_k + 2)), context_len=context_len)


def _simulate(policy, costs, alpha, steps=300, seed=0, batch=1, noise=0.0):
    """Runs the policy against a synthetic decoder whose steps take what ``costs`` say (times relative noise)
    and keep each drafted token with probability ``alpha``."""
    rng = random.Random(seed)
    policy.start(batch)
    if policy.needs_costs(costs.context_len):
        policy.set_costs(costs)
    chosen = []
    for _ in range(steps):
        k = policy.draft_len()
        kept = [0] * batch
        for row in range(batch):
            while kept[row] < k and rng.random() < alpha:
                kept[row] += 1
        seconds = costs.step(k) * (1.0 + noise * rng.uniform(-1.0, 1.0))
        policy.update(k, kept, seconds)
        chosen.append(k)
    return chosen


def _tokens(alpha, k):
    return sum(alpha ** j for j in range(k + 1))


@pytest.mark.parametrize("alpha, costs", [
    (0.9, _costs(10.0, 1.5, 1.1, 7.8, 0.6)),      # the tiny VLM's parts: a long draft pays
    (0.45, _costs(31.0, 11.0, 12.0, 21.0, 3.3)),   # SmolLM2's parts at its chat-prompt acceptance: plain
    (0.8, _costs(31.0, 11.0, 12.0, 21.0, 3.3)),    # ... at a higher acceptance: a short draft
    (0.7, _costs(10.0, 2.0, 3.0, 8.0, 1.0)),
    (0.97, _costs(20.0, 2.0, 0.5, 15.0, 0.5)),
])
def test_it_settles_on_the_best_length_of_a_known_model(alpha, costs):
    """With the step costs the parts give and acceptance alpha per depth, the policy's last 150 steps (its
    acceptance probes included) emit within 3% of the best fixed length's tokens per second, and never slower
    than plain decoding by more than 3%."""
    policy = AdaptiveDraftLen(8)
    chosen = _simulate(policy, costs, alpha, noise=0.1)
    best = max(range(9), key=lambda k: _tokens(alpha, k) / costs.step(k))
    settled = chosen[-150:]
    achieved = sum(_tokens(alpha, k) for k in settled) / sum(costs.step(k) for k in settled)
    assert achieved >= 0.97 * _tokens(alpha, best) / costs.step(best), (best, settled[-20:], policy.alphas())
    assert achieved >= 0.97 / costs.plain


def test_choices_are_deterministic_given_the_measurements():
    costs = _costs(10.0, 2.0, 1.5, 8.0, 1.0)
    runs = [_simulate(AdaptiveDraftLen(6), costs, 0.8, seed=3, noise=0.2) for _ in range(2)]
    assert runs[0] == runs[1]


def test_step_costs_price_chains_and_trees_from_their_parts():
    costs = _costs(10.0, 2.0, 1.5, 8.0, 1.0, max_k=4)
    assert costs.step(0) == pytest.approx(0.010)
    # k drafts: the draft loop (2 + 1.5 k) and verification of k + 1 positions (8 at 2, + 1 per position)
    for k in range(1, 5):
        assert costs.step(k) == pytest.approx((2.0 + 1.5 * k + 8.0 + 1.0 * (k - 1)) / 1e3)
    tree = StepCosts(plain=0.01, first=0.015, draft_per_token=0.003, verify_points=((5, 0.01), (9, 0.014)),
                     nodes=[1, 5, 9, 9])       # a dynamic tree of width 4 and budget 8: 9 nodes from depth 2 on
    assert tree.step(1) == pytest.approx(0.015)
    assert tree.step(3) == pytest.approx(0.015 + 2 * 0.003 + (0.014 - 0.010))
    noisy = StepCosts(plain=0.01, first=0.02, draft_per_token=-0.001, verify_points=((2, 0.01), (9, 0.009)),
                      nodes=list(range(1, 10)))
    assert noisy.step(8) == pytest.approx(0.02)   # a negative slope from noise counts as flat
    assert costs.as_dict()["verify_points"] == [[2, 0.008], [5, pytest.approx(0.011)]]


def test_costs_are_asked_for_once_per_batch_size_and_mode_and_when_the_context_doubles():
    policy = AdaptiveDraftLen(4)
    policy.start(1)
    assert policy.needs_costs(40)
    with pytest.raises(RuntimeError, match="no complete step costs"):
        policy.draft_len()
    policy.set_costs(_costs(10.0, 2.0, 1.5, 8.0, 1.0, max_k=4, context_len=40))
    assert not policy.needs_costs(295) and policy.needs_costs(297)   # past max(2 x 40, 40 + 256)
    policy.start(1, sampling=True)                                    # sampling has its own
    assert policy.needs_costs(40)
    policy.start(2)
    assert policy.needs_costs(40)
    policy.start(1)
    assert not policy.needs_costs(40)
    with pytest.raises(ValueError, match="costs.nodes"):
        policy.set_costs(_costs(10.0, 2.0, 1.5, 8.0, 1.0, max_k=2))


def test_plain_and_one_draft_steps_are_timed_on_the_first_real_steps():
    """With the decoder's parts only, the first steps are plain, then one-draft, ``calibration_steps`` each;
    each cost is the median of those steps but the first of each kind (and of each call); then the rule."""
    policy = AdaptiveDraftLen(4, calibration_steps=4)
    parts = dataclasses.replace(_costs(10.0, 2.0, 1.5, 8.0, 1.0, max_k=4), plain=None, first=None)
    policy.start(1)
    policy.set_costs(parts)
    chosen = []
    times = {0: iter([0.050, 0.010, 0.012, 0.011, 0.013]), 1: iter([0.040, 0.020, 0.022, 0.021])}
    for step in range(5):
        if step == 2:
            policy.start(1)                  # a new call: its first step follows the prefill, not timed
        k = policy.draft_len()
        chosen.append(k)
        assert policy.last_estimates == {}
        policy.update(k, [0] if k else [], next(times[k]))
    for _ in range(4):
        k = policy.draft_len()
        chosen.append(k)
        policy.update(k, [1], next(times[k]))
    assert chosen == [0] * 5 + [1] * 4
    policy.draft_len()
    costs = policy.current_costs
    assert costs.plain == pytest.approx(0.011) and costs.first == pytest.approx(0.021)   # 0.050, 0.012 dropped
    assert set(policy.last_estimates) == set(range(5))
    with pytest.raises(ValueError, match="calibration_steps"):
        AdaptiveDraftLen(4, calibration_steps=1)


def test_acceptance_per_depth_counts_rejections_where_they_happen():
    policy = AdaptiveDraftLen(4, window=10**9, prior_alpha=0.5, prior_weight=2.0)
    policy.start(1)
    policy.update(4, [2, 4], 0.01)     # row 1 kept 2 (rejected at depth 3), row 2 kept all 4
    # (kept, tried) per depth: (2, 2), (2, 2), (1, 2), (1, 1); each shrunk toward the depth above (weight 2)
    expected, above = [], 0.5
    for kept, tried in ((2, 2), (2, 2), (1, 2), (1, 1)):
        above = (kept + 2.0 * above) / (tried + 2.0)
        expected.append(above)
    assert policy.alphas()[1:] == pytest.approx(expected)
    assert policy.expected_tokens(0) == 1.0
    assert policy.expected_tokens(2) == pytest.approx(1 + expected[0] + expected[0] * expected[1])
    policy.update(0, [0, 0], 0.01)     # a plain step observes no acceptance
    assert policy.alphas()[1:] == pytest.approx(expected)


def test_plain_steps_probe_drafting_every_probe_every_steps():
    """Where drafting does not pay, the rule keeps k = 0, and one drafting step in probe_every refreshes the
    acceptance; when acceptance rises, drafting takes over."""
    policy = AdaptiveDraftLen(4, probe_every=5)
    costs = _costs(10.0, 2.0, 2.0, 8.0, 1.0, max_k=4)    # k = 1 costs 1.2 plain steps
    chosen = _simulate(policy, costs, 0.1, steps=30)
    assert chosen[-24:].count(0) >= 18 and 0 < sum(1 for k in chosen[-24:] if k) <= 5
    chosen = _simulate(policy, costs, 1.0, steps=40)       # every draft kept: drafting wins, and grows
    assert chosen[-5:] == [4] * 5


def test_drafts_kept_whole_make_a_longer_draft_look_as_good():
    """A depth never drafted is priced as the deepest one seen, so a draft kept whole grows where that pays."""
    policy = AdaptiveDraftLen(6, prior_alpha=0.5)
    policy.start(1)
    policy.set_costs(_costs(30.0, 1.0, 1.0, 5.0, 0.5, max_k=6))
    chosen = policy.draft_len()
    assert 0 < chosen < 6
    for _ in range(4):
        policy.update(chosen, [chosen], 0.01)   # kept whole
    assert policy.alphas()[chosen + 1] == pytest.approx(policy.alphas()[chosen])
    assert policy.draft_len() > chosen


def test_estimates_cover_every_length():
    policy = AdaptiveDraftLen(5)
    policy.start(1)
    policy.set_costs(_costs(10.0, 2.0, 1.5, 8.0, 1.0, max_k=5))
    policy.draft_len()
    assert set(policy.last_estimates) == set(range(6))
    assert policy.last_estimates[0] == pytest.approx(0.010)
    assert policy.last_estimates[2] == pytest.approx(policy.step_seconds(2) / policy.expected_tokens(2))


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_draft_len"):
        AdaptiveDraftLen(0)
    with pytest.raises(ValueError, match="adaptive_window"):
        AdaptiveDraftLen(window=0)
