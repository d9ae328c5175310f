"""Checkpoints: one self-describing file per save, written atomically.

A checkpoint holds what is needed to rebuild the model without the config
(``model.name`` + ``model.kwargs``), the weights, the EMA teacher's weights,
and, for resuming, the optimiser, scheduler, step counters and RNG states.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsnet.models import create_model
from dsnet.utils.io import atomic_torch_save

__all__ = ["FORMAT", "save_checkpoint", "read_checkpoint", "load_model"]

FORMAT = "dsnet-checkpoint-v1"


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (must contain ``model: {name, kwargs}`` and ``state_dict``) atomically."""
    missing = {"model", "state_dict"} - payload.keys()
    if missing:
        raise ValueError(f"checkpoint payload lacks {sorted(missing)}")
    return atomic_torch_save({"format": FORMAT, **payload}, path)


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # truncated / not a torch file
        raise ValueError(f"{path} is not a readable dsnet checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a dsnet checkpoint (expected format {FORMAT!r})")
    return ckpt


def load_model(
    path: str | os.PathLike, use_ema: bool = True, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a checkpoint (EMA weights when present and ``use_ema``), in eval mode."""
    ckpt = read_checkpoint(path, map_location)
    model = create_model(ckpt["model"]["name"], **ckpt["model"].get("kwargs", {}))
    state = ckpt.get("ema_state_dict") if use_ema and ckpt.get("ema_state_dict") else ckpt["state_dict"]
    model.load_state_dict(state)
    return model.to(map_location).eval(), ckpt
