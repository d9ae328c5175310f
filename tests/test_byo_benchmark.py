"""benchmarks/byo_fashion_mnist.py: the alone recipe (stage I's for one network), plain-BN recalibration, the
routed-vs-scratch summary (tiny synthetic data; no Fashion-MNIST)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import dsnet
from benchmarks import byo_fashion_mnist as byo
from dsnet.quickstart import QUICKSTART
from dsnet.train.config import apply_overrides, resolve_config
from dsnet.train.run import selection_loader, top1_accuracy

TINY = [
    "data.dataset=synthetic",
    "data.synthetic.num_train=320",
    "data.synthetic.num_val=64",
    "data.synthetic.channels=1",
    "data.synthetic.image_size=16",
    "data.holdout=64",
    "data.batch_size=32",
    "data.eval_batch_size=64",
    "supernet.epochs=3",
    "supernet.bn_calibration_batches=3",
    "log.progress=false",
    "log.tensorboard=false",
]


def test_calibrate_plain_bn_is_a_cumulative_average_and_restores_modes():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    net[1].running_mean.fill_(5.0)
    batches = [(torch.randn(8, 1, 6, 6) * (i + 1), torch.zeros(8, dtype=torch.long)) for i in range(4)]
    weights = [p.detach().clone() for p in net.parameters()]
    byo.calibrate_plain_bn(net, batches, num_batches=3)
    with torch.no_grad():
        means = torch.stack([net[0](x).mean((0, 2, 3)) for x, _ in batches[:3]]).mean(0)
    torch.testing.assert_close(net[1].running_mean, means)
    assert net[1].momentum == 0.1 and not net.training and not net[1].training
    assert all(torch.equal(a, b) for a, b in zip(weights, net.parameters(), strict=True))
    with pytest.raises(ValueError, match="at least one batch"):
        byo.calibrate_plain_bn(net, batches, num_batches=0)


def test_resnet8_initialises_residual_branches_as_ds_resnet8_tiny():
    tiny = dsnet.create_model("ds_resnet8_tiny", num_classes=10, in_chans=1)
    plain = byo.ResNet8()
    for blk, layer in zip(tiny.blocks, (plain.layer1, plain.layer2, plain.layer3), strict=True):
        assert torch.equal(blk.bn2.weight.detach(), layer[0].bn2.weight.detach())  # both ones: no zero-init
    assert float(byo.ResNet8(zero_init_residual=True).layer2[0].bn2.weight.detach().abs().max()) == 0.0


def test_train_alone_keeps_the_best_epochs_ema_weights_recalibrated(tmp_path):
    cfg = resolve_config(apply_overrides(copy.deepcopy(QUICKSTART), list(TINY)))
    result = byo.train_alone(cfg, tmp_path)
    history = result["history"]
    assert len(history) == 3 and result["selection_split"] == "holdout"
    best = max(range(3), key=lambda i: (history[i]["ema_top1"], -i))  # the first of the best
    assert result["best_epoch"] == best + 1
    assert result["holdout_top1"] == round(history[best]["ema_top1"], 2)
    # alone.pth: a plain torchvision-format state_dict, the weights the result measured
    net = byo.ResNet8(10, 1)
    net.load_state_dict(torch.load(tmp_path / "alone.pth", weights_only=True))
    holdout, _ = selection_loader(cfg["data"], cfg["seed"], torch.device("cpu"))
    assert round(top1_accuracy(net, holdout, torch.device("cpu")), 2) == result["holdout_top1_calibrated"]
    assert int(net.bn1.num_batches_tracked) == 3  # recalibrated on supernet.bn_calibration_batches batches


def _subnets(rows):
    return {"subnets": [{"mmacs": m, "widths": w, "test_top1": t} for m, w, t in rows]}


def test_routed_vs_matches_routed_rows_by_mmacs():
    results = {
        "scratch-total": _subnets([(1.4, "a", 80.0), (4.26, "b", 84.0), (10.15, "c (training only)", 87.0)]),
        "import": _subnets([(4.26, "b", 83.0), (5.54, "d", 82.0), (10.15, "c", 86.5)]),
        "make_dynamic": _subnets([(10.15, "e (training only)", 90.0), (5.54, "d", 82.0)]),
    }
    d = byo.routed_vs(results, "import", "scratch-total")
    assert d == {"mean": -0.75, "min": -1.0, "max": -0.5, "mmacs": [4.26, 10.15], "reference_training_only": [10.15]}
    assert byo.routed_vs(results, "make_dynamic", "scratch-total") is None  # its only match is training only
    assert byo.routed_vs(results, "import-noorder", "scratch-total") is None


def test_routed_vs_curve_interpolates_the_reference_inside_its_range():
    results = {
        "scratch-total": _subnets([(1.0, "a", 80.0), (3.0, "b (training only)", 84.0)]),
        "import": _subnets([(2.0, "c", 83.0), (3.0, "d", 83.0), (4.0, "e", 90.0), (1.0, "f (training only)", 1.0)]),
    }
    d = byo.routed_vs_curve(results, "import", "scratch-total")
    assert d == {"mean": 0.0, "min": -1.0, "max": 1.0, "mmacs": [2.0, 3.0], "diffs": [1.0, -1.0]}
    assert byo.routed_vs_curve(results, "make_dynamic", "scratch-total") is None


def _run_file(path, source_top1: float, routed: list[float], *, scratch_total: list[float] | None = None) -> None:
    import json

    sub = [{"mmacs": m, "widths": "w", "test_top1": t} for m, t in zip((2.0, 4.0), routed, strict=True)]
    run = {
        "alone": {"test_top1": source_top1},
        "import": {
            "subnets": sub,
            "source_holdout_top1": 80.0,
            "largest_holdout_top1": 81.0,
            "finetune": {"teacher": "distill", "distill": "none", "lr_scale": 0.3},
        },
    }
    if scratch_total is not None:
        run["scratch-total"] = {"subnets": [{"mmacs": m, "widths": "w", "test_top1": t} for m, t in scratch_total]}
    path.write_text(json.dumps(run))


def test_finetune_choice_reads_each_variant_against_its_seeds_scratch_total(tmp_path):
    from benchmarks import byo_finetune_choice as choice

    ref = [(1.0, 84.0), (5.0, 88.0)]  # the curve: 85 at 2 MMACs, 87 at 4
    _run_file(tmp_path / "byo_ft2_src01_seed0.json", 80.0, [83.0, 86.0], scratch_total=ref)
    _run_file(tmp_path / "byo_ft2_lab03_seed0.json", 80.0, [84.0, 87.0])  # no scratch-total: the src01 run's
    _run_file(tmp_path / "byo_folder4000_ft6_lab03_seed1.json", 70.0, [75.0, 76.0], scratch_total=ref)
    rows = choice.table(tmp_path)
    assert rows["subset12800"]["src01"]["mean_routed_vs_scratch_total"] == -1.5
    assert rows["subset12800"]["lab03"]["mean_routed_vs_scratch_total"] == -0.5
    assert rows["subset12800"]["lab03"]["mean_largest_minus_source_test"] == 7.0
    assert list(rows["folder4000"]["lab03"]["seeds"]) == [1]  # only the seed that ran
    assert "| subset12800 | labels | x0.3 | 0 | -0.50 |" in choice.render(rows)
    _run_file(tmp_path / "byo_ft2_lab01_seed0.json", 79.0, [84.0, 87.0])  # another source: not comparable
    with pytest.raises(SystemExit, match="source differs"):
        choice.table(tmp_path)
