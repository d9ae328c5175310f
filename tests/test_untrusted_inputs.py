"""Untrusted files stay inert and data stays what it says (issue 24, items 2-9).

Image folders with symlink loops, 16-bit images, decompression bombs and
empty class folders; checkpoints evaluated, calibrated, gated or exported on
data of other classes; ``dsnet search`` outputs and targets checked before the
search; LC-Net checkpoints, wrong shapes, wrong dtypes and empty batches;
non-finite biases, duplicate YAML keys, empty method lists, and exports that
fail their check or shrink a bundle. Every bad input is one line and exit
code 2, before any work, with nothing earlier lost.
"""

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dsnet
from dsnet.compare.run import compare_config
from dsnet.data import build_dataset, check_class_names, dataset_class_names
from dsnet.data.datasets import ImageFolderDataset, open_image
from dsnet.search.pss import ProgressiveSearch, check_targets
from dsnet.train.checkpoint import FORMAT, save_checkpoint
from dsnet.train.config import ConfigError, load_config, resolve_config
from dsnet.utils.schema import load_yaml
from tests.test_errors import SETS, TINY, _read_only, assert_one_line
from tests.test_errors import run_cli as _run_cli


def run_cli(argv: list, capsys) -> tuple[int, list[str], str]:
    """``tests.test_errors.run_cli`` without the once-per-process warning of a busy machine (not the error)."""
    code, lines, out = _run_cli(argv, capsys)
    return code, [line for line in lines if "machine is oversubscribed" not in line], out


def _folder(root: Path, classes: dict[str, int], split: str = "train", size: int = 8, mode: str = "L") -> Path:
    """``root/split/<class>/<i>.png``: ``classes`` maps a class name to its number of images."""
    for c, (name, count) in enumerate(classes.items()):
        d = root / split / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            value = (40 * c + 25 * i) % 256
            Image.new(mode, (size, size), value if mode == "L" else (value, 0, 0)).save(d / f"{i}.png")
    return root


def _image_sets(root: Path) -> list[str]:
    return ["--set", "data.dataset=imagefolder", "--set", f"data.root={root}"]


# ------------------------------------------------------------------------------------------ 2, 3: symlink loops
def test_self_referencing_links_do_not_hang_and_name_the_link(tmp_path):
    root = _folder(tmp_path / "img", {"a": 2, "b": 2})
    os.symlink(".", root / "train" / "a" / "l1")
    os.symlink(".", root / "train" / "a" / "l2")
    with pytest.raises(ValueError, match=r"a/l1: directory symlink back into the image folder"):
        ImageFolderDataset(root / "train")


def test_link_to_a_parent_is_refused_instead_of_relabelling(tmp_path, capsys):
    root = _folder(tmp_path / "img", {"a": 3, "b": 3})
    _folder(root, {"a": 2, "b": 2}, split="val")
    os.symlink("..", root / "train" / "a" / "loop")
    out = tmp_path / "run"
    line = assert_one_line(run_cli(["train", "supernet", *SETS, *_image_sets(root), "--out", out], capsys))
    assert str(root / "train" / "a" / "loop") in line and "symlink" in line
    assert not out.exists() or not any(out.iterdir())


def test_links_out_of_the_tree_are_followed_like_copies(tmp_path):
    """A class folder (or sub-folder) linked from elsewhere lists the same images as a copy would."""
    outside = _folder(tmp_path / "store", {"extra": 3}) / "train" / "extra"
    linked = _folder(tmp_path / "linked", {"a": 2, "b": 2})
    os.symlink(outside, linked / "train" / "a" / "more")
    copied = _folder(tmp_path / "copied", {"a": 2, "b": 2})
    _folder(copied / "train" / "a", {"more": 3}, split="")
    a, b = ImageFolderDataset(linked / "train"), ImageFolderDataset(copied / "train")
    assert len(a) == len(b) == 7
    assert [p.relative_to(linked / "train") for p, _ in a.samples] == [
        p.relative_to(copied / "train") for p, _ in b.samples
    ]
    assert a.labels.tolist() == b.labels.tolist()


