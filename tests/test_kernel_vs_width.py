"""benchmarks/kernel_vs_width.py: the envelope, the interpolation and the merge, on hand-made numbers (no training)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_vs_width.py"
_spec = importlib.util.spec_from_file_location("kernel_vs_width", _PATH)
kvw = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kvw)

KERNEL, WIDTH = kvw.KERNEL, kvw.WIDTH


# ------------------------------------------------------------------------------------------ envelope
def test_pareto_front_drops_dominated_points():
    pts = [(3.0, 90.0), (1.0, 80.0), (2.0, 79.0), (2.5, 85.0), (4.0, 89.0), (2.5, 84.0)]
    # (2, 79) costs more than (1, 80) and is worse; (4, 89) is worse than the cheaper (3, 90); (2.5, 84) ties in cost
    assert kvw.pareto_front(pts) == [(1.0, 80.0), (2.5, 85.0), (3.0, 90.0)]


def test_pareto_front_equal_accuracy_keeps_the_cheaper():
    assert kvw.pareto_front([(2.0, 80.0), (1.0, 80.0), (3.0, 81.0)]) == [(1.0, 80.0), (3.0, 81.0)]
    assert kvw.pareto_front([]) == []


def test_envelope_exact_at_knots_and_linear_between():
    pts = [(1.0, 80.0), (2.0, 84.0), (4.0, 86.0)]
    for x, y in pts:
        assert kvw.envelope_at(pts, x) == pytest.approx(y)
    assert kvw.envelope_at(pts, 1.5) == pytest.approx(82.0)
    assert kvw.envelope_at(pts, 1.25) == pytest.approx(81.0)
    assert kvw.envelope_at(pts, 3.0) == pytest.approx(85.0)


def test_envelope_ignores_dominated_points_and_stays_flat_past_the_best():
    pts = [(1.0, 80.0), (2.0, 70.0), (3.0, 90.0), (5.0, 88.0)]
    assert kvw.envelope_at(pts, 2.0) == pytest.approx(85.0)  # between (1, 80) and (3, 90), not the dominated 70
    assert kvw.envelope_at(pts, 4.0) == pytest.approx(90.0)  # the dearer (5, 88) is dominated by (3, 90)
    assert kvw.envelope_at(pts, 5.0) == pytest.approx(90.0)


def test_envelope_out_of_range_is_none_never_extrapolated():
    pts = [(1.0, 80.0), (2.0, 84.0)]
    assert kvw.envelope_at(pts, 0.999) is None
    assert kvw.envelope_at(pts, 2.001) is None
    assert kvw.envelope_at(pts, math.nan) is None
    assert kvw.envelope_at([], 1.0) is None


def test_mean_std_is_the_sample_std():
    v = kvw.mean_std([1.0, 2.0, 3.0])
    assert v["mean"] == pytest.approx(2.0) and v["std"] == pytest.approx(1.0) and v["n"] == 3
    assert kvw.mean_std([5.0])["std"] is None
    with pytest.raises(ValueError):
        kvw.mean_std([])


def test_compare_point_per_seed_difference_and_out_of_range():
    ref = [[(1.0, 80.0), (3.0, 90.0)], [(1.0, 82.0), (3.0, 88.0)]]
    p = kvw.compare_point(2.0, [84.0, 86.0], ref)
    assert p["status"] == "in range"
    assert p["reference_top1"]["values"] == pytest.approx([85.0, 85.0])
    assert p["difference"]["values"] == pytest.approx([1.0, -1.0])
    assert p["difference"]["mean"] == pytest.approx(0.0) and p["difference"]["std"] == pytest.approx(math.sqrt(2))
    out = kvw.compare_point(3.5, [84.0, 86.0], ref)
    assert out["status"] == "out of range" and out["reference_top1"] is None and out["difference"] is None
    per_seed_x = kvw.compare_point([1.0, 3.0], [80.0, 80.0], ref)
    assert per_seed_x["x"] == pytest.approx(2.0)
    assert per_seed_x["difference"]["values"] == pytest.approx([0.0, 8.0])
    with pytest.raises(ValueError):
        kvw.compare_point(2.0, [84.0], ref)


# --------------------------------------------------------------------------------------------- merge
KERNEL_NETS = [(0, 1.6, True), (1, 1.8, False), (2, 2.2, True), (3, 2.3, True), (4, 3.9, True)]
WIDTH_NETS = [(0, 1.6, True), (1, 2.3, True), (2, 3.1, True), (3, 4.1, True)]


def _run(model, seed, top1s, gate=(85.0, 2.0), setting="full"):
    nets = KERNEL_NETS if model == KERNEL else WIDTH_NETS
    static = [
        {
            "index": i,
            "widths": {"stem": 16, "s3": 24},
            "kernels": {"stem": 3, "s3": 3},
            "mmacs": m,
            "top1": t,
            "routed": r,
            "routable": True,
        }
        for (i, m, r), t in zip(nets, top1s)
    ]
    routed = [i for i, _, r in nets if r]
    return {
        "model": model,
        "seed": seed,
        "setting": {"name": setting, "recipe": {"supernet": {"epochs": 6}}},
        "static": static,
        "gate": {
            "top1": gate[0],
            "mmacs": gate[1],
            "routing_space": routed,
            "mix": [1.0 / len(routed)] * len(routed),
        },
        "train_seconds": {"supernet": 100.0 + seed, "alone": None, "gate": 10.0},
    }


def _runs():
    return [
        _run(KERNEL, 0, [80.0, 81.0, 84.0, 84.5, 88.0], gate=(86.0, 2.0)),
        _run(KERNEL, 1, [82.0, 83.0, 86.0, 86.5, 90.0], gate=(88.0, 2.2)),
        _run(WIDTH, 0, [80.0, 83.0, 85.0, 87.0], gate=(84.0, 1.9)),
        _run(WIDTH, 1, [80.0, 85.0, 87.0, 89.0], gate=(86.0, 2.1)),
        _run(WIDTH, 2, [70.0, 70.0, 70.0, 70.0]),  # only the width model has seed 2: left out
    ]


def _latency():
    def subnets(nets, ms):
        routed = [(i, m) for i, m, r in nets if r]
        return [{"index": i, "mmacs": m, "ms": {"1": t, "256": t / 10}} for (i, m), t in zip(routed, ms)]

    return {
        "threads": 2,
        "runtime": "eager-split",
        "batch_sizes": [1, 256],
        "oversubscribed": False,
        "weights": {KERNEL: "fresh initialisation", WIDTH: "fresh initialisation"},
        "models": {
            KERNEL: {"subnets": subnets(KERNEL_NETS, [0.10, 0.20, 0.15, 0.30])},
            WIDTH: {"subnets": subnets(WIDTH_NETS, [0.10, 0.16, 0.25, 0.40])},
        },
    }


def test_merge_averages_seeds_present_for_both_models():
    merged = kvw.merge_runs(_runs())
    assert merged["seeds"] == [0, 1]
    assert merged["dropped_seeds"] == {KERNEL: [], WIDTH: [2]}
    w0 = merged["models"][WIDTH]["static"][1]
    assert w0["top1"]["mean"] == pytest.approx(84.0) and w0["top1"]["std"] == pytest.approx(math.sqrt(2))
    k = merged["models"][KERNEL]["static"][4]
    assert k["top1"]["mean"] == pytest.approx(89.0) and k["routed"] and k["ms"] is None
    gate = merged["models"][KERNEL]["gate"]
    assert gate["top1"]["mean"] == pytest.approx(87.0) and gate["mmacs"]["mean"] == pytest.approx(2.1)
    # seed 0: 86 at 2.0 MMACs, own envelope 81 + (84 - 81) * 0.2 / 0.4 = 82.5 -> gain +3.5
    assert gate["vs_own_static"]["gain"]["values"][0] == pytest.approx(3.5)
    assert gate["vs_own_static"]["difference"]["values"][0] == pytest.approx(-3.5)
    assert merged["train_seconds"][WIDTH]["supernet"]["mean"] == pytest.approx(100.5)
    assert "alone" not in merged["train_seconds"][WIDTH]  # None in the runs: not averaged
    assert merged["latency"] is None and merged["at_equal_latency"] == {}


def test_merge_at_equal_macs_interpolates_and_marks_out_of_range():
    merged = kvw.merge_runs(_runs())
    rows = {r["index"]: r for r in merged["at_equal_macs"]["all_static"]}
    assert rows[0]["status"] == "in range" and rows[0]["difference"]["mean"] == pytest.approx(1.0)  # 81 - 80
    # 2.3 MMACs is a knot of the kernel model: seed 0 84.5, seed 1 86.5; width 83, 85 -> +1.5 both
    assert rows[1]["reference_top1"]["values"] == pytest.approx([84.5, 86.5])
    assert rows[1]["difference"]["values"] == pytest.approx([1.5, 1.5]) and rows[1]["difference"]["std"] == 0.0
    # 3.1 MMACs: between the knots 2.3 and 3.9
    frac = (3.1 - 2.3) / (3.9 - 2.3)
    assert rows[2]["reference_top1"]["values"] == pytest.approx([84.5 + 3.5 * frac, 86.5 + 3.5 * frac])
    assert rows[3]["status"] == "out of range" and rows[3]["difference"] is None  # 4.1 > 3.9
    # routed only: the unrouted 1.8 MMACs network is no knot, so 1.6 reads the routed 1.6 point
    routed = {r["index"]: r for r in merged["at_equal_macs"]["routed_only"]}
    assert routed[0]["reference_top1"]["values"] == pytest.approx([80.0, 82.0])


def test_merge_at_equal_latency():
    merged = kvw.merge_runs(_runs(), _latency())
    assert set(merged["at_equal_latency"]) == {"1", "256"}
    rows = {r["index"]: r for r in merged["at_equal_latency"]["1"]}
    # kernel (ms, top-1) seed 0: (0.10, 80) (0.20, 84) (0.15, 84.5) (0.30, 88): (0.20, 84) is dominated
    assert rows[0]["x"] == pytest.approx(0.10) and rows[0]["reference_top1"]["values"][0] == pytest.approx(80.0)
    assert rows[1]["x"] == pytest.approx(0.16)
    assert rows[1]["reference_top1"]["values"][0] == pytest.approx(84.5 + 3.5 * (0.01 / 0.15))
    assert rows[2]["reference_top1"]["values"][0] == pytest.approx(84.5 + 3.5 * (0.10 / 0.15))
    assert rows[3]["status"] == "out of range"  # 0.40 ms > the kernel model's 0.30
    ms = {s["index"]: s["ms"] for s in merged["models"][KERNEL]["static"]}
    assert ms[1] is None and ms[2] == {"1": 0.20, "256": pytest.approx(0.02)}
    text = kvw.render_markdown(merged)
    assert "out of range" in text and "At equal latency, batch 256" in text and "| 1.60 |" in text


def test_merge_rejects_mismatched_settings_and_bad_inputs():
    runs = _runs()
    runs[1] = _run(KERNEL, 1, [82.0, 83.0, 86.0, 86.5, 90.0], setting="fast")
    with pytest.raises(ValueError, match="setting"):
        kvw.merge_runs(runs)
    runs = _runs()
    runs[1]["setting"]["recipe"]["supernet"]["epochs"] = 3
    with pytest.raises(ValueError, match="setting"):
        kvw.merge_runs(runs)
    with pytest.raises(ValueError, match="twice"):
        kvw.merge_runs([*_runs(), _run(WIDTH, 0, [1.0, 2.0, 3.0, 4.0])])
    with pytest.raises(ValueError, match="no results"):
        kvw.merge_runs([r for r in _runs() if r["model"] == WIDTH])
    with pytest.raises(ValueError, match="both models"):
        kvw.merge_runs([_runs()[0], _runs()[4]])
    runs = _runs()
    runs[0]["static"][2]["mmacs"] = 2.25
    with pytest.raises(ValueError, match="different sub-networks"):
        kvw.merge_runs(runs)
    lat = _latency()
    lat["models"][WIDTH]["subnets"][0]["mmacs"] = 1.7
    with pytest.raises(ValueError, match="latency"):
        kvw.merge_runs(_runs(), lat)
    with pytest.raises(ValueError):
        kvw.merge_runs([])


# ------------------------------------------------------------------------------- kernel transform
def _kernel_run(label, seed, top1s, gate_top1, kwargs):
    run = _run(KERNEL, seed, top1s, gate=(gate_top1, 2.0))
    run["model"] = label
    run["setting"]["recipe"]["model"] = {"name": None, "kwargs": kwargs}
    for s, k in zip(run["static"], (3, 7, 3, 7, 7)):
        s["kernels"] = {"stem": 3, "s3": k}
    return run


def _transform_runs():
    crop = [
        _kernel_run(KERNEL, 0, [80.0, 81.0, 84.0, 84.5, 88.0], 86.0, {}),
        _kernel_run(KERNEL, 1, [82.0, 83.0, 86.0, 86.5, 90.0], 88.0, {}),
        _kernel_run(KERNEL, 2, [1.0, 1.0, 1.0, 1.0, 1.0], 1.0, {}),  # no transform run for seed 2: left out
    ]
    on = {"kernel_transform": True}
    transformed = [
        _kernel_run(kvw.TRANSFORM, 0, [81.0, 81.0, 85.0, 84.0, 88.0], 87.0, on),
        _kernel_run(kvw.TRANSFORM, 1, [84.0, 83.0, 86.0, 87.5, 89.0], 88.5, on),
    ]
    return crop, transformed


def test_transform_comparison_per_subnet_and_by_kernel():
    cmp = kvw.compare_transform(*_transform_runs())
    assert cmp["seeds"] == [0, 1] and cmp["dropped_seeds"] == {KERNEL: [2], kvw.TRANSFORM: []}
    rows = {r["index"]: r for r in cmp["subnets"]}
    assert rows[0]["difference"]["values"] == [1.0, 2.0] and rows[0]["difference"]["mean"] == 1.5
    assert rows[3]["difference"]["values"] == [-0.5, 1.0]
    assert rows[0]["crop_top1"]["mean"] == 81.0 and rows[0]["transform_top1"]["mean"] == 82.5
    # by the largest kernel: 3x3 sub-networks #0, #2; 7x7 #1, #3, #4 (per seed mean over them, then mean +- std)
    k3, k7 = cmp["by_largest_kernel"]["3"], cmp["by_largest_kernel"]["7"]
    assert k3["subnets"] == [0, 2] and k3["difference"]["values"] == [1.0, 1.0]
    assert k7["subnets"] == [1, 3, 4] and k7["difference"]["values"] == pytest.approx([-0.5 / 3, 0.0])
    assert cmp["routed"]["subnets"] == [0, 2, 3, 4]
    assert cmp["routed"]["difference"]["values"] == pytest.approx([(1 + 1 - 0.5 + 0) / 4, (2 + 0 + 1 - 1) / 4])
    assert cmp["gate_difference"]["values"] == [1.0, 0.5]
    text = kvw.render_transform(cmp)
    assert "| 0 |" in text and "+1.50 ± 0.71" in text and "largest kernel 7x7 (3)" in text


def test_transform_comparison_rejects_unequal_runs():
    crop, transformed = _transform_runs()
    transformed[0]["setting"]["recipe"]["supernet"]["epochs"] = 3  # a difference beyond model.kwargs
    with pytest.raises(ValueError, match="setting"):
        kvw.compare_transform(crop, transformed)
    crop, transformed = _transform_runs()
    transformed[1]["static"][1]["mmacs"] = 1.9
    with pytest.raises(ValueError, match="different sub-networks"):
        kvw.compare_transform(crop, transformed)
    crop, transformed = _transform_runs()
    with pytest.raises(ValueError, match="expected"):
        kvw.compare_transform(transformed, crop)
    with pytest.raises(ValueError, match="both"):
        kvw.compare_transform(crop[2:], transformed)


# ---------------------------------------------------------------------------------- per-seed result
def test_seed_result_reads_the_quickstart_report(tmp_path):
    run_dir = tmp_path / "run"
    for stage, times in (("supernet", [10.0, 12.0]), ("gate", [3.0]), ("alone/net0", [4.0]), ("alone/net1", [5.0])):
        (run_dir / stage).mkdir(parents=True)
        lines = [json.dumps({"epoch": e, "epoch_time_s": t}) for e, t in enumerate(times)]
        (run_dir / stage / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    report = {
        "dataset": {"name": "fashion_mnist", "num_samples": 10000},
        "model": {"routing_space": [0, 2]},
        "static": [
            {
                "index": 0,
                "widths": {"s3": 24},
                "kernels": {"s3": 3},
                "macs": 1_600_000,
                "top1": 80.0,
                "routed": True,
                "in_routing_space": True,
            },
            {
                "index": 1,
                "widths": {"s3": 24},
                "kernels": {"s3": 5},
                "macs": 1_800_000,
                "top1": 81.0,
                "routed": True,
                "in_routing_space": False,
            },
            {
                "index": 2,
                "widths": {"s3": 24},
                "kernels": {"s3": 7},
                "macs": 2_200_000,
                "top1": 82.0,
                "routed": True,
                "in_routing_space": True,
            },
        ],  # fmt: skip
        "dynamic": {"top1": 81.5, "mean_macs": 1_900_000, "histogram": {"fractions": [0.5, 0.5]}},
        "alone": [{"index": 0, "widths": {"s3": 24}, "macs": 1_600_000, "top1": 79.0}],
    }
    result = {
        "timings_s": {"supernet": 0.0},
        "stages": {"supernet": "reused"},
        "claims": {"best_matching_point": None},
        "files": {"gate": "g.ckpt", "supernet": "s.ckpt", "report": "r.json"},
    }
    res = kvw.seed_result(KERNEL, 3, {"name": "full"}, result, report, run_dir, steps_per_epoch=4)
    assert [s["routed"] for s in res["static"]] == [True, False, True]
    assert res["static"][1]["mmacs"] == pytest.approx(1.8) and res["static"][1]["kernels"] == {"s3": 5}
    assert res["gate"]["mmacs"] == pytest.approx(1.9) and res["gate"]["mix"] == [0.5, 0.5]
    assert res["train_seconds"] == {"supernet": 22.0, "alone": 9.0, "gate": 3.0}
    assert res["supernet_step_seconds"] == pytest.approx(11.0 / 4)
    assert res["checkpoints"]["gate"] == "g.ckpt" and res["alone"][0]["mmacs"] == pytest.approx(1.6)


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    merged = kvw.merge_runs(_runs(), _latency())
    path = kvw.plot(merged, tmp_path / "kvw.png")
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
