"""What a checkpoint or recipe may make dsnet do: name a registered model, hold weights; never run code.

A ``module:function`` factory name is code. It is built only when the user named it (a call, a recipe given to a
training command) or allowed it (``--trust-factory``, ``dsnet.trust_factories``); a file that names one is
refused, before anything is imported, through every entry point. Checkpoints carry a content digest: a flipped
byte is a clear error, and so are weights that are not finite.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

import dsnet
from dsnet.models.registry import is_trusted_factory, trusted_factories
from dsnet.train.checkpoint import load_model, read_checkpoint, save_checkpoint
from dsnet.train.config import load_config
from tests.test_errors import SETS, TINY, assert_one_line, run_cli

EVIL = "os:system"


def _payload(name: str = "ds_resnet8_tiny", kwargs: dict | None = None, **extra) -> dict:
    cfg = load_config(None, TINY)
    model = dsnet.create_model("ds_resnet8_tiny", num_classes=10, in_chans=1)
    return {
        "model": {"name": name, "kwargs": {"num_classes": 10, "in_chans": 1} if kwargs is None else kwargs},
        "state_dict": model.state_dict(),
        "ema_state_dict": model.state_dict(),
        "epoch": 0,
        "step": 1,
        "best_metric": 10.0,
        "config": cfg,
        "stage": "supernet",
        "bn_calibrated": True,
        **extra,
    }


@pytest.fixture()
def evil(tmp_path) -> tuple[Path, Path]:
    """A checkpoint that passes the safe loader and asks for ``os.system("touch MARKER")``, and the marker."""
    marker = tmp_path / "pwned"
    path = save_checkpoint(tmp_path / "evil.ckpt", _payload(EVIL, {"command": f"touch {marker}"}))
    return path, marker


def _commands(path: Path, t: Path) -> dict[str, list]:
    return {
        "eval": ["eval", "--checkpoint", path],
        "export": ["export", "--checkpoint", path, "--out", t / "m.onnx"],
        "bench-onnx": ["bench", "--checkpoint", path, "--batch-sizes", "1", "--repeats", "1", "--onnx"],
        "calibrate-bn": ["calibrate-bn", "--checkpoint", path, "--out", t / "cal.ckpt"],
        "train-gate": ["train", "gate", *SETS, "--supernet", path, "--out", t / "gate"],
        "search": ["search", "--checkpoint", path, "--out", t / "search"],
    }


@pytest.mark.parametrize("command", ["eval", "export", "bench-onnx", "calibrate-bn", "train-gate", "search"])
def test_a_checkpoint_naming_a_factory_runs_nothing(command, evil, tmp_path, capsys):
    path, marker = evil
    line = assert_one_line(run_cli(_commands(path, tmp_path)[command], capsys), str(path), EVIL, "--trust-factory")
    assert "nothing was built or imported" in line
    assert not marker.exists()


def test_the_recorded_config_is_checked_too(tmp_path, capsys):
    """A registered model.name does not launder a factory named in the checkpoint's config (what --resume reads)."""
    marker = tmp_path / "pwned"
    payload = _payload()
    payload["config"]["model"] = {"name": EVIL, "kwargs": {"command": f"touch {marker}"}}
    path = save_checkpoint(tmp_path / "cfg.ckpt", payload)
    with pytest.raises(ValueError, match="config model.name"):
        read_checkpoint(path)
    assert_one_line(run_cli(["eval", "--checkpoint", path], capsys), "--trust-factory")
    assert not marker.exists()


def test_resume_of_a_run_folder_that_names_a_factory(tmp_path, capsys):
    marker = tmp_path / "pwned"
    out = tmp_path / "run"
    out.mkdir()
    payload = _payload(EVIL, {"command": f"touch {marker}"})
    payload["config"]["model"] = {"name": EVIL, "kwargs": {"command": f"touch {marker}"}}
    save_checkpoint(out / "last.ckpt", payload)
    (out / "config.yaml").write_text(yaml.safe_dump(payload["config"]))
    assert_one_line(run_cli(["train", "supernet", "--out", out, "--resume"], capsys), EVIL, "--trust-factory")
    (out / "config.yaml").unlink()  # the checkpoint's own config
    assert_one_line(run_cli(["train", "supernet", "--out", out, "--resume"], capsys), EVIL, "--trust-factory")
    assert not marker.exists()


