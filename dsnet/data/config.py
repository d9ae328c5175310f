"""The ``data:`` config section: its validation table, and validation that names the offending key.

A typo in a config key silently falling back to a default is the worst kind of
bug in a training run (it trains, just not what was asked for), so every key is
known here, with its type and range (``DATA_SCHEMA``, one line per key, in the
scheme of ``dsnet.utils.schema`` that the other sections use), and anything
else is an error that names the key and lists the known ones.
"""

from __future__ import annotations

from typing import Any

from dsnet.utils.schema import (
    Bool,
    Choice,
    ConfigError,
    Float,
    Int,
    Numbers,
    PathKey,
    resolve_section,
    section_defaults,
    with_stage,
)

__all__ = ["DATA_SCHEMA", "DATA_DEFAULTS", "DATASET_NAMES", "resolve_data_config", "canonical_data_config"]

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

ALL = "all"  # every command that loads data
TRAINING = "supernet, gate, calibrate-bn"

# ``None`` means "the data's own recipe" (see ``dsnet.data.recipe``): fixed for the known datasets (CIFAR wants
# padding 4 and flips, MNIST must not be flipped), measured from a sample for image folders.
# One line per key: default, range or choices, the stage that reads it, what it means.
DATA_SCHEMA: dict[str, Any] = with_stage(
    {
        "dataset": Choice("fashion_mnist", DATASET_NAMES, doc="aliases: fashion-mnist, cifar-10, imagenet, ..."),
        "root": PathKey(None, null=True, doc="null: the dataset's usual place (e.g. /usr/share/datasets/...)"),
        "image_size": Int(
            None, "[1, inf)", null=True, doc="null: native size (28 / 32; folders: median shorter side, <= 224)"
        ),
        "channels": Int(None, "[1, 3]", null=True, doc="1 or 3; null: native (folders: 1 if every sample is grey)"),
        "mean": Numbers(None, "(-inf, inf)", null=True, doc="one per channel; null: the dataset's (folders: measured)"),
        "std": Numbers(None, "(0, inf)", null=True, doc="one per channel; null: the dataset's (folders: measured)"),
        "eval_crop_fraction": Float(
            None, "(0, 1]", null=True, doc="folders' eval: shorter side -> size / f, centre crop; null: 1 or 0.875"
        ),
        "batch_size": Int(128, "[1, inf)", stage=TRAINING, doc="training batch per process"),
        "eval_batch_size": Int(256, "[1, inf)", doc="evaluation batch"),
        "workers": Int(2, "[0, inf)", doc="data-loading worker processes"),
        "train_subset": Int(None, "[1, inf)", null=True, stage=TRAINING, doc="a fixed seeded training subset"),
        "holdout": Int(
            None,
            "[0, inf)",
            null=True,
            stage="supernet, gate",
            doc="training images held out for model selection; null: 10% (<= 5000); 0: none (select on val)",
        ),
        "val_subset": Int(None, "[1, inf)", null=True, doc="a fixed seeded subset of the validation split"),
        "download": Choice(
            "auto",
            ("auto", True, False),
            doc="auto: into the user cache when no local copy and no root; true: also into root; false: never",
        ),
        "augment": with_stage(
            {
                "random_resized_crop": Bool(None, null=True, doc="null: on for folders of large images only"),
                "scale": Numbers(
                    None, "(0, 1]", length=2, null=True, doc="crop area range; null: [0.08, 1] (folders: >= 64x64 px)"
                ),
                "ratio": Numbers([0.75, 4.0 / 3.0], "(0, inf)", length=2, doc="crop aspect ratio range, min <= max"),
                "crop_padding": Int(
                    None, "[0, inf)", null=True, doc="null: 4 CIFAR, 2 (Fashion-)MNIST, ~side/12 small folders; 0: off"
                ),
                "hflip": Bool(
                    None, null=True, doc="null: on for Fashion-MNIST and CIFAR; off for MNIST, synthetic, image folders"
                ),
                "randaugment_n": Int(0, "[0, inf)", doc="RandAugment operations per image (0: off)"),
                "randaugment_m": Float(9.0, "[0, 30]", doc="RandAugment magnitude on timm's 0..10 scale"),
                "random_erasing": Float(0.0, "[0, 1]", doc="random erasing probability"),
            },
            TRAINING,
        ),
        "synthetic": {
            "num_classes": Int(10, "[2, inf)", doc="classes"),
            "num_train": Int(512, "[1, inf)", doc="training images"),
            "num_val": Int(256, "[1, inf)", doc="validation images"),
            "channels": Int(1, "[1, inf)", doc="image channels"),
            "image_size": Int(28, "[8, inf)", doc="image side"),
            "seed": Int(0, "[0, inf)", doc="seed of the generated images"),
        },
    },
    ALL,
)

DATA_DEFAULTS: dict[str, Any] = section_defaults(DATA_SCHEMA)


def canonical_data_config(out: dict) -> dict:
    """Checks between keys of a merged ``data`` section (each key's own range is checked by the table)."""
    for key in ("scale", "ratio"):
        if out["augment"][key] is not None:
            lo, hi = out["augment"][key]
            if lo > hi:
                raise ConfigError(f"data.augment.{key}: needs min <= max, got {out['augment'][key]}")
    if out["channels"] not in (None, 1, 3):
        raise ConfigError(f"data.channels: must be 1 or 3 (or null), got {out['channels']!r}")
    return out


def resolve_data_config(cfg: dict | None) -> dict:
    """``DATA_DEFAULTS`` overlaid with ``cfg`` (the ``data:`` section), validated.

    Unknown keys, wrong types and values out of range raise ``ConfigError``
    (a ``ValueError``) naming the key (e.g. ``data.augment.hflpi: unknown key;
    known: ...``). The dataset name is canonicalised (``cifar-10`` ->
    ``cifar10``, ``imagenet`` -> ``imagefolder``). Resolving a resolved config
    is a no-op.
    """
    if isinstance(cfg, dict) and isinstance(cfg.get("dataset"), str):
        name = cfg["dataset"].strip().lower()
        cfg = {**cfg, "dataset": _ALIASES.get(name, name)}
    if isinstance(cfg, dict) and isinstance(cfg.get("download"), str):  # --set data.download=yes reads as a str
        words = {"true": True, "yes": True, "false": False, "no": False, "auto": "auto"}
        cfg = {**cfg, "download": words.get(cfg["download"].strip().lower(), cfg["download"])}
    return canonical_data_config(resolve_section(DATA_SCHEMA, cfg, "data"))
