"""Datasets: (Fashion-)MNIST IDX files, CIFAR-10/100 pickles, ImageNet-style folders, and a synthetic set.

Every dataset returns ``(image, label)`` with ``image`` a uint8 CHW tensor and
``label`` an int. The small datasets live in memory as one uint8 tensor
(``InMemoryDataset``) so that the loader can slice and augment whole batches at
once instead of paying per-sample Python and PIL overhead; image folders load
one PIL image at a time.
"""

from __future__ import annotations

import gzip
import os
import pickle
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "InMemoryDataset",
    "ImageFolderDataset",
    "read_idx",
    "load_idx_dataset",
    "load_cifar",
    "load_cifar_class_names",
    "make_synthetic",
    "FASHION_MNIST_CLASSES",
    "IMAGE_EXTENSIONS",
    "open_image",
    "image_header",
    "scan_image_folder",
]

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


class InMemoryDataset(Dataset):
    """Images held as one uint8 ``(N, C, H, W)`` tensor with int64 labels.

    ``difficulty`` (optional, per sample) is kept for the synthetic set, whose
    samples have a known noise level.
    """

    def __init__(
        self, images: Tensor, labels: Tensor, class_names: Sequence[str], difficulty: Tensor | None = None
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be a uint8 (N, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"{images.shape[0]} images but labels of shape {tuple(labels.shape)}")
        self.images = images.contiguous()
        self.labels = labels.to(torch.int64)
        self.class_names = list(class_names)
        self.difficulty = difficulty

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.labels[index])

    def subset(self, indices: Tensor) -> InMemoryDataset:
        diff = None if self.difficulty is None else self.difficulty[indices]
        return InMemoryDataset(self.images[indices], self.labels[indices], self.class_names, diff)


# ---------------------------------------------------------------------------------------------------- IDX
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4")}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an IDX file (gzip or plain), validating the magic number and the size.

    IDX: two zero bytes, a type code, the number of dimensions, one big-endian
    uint32 per dimension, then the data. A corrupt or truncated file raises
    ``ValueError`` naming the file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (EOFError, gzip.BadGzipFile, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{path}: not a readable (gzip) IDX file: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: bad IDX magic number {raw[:4].hex() or '(empty file)'}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, {ndim} dimensions)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: IDX header says shape {shape} ({expected} bytes of data) but the file holds "
            f"{len(raw) - header}; corrupt or truncated file"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def load_idx_dataset(folder: str | os.PathLike, split: str, class_names: Sequence[str]) -> InMemoryDataset:
    """``train-*`` / ``t10k-*`` images and labels from ``folder`` (``.gz`` or already unpacked)."""
    folder = Path(folder)
    prefix = "train" if split == "train" else "t10k"
    paths = []
    for kind in ("images-idx3-ubyte.gz", "labels-idx1-ubyte.gz"):
        p = _find_file(folder, f"{prefix}-{kind}")
        if p is None:
            raise FileNotFoundError(f"{folder / f'{prefix}-{kind}'} not found")
        paths.append(p)
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{paths[0]}: expected uint8 images of shape (N, H, W), got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise ValueError(f"{paths[1]}: expected uint8 labels of shape (N,), got {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{paths[0]} holds {len(images)} images but {paths[1]} holds {len(labels)} labels")
    if labels.size and int(labels.max()) >= len(class_names):
        raise ValueError(f"{paths[1]}: label {int(labels.max())} out of range for {len(class_names)} classes")
    x = torch.from_numpy(images.copy()).unsqueeze(1)  # copy: frombuffer views are read-only
    return InMemoryDataset(x, torch.from_numpy(labels.astype(np.int64)), class_names)


# ---------------------------------------------------------------------------------------------------- CIFAR
def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except FileNotFoundError:
        raise
    except Exception as e:  # truncated pickles raise EOFError / UnpicklingError / ...
        raise ValueError(f"{path}: not a readable CIFAR pickle: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def load_cifar_class_names(meta_file: Path, names_key: str) -> list[str]:
    """The class names in a CIFAR meta pickle (``batches.meta`` / ``meta``)."""
    meta = _unpickle(meta_file)
    if names_key not in meta:
        raise ValueError(f"{meta_file}: no {names_key!r} entry")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in meta[names_key]]


