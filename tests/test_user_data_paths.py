"""Your own data (issue 19, items 3, 8): image folders without silent flips, ``dsnet compare`` on an image folder
with a held-out slice that fits it, and a warning for methods that learnt next to nothing."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dsnet.cli import main
from dsnet.data import build_dataset, holdout_size, is_image_folder, training_images
from dsnet.data.recipe import describe_recipe
from tests.test_data_sources import _put, fashion_files


def make_image_folder(
    root: Path,
    n_train: int = 40,
    n_eval: int = 10,
    classes: tuple[str, ...] = ("a", "b"),
    size: int = 16,
    eval_split: str = "val",
) -> Path:
    """``root/train/<class>/*.png`` and ``root/<eval_split>/<class>/*.png``: small grey images, the class in the
    brightness of the left half (learnt in a few steps)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), (eval_split, n_eval)):
        for c, cls in enumerate(classes):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = rng.integers(0, 80, (size, size), dtype=np.uint8)
                a[:, : size // 2] += np.uint8(150 * c // max(1, len(classes) - 1))
                Image.fromarray(a).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("folder"))


# ---------------------------------------------------------------- 3. image folders are not flipped unless asked
def test_image_folders_flip_only_when_asked(folder):
    cfg = {"dataset": "imagefolder", "root": str(folder), "holdout": 0}
    recipe = build_dataset(cfg, "train")[1].recipe
    assert not recipe["hflip"] and recipe["why"]["hflip"].startswith("image folder: flips are opt-in")
    line = describe_recipe(recipe)
    assert "no horizontal flip (image folder: flips are opt-in, data.augment.hflip=true)" in line
    assert "(native 16 px < 96: small-image crops)" in line  # the other defaults chosen from the data say why too
    asked = build_dataset({**cfg, "augment": {"hflip": True}}, "train")[1].recipe
    assert asked["hflip"] and "hflip" not in asked["why"]
    line = describe_recipe(asked)
    assert "horizontal flip" in line and "opt-in" not in line and "no horizontal flip" not in line


def test_fashion_mnist_keeps_its_flips(tmp_path):
    _put(tmp_path, fashion_files())
    recipe = build_dataset({"dataset": "fashion_mnist", "root": str(tmp_path), "holdout": 0}, "train")[1].recipe
    assert recipe["hflip"] and recipe["crop_padding"] == 2 and recipe["why"] == {}
    assert "no horizontal flip" not in describe_recipe(recipe)


def test_recipes_recorded_before_reasons_still_describe(folder):
    recipe = build_dataset({"dataset": "imagefolder", "root": str(folder), "holdout": 0}, "train")[1].recipe
    old = {k: v for k, v in recipe.items() if k != "why"}  # a checkpoint of an older dsnet
    assert describe_recipe(old).startswith("data recipe (measured on")


# ---------------------------------------------------------------- 8. compare --data <image folder>
def test_image_folder_layouts_are_detected(tmp_path, folder):
    assert is_image_folder(folder) and is_image_folder(str(folder))
    with_test = make_image_folder(tmp_path / "t", n_train=3, n_eval=2, eval_split="test")
    assert is_image_folder(with_test)
    ds, info = build_dataset({"dataset": "imagefolder", "root": str(with_test)}, "val")  # test/ is the eval split
    assert info.num_samples == 4 and "test" in str(ds.samples[0][0])
    _put(tmp_path / "idx", fashion_files())
    assert not is_image_folder(tmp_path / "idx") and not is_image_folder(None) and not is_image_folder(tmp_path / "x")


def test_fashion_mnist_pointed_at_an_image_folder_says_so(folder):
    with pytest.raises(FileNotFoundError, match="laid out as an image folder .*set data.dataset=imagefolder"):
        build_dataset({"dataset": "fashion_mnist", "root": str(folder)}, "train")


def test_holdout_is_a_fraction_of_the_data_capped():
    assert holdout_size(None, 4000, cap=2500) == 400  # 10%, as data.holdout: null
    assert holdout_size(None, 60000, cap=2500) == 2500 and holdout_size(None, 60000) == 5000
    assert holdout_size(7, 4000, cap=2500) == 7  # a number given is kept


def test_compare_config_takes_an_image_folder_and_fits_the_data(tmp_path, folder):
    from dsnet.compare.run import compare_config

    assert training_images({"dataset": "imagefolder", "root": str(folder)}) == 80
    cfg, _ = compare_config(fast=True, data=str(folder))
    d = cfg["data"]
    assert (d["dataset"], d["root"], d["holdout"]) == ("imagefolder", str(folder), 8)  # 10% of 80, not 2,500
    assert d["train_subset"] is None  # --fast's 25,600 images are more than the folder has: all of them
    assert compare_config(True, str(folder), ["data.holdout=5"])[0]["data"]["holdout"] == 5  # a --set wins
    named = compare_config(True, str(folder), ["data.dataset=fashion_mnist"])[0]["data"]
    assert named["dataset"] == "fashion_mnist"  # the dataset named with --set is not second-guessed
    big = make_image_folder(tmp_path / "big", n_train=150, n_eval=1, size=8)
    assert compare_config(False, str(big))[0]["data"]["holdout"] == 30  # 10% of 300 (full run: at most 5,000)
    _put(tmp_path / "idx", fashion_files(n_train=50))
    fm = compare_config(True, str(tmp_path / "idx"))[0]["data"]
    assert (fm["dataset"], fm["holdout"], fm["train_subset"]) == ("fashion_mnist", 5, None)  # counted, not assumed


def test_compare_help_documents_image_folders(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    assert "image folder" in " ".join(capsys.readouterr().out.split())


TINY = [  # seconds, not minutes: 1 epoch of 72 images, one timing round of a tiny batch
    "data.batch_size=16",
    "data.eval_batch_size=32",
    "supernet.epochs=1",
    "supernet.warmup_epochs=0",
    "supernet.bn_calibration_batches=1",
    "timing.repeats=1",
    "timing.warmup=0",
    "timing.batch_size=4",
    "timing.batch1_images=2",
]


@pytest.fixture(scope="module")
def compared(folder, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("compare") / "run"
    sets = [a for s in TINY for a in ("--set", s)]
    args = ["compare", "--fast", "--data", str(folder), "--methods", "static,alone", "--out", str(out)]
    assert main([*args, "--no-progress", "--threads", "1", *sets]) == 0
    return json.loads((out / "compare.json").read_text())


def test_compare_runs_on_an_image_folder(compared):
    assert compared["dataset"] == {"name": "imagefolder", "test_images": 20, "train_images": 72, "num_classes": 2}
    assert compared["config"]["data"]["holdout"] == 8 and not compared["config"]["data"]["augment"]["hflip"]
    assert {p["method"] for p in compared["points"]} == {"static", "alone"}


# ---------------------------------------------------------------- 8. methods near chance: one warning line each
def test_near_chance_margin():
    from dsnet.compare.core import near_chance_margin

    assert near_chance_margin(10) == 10.0 and near_chance_margin(2) == 10.0 and near_chance_margin(100) == 5.0


def test_methods_near_chance_are_warned_once(compared):
    from dsnet.compare.core import near_chance_methods
    from dsnet.compare.report import render_markdown, render_screen

    result = copy.deepcopy(compared)
    for p in result["points"]:
        if p["method"] == "alone":
            p["top1"] = 52.0  # 2 classes: chance 50%
    result["near_chance"] = near_chance_methods(result["points"], 2)
    assert list(result["near_chance"]) == ["alone"] and result["near_chance"]["alone"]["best_top1"] == 52.0
    warning = result["near_chance"]["alone"]["warning"]
    assert warning.startswith("warning: alone is near chance (best top-1 52.0%, chance 50.0%")
    assert "not meaningful" in warning
    for text in (render_screen(result), render_markdown(result)):
        assert text.count(warning) == 1 and "warning: static" not in text
    assert near_chance_methods(result["points"], None) == {}
    result["near_chance"] = {}  # a healthy run prints no warning
    assert "near chance (best" not in render_screen(result)


# ---------------------------------------------------------------- 10. small things
def test_eval_plot_of_a_supernet_says_its_gate_is_untrained(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    import dsnet
    from dsnet.data import build_loader
    from dsnet.evaluation import evaluate, plot_report

    model = dsnet.create_model("ds_resnet8_tiny", num_classes=10, in_chans=1).eval()
    data = {"dataset": "synthetic", "synthetic": {"num_val": 16}, "eval_batch_size": 16, "workers": 0}
    report = evaluate(model, build_loader(data, "val")[0], sweep=3, cascade_points=3, progress=False)
    labels: list[list[str]] = []
    save = Figure.savefig

    def spy(fig, *args, **kwargs):  # noqa: ANN001, ANN202 - the figure plot_report draws
        labels.append([t.get_text() for t in fig.axes[0].get_legend().get_texts()])
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    for stage in ("supernet", "gate"):
        plot_report({**report, "checkpoint_stage": stage}, tmp_path / f"{stage}.png")
    supernet, gate = ([t for t in texts if "gate (b=0)" in t] for texts in labels)
    assert supernet[0].startswith("dynamic, untrained gate") and gate[0].startswith("dynamic, trained gate")
