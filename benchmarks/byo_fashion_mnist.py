"""Bring your own network, on Fashion-MNIST: start a supernet from a network trained alone, or from scratch?

Runs, with the quickstart recipe (``dsnet.quickstart.QUICKSTART``: ResNet-8 tiny, SGD, cosine, sandwich rule,
in-place bootstrapping, BN recalibration), ``data.holdout`` images held out for selecting the best epoch, and
the test split read once at the end:

* ``alone``: a plain ResNet-8 (torchvision layout and key names, the shape of ``ds_resnet8_tiny`` at full width)
  trained alone for ``--epochs`` epochs (same optimiser, schedule, augmentation, label smoothing);
* ``scratch``: ``ds_resnet8_tiny`` trained as a supernet from random weights for ``--epochs`` epochs;
* ``import``: ``ds_resnet8_tiny`` initialised from ``alone`` (``model.checkpoint_path``, torchvision format,
  L1 importance order) and trained as a supernet for ``--finetune-epochs`` with stage I's fine-tuning defaults
  (``dsnet.train.finetune``: the frozen source network teaches the narrower sub-networks, lr x0.1, no warm-up,
  the stages before the gate at full width so the widest routed sub-network is the source network);
* ``import-noorder``: the same without the importance order (the trained network's own channel order);
* ``make_dynamic``: the plain network made dynamic by ``dsnet.make_dynamic`` through a ``module:factory``
  model name (the same architecture as ``ds_resnet8_tiny``), fine-tuned as ``import``;
* ``converted`` / ``converted-noorder``: the conversions before any fine-tuning (BN statistics recalibrated),
  with the paper's routed range (stages before the gate at the slimmest width);
* ``converted-source-widths``: the conversion fine-tuning starts from (stages before the gate at full width).

Fine-tuned runs also record the source's and the final largest sub-network's held-out top-1 and stage I's
warning if the largest ended below the source.

Every dynamic model's static sub-networks are evaluated on the test split. Results: a table and
``--json``. ``python benchmarks/byo_fashion_mnist.py --train-subset 20000 --epochs 6 --finetune-epochs 2``
(run from the repository root; each finished part is reused on a re-run).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import dsnet
from dsnet.data import build_loader
from dsnet.models.pretrained import load_pretrained
from dsnet.quickstart import QUICKSTART
from dsnet.train.bn_calibration import calibrate_bn
from dsnet.train.checkpoint import load_model
from dsnet.train.config import apply_overrides, resolve_config
from dsnet.train.ema import ModelEma
from dsnet.train.optim import MaskedSGD, cosine_lr
from dsnet.train.run import seed_everything, top1_accuracy, train_epoch
from dsnet.train.supernet import sample_subnets, supernet_step, train_supernet
from dsnet.utils.io import atomic_torch_save, atomic_write_json
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
    """ResNet-8 with torchvision's key names: 3x3 stride-2 stem, one basic block per stage, 32-64-128 planes."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1) -> None:
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
            elif isinstance(m, BasicBlock):  # zero-init residual branches, as ds_resnet8_tiny
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
    return resolve_config(apply_overrides(copy.deepcopy(QUICKSTART), overrides + list(extra)))


def train_alone(cfg: dict, out: Path) -> dict:
    """The plain network, trained alone with the supernet's recipe (its largest sub-network's loss only)."""
    sc = cfg["supernet"]
    seed_everything(cfg["seed"])
    loader, info = build_loader(cfg["data"], "train", seed=cfg["seed"])
    model = ResNet8(info.num_classes, info.in_chans)
    base_lr = sc["lr"] * cfg["data"]["batch_size"] / sc["lr_reference_batch"]
    optimizer = MaskedSGD(  # the supernet's optimiser (every channel gets a gradient here: plain SGD)
        list(model.parameters()), base_lr, sc["momentum"], sc["weight_decay"], sc["nesterov"], sc["mask_untouched"]
    )
    steps = len(loader)

    def step(batch: tuple[Tensor, Tensor]) -> dict[str, float]:
        images, labels = batch
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(images), labels, label_smoothing=sc["label_smoothing"])
        loss.backward()
        optimizer.step()
        return {"loss": float(loss.detach())}

    t0 = time.time()
    for epoch in range(sc["epochs"]):
        model.train()
        train_epoch(
            loader,
            epoch,
            lambda s: cosine_lr(s, sc["epochs"] * steps, base_lr, sc["warmup_epochs"] * steps, sc["min_lr"]),
            optimizer,
            step,
            f"alone {epoch + 1}/{sc['epochs']}",
            False,
            50,
        )
        print(f"[alone] epoch {epoch + 1}/{sc['epochs']} {time.time() - t0:.0f}s", flush=True)
    seconds = time.time() - t0
    atomic_torch_save(model.state_dict(), out / "alone.pth")
    test, _ = build_loader(cfg["data"], "val", seed=cfg["seed"])
    return {"seconds": round(seconds, 1), "test_top1": round(top1_accuracy(model, test, torch.device("cpu")), 2)}


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
    result = {"seconds": round(seconds, 1), "subnets": evaluate(model, cfg)}
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


FACTORY = "benchmarks.byo_fashion_mnist:dynamic_resnet8"


def main() -> None:
    # the make_dynamic part names this file's own factory: importable from the repository root, and trusted
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    dsnet.trust_factories([FACTORY])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/byo_fashion_mnist")
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
    p.add_argument("--json", default="benchmarks/results/byo_fashion_mnist.json")
    p.add_argument("--skip", default="", help="comma-separated parts to skip (e.g. make_dynamic)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    results_path = out / "results.json"
    results: dict = json.loads(results_path.read_text()) if results_path.is_file() else {}
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
    fine = f"supernet.epochs={args.finetune_epochs}"
    part("import", lambda: supernet(_cfg(args, fine, f"model.checkpoint_path={alone}"), out / "import"))

    def noorder() -> dict:
        # at the routed range fine-tuning picks for a network trained alone (a dsnet-format file fixes it)
        model = dsnet.create_model("ds_resnet8_tiny", num_classes=10, in_chans=1, pre_gate_ratio=1.0)
        load_pretrained(model, alone, importance=None)
        atomic_torch_save(model.state_dict(), out / "alone_noorder_dsnet.pth")  # dsnet format: loads as is
        ckpt = f"model.checkpoint_path={out / 'alone_noorder_dsnet.pth'}"
        return supernet(_cfg(args, fine, ckpt, "model.kwargs.pre_gate_ratio=1.0"), out / "import-noorder")

    part("import-noorder", noorder)
    factory = f"model.name={FACTORY}"
    part("make_dynamic", lambda: supernet(_cfg(args, fine, factory, f"model.checkpoint_path={alone}"), out / "md"))

    atomic_write_json(results, Path(args.json))
    columns = ("converted-noorder", "converted", "converted-source-widths", "scratch", "import-noorder", "import")
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
    if "step_cost" in results:
        c = results["step_cost"]
        print(f"step cost (interleaved medians): alone {c['alone_s']}s, supernet {c['supernet_s']}s, x{c['ratio']}")
    if "alone" in results:
        print(f"alone: {results['alone']['test_top1']:.2f}% test top-1, {results['alone']['seconds']:.0f}s")
    for n in ("scratch", "import", "import-noorder", "make_dynamic"):
        if n in results:
            print(f"{n}: {results[n]['seconds']:.0f}s")


if __name__ == "__main__":
    main()
