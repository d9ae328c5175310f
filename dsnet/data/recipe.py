"""The data recipe: input size, channels, normalisation and crop geometry, chosen from the data itself.

The known datasets (Fashion-MNIST, MNIST, CIFAR, synthetic) have fixed
statistics. An image folder can hold anything from 28 px grey digits to
500 px photographs, so its recipe is measured, from a fixed seeded sample of
``SAMPLE_SIZE`` training images (the same sample for every run, split and
training seed, so training and evaluation agree):

* **size**: the median shorter side of the sample ("native size"), capped at
  ``MAX_DEFAULT_SIZE`` (224) px by default;
* **channels**: 1 when every sampled image is greyscale (PIL modes ``1``,
  ``L``, ``I``, ``F``...), else 3 (RGB);
* **mean / std**: per channel, over the sampled pixels (at the training size);
* **crops scaled to the image size**: images whose native shorter side is
  under ``SMALL_IMAGE`` (96) px get CIFAR-style training crops, a random crop
  of the image zero-padded by about 1/12 of its side (2 px at 28, 3 px at
  32), and are evaluated as they are (resized to the training size only if
  they differ); larger images get a random resized crop whose smallest area
  keeps at least ``MIN_CROP_SIDE`` x ``MIN_CROP_SIDE`` source pixels (8 % at
  224 px, as ImageNet training does, 25 % at 128 px), and the ImageNet eval
  (shorter side to size / 0.875, centre crop);
* **horizontal flips** off: they are opt-in (``data.augment.hflip: true``),
  since the data cannot say whether a mirrored image is still its class (a
  mirrored digit, letter or sign is not; a mirrored cat is). Fashion-MNIST
  and CIFAR keep their flips.

Each default chosen from the data is recorded with its reason in
``Recipe.why`` and said on the start-of-run recipe line
(:func:`describe_recipe`), e.g. "no horizontal flip (image folder: flips are
opt-in, data.augment.hflip=true)".

Every explicit ``data:`` key (``image_size``, ``channels``, ``mean``, ``std``,
``eval_crop_fraction``, ``augment.*``) overrides its measured value. The
resolved recipe travels in ``DatasetInfo.recipe``, so checkpoints record it
and evaluation, BN recalibration and export reuse it. [ours: thresholds and
rules are this project's choices, not from the papers]
"""

from __future__ import annotations

import copy
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from dsnet.data.datasets import ImageFolderDataset, image_header, open_image

__all__ = [
    "SAMPLE_SIZE",
    "SMALL_IMAGE",
    "MAX_DEFAULT_SIZE",
    "MIN_CROP_SIDE",
    "Recipe",
    "ImageStats",
    "measure_image_folder",
    "folder_recipe",
    "fixed_recipe",
    "recipe_overrides",
    "with_recorded_recipe",
    "describe_recipe",
]

SAMPLE_SIZE = 256  # images measured (fixed seeded sample of the training split)
SMALL_IMAGE = 96  # native shorter side under this: padding crops, no eval resize
MAX_DEFAULT_SIZE = 224  # default training size for large images (data.image_size overrides)
MIN_CROP_SIDE = 64  # a random resized crop covers at least this many source pixels per side
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "F"})
_SAMPLE_SEED = 0x9EC1


@dataclass(frozen=True)
class Recipe:
    """What the loader does between stored images and the network, resolved (no ``None`` left)."""

    image_size: int  # training / eval input side
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    random_resized_crop: bool
    scale: tuple[float, float]  # random resized crop: area fraction range
    ratio: tuple[float, float]  # random resized crop: aspect ratio range
    crop_padding: int  # padding crop (when not random_resized_crop); 0 = none
    hflip: bool
    eval_crop_fraction: float  # eval (image folders): shorter side -> image_size / f, centre crop; 1 = whole image
    native_size: int  # the data's own (median shorter) side
    source: str  # where size and statistics come from
    # the defaults chosen from the data, each with its reason ("hflip": "image folder: flips are opt-in, ..."),
    # keyed by what they decide: "size", "crop", "hflip", "eval"; explicit config keys have none
    why: dict[str, str] = field(default_factory=dict, hash=False)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ImageStats:
    """What a sample of an image folder says about it."""

    native_size: int
    channels: int
    mean: tuple[float, ...] | None  # None when not measured (given in the config)
    std: tuple[float, ...] | None
    num_sampled: int


