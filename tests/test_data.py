"""dsnet.data: file formats, downloads (offline), transforms, determinism and sharding of the loaders.

(No ``torch.testing.assert_close`` here: its first call costs ~5 s of imports on this machine.)
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from dsnet.data import DATA_DEFAULTS, DatasetInfo, build_dataset, build_loader, resolve_data_config
from dsnet.data import download as dl
from dsnet.data.datasets import read_idx
from dsnet.data.loader import DEBIAN_FASHION_MNIST
from dsnet.data.transforms import (
    RANDAUGMENT_OPS,
    AugmentSpec,
    BatchTransform,
    apply_randaugment_op,
    random_resized_crop_boxes,
    sample_uniforms,
)

HEAVY_AUG = {"randaugment_n": 2, "randaugment_m": 9, "random_erasing": 0.5, "hflip": True}


@pytest.fixture(autouse=True)
def _whole_training_split(monkeypatch):
    """These tests check how datasets are read: ``data.holdout: null`` holds out nothing here (tests/test_holdout.py
    covers the default 10% slice)."""
    import dsnet.data.loader

    monkeypatch.setattr(dsnet.data.loader, "AUTO_HOLDOUT_FRACTION", 0.0)


def synthetic_cfg(**over) -> dict:
    cfg = {"dataset": "synthetic", "workers": 0, "batch_size": 32, "eval_batch_size": 50}
    cfg["synthetic"] = {"num_train": 128, "num_val": 100, "image_size": 16, "channels": 3, "num_classes": 4}
    cfg["synthetic"].update(over.pop("synthetic", {}))
    cfg.update(over)
    return cfg


# ---------------------------------------------------------------------------------------------------- fixtures
def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def make_mnist_dir(root: Path, n_train: int = 12, n_test: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    out = None
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
        out = out or (images, labels)
    return out


def make_cifar_dir(root: Path, fine: bool, n: int = 4) -> dict[str, tuple[np.ndarray, list[int]]]:
    """A miniature cifar-10-batches-py / cifar-100-python folder, pickled like the real thing (bytes keys)."""
    rng = np.random.default_rng(1)
    folder = root / ("cifar-100-python" if fine else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    k = 100 if fine else 10
    files = ["train", "test"] if fine else [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]
    written = {}
    for name in files:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, k, size=n).tolist()
        key = b"fine_labels" if fine else b"labels"
        batch = {b"data": data, key: labels, b"batch_label": name.encode()}
        if fine:
            batch[b"coarse_labels"] = [y // 5 for y in labels]
        (folder / name).write_bytes(pickle.dumps(batch))
        written[name] = (data, labels)
    if fine:
        meta = {b"fine_label_names": [f"f{i}".encode() for i in range(100)], b"coarse_label_names": [b"c"] * 20}
        (folder / "meta").write_bytes(pickle.dumps(meta))
    else:
        (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))
    return written


def make_image_folder(root: Path) -> None:
    rng = np.random.default_rng(2)
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("cat", "dog"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                h, w = int(rng.integers(20, 60)), int(rng.integers(20, 60))
                if i % 3 == 0:  # grayscale PNG: must come out RGB
                    Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L").save(d / f"{i}.png")
                else:
                    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"{i}.JPG", "JPEG")
            (d / "notes.txt").write_text("not an image")


# ---------------------------------------------------------------------------------------------------- IDX
def test_idx_round_trip(tmp_path):
    images, labels = make_mnist_dir(tmp_path)
    np.testing.assert_array_equal(read_idx(tmp_path / "train-images-idx3-ubyte.gz"), images)
    plain = write_idx(tmp_path / "plain-idx1-ubyte", labels, compress=False)
    np.testing.assert_array_equal(read_idx(plain), labels)
    ds, info = build_dataset({"dataset": "mnist", "root": str(tmp_path), "holdout": 0}, "train")
    expected = DatasetInfo("mnist", 10, 1, 28, (0.1307,), (0.3081,), [str(i) for i in range(10)], 12)
    assert dataclasses.replace(info, recipe={}) == expected
    assert info.recipe["crop_padding"] == 2 and not info.recipe["hflip"] and info.recipe["source"] == "MNIST statistics"
    x, y = ds[3]
    assert x.dtype == torch.uint8 and x.shape == (1, 28, 28) and y == labels[3]
    assert torch.equal(x[0], torch.from_numpy(images[3]))
    val, vinfo = build_dataset({"dataset": "mnist", "root": str(tmp_path)}, "val")
    assert len(val) == vinfo.num_samples == 6


def test_idx_corrupt_files_name_the_file(tmp_path):
    images, _ = make_mnist_dir(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-10]))  # truncated data
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz.*truncated"):
        build_dataset({"dataset": "mnist", "root": str(tmp_path)}, "train")
    path.write_bytes(gzip.compress(b"\x12\x34" + raw[2:]))  # bad magic
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz.*magic"):
        read_idx(path)
    path.write_bytes(gzip.compress(raw)[:100])  # truncated gzip stream
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz"):
        read_idx(path)
    write_idx(path, images[:5])  # fewer images than labels
    with pytest.raises(ValueError, match="5 images but .* 12 labels"):
        build_dataset({"dataset": "mnist", "root": str(tmp_path)}, "train")


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason=f"{DEBIAN_FASHION_MNIST} absent (dataset-fashion-mnist)")
def test_real_fashion_mnist():
    train, info = build_dataset({"dataset": "fashion_mnist"}, "train")  # default root finds the Debian package
    val, vinfo = build_dataset(None, "val")
    assert len(train) == info.num_samples == 60000 and len(val) == vinfo.num_samples == 10000
    assert info.num_classes == 10 and info.in_chans == 1 and info.image_size == 28
    assert info.class_names[0] == "T-shirt/top" and info.class_names[9] == "Ankle boot"
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert abs(train.images.float().mean().item() / 255 - info.mean[0]) < 0.01


# ---------------------------------------------------------------------------------------------------- CIFAR
@pytest.mark.parametrize("fine", [False, True], ids=["cifar10", "cifar100"])
def test_cifar_pickles(tmp_path, fine):
    written = make_cifar_dir(tmp_path, fine)
    name = "cifar100" if fine else "cifar10"
    folder = tmp_path / ("cifar-100-python" if fine else "cifar-10-batches-py")
    for root in (tmp_path, folder):  # the parent or the extracted folder itself
        train, info = build_dataset({"dataset": name, "root": str(root)}, "train")
        assert info.num_classes == (100 if fine else 10) and info.in_chans == 3 and info.image_size == 32
        assert len(train) == (4 if fine else 20)
        data, labels = written["train" if fine else "data_batch_1"]
        x, y = train[1]
        assert x.shape == (3, 32, 32) and y == labels[1]
        assert torch.equal(x, torch.from_numpy(data[1].reshape(3, 32, 32)))  # CHW, R plane first
    val, vinfo = build_dataset({"dataset": name, "root": str(tmp_path)}, "val")
    assert len(val) == 4 and vinfo.class_names[:2] == (["f0", "f1"] if fine else ["c0", "c1"])
    loader, _ = build_loader({"dataset": name, "root": str(tmp_path), "batch_size": 4, "workers": 0}, "train")
    x, y = next(iter(loader))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_cifar_corrupt_pickle(tmp_path):
    make_cifar_dir(tmp_path, fine=False)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="data_batch_3"):
        build_dataset({"dataset": "cifar10", "root": str(tmp_path)}, "train")


# ---------------------------------------------------------------------------------------------------- folders
def test_image_folder(tmp_path):
    make_image_folder(tmp_path)
    cfg = {"dataset": "imagenet", "root": str(tmp_path), "image_size": 24, "batch_size": 4, "workers": 0}
    train, info = build_dataset(cfg, "train")
    assert info.class_names == ["cat", "dog"] and len(train) == 6 and info.in_chans == 3
    x, y = train[0]
    assert x.dtype == torch.uint8 and x.shape[0] == 3  # grayscale PNG converted to RGB
    loader, info = build_loader({**cfg, "augment": HEAVY_AUG}, "train")
    xb, yb = next(iter(loader))
    assert xb.shape == (4, 3, 24, 24) and torch.isfinite(xb).all()
    val_loader, vinfo = build_loader(cfg, "val")
    batches = list(val_loader)
    assert vinfo.num_samples == 4 and sum(len(b[1]) for b in batches) == 4
    assert batches[0][0].shape[1:] == (3, 24, 24) and batches[0][1].tolist() == [0, 0, 1, 1]
    with pytest.raises(FileNotFoundError, match="--data DIR"):
        build_dataset({"dataset": "imagefolder"}, "train")


# ---------------------------------------------------------------------------------------------------- synthetic
def test_synthetic_is_learnable_with_easy_and_hard_samples():
    cfg = synthetic_cfg(synthetic={"num_train": 400, "num_val": 400, "channels": 1, "num_classes": 10})
    train, info = build_dataset(cfg, "train")
    val, _ = build_dataset(cfg, "val")
    assert info.num_classes == 10 and info.in_chans == 1 and len(train) == 400 and len(val) == 400
    assert not torch.equal(train.images[:10], val.images[:10])
    # nearest class mean: a trivially learnable problem, but not a solved one
    means = torch.stack([train.images[train.labels == k].float().mean(0) for k in range(10)]).flatten(1)
    dist = torch.cdist(val.images.float().flatten(1), means)
    correct = dist.argmin(1) == val.labels
    assert correct.float().mean() > 0.75
    hard = val.difficulty > val.difficulty.quantile(0.9)
    assert correct[~hard].float().mean() > correct[hard].float().mean() + 0.2
    again, _ = build_dataset(cfg, "val")
    assert torch.equal(again.images, val.images)  # seeded


# ---------------------------------------------------------------------------------------------------- determinism
def _epoch(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return list(loader)


def test_loaders_are_deterministic():
    cfg = synthetic_cfg(augment=HEAVY_AUG)
    a, _ = build_loader(cfg, "train", seed=3)
    b, _ = build_loader(cfg, "train", seed=3)
    state = torch.get_rng_state()
    ea, eb = _epoch(a, 1), _epoch(b, 1)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG of the training run is left alone
    assert len(ea) == 4
    for (xa, ya), (xb, yb) in zip(ea, eb):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    e2 = _epoch(a, 2)
    assert a.sampler.indices() != b.sampler.indices()  # a is at epoch 2, b at 1
    assert not torch.equal(torch.cat([y for _, y in e2]), torch.cat([y for _, y in ea]))
    c, _ = build_loader(cfg, "train", seed=4)
    assert not torch.equal(_epoch(c, 1)[0][0], ea[0][0])


def test_sample_augmentation_is_independent_of_batching_and_workers():
    cfg = synthetic_cfg(augment=HEAVY_AUG)
    small, _ = build_loader({**cfg, "batch_size": 8}, "train", seed=1)
    large, _ = build_loader({**cfg, "batch_size": 64, "workers": 2}, "train", seed=1)

    def by_index(loader):
        loader.sampler.set_epoch(5)
        out = {}
        for req, (x, _) in zip(loader.sampler, loader):
            out.update({i: x[j] for j, i in enumerate(req.indices)})
        return out

    s, l = by_index(small), by_index(large)
    assert set(s) == set(l) == set(range(128))
    for i in range(128):
        assert (s[i] - l[i]).abs().max() <= 1e-6, i


def test_ranks_get_disjoint_covering_shards():
    cfg = synthetic_cfg(batch_size=16)
    seen = []
    for rank in (0, 1):
        loader, _ = build_loader(cfg, "train", seed=7, rank=rank, world_size=2)
        loader.sampler.set_epoch(3)
        seen.append([i for req in loader.sampler for i in req.indices])
        assert len(loader) == 4
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(128))
    # padded to equal length when the data does not split evenly (as DistributedSampler)
    val = [build_loader(synthetic_cfg(synthetic={"num_val": 5}), "val", rank=r, world_size=2)[0] for r in (0, 1)]
    shards = [v.sampler.indices() for v in val]
    assert len(shards[0]) == len(shards[1]) == 3 and set(shards[0] + shards[1]) == set(range(5))
    with pytest.raises(ValueError, match="rank"):
        build_loader(cfg, "train", rank=2, world_size=2)


def test_views_are_independent_augmentations():
    cfg = synthetic_cfg(augment=HEAVY_AUG)
    multi, _ = build_loader(cfg, "train", seed=2, views=2)
    single, _ = build_loader(cfg, "train", seed=2)
    (v0, v1), y = next(iter(multi))
    x, y1 = next(iter(single))
    assert v0.shape == v1.shape == (32, 3, 16, 16) and torch.equal(y, y1)
    assert torch.equal(v0, x)  # view 0 is the single-view stream
    differs = (v0 - v1).flatten(1).abs().amax(1) > 1e-3
    assert differs.float().mean() > 0.9
    val, _ = build_loader(cfg, "val", views=2)
    (a, b), _ = next(iter(val))
    assert torch.equal(a, b)


def test_train_and_val_loader_semantics():
    cfg = synthetic_cfg(synthetic={"num_train": 100, "num_val": 100}, batch_size=32)
    train, info = build_loader(cfg, "train")
    val, _ = build_loader(cfg, "val")
    assert len(train) == 3 and sum(len(y) for _, y in train) == 96  # drop_last
    ys = torch.cat([y for _, y in val])
    assert len(val) == 2 and torch.equal(ys, build_dataset(cfg, "val")[0].labels)  # ordered, nothing dropped
    x, _ = next(iter(val))
    assert x.dtype == torch.float32 and x.shape == (50, 3, 16, 16) and abs(x.mean().item()) < 0.5
    sub, sinfo = build_loader({**cfg, "train_subset": 64}, "train")
    assert sinfo.num_samples == 64 and len(sub) == 2
    assert torch.equal(build_dataset({**cfg, "train_subset": 64}, "train")[0].images, sub.dataset.dataset.images)
    with pytest.raises(ValueError, match="batch_size"):
        build_loader({**cfg, "train_subset": 8}, "train")
    up, uinfo = build_loader({**cfg, "image_size": 24}, "val")
    assert uinfo.image_size == 24 and next(iter(up))[0].shape[-1] == 24


# ---------------------------------------------------------------------------------------------------- transforms
def test_uniforms_are_per_sample_pure_functions():
    u = sample_uniforms(0, 1, [5, 6, 7], 0, 8)
    assert u.shape == (3, 8) and ((u >= 0) & (u < 1)).all()
    assert torch.equal(sample_uniforms(0, 1, [7], 0, 8)[0], u[2])
    for other in (sample_uniforms(1, 1, [5], 0, 8), sample_uniforms(0, 2, [5], 0, 8), sample_uniforms(0, 1, [5], 1, 8)):
        assert not torch.equal(other[0], u[0])
    big = sample_uniforms(0, 0, range(20000), 0, 2)
    assert abs(big.mean().item() - 0.5) < 0.01


def test_random_resized_crop_boxes_fit():
    u = sample_uniforms(0, 0, range(500), 0, 40)
    boxes = random_resized_crop_boxes(u, 30, 50, (0.08, 1.0), (0.75, 4 / 3))
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 30).all() and (left + w <= 50).all()
    assert (h > 0).all() and (w > 0).all()
    area = (h * w).float() / 1500
    assert area.min() < 0.2 and area.max() > 0.6  # at most 40x30 = 0.8 fits the ratio range
    # a crop that never fits falls back to the (ratio-clamped) centre crop
    fb = random_resized_crop_boxes(u[:3], 10, 100, (0.9, 1.0), (1.0, 1.0))
    assert fb.tolist() == [[0, 45, 10, 10]] * 3


@pytest.mark.parametrize("op", RANDAUGMENT_OPS)
def test_randaugment_ops(op):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 12, 10, generator=g)
    out = apply_randaugment_op(op, x.clone(), torch.full((4,), 0.9, dtype=torch.float64), torch.tensor([1.0, -1.0] * 2))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    if op == "identity":
        assert torch.equal(out, x)
    elif op != "color" or x.shape[1] == 3:
        assert not torch.allclose(out, x)


def test_equalize_matches_pil():
    g = torch.Generator().manual_seed(0)
    img = (torch.rand(1, 1, 16, 16, generator=g) ** 3 * 200).round() / 255
    ours = (apply_randaugment_op("equalize", img, torch.zeros(1), torch.ones(1)) * 255).round().to(torch.uint8)
    pil = ImageOps.equalize(Image.fromarray((img[0, 0] * 255).round().to(torch.uint8).numpy(), "L"))
    np.testing.assert_array_equal(ours[0, 0].numpy(), np.asarray(pil))


# ---------------------------------------------------------------------------------------------------- config
def test_config_defaults_and_validation():
    resolved = resolve_data_config(None)
    assert set(resolved) == set(DATA_DEFAULTS) and resolved["dataset"] == "fashion_mnist"
    assert resolve_data_config(resolved) == resolved
    assert resolve_data_config({"dataset": "CIFAR-10"})["dataset"] == "cifar10"
    merged = resolve_data_config({"augment": {"hflip": False}})
    assert merged["augment"]["hflip"] is False and merged["augment"]["scale"] is None  # None: the data's recipe
    assert resolve_data_config({"download": "AUTO"})["download"] == "auto" and resolved["download"] == "auto"
    assert resolve_data_config({"mean": [0.5], "std": [1], "eval_crop_fraction": 1})["std"] == [1]
    cases = [
        ({"augment": {"hflpi": True}}, r"data\.augment\.hflpi: unknown key; known: .*hflip"),
        ({"batchsize": 3}, r"data\.batchsize: unknown key"),
        ({"batch_size": "64"}, r"data\.batch_size: expected int"),
        ({"batch_size": True}, r"data\.batch_size"),
        ({"batch_size": 0}, r"data\.batch_size: must be in \[1, inf\), got 0"),
        ({"augment": {"scale": [0.5]}}, r"data\.augment\.scale: expected a list of 2 numbers"),
        ({"augment": {"random_erasing": 2}}, r"data\.augment\.random_erasing"),
        ({"augment": 3}, r"data\.augment: expected a mapping"),
        ({"synthetic": {"channels": 1.5}}, r"data\.synthetic\.channels"),
        ({"dataset": "svhn"}, r"data\.dataset: must be one of fashion_mnist, .*, got 'svhn'"),
        ({"download": "sometimes"}, r"data\.download: must be one of auto, True, False"),
        ({"channels": 2}, r"data\.channels: must be 1 or 3"),
        ({"mean": 0.5}, r"data\.mean: expected a list of numbers"),
        ({"std": [0.2, 0.0, 0.1]}, r"data\.std: every value must be in \(0, inf\)"),
        ({"eval_crop_fraction": 1.5}, r"data\.eval_crop_fraction: must be in \(0, 1\]"),
    ]
    for cfg, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            resolve_data_config(cfg)
    with pytest.raises(ValueError, match="split"):
        build_dataset(synthetic_cfg(), "test")


def test_missing_data_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("DSNET_DATA", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError) as e:
        build_dataset({"dataset": "cifar10", "root": str(tmp_path / "nowhere")}, "train")
    msg = str(e.value)
    assert "cifar-10-batches-py" in msg and "data.download=true" in msg and "--data DIR" in msg
    with pytest.raises(FileNotFoundError) as e:
        build_dataset({"dataset": "fashion_mnist", "root": str(tmp_path)}, "val")
    msg = str(e.value)
    assert "t10k-images-idx3-ubyte.gz" in msg and "apt-get install dataset-fashion-mnist" in msg


# ---------------------------------------------------------------------------------------------------- downloads
def test_checksum_verification(tmp_path):
    src = tmp_path / "payload.bin"
    src.write_bytes(b"dsnet" * 1000)
    good = dl.md5sum(src)
    dl.verify_md5(src, good)
    with pytest.raises(ValueError, match="payload.bin: md5 checksum mismatch"):
        dl.verify_md5(src, "0" * 32)
    dest = tmp_path / "out" / "payload.bin"
    with pytest.raises(ValueError, match="md5 checksum mismatch"):
        dl.download_file(src.as_uri(), dest, "0" * 32)
    assert not dest.exists() and not list(dest.parent.iterdir())  # nothing half-written left behind
    assert dl.download_file(src.as_uri(), dest, good).read_bytes() == src.read_bytes()


def test_download_and_extract_offline(tmp_path, monkeypatch):
    """The whole data.download=true path, with a local file:// mirror standing in for the official host."""
    make_cifar_dir(tmp_path / "src", fine=False)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "cifar-10-python.tar.gz").write_bytes(buf.getvalue())
    md5 = dl.md5sum(mirror / "cifar-10-python.tar.gz")
    _, files, folder = dl.RESOURCES["cifar10"]
    assert files[0][1] == "c58f30108f718f92721af3b95e74349a"  # the official archive's checksum
    monkeypatch.setitem(dl.RESOURCES, "cifar10", ((mirror.as_uri() + "/",), [(files[0][0], md5)], folder))
    root = tmp_path / "data"
    ds, info = build_dataset({"dataset": "cifar10", "root": str(root), "download": True}, "train")
    assert len(ds) == 20 and (root / "cifar-10-batches-py" / "data_batch_5").is_file()
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py"]  # archive and temp dirs gone
    monkeypatch.setitem(dl.RESOURCES, "cifar10", ((mirror.as_uri() + "/",), [(files[0][0], "0" * 32)], folder))
    with pytest.raises(FileNotFoundError, match="downloading into .* failed: file:.*md5 checksum mismatch"):
        build_dataset({"dataset": "cifar10", "root": str(tmp_path / "other"), "download": True}, "train")
    assert not (tmp_path / "other" / "cifar-10-batches-py").exists()


