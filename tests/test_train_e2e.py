"""Training end to end on tiny synthetic data: CLI pipeline, resume == uninterrupted, 2-process DDP."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsnet.cli import main
from dsnet.models.base import EXIT_HEAD_PREFIX
from dsnet.train.checkpoint import read_checkpoint, save_checkpoint
from dsnet.train.config import load_config
from dsnet.train.gate import train_gate
from dsnet.train.supernet import train_supernet

TINY = [
    "model.name=ds_resnet8_tiny",
    "data.dataset=synthetic",
    "data.synthetic.num_train=192",
    "data.synthetic.num_val=64",
    "data.synthetic.channels=1",
    "data.synthetic.image_size=28",
    "data.batch_size=32",
    "data.eval_batch_size=64",
    "data.workers=0",
    "supernet.epochs=2",
    "supernet.warmup_epochs=1",
    "supernet.bn_calibration_batches=2",
    "supernet.ema_decay=0.9",
    "gate.epochs=2",
    "log.progress=false",
    "log.tensorboard=false",
]


def _cfg(*extra):
    return load_config(None, TINY + list(extra))


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_supernet_resume_equals_uninterrupted(tmp_path):
    cfg = _cfg()
    train_supernet(cfg, tmp_path / "full")
    stopped = train_supernet(cfg, tmp_path / "cut", stop_after_epoch=0)
    assert stopped == {"stopped_after_epoch": 0}
    assert read_checkpoint(tmp_path / "cut" / "last.ckpt")["epoch"] == 0
    train_supernet(cfg, tmp_path / "cut", resume=True)
    full, cut = read_checkpoint(tmp_path / "full" / "last.ckpt"), read_checkpoint(tmp_path / "cut" / "last.ckpt")
    _assert_same_state(full["state_dict"], cut["state_dict"])
    _assert_same_state(full["ema_state_dict"], cut["ema_state_dict"])
    assert full["optimizer"]["state"].keys() == cut["optimizer"]["state"].keys()
    for k, st in full["optimizer"]["state"].items():
        assert torch.equal(st["momentum_buffer"], cut["optimizer"]["state"][k]["momentum_buffer"])
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [0, 1]
    assert full["bn_calibrated"] and cut["bn_calibrated"]


def test_gate_resume_equals_uninterrupted(tmp_path):
    cfg = _cfg("supernet.epochs=1", "gate.mode=pre")  # the paper's gate: only its slimming head trains
    train_supernet(cfg, tmp_path / "sup")
    sup = tmp_path / "sup" / "best.ckpt"
    train_gate(cfg, sup, tmp_path / "g_full")
    assert train_gate(cfg, sup, tmp_path / "g_cut", stop_after_epoch=0) == {"stopped_after_epoch": 0}
    train_gate(cfg, sup, tmp_path / "g_cut", resume=True)
    full, cut = read_checkpoint(tmp_path / "g_full" / "last.ckpt"), read_checkpoint(tmp_path / "g_cut" / "last.ckpt")
    _assert_same_state(full["state_dict"], cut["state_dict"])
    # only the slimming head moved in stage II
    s = read_checkpoint(sup)
    for k, v in full["state_dict"].items():
        same = torch.equal(v, s["ema_state_dict"][k])
        assert same != k.endswith("slim_head.weight"), k


def test_cli_pipeline_and_run_directory(tmp_path, capsys):
    sets = [a for kv in TINY + ["supernet.epochs=1", "gate.epochs=1"] for a in ("--set", kv)]
    out = tmp_path / "sup"
    assert main(["train", "supernet", *sets, "--out", str(out)]) == 0
    for name in ("last.ckpt", "best.ckpt", "config.yaml", "metrics.jsonl", "metrics.csv", "summary.json"):
        assert (out / name).is_file(), name
    # a finished run is not overwritten by accident
    assert main(["train", "supernet", *sets, "--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    # spoil the statistics of both weight sets; calibrate-bn must re-estimate both (EMA teacher and raw student)
    spoiled = read_checkpoint(out / "best.ckpt")
    for key in ("ema_state_dict", "state_dict"):
        spoiled[key] = {  # the sub-networks' statistics (the exit head's own BatchNorm is stage II's to train)
            k: v + 7.0 if k.endswith("running_mean") and not k.startswith(EXIT_HEAD_PREFIX) else v
            for k, v in spoiled[key].items()
        }
    save_checkpoint(tmp_path / "spoiled.ckpt", {k: v for k, v in spoiled.items() if k != "format"})
    assert (
        main(["calibrate-bn", "--checkpoint", str(tmp_path / "spoiled.ckpt"), "--out", str(tmp_path / "cal.ckpt")]) == 0
    )
    calibrated, good = read_checkpoint(tmp_path / "cal.ckpt"), read_checkpoint(out / "best.ckpt")
    assert calibrated["bn_calibrated"] == ["ema_state_dict", "state_dict"]
    for key in calibrated["bn_calibrated"]:
        _assert_same_state(calibrated[key], good[key])
    gate_out = tmp_path / "gate"
    assert main(["train", "gate", *sets, "--supernet", str(tmp_path / "cal.ckpt"), "--out", str(gate_out)]) == 0
    record = json.loads((gate_out / "metrics.jsonl").read_text().splitlines()[-1])
    split = record["selection_split"]  # the keys are named after the split selection reads (holdout_top1, ...)
    assert 0 <= record[f"{split}_top1"] <= 100 and record[f"{split}_mmacs"] > 0
    assert abs(sum(v for k, v in record.items() if k.startswith(f"{split}_route_")) - 1.0) < 1e-6


def test_cli_config_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("supernet:\n  epohcs: 3\n")
    assert main(["train", "supernet", "--config", str(bad), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "supernet.epohcs: unknown key" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()  # nothing started


@pytest.mark.skipif(
    shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
    reason="torchrun not installed",
)
def test_ddp_two_processes_keep_identical_weights(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    sets = [a for kv in TINY + ["supernet.epochs=1"] for a in ("--set", kv)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        str(torchrun),
        "--nproc_per_node=2",
        "--master_port=29533",
        "-m",
        "dsnet",
        "train",
        "supernet",
        *sets,
        "--out",
        str(tmp_path / "ddp"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    checksums = summary["rank_param_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
