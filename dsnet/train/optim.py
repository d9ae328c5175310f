"""SGD that leaves untouched channels alone, and the cosine-with-warm-up schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["MaskedSGD", "cosine_lr"]


class MaskedSGD(torch.optim.Optimizer):
    """SGD with momentum and weight decay, applied only where a gradient arrived.

    A prefix-sliced layer is trained only as far as the widest sub-network of
    the step reached; its remaining channels get an exactly zero gradient.
    Plain SGD would still decay them and push them along their old momentum,
    moving weights no sub-network asked to move. As the official DS-Net code
    does, such elements get no weight decay and no momentum update that step
    (``mask_untouched=True``). Parameters whose ``grad`` is ``None`` are skipped
    entirely, as in torch's SGD.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        mask_untouched: bool = True,
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
        super().__init__(params, defaults)
        self.mask_untouched = mask_untouched

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, mom, wd, nesterov = group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                touched = grad != 0 if self.mask_untouched else None
                d_p = grad.add(p, alpha=wd) if wd else grad
                if touched is not None:
                    d_p = torch.where(touched, d_p, torch.zeros_like(d_p))
                if mom:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = d_p.clone()
                    elif touched is None:
                        buf.mul_(mom).add_(d_p)
                    else:
                        buf.copy_(torch.where(touched, buf * mom + d_p, buf))
                    d_p = d_p.add(buf, alpha=mom) if nesterov else buf
                    if touched is not None:
                        d_p = torch.where(touched, d_p, torch.zeros_like(d_p))
                p.add_(d_p, alpha=-lr)
        return loss


def cosine_lr(step: int, total_steps: int, base_lr: float, warmup_steps: int = 0, min_lr: float = 0.0) -> float:
    """Linear warm-up to ``base_lr``, then cosine decay to ``min_lr`` at ``total_steps``."""
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * progress))
