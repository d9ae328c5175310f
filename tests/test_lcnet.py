"""LC-Net: real block skipping, per-sample channel subsets, per-sample MACs, training targets, resume, bench."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import dsnet
from dsnet.cli import main
from dsnet.layers.channel_subset import ChannelSubsetConvBN, topk_channels
from dsnet.models.lcnet import LCResNet
from dsnet.train.checkpoint import read_checkpoint
from dsnet.train.config import load_config
from dsnet.train.lcnet import calibrate_thresholds, evaluate_lcnet, train_lcnet


def perturb_lc(model: LCResNet, x: torch.Tensor, seed: int = 0) -> LCResNet:
    """Non-trivial BN statistics and affine, distinct saliencies, and L-Net thresholds at each block's median margin.

    A fresh model's residual branches are zero (zero-init last BN), its
    saliencies nearly tied and its gates all on the same side: a wrong channel
    set or a wrong skip would go unnoticed. After this, every skippable block
    runs for about half of ``x`` (checked by the tests that need it).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 + 0.25)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
        for blk in model.blocks:
            blk.cnet.fc.weight.copy_(torch.randn(blk.cnet.fc.weight.shape, generator=g))
            if blk.lnet is not None:
                blk.lnet.fc2.weight.copy_(torch.randn(blk.lnet.fc2.weight.shape, generator=g) * 3)
                blk.lnet.scale_head.weight.copy_(torch.randn(blk.lnet.scale_head.weight.shape, generator=g))
        model.eval()
        for b, blk in enumerate(model.blocks):  # in order: a block's inputs depend on earlier decisions
            if blk.lnet is not None:
                margin = model(x, return_decisions=True).gate_margin[:, b]
                blk.lnet.threshold.fill_(float(margin.median()) - 1e-4)
    return model


