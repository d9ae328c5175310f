"""The ``data:`` config section: its defaults, and validation that names the offending key.

A typo in a config key silently falling back to a default is the worst kind of
bug in a training run (it trains, just not what was asked for), so every key is
known here and anything else is an error that names the key and lists the
known ones.
"""

from __future__ import annotations

import copy
import os
from typing import Any

__all__ = ["DATA_DEFAULTS", "DATASET_NAMES", "resolve_data_config"]

DATASET_NAMES = ("fashion_mnist", "mnist", "cifar10", "cifar100", "imagefolder", "synthetic")
_ALIASES = {
    "fashion-mnist": "fashion_mnist",
    "fashionmnist": "fashion_mnist",
    "fmnist": "fashion_mnist",
    "cifar-10": "cifar10",
    "cifar_10": "cifar10",
    "cifar-100": "cifar100",
    "cifar_100": "cifar100",
    "imagenet": "imagefolder",
    "image_folder": "imagefolder",
}

# ``None`` means "the data's own recipe" (see ``dsnet.data.recipe``): fixed for the known datasets (CIFAR wants
# padding 4 and flips, MNIST must not be flipped), measured from a sample for image folders.
DATA_DEFAULTS: dict[str, Any] = {
    "dataset": "fashion_mnist",
    "root": None,  # None: the dataset's usual place (e.g. /usr/share/datasets/fashion-mnist), else a cache dir
    "image_size": None,  # None: native size (28 / 32; image folders: median shorter side, at most 224)
    "channels": None,  # None: native (image folders: 1 if every sampled image is greyscale, else 3)
    "mean": None,  # list, one per channel; None: the dataset's (image folders: measured on a sample)
    "std": None,
    "eval_crop_fraction": None,  # eval crop of image folders: shorter side -> size / f, centre crop. None:
    # 1.0 (whole image) for small images, 0.875 for large ones (ImageNet)
    "batch_size": 128,
    "eval_batch_size": 256,
    "workers": 2,
    "train_subset": None,  # int: a fixed seeded subset of the training split (fast runs)
    "holdout": None,  # int: training images held out (fixed, seeded) for model selection: best epoch,
    # budget calibration, thresholds. They are never trained on; "val" (the reported split) is never selected on
    "val_subset": None,
    "download": "auto",  # auto: download into the user cache when no local copy is found and data.root is
    # not set; true: also into data.root; false: never (see dsnet.data.loader._locate)
    "augment": {
        "random_resized_crop": None,  # None: on for folders of large images, off for small images
        "scale": None,  # None: [0.08, 1] (image folders: the smallest crop keeps >= 64x64 source pixels)
        "ratio": [0.75, 4.0 / 3.0],
        "crop_padding": None,  # None: 4 for CIFAR, 2 for (Fashion-)MNIST and synthetic, ~size/12 for small
        # images in folders; 0 disables
        "hflip": None,  # None: off for MNIST and synthetic, on otherwise
        "randaugment_n": 0,
        "randaugment_m": 9.0,  # magnitude on timm's 0..10 scale
        "random_erasing": 0.0,  # probability
    },
    "synthetic": {
        "num_classes": 10,
        "num_train": 512,
        "num_val": 256,
        "channels": 1,
        "image_size": 28,
        "seed": 0,
    },
}

# Allowed types per key; tuple entries allow several. ``float`` keys accept ints too.
_PATH = (str, os.PathLike)
_TYPES: dict[str, Any] = {
    "dataset": str,
    "root": (*_PATH, type(None)),
    "image_size": (int, type(None)),
    "channels": (int, type(None)),
    "mean": ("numbers", type(None)),
    "std": ("numbers", type(None)),
    "eval_crop_fraction": (float, type(None)),
    "batch_size": int,
    "eval_batch_size": int,
    "workers": int,
    "train_subset": (int, type(None)),
    "holdout": (int, type(None)),
    "val_subset": (int, type(None)),
    "download": (bool, str),
    "augment.random_resized_crop": (bool, type(None)),
    "augment.scale": ("pair", type(None)),
    "augment.ratio": "pair",
    "augment.crop_padding": (int, type(None)),
    "augment.hflip": (bool, type(None)),
    "augment.randaugment_n": int,
    "augment.randaugment_m": float,
    "augment.random_erasing": float,
    "synthetic.num_classes": int,
    "synthetic.num_train": int,
    "synthetic.num_val": int,
    "synthetic.channels": int,
    "synthetic.image_size": int,
    "synthetic.seed": int,
}


def _numbers_ok(value: Any) -> bool:
    return (
        isinstance(value, (list, tuple))
        and len(value) > 0
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    )


def _type_ok(value: Any, expected: Any) -> bool:
    if isinstance(expected, tuple) and any(isinstance(e, str) for e in expected):  # "pair"/"numbers" or null
        return value is None or _type_ok(value, next(e for e in expected if isinstance(e, str)))
    if expected == "numbers":
        return _numbers_ok(value)
    if expected == "pair":
        return (
            isinstance(value, (list, tuple))
            and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        )
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    types = expected if isinstance(expected, tuple) else (expected,)
    if isinstance(value, bool) and bool not in types:
        return False  # bool is an int subclass; `batch_size: true` is a mistake
    if float in types and isinstance(value, int):
        return True
    return isinstance(value, types)