def test_two_classes_linked_to_one_folder_are_refused(tmp_path):
    root = _folder(tmp_path / "img", {"a": 2})
    os.symlink(root / "train" / "a", root / "train" / "b")
    with pytest.raises(ValueError, match="counted twice"):
        ImageFolderDataset(root / "train")


# ------------------------------------------------------------------------------------------ 4: 16-bit images
def test_16_bit_greyscale_reads_like_its_8_bit_version(tmp_path):
    rng = np.random.default_rng(0)
    for root in (tmp_path / "b8", tmp_path / "b16"):
        for split in ("train", "val"):
            for c in ("a", "b"):
                (root / split / c).mkdir(parents=True)
    for i in range(6):
        a = rng.integers(0, 256, (12, 12), dtype=np.uint8)
        c = "ab"[i % 2]
        for split in ("train", "val"):
            Image.fromarray(a).save(tmp_path / "b8" / split / c / f"{i}.png")
            Image.fromarray(a.astype(np.uint16) * 257).save(tmp_path / "b16" / split / c / f"{i}.png")
    assert Image.open(tmp_path / "b16" / "train" / "a" / "0.png").mode == "I;16"
    ds8, info8 = build_dataset({"dataset": "imagefolder", "root": str(tmp_path / "b8")}, "train")
    ds16, info16 = build_dataset({"dataset": "imagefolder", "root": str(tmp_path / "b16")}, "train")
    assert info16.in_chans == info8.in_chans == 1
    assert info16.mean == info8.mean and info16.std == info8.std  # not the near-white 0.998 / 0.043
    assert 0.3 < info16.mean[0] < 0.7
    for i in range(len(ds8)):
        assert torch.equal(ds16[i][0], ds8[i][0])


# ------------------------------------------------------------------------------------------ 8: decompression bombs
@pytest.mark.parametrize("side", [12, 16], ids=["warning", "error"])
def test_decompression_bombs_are_refused_naming_the_file(side, tmp_path, monkeypatch, capsys):
    """PIL warns above MAX_IMAGE_PIXELS and raises above twice that; both are one line naming the file."""
    root = _folder(tmp_path / "img", {"a": 2, "b": 2}, size=side)
    _folder(root, {"a": 1, "b": 1}, split="val", size=side)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    path = root / "train" / "a" / "0.png"
    with pytest.raises(ValueError, match=rf"{path}: refused as a possible decompression bomb"):
        open_image(path, "L")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning escapes either
        line = assert_one_line(
            run_cli(["train", "supernet", *SETS, *_image_sets(root), "--out", tmp_path / "r"], capsys)
        )
    assert "decompression bomb" in line and str(root / "train") in line


# ------------------------------------------------------------------------------------------ 9: empty class folders
def test_training_class_folder_without_images_is_an_error(tmp_path, capsys):
    root = _folder(tmp_path / "img", {"a": 3, "b": 3})
    _folder(root, {"a": 1, "b": 1}, split="val")
    (root / "train" / "c").mkdir()
    (root / "train" / "c" / "notes.txt").write_text("no images here")
    line = assert_one_line(run_cli(["train", "supernet", *SETS, *_image_sets(root), "--out", tmp_path / "r"], capsys))
    assert str(root / "train" / "c") in line and "holds no images" in line


def test_validation_split_may_lack_a_class(tmp_path):
    root = _folder(tmp_path / "img", {"a": 2, "b": 2, "c": 2})
    _folder(root, {"a": 1, "b": 1}, split="val")
    (root / "val" / "c").mkdir()
    ds, info = build_dataset({"dataset": "imagefolder", "root": str(root)}, "val")
    assert info.class_names == ["a", "b", "c"] and ds.labels.tolist() == [0, 1]


