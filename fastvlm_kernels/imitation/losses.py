"""The imitation network's training losses.

Two terms and an optional third, over the M positions whose next token is a response token:

* **cosine**: ``mean_m (1 - cos(output_m, target_m))`` between the network's output and the frozen model's
  hidden state at ``target_layer`` (the output of backbone layer ``target_layer - 1``, before the final
  norm: the same kind of state the network's output stands in for).
* **distillation**: ``T^2 * mean_m KL(p_m || q_m)`` with ``p = softmax(full model logits / T)`` and
  ``q = softmax(draft logits / T)``; the draft logits are the model's own final norm and LM head applied to
  the network's output (the early-exit head of the decoder). The ``T^2`` factor keeps the gradient's scale
  independent of the temperature (Hinton et al., 2015).
* **agreement** (optional, off by default): ``mean_m CE(draft_m, argmax teacher_m)``, the cross-entropy of the
  draft logits against the full model's greedy token. Greedy acceptance depends on the argmax alone; this term
  spends the network's capacity on the top token where the distillation term spreads it over the whole
  distribution.

With a draft vocabulary (``TrainConfig.draft_vocab``) both distributions are softmaxes over its S token ids
only: the draft head can propose nothing else, and its argmax over them is what must match the full model's.

``total = cosine_weight * cosine + kd_weight * distillation + agreement_weight * agreement``. Everything is
computed in fp32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn


def cosine_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``output``, ``target`` ``[M, H]`` -> scalar ``mean_m (1 - cos(output_m, target_m))``."""
    if output.shape != target.shape or output.dim() != 2:
        raise ValueError(f"output and target must both be [M, H], got {tuple(output.shape)} and {tuple(target.shape)}")
    similarity = F.cosine_similarity(output.float(), target.float(), dim=-1, eps=1e-8)   # [M]
    return (1.0 - similarity).mean()


def _check_logits(draft_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    if draft_logits.shape != teacher_logits.shape or draft_logits.dim() != 2:
        raise ValueError(f"draft_logits and teacher_logits must both be [M, V], got {tuple(draft_logits.shape)} "
                         f"and {tuple(teacher_logits.shape)}")


def distillation_loss(draft_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``draft_logits``, ``teacher_logits`` ``[M, V]`` -> scalar ``T^2 * mean_m KL(p_m || q_m)``, with p the
    teacher's and q the draft's softmax at temperature T. The teacher gets no gradient."""
    _check_logits(draft_logits, teacher_logits)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_q = torch.log_softmax(draft_logits.float() / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)                                         # [M]
    return kl.mean() * temperature ** 2


def agreement_loss(draft_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """``draft_logits``, ``teacher_logits`` ``[M, V]`` -> scalar ``mean_m CE(draft_m, argmax_v teacher_m)``: the
    draft's cross-entropy against the full model's greedy token (the teacher gets no gradient)."""
    _check_logits(draft_logits, teacher_logits)
    return F.cross_entropy(draft_logits.float(), teacher_logits.detach().argmax(dim=-1))


def draft_logits(hidden: torch.Tensor, norm: nn.Module, lm_head: nn.Module,
                 vocab: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The early-exit head: the model's own final norm and LM head on ``hidden [M, H]`` -> ``[M, V]``, or
    ``[M, S]`` over the token ids ``vocab [S]`` only (the rows of the LM head a draft vocabulary reads)."""
    normed = norm(hidden).to(lm_head.weight.dtype)
    if vocab is None:
        return lm_head(normed)
    bias = getattr(lm_head, "bias", None)
    return F.linear(normed, lm_head.weight.index_select(0, vocab),
                    bias.index_select(0, vocab) if bias is not None else None)


@dataclass(frozen=True)
class LossWeights:
    cosine_weight: float = 1.0
    kd_weight: float = 1.0
    temperature: float = 1.0
    agreement_weight: float = 0.0

    def __post_init__(self):
        if self.cosine_weight < 0 or self.kd_weight < 0 or self.agreement_weight < 0 or \
                self.cosine_weight + self.kd_weight + self.agreement_weight == 0:
            raise ValueError(f"cosine_weight ({self.cosine_weight}), kd_weight ({self.kd_weight}) and "
                             f"agreement_weight ({self.agreement_weight}) must be >= 0 and not all 0")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    @property
    def needs_draft_logits(self) -> bool:
        return self.kd_weight > 0 or self.agreement_weight > 0


class LossTerms(NamedTuple):
    total: torch.Tensor       # scalar, with gradient
    cosine: torch.Tensor      # scalar, the cosine loss (1 - mean cosine similarity)
    kd: torch.Tensor          # scalar, the distillation term (T^2-scaled KL)
    agreement: torch.Tensor   # scalar, the cross-entropy against the full model's greedy token (0 when off)


def imitation_loss(output: torch.Tensor, target: torch.Tensor, draft: torch.Tensor, teacher: torch.Tensor,
                   weights: LossWeights) -> LossTerms:
    """``output`` / ``target`` ``[M, H]`` (network output, target-layer state), ``draft`` / ``teacher``
    ``[M, V]`` (logits of the draft head and of the full model) -> the weighted sum and its terms."""
    cosine = cosine_loss(output, target)
    if weights.kd_weight > 0:
        kd = distillation_loss(draft, teacher, weights.temperature)
    else:
        kd = torch.zeros((), device=output.device)
    if weights.agreement_weight > 0:
        agreement = agreement_loss(draft, teacher)
    else:
        agreement = torch.zeros((), device=output.device)
    total = weights.cosine_weight * cosine + weights.kd_weight * kd + weights.agreement_weight * agreement
    return LossTerms(total, cosine, kd, agreement)
