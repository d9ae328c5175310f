"""Run configuration: YAML recipes + ``--set key=value`` overrides, validated before any work starts.

Every key has a default below (the ``data`` section's defaults live with the
data package). A key that is not known, or a value of the wrong type, is an
error that names the key: a typo in a recipe must not silently train with the
default for hours.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

__all__ = ["DEFAULTS", "load_config", "resolve_config", "apply_overrides", "ConfigError"]


class ConfigError(ValueError):
    """A bad configuration key or value."""


ANY = object()  # marker: a default of None that accepts any type

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "device": "auto",  # auto | cpu | cuda | cuda:N
    "model": {
        "name": "ds_mobilenet_v1_cifar",
        "kwargs": {},  # passed to create_model; num_classes and in_chans default to the dataset's
    },
    "data": {},  # validated by dsnet.data.resolve_data_config
    "supernet": {
        "epochs": 10,
        "optimizer": "sgd",  # sgd (masked, as official) | adamw (for vision transformers)
        "lr": 0.1,
        "lr_reference_batch": 256,  # lr is for this global batch size; scaled linearly to the real one
        "momentum": 0.9,
        "nesterov": False,
        "betas": [0.9, 0.999],  # adamw only
        "weight_decay": 1e-4,
        "warmup_epochs": 1,
        "min_lr": 0.0,
        "label_smoothing": 0.1,
        "num_random": 2,  # sandwich rule: largest + n random + smallest
        "width_sampling": "discrete",  # discrete: uniform over routed sub-networks | continuous: r ~ U[r_min, 1]
        "distill": "ib",  # ib | ieb | inplace | none
        "ema_decay": 0.997,
        "ema_warmup": True,  # decay min(ema_decay, (1+t)/(10+t)): a usable teacher from the first epoch
        "mvco": False,  # multi-view consistency (two augmented views per image)
        "mask_untouched": True,  # no weight decay / momentum for channels that got no gradient
        "amp": True,  # bfloat16 autocast on CUDA; ignored on CPU
        "grad_clip": None,
        "bn_calibration_batches": 200,
        "channels_last": False,
    },
    "gate": {
        "epochs": 3,
        "lr": 0.08,
        "lr_reference_batch": 512,
        "momentum": 0.9,
        "weight_decay": 0.01,
        "warmup_epochs": 0,
        "min_lr": 0.0,
        "tau": 1.0,  # Gumbel-softmax temperature
        "sgs_weight": 1.0,  # sandwich gate sparsification
        "task_weight": 1.0,  # CE of the dynamically routed output
        "macs_weight": 0.5,  # lambda of the complexity loss
        "macs_unit": "gmacs",  # gmacs (official: (mean GMACs)^2) | relative (mean MACs / widest routed)
        "target_mmacs": None,  # optional budget: penalise (mean - target)^2 instead of mean^2, then set
        # the gate's stored bias so the trained gate averages this many MMACs on training images
        "target_fraction": None,  # the same budget as a fraction of the widest routing choice's MACs
        "amp": True,
    },
    "log": {
        "print_every": 50,  # steps between progress-bar postfix updates
        "tensorboard": True,  # used when the tensorboard package is installed
        "progress": True,
    },
    "distributed": {
        "backend": "auto",  # auto: nccl on CUDA, gloo on CPU
    },
}

# keys whose default is None but which take a value of a known type
_NONE_TYPES: dict[str, tuple[type, ...]] = {
    "supernet.grad_clip": (float, int),
    "gate.target_mmacs": (float, int),
    "gate.target_fraction": (float, int),
}

_CHOICES: dict[str, tuple[str, ...]] = {
    "supernet.distill": ("ib", "ieb", "inplace", "none"),
    "supernet.optimizer": ("sgd", "adamw"),
    "supernet.width_sampling": ("discrete", "continuous"),
    "gate.macs_unit": ("gmacs", "relative"),
}


def _check(defaults: dict, cfg: dict, prefix: str) -> dict:
    out = copy.deepcopy(defaults)
    for key, value in cfg.items():
        path = f"{prefix}{key}"
        if key not in defaults:
            known = ", ".join(sorted(defaults))
            raise ConfigError(f"{path}: unknown key; known keys here: {known}")
        default = defaults[key]
        if isinstance(default, dict) and default and not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        if isinstance(default, dict) and default:
            out[key] = _check(default, value, path + ".")
        else:
            out[key] = _check_value(path, default, value)
    return out


def _check_value(path: str, default: Any, value: Any) -> Any:
    if value is None:
        if default is None or path in _NONE_TYPES:
            return None
        raise ConfigError(f"{path}: must not be null (default {default!r})")
    if default is None:
        allowed = _NONE_TYPES.get(path)
        if allowed and not (isinstance(value, allowed) and not isinstance(value, bool)):
            raise ConfigError(f"{path}: expected {' or '.join(t.__name__ for t in allowed)}, got {value!r}")
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, dict):  # free-form mapping such as model.kwargs
        ok = isinstance(value, dict)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"{path}: expected {type(default).__name__}, got {type(value).__name__} {value!r}")
    if path in _CHOICES and value not in _CHOICES[path]:
        raise ConfigError(f"{path}: must be one of {', '.join(_CHOICES[path])}, got {value!r}")
    return value


def _set_dotted(cfg: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = cfg
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {k} is not a mapping")
    node[keys[-1]] = value


def apply_overrides(cfg: dict, overrides: list[str] | None) -> dict:
    """``["supernet.epochs=3", "data.root=/x"]`` -> values parsed as YAML scalars."""
    cfg = copy.deepcopy(cfg)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {key}: cannot parse {raw!r} ({err})") from None
        _set_dotted(cfg, key.strip(), value)
    return cfg


def resolve_config(cfg: dict | None) -> dict:
    """Defaults merged with ``cfg``, every key and type checked."""
    from dsnet.data import resolve_data_config

    cfg = dict(cfg or {})
    data = cfg.pop("data", None) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"data: expected a mapping, got {type(data).__name__}")
    out = _check({k: v for k, v in DEFAULTS.items() if k != "data"}, cfg, "")
    try:
        out["data"] = resolve_data_config(data)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err) if str(err).startswith("data") else f"data: {err}") from None
    return out


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> dict:
    """Read a YAML recipe (or start from defaults), apply overrides, validate."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no config file at {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    return resolve_config(apply_overrides(raw, overrides))
