"""Bring your own network, on Fashion-MNIST: start a supernet from a network trained alone, or from scratch?

Every part uses the quickstart recipe (``dsnet.quickstart.QUICKSTART``: ResNet-8 tiny, masked SGD, cosine
schedule with one warm-up epoch, label smoothing, labels for every sandwich member, EMA of the weights, BN
recalibration) on the same data: ``--train-subset`` training images, ``--holdout`` (``data.holdout``) more held
out of the training split to select the best epoch, and the test split read once at the end of each part.

* ``step_cost``: seconds per training step of the plain network and of the supernet (sandwich of 4 + EMA
  update), interleaved medians of 20 steps in one process.
* ``alone``: a plain ResNet-8 (torchvision layout and key names, the shape of ``ds_resnet8_tiny`` at full width
  and its initialisation: residual branches not zero-initialised) trained alone for ``--epochs`` epochs with
  stage I's recipe for one network (``train_alone``): stage I's optimiser, learning rate, schedule,
  augmentation, label smoothing and EMA (``supernet.ema_decay``, ``ema_warmup``, ``ema_buffers``); each
  epoch the EMA weights are measured on the held-out slice, the best epoch's EMA weights are kept and their BN
  statistics recalibrated on ``supernet.bn_calibration_batches`` training batches. Those weights are
  ``alone.pth`` (a plain torchvision-format state_dict); the result records the best epoch, the held-out top-1
  (EMA, and after recalibration), the test top-1, and the last epoch's raw weights' test top-1 for reference.
* ``converted`` / ``converted-noorder``: ``alone.pth`` imported into ``ds_resnet8_tiny`` (L1 importance order /
  the trained network's own channel order), BN statistics recalibrated, no training; the paper's routed range
  (stages before the gate at the slimmest width).
* ``converted-source-widths``: the same L1 conversion with the stages before the gate at full width (where
  fine-tuning starts).
* ``scratch``: ``ds_resnet8_tiny`` trained as a supernet from random weights for ``--epochs`` epochs (stage I:
  best epoch on the held-out slice, EMA weights, BN recalibrated).
* ``scratch-total``: the same for ``--epochs`` + ``--finetune-epochs`` epochs: as many epochs (and optimiser
  steps) as ``alone`` and a fine-tuning together.
* ``import``: ``ds_resnet8_tiny`` initialised from ``alone.pth`` (``model.checkpoint_path``, torchvision format,
  L1 importance order) and trained as a supernet for ``--finetune-epochs`` epochs with stage I's fine-tuning
  defaults (``dsnet.train.finetune``: labels for every sub-network, lr x0.3, no warm-up, the stages before the
  gate at full width so the widest routed sub-network is the source network; ``--finetune-set
  supernet.teacher=source`` for the frozen source network as the narrower sub-networks' teacher).
* ``import-noorder``: the same without the importance order (the trained network's own channel order).
* ``make_dynamic``: the plain network made dynamic by ``dsnet.make_dynamic`` through a ``module:factory`` model
  name (this file's ``dynamic_resnet8``, the same architecture as ``ds_resnet8_tiny``), fine-tuned as
  ``import``.

Fine-tuned runs also record the source's and the final largest sub-network's held-out top-1 and stage I's
warning if the largest ended below the source. Every dynamic model's static sub-networks are evaluated on the
test split: a table with one row per sub-network shape (told by its MMACs), and for ``import`` and
``make_dynamic`` the test top-1 of their routed sub-networks minus ``scratch-total``'s sub-network of the same
MMACs (mean, min, max; only their largest matches a sub-network of ``scratch-total``, which trains it but does
not route it). Results: the table and ``--json``.
``python benchmarks/byo_fashion_mnist.py --train-subset 20000 --epochs 6 --finetune-epochs 2`` (run from the
repository root; each finished part is reused on a re-run; a folder whose ``alone`` came from the earlier
recipe, the last raw weights, is refused: use a new ``--out``).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import dsnet
from dsnet.data import build_loader, is_image_folder
from dsnet.models.pretrained import load_pretrained
from dsnet.quickstart import QUICKSTART
from dsnet.train.bn_calibration import calibrate_bn
from dsnet.train.checkpoint import load_model
from dsnet.train.config import apply_overrides, resolve_config
from dsnet.train.ema import ModelEma
from dsnet.train.loop import EpochEnd, TrainLoop
from dsnet.train.optim import MaskedSGD
from dsnet.train.run import autocast, effective_lr, seed_everything, selection_loader, top1_accuracy
from dsnet.train.supernet import (
    build_optimizer,
    sample_subnets,
    supernet_epoch_line,
    supernet_step,
    train_supernet,
)
from dsnet.utils.io import atomic_torch_save, atomic_write_json
from dsnet.utils.modes import temporary_mode
from dsnet.utils.table import format_table


# ------------------------------------------------------------------------------ the network trained alone
class BasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + identity)


class ResNet8(nn.Module):
    """ResNet-8 with torchvision's key names: 3x3 stride-2 stem, one basic block per stage, 32-64-128 planes.

    Residual branches start as ``ds_resnet8_tiny``'s do: not zero-initialised (``zero_init_residual=False``, its
    default since zero-init was measured to cost 1.1-1.6 points after 3 epochs; this file zero-initialised them
    until the alone recipe was aligned with stage I's).
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, zero_init_residual: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 32, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.layer1 = nn.Sequential(BasicBlock(32, 32, 1))
        self.layer2 = nn.Sequential(BasicBlock(32, 64, 2))
        self.layer3 = nn.Sequential(BasicBlock(64, 128, 2))
        self.fc = nn.Linear(128, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, BasicBlock) and zero_init_residual:
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def dynamic_resnet8(num_classes: int = 10, in_chans: int = 1, **options) -> dsnet.DynamicNet:
    """``model.name: "benchmarks.byo_fashion_mnist:dynamic_resnet8"``: ResNet-8 made dynamic like ds_resnet8_tiny.

    ``options`` reach ``make_dynamic`` (stage I's fine-tuning sets ``pre_gate_ratio``, ``gate.mode`` sets
    ``gate_mode``).
    """
    options.setdefault("pre_gate_ratio", 0.5)
    return dsnet.make_dynamic(
        ResNet8(num_classes, in_chans),
        torch.zeros(2, in_chans, 28, 28),
        gate_after="layer1",
        width_ratios=(0.25, 0.5, 0.75, 1.0),
        gate_se_ratio=1.0,
        **options,
    )


