"""dsnet.export: ONNX graphs equal eager within 1e-4 on inputs routed to every choice; CLI errors are one line."""

import json
import os

import pytest
import torch

import dsnet
from dsnet.cli import main
from dsnet.export import OnnxDynamicModel, check_dynamic, check_static, export_dynamic, export_static
from tests.conftest import perturb, small_input

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


# one small model per family, every routing choice: the export is generic over DynamicNet
FAMILIES = ["ds_resnet20_cifar", "ds_mobilenet_v1_cifar", "ds_vit_cifar"]


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return perturb(dsnet.create_model(request.param, gate_mode="pre"))  # exit: its own test below


def test_static_subnet_export_matches_eager_and_is_compact(model, tmp_path):
    path = export_static(model, 0, tmp_path / "s0.onnx")
    x = small_input(model, 6)
    assert check_static(model, 0, path, x) < 1e-4
    params = sum(p.numel() * 4 for p in model.extract(0).parameters())
    dense = sum(p.numel() * 4 for p in model.parameters())
    assert 0.8 * params < os.path.getsize(path) < 1.5 * params + 200_000 < dense


def test_dynamic_bundle_matches_eager_on_every_choice(model, tmp_path):
    manifest = export_dynamic(model, tmp_path / "dynamic.onnx", model_name="test")
    meta = json.loads(manifest.read_text())
    n = len(model.routing_space)
    assert meta["routing_space"] == model.routing_space and len(meta["post"]) == n
    x = small_input(model, 8)
    res = check_dynamic(model, manifest, x)
    assert res["choices_checked"] == list(range(n))
    assert res["forced_max_abs_diff"] < 1e-4 and res["gate_max_abs_diff"] < 1e-4 and res["gate_choices_agree"]
    # the routed graphs hold compact weights: the slim one is much smaller than the wide one
    sizes = [os.path.getsize(tmp_path / p["file"]) for p in meta["post"]]
    assert sizes[0] < sizes[-1] / 2
    # gate bias shifts decisions as in eager
    bias = [1e6] + [0.0] * (n - 1)
    bundle = OnnxDynamicModel(tmp_path / "dynamic.onnx")
    _, choice = bundle(x.numpy(), gate_bias=bias)
    assert (choice == 0).all()
    with torch.inference_mode():
        eager = model(x, gate_bias=bias)
    out, _ = bundle(x.numpy(), gate_bias=bias)
    assert float(abs(out - eager.numpy()).max()) < 1e-4


def test_exit_gate_bundle_matches_eager_on_every_choice(tmp_path):
    """gate_mode="exit": the pre-gate graph also returns the slimmest's answer, which is choice 0's output."""
    model = perturb(dsnet.create_model("ds_resnet8_tiny", gate_mode="exit"))
    with torch.no_grad():
        model.exit_head.out.weight.normal_(0, 3.0)
    manifest = export_dynamic(model, tmp_path / "exit.onnx")
    meta = json.loads(manifest.read_text())
    assert meta["gate_mode"] == "exit" and meta["pre"]["outputs"] == ["features", "gate_logits", "slim_logits"]
    assert meta["post"][0]["file"] is None and all(p["file"] for p in meta["post"][1:])
    x = small_input(model, 8, size=28)
    res = check_dynamic(model, manifest, x)
    assert res["choices_checked"] == list(range(len(model.routing_space)))
    assert res["forced_max_abs_diff"] < 1e-4 and res["gate_max_abs_diff"] < 1e-4 and res["gate_choices_agree"]


def test_cli_export_errors_are_one_line(tmp_path, capsys):
    assert main(["export", "--model", "ds_resnet20_cifar", "--subnet", "42", "--out", str(tmp_path / "x.onnx")]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(["export", "--model", "ds_resnet20_cifar", "--format", "tflite", "--out", str(tmp_path / "x")]) == 2
    assert "unknown export format" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError):
        OnnxDynamicModel(tmp_path / "nothing.onnx")


def test_cli_export_static_prints_check(tmp_path, capsys):
    out = tmp_path / "s1.onnx"
    assert (
        main(["export", "--model", "ds_mobilenet_v1_cifar", "--subnet", "1", "--out", str(out), "--check-batch", "4"])
        == 0
    )
    text = capsys.readouterr().out
    assert out.is_file() and "check OK" in text