def test_geometry_of_tensor_crops():
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (16, 2, 12, 12), dtype=torch.uint8, generator=g)
    idx = torch.arange(16)
    mean, std = (0.0, 0.0), (1.0, 1.0)
    pad = BatchTransform(train=True, image_size=12, mean=mean, std=std, augment=AugmentSpec(crop_padding=2))
    out = (pad(batch, idx, seed=0, epoch=0, view=0) * 255).round().to(torch.uint8)
    padded = torch.nn.functional.pad(batch, (2, 2, 2, 2))
    shifts = set()
    for i in range(16):  # every output is one of the 25 crops of the zero-padded image
        crops = {(dy, dx): padded[i, :, dy : dy + 12, dx : dx + 12] for dy in range(5) for dx in range(5)}
        match = [k for k, crop in crops.items() if torch.equal(out[i], crop)]
        assert match, i
        shifts.add(match[0])
    assert len(shifts) > 5
    full = AugmentSpec(random_resized_crop=True, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    rrc = BatchTransform(train=True, image_size=12, mean=mean, std=std, augment=full)
    assert (rrc(batch, idx, seed=0, epoch=0, view=0) * 255 - batch.float()).abs().max() < 1e-3  # whole image
    evaluate = BatchTransform(train=False, image_size=12, mean=mean, std=std)
    assert torch.equal(evaluate(batch, idx, seed=0, epoch=0, view=0), batch.float() / 255)


def test_holdout_is_carved_out_of_train_and_fixed_across_seeds():
    cfg = {"dataset": "synthetic", "synthetic": {"num_train": 100, "num_val": 20}, "holdout": 30}
    train, tinfo = build_dataset(cfg, "train")
    hold, hinfo = build_dataset(cfg, "holdout")
    full, _ = build_dataset({**cfg, "holdout": 0}, "train")
    assert (len(train), len(hold), tinfo.num_samples, hinfo.num_samples) == (70, 30, 70, 30)
    # disjoint, and together exactly the training split
    rows = {tuple(x.flatten().tolist()) for x in torch.cat([train.images, hold.images])}
    assert rows == {tuple(x.flatten().tolist()) for x in full.images} and len(rows) == 100
    # train_subset takes from what is left after the holdout; the holdout does not depend on it
    sub, _ = build_dataset({**cfg, "train_subset": 10}, "train")
    assert len(sub) == 10 and torch.equal(build_dataset({**cfg, "train_subset": 10}, "holdout")[0].images, hold.images)
    loader, _ = build_loader(cfg, "holdout")  # unaugmented and in order, like val
    assert torch.equal(torch.cat([y for _, y in loader]), hold.labels)
    with pytest.raises(ValueError, match="data.holdout is 0"):
        build_dataset({**cfg, "holdout": 0}, "holdout")
    with pytest.raises(ValueError, match="leaves no training images"):
        build_dataset({**cfg, "holdout": 100}, "train")


def test_first_images_are_the_evaluation_loaders_first_images_in_order():
    from dsnet.data import first_images

    cfg = synthetic_cfg()
    loader, _ = build_loader(cfg, "val", seed=0)
    everything = torch.cat([x for x, _ in loader])
    images, info = first_images(cfg, "val", 73)  # across the 50-image batches
    assert images.shape[0] == 73 and info.name == "synthetic"
    assert torch.equal(images, everything[:73])
    with pytest.raises(ValueError, match="holds 100 images, fewer than the 101"):
        first_images(cfg, "val", 101)
    with pytest.raises(ValueError, match="not 'train'"):
        first_images(cfg, "train", 8)
