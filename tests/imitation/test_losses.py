"""The imitation losses against values worked out by hand."""
from __future__ import annotations

import math

import pytest
import torch

from fastvlm_kernels.imitation.losses import (LossWeights, agreement_loss, cosine_loss, distillation_loss,
                                              draft_logits, imitation_loss)

LN2, LN3 = math.log(2), math.log(3)


def test_cosine_loss_by_hand():
    output = torch.tensor([[1.0, 0.0], [1.0, 1.0], [3.0, 4.0]])
    target = torch.tensor([[0.0, 2.0], [2.0, 2.0], [4.0, 3.0]])
    # cosines: 0 (orthogonal), 1 (parallel), (12 + 12) / (5 * 5) = 0.96  ->  1 - cos: 1, 0, 0.04
    assert cosine_loss(output, target).item() == pytest.approx((1 + 0 + 0.04) / 3, abs=1e-7)


def _kl_rows_by_hand():
    # row 0: p = softmax(0, ln 3) = (1/4, 3/4), q = softmax(0, 0) = (1/2, 1/2)
    row0 = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    # row 1: p = softmax(ln 2, 0) = (2/3, 1/3), q = softmax(0, ln 2) = (1/3, 2/3)
    row1 = (2 / 3) * math.log(2) + (1 / 3) * math.log(0.5)
    return row0, row1


def test_distillation_loss_by_hand_at_temperature_1():
    teacher = torch.tensor([[0.0, LN3], [LN2, 0.0]])
    draft = torch.tensor([[0.0, 0.0], [0.0, LN2]])
    row0, row1 = _kl_rows_by_hand()
    assert distillation_loss(draft, teacher, 1.0).item() == pytest.approx((row0 + row1) / 2, abs=1e-7)
    assert distillation_loss(teacher, teacher, 1.0).item() == pytest.approx(0.0, abs=1e-7)


def test_distillation_loss_by_hand_at_temperature_2_and_its_gradient():
    """Logits twice those above at T = 2 give the same distributions, so KL is the same and the loss T^2 = 4
    times it; the gradient with respect to the draft logits is T (q - p) / M."""
    teacher = torch.tensor([[0.0, 2 * LN3], [2 * LN2, 0.0]])
    draft = torch.tensor([[0.0, 0.0], [0.0, 2 * LN2]], requires_grad=True)
    row0, row1 = _kl_rows_by_hand()
    loss = distillation_loss(draft, teacher, 2.0)
    assert loss.item() == pytest.approx(4 * (row0 + row1) / 2, abs=1e-6)
    loss.backward()
    p = torch.tensor([[0.25, 0.75], [2 / 3, 1 / 3]])
    q = torch.tensor([[0.5, 0.5], [1 / 3, 2 / 3]])
    torch.testing.assert_close(draft.grad, 2.0 * (q - p) / 2, atol=1e-6, rtol=0)


def test_weighted_sum_and_draft_head():
    torch.manual_seed(0)
    norm = torch.nn.RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(8) + 0.5)
    head = torch.nn.Linear(8, 5, bias=False)
    hidden = torch.randn(3, 8)
    by_hand = (hidden / hidden.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()) * norm.weight @ head.weight.T
    torch.testing.assert_close(draft_logits(hidden, norm, head), by_hand)
    target = torch.randn(3, 8)
    teacher = torch.randn(3, 5)
    draft = draft_logits(hidden, norm, head)
    terms = imitation_loss(hidden, target, draft, teacher, LossWeights(cosine_weight=0.3, kd_weight=2.0,
                                                                       temperature=1.5))
    assert terms.cosine.item() == pytest.approx(cosine_loss(hidden, target).item())
    assert terms.kd.item() == pytest.approx(distillation_loss(draft, teacher, 1.5).item())
    assert terms.total.item() == pytest.approx(0.3 * terms.cosine.item() + 2.0 * terms.kd.item(), rel=1e-6)
    cosine_only = imitation_loss(hidden, target, None, teacher, LossWeights(kd_weight=0.0))
    assert cosine_only.total.item() == pytest.approx(terms.cosine.item()) and cosine_only.kd.item() == 0.0


def test_agreement_term_is_the_cross_entropy_to_the_greedy_token():
    """The agreement term is -log q(argmax p) averaged over positions, with the teacher's greedy token as the
    label; it joins the total with its weight, and alone (no cosine, no distillation) its gradient raises the
    draft's logit of the teacher's greedy token and lowers the others."""
    torch.manual_seed(1)
    draft = torch.randn(6, 11, requires_grad=True)
    teacher = torch.randn(6, 11)
    greedy = teacher.argmax(dim=-1)
    by_hand = -torch.log_softmax(draft.detach(), dim=-1)[torch.arange(6), greedy].mean()
    assert agreement_loss(draft, teacher).item() == pytest.approx(by_hand.item(), rel=1e-6)
    hidden, target = torch.randn(6, 8), torch.randn(6, 8)
    terms = imitation_loss(hidden, target, draft, teacher, LossWeights(cosine_weight=0.5, kd_weight=1.0,
                                                                       agreement_weight=0.25))
    assert terms.agreement.item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert terms.total.item() == pytest.approx(0.5 * terms.cosine.item() + terms.kd.item()
                                               + 0.25 * terms.agreement.item(), rel=1e-6)
    off = imitation_loss(hidden, target, draft, teacher, LossWeights())
    assert off.agreement.item() == 0.0 and off.total.item() == pytest.approx(off.cosine.item() + off.kd.item())
    alone = imitation_loss(hidden, target, draft, teacher, LossWeights(cosine_weight=0.0, kd_weight=0.0,
                                                                       agreement_weight=1.0))
    alone.total.backward()
    chosen = torch.zeros(6, 11, dtype=torch.bool)
    chosen[torch.arange(6), greedy] = True
    assert (draft.grad[chosen] < 0).all() and (draft.grad[~chosen] > 0).all()
    assert LossWeights(agreement_weight=1.0).needs_draft_logits and not LossWeights(kd_weight=0.0).needs_draft_logits


def test_bad_input():
    with pytest.raises(ValueError, match="output and target"):
        cosine_loss(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="draft_logits and teacher_logits"):
        distillation_loss(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(torch.zeros(3, 4), torch.zeros(3, 4), 0.0)
    with pytest.raises(ValueError, match="not all 0"):
        LossWeights(cosine_weight=0.0, kd_weight=0.0)
    with pytest.raises(ValueError, match="agreement_weight"):
        LossWeights(agreement_weight=-0.5)
    with pytest.raises(ValueError, match="temperature"):
        LossWeights(temperature=0.0)
    with pytest.raises(ValueError, match="draft_logits and teacher_logits"):
        agreement_loss(torch.randn(3, 4), torch.randn(3, 5))
