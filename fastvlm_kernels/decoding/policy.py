"""Draft policies: how many tokens each step drafts (a chain's length, a tree's depth), 0 meaning a plain step.

The decoder asks its policy once per step (:meth:`draft_len`) and tells it what the step did
(:meth:`update`: the draft length used, the tokens each unfinished row kept, the step's wall time). Both
modes are exact, so a policy changes only the speed. The step's wall time is read after the step's one
device-to-host read, which waits for the device anyway: measuring it costs no synchronisation.

The adaptive policy also needs the cost of each kind of step: the decoder times the parts a longer draft
adds once per batch size and sampling mode (:meth:`SelfSpeculativeDecoder.measure_step_costs`) and hands them
over (:meth:`AdaptiveDraftLen.set_costs`) when the policy asks for them (:meth:`AdaptiveDraftLen.needs_costs`);
the policy times a plain step and a one-draft step itself, on the first real steps it runs.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from statistics import median
from typing import Dict, List, Optional, Sequence, Tuple


class FixedDraftLen:
    """Every step drafts ``draft_len`` tokens (0: every step is plain)."""

    def __init__(self, draft_len: int):
        self.max_draft_len = draft_len
        self._draft_len = draft_len

    def start(self, batch: int, sampling: bool = False) -> None:
        pass

    def needs_costs(self, context_len: int) -> bool:
        return False

    def draft_len(self) -> int:
        return self._draft_len

    def update(self, draft_len: int, accepted: List[int], seconds: float) -> None:
        pass


@dataclass
class StepCosts:
    """Seconds of a step and of its parts, each the median of a few timings on the decoder's real state (see
    :meth:`SelfSpeculativeDecoder.measure_step_costs`), and the price of a step with k drafts from them.

    - ``plain``: a plain step (x0 through all N layers and the head, the step's read and rollback).
    - ``first``: a whole drafting step with one draft (a tree: depth 1), with its read and rollback: what
      composing the parts does not show (the acceptance, the passes' effect on each other's caches) is in it.
      These two are timed by the policy on real steps (None until then).
    - Each further draft (a tree: depth) adds ``draft_per_token`` (one more pass below the exit and head) and
      the verification of the extra positions: ``verify(nodes[k]) - verify(nodes[1])``, verify linear
      through its two timed points ``verify_points = ((n1, seconds), (n2, seconds))``; ``nodes[k]`` is the
      positions verified with k drafts (k + 1 for a chain, the verified nodes of a tree cut to depth k).
    """
    plain: Optional[float]
    first: Optional[float]
    draft_per_token: float
    verify_points: Tuple[Tuple[int, float], Tuple[int, float]]
    nodes: Sequence[int]
    context_len: int = 0          # the longest row when timed (attention grows with it)
    measured_in: float = 0.0      # seconds the parts' timing took (once per batch size and mode)

    @property
    def complete(self) -> bool:
        return self.plain is not None and self.first is not None

    def verify(self, num_nodes: int) -> float:
        (n1, t1), (n2, t2) = self.verify_points
        slope = max(0.0, (t2 - t1) / (n2 - n1)) if n2 != n1 else 0.0
        return t1 + slope * (num_nodes - n1)

    def step(self, k: int) -> float:
        """The estimated seconds of a step with k drafts (0: plain)."""
        if k == 0:
            return self.plain
        return (self.first + (k - 1) * max(self.draft_per_token, 0.0)
                + self.verify(self.nodes[k]) - self.verify(self.nodes[1]))

    def as_dict(self) -> dict:
        return {"plain": self.plain, "first": self.first, "draft_per_token": self.draft_per_token,
                "verify_points": [list(point) for point in self.verify_points], "context_len": self.context_len,
                "measured_in": self.measured_in}


class AdaptiveDraftLen:
    """Each step's draft length k (0: a plain step) chosen to maximise expected emitted tokens per second.

    - Cost: :class:`StepCosts`, timed once per batch size and sampling mode (and again only when the
      context has grown past twice the length they were timed at): the parts a longer draft adds, which the
      decoder measures (medians of several timings in alternated turns), and a plain step and a one-draft
      step, which the policy times on real steps: the first ``calibration_steps`` steps at a batch size and
      mode are plain, the next as many draft one token (a tree: depth 1), and each cost is the median of
      those steps but the first of each kind (which follows the prefill or the other kind). Those steps emit
      tokens as any others. After that, no step's wall time moves the choice: one slow step (a cache miss,
      another process) would, a k not chosen would never be priced, and the machine's drift would fall on
      whichever kind of step ran at the time.
    - Acceptance per depth: ``alpha[i]`` estimates the probability that the i-th drafted token is kept given
      that the ones before it were. Each unfinished row of a step that drafted k and kept a is one observation
      for depths 1 .. min(a + 1, k): kept up to a, rejected at a + 1. Counts fade by ``1 - 1/window`` per
      drafting step (the estimate follows the answer) and each depth is shrunk toward the depth above it
      (``prior_weight`` pseudo-observations; depth 1 toward ``prior_alpha``), so a depth never drafted is
      priced as the deepest one seen: drafts kept whole make the next length look as good, and the rule
      grows the draft by itself where that pays (no separate growth schedule).
    - The rule: expected tokens of k drafts ``1 + sum_j prod_{i<=j} alpha[i]`` over the step's estimated
      seconds, for k in 0 .. max_draft_len; the best k runs (ties to the shorter). Plain decoding is the k = 0
      choice of the same rule. Plain steps observe no acceptance: after ``probe_every`` of them in a row one
      drafting step (the best k > 0) refreshes it.

    Deterministic given its measurements. The estimates and the acceptance counts are kept across
    ``generate`` calls (costs per batch size and mode), so a later call starts where the last one ended.
    ``last_estimates``: the estimated seconds per token of every k at the last choice.
    """

    def __init__(self, max_draft_len: int = 8, window: int = 16, *, prior_alpha: float = 0.6,
                 prior_weight: float = 2.0, probe_every: int = 16, calibration_steps: int = 4):
        if isinstance(max_draft_len, bool) or not isinstance(max_draft_len, int) or max_draft_len < 1:
            raise ValueError(f"max_draft_len must be an int >= 1, got {max_draft_len!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"adaptive_window must be an int >= 1, got {window!r}")
        self.max_draft_len, self.window = max_draft_len, window
        self.forget = 1.0 - 1.0 / window
        self.prior_alpha, self.prior_weight, self.probe_every = prior_alpha, prior_weight, probe_every
        if calibration_steps < 2:
            raise ValueError(f"calibration_steps must be >= 2, got {calibration_steps!r}")
        self.calibration_steps = calibration_steps
        self.costs: Dict[Tuple[int, bool], StepCosts] = {}          # (batch, sampling) -> timed parts
        self.whole: Dict[Tuple[int, bool], Dict[int, List[float]]] = {}   # ... -> k (0, 1) -> step seconds
        self._last_k: Optional[int] = None
        self.kept = [0.0] * (max_draft_len + 1)                     # decayed counts per depth (index 1..max)
        self.tried = [0.0] * (max_draft_len + 1)
        self.last_estimates: Dict[int, float] = {}
        self._key: Tuple[int, bool] = (1, False)
        self._plain_run = 0

    # ---- the costs -------------------------------------------------------------------------------------------

    def start(self, batch: int, sampling: bool = False) -> None:
        self._key = (batch, bool(sampling))
        self._plain_run = 0
        self._last_k = None          # the call's first step follows the prefill: never a timing sample

    def needs_costs(self, context_len: int) -> bool:
        """Whether the decoder should time a step's parts now: none yet at this batch size and mode, or the
        context has grown past twice the length they were timed at (and by at least 256 positions)."""
        costs = self.costs.get(self._key)
        return costs is None or context_len > max(2 * costs.context_len, costs.context_len + 256)

    @property
    def current_costs(self) -> Optional[StepCosts]:
        """The step costs of the current batch size and mode (None until set)."""
        return self.costs.get(self._key)

    def set_costs(self, costs: StepCosts) -> None:
        """The decoder's measured parts (``plain`` and ``first`` left None are timed on the next real steps)."""
        if len(costs.nodes) <= self.max_draft_len:
            raise ValueError(f"costs.nodes must cover draft lengths 0 .. {self.max_draft_len}")
        self.costs[self._key] = costs
        self.whole[self._key] = {0: [], 1: []}

    def _calibrating(self) -> Optional[int]:
        """The k of the next calibration step (0, then 1), or None once plain and first are known."""
        costs = self.costs.get(self._key)
        if costs is None or costs.complete:
            return None
        samples = self.whole[self._key]
        for k in (0, 1):
            if len(samples[k]) < self.calibration_steps - 1:
                return k
        self.costs[self._key] = replace(costs, plain=median(samples[0]), first=median(samples[1]))
        return None

    def step_seconds(self, k: int) -> float:
        costs = self.costs.get(self._key)
        if costs is None or not costs.complete:
            raise RuntimeError("AdaptiveDraftLen has no complete step costs for this batch size and mode yet: "
                               "the decoder sets the parts (set_costs) when needs_costs() says so, and the "
                               "first steps time a plain and a one-draft step")
        return costs.step(k)

    # ---- acceptance ------------------------------------------------------------------------------------------

    def alphas(self) -> List[float]:
        """alpha[1 .. max_draft_len] (index 0 unused), each depth shrunk toward the depth above it."""
        values, above = [1.0], self.prior_alpha
        for depth in range(1, self.max_draft_len + 1):
            above = (self.kept[depth] + self.prior_weight * above) / (self.tried[depth] + self.prior_weight)
            values.append(above)
        return values

    def _expected_tokens_all(self) -> List[float]:
        """Expected emitted tokens of a step with k drafts, for k in 0 .. max_draft_len:
        ``1 + sum_{j<=k} prod_{i<=j} alpha[i]``."""
        alphas, totals, chain = self.alphas(), [1.0], 1.0
        for depth in range(1, self.max_draft_len + 1):
            chain *= alphas[depth]
            totals.append(totals[-1] + chain)
        return totals

    def expected_tokens(self, k: int) -> float:
        return self._expected_tokens_all()[k]

    def estimates(self) -> Dict[int, float]:
        """Estimated seconds per emitted token of every k in 0 .. max_draft_len."""
        return {k: self.step_seconds(k) / tokens for k, tokens in enumerate(self._expected_tokens_all())}

    # ---- the policy interface ----------------------------------------------------------------------------------

    def draft_len(self) -> int:
        calibrating = self._calibrating()
        if calibrating is not None:
            self.last_estimates = {}
            return calibrating
        self.last_estimates = estimates = self.estimates()
        best = min(estimates, key=estimates.get)                 # the first of equal times, as k goes up
        if best == 0 and self._plain_run >= self.probe_every:     # refresh acceptance: one drafting step
            best = min(range(1, self.max_draft_len + 1), key=estimates.get)
        return best

    def update(self, draft_len: int, accepted: List[int], seconds: float) -> None:
        costs = self.costs.get(self._key)
        if costs is not None and not costs.complete and draft_len in (0, 1) and self._last_k == draft_len:
            self.whole[self._key][draft_len].append(seconds)   # a step that followed one of its kind
        self._last_k = draft_len
        self._plain_run = self._plain_run + 1 if draft_len == 0 else 0
        if draft_len == 0 or not accepted:
            return
        for depth in range(1, self.max_draft_len + 1):          # older evidence fades at every depth
            self.tried[depth] *= self.forget
            self.kept[depth] *= self.forget
        for kept in accepted:                                     # each unfinished row is one observation
            for depth in range(1, min(kept + 1, draft_len) + 1):
                self.tried[depth] += 1.0
                self.kept[depth] += 1.0 if depth <= kept else 0.0
