"""Image folders get a recipe measured from their data; at 28 px they load and train like the IDX loader."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dsnet.data import build_dataset, build_loader
from dsnet.data.datasets import make_synthetic
from dsnet.data.loader import DEBIAN_FASHION_MNIST
from dsnet.data.recipe import SAMPLE_SIZE, describe_recipe, with_recorded_recipe
from dsnet.models import create_model

FMNIST_STATS = {"mean": [0.2860], "std": [0.3530]}


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def _write_two_ways(
    root: Path,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    val_images: torch.Tensor,
    val_labels: torch.Tensor,
) -> tuple[Path, Path]:
    """The same 28 px greyscale images as Fashion-MNIST-style IDX files and as PNG class folders.

    Both in class order (the order an image folder lists them in), so sample
    ``i`` is the same image in both and gets the same random augmentation.
    """
    idx_dir, folder = root / "idx", root / "png"
    idx_dir.mkdir(parents=True)
    for split, prefix, x, y in (
        ("train", "train", train_images, train_labels),
        ("val", "t10k", val_images, val_labels),
    ):
        order = torch.argsort(y * len(y) + torch.arange(len(y)))  # by class, stable
        images, labels = x[order].numpy(), y[order].numpy()
        _write_idx(idx_dir / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(idx_dir / f"{prefix}-labels-idx1-ubyte.gz", labels)
        for i, (image, label) in enumerate(zip(images, labels)):
            d = folder / split / f"class_{label}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image, "L").save(d / f"{i:05d}.png")
    return idx_dir, folder


def same_images_two_ways(root: Path, n_train: int, n_val: int) -> tuple[Path, Path]:
    """Synthetic 28 px images, written both ways."""
    train = make_synthetic(10, n_train, 1, 28, seed=5, split="train")
    val = make_synthetic(10, n_val, 1, 28, seed=5, split="val")
    return _write_two_ways(root, train.images[:, 0], train.labels, val.images[:, 0], val.labels)


@pytest.fixture(scope="module")
def two_ways(tmp_path_factory):
    return same_images_two_ways(tmp_path_factory.mktemp("two_ways"), n_train=300, n_val=100)


def _cfgs(two_ways, **extra) -> tuple[dict, dict]:
    idx_dir, folder = two_ways
    common = {"workers": 0, "batch_size": 50, "eval_batch_size": 100, **extra}
    return {"dataset": "fashion_mnist", "root": str(idx_dir), **common}, {
        "dataset": "imagefolder",
        "root": str(folder),
        **common,
    }


def test_small_greyscale_folder_gets_a_small_image_recipe(two_ways):
    _, folder_cfg = _cfgs(two_ways)
    ds, info = build_dataset(folder_cfg, "train")
    r = info.recipe
    assert (info.image_size, info.in_chans, r["native_size"]) == (28, 1, 28)
    assert not r["random_resized_crop"] and r["crop_padding"] == 2 and r["eval_crop_fraction"] == 1.0
    assert not r["hflip"]  # flips are opt-in for image folders (data.augment.hflip: true)
    # mean/std: those of a fixed sample of SAMPLE_SIZE training images (the same sample for val)
    sample = np.stack([np.asarray(Image.open(p)) for p, _ in ds.samples]).astype(np.float64) / 255
    sampled = min(SAMPLE_SIZE, len(ds))
    assert f"measured on {sampled} training images" in r["source"]
    assert abs(r["mean"][0] - sample.mean()) < 0.01 and abs(r["std"][0] - sample.std()) < 0.01
    assert build_dataset(folder_cfg, "val")[1].recipe == r  # val is normalised with the training statistics
    x, _ = ds[0]
    assert x.shape == (1, 28, 28)  # greyscale stays one channel
    line = describe_recipe(r)
    assert "28 px, 1 channel" in line and "2 px zero padding" in line and "eval: images as they are" in line
    assert "no horizontal flip (image folder: flips are opt-in, data.augment.hflip=true)" in line


def test_large_rgb_folder_gets_scaled_random_resized_crops(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(3):
                w = 128 + 32 * i  # shorter side 128 for every image
                Image.fromarray(rng.integers(0, 256, (128, w, 3), dtype=np.uint8)).save(d / f"{i}.jpg")
    cfg = {"dataset": "imagefolder", "root": str(tmp_path), "workers": 0, "batch_size": 4}
    _, info = build_dataset(cfg, "train")
    r = info.recipe
    assert (r["image_size"], r["channels"], r["native_size"]) == (128, 3, 128)
    assert r["random_resized_crop"] and r["scale"] == (0.25, 1.0) and r["eval_crop_fraction"] == 0.875
    assert 0.4 < r["mean"][0] < 0.6 and 0.2 < r["std"][0] < 0.4  # uniform noise: 0.5 and ~0.29
    x, _ = next(iter(build_loader(cfg, "train")[0]))
    assert x.shape == (4, 3, 128, 128)
    # explicit keys override what was measured
    over = {**cfg, "channels": 1, "mean": [0.5], "std": [0.25], "image_size": 64, "augment": {"scale": [0.5, 1.0]}}
    ds, info = build_dataset(over, "val")
    r = info.recipe
    assert (info.in_chans, info.image_size, r["mean"], r["std"], r["scale"]) == (1, 64, (0.5,), (0.25,), (0.5, 1.0))
    assert ds[0][0].shape[0] == 1 and "configured" in r["source"]
    x, _ = next(iter(build_loader(over, "val")[0]))
    assert x.shape[1:] == (1, 64, 64)
    with pytest.raises(ValueError, match=r"data\.mean: 2 values for 1-channel images"):
        build_dataset({**over, "mean": [0.5, 0.5]}, "train")


def test_image_folder_batches_equal_idx_batches(two_ways):
    """The same images as PNG folders and as IDX files give the same batches (same normalisation pinned, and
    the folder opted in to Fashion-MNIST's flips)."""
    idx_cfg, folder_cfg = _cfgs(two_ways, **FMNIST_STATS, augment={"hflip": True})
    for split in ("train", "val"):
        a, ia = build_loader(idx_cfg, split, seed=3)
        b, ib = build_loader(folder_cfg, split, seed=3)
        assert (ia.image_size, ia.in_chans, ia.mean) == (ib.image_size, ib.in_chans, ib.mean)
        for (xa, ya), (xb, yb), _ in zip(a, b, range(3)):
            assert torch.equal(ya, yb) and torch.equal(xa, xb), split


def _tiny_training(cfg: dict, epochs: int = 2) -> float:
    """Top-1 (%) of ds_resnet8_tiny's widest routed sub-network after a few plain SGD steps, BN recalibrated."""
    from dsnet.train.bn_calibration import calibrate_bn

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: extra threads only contend on a shared machine
    try:
        torch.manual_seed(0)
        loader, info = build_loader(cfg, "train", seed=0)
        model = create_model("ds_resnet8_tiny", num_classes=info.num_classes, in_chans=info.in_chans)
        widest = model.routing_space[-1]
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
        for epoch in range(epochs):
            model.train()
            loader.sampler.set_epoch(epoch)
            for x, y in loader:
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x, subnet=widest), y).backward()
                opt.step()
        calibrate_bn(model, loader, 6, subnets=[widest], progress=False)
        model.eval()
        val, val_info = build_loader(cfg, "val")
        with torch.inference_mode():
            hits = sum((model(x, subnet=widest).argmax(1) == y).sum().item() for x, y in val)
        return 100.0 * hits / val_info.num_samples
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason=f"{DEBIAN_FASHION_MNIST} absent (dataset-fashion-mnist)")
def test_image_folder_trains_like_the_idx_loader(tmp_path):
    """1,000 Fashion-MNIST images as IDX files and as PNG folders, each loader with its default recipe.

    The folder's recipe is measured (28 px, 1 channel, mean/std of a sample,
    2 px padding crops), the IDX loader's is Fashion-MNIST's: the same
    accuracy within noise. (The ImageNet recipe image folders used to get,
    random resized crops down to 8 % of a 28 px image, does far worse.)
    """
    real = {"dataset": "fashion_mnist", "train_subset": 1000, "val_subset": 500}
    train, _ = build_dataset(real, "train")
    val, _ = build_dataset(real, "val")
    idx_dir, folder = _write_two_ways(tmp_path, train.images[:, 0], train.labels, val.images[:, 0], val.labels)
    common = {"workers": 0, "batch_size": 50, "eval_batch_size": 100}
    idx_cfg = {"dataset": "fashion_mnist", "root": str(idx_dir), **common}
    folder_cfg = {"dataset": "imagefolder", "root": str(folder), **common}
    recipe = build_dataset(folder_cfg, "train")[1].recipe
    assert abs(recipe["mean"][0] - 0.2860) < 0.02 and abs(recipe["std"][0] - 0.3530) < 0.02
    idx_acc, folder_acc = _tiny_training(idx_cfg), _tiny_training(folder_cfg)
    assert idx_acc > 30 and folder_acc > 30, (idx_acc, folder_acc)  # 40 steps; chance is 10 %
    assert abs(idx_acc - folder_acc) <= 4.0, (idx_acc, folder_acc)  # 500 val images: ~2.2 points binomial std


def test_recorded_recipe_is_reused_when_the_folder_changes(tmp_path):
    _, folder = same_images_two_ways(tmp_path, n_train=40, n_val=20)
    cfg = {"dataset": "imagefolder", "root": str(folder), "workers": 0}
    _, info = build_dataset(cfg, "train")
    for p in sorted((folder / "train").rglob("*.png"))[:20]:  # the folder changes after training
        Image.fromarray(np.full((28, 28), 255, dtype=np.uint8), "L").save(p)
    assert build_dataset(cfg, "val")[1].recipe["mean"] != info.recipe["mean"]
    record = {"name": info.name, "recipe": info.recipe}
    pinned = with_recorded_recipe(cfg, record)
    assert build_dataset(pinned, "val")[1].recipe["mean"] == info.recipe["mean"]
    explicit = with_recorded_recipe({**cfg, "mean": [0.1]}, record)  # explicit keys still win
    assert explicit["mean"] == [0.1] and explicit["std"] == list(info.recipe["std"])
    assert with_recorded_recipe({"dataset": "mnist"}, record) == {"dataset": "mnist"}  # another dataset's record
