"""Stage I from trained weights (issue 19): the frozen source teacher, the schedule, the source's widths routed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsnet.convert import make_dynamic
from dsnet.models.pretrained import load_pretrained
from dsnet.train.checkpoint import load_model
from dsnet.train.config import ConfigError, load_config
from dsnet.train.ema import ModelEma
from dsnet.train.finetune import (
    build_start_model,
    frozen_teacher,
    plan_finetune,
    source_warning,
    starts_from_trained,
)
from dsnet.train.losses import soft_cross_entropy
from dsnet.train.optim import MaskedSGD
from dsnet.train.supernet import SandwichStep, build_model, supernet_step, train_supernet
from tests.reference_nets import TVBasicBlock, TVResNet, randomize
from tests.test_convert import ResidualCNN

FACTORY = "tests.test_finetune_from_source:user_factory"
TINY = [
    f"model.name={FACTORY}",
    "data.dataset=synthetic",
    "data.synthetic.num_train=256",
    "data.synthetic.num_val=32",
    "data.synthetic.channels=1",
    "data.synthetic.image_size=16",
    "data.holdout=64",
    "data.batch_size=32",
    "data.eval_batch_size=64",
    "data.workers=0",
    "supernet.epochs=1",
    "supernet.bn_calibration_batches=2",
    "log.progress=false",
    "log.tensorboard=false",
]


def user_factory(num_classes: int = 10, in_chans: int = 1, **options) -> nn.Module:
    """A user's network made dynamic; options (pre_gate_ratio, gate_mode, ...) reach make_dynamic."""
    return make_dynamic(
        ResidualCNN(in_chans, num_classes), torch.zeros(2, in_chans, 16, 16), gate_after="layer2", **options
    )


def fixed_factory(num_classes: int = 10, in_chans: int = 1) -> nn.Module:
    """A factory that takes no routing options: its routed range cannot change."""
    return make_dynamic(ResidualCNN(in_chans, num_classes), torch.zeros(2, in_chans, 16, 16), gate_after="layer2")


def _images(n: int = 6, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, size, size, generator=g) * (torch.rand(n, 1, 1, 1, generator=g) + 0.5)


def _build(cfg: dict) -> nn.Module:
    return build_model(cfg, 10, 1)


@pytest.fixture(scope="module")
def trained_source(tmp_path_factory) -> Path:
    """A ResidualCNN trained alone on the synthetic set (well above chance on its held-out slice)."""
    from dsnet.data import build_loader

    torch.manual_seed(0)
    cfg = load_config(None, TINY)
    loader, _ = build_loader(cfg["data"], "train", seed=0)
    net = ResidualCNN()
    opt = torch.optim.SGD(net.parameters(), 0.1, momentum=0.9)
    for _ in range(15):
        net.train()
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    path = tmp_path_factory.mktemp("source") / "source.pt"
    torch.save(net.eval().state_dict(), path)
    return path


