"""CostModelDraftLen: deterministic choices from its estimates, calibration, acceptance per depth, pricing."""
from __future__ import annotations

import random

import pytest

from fastvlm_kernels.decoding.policy import CostModelDraftLen


def _simulate(policy, alpha, step_ms, steps=300, seed=0, batch=1):
    """Runs the policy against a synthetic decoder: acceptance alpha per depth, step_ms(k) milliseconds."""
    rng = random.Random(seed)
    policy.start(batch)
    chosen = []
    for _ in range(steps):
        k = policy.draft_len()
        kept = 0
        while kept < k and rng.random() < alpha:
            kept += 1
        policy.update(k, [kept], step_ms(k) / 1e3)
        chosen.append(k)
    return chosen


def _best_k(alpha, step_ms, max_k):
    def rate(k):
        tokens = sum(alpha ** j for j in range(k + 1))
        return tokens / step_ms(k)
    return max(range(max_k + 1), key=rate)


@pytest.mark.parametrize("alpha, base, per_draft", [(0.9, 10.0, 1.0), (0.7, 10.0, 3.0), (0.3, 10.0, 6.0),
                                                    (0.95, 20.0, 0.5)])
def test_it_settles_on_the_best_length_of_a_known_model(alpha, base, per_draft):
    """With exact step times and acceptance alpha per depth, the policy's last 100 steps (its acceptance
    probes included) emit within 3% of the best fixed length's tokens per second; plain decoding (k = 0) where
    drafting does not pay."""
    step_ms = lambda k: base + (per_draft * k + 2.0 if k else 0.0)   # noqa: E731 - a drafting step's fixed part
    policy = CostModelDraftLen(8)
    chosen = _simulate(policy, alpha, step_ms)
    best = _best_k(alpha, step_ms, 8)

    def tokens(k):
        return sum(alpha ** j for j in range(k + 1))
    settled = chosen[-100:]
    achieved = sum(tokens(k) for k in settled) / sum(step_ms(k) for k in settled)
    assert achieved >= 0.97 * tokens(best) / step_ms(best), (best, settled[-20:], policy.alphas())


def test_choices_are_deterministic_given_the_measurements():
    step_ms = lambda k: 10.0 + 2.0 * k   # noqa: E731
    runs = [_simulate(CostModelDraftLen(6), 0.8, step_ms, seed=3) for _ in range(2)]
    assert runs[0] == runs[1]


def test_calibration_then_estimates_per_batch_size():
    policy = CostModelDraftLen(4, samples_to_trust=2)
    policy.start(1)
    schedule = []
    for _ in range(6):
        k = policy.draft_len()
        schedule.append(k)
        policy.update(k, [min(k, 1)], 0.01 + 0.002 * k)
    assert schedule == [0, 0, 1, 1, 4, 4]
    assert set(policy.last_estimates) == set()            # no choice made from estimates yet
    policy.draft_len()
    assert set(policy.last_estimates) == {0, 1, 2, 3, 4}     # every length priced (2, 3 interpolated)
    assert policy.step_seconds(2) == pytest.approx(0.014)
    policy.start(4)                                          # another batch size calibrates its own costs
    assert policy.draft_len() == 0


def test_acceptance_per_depth_counts_rejections_where_they_happen():
    policy = CostModelDraftLen(4, forget=1.0, prior_alpha=0.5, prior_weight=2.0)
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


def test_a_whole_draft_kept_extends_the_next_one():
    policy = CostModelDraftLen(6, samples_to_trust=1)
    policy.start(1)
    for k in (0, 1, 6):                                       # calibration: plain dear, drafting cheap
        policy.update(k, [min(k, 1)] if k else [], 0.010 + 0.001 * k if k else 0.05)
    chosen = policy.draft_len()
    policy.update(chosen, [chosen], 0.010 + 0.001 * chosen)   # kept whole
    assert policy.draft_len() >= min(6, chosen + 1)


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_draft_len"):
        CostModelDraftLen(0)
