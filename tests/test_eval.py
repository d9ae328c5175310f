"""``dsnet eval``: the one-pass evaluation report, its arithmetic gate-bias sweep, the plot and the CLI."""

import json
import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import dsnet
from dsnet.cli import main
from dsnet.evaluation import SCHEMA_VERSION, auto_biases, bias_ramp, evaluate, plot_report
from tests.conftest import perturb, small_input

NAME = "ds_mobilenet_v1_cifar"
N = 64
BIASES = [-1e6, -2.0, 2.0, 5.0, 1e6]


@pytest.fixture(scope="module", params=["exit", "pre"])
def setup(request):
    model = perturb(dsnet.create_model(NAME, num_classes=4, gate_mode=request.param), seed=1)
    x = small_input(model, batch=N, size=32, seed=7)
    y = torch.arange(N) % 4
    y[:5] = 3  # unequal class counts, so per-class checks are not trivially N/4
    loader = DataLoader(TensorDataset(x, y), batch_size=24)  # a ragged last batch
    report = evaluate(
        model, loader, biases=BIASES, progress=False, model_name=NAME, dataset_name="toy", class_names="abcd"
    )
    return model, x, y, report


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_histogram(h, r, total):
    assert set(h) == {"counts", "fractions"}
    assert len(h["counts"]) == len(h["fractions"]) == r
    assert all(isinstance(c, int) for c in h["counts"]) and sum(h["counts"]) == total
    assert all(_is_num(f) for f in h["fractions"])
    if total:
        assert sum(h["fractions"]) == pytest.approx(1.0)


def test_schema(setup):
    model, _, _, report = setup
    json.loads(json.dumps(report))  # JSON-serialisable, no tensors or numpy scalars
    assert set(report) == {
        "schema_version", "model", "dataset", "input_size", "top5_k", "bias_ramp", "routing_choices",
        "gate_mode", "routing", "static", "dynamic", "sweep", "baselines", "summary", "consistency",
    }  # fmt: skip
    assert report["gate_mode"] == model.gate_mode
    assert report["schema_version"] == SCHEMA_VERSION
    assert report["model"] == {
        "name": NAME,
        "num_classes": 4,
        "routing_space": model.routing_space,
        "gate_head_macs": model.gate_head_macs(),
        "budget_bias": model.gate.budget_bias.tolist(),
    }
    assert report["dataset"] == {"name": "toy", "split": "val", "num_samples": N, "class_names": list("abcd")}
    assert report["input_size"] == [3, 32, 32] and report["top5_k"] == 4
    r = len(model.routing_space)
    assert report["bias_ramp"] == pytest.approx(np.linspace(1, -1, r).tolist())
    assert [c["subnet"] for c in report["routing_choices"]] == model.routing_space
    for c in report["routing_choices"]:
        assert set(c) == {"choice", "subnet", "macs"} and all(isinstance(v, int) for v in c.values())

    assert len(report["static"]) == len(model.subnets)
    for s, net in zip(report["static"], model.subnets):
        assert set(s) == {"index", "widths", "macs", "top1", "top1_pm95", "top5", "routed", "in_routing_space"}
        assert s["index"] == net.index and s["widths"] == net.as_dict()
        assert isinstance(s["macs"], int) and _is_num(s["top1"]) and _is_num(s["top5"])
        assert s["routed"] is net.routed and s["in_routing_space"] is (net.index in model.routing_space)
    assert report["static"][-1]["routed"] is False  # the training-only largest is reported, flagged

    dyn = report["dynamic"]
    assert set(dyn) == {"bias", "top1", "top1_pm95", "top5", "mean_macs", "histogram", "per_class"}
    assert dyn["bias"] == 0.0 and all(_is_num(dyn[k]) for k in ("top1", "top5", "mean_macs"))
    _check_histogram(dyn["histogram"], r, N)
    for c in dyn["per_class"]:
        assert set(c) == {"class", "name", "count", "histogram"}
        _check_histogram(c["histogram"], r, c["count"])
    assert [c["name"] for c in dyn["per_class"]] == list("abcd")

    for p in report["sweep"]:
        assert set(p) == {
            "bias", "top1", "top5", "mean_macs", "histogram",
            "static_top1_at_macs", "cascade_top1_at_macs", "oracle_top1_at_macs",
            "top1_pm95", "gain_over_static_pm95", "gain_over_cascade_pm95",
        }  # fmt: skip
        assert all(_is_num(v) for k, v in p.items() if k != "histogram")
        _check_histogram(p["histogram"], r, N)
    assert [p["bias"] for p in report["sweep"]] == sorted(BIASES + [0.0])

    s = report["summary"]
    assert set(s) == {
        "widest_routed", "dynamic_top1", "dynamic_mean_macs", "mac_reduction", "static_top1_at_dynamic_macs",
        "top1_gain_at_equal_macs", "interpolation_clamped", "cascade_top1_at_dynamic_macs", "gain_over_cascade",
        "oracle_top1_at_dynamic_macs", "oracle_capture", "random_router", "sweep_min_gain_over_static",
        "sweep_min_gain_over_cascade", "dynamic_top1_pm95", "top1_gain_at_equal_macs_pm95",
        "gain_over_cascade_pm95", "sweep_min_gain_over_static_pm95", "sweep_min_gain_over_cascade_pm95",
    }  # fmt: skip
    assert set(s["widest_routed"]) == {"index", "macs", "top1", "top1_pm95"}
    assert isinstance(s["interpolation_clamped"], bool)
    optional = ("oracle_capture", "sweep_min_gain_over_static", "sweep_min_gain_over_cascade")
    optional += tuple(f"{k}_pm95" for k in optional[1:])
    assert all(
        _is_num(s[k]) or (k in optional and s[k] is None)
        for k in s
        if k not in ("widest_routed", "interpolation_clamped", "random_router")
    )
    b = report["baselines"]
    assert set(b) == {"pre_gate_macs", "cascade", "oracle", "random"}
    assert 0 < b["pre_gate_macs"] < report["static"][0]["macs"]
    assert [p["threshold"] for p in b["cascade"]] == sorted(p["threshold"] for p in b["cascade"])
    assert b["cascade"][0]["escalated"] == 0.0 and b["cascade"][-1]["escalated"] == 1.0
    assert [p["mean_macs"] for p in b["oracle"]] == sorted(p["mean_macs"] for p in b["oracle"])
    assert b["random"]["mix"] == pytest.approx(dyn["histogram"]["fractions"])
    assert set(report["consistency"]) == {"top1_mismatches", "max_rel_logit_diff"}