def _images(n: int, size: int = 28, chans: int = 1, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(n, 1, 1, 1, generator=g) * 2.5 + 0.25
    return torch.randn(n, chans, size, size, generator=g) * scale + torch.randn(n, 1, 1, 1, generator=g)


def _flops(fn) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops() // 2)


SIZE = 16  # small inputs and widths keep these tests fast; the registered models are smoke-tested below


@pytest.fixture(scope="module")
def basic():
    """A narrow ResNet-14-like LC-Net: 4 of its 6 blocks can be skipped, one in each stage at least."""
    x = _images(8, SIZE)
    model = LCResNet("basic", layers=(2, 2, 2), planes=(8, 16, 32), stem_width=8, num_classes=5, in_chans=1,
                     stem="cifar", input_size=SIZE)  # fmt: skip
    return perturb_lc(model, x), x


@pytest.fixture(scope="module")
def bottleneck():
    x = _images(6, SIZE, chans=3)
    model = LCResNet("bottleneck", layers=(2, 2), planes=(8, 16), stem_width=16, num_classes=5, stem="cifar")
    return perturb_lc(model, x), x


@pytest.mark.parametrize("name", dsnet.list_models(kind="lcnet"))
def test_registered_models_train_and_infer(name):
    torch.manual_seed(0)
    model = dsnet.create_model(name)
    assert model.extra_repr() and dsnet.models.model_info(name).kind == "lcnet"
    x = torch.randn(2, 3, 32, 32)
    r = model.train()(x, return_decisions=True)
    (r.logits.logsumexp(1).sum() + r.execute.sum() + sum(a.sum() for a in r.saliency)).backward()
    lnet = next(b.lnet for b in model.blocks if b.lnet is not None)
    assert lnet.fc2.weight.grad.abs().sum() > 0 and model.blocks[0].cnet.fc.weight.grad.abs().sum() > 0
    with torch.no_grad():
        model.eval()
        assert torch.allclose(model(x), model(x, channel_mode="mask"), atol=1e-4)


def test_skipped_block_leaves_input_untouched_and_costs_nothing():
    x = _images(4)
    model = perturb_lc(dsnet.create_model("lc_resnet8_tiny", in_chans=1), x)
    blk, keep = model.blocks[0], model.keep_counts()[0]
    assert blk.skippable and not any(model.skippable[1:])  # projection blocks always run
    with torch.no_grad():
        h = model._stem(x)
        run = torch.tensor([True, False, True, False])
        out, dec = blk.forward_infer(h, keep, "gather", 0.0, run)
        assert torch.equal(out[1], h[1]) and torch.equal(out[3], h[3])  # bit for bit, not multiplied by zero
        assert not torch.allclose(out[0], h[0])
        assert dec["execute"].tolist() == [1.0, 0.0, 1.0, 0.0]
        # a skipping sample pays its predictors only; an executing one also the residual branch
        predictors = _flops(lambda: blk.predictor_macs_probe(h[1:2]))
        assert _flops(lambda: blk.forward_infer(h[1:2], keep, "gather", 0.0, run[1:2])) == predictors
        table = model.macs_table((1, 28, 28))
        body = _flops(lambda: blk.forward_infer(h[:1], keep, "gather", 0.0, run[:1])) - predictors
        assert body == table.body[0] > 0
        # the batch computes the branch for the two executing samples only
        assert _flops(lambda: blk.forward_infer(h, keep, "gather", 0.0, run)) == 4 * predictors + 2 * body
    execute = torch.ones(4, 3, dtype=torch.bool)
    execute[1, 0] = execute[3, 0] = False
    macs = table.per_sample(execute)
    assert macs[0] - macs[1] == table.body[0]
    assert _flops(lambda: model(x, execute=execute)) == int(macs.sum())


def test_grouped_batch_equals_per_sample_and_gather_equals_mask(basic, bottleneck):
    for model, x in (basic, bottleneck):
        with torch.no_grad():
            r = model(x, return_decisions=True)
            rates = r.execute[:, model.skippable].mean(0)
            assert ((rates > 0) & (rates < 1)).sum() >= 2, rates  # the batch really is split at several blocks
            singles = [model(x[i : i + 1], return_decisions=True) for i in range(x.shape[0])]
            masked = model(x, channel_mode="mask")
        scale = r.logits.abs().max()
        per_sample = torch.cat([s.logits for s in singles])
        assert torch.allclose(r.logits, per_sample, atol=1e-4 * scale, rtol=1e-4)
        assert torch.equal(r.execute, torch.cat([s.execute for s in singles]))
        for b in range(len(model.blocks)):
            assert torch.equal(r.channels[b], torch.cat([s.channels[b] for s in singles]))
        assert torch.allclose(r.logits, masked, atol=1e-4 * scale, rtol=1e-4)


def test_channel_choices_are_per_sample_and_at_the_density(basic):
    model, x = basic
    with torch.no_grad():
        r = model(x, return_decisions=True)
        half = model(x, return_decisions=True, density=0.25)
    for b, blk in enumerate(model.blocks):
        assert r.channels[b].shape == (x.shape[0], round(0.5 * blk.planes))
        assert half.channels[b].shape == (x.shape[0], round(0.25 * blk.planes))
        # the kept channels are each sample's most salient ones
        top = r.saliency[b].topk(r.channels[b].shape[1], dim=1).indices.sort(1).values
        assert torch.equal(r.channels[b], top)
    assert any(len({tuple(c.tolist()) for c in ch}) > 1 for ch in r.channels)  # not one subset for all


def test_per_sample_macs_equal_flop_counter(basic):
    model, x = basic
    macs = dsnet.count_macs(model, x)
    assert macs.dtype == torch.int64 and len(set(macs.tolist())) > 1  # decisions differ, so do costs
    for i in range(x.shape[0]):
        assert int(macs[i]) == _flops(lambda i=i: model(x[i : i + 1]))
    assert int(macs.sum()) == _flops(lambda: model(x))
    # equal MACs: a prefix slice of k channels costs what the gathered k channels cost; masking costs full width
    run = torch.ones(x.shape[0], len(model.blocks), dtype=torch.bool)
    gather = _flops(lambda: model(x, execute=run))
    assert _flops(lambda: model(x, execute=run, channel_mode="prefix")) == gather
    full = _flops(lambda: model(x, execute=run, density=1.0))
    assert _flops(lambda: model(x, execute=run, channel_mode="mask")) == full > gather
    assert gather == x.shape[0] * model.macs_table((1, SIZE, SIZE)).all_executed


def test_subset_conv_equals_dense_conv_on_the_subset():
    torch.manual_seed(0)
    layer = ChannelSubsetConvBN(6, 10, 3, stride=2)
    with torch.no_grad():
        layer.bn.running_mean.normal_()
        layer.bn.running_var.uniform_(0.5, 2.0)
        layer.bn.weight.normal_()
    layer.eval()
    x = torch.randn(3, 6, 9, 9)
    out_idx, _ = topk_channels(torch.rand(3, 10), 4)
    in_idx, _ = topk_channels(torch.rand(3, 6), 3)

    def channels(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return idx[:, :, None, None].expand(-1, -1, *t.shape[2:])

    with torch.no_grad():
        dense = layer(x)
        # an output subset: the dense layer's outputs at each sample's channels
        assert torch.allclose(layer.gather(x, out_index=out_idx), dense.gather(1, channels(dense, out_idx)), atol=1e-5)
        # an input subset: the dense layer on an input that is zero outside each sample's channels
        compact = x.gather(1, channels(x, in_idx))
        zeroed = torch.zeros_like(x).scatter(1, channels(x, in_idx), compact)
        assert torch.allclose(layer.gather(compact, in_index=in_idx), layer(zeroed), atol=1e-5)
        # a prefix: the first 7 filters over the first 4 input channels
        bn = layer.bn
        ref = torch.nn.functional.batch_norm(
            torch.nn.functional.conv2d(x[:, :4], layer.conv.weight[:7, :4], None, 2, 1),
            bn.running_mean[:7], bn.running_var[:7], bn.weight[:7], bn.bias[:7], False, 0.0, bn.eps,
        )  # fmt: skip
        assert torch.allclose(layer.prefix(x[:, :4], 7), ref, atol=1e-5)


def test_bad_use_is_one_clear_error(basic):
    model, x = basic
    with pytest.raises(ValueError, match="no static sub-networks"):
        model.extract(0)
    with pytest.raises(ValueError, match="depend on the input"):
        dsnet.count_macs(model, (1, 1, 32, 32))
    with pytest.raises(ValueError, match="channel_mode"):
        model(x, channel_mode="sparse")
    with pytest.raises(ValueError, match="cannot be skipped"):
        model(x, execute=torch.zeros(x.shape[0], len(model.blocks), dtype=torch.bool))
    with pytest.raises(ValueError, match="expected a batch"):
        model(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="density"):
        dsnet.create_model("lc_resnet8_tiny", density=1.5)
    model.train()
    try:
        with pytest.raises(ValueError, match="inference options"):
            model(x, skip_bias=1.0)
    finally:
        model.eval()
    assert "lc_resnet50" in dsnet.list_models(kind="lcnet") and "lc_resnet50" not in dsnet.list_models(kind="supernet")


def test_thresholds_and_operating_points(basic):
    model, x = basic
    loader = [(x, torch.zeros(x.shape[0], dtype=torch.long))]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        thresholds = calibrate_thresholds(model, loader)
        with torch.no_grad():
            r = model(x, return_decisions=True)
        for b, blk in enumerate(model.blocks):
            if blk.skippable:  # inference executes the block as often as the sampled gate would, in expectation
                expected = round(float(torch.sigmoid(r.gate_margin[:, b].double()).mean()) * x.shape[0])
                assert int(r.execute[:, b].sum()) == expected
                assert thresholds[b] == float(blk.lnet.threshold)
        points = evaluate_lcnet(model, loader, skip_biases=[-1e6, 0.0, 1e6], densities=[None, 1.0])
        none_skipped, trained, all_skipped = points[:3]
        table = model.macs_table((1, SIZE, SIZE))
        assert none_skipped["mean_macs"] == table.all_executed and all_skipped["mean_macs"] == table.fixed
        assert all_skipped["exec_rate"] == 0.0 and none_skipped["exec_rate"] == 1.0
        assert table.fixed <= trained["mean_macs"] <= table.all_executed
        assert (
            points[3]["density"] == 1.0
            and points[3]["mean_macs"] == model.macs_table((1, SIZE, SIZE), 1.0).all_executed
        )
        # the reported point is what dynamic inference computes
        assert trained["mean_macs"] == float(dsnet.count_macs(model, x).double().mean())
    finally:
        model.load_state_dict(before)


TINY = [
    "model.name=lc_resnet8_tiny",
    "data.dataset=synthetic",
    "data.synthetic.num_train=256",
    "data.synthetic.num_val=64",
    "data.synthetic.channels=1",
    "data.synthetic.image_size=16",
    "data.holdout=64",
    "data.batch_size=32",
    "data.eval_batch_size=64",
    "data.workers=0",
    "lcnet.epochs=4",
    "lcnet.warmup_epochs=0",
    "lcnet.lr=0.2",
    "lcnet.final_eval=false",
    "log.progress=false",
    "log.tensorboard=false",
]


def test_rate_target_met_on_a_tiny_run(tmp_path):
    cfg = load_config(None, TINY + ["lcnet.target_rate=0.4", "lcnet.rate_weight=5.0"])
    train_lcnet(cfg, tmp_path / "run")
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = records[0], records[-1]
    # the regulariser moves the sampled execution rate from ConvNet-AIG's initial ~0.88 to the target, and the
    # calibrated (deterministic) inference on held-out images follows it
    assert first["train_exec_rate"] > 0.6, first
    assert abs(last["train_exec_rate"] - 0.4) < 0.1, last
    assert abs(last["sel_exec_rate"] - 0.4) < 0.15, last
    assert last["selection_split"] == "holdout" and last["thresholds"][0] is not None
    # density: every block kept round(0.5 * planes) channels (checked per sample in the model tests)
    assert read_checkpoint(tmp_path / "run" / "best.ckpt")["model"]["kwargs"].get("density", 0.5) == 0.5


def test_resume_equals_uninterrupted(tmp_path):
    cfg = load_config(None, TINY + ["data.synthetic.num_train=128", "lcnet.epochs=2"])
    train_lcnet(cfg, tmp_path / "full")
    assert train_lcnet(cfg, tmp_path / "cut", stop_after_epoch=0) == {"stopped_after_epoch": 0}
    train_lcnet(cfg, tmp_path / "cut", resume=True)
    full, cut = read_checkpoint(tmp_path / "full" / "last.ckpt"), read_checkpoint(tmp_path / "cut" / "last.ckpt")
    for k, v in full["state_dict"].items():
        assert torch.equal(v, cut["state_dict"][k]), k  # weights, BN statistics and calibrated thresholds
    for k, st in full["optimizer"]["state"].items():
        assert torch.equal(st["momentum_buffer"], cut["optimizer"]["state"][k]["momentum_buffer"])


def test_flops_target_met_and_cli(tmp_path, capsys):
    # lc_resnet8_tiny at density 0.5 and 16 px costs 0.32 (block 0 skipped) to 0.52 (run) of the dense network
    sets = [a for kv in TINY + ["lcnet.regulariser=flops", "lcnet.target_flops=0.4", "lcnet.flops_weight=100.0",
                                "lcnet.final_eval=true", "lcnet.eval_skip_biases=[0.0]", "lcnet.eval_densities=[1.0]"]
            for a in ("--set", kv)]  # fmt: skip
    out = tmp_path / "run"
    assert main(["train", "lcnet", *sets, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert abs(last["train_mmacs"] / summary["dense_mmacs"] - 0.4) < 0.03, last
    assert abs(last["sel_mmacs"] / summary["dense_mmacs"] - 0.4) < 0.04, last
    final = summary["final_eval"]
    assert final["trained_point"]["num_samples"] == 64 and len(final["density_sweep"]) == 1
    capsys.readouterr()
    bad = [a for kv in TINY + ["lcnet.regulariser=flops", "lcnet.target_flops=0.2"] for a in ("--set", kv)]
    assert main(["train", "lcnet", *bad, "--out", str(tmp_path / "bad")]) == 2
    assert "out of reach" in capsys.readouterr().err
    assert main(["train", "lcnet", "--set", "lcnet.tagret_rate=0.5", "--out", str(tmp_path / "bad")]) == 2
    assert "lcnet.tagret_rate: unknown key" in capsys.readouterr().err
    assert main(["train", "lcnet", *sets, "--set", "model.name=ds_resnet8_tiny", "--out", str(tmp_path / "x")]) == 2
    assert "not an LC-Net model" in capsys.readouterr().err


def test_bench_cli_reports_equal_mac_comparisons(tmp_path, capsys):
    report_path = tmp_path / "bench.json"
    args = ["bench", "--model", "lc_resnet8_tiny", "--batch-sizes", "1,4", "--repeats", "1", "--warmup", "0",
            "--densities", "0.5", "--skip-fractions", "0.5", "--json", str(report_path)]  # fmt: skip
    assert main(args) == 0
    report = json.loads(report_path.read_text())
    assert report["schema"] == "dsnet-lcnet-bench-v1" and [r["batch_size"] for r in report["results"]] == [1, 4]
    for res in report["results"]:
        rows = {r["method"]: r for r in res["rows"]}
        assert set(rows) == {"full", "gather@0.5", "prefix@0.5", "mask@0.5", "skip@0.5", "lcnet"}
        assert rows["gather@0.5"]["macs"] == rows["prefix@0.5"]["macs"] == rows["mask@0.5"]["macs"]
        assert rows["mask@0.5"]["computed_macs"] == rows["full"]["macs"] > rows["gather@0.5"]["macs"]
        assert rows["full"]["macs"] > rows["skip@0.5"]["macs"]
        assert all(r["median_ms"] > 0 for r in res["rows"])
    assert "equal MACs at density 0.5" in capsys.readouterr().out
    assert main(["bench", "--model", "ds_resnet8_tiny", "--densities", "0.5"]) == 2


@pytest.mark.skipif(not Path(sys.executable).with_name("torchrun").exists(), reason="torchrun not installed")
def test_ddp_two_processes_keep_identical_weights(tmp_path):
    sets = [a for kv in TINY + ["data.synthetic.num_train=128", "lcnet.epochs=1"] for a in ("--set", kv)]
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node=2", "--master_port=29541",
           "-m", "dsnet", "train", "lcnet", *sets, "--out", str(tmp_path / "ddp")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    checksums = json.loads((tmp_path / "ddp" / "summary.json").read_text())["rank_param_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
