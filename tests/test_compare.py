"""``dsnet compare`` end to end on tiny synthetic data, its resumability, its harness pieces and bad input."""

import json

import pytest
import torch

import dsnet
from dsnet.baselines import usnet_widths
from dsnet.cli import main
from dsnet.compare import METHODS, gain_at_equal_macs
from dsnet.compare.methods.dynamic import cascade_forward
from tests.conftest import perturb, small_input

TINY = [
    "data.dataset=synthetic",
    "data.synthetic.num_train=192",
    "data.synthetic.num_val=64",
    "data.synthetic.channels=1",
    "data.synthetic.image_size=28",
    "data.batch_size=32",
    "data.eval_batch_size=64",
    "data.holdout=64",
    "supernet.epochs=1",
    "supernet.warmup_epochs=0",
    "supernet.bn_calibration_batches=1",
    "gate.epochs=1",
    "log.progress=false",
    "pss.group_size=16",
    "pss.noise_steps=2",
    "pss.finetune_steps=2",
    "pss.threshold=-1",  # the search fine-tunes at every step: the control must repeat each one
    "pss.calibration_batches=1",
    "eval.sweep=3",
    "timing.repeats=1",
    "timing.warmup=0",
    "timing.batch_size=8",
    "timing.batch1_images=2",
]


def _args(out, *extra):
    return (
        ["compare", "--fast", "--no-progress", "--out", str(out)] + [a for kv in TINY for a in ("--set", kv)] + [*extra]
    )


def test_compare_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(_args(out)) == 0
    screen = capsys.readouterr().out
    assert "Claims at equal MACs" in screen
    result = json.loads((out / "compare.json").read_text())
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "compare.md").read_text()
    assert "| method | point | top-1 % | MMACs |" in md
    methods = {p["method"] for p in result["points"]}
    expected = {"dsnet", "static", "cascade", "usnet", "alone", "lcnet", "pss", "pss_gate"}
    assert expected <= methods
    names = [p["name"] for p in result["points"]]
    assert len(names) == len(set(names))
    for p in result["points"]:
        assert 0.0 <= p["top1"] <= 100.0 and p["mmacs"] > 0
        assert p["latency_ms_b1"] > 0 and p["latency_ms_batch"] > 0 and p["batch_size"] == 8
        assert p["train_seconds"] > 0
    by = {m: [p for p in result["points"] if p["method"] == m] for m in methods}
    assert len(by["alone"]) == 4 and len(by["static"]) == 5  # 4 routed widths (+ the training-only largest)
    assert len(by["usnet"]) == len(usnet_widths(dsnet.create_model("ds_resnet8_tiny")))  # the whole grid
    assert any(p["name"] == "dsnet (trained gate)" for p in by["dsnet"])
    # alone #k has exactly the widths of static #k
    static_widths = {p["params"]["subnet"]: p["params"]["widths"] for p in by["static"]}
    for k, p in enumerate(sorted(by["alone"], key=lambda p: p["mmacs"])):
        assert p["params"]["widths"] == static_widths[k]
        assert p["mmacs"] == pytest.approx(next(q["mmacs"] for q in by["static"] if q["params"]["subnet"] == k))
    # the searched set is nested and every searched sub-network meets a uniform one's MACs
    search = json.loads((out / "seed0" / "pss" / "search" / "summary.json").read_text())
    nets = search["subnet_widths"]
    assert all(all(a <= b for a, b in zip(n1, n2)) for n1, n2 in zip(nets, nets[1:]))
    assert search["selection_split"] == "holdout"
    assert result["train_seconds"]["pss_gate"] > result["train_seconds"]["pss"]  # it includes the search
    assert "pss_vs_usnet" in result["claims"] and "static_vs_alone" in result["claims"]
    assert "pss_vs_pss_uniform" in result["claims"]
    # alone #k and static #k are the same plain network: the harness reports how far apart their timings came out
    assert result["timing_noise"]["identical_networks"] >= 4
    # the uniform control's chain meets each target exactly at DS-Net's uniform widths
    control = json.loads((out / "seed0" / "pss_uniform" / "search" / "summary.json").read_text())
    hits = sorted(control["chain"][h]["widths"] for h in control["hits"])
    assert hits == sorted(list(static_widths[k].values()) for k in range(4))
    # ... and it fine-tunes exactly as often as the search, for as many steps, where the search did
    assert search["finetunes"] > 0 and control["finetunes"] == search["finetunes"]
    assert control["finetune_steps_total"] == search["finetune_steps_total"] == 2 * search["finetunes"]
    assert control["finetune_schedule"] == [c["macs"] for c in search["chain"] if c["finetuned"]]
    assert result["notes"]["pss_uniform"]["finetune_steps_total"] == result["notes"]["pss"]["finetune_steps_total"]
    # training compute: sub-network forward+backward passes per method, in compare.json and compare.md
    tc = result["train_compute"]
    steps = tc["static"]["stages"]["dsnet/supernet"]["steps"]
    assert steps > 0 and tc["static"]["fwd_bwd"] == 4 * steps  # the sandwich: 4 sub-networks per step
    assert tc["alone"]["fwd_bwd"] == 4 * tc["alone"]["stages"]["alone/net0"]["steps"]  # 4 networks, 1 pass each
    assert tc["dsnet"]["fwd_bwd"] == tc["static"]["fwd_bwd"] and tc["dsnet"]["fwd_only"] > tc["static"]["fwd_only"]
    assert tc["pss"]["stages"]["pss/search"]["fwd_bwd"] > 0 and tc["lcnet"]["fwd_bwd"] > 0
    assert all(p["train_fwd_bwd"] == tc[p["method"]]["fwd_bwd"] for p in result["points"])
    assert "## Training compute per method" in md and "fwd+bwd passes" in md
    # LC-Net is timed in its fastest exact channel mode at each batch size, and says which
    for p in by["lcnet"]:
        assert set(p["variants"]) == {"gather", "mask"} and p["variants_max_abs_diff"] < 1e-4
        assert p["impl_batch"] in p["variants"] and p["impl_b1"] in p["variants"]
        assert p["latency_ms_batch"] == min(v["latency_ms_batch"] for v in p["variants"].values())
    # every claim says what differs between its two methods
    assert all(c["differs"] for c in result["claims"].values())
    assert "differs:" in md
    # a re-run trains nothing
    assert main(_args(out)) == 0
    log = capsys.readouterr().out
    assert "reusing finished stage" in log
    assert "epoch 1/1" not in log and ": training" not in log and "search from" not in log


