"""Datasets, deterministic augmentation and loaders for dsnet.

Public API (other modules code against exactly this)::

    DatasetInfo                       # what a model/training loop needs to know about a split
    DATA_DEFAULTS                     # every key of the ``data:`` config section with its default
    resolve_data_config(cfg)          # defaults merged with cfg, validated (errors name the key)
    build_dataset(cfg, split)         # (raw dataset of (uint8 CHW, label), DatasetInfo)
    build_loader(cfg, split, *, seed=0, rank=0, world_size=1, device="cpu", views=1)
    first_images(cfg, split, n)       # (the first n images of an evaluation split, in order, DatasetInfo)
    dataset_class_names(cfg)          # the class names build_dataset would give, without loading images
    check_class_names(recorded, found, source)  # refuse data with other classes than a checkpoint's
    is_image_folder(root)             # root laid out as train/ (+ val/ or test/) class folders?
    training_images(cfg)              # images in the training split, before holdout and subset (none read)
    holdout_size(n, num_train, cap)   # what data.holdout holds out (null: 10%, at most cap)
    describe_split_sizes(train, held_out, test)  # "55000 training / 5000 held-out (selection) / 10000 test images"

Datasets: ``fashion_mnist`` (default), ``mnist``, ``cifar10``, ``cifar100``,
``imagefolder`` (``root/train/<class>/...``, ``root/val/<class>/...`` or ``root/test/...``) and
``synthetic``. Files are looked for in Debian's package folder and the user
cache, and downloaded into the cache when missing (``data.download: auto``;
``dsnet.data.loader._locate``). What the loader does to the images, the data
recipe, comes from the data (``dsnet.data.recipe``) and travels in
``DatasetInfo.recipe``.
"""

from dsnet.data.config import DATA_DEFAULTS, DATASET_NAMES, resolve_data_config
from dsnet.data.loader import (
    DatasetInfo,
    SeededBatchSampler,
    build_dataset,
    build_loader,
    check_class_names,
    dataset_class_names,
    describe_split_sizes,
    first_images,
    holdout_size,
    is_image_folder,
    training_images,
)

__all__ = [
    "DATA_DEFAULTS",
    "DATASET_NAMES",
    "DatasetInfo",
    "SeededBatchSampler",
    "build_dataset",
    "build_loader",
    "check_class_names",
    "dataset_class_names",
    "describe_split_sizes",
    "first_images",
    "holdout_size",
    "is_image_folder",
    "resolve_data_config",
    "training_images",
]