# ------------------------------------------------------------------------------------ the frozen teacher
def test_frozen_teacher_never_changes_and_is_the_source(tmp_path):
    torch.manual_seed(1)
    net = randomize(ResidualCNN())
    path = tmp_path / "plain.pt"
    torch.save(net.state_dict(), path)
    cfg = load_config(None, [*TINY, f"model.checkpoint_path={path}"])
    start = build_start_model(cfg, _build, plan_finetune(cfg))
    model = start.model
    teacher = frozen_teacher(model)
    x = _images()
    with torch.no_grad():  # the teacher at full width computes the user's trained network
        torch.testing.assert_close(teacher(x, subnet=teacher.largest), net(x), rtol=1e-4, atol=1e-5)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    model.gate.slim_head.requires_grad_(False)
    opt = MaskedSGD([p for p in model.parameters() if p.requires_grad], 0.5, 0.9, 1e-4)
    ema = ModelEma(model, 0.9)
    step = SandwichStep(model, opt, ema, distill="source", teacher=teacher, num_random=1)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        model.train()
        step((_images(8, seed=int(torch.randint(100, (1,), generator=g))), torch.randint(10, (8,), generator=g)))
    moved = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert moved  # the students did train
    after = teacher.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    with torch.no_grad():
        torch.testing.assert_close(teacher(x, subnet=teacher.largest), net(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="distill='source'.*teacher="):
        SandwichStep(model, opt, ema, distill="source")


def test_students_learn_the_source_teachers_probabilities():
    torch.manual_seed(3)
    model = user_factory(pre_gate_ratio=1.0)
    teacher = frozen_teacher(randomize(user_factory(pre_gate_ratio=1.0), seed=4))
    x, y = _images(8), torch.randint(10, (8,))
    smallest = model.routing_space[0]
    losses = supernet_step(model.train(), teacher, [x], y, [model.largest, smallest], distill="source")
    with torch.no_grad():
        target = F.softmax(teacher(x, subnet=teacher.largest), -1)
        model.train()
        want = soft_cross_entropy(model(x, subnet=smallest), target)
        largest = F.cross_entropy(model(x, subnet=model.largest), y, label_smoothing=0.1)
    assert losses["loss_smallest"] == pytest.approx(float(want), rel=1e-5)
    assert losses["loss_largest"] == pytest.approx(float(largest), rel=1e-5)  # the largest: labels


# ------------------------------------------------------------------------------------ what auto chooses
def test_fine_tuning_schedule_only_when_starting_from_weights(tmp_path):
    scratch = plan_finetune(load_config(None, TINY))
    assert not scratch.from_trained and scratch.teacher == "distill" and scratch.distill == "none"
    assert scratch.lr_scale == 1.0 and scratch.warmup_epochs == 1.0 and scratch.pre_gate_ratio is None
    ib = plan_finetune(load_config(None, [*TINY, "supernet.distill=ib"]))
    assert ib.distill == "ib"  # from scratch: today's behaviour
    ckpt = f"model.checkpoint_path={tmp_path / 'w.pt'}"
    trained = plan_finetune(load_config(None, [*TINY, ckpt]))
    assert trained.from_trained and trained.teacher == "distill" and trained.distill == "none"  # labels (measured)
    assert trained.lr_scale == 0.3 and trained.warmup_epochs == 0.0 and trained.pre_gate_ratio == 1.0
    source = plan_finetune(load_config(None, [*TINY, ckpt, "supernet.teacher=source"]))
    assert source.teacher == "source" and source.distill == "source" and source.lr_scale == 0.3
    kept = plan_finetune(load_config(None, [*TINY, ckpt, "supernet.teacher=distill", "supernet.distill=ib"]))
    assert kept.teacher == "distill" and kept.distill == "ib" and kept.lr_scale == 0.3
    recipe = plan_finetune(load_config(None, [*TINY, ckpt, "supernet.finetune_warmup_epochs=null"]))
    assert recipe.warmup_epochs == 1.0
    declared = load_config(None, [*TINY, "supernet.teacher=source"])  # a factory that loads its own weights
    assert starts_from_trained(declared) and plan_finetune(declared).distill == "source"
    with pytest.raises(ConfigError, match="supernet.teacher"):
        load_config(None, [*TINY, "supernet.teacher=ema"])
    with pytest.raises(ConfigError, match="supernet.finetune_warmup_epochs: must be <= supernet.epochs"):
        load_config(None, [*TINY, "supernet.finetune_warmup_epochs=2"])


def test_config_reference_lists_the_keys(capsys):
    from dsnet.cli import main

    assert main(["config", "reference"]) == 0
    text = capsys.readouterr().out
    for key in ("teacher", "finetune_lr_scale", "finetune_warmup_epochs", "finetune_pre_gate_ratio"):
        assert f"| `supernet.{key}` |" in text


# ------------------------------------------------------------------------------ the routed range
def test_widest_routed_subnet_is_the_source_right_after_conversion(tmp_path):
    """Both import paths: a torchvision-layout ResNet into ds_resnet8_tiny, a user's network via make_dynamic."""
    torch.manual_seed(5)
    x = _images(4, size=28)
    tv = randomize(TVResNet(TVBasicBlock, [1, 1, 1], 10, 1, (32, 64, 128), 32, cifar_stem_stride=2))
    torch.save(tv.state_dict(), tmp_path / "tv.pt")
    user = randomize(ResidualCNN(), seed=6)
    torch.save(user.state_dict(), tmp_path / "user.pt")
    for name, path, ref, images in (
        ("ds_resnet8_tiny", tmp_path / "tv.pt", tv, x),
        (FACTORY, tmp_path / "user.pt", user, _images(4)),
    ):
        cfg = load_config(None, [*TINY, f"model.name={name}", f"model.checkpoint_path={path}"])
        start = build_start_model(cfg, _build, plan_finetune(cfg))
        model = start.model.eval()
        widest = model.routing_space[-1]
        assert start.routed_source and widest == model.largest and model.subnets[widest].routed
        assert start.cfg["model"]["kwargs"]["pre_gate_ratio"] == 1.0  # recorded: checkpoints rebuild it
        assert "pre_gate_ratio" not in cfg["model"]["kwargs"]  # the caller's config is not modified
        with torch.no_grad():
            torch.testing.assert_close(model(images, subnet=widest), ref(images), rtol=1e-4, atol=1e-5)
        # every routed sub-network runs the source's stages before the gate
        pre = model.gate_stage
        assert {model.subnets[k].widths[:pre] for k in model.routing_space} == {model.subnets[widest].widths[:pre]}
        # from scratch: the paper's routed range, the full network training-only
        paper = build_start_model(
            load_config(None, [*TINY, f"model.name={name}"]), _build, plan_finetune(load_config(None, TINY))
        ).model
        assert paper.largest not in paper.routing_space and not paper.subnets[paper.largest].routed


def test_routed_range_kept_when_it_cannot_change(tmp_path):
    torch.manual_seed(7)
    path = tmp_path / "user.pt"
    torch.save(randomize(ResidualCNN()).state_dict(), path)
    fixed = load_config(
        None, [*TINY, "model.name=tests.test_finetune_from_source:fixed_factory", f"model.checkpoint_path={path}"]
    )
    start = build_start_model(fixed, _build, plan_finetune(fixed))
    assert not start.routed_source and "pre_gate_ratio" not in start.cfg["model"]["kwargs"]
    assert any("not rebuilt with pre_gate_ratio=1" in n for n in start.notes)
    chosen = load_config(None, [*TINY, f"model.checkpoint_path={path}", "model.kwargs={pre_gate_ratio: 0.5}"])
    start = build_start_model(chosen, _build, plan_finetune(chosen))
    assert not start.routed_source and start.notes == [
        "model.kwargs.pre_gate_ratio is set: the routed range is the recipe's"
    ]
    off = load_config(None, [*TINY, f"model.checkpoint_path={path}", "supernet.finetune_pre_gate_ratio=null"])
    assert not build_start_model(off, _build, plan_finetune(off)).routed_source
    # a dsnet supernet checkpoint fixes its own sub-networks: it loads as it is
    paper = user_factory()
    load_pretrained(paper, path)
    torch.save(paper.state_dict(), tmp_path / "dsnet.pt")
    ds = load_config(None, [*TINY, f"model.checkpoint_path={tmp_path / 'dsnet.pt'}"])
    start = build_start_model(ds, _build, plan_finetune(ds))
    assert not start.routed_source and "dsnet" in start.report.format
    assert torch.equal(start.model.state_dict()["net.fc.weight"], paper.state_dict()["net.fc.weight"])


# -------------------------------------------------------------------------- the run: start line, warning
def _run(tmp_path: Path, source: Path, *extra: str) -> tuple[dict, dict]:
    cfg = load_config(None, [*TINY, f"model.checkpoint_path={source}", *extra])
    summary = train_supernet(cfg, tmp_path)
    return summary, json.loads((tmp_path / "summary.json").read_text())


def test_run_names_its_schedule_and_keeps_the_source(tmp_path, trained_source, capsys):
    summary, written = _run(tmp_path / "ft", trained_source)
    out = capsys.readouterr().out
    line = next(s for s in out.splitlines() if s.startswith("[supernet] schedule:"))
    assert "fine-tuning from trained weights (model.checkpoint_path)" in line
    assert "lr x0.3 = 0.00375" in line and "no warm-up" in line and "supernet.finetune_lr_scale" in line
    assert "the labels, for every sub-network" in line and "supernet.teacher=auto" in line
    assert "routed range includes the source widths (pre_gate_ratio=1)" in line
    assert written == summary
    assert summary["finetune"]["teacher"] == "distill" and summary["finetune"]["distill"] == "none"
    assert summary["source_holdout_top1"] > 50  # a trained source, measured on the held-out slice
    assert summary["largest_holdout_top1"] >= summary["source_holdout_top1"]
    assert summary["warnings"] == [] and "warning: the largest" not in out
    model, ckpt = load_model(tmp_path / "ft" / "best.ckpt", trust_factories=[FACTORY])
    assert ckpt["model"]["kwargs"]["pre_gate_ratio"] == 1.0 and model.largest in model.routing_space
    # from scratch the line says so, and nothing of the above applies
    scratch = train_supernet(load_config(None, TINY), tmp_path / "scratch")
    line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith("[supernet] schedule:"))
    assert "from scratch" in line and "supernet.distill=none" in line
    assert "source_holdout_top1" not in scratch and "warnings" not in scratch


