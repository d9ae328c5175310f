"""Every bad input is one clear line and exit code 2, every output is checked before the work, no checkpoint runs code.

Each class of failure is parametrised over the commands it reaches: config
values (every key of the validation tables, out of range or of the wrong
type), command-line numbers, checkpoints that do not fit, output paths that
cannot be written, crafted checkpoints, and training that diverges.
"""

import errno
import os
import pickle
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import dsnet
from dsnet.cli import main
from dsnet.train.checkpoint import FORMAT, read_checkpoint, save_checkpoint
from dsnet.train.config import SCHEMA, ConfigError, load_config
from dsnet.utils.schema import Key, reference_rows

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "model.name=ds_resnet8_tiny",
    "data.dataset=synthetic",
    "data.synthetic.num_train=64",
    "data.synthetic.num_val=32",
    "data.synthetic.image_size=16",
    "data.batch_size=32",
    "data.eval_batch_size=32",
    "data.workers=0",
    "supernet.epochs=1",
    "supernet.bn_calibration_batches=1",
    "gate.epochs=1",
    "log.progress=false",
    "log.tensorboard=false",
]
SETS = [a for kv in TINY for a in ("--set", kv)]


def run_cli(argv: list, capsys) -> tuple[int, list[str], str]:
    """Exit code, non-empty stderr lines and stdout of ``dsnet argv`` (argparse errors exit through SystemExit)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, [line for line in captured.err.splitlines() if line.strip()], captured.out


def assert_one_line(result: tuple[int, list[str], str], *needles: str) -> str:
    code, lines, _ = result
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ------------------------------------------------------------------------------------------ config values
def _outside(key: Key) -> list:
    """Values every key must reject: out of its range or choices, or of another type."""
    if key.kind in ("int", "float"):
        lo, hi, lo_in, hi_in = key.range.bounds
        step = 1 if key.kind == "int" else 0.5
        bad = []
        if lo != float("-inf"):
            bad.append(lo - step if lo_in else lo)
        if hi != float("inf"):
            bad.append(hi + step if hi_in else hi)
        if key.kind == "float":
            bad.append(float("nan"))
        return [int(v) if key.kind == "int" else v for v in bad] + ["abc"]
    if key.kind == "numbers":
        lo, hi, _, _ = key.range.bounds
        below = [[lo - 1.0] * (key.length or 1)]  # out of range (-inf for an unbounded key: not a number there)
        return below + ([[0.5] * (key.length + 1)] if key.length else [["x"]])  # wrong length, or not numbers
    if key.kind in ("choice", "device"):
        return ["bogus"]
    if key.kind == "bool":
        return ["maybe"]
    return [[1, 2]]  # str, path, mapping: a list is none of them


CASES = [
    pytest.param(name, value, id=f"{name}={value!r}")
    for name, key in reference_rows(SCHEMA, "")
    for value in _outside(key)
]


def _set(name: str, value) -> str:
    return f"{name}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"


@pytest.mark.parametrize("name,value", CASES)
def test_every_config_key_rejects_out_of_range_values(name, value, tmp_path, capsys):
    stage = "gate" if name.startswith("gate.") else "supernet"
    extra = ["--supernet", tmp_path / "none.ckpt"] if stage == "gate" else []
    out = tmp_path / "run"
    result = run_cli(["train", stage, *SETS, "--set", _set(name, value), *extra, "--out", out], capsys)
    assert_one_line(result, f"{name}:")
    assert not out.exists()  # nothing started


def test_every_numeric_key_has_a_range():
    rows = reference_rows(SCHEMA, "")
    assert len(rows) > 60
    for name, key in rows:
        assert key.stage, name
        assert key.doc, name
        if key.kind in ("int", "float", "numbers"):
            assert key.range is not None, name
        if key.kind == "choice":
            assert key.default in key.choices or key.default is None, name


@pytest.mark.parametrize(
    "sets,needle",
    [
        (["supernet.warmup_epochs=2"], "supernet.warmup_epochs: must be <= supernet.epochs"),
        (["gate.min_lr=1.0"], "gate.min_lr: must be <= gate.lr"),
        (["gate.target_mmacs=1", "gate.target_fraction=0.5"], "gate.target_fraction:"),
        (["data.augment.scale=[0.9, 0.5]"], "data.augment.scale: needs min <= max"),
        (["model.kwargs.width_ratios=[0.5, 0.5]"], "model.kwargs: ds_resnet8_tiny: width_ratios must be distinct"),
        (["model.kwargs.width_ratios=[-0.5, 1.0]"], "model.kwargs: ds_resnet8_tiny: width_ratios"),
        (["model.kwargs.bogus=1"], "model.kwargs: ds_resnet8_tiny: DSResNet.__init__() got an unexpected keyword"),
        (["model.name=ds_nothing"], "model.name: unknown model 'ds_nothing'"),
    ],
)
def test_keys_checked_together_and_model_kwargs(sets, needle, tmp_path, capsys):
    extra = [a for kv in sets for a in ("--set", kv)]
    assert_one_line(run_cli(["train", "supernet", *SETS, *extra, "--out", tmp_path / "run"], capsys), needle)
    assert not (tmp_path / "run" / "last.ckpt").exists()
    # `dsnet config check` says the same
    assert_one_line(run_cli(["config", "check", *SETS, *extra], capsys), needle)


def test_numbers_in_exponent_notation_are_numbers():
    cfg = load_config(None, ["supernet.lr=1e-3", "gate.target_mmacs=2E+1"])
    assert cfg["supernet"]["lr"] == 0.001 and cfg["gate"]["target_mmacs"] == 20.0


def test_debug_env_keeps_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("DSNET_DEBUG", "1")
    with pytest.raises(ConfigError, match="supernet.lr_reference_batch"):
        main(["train", "supernet", "--set", "supernet.lr_reference_batch=0", "--out", str(tmp_path / "x")])


# ------------------------------------------------------------------------------------------ checkpoints
def _checkpoint(path: Path, drop: tuple[str, ...] = (), **changes) -> Path:
    """A small, untrained supernet checkpoint (what training writes), with ``changes`` and without ``drop``."""
    cfg = load_config(None, TINY)
    model = dsnet.create_model("ds_resnet8_tiny", num_classes=10, in_chans=1)
    payload = {
        "format": FORMAT,
        "model": {"name": "ds_resnet8_tiny", "kwargs": {"num_classes": 10, "in_chans": 1}},
        "state_dict": model.state_dict(),
        "ema_state_dict": model.state_dict(),
        "epoch": 0,
        "config": cfg,
        "stage": "supernet",
        "bn_calibrated": True,
        **changes,
    }
    torch.save({k: v for k, v in payload.items() if k not in drop}, path)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    other = {"name": "ds_mobilenet_v1_cifar", "kwargs": {"num_classes": 10, "in_chans": 1}}
    not_torch = d / "garbage.ckpt"
    not_torch.write_bytes(b"not a checkpoint at all")
    return {
        "good": _checkpoint(d / "good.ckpt"),
        "swapped": _checkpoint(d / "swapped.ckpt", model=other),
        "no_model": _checkpoint(d / "no_model.ckpt", drop=("model",)),
        "empty": _checkpoint(d / "empty.ckpt", state_dict={}, ema_state_dict={}),
        "garbage": not_torch,
        "folder": d,
    }


CKPT_COMMANDS = {
    "eval": lambda c, t: ["eval", "--checkpoint", c],
    "calibrate-bn": lambda c, t: ["calibrate-bn", "--checkpoint", c, "--out", t / "cal.ckpt"],
    "train-gate": lambda c, t: ["train", "gate", *SETS, "--supernet", c, "--out", t / "gate"],
    "export": lambda c, t: ["export", "--checkpoint", c, "--out", t / "m.onnx"],
    "bench": lambda c, t: ["bench", "--checkpoint", c, "--batch-sizes", "1", "--repeats", "1"],
}
CKPT_NEEDLES = {
    "swapped": ["do not fit the model", "ds_mobilenet_v1_cifar", "missing (", "unexpected ("],
    "no_model": ["no 'model' entry"],
    "empty": ["are empty"],
    "garbage": ["not a readable dsnet checkpoint"],
    "folder": ["is a directory"],
}


@pytest.mark.parametrize("command", sorted(CKPT_COMMANDS))
@pytest.mark.parametrize("kind", sorted(CKPT_NEEDLES))
def test_checkpoints_that_do_not_fit(kind, command, ckpts, tmp_path, capsys):
    path = ckpts[kind]
    line = assert_one_line(run_cli(CKPT_COMMANDS[command](path, tmp_path), capsys), str(path), *CKPT_NEEDLES[kind])
    assert len(line) < 700
    assert not (tmp_path / "cal.ckpt").exists() and not (tmp_path / "gate" / "last.ckpt").exists()


def test_mismatch_names_shape_differences(ckpts, tmp_path):
    ckpt = read_checkpoint(ckpts["good"])
    ckpt["model"]["kwargs"]["num_classes"] = 7  # same architecture, another classifier size
    torch.save(ckpt, tmp_path / "c.ckpt")
    with pytest.raises(
        ValueError, match=r"of another shape \(checkpoint vs model: classifier.weight \(10, \d+\) vs \(7,"
    ):
        dsnet.train.checkpoint.load_model(tmp_path / "c.ckpt")


# ------------------------------------------------------------------------------------------ output paths
OUTPUT_COMMANDS = {
    "export --out": lambda p, c: ["export", "--model", "ds_resnet8_tiny", "--out", p],
    "eval --json": lambda p, c: ["eval", "--checkpoint", c, "--json", p],
    "eval --plot": lambda p, c: ["eval", "--checkpoint", c, "--plot", p],
    "calibrate-bn --out": lambda p, c: ["calibrate-bn", "--checkpoint", c, "--out", p],
    "bench --json": lambda p, c: ["bench", "--model", "ds_resnet8_tiny", "--json", p],
    "models --json": lambda p, c: ["models", "--json", p],
}


def _read_only(monkeypatch, folder: Path) -> None:
    """Make creating files under ``folder`` fail as on a read-only filesystem (see the unshare test for a real one)."""
    real_open = os.open

    def fake_open(path, flags, *args, **kwargs):
        if str(path).startswith(str(folder)) and flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)


@pytest.mark.parametrize("where", ["existing-directory", "under-a-file", "read-only"])
@pytest.mark.parametrize("command", sorted(OUTPUT_COMMANDS))
def test_unwritable_outputs_fail_before_the_work(command, where, ckpts, tmp_path, capsys, monkeypatch):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "ro").mkdir()
    path = {
        "existing-directory": tmp_path,
        "under-a-file": tmp_path / "a_file" / "out.json",
        "read-only": tmp_path / "ro" / "out.json",
    }[where]
    if where == "read-only":
        _read_only(monkeypatch, tmp_path / "ro")
    needle = {"existing-directory": "is a directory", "under-a-file": "is a file", "read-only": "Read-only"}[where]
    assert_one_line(run_cli(OUTPUT_COMMANDS[command](path, ckpts["good"]), capsys), command.split()[1], needle)


@pytest.mark.parametrize("where", ["is-a-file", "under-a-file", "read-only"])
def test_unwritable_run_folder(where, tmp_path, capsys, monkeypatch):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "ro").mkdir()
    path = {"is-a-file": tmp_path / "a_file", "under-a-file": tmp_path / "a_file" / "run", "read-only": tmp_path / "ro"}
    if where == "read-only":
        _read_only(monkeypatch, tmp_path / "ro")
    assert_one_line(run_cli(["train", "supernet", *SETS, "--out", path[where]], capsys), "--out", str(path[where]))


def test_real_read_only_filesystem(tmp_path):
    """A tmpfs mounted read-only in a user namespace (skipped where unshare is not allowed)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True) if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        pytest.skip("unshare -rm is not available here")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    script = f'mount -t tmpfs -o ro none "{ro}" && exec "{sys.executable}" -m dsnet models --json "{ro}/m.json"'
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Read-only file system" in lines[0] and "--json" in lines[0], lines