def _sample_indices(n: int, num: int) -> list[int]:
    g = torch.Generator().manual_seed(_SAMPLE_SEED)
    return torch.randperm(n, generator=g)[: min(num, n)].sort().values.tolist()


def measure_image_folder(
    dataset: ImageFolderDataset,
    *,
    channels: int | None = None,
    image_size: int | None = None,
    measure_stats: bool = True,
    num: int = SAMPLE_SIZE,
) -> ImageStats:
    """Native size, channels and (when ``measure_stats``) per-channel mean/std of a fixed sample of ``dataset``.

    ``channels`` / ``image_size`` given: the statistics are measured on images
    converted to that many channels, at that size (larger images are
    downscaled, shorter side to ``image_size``, as training sees them).
    """
    picks = _sample_indices(len(dataset), num)
    paths = [dataset.samples[i][0] for i in picks]
    sides, modes = [], set()
    for path in paths:  # headers only: PIL opens lazily
        size, mode = image_header(path)
        sides.append(min(size))
        modes.add(mode)
    native = int(statistics.median_low(sides))
    found_channels = 1 if modes <= GRAY_MODES else 3
    c = channels or found_channels
    if not measure_stats:
        return ImageStats(native, found_channels, None, None, len(paths))
    target = image_size or min(native, MAX_DEFAULT_SIZE)
    total = np.zeros(c)
    total_sq = np.zeros(c)
    count = 0
    for path in paths:  # 16-bit greyscale scaled to 8 bits, as the loader sees it
        a = np.asarray(open_image(path, "RGB" if c == 3 else "L", size=target), dtype=np.float64) / 255.0
        a = a.reshape(-1, c)
        total += a.sum(axis=0)
        total_sq += (a * a).sum(axis=0)
        count += a.shape[0]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
    std = np.where(std < 1e-3, 1.0, std)  # a constant channel: normalise by 1, not by ~0
    return ImageStats(
        native,
        found_channels,
        tuple(round(float(v), 4) for v in mean),
        tuple(round(float(v), 4) for v in std),
        len(paths),
    )


def _crop_padding_for(size: int) -> int:
    return max(1, round(size / 12))


def _min_crop_scale(native: int) -> float:
    return min(1.0, max(0.08, (MIN_CROP_SIDE / native) ** 2))


