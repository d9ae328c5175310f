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


def test_the_profile_counts_every_convolution_and_its_macs_match_the_networks(tmp_path):
    from benchmarks import onnx_bundle_parts as parts
    from dsnet.export.onnx import export_static

    torch.manual_seed(0)
    model = dsnet.create_model("ds_resnet8_tiny", gate_mode="exit", routing_space=[0, 3]).eval()
    x = small_input(model, 4, size=28).numpy()
    macs = model.subnet_macs(tuple(x.shape[1:]))
    for k in (0, 3):
        path = export_static(model, k, tmp_path / f"static{k}.onnx")
        prof = parts.profile_convs(path, x, threads=1, runs=2, prefix=tmp_path / f"p{k}")
        assert prof["runs"] == 2 and 0 < prof["conv_ms"] <= prof["kernel_ms"]
        counted = sum(r["mmacs"] for r in prof["convs"]) * 1e6 / len(x)
        # every convolution of sub-network k; what is left is its classifier (and any other small layer)
        assert 0.9 * macs[k] < counted <= macs[k] * 1.001, (counted, macs[k])
