"""Forcing the gate's decisions, so a benchmark runs an exact routing mix; a checkpoint's own mix on data.

A trained gate's decisions depend on the images; a benchmark wants a known
mix (say 40/30/20/10 % over the routing space) on any weights. Rather than a
special code path, the gate still computes its logits (so its cost is paid)
and a per-sample one-hot bias far larger than any logit is added, which makes
``argmax`` pick the forced choice. Everything after the gate, grouping and
scatter included, is the model's own dynamic inference.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from dsnet.models.base import DynamicNet

__all__ = ["mix_counts", "mix_choices", "forced_routing", "measured_mix"]

_FORCE = 1e9


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


@contextmanager
def forced_routing(model: DynamicNet, choices: Tensor, batch_size: int | None = None) -> Iterator[None]:
    """Inside the block, dynamic inference routes sample ``i`` of a batch to ``choices[i]``.

    ``choices`` index ``model.routing_space``. With ``batch_size`` smaller than
    ``len(choices)`` (a multiple of it), successive calls consume successive
    slices of ``choices``, cycling: batch-1 latency over a routing mix is a
    cycle of single-image calls. The gate's real logits are still computed; a
    huge one-hot bias decides.
    """
    n_choices = len(model.routing_space)
    if choices.dim() != 1 or not choices.numel() or int(choices.min()) < 0 or int(choices.max()) >= n_choices:
        raise ValueError(f"choices must be a non-empty 1-D tensor of routing-choice indices 0..{n_choices - 1}")
    batch = choices.numel() if batch_size is None else batch_size
    if batch < 1 or choices.numel() % batch:
        raise ValueError(f"{choices.numel()} choices do not split into batches of {batch}")
    ref = next(model.gate.parameters())
    force = torch.nn.functional.one_hot(choices, n_choices).to(ref.device, ref.dtype) * _FORCE
    slices = list(force.split(batch))
    gate_logits = type(model).gate_logits.__get__(model)
    position = [0]

    def forced_logits(h: Tensor, z: Tensor) -> tuple[Tensor, Tensor | None]:
        bias = slices[position[0]]
        if z.shape[0] != bias.shape[0]:
            raise ValueError(f"forced routing was set up for batches of {batch}, got {z.shape[0]}")
        position[0] = (position[0] + 1) % len(slices)
        logits, slim_out = gate_logits(h, z)
        return logits + bias, slim_out

    model.gate_logits = forced_logits  # instance attribute shadows the method
    try:
        yield
    finally:
        del model.gate_logits


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