def test_intervals_are_wilson_and_paired_on_direct_per_image_correctness(setup):
    from dsnet.evaluation.stats import interpolated_correctness, paired_difference, top1_interval

    model, x, y, report = setup
    with torch.inference_mode():
        dyn = model(x).argmax(1) == y
        right = {s["index"]: model(x, subnet=s["index"]).argmax(1) == y for s in report["static"]}
    for s in report["static"]:
        assert s["top1_pm95"] == pytest.approx(top1_interval(int(right[s["index"]].sum()), N).half_width)
    s = report["summary"]
    assert s["dynamic_top1_pm95"] == pytest.approx(top1_interval(int(dyn.sum()), N).half_width)
    routed = sorted((r for r in report["static"] if r["routed"]), key=lambda r: r["macs"])
    curve = interpolated_correctness(
        [r["macs"] for r in routed], [right[r["index"]] for r in routed], s["dynamic_mean_macs"]
    )
    margin = paired_difference(dyn, curve)
    assert margin.estimate == pytest.approx(s["top1_gain_at_equal_macs"])
    assert s["top1_gain_at_equal_macs_pm95"] == pytest.approx(margin.half_width) and margin.half_width > 0
    for p in report["sweep"]:
        assert p["top1_pm95"] > 0 and p["gain_over_static_pm95"] >= 0 and p["gain_over_cascade_pm95"] >= 0


def test_static_accuracy_matches_direct_computation(setup):
    model, x, y, report = setup
    macs = model.subnet_macs((3, 32, 32))
    with torch.inference_mode():
        for s in report["static"]:
            logits = model(x, subnet=s["index"])
            assert s["top1"] == pytest.approx(100 * (logits.argmax(1) == y).double().mean().item())
            top = logits.topk(report["top5_k"], dim=1).indices
            assert s["top5"] == pytest.approx(100 * (top == y[:, None]).any(1).double().mean().item())
            assert s["macs"] == macs[s["index"]]


def test_dynamic_matches_direct_forward(setup):
    model, x, y, report = setup
    with torch.inference_mode():
        result = model(x, return_routing=True)
    assert report["dynamic"]["top1"] == pytest.approx(100 * (result.logits.argmax(1) == y).double().mean().item())
    counts = torch.bincount(result.choice, minlength=len(model.routing_space)).tolist()
    assert report["dynamic"]["histogram"]["counts"] == counts
    assert len([c for c in counts if c]) >= 2, "the test gate should spread samples over several choices"
    expected_macs = dsnet.count_macs(model, x).double().mean().item()
    assert report["dynamic"]["mean_macs"] == pytest.approx(expected_macs)
    assert report["consistency"]["top1_mismatches"] == 0
    zero = next(p for p in report["sweep"] if p["bias"] == 0.0)
    assert zero["top1"] == pytest.approx(report["dynamic"]["top1"])  # arithmetic == real forward
    assert zero["histogram"] == report["dynamic"]["histogram"]