def _type_name(expected: Any) -> str:
    if isinstance(expected, tuple) and any(isinstance(e, str) for e in expected):
        return _type_name(next(e for e in expected if isinstance(e, str))) + " or null"
    if expected == "numbers":
        return "a list of numbers"
    if expected == "pair":
        return "a list of two numbers"
    if expected is float:
        return "a number"
    types = expected if isinstance(expected, tuple) else (expected,)
    names = ["null" if t is type(None) else "path" if t is os.PathLike else t.__name__ for t in types]
    return " or ".join(dict.fromkeys(names))


def _merge(defaults: dict, given: dict, prefix: str) -> dict:
    out = copy.deepcopy(defaults)
    for key, value in given.items():
        name = f"{prefix}.{key}"
        if key not in defaults:
            raise ValueError(f"{name}: unknown key; known: {', '.join(defaults)}")
        if isinstance(defaults[key], dict):
            if not isinstance(value, dict):
                raise ValueError(f"{name}: expected a mapping of {', '.join(defaults[key])}, got {value!r}")
            out[key] = _merge(defaults[key], value, name)
        else:
            expected = _TYPES[name.removeprefix("data.")]
            if not _type_ok(value, expected):
                raise ValueError(f"{name}: expected {_type_name(expected)}, got {value!r} ({type(value).__name__})")
            out[key] = list(value) if isinstance(value, (list, tuple)) else value
    return out


def _check_range(name: str, ok: bool, what: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"data.{name}: {what}, got {value!r}")


def resolve_data_config(cfg: dict | None) -> dict:
    """``DATA_DEFAULTS`` overlaid with ``cfg`` (the ``data:`` section), validated.

    Unknown keys and wrong types raise ``ValueError`` naming the key (e.g.
    ``data.augment.hflpi: unknown key; known: ...``). The dataset name is
    canonicalised (``cifar-10`` -> ``cifar10``, ``imagenet`` -> ``imagefolder``).
    Resolving a resolved config is a no-op.
    """
    if cfg is None:
        cfg = {}
    if not isinstance(cfg, dict):
        raise ValueError(f"data: expected a mapping, got {cfg!r}")
    out = _merge(DATA_DEFAULTS, cfg, "data")
    name = out["dataset"].strip().lower()
    name = _ALIASES.get(name, name)
    if name not in DATASET_NAMES:
        raise ValueError(f"data.dataset: unknown dataset {out['dataset']!r}; known: {', '.join(DATASET_NAMES)}")
    out["dataset"] = name
    if out["root"] is not None:
        out["root"] = os.fspath(out["root"])
    if isinstance(out["download"], str):
        text = out["download"].strip().lower()
        choices = {"auto": "auto", "true": True, "yes": True, "false": False, "no": False}
        if text not in choices:
            raise ValueError(f"data.download: expected auto, true or false, got {out['download']!r}")
        out["download"] = choices[text]
    for key in ("batch_size", "eval_batch_size"):
        _check_range(key, out[key] > 0, "must be positive", out[key])
    _check_range("workers", out["workers"] >= 0, "must be >= 0", out["workers"])
    for key in ("image_size", "train_subset", "val_subset", "holdout"):
        _check_range(key, out[key] is None or out[key] > 0, "must be positive or null", out[key])
    ch = out["channels"]
    _check_range("channels", ch is None or ch in (1, 3), "must be 1, 3 or null", ch)
    _check_range("std", out["std"] is None or min(out["std"]) > 0, "must be positive", out["std"])
    f = out["eval_crop_fraction"]
    _check_range("eval_crop_fraction", f is None or 0 < f <= 1, "must be in (0, 1] or null", f)
    aug = out["augment"]
    if aug["scale"] is not None:
        lo, hi = aug["scale"]
        _check_range("augment.scale", 0 < lo <= hi <= 1, "needs 0 < min <= max <= 1", aug["scale"])
    lo, hi = aug["ratio"]
    _check_range("augment.ratio", 0 < lo <= hi, "needs 0 < min <= max", aug["ratio"])
    pad = aug["crop_padding"]
    _check_range("augment.crop_padding", pad is None or pad >= 0, "must be >= 0 or null", pad)
    _check_range("augment.randaugment_n", aug["randaugment_n"] >= 0, "must be >= 0", aug["randaugment_n"])
    m = aug["randaugment_m"]
    _check_range("augment.randaugment_m", 0 <= m <= 30, "must be in [0, 30] (10 is full strength)", m)
    p = aug["random_erasing"]
    _check_range("augment.random_erasing", 0 <= p <= 1, "is a probability, must be in [0, 1]", p)
    syn = out["synthetic"]
    for key in ("num_classes", "num_train", "num_val", "channels", "image_size"):
        _check_range(f"synthetic.{key}", syn[key] > 0, "must be positive", syn[key])
    _check_range("synthetic.num_classes", syn["num_classes"] >= 2, "needs at least 2 classes", syn["num_classes"])
    _check_range("synthetic.image_size", syn["image_size"] >= 8, "must be at least 8", syn["image_size"])
    return out
