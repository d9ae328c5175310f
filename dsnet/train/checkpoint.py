"""Checkpoints: one self-describing file per save, written atomically, read without running code.

A checkpoint holds what is needed to rebuild the model without the config
(``model.name`` + ``model.kwargs``), the weights, the EMA teacher's weights,
and, for resuming, the optimiser, scheduler, step counters and RNG states.

Checkpoints are read with ``torch.load(weights_only=True)``: only tensors and
plain Python containers and scalars are unpickled, so a crafted file cannot
run code (``weights_only=False`` would execute whatever its pickle asks for).
Everything a checkpoint stores is of those types (RNG states included, see
``dsnet.train.run.rng_state``). Files written by dsnet before this held numpy
RNG state, which the safe loader refuses; ``convert_checkpoint`` (``dsnet
checkpoint convert --trust``) rewrites one, for files from a trusted source.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsnet.models import create_model
from dsnet.utils.io import atomic_torch_save

__all__ = [
    "FORMAT",
    "save_checkpoint",
    "read_checkpoint",
    "model_spec",
    "build_checkpoint_model",
    "load_state_into",
    "load_model",
    "convert_checkpoint",
]

FORMAT = "dsnet-checkpoint-v1"
_SHOW_KEYS = 3  # mismatched keys named in an error message


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (must contain ``model: {name, kwargs}`` and ``state_dict``) atomically."""
    missing = {"model", "state_dict"} - payload.keys()
    if missing:
        raise ValueError(f"checkpoint payload lacks {sorted(missing)}")
    _check_plain(payload, "payload")
    return atomic_torch_save({"format": FORMAT, **payload}, path)


_SCALARS = (str, int, float, bool, type(None))  # exactly these: numpy.float64 is a float subclass
_TORCH = (torch.Tensor, torch.Size, torch.dtype)


def _check_plain(value: Any, where: str) -> None:
    """Refuse what the safe loader would refuse later (numpy scalars, custom objects): a bug, caught at save time."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_plain(key, f"{where} key")
            _check_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    elif type(value) not in _SCALARS and not isinstance(value, _TORCH):
        raise TypeError(
            f"checkpoint {where} is a {type(value).__module__}.{type(value).__name__}: checkpoints hold only "
            "tensors and plain Python values (torch.load(weights_only=True) would refuse it)"
        )


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint at ``path``, loaded safely (no code runs); ``ValueError`` if it is not a dsnet checkpoint."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, not a checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):  # not a pickle at all: garbage, truncated
            detail = str(err).split("WeightsUnpickler error:", 1)[-1].strip().splitlines()[0]
            raise ValueError(f"{path} is not a readable dsnet checkpoint (UnpicklingError: {detail})") from None
        # the safe unpickler met something other than tensors and plain containers: a checkpoint from an older
        # dsnet (numpy RNG state), or a file that wants to run code. Say which global it wanted, not torch's essay.
        wanted = str(err).split("Unsupported global:", 1)[-1].split("was not an allowed global")[0].strip(" .:\n")
        raise ValueError(
            f"{path} holds objects outside the safe checkpoint format ({wanted[:80] or 'unpickling refused'}); "
            f"not loaded, nothing in it ran. If it is an older dsnet checkpoint from a source you trust, convert "
            f"it once: dsnet checkpoint convert {path} --trust"
        ) from None
    except Exception as err:  # truncated / not a torch file
        reason = f"{type(err).__name__}: {_first_line(err)}"
        raise ValueError(f"{path} is not a readable dsnet checkpoint ({reason})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a dsnet checkpoint (expected format {FORMAT!r})")
    model_spec(ckpt, path)
    if not isinstance(ckpt.get("state_dict"), dict):
        raise ValueError(f"{path}: the checkpoint has no 'state_dict' entry (the model's weights)")
    return ckpt


def model_spec(ckpt: dict[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's ``model: {name, kwargs}`` entry, checked."""
    spec = ckpt.get("model")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ValueError(f"{path}: the checkpoint has no 'model' entry ({{name, kwargs}}) saying which model it holds")
    if not isinstance(spec.get("kwargs", {}), dict):
        raise ValueError(f"{path}: the checkpoint's model.kwargs is not a mapping")
    return spec