def test_sweep_points_match_biased_forward(setup):
    model, x, y, report = setup
    ramp = bias_ramp(len(model.routing_space))
    table = model.routing_macs((3, 32, 32)).double()
    for p in report["sweep"]:
        with torch.inference_mode():
            result = model(x, return_routing=True, gate_bias=p["bias"] * ramp)
        assert p["top1"] == pytest.approx(100 * (result.logits.argmax(1) == y).double().mean().item())
        assert p["mean_macs"] == pytest.approx(table[result.choice].mean().item())


def test_sweep_monotone_and_extremes(setup):
    model, _, _, report = setup
    macs = [p["mean_macs"] for p in report["sweep"]]  # ascending bias
    assert all(a >= b for a, b in zip(macs, macs[1:])), "larger bias must not cost more MACs"
    choices = model.routing_macs((3, 32, 32))  # per choice; tested against measured counts in test_exit_gate
    slim, wide = report["sweep"][-1], report["sweep"][0]
    assert slim["bias"] == 1e6 and slim["histogram"]["counts"][0] == N
    assert slim["mean_macs"] == choices[0].item()
    assert wide["histogram"]["counts"][-1] == N
    assert wide["mean_macs"] == choices[-1].item()
    if model.gate_mode == "pre":  # the paper's gate: a choice costs its sub-network and the slimming head
        table = model.subnet_macs((3, 32, 32))
        assert slim["mean_macs"] == table[model.routing_space[0]] + model.gate_head_macs()
        assert wide["mean_macs"] == table[model.routing_space[-1]] + model.gate_head_macs()


def test_histograms_sum(setup):
    _, _, y, report = setup
    dyn = report["dynamic"]
    assert sum(dyn["histogram"]["counts"]) == N
    class_counts = torch.bincount(y, minlength=4).tolist()
    assert [c["count"] for c in dyn["per_class"]] == class_counts
    per_choice = np.sum([c["histogram"]["counts"] for c in dyn["per_class"]], axis=0).tolist()
    assert per_choice == dyn["histogram"]["counts"]


def test_summary(setup):
    _, _, _, report = setup
    s = report["summary"]
    routed = sorted((p for p in report["static"] if p["routed"]), key=lambda p: p["macs"])
    assert s["widest_routed"]["index"] == routed[-1]["index"]
    assert s["mac_reduction"] == pytest.approx(routed[-1]["macs"] / report["dynamic"]["mean_macs"])
    interp = np.interp(report["dynamic"]["mean_macs"], [p["macs"] for p in routed], [p["top1"] for p in routed])
    assert s["static_top1_at_dynamic_macs"] == pytest.approx(interp)
    assert s["top1_gain_at_equal_macs"] == pytest.approx(report["dynamic"]["top1"] - interp)


def test_auto_biases_span_widest_to_slimmest():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 4, generator=g) * 3
    ramp = bias_ramp(4)
    biases = auto_biases(logits, ramp, 9)
    assert 0.0 in biases and biases == sorted(biases) and 9 <= len(biases) <= 10
    first = (logits + biases[0] * ramp).argmax(1)
    last = (logits + biases[-1] * ramp).argmax(1)
    assert (first == 3).all() and (last == 0).all()
    assert auto_biases(logits[:, :1], bias_ramp(1), 9) == [0.0]