def load_cifar(folder: str | os.PathLike, split: str, fine: bool) -> InMemoryDataset:
    """CIFAR-10 (``fine=False``, ``cifar-10-batches-py/``) or CIFAR-100 (``fine=True``, ``cifar-100-python/``)."""
    folder = Path(folder)
    if fine:
        files = ["train"] if split == "train" else ["test"]
        label_key, meta_file, names_key = "fine_labels", "meta", "fine_label_names"
    else:
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        label_key, meta_file, names_key = "labels", "batches.meta", "label_names"
    class_names = load_cifar_class_names(folder / meta_file, names_key)
    xs, ys = [], []
    for name in files:
        batch = _unpickle(folder / name)
        if "data" not in batch or label_key not in batch:
            raise ValueError(f"{folder / name}: expected 'data' and {label_key!r} entries, found {sorted(batch)}")
        data = np.asarray(batch["data"], dtype=np.uint8)
        labels = np.asarray(batch[label_key], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
            raise ValueError(
                f"{folder / name}: expected data of shape (N, 3072) and N labels, got {data.shape} and {labels.shape}"
            )
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels)
    y = np.concatenate(ys)
    if y.size and (y.min() < 0 or y.max() >= len(class_names)):
        raise ValueError(f"{folder}: labels outside [0, {len(class_names)}) in {split} split")
    return InMemoryDataset(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(y), class_names)


# ---------------------------------------------------------------------------------------------------- folders
_WIDE_GREY = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})


def open_image(path: str | os.PathLike, mode: str | None = None, size: int | None = None) -> Image.Image:
    """The image at ``path``, decoded (converted to ``mode`` when given), or a one-line ``ValueError`` naming it.

    16-bit greyscale (PIL modes ``I;16*``, and ``I`` holding values above 255)
    is scaled to 8 bits (``v / 257``, rounded) before any conversion: PIL's own
    ``convert("L")`` clips it, which turns most 16-bit images white. Images
    over PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) are
    refused, not decoded. ``size``: images whose shorter side is larger are
    first downscaled, shorter side to ``size`` (JPEG decodes at reduced scale).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if size is not None and min(im.size) > size:
                    im.draft("L" if mode == "L" else "RGB", (size, size))  # JPEG: decode at reduced scale
                im = _to_8bit(im)
                if size is not None and min(im.size) > size:
                    w, h = im.size
                    f = size / min(w, h)
                    im = im.resize((max(size, round(w * f)), max(size, round(h * f))), Image.BILINEAR)
                return im.convert(mode) if mode is not None else im.copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"{path}: refused as a possible decompression bomb ({e})") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot decode image: {e}") from None


def image_header(path: str | os.PathLike) -> tuple[tuple[int, int], str]:
    """``(size, mode)`` of the image at ``path`` from its header, checked as :func:`open_image` checks it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return im.size, im.mode
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"{path}: refused as a possible decompression bomb ({e})") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot decode image: {e}") from None


def _to_8bit(im: Image.Image) -> Image.Image:
    """A 16-bit greyscale image scaled to 8 bits ("L"); any other image unchanged."""
    if im.mode not in _WIDE_GREY:
        return im
    a = np.asarray(im).astype(np.int64)
    if im.mode == "I" and (a.size == 0 or a.max() <= 255):  # 32-bit integer mode holding 8-bit values
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L")
    a = (np.clip(a, 0, 65535) * 255 + 32767) // 65535  # == round(v / 257)
    return Image.fromarray(a.astype(np.uint8), "L")


def _visible(name: str) -> bool:
    return not name.startswith(".")


def scan_image_folder(root: Path, classes: Sequence[str], allow_empty: bool = False) -> list[tuple[Path, int]]:
    """``(path, label)`` of every image under ``root/<class>/`` (sub-folders included, symlinks followed).

    A directory symlink that leads back into ``root`` (or to a folder the scan
    has already walked) would list images again under another path -- a loop
    hangs the scan, a link to a parent relabels every image -- so it is a
    ``ValueError`` naming the link. Links to folders outside ``root`` are
    followed. Unless ``allow_empty``, a class folder without images is an
    error naming it (the validation split may lack classes).
    """
    tree = os.path.realpath(root)
    seen: set[str] = set()
    samples: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        d = root / name
        if not d.is_dir():
            if not allow_empty:
                raise ValueError(f"{d}: class folder not found")
            continue
        start = len(samples)
        real = os.path.realpath(d)
        if real in seen or (d.is_symlink() and _loops(real, tree)):
            raise ValueError(
                f"{d}: class folder is a symlink to {real}, a folder listed already (or above it); "
                "its images would be counted twice"
            )
        seen.add(real)
        walked = []
        for dirpath, dirnames, filenames in os.walk(d, followlinks=True):
            for sub in dirnames:
                link = Path(dirpath) / sub
                target = os.path.realpath(link)
                if target in seen or (link.is_symlink() and _loops(target, tree)):
                    raise ValueError(
                        f"{link}: directory symlink back into the image folder ({target}); it would list images "
                        "again under another class or loop forever: remove it or point it outside the folder"
                    )
                seen.add(target)
            walked.append((dirpath, filenames))
        for dirpath, filenames in sorted(walked):
            for fn in sorted(filenames):
                if fn.lower().endswith(IMAGE_EXTENSIONS) and _visible(fn):
                    samples.append((Path(dirpath) / fn, label))
        if len(samples) == start and not allow_empty:
            raise ValueError(
                f"{d}: class folder {name!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                "add images or remove the folder"
            )
    return samples