def folder_recipe(cfg: dict, dataset: ImageFolderDataset) -> Recipe:
    """The recipe of an image folder: measured where ``cfg`` (the resolved ``data:`` section) leaves it open."""
    given_mean, given_std = cfg["mean"], cfg["std"]
    stats = measure_image_folder(
        dataset,
        channels=cfg["channels"],
        image_size=cfg["image_size"],
        measure_stats=given_mean is None or given_std is None,
    )
    channels = cfg["channels"] or stats.channels
    native = stats.native_size
    size = cfg["image_size"] or min(native, MAX_DEFAULT_SIZE)
    small = native < SMALL_IMAGE
    aug = cfg["augment"]
    pick = lambda key, default: default if aug[key] is None else aug[key]  # noqa: E731
    rrc = bool(pick("random_resized_crop", not small))
    scale = pick("scale", [_min_crop_scale(native), 1.0])
    why = {}
    if cfg["image_size"] is None and native > MAX_DEFAULT_SIZE:
        why["size"] = f"native {native} px capped at {MAX_DEFAULT_SIZE}; data.image_size to change"
    if aug["random_resized_crop"] is None:
        side = f"native {native} px"
        why["crop"] = f"{side} < {SMALL_IMAGE}: small-image crops" if small else f"{side} >= {SMALL_IMAGE}"
    if aug["hflip"] is None:
        why["hflip"] = "image folder: flips are opt-in, data.augment.hflip=true"
    if cfg["eval_crop_fraction"] is None:
        why["eval"] = f"native {native} px {'<' if small else '>='} {SMALL_IMAGE}"
    measured = given_mean is None or given_std is None
    source = f"measured on {stats.num_sampled} training images" if measured else "size measured, mean/std configured"
    recipe = Recipe(
        image_size=int(size),
        channels=int(channels),
        mean=tuple(float(v) for v in (given_mean if given_mean is not None else stats.mean)),
        std=tuple(float(v) for v in (given_std if given_std is not None else stats.std)),
        random_resized_crop=rrc,
        scale=(float(scale[0]), float(scale[1])),
        ratio=(float(aug["ratio"][0]), float(aug["ratio"][1])),
        crop_padding=int(pick("crop_padding", 0 if rrc else _crop_padding_for(size))),
        hflip=bool(pick("hflip", False)),  # opt-in: a mirrored digit or letter is not its class
        eval_crop_fraction=float(
            cfg["eval_crop_fraction"] if cfg["eval_crop_fraction"] is not None else (1.0 if small else 0.875)
        ),
        native_size=native,
        source=source,
        why=why,
    )
    _check(recipe)
    return recipe


def fixed_recipe(
    cfg: dict,
    *,
    native_size: int,
    channels: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    augment_defaults: dict,
    source: str,
) -> Recipe:
    """The recipe of a dataset with known statistics (``cfg`` keys still override)."""
    if cfg["channels"] is not None and cfg["channels"] != channels:
        raise ValueError(
            f"data.channels={cfg['channels']}, but {cfg['dataset']} images have {channels} channel(s); "
            "only image folders convert channels"
        )
    aug = cfg["augment"]
    pick = lambda key: augment_defaults[key] if aug[key] is None else aug[key]  # noqa: E731
    scale = aug["scale"] if aug["scale"] is not None else [0.08, 1.0]
    recipe = Recipe(
        image_size=int(cfg["image_size"] or native_size),
        channels=channels,
        mean=tuple(float(v) for v in (cfg["mean"] if cfg["mean"] is not None else mean)),
        std=tuple(float(v) for v in (cfg["std"] if cfg["std"] is not None else std)),
        random_resized_crop=bool(pick("random_resized_crop")),
        scale=(float(scale[0]), float(scale[1])),
        ratio=(float(aug["ratio"][0]), float(aug["ratio"][1])),
        crop_padding=int(pick("crop_padding")),
        hflip=bool(pick("hflip")),
        eval_crop_fraction=float(cfg["eval_crop_fraction"] if cfg["eval_crop_fraction"] is not None else 1.0),
        native_size=native_size,
        source=source,
    )
    _check(recipe)
    return recipe


def _check(recipe: Recipe) -> None:
    for key in ("mean", "std"):
        values = getattr(recipe, key)
        if len(values) != recipe.channels:
            raise ValueError(f"data.{key}: {len(values)} values for {recipe.channels}-channel images")
    if min(recipe.std) <= 0:
        raise ValueError(f"data.std: must be positive, got {list(recipe.std)}")


def recipe_overrides(recipe: dict[str, Any]) -> dict[str, Any]:
    """``data:`` keys that pin a recorded recipe (``DatasetInfo.recipe``), so a rebuilt loader reproduces it."""
    return {
        "image_size": recipe["image_size"],
        "channels": recipe["channels"],
        "mean": list(recipe["mean"]),
        "std": list(recipe["std"]),
        "eval_crop_fraction": recipe["eval_crop_fraction"],
        "augment": {
            "random_resized_crop": recipe["random_resized_crop"],
            "scale": list(recipe["scale"]),
            "ratio": list(recipe["ratio"]),
            "crop_padding": recipe["crop_padding"],
            "hflip": recipe["hflip"],
        },
    }


