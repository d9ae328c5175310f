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

What a checkpoint may do when loaded: name a registered model and its
arguments (plain values), and hold weights. It may not make dsnet import or
call anything: a ``model.name`` that is a ``module:function`` factory (a
network made with ``make_dynamic``) is refused unless the user allowed that
factory (``--trust-factory``, :func:`dsnet.models.registry.trust_factories`,
``trust_factories=``), before anything is imported.

Every checkpoint dsnet writes carries a SHA-256 digest of its contents
(``integrity``): a flipped byte, a truncated tensor or an edited value is a
one-line error on reading, not a model that silently computes something else.
Weights that are not finite (NaN or inf) are refused too, naming the tensor.

The file format itself (writing, the digest, the safe read) is
:mod:`dsnet.utils.checkpoint`, re-exported here; this module adds what is
about models: which factories a file may name, building its model, loading
its weights.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsnet.models import DynamicNet, create_model
from dsnet.models.registry import check_factory_trusted
from dsnet.utils.checkpoint import (
    DIGEST,
    FORMAT,
    content_digest,
    first_line,
    model_spec,
    nonfinite_tensors,
    read_checkpoint_file,
    save_checkpoint,
    shown_names,
)

__all__ = [
    "FORMAT",
    "DIGEST",
    "content_digest",
    "save_checkpoint",
    "read_checkpoint",
    "model_spec",
    "build_checkpoint_model",
    "load_state_into",
    "load_model",
    "convert_checkpoint",
    "nonfinite_tensors",
]


def _check_factories(ckpt: dict[str, Any], path: Path, trust_factories: Iterable[str]) -> None:
    """Refuse factory names the file asks for (its model, its recorded config's model) unless allowed."""
    trust = list(trust_factories)
    names = [("model.name", ckpt["model"]["name"])]
    config_model = (ckpt.get("config") or {}).get("model") if isinstance(ckpt.get("config"), dict) else None
    if isinstance(config_model, dict) and isinstance(config_model.get("name"), str):
        names.append(("config model.name", config_model["name"]))
    for where, name in names:
        check_factory_trusted(name, f"{path} ({where})", trust)


def read_checkpoint(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    trust_factories: Iterable[str] = (),
    check_factories: bool = True,
) -> dict[str, Any]:
    """The checkpoint at ``path``, loaded safely (no code runs); ``ValueError`` if it is not a dsnet checkpoint.

    Checked before it is returned: its integrity digest (when it has one), that its weights are finite, and
    that any ``module:function`` factory it names is one the user allowed (``trust_factories`` here, or
    :func:`dsnet.models.registry.trust_factories`). ``check_factories=False`` is for callers that build
    nothing the file names (loading its weights into a model the caller built).
    """
    if not check_factories:
        return read_checkpoint_file(path, map_location)
    return read_checkpoint_file(path, map_location, lambda ckpt, p: _check_factories(ckpt, p, trust_factories))


def describe(spec: dict[str, Any]) -> str:
    kwargs = ", ".join(f"{k}={v!r}" for k, v in (spec.get("kwargs") or {}).items())
    return f"{spec['name']}({kwargs})"


def build_checkpoint_model(ckpt: dict[str, Any], path: str | os.PathLike) -> nn.Module:
    """A fresh model of the checkpoint's recorded architecture (no weights loaded)."""
    spec = model_spec(ckpt, path)
    try:
        model = create_model(spec["name"], **spec.get("kwargs", {}))
    except ValueError as err:
        raise ValueError(f"{path}: cannot build its recorded model {describe(spec)}: {first_line(err)}") from None
    if isinstance(model, DynamicNet) and "gate_mode" not in (spec.get("kwargs") or {}):
        # a spec without gate_mode (the Python API's model_spec often has none; the model is built with the
        # constructor's default): the weights say which routing head was trained
        state = ckpt.get("state_dict")
        if isinstance(state, dict):
            model.set_gate_mode(DynamicNet.gate_mode_of(state))
    return model


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
            parts.append(f"{len(missing)} missing ({shown_names(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({shown_names(unexpected)})")
        if shapes:
            parts.append(f"{len(shapes)} of another shape (checkpoint vs model: {shown_names(shapes)})")
        raise ValueError(
            f"{path}: its {what} do not fit the model (checkpoint records {recorded}; model is a {expected}): "
            + "; ".join(parts)
        )
    return model


def load_model(
    path: str | os.PathLike,
    use_ema: bool = True,
    map_location: str | torch.device = "cpu",
    trust_factories: Iterable[str] = (),
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a checkpoint (EMA weights when present and ``use_ema``), in eval mode.

    A checkpoint of a ``module:function`` factory model (``make_dynamic``) is built only if that factory
    is in ``trust_factories`` or was allowed with :func:`dsnet.models.registry.trust_factories`.
    """
    ckpt = read_checkpoint(path, map_location, trust_factories=trust_factories)
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
        raise ValueError(f"{src} is not a readable checkpoint ({type(err).__name__}: {first_line(err)})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{src} is not a dsnet checkpoint (expected format {FORMAT!r})")
    rng = ckpt.get("rng")
    if isinstance(rng, dict) and "numpy" in rng:
        ckpt["rng"] = {**rng, "numpy": _plain_rng(rng["numpy"])}
    save_checkpoint(dst, {k: v for k, v in ckpt.items() if k not in ("format", "integrity")})
    read_checkpoint(dst, check_factories=False)  # proves the converted file loads safely (nothing is built)
    return Path(dst)
