"""Exponential moving average of the whole supernet: the in-place bootstrapping teacher."""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["ModelEma"]


class ModelEma:
    """``ema = decay * ema + (1 - decay) * weights`` after every optimiser step.

    Floating-point parameters are averaged; buffers (BN statistics, counters)
    are copied, so the teacher always has the student's latest statistics for
    every width. The teacher runs in eval mode without gradients.

    With ``warmup`` the decay of update ``t`` is ``min(decay, (1 + t) / (10 + t))``:
    early in training the weights move fast, and a teacher averaging hundreds
    of stale steps, evaluated with the student's current BN statistics, gives
    near-uniform targets that teach the students nothing. Over a long schedule
    the warm-up is negligible (decay 0.997 is reached after ~3000 steps).
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
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
        decay = self.current_decay()
        self.updates += 1
        ema_params = dict(self.module.named_parameters())
        for name, p in model.named_parameters():
            ema_params[name].lerp_(p.detach(), 1.0 - decay)
        ema_buffers = dict(self.module.named_buffers())
        for name, b in model.named_buffers():
            ema_buffers[name].copy_(b)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict, updates: int = 0) -> None:
        self.module.load_state_dict(state)
        self.updates = updates