def with_recorded_recipe(data_cfg: dict[str, Any], dataset_info: dict[str, Any] | None) -> dict[str, Any]:
    """``data_cfg`` with the keys it leaves open (``None``/absent) taken from a checkpoint's recorded recipe.

    ``dataset_info`` is the checkpoint's ``dataset`` entry (``DatasetInfo`` as a
    dict). Evaluating, exporting or training the gate of a checkpoint this way
    normalises and crops exactly as its training did, even if the image folder
    changed since; explicit keys in ``data_cfg`` still win. A checkpoint of
    another dataset, or one that records no recipe (older checkpoints), leaves
    ``data_cfg`` as it is (a copy).
    """
    from dsnet.data.config import resolve_data_config

    out = copy.deepcopy(data_cfg)
    recipe = (dataset_info or {}).get("recipe")
    if not recipe or dataset_info.get("name") != resolve_data_config(data_cfg)["dataset"]:
        return out
    pinned = recipe_overrides(recipe)
    augment = dict(out.get("augment") or {})
    for key, value in pinned.pop("augment").items():
        if augment.get(key) is None:
            augment[key] = value
    out["augment"] = augment
    for key, value in pinned.items():
        if out.get(key) is None:
            out[key] = value
    return out


def _numbers(values: tuple[float, ...]) -> str:
    return "/".join(f"{v:.3f}" for v in values)


def describe_recipe(recipe: Recipe | dict[str, Any], augment: dict[str, Any] | None = None) -> str:
    """One line saying what the loader does (printed when training and evaluation start).

    A default chosen from the data (``Recipe.why``) is followed by its reason
    in parentheses, e.g. "no horizontal flip (image folder: flips are opt-in,
    data.augment.hflip=true)".
    """
    r = recipe if isinstance(recipe, dict) else recipe.as_dict()
    why = r.get("why") or {}  # recipes recorded before reasons were: none
    because = lambda key: f" ({why[key]})" if why.get(key) else ""  # noqa: E731
    s = r["image_size"]
    if r["random_resized_crop"]:
        lo, hi = r["scale"]
        reason = f"; {why['crop']}" if why.get("crop") else ""
        train = f"random resized crop to {s} px (area {lo:.2g}-{hi:.2g}{reason})"
    else:
        train = f"random crop with {r['crop_padding']} px zero padding" if r["crop_padding"] else "no crop"
        train += because("crop")
    if r["native_size"] != s and not r["random_resized_crop"]:
        train = f"resize to {s} px, " + train
    parts = [train]
    if r["hflip"]:
        parts.append("horizontal flip" + because("hflip"))
    elif why.get("hflip"):  # said only when it was a choice: known datasets without flips (MNIST) stay quiet
        parts.append("no horizontal flip" + because("hflip"))
    if augment:
        if augment.get("randaugment_n"):
            parts.append(f"RandAugment n={augment['randaugment_n']} m={augment['randaugment_m']:g}")
        if augment.get("random_erasing"):
            parts.append(f"random erasing p={augment['random_erasing']:g}")
    f = r["eval_crop_fraction"]
    if f < 1:
        evaluation = f"shorter side to {int(s / f)} px, centre crop {s}"
    elif r["native_size"] == s:
        evaluation = "images as they are"
    else:
        evaluation = f"shorter side to {s} px, centre crop {s}"
    evaluation += because("eval")
    channels = "1 channel" if r["channels"] == 1 else f"{r['channels']} channels"
    return (
        f"data recipe ({r['source']}): {s} px{because('size')}, {channels}, mean {_numbers(r['mean'])}, "
        f"std {_numbers(r['std'])}; train: {', '.join(parts)}; eval: {evaluation}"
    )