# ------------------------------------------------------------------------------------------ command-line numbers
@pytest.mark.parametrize(
    "argv,needle",
    [
        (["calibrate-bn", "--checkpoint", "{good}", "--batches", "0"], "--batches: must be at least 1"),
        (["calibrate-bn", "--checkpoint", "{good}", "--device", "bogus"], "--device: unknown device 'bogus'"),
        (["export", "--model", "ds_resnet8_tiny", "--input-size", "0", "--out", "{tmp}/m.onnx"], "--input-size"),
        (["export", "--model", "ds_vit_cifar", "--input-size", "3", "--out", "{tmp}/m.onnx"], "cannot run on 3x3"),
        (["export", "--model", "ds_resnet8_tiny", "--check-batch", "0", "--out", "{tmp}/m.onnx"], "--check-batch"),
        (["export", "--model", "ds_resnet8_tiny", "--subnet", "9", "--out", "{tmp}/m.onnx"], "subnet index 9"),
        (["bench", "--model", "ds_resnet8_tiny", "--threads", "0"], "--threads: must be at least 1"),
        (["bench", "--model", "ds_resnet8_tiny", "--input-size", "-4"], "--input-size: must be at least 1, got -4"),
        (["bench", "--model", "ds_resnet8_tiny", "--batch-sizes", "0,1"], "--batch-sizes"),
        (["bench", "--model", "ds_resnet8_tiny", "--mix", "1,-1,0,0"], "--mix"),
        (["bench", "--model", "ds_resnet8_tiny", "--warmup", "-1"], "--warmup"),
        (["eval", "--checkpoint", "{good}", "--subset", "0"], "--subset"),
        (["eval", "--checkpoint", "{good}", "--device", "gpu7"], "--device: unknown device 'gpu7'"),
        (["eval", "--checkpoint", "{good}", "--sweep", "0"], "--sweep"),
        (["eval", "--checkpoint", "{tmp}/missing.ckpt"], "no checkpoint at"),
        (["train", "supernet", "--config", "{tmp}/missing.yaml", "--out", "{tmp}/r"], "no config file at"),
        (["train", "supernet", "--resume", "--out", "{tmp}/r"], "--resume"),
        (["models", "--subnets", "nope"], "unknown model 'nope'"),
    ],
)
def test_bad_command_line_values(argv, needle, ckpts, tmp_path, capsys):
    argv = [a.format(good=ckpts["good"], tmp=tmp_path) for a in argv]
    assert_one_line(run_cli(argv, capsys), needle)