# --------------------------------------------------------------------------------------------- the runs
def _cfg(args: argparse.Namespace, *extra: str) -> dict:
    overrides = [
        f"seed={args.seed}",
        f"data.holdout={args.holdout}",
        f"supernet.epochs={args.epochs}",
        "log.progress=false",
        "log.tensorboard=false",
    ]
    if args.train_subset:
        overrides.append(f"data.train_subset={args.train_subset}")
    if args.data:  # a Fashion-MNIST folder, or an image folder (DIR/train/<class>/..., DIR/val/<class>/...)
        overrides.append(f"data.root={args.data}")
        if is_image_folder(args.data):
            overrides.append("data.dataset=imagefolder")
    return resolve_config(apply_overrides(copy.deepcopy(QUICKSTART), overrides + list(extra)))


@torch.no_grad()
def calibrate_plain_bn(model: nn.Module, loader, num_batches: int) -> nn.Module:  # noqa: ANN001
    """Stage I's BN recalibration for a plain network: reset every BatchNorm's statistics and re-estimate them.

    ``dsnet.train.bn_calibration.calibrate_bn`` takes a ``DynamicNet`` only (it walks the sub-networks' sliced
    BatchNorm slots); this does the same for ``nn.BatchNorm*`` layers: statistics reset, momentum ``None``
    (a cumulative average), ``num_batches`` training batches forward in train mode without gradient, momenta and
    every module's mode restored. Parameters are untouched.
    """
    if num_batches < 1:
        raise ValueError(f"BN recalibration needs at least one batch, got {num_batches}")
    bns = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    try:
        with temporary_mode(model, True):
            for i, batch in enumerate(loader):
                if i >= num_batches:
                    break
                images = batch[0]
                model(images[0] if isinstance(images, (list, tuple)) else images)
    finally:
        for bn, m in zip(bns, momenta, strict=True):
            bn.momentum = m
    return model