def _loops(path: str, tree: str) -> bool:
    """Whether a folder at real path ``path`` is ``tree``, inside it, or above it."""
    return path == tree or path.startswith(tree + os.sep) or tree.startswith(path.rstrip(os.sep) + os.sep)


class ImageFolderDataset(Dataset):
    """``root/<class>/*.jpg|png|...`` loaded with PIL and converted to ``mode`` ("RGB" or "L", greyscale).

    ``classes`` fixes the class order (pass the training split's classes when
    building the validation split, so label ``i`` means the same class in both).
    Every class folder must hold images unless ``allow_empty_classes`` (the
    validation split); see :func:`scan_image_folder` for symlinks.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        classes: Sequence[str] | None = None,
        mode: str = "RGB",
        *,
        allow_empty_classes: bool = False,
    ) -> None:
        if mode not in ("RGB", "L"):
            raise ValueError(f"image mode must be 'RGB' or 'L', got {mode!r}")
        self.mode = mode
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: image folder not found")
        found = sorted(d.name for d in self.root.iterdir() if d.is_dir() and _visible(d.name))
        if classes is None:
            classes = found
        else:
            extra = sorted(set(found) - set(classes))
            if extra:
                raise ValueError(f"{self.root}: class folders {extra[:5]} are not among the training classes")
        self.class_names = list(classes)
        self.samples: list[tuple[Path, int]] = []
        if self.class_names:
            self.samples = scan_image_folder(self.root, self.class_names, allow_empty=allow_empty_classes)
        if not self.class_names or not self.samples:
            raise FileNotFoundError(
                f"{self.root}: no images found; expected {self.root}/<class>/*.jpg (or {', '.join(IMAGE_EXTENSIONS)})"
            )
        self.labels = torch.tensor([y for _, y in self.samples], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> Image.Image:
        return open_image(self.samples[index][0], self.mode)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return pil_to_tensor(self.load(index)), self.samples[index][1]

    def subset(self, indices: Tensor) -> ImageFolderDataset:
        out = object.__new__(ImageFolderDataset)
        out.root, out.class_names, out.mode = self.root, self.class_names, self.mode
        out.samples = [self.samples[i] for i in indices.tolist()]
        out.labels = self.labels[indices]
        return out


def pil_to_tensor(image: Image.Image) -> Tensor:
    """A PIL image as a uint8 CHW tensor."""
    a = np.asarray(image, dtype=np.uint8)
    if a.ndim == 2:
        a = a[:, :, None]
    return torch.from_numpy(a.copy()).permute(2, 0, 1).contiguous()


# ---------------------------------------------------------------------------------------------------- synthetic
def make_synthetic(
    num_classes: int, num_samples: int, channels: int, image_size: int, seed: int, split: str
) -> InMemoryDataset:
    """A learnable toy dataset with easy and hard samples.

    Each class has a fixed smooth random template (a coarse random grid,
    upsampled, so that small crops and shifts keep it recognisable) that
    depends only on ``seed``; train and val share the templates and differ in
    their samples. Each sample has a difficulty ``d`` in [0, 1) (``d = u**2``:
    most samples are easy): it is its class template blended with a random
    other class's template (weight ``0.45 d``) plus Gaussian noise (std
    ``0.3 + 2 d`` template stds). Easy samples are nearly clean; the hardest
    are close to ambiguous, the inputs dynamic routing should spend more
    compute on. ``difficulty`` holds ``d`` per sample.
    """
    g = torch.Generator().manual_seed(seed)
    coarse = max(2, image_size // 7)
    templates = torch.rand(num_classes, channels, coarse, coarse, generator=g) * 2 - 1
    templates = torch.nn.functional.interpolate(templates, size=(image_size, image_size), mode="bicubic")
    templates = templates / templates.flatten(1).std(dim=1).clamp_min(1e-6).view(-1, 1, 1, 1)
    g = torch.Generator().manual_seed(seed * 1_000_003 + (1 if split == "train" else 2))
    labels = torch.arange(num_samples) % num_classes
    labels = labels[torch.randperm(num_samples, generator=g)]
    difficulty = torch.rand(num_samples, generator=g) ** 2
    other = (labels + 1 + torch.randint(0, num_classes - 1, (num_samples,), generator=g)) % num_classes
    noise = torch.randn(num_samples, channels, image_size, image_size, generator=g)
    mix = (0.45 * difficulty).view(-1, 1, 1, 1)
    sigma = (0.3 + 2.0 * difficulty).view(-1, 1, 1, 1)
    x = 0.5 + 0.18 * ((1 - mix) * templates[labels] + mix * templates[other] + sigma * noise)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return InMemoryDataset(images, labels, [f"class_{i}" for i in range(num_classes)], difficulty=difficulty)