# ------------------------------------------------------------------------------------------ 5: class names
def _class_checkpoint(path: Path, root: Path, classes: list[str], **changes) -> Path:
    """An untrained 2-class greyscale supernet checkpoint recorded as trained on ``root`` with ``classes``."""
    sets = [*TINY, "data.dataset=imagefolder", f"data.root={root}", "data.batch_size=2", "data.eval_batch_size=2"]
    cfg = load_config(None, sets)
    model = dsnet.create_model("ds_resnet8_tiny", num_classes=2, in_chans=1)
    payload = {
        "format": FORMAT,
        "model": {"name": "ds_resnet8_tiny", "kwargs": {"num_classes": 2, "in_chans": 1}},
        "state_dict": model.state_dict(),
        "ema_state_dict": None,
        "epoch": 0,
        "config": cfg,
        "stage": "supernet",
        "bn_calibrated": True,
        "dataset": {"name": "imagefolder", "num_classes": len(classes), "class_names": classes},
        **changes,
    }
    torch.save(payload, path)
    return path


@pytest.fixture
def other_classes(tmp_path):
    trained = _folder(tmp_path / "abc", {"a": 2, "b": 2})
    _folder(trained, {"a": 1, "b": 1}, split="val")
    other = _folder(tmp_path / "xyz", {"x": 2, "y": 2})
    _folder(other, {"x": 1, "y": 1}, split="val")
    return trained, other, _class_checkpoint(tmp_path / "abc.ckpt", trained, ["a", "b"])


def test_eval_refuses_data_of_other_classes(other_classes, tmp_path, capsys):
    _, other, ckpt = other_classes
    line = assert_one_line(
        run_cli(["eval", "--checkpoint", ckpt, "--data", other, "--json", tmp_path / "r.json"], capsys)
    )
    assert "[a, b]" in line and "[x, y]" in line and str(ckpt) in line
    assert not (tmp_path / "r.json").exists()


def test_calibrate_bn_refuses_data_of_other_classes(other_classes, tmp_path, capsys):
    _, other, ckpt = other_classes
    before = ckpt.read_bytes()
    line = assert_one_line(run_cli(["calibrate-bn", "--checkpoint", ckpt, "--data", other], capsys))
    assert "[a, b]" in line and "[x, y]" in line
    assert ckpt.read_bytes() == before


def test_gate_training_refuses_data_of_other_classes(other_classes, tmp_path, capsys):
    _, other, ckpt = other_classes
    sets = [*SETS, *_image_sets(other), "--set", "data.batch_size=2", "--set", "data.eval_batch_size=2"]
    out = tmp_path / "gate"
    line = assert_one_line(run_cli(["train", "gate", *sets, "--supernet", ckpt, "--out", out], capsys))
    assert "[a, b]" in line and "[x, y]" in line
    assert not (out / "last.ckpt").exists()


def test_export_refuses_class_names_that_do_not_fit_the_model(tmp_path, capsys):
    ckpt = _class_checkpoint(tmp_path / "c.ckpt", tmp_path, ["a", "b", "c"])
    out = tmp_path / "m.onnx"
    line = assert_one_line(run_cli(["export", "--checkpoint", ckpt, "--subnet", "0", "--out", out], capsys))
    assert "3 classes (a, b, c)" in line and "2 outputs" in line
    assert not out.exists()


def test_class_name_check_passes_the_same_classes_and_names_reordered_ones(other_classes):
    trained, _, _ = other_classes
    cfg = {"dataset": "imagefolder", "root": str(trained)}
    assert dataset_class_names(cfg) == build_dataset(cfg, "val")[1].class_names == ["a", "b"]
    check_class_names({"class_names": ["a", "b"]}, ["a", "b"], "ckpt")
    check_class_names({}, ["x"], "old ckpt")  # nothing recorded: nothing to check
    with pytest.raises(ValueError, match="in another order"):
        check_class_names({"class_names": ["a", "b"]}, ["b", "a"], "ckpt")
    assert dataset_class_names({"dataset": "synthetic", "synthetic": {"num_classes": 3}}) == [
        f"class_{i}" for i in range(3)
    ]


