"""The learning-rate schedule of the trainers: linear warmup, then cosine decay to a floor."""
from __future__ import annotations

import math


class WarmupCosine:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``min_ratio`` of the peak at ``total``.

    Called with a step it gives the multiplier of the peak rate (for ``torch.optim.lr_scheduler.LambdaLR``, as
    the imitation trainer uses it); :meth:`rate` gives the rate itself for a peak, for loops that set the
    optimizer's rate by hand (the tiny VLM's build)."""

    def __init__(self, warmup: int, total: int, min_ratio: float):
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * self._progress(step)))

    def rate(self, peak: float, step: int) -> float:
        """``peak`` times the multiplier at ``step``. In the warmup it is rounded as ``peak * (step + 1) / warmup``
        (not ``peak * ((step + 1) / warmup)``, which differs in the last bit at some steps): the rounding the tiny
        VLM's shipped build was trained with, kept so that a rebuild repeats it bit for bit."""
        if step < self.warmup:
            return peak * (step + 1) / self.warmup
        return peak * self(step)

    def _progress(self, step: int) -> float:
        return min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