def train_alone(cfg: dict, out: Path) -> dict:
    """The plain network trained alone with stage I's recipe for one network (``dsnet.train.supernet``).

    Stage I with a single sub-network trains it on the labels (the sandwich rule degenerates to the largest):
    the same optimiser (``build_optimizer``: masked SGD, no weight decay on BN and biases), learning rate
    (``effective_lr``), cosine schedule with warm-up and ``min_lr``, label smoothing, gradient clipping; the same
    EMA of the weights (``ModelEma`` with ``supernet.ema_decay``, ``ema_warmup``, ``ema_buffers``); each epoch the
    EMA weights are measured on the held-out slice (``selection_loader``: ``data.holdout``) and the best epoch's
    EMA weights are kept; their BN statistics are then recalibrated on ``supernet.bn_calibration_batches``
    training batches (:func:`calibrate_plain_bn`, as ``calibrate_checkpoint`` does for stage I's best
    checkpoint). Those weights are saved (``alone.pth``, a plain torchvision-format state_dict) and read once
    on the test split. ``last_raw_test_top1``: the last epoch's raw weights, what this part reported before.
    """
    sc = cfg["supernet"]
    device = torch.device("cpu")
    seed_everything(cfg["seed"])
    loader, info = build_loader(cfg["data"], "train", seed=cfg["seed"])
    holdout, split = selection_loader(cfg["data"], cfg["seed"], device)
    model = ResNet8(info.num_classes, info.in_chans)
    ema = ModelEma(model, sc["ema_decay"], warmup=sc["ema_warmup"], buffers=sc["ema_buffers"])
    base_lr = effective_lr("alone", sc, cfg["data"]["batch_size"])
    optimizer = build_optimizer(list(model.parameters()), base_lr, sc)
    steps = len(loader)

    def step(batch: tuple[Tensor, Tensor]) -> dict[str, float]:
        images, labels = batch
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, sc["amp"]):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=sc["label_smoothing"])
        loss.backward()
        if sc["grad_clip"]:
            nn.utils.clip_grad_norm_(model.parameters(), sc["grad_clip"])
        optimizer.step()
        ema.update(model)
        return {"loss": float(loss.detach())}

    def evaluate(epoch: int, record: dict) -> None:  # the EMA weights on the selection split, as stage I
        record["selection_split"] = split
        record["ema_top1"] = top1_accuracy(ema.module, holdout, device)

    best: dict = {}

    def keep_best(end: EpochEnd) -> None:
        if end.is_best:
            best["state"] = {k: v.detach().clone() for k, v in end.payload["ema_state_dict"].items()}

    loop = TrainLoop(
        "alone",
        model,
        loader,
        optimizer,
        step,
        epochs=sc["epochs"],
        lr=base_lr,
        device=device,
        warmup_steps=round(sc["warmup_epochs"] * steps),
        min_lr=sc["min_lr"],
        selection_key="ema_top1",
        selection_split=split,
        evaluate=evaluate,
        payload=lambda epoch: {"state_dict": model.state_dict(), "ema_state_dict": ema.state_dict()},
        epoch_line=lambda epoch, record: supernet_epoch_line(record),
        callbacks=[keep_best],
        progress=False,
    )
    t0 = time.time()
    fitted = loop.fit()
    seconds = time.time() - t0
    test, _ = build_loader(cfg["data"], "val", seed=cfg["seed"])
    last_raw = top1_accuracy(model, test, device)
    final = ResNet8(info.num_classes, info.in_chans)
    final.load_state_dict(best["state"])
    num_batches = min(sc["bn_calibration_batches"], len(loader))
    calibrate_plain_bn(final, loader, num_batches)
    atomic_torch_save(final.state_dict(), out / "alone.pth")
    return {
        "recipe": "stage I for one network: EMA, best epoch on the held-out slice, BN recalibrated",
        "seconds": round(seconds, 1),
        "epochs": sc["epochs"],
        "steps": sc["epochs"] * steps,  # optimiser steps
        "best_epoch": fitted.best_epoch,  # 1-based, as the logs count
        "selection_split": split,
        "holdout_top1": round(fitted.best_metric, 2),  # the best epoch's EMA weights, before BN recalibration
        "holdout_top1_calibrated": round(top1_accuracy(final, holdout, device), 2),
        "bn_calibration_batches": num_batches,
        "history": [{k: r[k] for k in ("epoch", "lr", "loss", "ema_top1") if k in r} for r in fitted.history],
        "test_top1": round(top1_accuracy(final, test, device), 2),
        "last_raw_test_top1": round(last_raw, 2),
    }


def evaluate(model: dsnet.DynamicNet, cfg: dict) -> list[dict]:
    """Test top-1 of every static sub-network."""
    test, _ = build_loader(cfg["data"], "val", seed=cfg["seed"])
    macs = model.subnet_macs()
    return [
        {
            "subnet": k,
            "widths": str(s).split(" ", 1)[1],
            "mmacs": round(macs[k] / 1e6, 2),
            "test_top1": round(top1_accuracy(model, test, torch.device("cpu"), subnet=k), 2),
        }
        for k, s in enumerate(model.subnets)
    ]