# ------------------------------------------------------------------------------------------ 7, 8: search
SEARCH_DATA = {
    "dataset": "synthetic",
    "synthetic": {"num_train": 64, "num_val": 32, "image_size": 28},
    "batch_size": 16,
    "eval_batch_size": 32,
    "workers": 0,
    "holdout": 32,
}


class _Reached(Exception):
    """Raised in place of the search: the command got past its checks."""


@pytest.fixture
def search_env(tmp_path, monkeypatch):
    cfg = resolve_config({"model": {"name": "ds_resnet8_tiny"}, "data": SEARCH_DATA})
    spec = {"name": "ds_resnet8_tiny", "kwargs": {"num_classes": 10, "in_chans": 1}}
    model = dsnet.create_model(spec["name"], **spec["kwargs"])
    sup = save_checkpoint(tmp_path / "sup.ckpt", {"model": spec, "state_dict": model.state_dict(), "config": cfg})
    reached = []

    def fake_rank(self):
        reached.append(True)
        raise _Reached

    monkeypatch.setattr(ProgressiveSearch, "rank", fake_rank)
    return {"sup": sup, "cfg": cfg, "reached": reached, "tmp": tmp_path}


def _search(ckpt, out, *extra) -> list:
    return ["search", "--checkpoint", ckpt, "--out", out, "--no-progress", *extra]


def test_search_refuses_an_occupied_out_unless_overwrite(search_env, capsys):
    out = search_env["tmp"] / "pss"
    out.mkdir()
    (out / "best.ckpt").write_bytes(b"an earlier search")
    line = assert_one_line(run_cli(_search(search_env["sup"], out), capsys), str(out), "--overwrite")
    assert "already holds a search" in line and (out / "best.ckpt").read_bytes() == b"an earlier search"
    assert not search_env["reached"]
    with pytest.raises(_Reached):  # --overwrite gets past the checks to the search itself
        run_cli(_search(search_env["sup"], out, "--overwrite"), capsys)


def test_search_checks_an_unwritable_out_first(search_env, capsys, monkeypatch):
    ro = search_env["tmp"] / "ro"
    ro.mkdir()
    _read_only(monkeypatch, ro)
    assert_one_line(run_cli(_search(search_env["sup"], ro / "pss"), capsys), "--out", "Read-only")
    assert not search_env["reached"]


@pytest.mark.parametrize(
    "targets,needle",
    [
        ("3,1000", "above the start network's"),
        ("3,inf", "finite positive"),
        ("nan,3", "finite positive"),
        ("0.0001,3", "the smallest network the search can reach"),
        ("3", "at least two sub-networks"),
        ("3,3", "at least two sub-networks"),
        (",", "no targets given"),
    ],
)
def test_search_targets_are_checked_before_the_search(targets, needle, search_env, capsys):
    out = search_env["tmp"] / "pss"
    assert_one_line(run_cli(_search(search_env["sup"], out, "--targets-mmacs", targets), capsys), needle)
    assert not search_env["reached"] and not (out / "best.ckpt").exists()


def test_search_target_rules():
    assert check_targets([3e6, 6e6, 6e6], start_macs=6e6, min_macs=1e6) == [6e6, 3e6]  # the start itself is a target
    with pytest.raises(ValueError, match="above"):
        check_targets([3e6, 6.1e6], start_macs=6e6)


def test_search_and_calibrate_bn_name_an_lcnet_checkpoint(search_env, capsys):
    spec = {"name": "lc_resnet8_tiny", "kwargs": {"num_classes": 10, "in_chans": 1}}
    lc = dsnet.create_model(spec["name"], **spec["kwargs"])
    path = save_checkpoint(
        search_env["tmp"] / "lc.ckpt", {"model": spec, "state_dict": lc.state_dict(), "config": search_env["cfg"]}
    )
    for argv in (_search(path, search_env["tmp"] / "pss"), ["calibrate-bn", "--checkpoint", path]):
        line = assert_one_line(run_cli(argv, capsys), f"{path} is an LC-Net checkpoint", "DS-Net supernets")
        assert argv[0] in line
    assert not search_env["reached"]


