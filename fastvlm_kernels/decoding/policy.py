"""Draft policies: how many tokens each step drafts, 0 meaning a plain step (no draft).

The decoder asks its policy once per step (:meth:`draft_len`) and tells it what the step did
(:meth:`update`: the draft length used, the tokens each unfinished row kept, the step's wall time). Both
modes are exact, so a policy changes only the speed. The step's wall time is read after the step's one
device-to-host read, which waits for the device anyway: measuring it costs no synchronisation.
"""
from __future__ import annotations

import math
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
