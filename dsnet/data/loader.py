"""Building datasets and deterministic, shardable loaders from the ``data:`` config section.

The loader hands whole batches to the workers: its sampler yields
``BatchRequest(indices, epoch)`` items and the dataset side (``BatchFetcher``)
turns each request into an augmented batch. Carrying the epoch inside the
request, rather than setting it on the dataset, is what keeps persistent
workers (which hold their own copy of the dataset) in step with
``sampler.set_epoch``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from dsnet.data.config import resolve_data_config
from dsnet.data.datasets import (
    FASHION_MNIST_CLASSES,
    ImageFolderDataset,
    InMemoryDataset,
    _find_file,
    load_cifar,
    load_cifar_class_names,
    load_idx_dataset,
    make_synthetic,
    read_idx,
)
from dsnet.data.download import RESOURCES, DownloadError, default_data_dir, download_dataset
from dsnet.data.recipe import Recipe, fixed_recipe, folder_recipe
from dsnet.data.transforms import AugmentSpec, BatchTransform, augment_defaults

__all__ = [
    "DatasetInfo",
    "BatchRequest",
    "SeededBatchSampler",
    "BatchFetcher",
    "build_dataset",
    "build_loader",
    "dataset_class_names",
    "check_class_names",
    "describe_split_sizes",
    "holdout_size",
    "is_image_folder",
    "training_images",
]

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
SPLITS = ("train", "holdout", "val")

# name -> (native size, channels, mean, std)
_STATS: dict[str, tuple[int, int, tuple[float, ...], tuple[float, ...]]] = {
    "fashion_mnist": (28, 1, (0.2860,), (0.3530,)),
    "mnist": (28, 1, (0.1307,), (0.3081,)),
    "cifar10": (32, 3, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": (32, 3, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}  # image folders: measured from a sample (dsnet.data.recipe)
_PRETTY = {"fashion_mnist": "Fashion-MNIST", "mnist": "MNIST", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and a training loop need to know about a dataset split."""

    name: str
    num_classes: int
    in_chans: int
    image_size: int  # the size images come out of the loader at (eval/native size unless configured)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: list[str]
    num_samples: int
    recipe: dict = field(default_factory=dict)  # the resolved dsnet.data.recipe.Recipe (as a dict)


# ---------------------------------------------------------------------------------------------------- locating data
def _root_candidates(name: str, root: str | None) -> list[Path]:
    if name in ("fashion_mnist", "mnist"):
        sub = {"fashion_mnist": ("fashion-mnist", "fashion_mnist", "FashionMNIST/raw"), "mnist": ("mnist", "MNIST/raw")}
        if root is not None:
            r = Path(root).expanduser()
            return [r, *(r / s for s in sub[name])]
        cands = [DEBIAN_FASHION_MNIST] if name == "fashion_mnist" else []
        return [*cands, default_data_dir() / name]
    folder = RESOURCES[name][2]
    r = Path(root).expanduser() if root is not None else default_data_dir() / name
    return [r / folder, r]


def _how_to_get(name: str, root: str | None, download: bool | str) -> str:
    """The ways to get ``name`` that were not tried yet (an automatic download that failed is not repeated)."""
    target = root if root is not None else default_data_dir() / name
    steps = []
    if name == "fashion_mnist":
        steps.append(
            "install the Debian/Ubuntu package (apt-get install dataset-fashion-mnist; "
            f"files land in {DEBIAN_FASHION_MNIST})"
        )
    if download is False or (download == "auto" and root is not None):
        steps.append(f"set data.download=true to fetch it from {RESOURCES[name][0][0]} into {target} (md5-checked)")
    kind = (
        "the four IDX files (train-/t10k- images/labels .gz)"
        if name in ("fashion_mnist", "mnist")
        else (f"the extracted {RESOURCES[name][2]}/ folder")
    )
    steps.append(f"point data.root (CLI: --data DIR) at a folder holding {kind}")
    hint = ""
    if is_image_folder(root):
        hint = f" {root} is laid out as an image folder (train/, val/ class folders): set data.dataset=imagefolder."
    return "To get it: " + "; or ".join(steps) + "." + hint


