"""benchmarks/onnx_bundle_parts.py: the bundle's parts and the static networks on its groups (no timing claim)."""

from __future__ import annotations

import pytest
import torch

import dsnet
from tests.conftest import perturb, small_input

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def test_parts_cover_every_routed_group_and_the_ratios_follow_from_the_medians(tmp_path):
    from benchmarks import onnx_bundle_parts as parts

    torch.manual_seed(0)
    model = perturb(dsnet.create_model("ds_resnet8_tiny", gate_mode="exit", routing_space=[0, 3]))
    with torch.no_grad():
        model.exit_head.out.weight.normal_(0, 3.0)  # a spread of decisions over the images
    x = small_input(model, 16, size=28).numpy()
    res = parts.measure(model, x, threads=1, repeats=1, out_dir=tmp_path)
    assert res["batch"] == 16 and sum(res["routing"]) == pytest.approx(1.0, abs=1e-3)
    ms = res["ms"]
    routed = [j for j, share in enumerate(res["routing"]) if share > 0]
    assert all(f"static{j}" in ms for j in routed)
    assert "post0" not in ms  # exit mode: choice 0 is answered by the pre-gate graph
    graphs = ms["pre"] + sum(ms[f"post{j}"] + ms[f"gather{j}"] for j in routed if f"post{j}" in ms)
    assert res["bundle_over_parts"] == pytest.approx(ms["bundle"] / graphs, rel=0.02)
    assert res["widest_over_bundle"] == pytest.approx(ms["widest"] / ms["bundle"], rel=0.02)
    groups = sum(ms[f"static{j}"] for j in routed)
    assert res["widest_over_routed_groups"] == pytest.approx(ms["widest"] / groups, rel=0.02)
    assert res["widest_over_slimmest_macs"] > 1