def test_compare_rejects_unknown_methods_in_one_line(tmp_path, capsys):
    assert main(_args(tmp_path / "x", "--methods", "dsnet,lcnet_typo")) == 2
    err = capsys.readouterr().err
    assert "unknown method" in err and "lcnet_typo" in err and "Traceback" not in err
    assert main(_args(tmp_path / "x", "--set", "pss.treshold=2")) == 2
    assert "pss.treshold: unknown key" in capsys.readouterr().err
    assert main(_args(tmp_path / "x", "--set", "data.holdout=0")) == 2
    assert "data.holdout" in capsys.readouterr().err


def test_methods_are_registered_in_the_default_order():
    from dsnet.compare.methods import DEFAULT_ORDER

    assert set(DEFAULT_ORDER) <= set(METHODS)


def test_gain_at_equal_macs_interpolates_the_reference_without_extrapolating():
    ref = [{"mmacs": 1.0, "top1": 80.0}, {"mmacs": 3.0, "top1": 90.0}]
    pts = [{"mmacs": 2.0, "top1": 86.0}, {"mmacs": 3.0, "top1": 89.0}, {"mmacs": 5.0, "top1": 99.0}]
    gain = gain_at_equal_macs(pts, ref)
    assert gain == {"mean": 0.0, "max": 1.0, "min": -1.0, "points": 2}
    assert gain_at_equal_macs([{"mmacs": 9.0, "top1": 1.0}], ref) is None


def test_cascade_runs_the_widest_exactly_for_unsure_samples():
    model = perturb(dsnet.create_model("ds_resnet8_tiny", in_chans=1)).eval()
    x = small_input(model, batch=8)
    slim, wide = model.routing_space[0], model.routing_space[-1]
    with torch.no_grad():
        slim_out, wide_out = model(x, subnet=slim), model(x, subnet=wide)
        confidence = slim_out.softmax(-1).amax(-1)
        threshold = confidence.median().item()
        out = cascade_forward(model, x, threshold)
        unsure = confidence < threshold
        assert 0 < unsure.sum() < len(x)
        torch.testing.assert_close(out[unsure], wide_out[unsure], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out[~unsure], slim_out[~unsure], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(cascade_forward(model, x, 0.0), slim_out, rtol=1e-4, atol=1e-5)


def test_claims_near_chance_are_flagged():
    from dsnet.compare.run import check_claims

    def pts(method, accs):
        return [{"method": method, "name": f"{method} {i}", "mmacs": 1.0 + i, "top1": a} for i, a in enumerate(accs)]

    ok = check_claims(pts("dsnet", [80.0, 85.0]) + pts("static", [79.0, 84.0]), num_classes=10)["dsnet_vs_static"]
    assert (
        "warning" not in ok
        and ok["chance_top1"] == 10.0
        and ok["differs"] == "the router only (the same supernet weights)"
    )
    low = check_claims(pts("dsnet", [12.0, 40.0]) + pts("static", [11.0, 39.0]), num_classes=10)["dsnet_vs_static"]
    assert low["warning"].startswith("near chance: not meaningful") and low["near_chance"] == ["dsnet 0", "static 0"]
    usnet = check_claims(pts("usnet", [80.0]) + pts("static", [79.0, 84.0]), 10, {"supernet": {"distill": "ieb"}})
    assert "inplace vs ieb" in usnet["usnet_vs_static"]["differs"]


def test_seeds_aggregate_to_mean_and_spread_of_common_points():
    from dsnet.compare.run import aggregate_points

    seed0 = [{"name": "a", "top1": 80.0, "mmacs": 1.0}, {"name": "b", "top1": 90.0, "mmacs": 2.0}]
    seed1 = [{"name": "a", "top1": 82.0, "mmacs": 1.2}, {"name": "c", "top1": 50.0, "mmacs": 2.0}]
    (a,) = aggregate_points([seed0, seed1])  # "b" and "c" are not in every seed
    assert a["name"] == "a" and a["top1"] == 81.0 and a["mmacs"] == pytest.approx(1.1)
    assert a["top1_per_seed"] == [80.0, 82.0] and a["top1_std"] == pytest.approx(2**0.5)
