"""A small image folder from Fashion-MNIST: the data a researcher brings, a few thousand labelled images.

Writes ``--train`` training images (the same number per class, drawn with ``--seed`` from the 60,000) and
``--test`` test images (from the 10,000 test images) as PNG files laid out as an image folder::

    OUT/train/<class>/<index>.png
    OUT/val/<class>/<index>.png

then the default recipe runs on it like on any user's folder (nothing set by hand), against the same widths
trained alone with the same steps::

    python benchmarks/small_folder.py --out /tmp/fm4000 --train 4000
    dsnet compare --data /tmp/fm4000 --methods dsnet,static,alone --seeds 3 --out runs/folder4000

(``dsnet compare`` holds out 10 % of the folder's training images for selection and reads ``val/`` once.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dsnet.data.datasets import FASHION_MNIST_CLASSES, load_idx_dataset
from dsnet.data.loader import DEBIAN_FASHION_MNIST


def balanced(labels: torch.Tensor, n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` indices, ``n // num_classes`` per class (the first classes get one more where it does not divide)."""
    per = [n // num_classes + (c < n % num_classes) for c in range(num_classes)]
    picks = [rng.permutation(np.flatnonzero(labels.numpy() == c))[:k] for c, k in enumerate(per)]
    return np.sort(np.concatenate(picks))


def folder_name(class_name: str) -> str:
    """A class name as one folder name ("T-shirt/top" -> "T-shirt-top")."""
    return class_name.replace("/", "-")


def write_split(ds, indices: np.ndarray, root: Path) -> None:  # noqa: ANN001
    for c in ds.class_names:
        (root / folder_name(c)).mkdir(parents=True, exist_ok=True)
    for i in indices:
        image = ds.images[int(i), 0].numpy()
        label = ds.class_names[int(ds.labels[int(i)])]
        Image.fromarray(image).save(root / folder_name(label) / f"{int(i):05d}.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="the image folder to write (must not exist)")
    p.add_argument("--train", type=int, default=4000, help="training images (balanced over the classes)")
    p.add_argument("--test", type=int, default=10000, help="test images (balanced; 10000: all of them)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--source", default=str(DEBIAN_FASHION_MNIST), help="a Fashion-MNIST folder (idx files)")
    args = p.parse_args()
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"{out} exists: give a new folder")
    rng = np.random.default_rng(args.seed)
    for split, n, sub in (("train", args.train, "train"), ("val", args.test, "val")):
        ds = load_idx_dataset(args.source, split, FASHION_MNIST_CLASSES)
        idx = balanced(ds.labels, min(n, len(ds)), len(ds.class_names), rng)
        write_split(ds, idx, out / sub)
        print(f"{out / sub}: {len(idx)} images, {len(ds.class_names)} classes")


if __name__ == "__main__":
    main()
