"""Draft policies: how many tokens each step drafts, 0 meaning a plain step (no draft).

The decoder asks its policy once per step (:meth:`draft_len`) and tells it what the step did
(:meth:`update`: the draft length used, the tokens each unfinished row kept, the step's wall time). Both
modes are exact, so a policy changes only the speed. The step's wall time is read after the step's one
device-to-host read, which waits for the device anyway: measuring it costs no synchronisation.
"""
from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Dict, List, Optional


class FixedDraftLen:
    """Every step drafts ``draft_len`` tokens (0: every step is plain)."""

    def __init__(self, draft_len: int):
        self.max_draft_len = draft_len
        self._draft_len = draft_len

    def start(self, batch: int) -> None:
        pass

    def draft_len(self) -> int:
        return self._draft_len

    def update(self, draft_len: int, accepted: List[int], seconds: float) -> None:
        pass


class AdaptiveDraftLen:
    """Adaptive drafting: the draft length follows acceptance, and steps fall back to plain decoding where
    drafting does not pay.

    - Length: ``ceil(mean accepted) + 1`` over the last ``window`` drafting steps (mean over unfinished rows),
      between 1 and ``max_draft_len``; ``max_draft_len`` until a drafting step has been seen.
    - Draft or plain: a moving average of the wall time per emitted token of drafting steps and of plain
      steps; the faster mode runs, and every ``probe_every`` steps ``probe_steps`` of the other refresh its
      estimate (acceptance changes along an answer). Plain is first tried after ``window`` drafting steps.
      The estimates and the acceptance window are kept per batch size across ``generate`` calls, so a later
      call starts in the mode that was faster, at the length acceptance asked for, without a new warmup.
    """

    def __init__(self, max_draft_len: int = 8, window: int = 8, probe_every: int = 24, probe_steps: int = 2,
                 smoothing: float = 0.3):
        if isinstance(max_draft_len, bool) or not isinstance(max_draft_len, int) or max_draft_len < 1:
            raise ValueError(f"max_draft_len must be an int >= 1, got {max_draft_len!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"adaptive_window must be an int >= 1, got {window!r}")
        self.max_draft_len, self.window = max_draft_len, window
        self.probe_every, self.probe_steps, self.smoothing = probe_every, probe_steps, smoothing
        self.per_token: Dict[int, Dict[str, Optional[float]]] = {}   # batch size -> mode -> seconds per token
        self.windows: Dict[int, deque] = {}                            # batch size -> recent mean accepted
        self.mode = "draft"
        self._estimates: Dict[str, Optional[float]] = {"draft": None, "plain": None}
        self._recent: deque = deque(maxlen=window)
        self._probe_left = 0
        self._since = 0

    def start(self, batch: int) -> None:
        """A new ``generate`` call at this batch size: the faster mode by the estimates so far (drafting until
        plain was timed) and the acceptance window of earlier calls; the probe counters restart."""
        self._estimates = self.per_token.setdefault(batch, {"draft": None, "plain": None})
        self._recent = self.windows.setdefault(batch, deque(maxlen=self.window))
        self.mode = self._faster() if None not in self._estimates.values() else "draft"
        self._probe_left = 0
        self._since = 0

    def draft_len(self) -> int:
        return 0 if self.mode == "plain" else self.length_when_drafting()

    def length_when_drafting(self) -> int:
        """The next drafting step's length, from the acceptance of the recent ones."""
        if not self._recent:
            return self.max_draft_len
        return max(1, min(self.max_draft_len, math.ceil(sum(self._recent) / len(self._recent)) + 1))

    def update(self, draft_len: int, accepted: List[int], seconds: float) -> None:
        mean_kept = sum(accepted) / len(accepted) if accepted else 0.0
        if draft_len > 0:
            self._recent.append(mean_kept)
        self._time("draft" if draft_len > 0 else "plain", seconds, mean_kept + 1.0)

    def _time(self, step_mode: str, seconds: float, tokens_per_row: float) -> None:
        """Records the last step's time per emitted token and sets the mode of the next step."""
        sample = seconds / max(tokens_per_row, 1e-9)
        previous = self._estimates[step_mode]
        self._estimates[step_mode] = sample if previous is None else \
            (1 - self.smoothing) * previous + self.smoothing * sample
        other = "plain" if self.mode == "draft" else "draft"
        if self._probe_left > 0:
            self._probe_left -= 1
            if self._probe_left == 0:
                self.mode = self._faster()
                self._since = 0
            return
        self._since += 1
        if self._since >= (self.window if self._estimates[other] is None else self.probe_every):
            self.mode = other
            self._probe_left = self.probe_steps

    def _faster(self) -> str:
        """The mode with the lower time per token (a mode not timed yet counts as slower)."""
        timed = {mode: value for mode, value in self._estimates.items() if value is not None}
        return min(timed, key=timed.get) if timed else self.mode


class CostModelDraftLen:
    """The draft length (0: plain) that maximises expected emitted tokens per second, from two estimates.

    - Acceptance per depth: ``alpha[i]`` estimates the probability that the i-th drafted token is kept given
      that the ones before it were. Each unfinished row of a step that drafted k tokens and kept a is evidence
      for depths 1 .. min(a + 1, k): kept up to a, rejected at a + 1. All counts decay by ``forget`` per
      drafting step, so the estimate follows the answer, and each depth is shrunk toward the one above it
      (see :meth:`alphas`). When every row kept the whole draft, the next step drafts one more, so that deeper
      depths get evidence.
    - Step cost per k: the median of the last ``samples`` wall times of steps with that k, kept per batch size
      across calls; a k not timed yet is priced from the line through the timed drafting lengths (or, with one,
      a slope of one ``draft_cost`` fraction of a plain step per drafted token).

    The expected tokens of a step with k drafts are ``1 + sum_j prod_{i<=j} alpha[i]``; the policy runs the k in
    0 .. max_draft_len with the most tokens per second, deterministically given these estimates. Calibration:
    the first steps at a batch size run a fixed schedule (k = 0, then 1, then max, each ``samples_to_trust``
    times), so every decision after it compares measured costs. After ``probe_every`` plain steps in a row one
    drafting step refreshes the acceptance estimates (plain steps observe none).
    """

    def __init__(self, max_draft_len: int = 8, *, samples: int = 9, samples_to_trust: int = 2, forget: float = 0.97,
                 prior_alpha: float = 0.6, prior_weight: float = 2.0, draft_cost: float = 0.3, probe_every: int = 16):
        if isinstance(max_draft_len, bool) or not isinstance(max_draft_len, int) or max_draft_len < 1:
            raise ValueError(f"max_draft_len must be an int >= 1, got {max_draft_len!r}")
        self.max_draft_len = max_draft_len
        self.samples, self.samples_to_trust, self.forget = samples, samples_to_trust, forget
        self.prior_alpha, self.draft_cost, self.probe_every = prior_alpha, draft_cost, probe_every
        self.prior_weight = prior_weight
        self._plain_run = 0                                   # plain steps in a row (acceptance is not observed)
        self._extend = 0                                      # a draft length that was kept whole: try one more
        self.times: Dict[int, Dict[int, deque]] = {}          # batch size -> k -> recent step seconds
        self.kept = [0.0] * (max_draft_len + 1)               # decayed counts per depth (index 1..max)
        self.tried = [0.0] * (max_draft_len + 1)
        self.last_estimates: Dict[int, float] = {}            # k -> estimated seconds per token (last choice)
        self._times: Dict[int, deque] = {}

    def start(self, batch: int) -> None:
        self._times = self.times.setdefault(batch, {})

    # ---- estimates ------------------------------------------------------------------------------------------

    def alphas(self) -> List[float]:
        """alpha[1 .. max_draft_len] (index 0 unused). Each depth's counts are shrunk toward the depth above it
        (``prior_weight`` pseudo-observations of its alpha; depth 1 toward ``prior_alpha``), so a depth seen
        rarely, or long ago, follows the shallower ones instead of a few stale samples."""
        values, above = [1.0], self.prior_alpha
        for depth in range(1, self.max_draft_len + 1):
            above = (self.kept[depth] + self.prior_weight * above) / (self.tried[depth] + self.prior_weight)
            values.append(above)
        return values

    def expected_tokens(self, k: int) -> float:
        alphas, total, chain = self.alphas(), 1.0, 1.0
        for depth in range(1, k + 1):
            chain *= alphas[depth]
            total += chain
        return total

    def step_seconds(self, k: int) -> Optional[float]:
        """The estimated wall time of a step with k drafts (None: nothing timed yet to price it from)."""
        return self._price(k, self._timed())

    def _timed(self) -> Dict[int, float]:
        """Median step seconds of each draft length timed often enough to trust."""
        return {length: statistics.median(values) for length, values in self._times.items()
                if len(values) >= self.samples_to_trust}

    def _price(self, k: int, timed: Dict[int, float]) -> Optional[float]:
        if k in timed:
            return timed[k]
        drafting = sorted(length for length in timed if length > 0)
        if k == 0:
            return None
        if len(drafting) >= 2:
            low, high = (drafting[0], drafting[-1]) if not (drafting[0] < k < drafting[-1]) else \
                (max(d for d in drafting if d < k), min(d for d in drafting if d > k))
            slope = (timed[high] - timed[low]) / (high - low)
            return timed[low] + slope * (k - low)
        if drafting:
            base = drafting[0]
            per_draft = self.draft_cost * timed.get(0, timed[base] / (1.0 + self.draft_cost * base))
            return timed[base] + per_draft * (k - base)
        return None

    def _rates(self) -> Dict[int, float]:
        """Expected tokens per second of each draft length that can be priced (one pass over the estimates)."""
        timed, alphas = self._timed(), self.alphas()
        rates, tokens, chain = {}, 1.0, 1.0
        for k in range(self.max_draft_len + 1):
            if k:
                chain *= alphas[k]
                tokens += chain
            seconds = self._price(k, timed)
            if seconds is not None and seconds > 0:
                rates[k] = tokens / seconds
        return rates

    # ---- the policy interface ------------------------------------------------------------------------------------

    def draft_len(self) -> int:
        for k in (0, 1, self.max_draft_len):                  # calibration: each trusted once timed enough
            if len(self._times.get(k, ())) < self.samples_to_trust:
                return k
        if self._plain_run >= self.probe_every:               # refresh acceptance: one drafting step
            return self.length_when_drafting()
        rates = self._rates()
        self.last_estimates = {k: 1.0 / rate for k, rate in rates.items()}
        best = max(rates, key=rates.get) if rates else 0      # the first of equal rates, as k goes up
        if best > 0 and self._extend >= best:                 # every row kept a whole draft this long: the
            best = min(self.max_draft_len, self._extend + 1)  # next depth gets evidence (+1, as transformers'
        return best                                           # "heuristic" schedule grows after a full accept)

    def length_when_drafting(self) -> int:
        rates = self._rates()
        return max(range(1, self.max_draft_len + 1), key=lambda k: rates.get(k, 0.0))

    def update(self, draft_len: int, accepted: List[int], seconds: float) -> None:
        samples = self._times.setdefault(draft_len, deque(maxlen=self.samples))
        samples.append(seconds)
        self._plain_run = self._plain_run + 1 if draft_len == 0 else 0
        if draft_len == 0 or not accepted:
            return
        self._extend = draft_len if min(accepted) == draft_len else 0
        for depth in range(1, self.max_draft_len + 1):         # older evidence fades at every depth
            self.tried[depth] *= self.forget
            self.kept[depth] *= self.forget
        for kept in accepted:                                  # each unfinished row is one observation
            for depth in range(1, min(kept + 1, draft_len) + 1):
                self.tried[depth] += 1.0
                self.kept[depth] += 1.0 if depth <= kept else 0.0
