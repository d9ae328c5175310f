"""Exponential moving average of the whole supernet: the in-place bootstrapping teacher."""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["ModelEma", "EMA_BUFFERS"]

EMA_BUFFERS = ("average", "copy")


class ModelEma:
    """``ema = decay * ema + (1 - decay) * state`` after every optimiser step.

    Every floating-point entry of the state is averaged: parameters *and*
    buffers (the BN running statistics of every width), as timm's EMA, which
    the official DS-Net code uses, does, so the teacher's statistics are those
    of its own (averaged) weights' history rather than the student's latest
    ones. Integer buffers (BN's ``num_batches_tracked``) are copied.
    ``buffers="copy"`` copies the float buffers too (dsnet before this
    change; kept to measure the difference). The teacher runs in eval mode
    without gradients.

    With ``warmup`` the decay of update ``t`` is ``min(decay, (1 + t) / (10 + t))``:
    early in training the weights move fast, and a teacher averaging hundreds
    of stale steps gives near-uniform targets that teach the students nothing.
    Over a long schedule the warm-up is negligible (decay 0.997 is reached
    after ~3000 steps).
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True, buffers: str = "average") -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if buffers not in EMA_BUFFERS:
            raise ValueError(f"EMA buffers must be one of {', '.join(EMA_BUFFERS)}, got {buffers!r}")
        self.decay = decay
        self.warmup = warmup
        self.buffers = buffers
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        weight = 1.0 - self.current_decay()
        self.updates += 1
        ema_params = dict(self.module.named_parameters())
        for name, p in model.named_parameters():
            ema_params[name].lerp_(p.detach(), weight)
        ema_buffers = dict(self.module.named_buffers())
        for name, b in model.named_buffers():
            if self.buffers == "average" and b.is_floating_point():
                ema_buffers[name].lerp_(b, weight)
            else:
                ema_buffers[name].copy_(b)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict, updates: int = 0) -> None:
        self.module.load_state_dict(state)
        self.updates = updates