def test_one_class_image_folder(tmp_path, capsys):
    for split in ("train", "val"):
        folder = tmp_path / "images" / split / "only"
        folder.mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / f"{i}.png")
    sets = ["--set", "data.dataset=imagefolder", "--set", f"data.root={tmp_path / 'images'}"]
    line = assert_one_line(run_cli(["train", "supernet", *SETS, *sets, "--out", tmp_path / "run"], capsys))
    assert "1 class (only); a classifier needs at least 2" in line


def test_diverging_loss_stops_training_without_saving(tmp_path, capsys):
    out = tmp_path / "run"
    result = run_cli(["train", "supernet", *SETS, "--set", "supernet.lr=1e38", "--out", out], capsys)
    # the loss turns nan, or the weights do, or (BN keeping the loss finite) the recalibrated statistics overflow:
    # one line each time, and nothing that is not finite is ever written
    line = assert_one_line(result, "diverged")
    assert any(s in line for s in ("loss_largest=nan", "weights are not finite", "BN recalibration gave statistics"))
    for ckpt in (out / "last.ckpt", out / "best.ckpt"):
        assert not ckpt.exists() or read_checkpoint(ckpt)["bn_calibrated"] is False  # finite, uncalibrated
    # the learning rate is rescaled by the global batch; training says so first
    assert "effective lr 1.25e+37 = supernet.lr 1e+38 x global batch 32 / supernet.lr_reference_batch 256" in result[2]