def describe(spec: dict[str, Any]) -> str:
    kwargs = ", ".join(f"{k}={v!r}" for k, v in (spec.get("kwargs") or {}).items())
    return f"{spec['name']}({kwargs})"


def build_checkpoint_model(ckpt: dict[str, Any], path: str | os.PathLike) -> nn.Module:
    """A fresh model of the checkpoint's recorded architecture (no weights loaded)."""
    spec = model_spec(ckpt, path)
    try:
        return create_model(spec["name"], **spec.get("kwargs", {}))
    except ValueError as err:
        raise ValueError(f"{path}: cannot build its recorded model {describe(spec)}: {_first_line(err)}") from None


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOW_KEYS])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > _SHOW_KEYS else "")


def load_state_into(
    model: nn.Module, state: Any, path: str | os.PathLike, ckpt: dict[str, Any] | None = None, what: str = "weights"
) -> nn.Module:
    """``model.load_state_dict(state)``, or a one-line ``ValueError`` naming the checkpoint and the mismatch.

    The message says which file, the model it records, the model expected, and
    the first few missing, unexpected and shape-mismatched keys, instead of
    torch's dump of every key.
    """
    recorded = describe(ckpt["model"]) if ckpt and isinstance(ckpt.get("model"), dict) else "?"
    expected = type(model).__name__
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{path}: its {what} are empty (checkpoint of {recorded}); expected those of a {expected}")
    own = model.state_dict()
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != own[k].shape
    ]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if not shapes:
        # non-strict load so modules can fill keys added after a checkpoint was written (their
        # _load_from_state_dict defaults, e.g. a gate's budget bias); what is still missing is an error
        result = model.load_state_dict(state, strict=False)
        missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_names(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_names(unexpected)})")
        if shapes:
            parts.append(f"{len(shapes)} of another shape (checkpoint vs model: {_names(shapes)})")
        raise ValueError(
            f"{path}: its {what} do not fit the model (checkpoint records {recorded}; model is a {expected}): "
            + "; ".join(parts)
        )
    return model


def load_model(
    path: str | os.PathLike, use_ema: bool = True, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a checkpoint (EMA weights when present and ``use_ema``), in eval mode."""
    ckpt = read_checkpoint(path, map_location)
    model = build_checkpoint_model(ckpt, path)
    ema = use_ema and ckpt.get("ema_state_dict")
    load_state_into(model, ckpt["ema_state_dict"] if ema else ckpt["state_dict"], path, ckpt)
    return model.to(map_location).eval(), ckpt


def _plain_rng(state: Any) -> Any:
    """Numpy RNG state ``(name, uint32 array, pos, has_gauss, gauss)`` as plain Python values."""
    if isinstance(state, tuple) and len(state) == 5 and hasattr(state[1], "tolist"):
        return (state[0], [int(v) for v in state[1].tolist()], int(state[2]), int(state[3]), float(state[4]))
    return state


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, trust: bool = False) -> Path:
    """Rewrite a checkpoint written by an older dsnet into the safe format (plain RNG state).

    Reading the old file needs the full unpickler, which runs whatever code the
    file asks for: ``trust=True`` says its source is trusted. The result loads
    with ``weights_only=True``.
    """
    if not trust:
        raise ValueError(
            f"converting {src} runs the full unpickler, which executes any code the file contains: "
            "pass --trust (trust=True) only for a file from a source you trust"
        )
    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"no checkpoint at {src}")
    try:
        ckpt = torch.load(src, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ValueError(f"{src} is not a readable checkpoint ({type(err).__name__}: {_first_line(err)})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{src} is not a dsnet checkpoint (expected format {FORMAT!r})")
    rng = ckpt.get("rng")
    if isinstance(rng, dict) and "numpy" in rng:
        ckpt["rng"] = {**rng, "numpy": _plain_rng(rng["numpy"])}
    atomic_torch_save(ckpt, dst)
    read_checkpoint(dst)  # proves the converted file loads safely
    return Path(dst)