def _locate(name: str, root: str | None, split: str, download: bool | str) -> Path:
    """The folder holding ``name``'s files for ``split``, downloading them when allowed.

    The order: the local places (``data.root`` and its usual subfolders; without
    a root, Debian's package folder for Fashion-MNIST, then the user cache);
    then, when ``download`` allows it, each mirror in turn into the cache (or
    into ``data.root`` with ``download=true``). ``download="auto"`` (the
    default) downloads only when no root was given: a root names where the data
    is, and a typo there should not start a download. When every way fails,
    ``FileNotFoundError`` lists what was tried and how else to get the data.
    """
    if name in ("fashion_mnist", "mnist"):
        prefix = "train" if split == "train" else "t10k"
        needed = [f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz"]
        present = lambda d: all(_find_file(d, f) for f in needed)  # noqa: E731
    else:
        needed = ["batches.meta" if name == "cifar10" else "meta", "test_batch" if name == "cifar10" else "test"]
        present = lambda d: all((d / f).is_file() for f in needed)  # noqa: E731
    candidates = _root_candidates(name, root)
    for d in candidates:
        if present(d):
            return d
    looked = ", ".join(str(d) for d in dict.fromkeys(candidates))
    what = f"{_PRETTY[name]} not found: looked for {' and '.join(needed)} in {looked}"
    if download is True or (download == "auto" and root is None):
        target = Path(root).expanduser() if root is not None else default_data_dir() / name
        print(f"{what}; downloading it into {target} (md5-checked)", file=sys.stderr, flush=True)
        try:
            got = download_dataset(name, target)
        except DownloadError as err:
            tried = "; ".join(f"{url} ({msg})" for url, msg in err.attempts)
            raise FileNotFoundError(
                f"{what}; downloading into {target} failed: {tried}. {_how_to_get(name, root, download)}"
            ) from None
        if present(got):
            return got
        raise FileNotFoundError(f"{_PRETTY[name]}: downloaded into {got} but {', '.join(needed)} are still missing")
    raise FileNotFoundError(f"{what}. {_how_to_get(name, root, download)}")


def _subset(ds: InMemoryDataset | ImageFolderDataset, k: int | None, salt: int) -> Any:
    """A fixed seeded subset of ``k`` samples (the same for every run and training seed), in dataset order."""
    if k is None or k >= len(ds):
        return ds
    g = torch.Generator().manual_seed(0x5EED + salt)
    idx = torch.randperm(len(ds), generator=g)[:k].sort().values
    return ds.subset(idx)


AUTO_HOLDOUT_FRACTION, AUTO_HOLDOUT_MAX = 0.1, 5000  # data.holdout: null


def holdout_size(n: int | None, num_train: int, cap: int = AUTO_HOLDOUT_MAX) -> int:
    """How many training images ``data.holdout`` holds out: ``n``, or with ``null`` 10% of them (at most ``cap``).

    ``cap`` is 5,000 for ``data.holdout: null``; ``dsnet compare --fast`` applies the same rule with a lower cap.
    """
    if n is None:
        f = AUTO_HOLDOUT_FRACTION
        return min(cap, max(1, round(f * num_train))) if f > 0 and num_train > 1 else 0
    return n


def _holdout_split(ds: InMemoryDataset | ImageFolderDataset, n: int | None, split: str) -> Any:
    """The training images minus ``n`` held-out ones (``split="train"``), or those ``n`` (``"holdout"``).

    ``n=None`` holds out 10% (at most 5,000, :func:`holdout_size`); ``n=0`` holds out nothing.
    """
    n = holdout_size(n, len(ds))
    if n == 0:
        if split == "holdout":
            raise ValueError("data.holdout is 0: there is no held-out slice of the training set to use")
        return ds
    if n >= len(ds):
        raise ValueError(f"data.holdout={n} leaves no training images (the training split has {len(ds)})")
    g = torch.Generator().manual_seed(0x401D)
    perm = torch.randperm(len(ds), generator=g)
    keep = perm[:n] if split == "holdout" else perm[n:]
    return ds.subset(keep.sort().values)


def describe_split_sizes(training: int, held_out: int, test: int | None = None) -> str:
    """How many images a run trains on, selects on and tests on, for its first lines (one wording everywhere).

    ``55000 training / 5000 held-out (selection) / 10000 test images``; ``test=None`` for a stage that does not
    read the test split; ``held_out=0`` (``data.holdout: 0``) says that selection then reads the test split.
    """
    test_part = f" / {test} test" if test is not None else ""
    if held_out:
        return f"{training} training / {held_out} held-out (selection){test_part} images"
    return f"{training} training{test_part} images, none held out (selection reads the test split)"


# ---------------------------------------------------------------------------------------------------- datasets
def build_dataset(cfg: dict | None, split: str) -> tuple[Dataset, DatasetInfo]:
    """The raw dataset for ``split`` ("train", "holdout" or "val") and its ``DatasetInfo``.

    Items are ``(uint8 CHW tensor, int label)``, unaugmented, at native size;
    ``build_loader`` does resizing, augmentation and normalisation.

    ``holdout: n`` splits ``n`` images off the training split, a fixed seeded
    choice (the same for every training seed): "train" is the rest and
    "holdout" those ``n``, for choosing epochs, budgets and thresholds without
    looking at "val", the split results are reported on. ``train_subset`` then
    takes a subset of what remains for training; ``val_subset`` of "val".
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    cfg = resolve_data_config(cfg)
    name, root = cfg["dataset"], cfg["root"]
    source = "val" if split == "val" else "train"  # the holdout is carved out of the training split
    if name == "synthetic":
        s = cfg["synthetic"]
        n = s["num_train"] if source == "train" else s["num_val"]
        ds: InMemoryDataset | ImageFolderDataset = make_synthetic(
            s["num_classes"], n, s["channels"], s["image_size"], s["seed"], source
        )
        c = s["channels"]
        recipe = fixed_recipe(
            cfg,
            native_size=s["image_size"],
            channels=c,
            mean=(0.5,) * c,
            std=(0.25,) * c,
            augment_defaults=augment_defaults(name),
            source="synthetic data's statistics",
        )
    elif name == "imagefolder":
        if source == "val" and root is not None and not (Path(root).expanduser() / "train").is_dir():
            # evaluation reads only val/: no train/ needed (a checkpoint's recorded recipe pins size, mean, std)
            ds = _image_folder(root, "val")
            recipe = folder_recipe(cfg, ds)
        else:
            train_folder = _image_folder(root, "train")
            recipe = folder_recipe(cfg, train_folder)  # always from the training images: train and eval agree
            ds = train_folder if source == "train" else _image_folder(root, source)
        ds.mode = "L" if recipe.channels == 1 else "RGB"
    else:
        native, in_chans, mean, std = _STATS[name]
        if name in ("fashion_mnist", "mnist"):
            classes = FASHION_MNIST_CLASSES if name == "fashion_mnist" else [str(i) for i in range(10)]
            ds = load_idx_dataset(_locate(name, root, source, cfg["download"]), source, classes)
        else:
            ds = load_cifar(_locate(name, root, source, cfg["download"]), source, fine=name == "cifar100")
        recipe = fixed_recipe(
            cfg,
            native_size=native,
            channels=in_chans,
            mean=mean,
            std=std,
            augment_defaults=augment_defaults(name),
            source=f"{_PRETTY[name]} statistics",
        )
    if len(ds.class_names) < 2:  # one class trains to a meaningless 100%
        where = f" in {root}" if root else ""
        raise ValueError(
            f"{name}{where}: {len(ds.class_names)} class ({', '.join(ds.class_names)}); a classifier needs at least 2"
        )
    if source == "train":
        ds = _holdout_split(ds, cfg["holdout"], split)
        if split == "train":
            ds = _subset(ds, cfg["train_subset"], 0)
    else:
        ds = _subset(ds, cfg["val_subset"], 1)
    info = DatasetInfo(
        name=name,
        num_classes=len(ds.class_names),
        in_chans=recipe.channels,
        image_size=recipe.image_size,
        mean=recipe.mean,
        std=recipe.std,
        class_names=list(ds.class_names),
        num_samples=len(ds),
        recipe=recipe.as_dict(),
    )
    return ds, info


def _class_dirs(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


EVAL_FOLDERS = ("val", "validation", "test")  # an image folder's evaluation split: the first of these found
_LAYOUT = "<root>/train/<class>/*.jpg and <root>/val/<class>/*.jpg (or test/)"


def is_image_folder(root: str | Path | None) -> bool:
    """Whether ``root`` is laid out as an image folder: ``train/`` or ``val/`` (``validation/``, ``test/``)
    holding class subfolders. What ``--data DIR`` of ``dsnet compare`` uses to tell one from a Fashion-MNIST
    folder, and the missing-data error to suggest ``data.dataset=imagefolder``.
    """
    if root is None:
        return False
    r = Path(root).expanduser()
    try:
        return any((r / split).is_dir() and _class_dirs(r / split) for split in ("train", *EVAL_FOLDERS))
    except OSError:  # unreadable: not something to detect a layout in
        return False


def _image_folder(root: str | None, split: str) -> ImageFolderDataset:
    layout = _LAYOUT
    if root is None:
        raise FileNotFoundError(f"imagefolder needs data.root (CLI: --data DIR): a folder laid out as {layout}")
    r = Path(root).expanduser()
    train_dir = r / "train"
    classes: list[str] | None = None  # val/ without train/ (evaluation only): the val folder's own classes
    if split == "train" or train_dir.is_dir():
        if not train_dir.is_dir():
            raise FileNotFoundError(f"{train_dir} not found; data.root (--data DIR) must be laid out as {layout}")
        # class order comes from train when there is one, so that label i means the same class in both splits
        classes = _class_dirs(train_dir)
        if split == "train":
            return ImageFolderDataset(train_dir, classes)
    for name in EVAL_FOLDERS:
        if (r / name).is_dir():
            return ImageFolderDataset(r / name, classes or _class_dirs(r / name), allow_empty_classes=True)
    raise FileNotFoundError(f"{r / 'val'} not found; data.root (--data DIR) must be laid out as {layout}")


_TRAIN_IMAGES = {"fashion_mnist": 60000, "mnist": 60000, "cifar10": 50000, "cifar100": 50000}  # as published


def training_images(cfg: dict | None) -> int:
    """How many images the training split holds, before ``data.holdout`` and ``data.train_subset``.

    Nothing is downloaded, decoded or measured: image folders are scanned
    (``<root>/train``), (Fashion-)MNIST's label file is read where it is
    found, synthetic data is ``synthetic.num_train``; CIFAR, and data not
    downloaded yet, count as published (50,000 / 60,000).
    """
    cfg = resolve_data_config(cfg)
    name = cfg["dataset"]
    if name == "synthetic":
        return int(cfg["synthetic"]["num_train"])
    if name == "imagefolder":
        return len(_image_folder(cfg["root"], "train"))
    if name in ("fashion_mnist", "mnist"):
        try:
            folder = _locate(name, cfg["root"], "train", download=False)
        except FileNotFoundError:
            return _TRAIN_IMAGES[name]  # what a download will hold
        return len(read_idx(_find_file(folder, "train-labels-idx1-ubyte.gz")))
    return _TRAIN_IMAGES[name]


# ---------------------------------------------------------------------------------------------------- class names
def dataset_class_names(cfg: dict | None) -> list[str]:
    """The class names ``build_dataset(cfg, ...)`` would give, without loading or measuring the images.

    Image folders: the class folders of ``<root>/train``; CIFAR: its meta file
    (located, and downloaded when allowed, as ``build_dataset`` does).
    """
    cfg = resolve_data_config(cfg)
    name, root = cfg["dataset"], cfg["root"]
    if name == "synthetic":
        return [f"class_{i}" for i in range(cfg["synthetic"]["num_classes"])]
    if name == "fashion_mnist":
        return list(FASHION_MNIST_CLASSES)
    if name == "mnist":
        return [str(i) for i in range(10)]
    if name == "imagefolder":
        if root is None:
            _image_folder(root, "train")  # the error that says what data.root must be
        train_dir = Path(root).expanduser() / "train"
        if not train_dir.is_dir():
            _image_folder(root, "train")
        return sorted(d.name for d in train_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    folder = _locate(name, root, "val", cfg["download"])
    meta_file, key = ("meta", "fine_label_names") if name == "cifar100" else ("batches.meta", "label_names")
    return load_cifar_class_names(folder / meta_file, key)


def _shown(names: list[str], k: int = 5) -> str:
    return "[" + ", ".join(names[:k]) + (f", ... ({len(names)} in all)" if len(names) > k else "") + "]"


def check_class_names(recorded: Any, found: list[str] | tuple[str, ...], source: str, data: str = "the data") -> None:
    """Refuse data whose classes differ from those a checkpoint was trained on (``ValueError`` naming both).

    ``recorded`` is the checkpoint's ``dataset`` entry (``DatasetInfo`` as a
    dict); a checkpoint that records no class names (older ones, random
    weights) is not checked. Label ``i`` must mean the same class in both:
    the same names in the same order.
    """
    names = recorded.get("class_names") if isinstance(recorded, dict) else None
    if not names:
        return
    names, found = [str(n) for n in names], [str(n) for n in found]
    if names != found:
        what = "in another order" if sorted(names) == sorted(found) else "other classes"
        raise ValueError(
            f"{source} was trained on {len(names)} classes {_shown(names)} but {data} has {len(found)} "
            f"{_shown(found)} ({what}); evaluate or train it on the data it was trained on"
        )


# ---------------------------------------------------------------------------------------------------- loading
class BatchRequest(NamedTuple):
    """One batch to produce: which samples, and the epoch that (with the seed) fixes their augmentation."""

    indices: tuple[int, ...]
    epoch: int


class SeededBatchSampler(Sampler[BatchRequest]):
    """Batches of this rank's samples in a seeded order.

    The order is a pure function of ``(seed, epoch, rank, world_size)``:
    ``torch.Generator().manual_seed(seed + epoch)`` permutes the dataset (when
    shuffling), the permutation is padded by wrapping around to a multiple of
    ``world_size`` (as ``DistributedSampler`` does, so every rank gets the same
    number of batches) and rank ``r`` takes every ``world_size``-th index from
    ``r``. ``set_epoch`` also changes the augmentation, since the epoch travels
    with every ``BatchRequest``.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        shuffle: bool,
        drop_last: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if num_samples < 1:
            raise ValueError("cannot sample from an empty dataset")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def per_rank(self) -> int:
        return -(-self.num_samples // self.world_size)

    def indices(self) -> list[int]:
        """This rank's sample indices for the current epoch, in order."""
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.num_samples)
        total = self.per_rank * self.world_size
        if total > self.num_samples:
            order = order.repeat(-(-total // self.num_samples))[:total]
        return order[self.rank : total : self.world_size].tolist()

    def __iter__(self):
        idx = self.indices()
        n = len(self)
        for b in range(n):
            yield BatchRequest(tuple(idx[b * self.batch_size : (b + 1) * self.batch_size]), self.epoch)

    def __len__(self) -> int:
        if self.drop_last:
            return self.per_rank // self.batch_size
        return -(-self.per_rank // self.batch_size)


class BatchFetcher(Dataset):
    """Turns a ``BatchRequest`` into ``(images, labels)`` (or ``([view, ...], labels)`` when ``views > 1``)."""

    def __init__(
        self, dataset: InMemoryDataset | ImageFolderDataset, transform: BatchTransform, seed: int, views: int
    ) -> None:
        self.dataset = dataset
        self.transform = transform
        self.seed = seed
        self.views = views

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, request: BatchRequest) -> tuple[Tensor | list[Tensor], Tensor]:
        # Batch transforms are many small ops: intra-op threads only add synchronisation, and on a
        # busy machine a descheduled OpenMP thread stalls every op (measured: 40 ms instead of 0.2 ms
        # for one uint8->float conversion on 2 shared cores). Workers already run single-threaded;
        # with workers=0 the training step is not running concurrently, so nothing is lost.
        threads = torch.get_num_threads()
        if threads > 1:
            torch.set_num_threads(1)
        try:
            return self._fetch(request)
        finally:
            if threads > 1:
                torch.set_num_threads(threads)

    def _fetch(self, request: BatchRequest) -> tuple[Tensor | list[Tensor], Tensor]:
        idx = torch.tensor(request.indices, dtype=torch.int64)
        labels = self.dataset.labels[idx]
        if isinstance(self.dataset, InMemoryDataset):
            raw: Any = self.dataset.images[idx]
        else:
            raw = [self.dataset.load(i) for i in request.indices]
        if not self.transform.train:  # deterministic: every view is the same image
            x = self.transform(raw, idx, self.seed, request.epoch, 0)
            return ([x] * self.views if self.views > 1 else x), labels
        xs = [self.transform(raw, idx, self.seed, request.epoch, v) for v in range(self.views)]
        return (xs if self.views > 1 else xs[0]), labels


def _identity(batch: Any) -> Any:
    return batch


def _augment_spec(cfg: dict, recipe: Recipe) -> AugmentSpec:
    aug = cfg["augment"]
    return AugmentSpec(
        random_resized_crop=recipe.random_resized_crop,
        scale=recipe.scale,
        ratio=recipe.ratio,
        crop_padding=recipe.crop_padding,
        hflip=recipe.hflip,
        randaugment_n=int(aug["randaugment_n"]),
        randaugment_m=float(aug["randaugment_m"]),
        random_erasing=float(aug["random_erasing"]),
    )


def build_loader(
    cfg: dict | None,
    split: str,
    *,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
    views: int = 1,
) -> tuple[DataLoader, DatasetInfo]:
    """A ``DataLoader`` of ``(float32 NCHW normalised images, int64 labels)`` for ``split`` and its info.

    Train: shuffled by a ``SeededBatchSampler`` (``loader.sampler.set_epoch(e)``
    reshuffles and reseeds augmentation), augmented, last partial batch
    dropped. Val: in order, unaugmented, nothing dropped. With ``views > 1``
    each batch is ``([V image tensors], labels)``, every view augmented
    independently. Everything random is a function of ``(seed, epoch, index,
    view)``, so the stream is identical across restarts, worker counts and
    processes; with ``world_size > 1`` ranks get disjoint shards.
    """
    if views < 1:
        raise ValueError(f"views must be >= 1, got {views}")
    cfg = resolve_data_config(cfg)
    dataset, info = build_dataset(cfg, split)
    train = split == "train"
    recipe = Recipe(**info.recipe)
    transform = BatchTransform(
        train=train,
        image_size=recipe.image_size,
        mean=recipe.mean,
        std=recipe.std,
        augment=_augment_spec(cfg, recipe),
        eval_crop_fraction=recipe.eval_crop_fraction,
    )
    batch_size = cfg["batch_size"] if train else cfg["eval_batch_size"]
    sampler = SeededBatchSampler(
        len(dataset), batch_size, shuffle=train, drop_last=train, seed=seed, rank=rank, world_size=world_size
    )
    if len(sampler) == 0:
        raise ValueError(
            f"data: the {split} split has {sampler.per_rank} samples per rank, fewer than data.batch_size="
            f"{batch_size}, so no full batch exists; lower data.batch_size or raise data.train_subset"
        )
    workers = cfg["workers"]
    loader = DataLoader(
        BatchFetcher(dataset, transform, seed, views),
        batch_size=None,  # the sampler yields whole batches
        sampler=sampler,
        collate_fn=_identity,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.device(device).type == "cuda",
        # the loader draws a base seed per epoch; from its own generator, never the global RNG a
        # resumed training run must not see disturbed (nothing here uses worker seeds anyway)
        generator=torch.Generator().manual_seed(seed),
    )
    return loader, info


def first_images(cfg: dict | None, split: str, n: int) -> tuple[Tensor, DatasetInfo]:
    """The first ``n`` images of ``split``, in order and prepared as evaluation prepares them (no augmentation).

    For benchmarks on real images: the same ``n`` images on every call. ``split`` "val" or "holdout" (a
    training split would be augmented and shuffled: refused). Fewer than ``n`` images there is an error that
    says how many there are.
    """
    if split == "train":
        raise ValueError("first_images reads an evaluation split ('val' or 'holdout'), not 'train'")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    loader, info = build_loader({**(cfg or {}), "workers": 0}, split, seed=0)
    parts, have = [], 0
    for x, _ in loader:
        parts.append(x)
        have += x.shape[0]
        if have >= n:
            break
    if have < n:
        raise ValueError(f"the {split} split of {info.name} holds {have} images, fewer than the {n} asked for")
    return torch.cat(parts)[:n], info