def test_plot_is_png(setup, tmp_path):
    report = setup[3]
    path = plot_report(report, tmp_path / "sub" / "report.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    from PIL import Image

    with Image.open(path) as image:
        image.verify()


def _write_checkpoint(path, data_cfg):
    from dsnet.train.checkpoint import save_checkpoint

    kwargs = {"num_classes": 4}
    model = perturb(dsnet.create_model(NAME, **kwargs), seed=2)
    save_checkpoint(
        path,
        {"model": {"name": NAME, "kwargs": kwargs}, "state_dict": model.state_dict(), "config": {"data": data_cfg}},
    )


def test_cli_end_to_end(tmp_path, capsys):
    pytest.importorskip("dsnet.data")
    ckpt = tmp_path / "best.ckpt"
    data_cfg = {
        "dataset": "synthetic",
        "workers": 0,
        "eval_batch_size": 32,
        "synthetic": {"num_classes": 4, "num_train": 16, "num_val": 48, "channels": 3, "image_size": 32},
    }
    _write_checkpoint(ckpt, data_cfg)
    out_json, out_png = tmp_path / "report.json", tmp_path / "report.png"
    argv = ["eval", "--checkpoint", str(ckpt), "--subset", "40", "--batch-size", "16", "--biases", "-3,0,3"]
    assert main([*argv, "--json", str(out_json), "--plot", str(out_png), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "gate-bias sweep" in text and "dynamic (trained gate, b=0)" in text and "training only" in text
    report = json.loads(out_json.read_text())
    assert report["dataset"]["num_samples"] == 40 and report["model"]["name"] == NAME
    assert [p["bias"] for p in report["sweep"]] == [-3.0, 0.0, 3.0]
    assert out_png.read_bytes()[:4] == b"\x89PNG"


def test_cli_missing_checkpoint_is_one_line(tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path / "nope.ckpt")]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint at" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_checkpoint_without_data_config(tmp_path, capsys):
    ckpt = tmp_path / "bare.ckpt"
    _write_checkpoint(ckpt, None)
    assert main(["eval", "--checkpoint", str(ckpt)]) == 2
    assert "records no data config" in capsys.readouterr().err


def test_cli_data_overrides():
    import argparse

    from dsnet.cli.eval import data_config

    ckpt = {"config": {"data": {"dataset": "cifar10", "root": "/data/c10", "val_subset": None, "workers": 2}}}
    args = argparse.Namespace(checkpoint="c", data=None, dataset=None, subset=100, batch_size=64, workers=0)
    cfg = data_config(ckpt, args)
    assert cfg == {"dataset": "cifar10", "root": "/data/c10", "val_subset": 100, "workers": 0, "eval_batch_size": 64}
    assert ckpt["config"]["data"]["val_subset"] is None  # the checkpoint's config is not modified
    args.dataset = "cifar100"  # another dataset: the recorded root no longer applies
    assert "root" not in data_config(ckpt, args)
    args.data = "/elsewhere"
    assert data_config(ckpt, args)["root"] == "/elsewhere"


def test_baselines_match_direct_forwards(setup):
    """The report's cascade, oracle and random router agree with forwards of the slimmest and widest choices."""
    model, x, y, report = setup
    space = model.routing_space
    macs = model.subnet_macs((3, 32, 32))
    with torch.inference_mode():
        slim, wide = model(x, subnet=space[0]), model(x, subnet=space[-1])
        right = torch.stack([(model(x, subnet=k).argmax(1) == y) for k in space], dim=1)
    conf = torch.softmax(slim, 1).max(1).values
    pre = report["baselines"]["pre_gate_macs"]
    for point in report["baselines"]["cascade"]:
        esc = conf < point["threshold"]
        out = torch.where(esc[:, None], wide, slim)
        assert point["top1"] == pytest.approx(100 * (out.argmax(1) == y).double().mean().item())
        assert point["mean_macs"] == pytest.approx(
            macs[space[0]] + esc.double().mean().item() * (macs[space[-1]] - pre)
        )
    oracle = report["baselines"]["oracle"][-1]
    assert oracle["top1"] == pytest.approx(100 * right.any(1).double().mean().item())
    rand = report["baselines"]["random"]
    mix = torch.tensor(report["dynamic"]["histogram"]["fractions"], dtype=torch.float64)
    assert rand["top1"] == pytest.approx(100 * float((mix * right.double().mean(0)).sum()))
    assert report["summary"]["oracle_top1_at_dynamic_macs"] >= report["dynamic"]["top1"] - 1e-9  # a ceiling


def test_evaluate_restores_each_modules_mode():
    """A stage II model (train mode, frozen BN in eval mode) comes back exactly as it was."""
    from dsnet.train.gate import freeze_backbone

    model = perturb(dsnet.create_model("ds_resnet8_tiny", num_classes=4)).train()
    freeze_backbone(model)
    before = [m.training for m in model.modules()]
    x = small_input(model, batch=8, size=28)
    evaluate(model, DataLoader(TensorDataset(x, torch.arange(8) % 4), batch_size=8), progress=False)
    assert [m.training for m in model.modules()] == before


def test_worst_sweep_margin_ignores_points_that_route_to_one_subnet():
    from dsnet.evaluation.core import _min_gain

    def point(macs, top1, static, fractions):
        return {"mean_macs": macs, "top1": top1, "static_top1_at_macs": static, "histogram": {"fractions": fractions}}

    points = [
        point(1.0, 80.0, 80.0, [1.0, 0.0]),  # everything to the slimmest: a static point, margin 0 by construction
        point(1.5, 83.0, 82.0, [0.5, 0.5]),
        point(1.8, 84.5, 84.0, [0.2, 0.8]),
        point(5.0, 90.0, 80.0, [0.5, 0.5]),  # outside the static range: not counted
    ]
    assert _min_gain(points, "static_top1_at_macs", [1.0, 2.0]) == pytest.approx(0.5)
    assert _min_gain(points[:1], "static_top1_at_macs", [1.0, 2.0]) is None