def test_search_names_weights_of_the_wrong_shape(search_env, capsys):
    spec = {"name": "ds_resnet8_tiny", "kwargs": {"num_classes": 10, "in_chans": 1}}
    other = dsnet.create_model("ds_resnet8_tiny", num_classes=7, in_chans=1)
    path = save_checkpoint(
        search_env["tmp"] / "w.ckpt", {"model": spec, "state_dict": other.state_dict(), "config": search_env["cfg"]}
    )
    assert_one_line(run_cli(_search(path, search_env["tmp"] / "pss"), capsys), "do not fit the model", "classifier")


# ------------------------------------------------------------------------------------------ 8: inputs through the API
@pytest.mark.parametrize("name", ["ds_resnet8_tiny", "lc_resnet8_tiny"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_input_dtype_is_named_and_a_matching_model_runs(name, dtype):
    model = dsnet.create_model(name).eval()
    x = torch.randn(2, model.in_chans, 28, 28, generator=torch.Generator().manual_seed(0))
    with pytest.raises(
        ValueError, match=rf"input dtype {dtype} does not match the model's parameter dtype torch.float32"
    ):
        model(x.to(dtype))
    if dtype == torch.float64:  # the fix the message names works, and computes the same
        with torch.no_grad():
            torch.testing.assert_close(model.double()(x.double()).float(), model.float()(x), rtol=1e-4, atol=1e-4)


def test_lcnet_empty_batch_gives_empty_logits():
    model = dsnet.create_model("lc_resnet8_tiny").eval()
    x = torch.zeros(0, model.in_chans, 28, 28)
    assert model(x).shape == (0, 10)
    result = model(x, return_decisions=True)
    full = model(torch.zeros(3, model.in_chans, 28, 28), return_decisions=True)
    assert result.logits.shape == (0, 10) and result.execute.shape == (0, full.execute.shape[1])
    assert [t.shape[1:] for t in result.channels] == [t.shape[1:] for t in full.channels]


def test_non_finite_biases_are_refused():
    ds = dsnet.create_model("ds_resnet8_tiny").eval()
    x = torch.randn(2, ds.in_chans, 28, 28)
    k = len(ds.routing_space)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="gate_bias must be finite"):
            ds(x, gate_bias=[0.0] * (k - 1) + [bad])
    lc = dsnet.create_model("lc_resnet8_tiny").eval()
    with pytest.raises(ValueError, match="skip_bias must be finite"):
        lc(x, skip_bias=float("nan"))
    torch.testing.assert_close(ds(x, gate_bias=[0.0] * k), ds(x))  # finite biases still work


# ------------------------------------------------------------------------------------------ 8, 9: settings
def test_empty_lcnet_skip_bias_list_is_a_config_error():
    with pytest.raises(ConfigError, match=r"eval.lcnet_skip_biases: must not be empty"):
        compare_config(True, None, ["eval.lcnet_skip_biases=[]", "data.dataset=synthetic"])


@pytest.mark.parametrize("methods", ["", ",", " , "])
def test_compare_refuses_an_empty_method_list(methods, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--fast", "--out", out, "--methods", methods, "--set", "data.dataset=synthetic"]
    assert_one_line(run_cli(argv, capsys), "--methods: empty method list")
    assert not out.exists()


COMPARE_DATA = [
    "data.dataset=synthetic",
    "data.synthetic.num_train=192",
    "data.synthetic.num_val=64",
    "data.synthetic.channels=1",
    "data.synthetic.image_size=28",
    "data.holdout=64",
]


def test_compare_checks_search_settings_before_training(tmp_path, capsys, monkeypatch):
    import dsnet.compare.run as compare_run

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(compare_run, "CompareContext", no_training)
    sets = [*COMPARE_DATA, "pss.group_size=5"]
    argv = [
        "compare",
        "--fast",
        "--out",
        tmp_path / "cmp",
        "--methods",
        "pss",
        *[a for s in sets for a in ("--set", s)],
    ]
    assert_one_line(run_cli(argv, capsys), "pss.group_size=5 must divide")


def test_duplicate_yaml_keys_are_refused(tmp_path, capsys):
    recipe = tmp_path / "dup.yaml"
    recipe.write_text("supernet:\n  epochs: 3\n  lr: 0.1\n  epochs: 30\n")
    line = assert_one_line(run_cli(["config", "check", recipe], capsys), str(recipe), "epochs", "twice")
    assert "lines 2 and 4" in line
    assert_one_line(run_cli(["train", "supernet", "--config", recipe, "--out", tmp_path / "r"], capsys), "twice")
    assert not (tmp_path / "r").exists()
    # merge keys may still override what they bring in
    assert load_yaml("base: &b {x: 1}\nd:\n  <<: *b\n  x: 2\n") == {"base": {"x": 1}, "d": {"x": 2}}


# ------------------------------------------------------------------------------------------ 9: export files
@pytest.fixture
def fake_onnx(monkeypatch):
    """Graph writing replaced by a small file naming the graph (the file handling is what is tested)."""
    import dsnet.export.onnx as onnx_export

    def fake_export(module, example, path, input_name, output_names, metadata=None):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"graph {type(module).__name__} {output_names}")
        return path

    monkeypatch.setattr(onnx_export, "_export", fake_export)
    return onnx_export


def test_export_that_fails_its_check_leaves_the_earlier_file(fake_onnx, tmp_path, capsys, monkeypatch):
    import dsnet.export

    out = tmp_path / "m.onnx"
    out.write_text("the earlier export")
    monkeypatch.setattr(dsnet.export, "check_static", lambda *a, **k: 1.0)
    monkeypatch.setattr(
        dsnet.export,
        "check_dynamic",
        lambda *a, **k: {
            "forced_max_abs_diff": 1.0,
            "gate_max_abs_diff": 0.0,
            "choices_checked": [0],
            "gate_choices_agree": True,
        },
    )
    for extra in (["--subnet", "0"], []):
        line = assert_one_line(run_cli(["export", "--model", "ds_resnet8_tiny", *extra, "--out", out], capsys))
        assert "differs from eager" in line
        assert out.read_text() == "the earlier export"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no staging folder, no partial bundle


def test_a_smaller_bundle_removes_the_stale_graphs_of_the_larger(fake_onnx, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    (tmp_path / "m.unrelated.txt").write_text("not ours")
    assert run_cli(["export", "--model", "ds_resnet8_tiny", "--out", out, "--no-check"], capsys)[0] == 0
    big = json.loads((tmp_path / "m.manifest.json").read_text())
    assert len(big["post"]) == 4 and (tmp_path / "m.post3.onnx").is_file()
    spec = {"name": "ds_resnet8_tiny", "kwargs": {"routing_space": [0, 1]}}
    model = dsnet.create_model(spec["name"], **spec["kwargs"])
    ckpt = save_checkpoint(tmp_path / "two.ckpt", {"model": spec, "state_dict": model.state_dict()})
    code, _, stdout = run_cli(["export", "--checkpoint", ckpt, "--out", out, "--no-check"], capsys)
    assert code == 0
    small = json.loads((tmp_path / "m.manifest.json").read_text())
    files = sorted(p.name for p in tmp_path.glob("m.*"))
    post = [p["file"] for p in small["post"] if p["file"]]  # the exit gate's choice 0 is the pre part's answer
    assert files == sorted(["m.onnx", "m.manifest.json", "m.unrelated.txt"] + post)
    assert len(small["post"]) == 2 and f"({2 + len(post)} files" in stdout and "removed 2 stale" in stdout


def test_compare_checks_its_out_folder_before_training(tmp_path, capsys, monkeypatch):
    def no_data(*args, **kwargs):
        raise AssertionError("data loaded")

    monkeypatch.setattr("dsnet.data.build_dataset", no_data)
    (tmp_path / "a_file").write_text("x")
    argv = ["compare", "--fast", "--out", tmp_path / "a_file" / "cmp", *[a for s in COMPARE_DATA for a in ("--set", s)]]
    assert_one_line(run_cli(argv, capsys), "--out", "is a file")