def converted_only(cfg: dict, alone: Path, importance: str | None, pre_gate_ratio: float | None = None) -> list[dict]:
    """The conversion before any training: import, recalibrate BN statistics, evaluate."""
    extra = {} if pre_gate_ratio is None else {"pre_gate_ratio": pre_gate_ratio}
    model = dsnet.create_model("ds_resnet8_tiny", num_classes=10, in_chans=1, **extra)
    load_pretrained(model, alone, importance=importance)
    loader, _ = build_loader(cfg["data"], "train", seed=cfg["seed"])
    calibrate_bn(model, loader, cfg["supernet"]["bn_calibration_batches"], progress=False)
    return evaluate(model.eval(), cfg)


def supernet(cfg: dict, out: Path) -> dict:
    t0 = time.time()
    summary = train_supernet(cfg, out)
    seconds = time.time() - t0
    model, _ = load_model(out / "best.ckpt")
    steps = cfg["supernet"]["epochs"] * len(build_loader(cfg["data"], "train", seed=cfg["seed"])[0])
    result = {"seconds": round(seconds, 1), "steps": steps, "subnets": evaluate(model, cfg)}
    for key in ("finetune", "source_holdout_top1", "largest_holdout_top1", "warnings"):
        if key in summary:
            result[key] = summary[key]
    return result


def step_cost(cfg: dict, rounds: int = 20) -> dict:
    """Seconds per training step, alone vs supernet (sandwich of 4 + EMA teacher), interleaved in one process.

    Wall times of whole runs on a shared machine depend on what else runs; this ratio does not (much).
    """
    sc = cfg["supernet"]
    loader, info = build_loader(cfg["data"], "train", seed=cfg["seed"])
    batches = [b for _, b in zip(range(4), loader)]
    plain = ResNet8(info.num_classes, info.in_chans).train()
    dyn = dsnet.create_model("ds_resnet8_tiny", num_classes=info.num_classes, in_chans=info.in_chans).train()
    dyn.gate.slim_head.requires_grad_(False)
    teacher = ModelEma(dyn, sc["ema_decay"])
    opt_plain = MaskedSGD(list(plain.parameters()), 0.01, sc["momentum"], sc["weight_decay"])
    opt_dyn = MaskedSGD([p for p in dyn.parameters() if p.requires_grad], 0.01, sc["momentum"], sc["weight_decay"])
    times: dict[str, list[float]] = {"alone": [], "supernet": []}
    for r in range(rounds + 2):  # two warm-up rounds
        images, labels = batches[r % len(batches)]
        t0 = time.perf_counter()
        opt_plain.zero_grad()
        F.cross_entropy(plain(images), labels, label_smoothing=0.1).backward()
        opt_plain.step()
        t1 = time.perf_counter()
        opt_dyn.zero_grad()
        supernet_step(dyn, teacher.module, [images], labels, sample_subnets(dyn, r, 0, sc["num_random"]))
        opt_dyn.step()
        teacher.update(dyn)
        t2 = time.perf_counter()
        if r >= 2:
            times["alone"].append(t1 - t0)
            times["supernet"].append(t2 - t1)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {
        "alone_s": round(med["alone"], 4),
        "supernet_s": round(med["supernet"], 4),
        "ratio": round(med["supernet"] / med["alone"], 2),
        "rounds": rounds,
    }


def routed_vs(results: dict, name: str, reference: str) -> dict | None:
    """``name``'s routed sub-networks minus ``reference``'s sub-network of the same MMACs (test top-1 points).

    Rows are matched by MMACs; only ``name``'s routed rows count (its training-only ones are skipped), whatever
    the reference's row is (the fine-tuned runs route the source's widths before the gate: of scratch's
    sub-networks only the largest, training only there, has the shape of one of theirs). None: nothing matched.
    """
    if not isinstance(results.get(name), dict) or not isinstance(results.get(reference), dict):
        return None
    ref = {sub["mmacs"]: sub for sub in results[reference]["subnets"]}
    diffs, mmacs, training_only = [], [], []
    for sub in results[name]["subnets"]:
        other = ref.get(sub["mmacs"])
        if "training only" in sub["widths"] or other is None:
            continue
        diffs.append(sub["test_top1"] - other["test_top1"])
        mmacs.append(sub["mmacs"])
        if "training only" in other["widths"]:
            training_only.append(sub["mmacs"])
    if not diffs:
        return None
    return {
        "mean": round(sum(diffs) / len(diffs), 2),
        "min": round(min(diffs), 2),
        "max": round(max(diffs), 2),
        "mmacs": mmacs,
        "reference_training_only": training_only,
    }