def test_warning_when_the_largest_ends_below_the_source(tmp_path, trained_source, capsys):
    summary, _ = _run(tmp_path / "hot", trained_source, "supernet.finetune_lr_scale=400")
    out = capsys.readouterr().out
    assert summary["largest_holdout_top1"] < summary["source_holdout_top1"]
    [said] = summary["warnings"]
    assert said.startswith("warning: the largest sub-network ends at") and "below the source network's" in said
    assert [s for s in out.splitlines() if "warning: the largest" in s] == [f"[supernet] {said}"]


def test_source_warning_threshold():
    assert source_warning(90.0, 90.0) is None and source_warning(91.0, 90.0) is None
    said = source_warning(89.5, 90.0, "holdout", teacher="distill")
    assert said is not None and "89.50%" in said and "90.00%" in said and "supernet.teacher=source" in said
    assert "supernet.teacher=source" not in source_warning(80.0, 90.0)


def test_a_resumed_fine_tune_keeps_its_teacher_and_schedule(tmp_path, trained_source, capsys):
    """The source teacher is the checkpoint_path network, not the resumed weights: resumed == uninterrupted."""
    source = f"model.checkpoint_path={trained_source}"
    cfg = load_config(None, [*TINY, source, "supernet.epochs=2", "supernet.teacher=source"])
    whole = train_supernet(cfg, tmp_path / "whole")
    assert whole["finetune"]["teacher"] == "source" and whole["finetune"]["distill"] == "source"
    assert train_supernet(cfg, tmp_path / "cut", stop_after_epoch=0) == {"stopped_after_epoch": 0}
    resumed = train_supernet(cfg, tmp_path / "cut", resume=True)
    assert resumed["rank_param_checksums"] == whole["rank_param_checksums"]
    assert resumed["source_holdout_top1"] == whole["source_holdout_top1"]
    lines = [s for s in capsys.readouterr().out.splitlines() if s.startswith("[supernet] schedule:")]
    assert len(lines) == 3 and len(set(lines)) == 1 and "frozen source network" in lines[0]