def test_config_check_of_a_recipe_naming_a_factory(tmp_path, capsys):
    marker = tmp_path / "pwned"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"name": EVIL, "kwargs": {"command": f"touch {marker}"}}}))
    assert_one_line(run_cli(["config", "check", recipe], capsys), EVIL, "--trust-factory")
    assert not marker.exists()


def test_python_api_refuses_too(evil):
    path, marker = evil
    with pytest.raises(ValueError, match="dsnet.trust_factories"):
        load_model(path)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------- allowing one
FACTORY = "tests.test_convert:residual_factory"


def tiny_checkpoint(tmp_path: Path) -> Path:
    model = dsnet.create_model(FACTORY)  # the user names it: builds
    payload = _payload(FACTORY, None, state_dict=model.state_dict(), ema_state_dict=model.state_dict())
    payload["config"]["model"] = {"name": FACTORY, "kwargs": {}}
    return save_checkpoint(tmp_path / "mine.ckpt", payload)


def test_an_allowed_factory_loads(tmp_path, capsys):
    path = tiny_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="--trust-factory tests.test_convert:residual_factory"):
        load_model(path)
    model, _ = load_model(path, trust_factories=[FACTORY])
    assert isinstance(model, dsnet.DynamicNet)
    with trusted_factories([FACTORY]):
        load_model(path)
        assert is_trusted_factory(FACTORY)
    assert not is_trusted_factory(FACTORY)  # the with block allowed it for its duration only
    code, lines, _ = run_cli(["calibrate-bn", "--checkpoint", path, "--out", tmp_path / "x.ckpt"], capsys)
    assert code == 2 and "--trust-factory" in lines[-1]


def test_the_environment_variable_allows_one(tmp_path, monkeypatch):
    path = tiny_checkpoint(tmp_path)
    monkeypatch.setenv("DSNET_TRUSTED_FACTORIES", f"other:thing, {FACTORY}")
    load_model(path)


def test_trusted_names_are_checked():
    with pytest.raises(ValueError, match="package.module:function"):
        dsnet.trust_factories(["not a name"])


# --------------------------------------------------------------------------------------------- integrity
def _flip_inside(path: Path, tensor: torch.Tensor) -> None:
    """Flip one byte inside ``tensor``'s stored data (torch stores tensor data uncompressed in the zip)."""
    data = bytearray(path.read_bytes())
    raw = tensor.contiguous().view(torch.uint8).numpy().tobytes()
    at = data.find(raw)
    assert at > 0, "tensor bytes not found in the file"
    data[at + len(raw) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_flipped_byte_is_a_clear_error(tmp_path, capsys):
    payload = _payload()
    key = "blocks.1.conv1.weight" if "blocks.1.conv1.weight" in payload["state_dict"] else None
    key = key or max(payload["state_dict"], key=lambda k: payload["state_dict"][k].numel())
    marked = torch.linspace(-1.0, 1.0, payload["state_dict"][key].numel()).view_as(payload["state_dict"][key])
    payload["state_dict"][key] = marked.clone()
    path = save_checkpoint(tmp_path / "a.ckpt", payload)
    read_checkpoint(path)  # intact: loads
    _flip_inside(path, marked)
    with pytest.raises(ValueError, match="corrupted"):
        read_checkpoint(path)
    assert_one_line(run_cli(["eval", "--checkpoint", path], capsys), str(path), "corrupted")


def test_digest_covers_values_not_just_tensors(tmp_path):
    path = save_checkpoint(tmp_path / "a.ckpt", _payload())
    ckpt = torch.load(path, weights_only=True)
    ckpt["epoch"] = 5  # an edited value, the file re-saved without recomputing the digest
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match="corrupted"):
        read_checkpoint(path)


def test_non_finite_weights_are_named(tmp_path, capsys):
    payload = _payload()
    key = next(k for k, v in payload["ema_state_dict"].items() if v.is_floating_point() and v.dim() > 1)
    bad = {k: v.clone() for k, v in payload["ema_state_dict"].items()}
    bad[key][0] = float("nan")
    path = save_checkpoint(tmp_path / "nan.ckpt", {**payload, "ema_state_dict": bad})
    line = assert_one_line(run_cli(["eval", "--checkpoint", path], capsys), "not finite", key, "EMA weights")
    assert str(path) in line


def test_checkpoints_from_before_digests_still_load(tmp_path):
    path = tmp_path / "old.ckpt"
    torch.save({"format": "dsnet-checkpoint-v1", **_payload()}, path)
    assert read_checkpoint(path)["epoch"] == 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