def routed_vs_curve(results: dict, name: str, reference: str) -> dict | None:
    """``name``'s routed sub-networks minus ``reference``'s static curve at the same MMACs (test top-1 points).

    The curve: every sub-network of ``reference`` (routed or training only: each is trained), linear in MMACs;
    only ``name``'s routed rows inside its MMAC range count, never extrapolated. None: none inside.
    """
    if not isinstance(results.get(name), dict) or not isinstance(results.get(reference), dict):
        return None
    curve = sorted((sub["mmacs"], sub["test_top1"]) for sub in results[reference]["subnets"])
    xs, ys = [m for m, _ in curve], [t for _, t in curve]
    points = [
        (sub["mmacs"], sub["test_top1"] - float(np.interp(sub["mmacs"], xs, ys)))
        for sub in results[name]["subnets"]
        if "training only" not in sub["widths"] and xs[0] - 1e-9 <= sub["mmacs"] <= xs[-1] + 1e-9
    ]
    if not points:
        return None
    diffs = [d for _, d in points]
    return {
        "mean": round(sum(diffs) / len(diffs), 2),
        "min": round(min(diffs), 2),
        "max": round(max(diffs), 2),
        "mmacs": [m for m, _ in points],
        "diffs": [round(d, 2) for d in diffs],
    }


FACTORY = "benchmarks.byo_fashion_mnist:dynamic_resnet8"


