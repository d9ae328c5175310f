"""Losses of both training stages."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["soft_cross_entropy", "sgs_targets", "cheapest_correct_targets", "complexity_loss"]


def soft_cross_entropy(logits: Tensor, target_probs: Tensor) -> Tensor:
    """Cross-entropy against a probability distribution (in-place bootstrapping targets)."""
    return torch.sum(-target_probs * F.log_softmax(logits, dim=-1), dim=-1).mean()


def sgs_targets(slim_logits: Tensor, wide_logits: Tensor, labels: Tensor, num_choices: int) -> Tensor:
    """Sandwich gate sparsification targets (DS-Net, SPEC section 3).

    The slimmest and the widest routed sub-networks label each image:
    easy (slimmest right) -> slimmest; hopeless (widest wrong) -> slimmest too,
    extra compute will not save it; otherwise -> widest. Returns indices into
    the routing space.
    """
    slim_right = slim_logits.argmax(-1) == labels
    wide_right = wide_logits.argmax(-1) == labels
    wide = ~slim_right & wide_right
    return torch.where(wide, num_choices - 1, 0).long()


def cheapest_correct_targets(correct: Tensor) -> Tensor:
    """SGS over every width [ours]: each image's target is the cheapest routing choice that gets it right.

    ``correct`` (N, R) says whether choice ``j`` (slimmest first) classifies
    image ``i`` correctly. Hopeless images (no choice right) go to the
    slimmest, as in SGS. With two choices this is exactly :func:`sgs_targets`.
    """
    any_right = correct.any(dim=1)
    first = correct.long().argmax(dim=1)  # index of the first True (0 when none)
    return torch.where(any_right, first, 0).long()


def complexity_loss(expected_macs: Tensor, weight: float, unit_macs: float, target_macs: float | None = None) -> Tensor:
    """``weight * (mean MACs / unit)^2``, or ``weight * ((mean - target) / unit)^2`` with a budget.

    ``expected_macs`` holds each sample's MACs as a differentiable function of
    the gate's decision (straight-through one-hot times the MAC table), so the
    forward value is the real routed cost and the gradient reaches the gate.
    """
    mean = expected_macs.mean()
    if target_macs is not None:
        mean = mean - target_macs
    return weight * (mean / unit_macs) ** 2
