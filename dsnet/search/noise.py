"""Trainable noise ranking of channel groups (SPEC 6.2; [ours] from Parametric Noise Injection).

Each channel group ``g`` gets a learned noise scale ``alpha_g``. The weights
that *produce* the group's channels are perturbed as
``W + alpha_g * std(W) * eps`` (``eps ~ N(0, 1)``, fresh every step, the
reparameterisation of Parametric Noise Injection), the network's weights stay
frozen, and only ``log alpha`` trains, on

    ``CE(noisy network) - reward * mean_g log(alpha_g)``

The reward pushes every scale up; the cross-entropy pushes back only where
noise hurts. A group the network does not need can take a lot of noise, so a
large learned ``alpha_g`` means "unimportant". Reconstruction choices [ours]:
the scale is learned in log space (scale-free reward, alphas stay positive),
BatchNorm runs on its fixed running statistics (eval mode: batch statistics
would renormalise the noise away), one noise draw per step, and plain SGD
with momentum: Adam would normalise each scale's gradient, so every scale
would climb at the same rate and the ranking would be lost. The learning rate
is per group (the summed objective ``N * CE - reward * sum log alpha``), so a
scale the cross-entropy ignores rises by ``lr * reward`` per step whatever the
number of groups.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from dsnet.models.base import DynamicNet
from dsnet.search.channels import ChannelSpace
from dsnet.utils.modes import temporary_mode

__all__ = ["learn_noise_scales", "importance_order"]


def learn_noise_scales(
    model: DynamicNet,
    subnet: int,
    spaces: Sequence[ChannelSpace],
    kept_groups: Sequence[int],
    group_size: int | Sequence[int],
    batches: Iterator[tuple[Tensor, Tensor]],
    steps: int,
    *,
    lr: float = 0.1,
    reward: float = 1.0,
    init_log_alpha: float = -2.0,
    max_log_alpha: float = 8.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> list[Tensor]:
    """Learned ``log alpha`` of the first ``kept_groups[i]`` groups of each space (the groups sub-network uses).

    ``subnet`` is run with its own widths and BatchNorm statistics (calibrate
    them first). ``group_size``: width units per group, one for all spaces or one per space. Returns one
    tensor per space, shape ``(kept_groups[i],)``:
    each scale averaged over the second half of the steps (less noisy than the
    last value, and scales that reach the cap early rank above those that
    reach it late, instead of tying).
    """
    if steps < 1:
        raise ValueError(f"noise ranking needs at least one step, got {steps}")
    if len(spaces) != len(kept_groups):
        raise ValueError("one kept-group count per space is needed")
    sizes = [group_size] * len(spaces) if isinstance(group_size, int) else list(group_size)
    if len(sizes) != len(spaces):
        raise ValueError("one group size per space is needed")
    device = torch.device(device)
    log_alpha = [torch.full((k,), float(init_log_alpha), device=device, requires_grad=True) for k in kept_groups]
    total = sum(kept_groups)
    averaged = [torch.zeros(k, device=device) for k in kept_groups]
    optimizer = torch.optim.SGD(log_alpha, lr=lr, momentum=0.9)
    params = dict(model.named_parameters())
    producers = [(i, axis) for i, space in enumerate(spaces) for axis in space.producers()]
    stds = {axis.name: params[axis.name].detach().std() for _, axis in producers}
    gen = torch.Generator(device=device).manual_seed(seed)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p in model.parameters():  # the weights are frozen; only the noise scales learn
        p.requires_grad_(False)
    try:
        with temporary_mode(model, False):
            for step in range(steps):
                images, labels = next(batches)
                images, labels = images.to(device), labels.to(device)
                noisy: dict[str, Tensor] = {}
                for i, axis in producers:
                    weight = noisy.get(axis.name, params[axis.name])
                    per_channel = log_alpha[i].exp().repeat_interleave(sizes[i] * axis.scale)
                    rows = per_channel.shape[0]  # only the used groups' rows get noise (in every segment)
                    shape = (rows,) + (1,) * (weight.dim() - 1)
                    parts = []
                    for seg in weight.chunk(axis.segments) if axis.segments > 1 else [weight]:
                        eps = torch.randn(seg[:rows].shape, generator=gen, device=device)
                        parts += [seg[:rows] + per_channel.view(shape) * stds[axis.name] * eps, seg[rows:]]
                    noisy[axis.name] = torch.cat(parts)
                logits = functional_call(model, noisy, (images,), {"subnet": subnet})
                loss = total * F.cross_entropy(logits, labels) - reward * torch.cat(log_alpha).sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    for t, total_t in zip(log_alpha, averaged, strict=True):
                        t.clamp_(max=max_log_alpha)  # a scale the loss ignores would grow without bound
                        if step >= steps // 2:
                            total_t += t
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return [(t / (steps - steps // 2)).cpu() for t in averaged]


def importance_order(log_alpha: Tensor) -> Tensor:
    """Group indices, most important (least noise tolerated) first; ties keep the current order."""
    return torch.sort(log_alpha, stable=True).indices