def main() -> None:
    # the make_dynamic part names this file's own factory: importable from the repository root, and trusted
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    dsnet.trust_factories([FACTORY])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/byo_fashion_mnist")
    p.add_argument(
        "--data",
        default=None,
        help="a Fashion-MNIST folder or an image folder (benchmarks/small_folder.py writes one; default: the recipe's)",
    )
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--holdout", type=int, default=5000)
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds initialisation, data order and augmentation (the held-out slice is fixed)",
    )
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument(
        "--finetune-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for the fine-tuned parts only (import, import-noorder, make_dynamic), repeatable; "
        "e.g. supernet.finetune_lr_scale=0.3",
    )
    p.add_argument("--json", default="benchmarks/results/byo_fashion_mnist.json")
    p.add_argument("--skip", default="", help="comma-separated parts to skip (e.g. make_dynamic)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    results_path = out / "results.json"
    results: dict = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if "alone" in results and "best_epoch" not in results["alone"]:
        # alone.pth and every part fine-tuned from it came from the old recipe (last raw weights): not reusable
        sys.exit(f"{results_path}: its parts were made with the old alone recipe (last raw weights); use a new --out")
    results["setting"] = {k: v for k, v in vars(args).items() if k not in ("out", "json", "skip")}

    def part(name: str, fn) -> None:  # noqa: ANN001
        if name in results or name in skip:
            return
        print(f"[byo] {name} ...", flush=True)
        results[name] = fn()
        atomic_write_json(results, results_path)

    alone = out / "alone.pth"
    part("step_cost", lambda: step_cost(_cfg(args)))
    part("alone", lambda: train_alone(_cfg(args), out))
    part("converted", lambda: converted_only(_cfg(args), alone, "l1"))
    part("converted-noorder", lambda: converted_only(_cfg(args), alone, None))
    part("converted-source-widths", lambda: converted_only(_cfg(args), alone, "l1", pre_gate_ratio=1.0))
    part("scratch", lambda: supernet(_cfg(args), out / "scratch"))
    total = f"supernet.epochs={args.epochs + args.finetune_epochs}"  # alone + fine-tuning's epochs
    part("scratch-total", lambda: supernet(_cfg(args, total), out / "scratch-total"))
    fine = [f"supernet.epochs={args.finetune_epochs}", *args.finetune_set]
    part("import", lambda: supernet(_cfg(args, *fine, f"model.checkpoint_path={alone}"), out / "import"))

    def noorder() -> dict:
        # at the routed range fine-tuning picks for a network trained alone (a dsnet-format file fixes it)
        model = dsnet.create_model("ds_resnet8_tiny", num_classes=10, in_chans=1, pre_gate_ratio=1.0)
        load_pretrained(model, alone, importance=None)
        atomic_torch_save(model.state_dict(), out / "alone_noorder_dsnet.pth")  # dsnet format: loads as is
        ckpt = f"model.checkpoint_path={out / 'alone_noorder_dsnet.pth'}"
        return supernet(_cfg(args, *fine, ckpt, "model.kwargs.pre_gate_ratio=1.0"), out / "import-noorder")

    part("import-noorder", noorder)
    factory = f"model.name={FACTORY}"
    part("make_dynamic", lambda: supernet(_cfg(args, *fine, factory, f"model.checkpoint_path={alone}"), out / "md"))

    total_epochs = args.epochs + args.finetune_epochs
    versus = {n: d for n in ("import", "make_dynamic") if (d := routed_vs(results, n, "scratch-total")) is not None}
    curve = {
        n: d for n in ("import", "make_dynamic") if (d := routed_vs_curve(results, n, "scratch-total")) is not None
    }
    if versus:
        results["routed_vs_scratch_total"] = versus  # derived from the parts: in --json, not in results.json
    if curve:
        results["routed_vs_scratch_total_curve"] = curve
    atomic_write_json(results, Path(args.json))
    columns = (
        "converted-noorder",
        "converted",
        "converted-source-widths",
        "scratch",
        "scratch-total",
        "import-noorder",
        "import",
    )
    names = [n for n in (*columns, "make_dynamic") if n in results]
    # one row per sub-network shape, told by its MACs (the routed ranges differ: fine-tuning routes the
    # source's widths; make_dynamic names its stages after the plain network's layers)
    table: dict[float, dict] = {}
    for n in names:
        for sub in results[n]["subnets"] if isinstance(results[n], dict) else results[n]:
            table.setdefault(sub["mmacs"], {"widths": sub["widths"].replace(" (training only)", "")})[n] = sub
    rows = []
    for mmacs, cells in sorted(table.items()):
        row = [cells["widths"], f"{mmacs:.2f}"]
        for n in names:
            sub = cells.get(n)
            row.append(
                "-" if sub is None else f"{sub['test_top1']:.2f}" + ("*" if "training only" in sub["widths"] else "")
            )
        rows.append(row)
    print(format_table(["widths", "MMACs", *names], rows))
    print("*: training only (not routed)")
    for n in ("import", "import-noorder", "make_dynamic"):
        if isinstance(results.get(n), dict) and "source_holdout_top1" in results[n]:
            r = results[n]
            print(f"{n}: held-out top-1 source {r['source_holdout_top1']:.2f}, largest {r['largest_holdout_top1']:.2f}")
            for said in r.get("warnings", []):
                print(f"  {said}")
    for n, d in curve.items():
        print(
            f"{n}: routed sub-networks vs scratch-total's static curve at the same MMACs: mean {d['mean']:+.2f}, "
            f"min {d['min']:+.2f}, max {d['max']:+.2f} ("
            + ", ".join(f"{m:.2f}: {v:+.2f}" for m, v in zip(d["mmacs"], d["diffs"], strict=True))
            + ")"
        )
    for n, d in versus.items():
        only = d["reference_training_only"]
        print(
            f"{n}: routed sub-networks vs scratch with the same total epochs ({total_epochs}): mean diff "
            f"{d['mean']:+.2f}, min {d['min']:+.2f}, max {d['max']:+.2f} over {len(d['mmacs'])} matched by MMACs "
            f"({', '.join(f'{m:.2f}' for m in d['mmacs'])})"
            + (f"; scratch-total's at {', '.join(f'{m:.2f}' for m in only)} is training only" if only else "")
        )
    if "step_cost" in results:
        c = results["step_cost"]
        print(f"step cost (interleaved medians): alone {c['alone_s']}s, supernet {c['supernet_s']}s, x{c['ratio']}")
    if "alone" in results:
        a = results["alone"]
        print(
            f"alone: {a['test_top1']:.2f}% test top-1 (best epoch {a['best_epoch']}/{a['epochs']} on the "
            f"{a['selection_split']} split, EMA {a['holdout_top1']:.2f}%, BN recalibrated "
            f"{a['holdout_top1_calibrated']:.2f}%; last raw weights {a['last_raw_test_top1']:.2f}% test), "
            f"{a['seconds']:.0f}s" + (f", {a['steps']} optimiser steps" if "steps" in a else "")
        )
    for n in ("scratch", "scratch-total", "import", "import-noorder", "make_dynamic"):
        if n in results:
            steps = results[n].get("steps")
            print(f"{n}: {results[n]['seconds']:.0f}s" + (f", {steps} optimiser steps" if steps else ""))


if __name__ == "__main__":
    main()