# ------------------------------------------------------------------------------------------ untrusted checkpoints
class _Payload:
    """Pickles as a call that writes a file: what a crafted checkpoint could do with the full unpickler."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_crafted_checkpoint_does_not_run(ckpts, tmp_path, capsys):
    marker = tmp_path / "pwned.txt"
    evil = tmp_path / "evil.ckpt"
    payload = read_checkpoint(ckpts["good"])
    payload["rng"] = _Payload(marker)
    torch.save(payload, evil)
    # the payload is real: the unsafe loader runs it
    torch.load(evil, weights_only=False)
    assert marker.read_text() == "pwned"
    marker.unlink()
    for argv in (
        ["eval", "--checkpoint", evil],
        ["calibrate-bn", "--checkpoint", evil, "--out", tmp_path / "c.ckpt"],
        ["export", "--checkpoint", evil, "--out", tmp_path / "m.onnx"],
        ["train", "gate", *SETS, "--supernet", evil, "--out", tmp_path / "g"],
        ["checkpoint", "convert", evil],  # without --trust: refused before reading
    ):
        line = assert_one_line(run_cli(argv, capsys))
        assert "nothing in it ran" in line or "--trust" in line, line
        assert not marker.exists(), argv


def test_old_checkpoint_says_how_to_convert_and_converts(ckpts, tmp_path, capsys):
    old = tmp_path / "old.ckpt"
    payload = read_checkpoint(ckpts["good"])
    np.random.seed(5)
    payload["rng"] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}  # as dsnet < this change did
    torch.save(payload, old)
    line = assert_one_line(run_cli(["eval", "--checkpoint", old], capsys), "dsnet checkpoint convert", "--trust")
    assert "numpy" in line
    code, _, _ = run_cli(["checkpoint", "convert", old, "--trust", "--out", tmp_path / "new.ckpt"], capsys)
    assert code == 0
    new = read_checkpoint(tmp_path / "new.ckpt")
    name, keys, *_ = new["rng"]["numpy"]
    assert name == "MT19937" and keys == np.random.get_state()[1].tolist()
    with pytest.raises(pickle.UnpicklingError):
        torch.load(old, weights_only=True)


# ------------------------------------------------------------------------------------------ files
def test_written_files_respect_the_umask(ckpts, tmp_path):
    from dsnet.utils.io import atomic_write_json

    old = os.umask(0o022)
    try:
        ckpt = save_checkpoint(tmp_path / "a.ckpt", read_checkpoint(ckpts["good"]))
        report = atomic_write_json({"a": 1}, tmp_path / "r.json")
    finally:
        os.umask(old)
    for path in (ckpt, report):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_saving_what_the_safe_loader_would_refuse_is_an_error(ckpts, tmp_path):
    payload = read_checkpoint(ckpts["good"])
    payload["metrics"] = {"top1": np.float64(50.0)}
    with pytest.raises(TypeError, match=r"checkpoint payload\['metrics'\]\['top1'\] is a numpy.float64"):
        save_checkpoint(tmp_path / "x.ckpt", payload)
    assert not (tmp_path / "x.ckpt").exists()
