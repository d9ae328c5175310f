"""Forcing the gate's decisions, so a benchmark runs an exact routing mix; a checkpoint's own mix on data.

A trained gate's decisions depend on the images; a benchmark wants a known
mix (say 40/30/20/10 % over the routing space) on any weights. Rather than a
special code path, the gate still computes its logits (so its cost is paid)
and a per-sample one-hot bias far larger than any logit is added, which makes
``argmax`` pick the forced choice (the model's own
:meth:`~dsnet.models.base.DynamicNet.forced_routing`). Everything after the
gate, grouping and scatter included, is the model's own dynamic inference.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager

import torch
from torch import Tensor

from dsnet.models.base import DynamicNet

__all__ = ["mix_counts", "mix_choices", "forced_routing", "measured_mix"]


def mix_counts(mix: Sequence[float], total: int) -> list[int]:
    """Split ``total`` samples by the fractions ``mix`` (largest-remainder rounding, sums to ``total``)."""
    if not mix or any(w < 0 for w in mix) or sum(mix) <= 0:
        raise ValueError(f"a routing mix needs non-negative fractions with a positive sum, got {list(mix)}")
    weights = [w / sum(mix) for w in mix]
    raw = [w * total for w in weights]
    counts = [int(r) for r in raw]
    by_remainder = sorted(range(len(mix)), key=lambda i: raw[i] - counts[i], reverse=True)
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def mix_choices(mix: Sequence[float], total: int, seed: int = 0) -> Tensor:
    """``total`` routing choices in the proportions of ``mix``, shuffled (so grouping must gather and scatter)."""
    counts = mix_counts(mix, total)
    choices = torch.cat([torch.full((c,), j, dtype=torch.long) for j, c in enumerate(counts)])
    return choices[torch.randperm(total, generator=torch.Generator().manual_seed(seed))]


def forced_routing(model: DynamicNet, choices: Tensor, batch_size: int | None = None) -> AbstractContextManager[None]:
    """``model.forced_routing(choices, batch_size)``: inside the block, sample ``i`` is routed to ``choices[i]``.

    See :meth:`dsnet.models.base.DynamicNet.forced_routing` (successive calls of ``batch_size`` samples take
    successive slices of ``choices``, cycling).
    """
    return model.forced_routing(choices, batch_size)


def measured_mix(model: DynamicNet, batches: Iterable, limit: int | None = None) -> tuple[list[float], int]:
    """The fraction of images the model's own gate sends to each routing choice (eval mode, no forcing).

    ``batches`` yields ``(images, labels)`` or images; at most ``limit`` images are routed (the first ones).
    Returns the mix (one fraction per choice of ``model.routing_space``) and the number of images routed.
    """
    counts = torch.zeros(len(model.routing_space), dtype=torch.long)
    seen = 0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in batches:
                images = batch[0] if isinstance(batch, (tuple, list)) else batch
                if limit is not None:
                    images = images[: limit - seen]
                if images.shape[0] == 0:
                    break
                routing = model(images.to(device), return_routing=True)
                counts += torch.bincount(routing.choice.cpu(), minlength=len(model.routing_space))
                seen += images.shape[0]
                if limit is not None and seen >= limit:
                    break
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("no images to measure the routing mix on")
    return [float(c) / seen for c in counts], seen
