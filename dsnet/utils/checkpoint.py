"""The checkpoint file: its format, its integrity digest and reading it without running code.

A dsnet checkpoint is one ``torch.save`` dict (``format: dsnet-checkpoint-v1``)
holding ``model: {name, kwargs}``, the weights and whatever a training stage
records, plus a SHA-256 digest of its contents (``integrity``). This module
writes and reads that file and checks it -- the digest, that every value is a
tensor or a plain Python value (``torch.load(weights_only=True)`` reads
nothing else, so a crafted file cannot run code), that the weights are finite --
and builds nothing: which models a file may name, and building them, is
:mod:`dsnet.train.checkpoint`'s (which re-exports everything here). It sits
below the model package so that pretrained imports read dsnet checkpoints too.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dsnet.utils.io import atomic_torch_save

__all__ = [
    "FORMAT",
    "DIGEST",
    "save_checkpoint",
    "read_checkpoint_file",
    "content_digest",
    "model_spec",
    "nonfinite_tensors",
    "check_plain",
    "first_line",
    "shown_names",
]

FORMAT = "dsnet-checkpoint-v1"
DIGEST = "sha256-content-v1"  # how ``integrity`` is computed (see _digest)
_SHOW_KEYS = 3  # mismatched keys named in an error message
_WEIGHT_KEYS = ("state_dict", "ema_state_dict")


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (must contain ``model: {name, kwargs}`` and ``state_dict``) atomically."""
    missing = {"model", "state_dict"} - payload.keys()
    if missing:
        raise ValueError(f"checkpoint payload lacks {sorted(missing)}")
    check_plain(payload, "payload")
    body = {"format": FORMAT, **{k: v for k, v in payload.items() if k not in ("format", "integrity")}}
    return atomic_torch_save({**body, "integrity": {"algorithm": DIGEST, "sha256": content_digest(body)}}, path)


def _digest(value: Any, h: Any) -> None:
    """Feed ``value`` into the hash ``h``: type tags, lengths and bytes, so distinct contents hash apart."""
    if isinstance(value, torch.Tensor):
        t = value.detach().to("cpu").contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        h.update(f"D{len(value)}".encode())
        for key, item in value.items():
            _digest(key, h)
            _digest(item, h)
    elif isinstance(value, (list, tuple)):  # torch.Size is a tuple
        h.update(f"{'L' if isinstance(value, list) else 'U'}{len(value)}".encode())
        for item in value:
            _digest(item, h)
    else:  # str, int, float, bool, None, torch.dtype: repr is exact (floats round-trip)
        text = repr(value)
        h.update(f"S{type(value).__name__}{len(text)}:{text}".encode())


def content_digest(payload: dict[str, Any]) -> str:
    """SHA-256 over a checkpoint's contents (every key but ``integrity``), independent of pickling details."""
    h = hashlib.sha256()
    _digest({k: v for k, v in payload.items() if k != "integrity"}, h)
    return h.hexdigest()


def _check_integrity(ckpt: dict[str, Any], path: Path) -> None:
    record = ckpt.get("integrity")
    if record is None:  # written before digests existed
        return
    if not isinstance(record, dict) or record.get("algorithm") != DIGEST or not isinstance(record.get("sha256"), str):
        raise ValueError(f"{path}: its integrity record is not one this dsnet writes ({DIGEST}); not loaded")
    if content_digest(ckpt) != record["sha256"]:
        raise ValueError(
            f"{path} is corrupted: its contents do not match the SHA-256 digest written with it (a changed or "
            "damaged byte, or a file edited after saving); not loaded"
        )


def nonfinite_tensors(state: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors of a state dict that hold a NaN or an inf."""
    return [
        name
        for name, t in state.items()
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]


def _check_finite(ckpt: dict[str, Any], path: Path) -> None:
    for key in _WEIGHT_KEYS:
        state = ckpt.get(key)
        if not isinstance(state, dict):
            continue
        bad = nonfinite_tensors(state)
        if bad:
            what = "weights" if key == "state_dict" else "EMA weights"
            raise ValueError(
                f"{path}: its {what} are not finite (NaN or inf) in {len(bad)} tensor(s) ({shown_names(bad)}); the "
                "run that wrote it diverged or the file was altered; not loaded"
            )


_SCALARS = (str, int, float, bool, type(None))  # exactly these: numpy.float64 is a float subclass
_TORCH = (torch.Tensor, torch.Size, torch.dtype)


def check_plain(value: Any, where: str) -> None:
    """Refuse what the safe loader would refuse later (numpy scalars, custom objects): a bug, caught at save time."""
    if isinstance(value, dict):
        for key, item in value.items():
            check_plain(key, f"{where} key")
            check_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_plain(item, f"{where}[{i}]")
    elif type(value) not in _SCALARS and not isinstance(value, _TORCH):
        raise TypeError(
            f"checkpoint {where} is a {type(value).__module__}.{type(value).__name__}: checkpoints hold only "
            "tensors and plain Python values (torch.load(weights_only=True) would refuse it)"
        )


def first_line(err: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none)."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def read_checkpoint_file(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    check: Callable[[dict[str, Any], Path], None] | None = None,
) -> dict[str, Any]:
    """The checkpoint at ``path``, loaded safely (no code runs); ``ValueError`` if it is not a dsnet checkpoint.

    Checked before it is returned: its integrity digest (when it has one), its ``model`` entry, then
    ``check(ckpt, path)`` if given (:func:`dsnet.train.checkpoint.read_checkpoint` refuses factories the user
    did not allow there), that it has weights and that they are finite. Nothing the file names is built.
    """
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
        reason = f"{type(err).__name__}: {first_line(err)}"
        raise ValueError(f"{path} is not a readable dsnet checkpoint ({reason})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a dsnet checkpoint (expected format {FORMAT!r})")
    _check_integrity(ckpt, path)
    model_spec(ckpt, path)
    if check is not None:
        check(ckpt, path)
    if not isinstance(ckpt.get("state_dict"), dict):
        raise ValueError(f"{path}: the checkpoint has no 'state_dict' entry (the model's weights)")
    _check_finite(ckpt, path)
    return ckpt


def model_spec(ckpt: dict[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's ``model: {name, kwargs}`` entry, checked."""
    spec = ckpt.get("model")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ValueError(f"{path}: the checkpoint has no 'model' entry ({{name, kwargs}}) saying which model it holds")
    if not isinstance(spec.get("kwargs", {}), dict):
        raise ValueError(f"{path}: the checkpoint's model.kwargs is not a mapping")
    return spec


def shown_names(keys: list[str]) -> str:
    """The first few of ``keys``, and how many there are in all (for one-line error messages)."""
    shown = ", ".join(keys[:_SHOW_KEYS])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > _SHOW_KEYS else "")
