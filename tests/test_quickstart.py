"""``dsnet quickstart`` end to end on a tiny synthetic dataset."""

import json

import pytest

from dsnet.cli import main

TINY = [
    "data.dataset=synthetic",
    "data.synthetic.num_train=256",
    "data.synthetic.num_val=128",
    "data.holdout=64",
    "data.synthetic.channels=1",
    "data.synthetic.image_size=28",
    "data.batch_size=32",
    "data.eval_batch_size=64",
    "supernet.epochs=1",
    "supernet.warmup_epochs=0",
    "supernet.bn_calibration_batches=2",
    "gate.epochs=1",
    "log.progress=false",
]


def test_quickstart_end_to_end(tmp_path, capsys):
    out = tmp_path / "qs"
    args = ["quickstart", "--out", str(out)] + [a for kv in TINY for a in ("--set", kv)]
    assert main(args) == 0
    screen = capsys.readouterr().out
    assert "Did it work?" in screen and "Static sub-networks" in screen and "measured speed" in screen
    assert "cascade" in screen and "oracle" in screen and "random router" in screen
    result = json.loads((out / "quickstart.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for key in ("supernet", "gate"):
        assert (tmp_path / "qs" / key / "best.ckpt").is_file()
    claims = result["claims"]
    assert claims["widest_routed_top1"] == report["summary"]["widest_routed"]["top1"]
    assert claims["dynamic_top1"] == report["dynamic"]["top1"]
    assert claims["mac_reduction"] >= 1.0 - 1e-9  # routing never costs more than the widest routed choice
    assert len(report["static"]) == 5 and len(report["sweep"]) >= 3
    # the same routed widths trained alone (same data and epochs) are in the report and the verdict
    routed = [s for s in report["static"] if s["in_routing_space"]]
    assert [a["macs"] for a in report["alone"]] == [s["macs"] for s in routed]
    assert all((out / "alone" / f"net{k}" / "best.ckpt").is_file() for k in range(len(routed)))
    assert claims["alone_top1"] == [a["top1"] for a in report["alone"]]
    assert "trained alone" in screen
    # the operating point of the verdict is chosen on held-out images, reported on the test split
    assert claims["best_matching_point"] is None or claims["best_matching_point"]["chosen_on"] == "holdout"
    speed = result["speed"]
    assert speed["real_speedup"] > 0 and speed["theoretical_speedup"] >= 1.0 - 1e-9
    assert abs(speed["efficiency"] - speed["real_speedup"] / speed["theoretical_speedup"]) < 1e-9
    # a re-run reuses the finished stages instead of training again
    assert main(args) == 0
    assert "reusing finished run" in capsys.readouterr().out
    # ... but never one trained with another recipe: the stale stage is named, nothing is overwritten
    mtime = (out / "gate" / "best.ckpt").stat().st_mtime
    assert main(args + ["--set", "gate.tau=2.0"]) == 2
    err = capsys.readouterr().err
    assert "gate.tau=1.0" in err and "2.0" in err and "another --out" in err and "Traceback" not in err
    assert (out / "gate" / "best.ckpt").stat().st_mtime == mtime


def test_quickstart_without_data_says_how_to_get_it(tmp_path, capsys):
    assert main(["quickstart", "--out", str(tmp_path / "q"), "--data", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "apt-get install dataset-fashion-mnist" in err and "Traceback" not in err


def test_quickstart_recipe_is_the_shipped_fashion_mnist_recipe():
    from pathlib import Path

    from dsnet.quickstart import quickstart_config
    from dsnet.train.config import load_config

    shipped = load_config(Path(__file__).parents[1] / "configs" / "fashion_mnist.yaml")
    ours = quickstart_config()
    for section in ("model", "supernet", "gate"):
        assert shipped[section] == ours[section], section


def test_quickstart_over_seeds_reports_mean_and_spread(tmp_path, capsys):
    out = tmp_path / "qs"
    sets = [a for kv in TINY + ["supernet.epochs=1", "gate.epochs=1"] for a in ("--set", kv)]
    assert main(["quickstart", "--out", str(out), "--seeds", "2", *sets]) == 0
    summary = json.loads((out / "seeds.json").read_text())
    assert summary["seeds"] == [0, 1]
    per_seed = [json.loads((out / f"seed{i}" / "quickstart.json").read_text())["claims"] for i in (0, 1)]
    fig = summary["figures"]["dynamic_top1"]
    assert fig["values"] == [c["dynamic_top1"] for c in per_seed]
    assert fig["mean"] == pytest.approx(sum(fig["values"]) / 2)
    assert fig["std"] == pytest.approx(abs(fig["values"][0] - fig["values"][1]) / 2**0.5)
    assert set(summary["figures"]["static_top1"]) == {"0", "1", "2", "3", "4"}
    assert "Quickstart over seeds [0, 1]" in capsys.readouterr().out
