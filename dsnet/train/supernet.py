"""Stage I: supernet training (SPEC section 3).

Each step runs the **sandwich rule** -- the largest sub-network, ``n`` random
ones and the smallest -- accumulating their gradients for one optimiser step.
The largest learns from the labels (label-smoothed cross-entropy); the others
learn from an EMA teacher's predictions (**in-place bootstrapping**, IB), or,
with IEB, the smallest from the mean of the teacher at the largest and the
sampled widths. With **MvCo** every image comes in two augmented views: the
teacher's target is its mean prediction over both, and the students train on
the view the largest did not see. Training ends with BN recalibration.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsnet.models import create_model
from dsnet.models.base import DynamicNet
from dsnet.train.bn_calibration import calibrate_bn
from dsnet.train.checkpoint import (
    build_checkpoint_model,
    load_model,
    load_state_into,
    nonfinite_tensors,
    read_checkpoint,
    save_checkpoint,
)
from dsnet.train.config import load_config, model_config_error
from dsnet.train.distributed import init_distributed
from dsnet.train.ema import ModelEma
from dsnet.train.finetune import (
    FinetunePlan,
    build_start_model,
    describe_plan,
    frozen_teacher,
    plan_finetune,
    source_warning,
)
from dsnet.train.loop import TrainLoop, ddp_wrap, rank_checksums
from dsnet.train.losses import soft_cross_entropy
from dsnet.train.optim import MaskedSGD
from dsnet.train.run import (
    RunDir,
    autocast,
    effective_lr,
    seed_everything,
    selection_loader,
    split_sizes,
    top1_accuracy,
    unwrap,
)
from dsnet.utils.io import atomic_copy, check_output_file
from dsnet.utils.threads import set_threads

__all__ = [
    "SandwichStep",
    "sample_subnets",
    "supernet_step",
    "train_supernet",
    "build_model",
    "build_optimizer",
    "calibrate_checkpoint",
    "selection_top1",
    "supernet_epoch_line",
]


def sample_subnets(
    model: DynamicNet, step: int, seed: int, num_random: int, width_sampling: str = "discrete"
) -> list[int]:
    """Sandwich rule for one step: largest, ``num_random`` random routed ones, smallest.

    ``width_sampling="discrete"`` draws the random ones uniformly among the
    routed sub-networks above the slimmest (DS-Net); ``"continuous"`` draws a
    width multiplier ``r ~ U[r_min, 1]`` (``r_min``: the slimmest's) and takes
    the routed sub-network nearest it (US-Nets over a fine width grid). A model
    with a single sub-network (a network trained alone) trains just that one.
    Drawn from a generator seeded by (seed, step), so every DDP rank and a
    resumed run draw the same sub-networks as an uninterrupted run.
    """
    if len(model.subnets) == 1:
        return [0]
    routed = [s.index for s in model.subnets if s.routed]
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    if width_sampling == "continuous":
        r_min = model.width_ratio(routed[0])
        ratios = (r_min + (1.0 - r_min) * torch.rand(num_random, generator=g, dtype=torch.float64)).tolist()
        return [model.largest, *(model.subnet_for_width(r) for r in ratios), routed[0]]
    if width_sampling != "discrete":
        raise ValueError(f"width_sampling must be 'discrete' or 'continuous', got {width_sampling!r}")
    pool = routed[1:] or routed
    picks = torch.randint(len(pool), (num_random,), generator=g).tolist()
    return [model.largest, *(pool[i] for i in picks), routed[0]]


def supernet_step(
    model: nn.Module,
    teacher: nn.Module | None,
    views: list[Tensor],
    labels: Tensor,
    subnets: list[int],
    *,
    distill: str = "ib",
    label_smoothing: float = 0.1,
    amp: bool = False,
    label_weight: float = 0.0,
) -> dict[str, float]:
    """Forward + backward of every sub-network in ``subnets`` (gradients accumulate; no optimiser step).

    ``subnets[0]`` is trained on the labels, the rest on bootstrapped targets (``distill="source"``: the
    predictions of ``teacher`` at full width, as ``"ib"`` but from a frozen source network, see
    :mod:`dsnet.train.finetune`); with ``label_weight`` ``w``
    [ours] the others' loss is ``(1 - w) * distillation + w * label cross-entropy``.
    ``views`` holds one batch of images, or two augmented views (MvCo). Under
    DDP, gradients are all-reduced once, on the last backward.
    """
    core = unwrap(model)
    device = labels.device
    largest_view = views[0]
    student_view = views[-1]  # with MvCo, the view the largest did not see
    targets: dict[int, Tensor] = {}
    with torch.no_grad(), autocast(device, amp):
        if distill in ("ib", "ieb", "source"):
            teacher_probs = torch.stack([F.softmax(teacher(v, subnet=core.largest).float(), -1) for v in views]).mean(0)
            targets[core.largest] = teacher_probs
            if distill == "ieb":
                for k in subnets[1:-1]:
                    targets[k] = torch.stack([F.softmax(teacher(v, subnet=k).float(), -1) for v in views]).mean(0)
    losses: dict[str, float] = {}
    last = len(subnets) - 1
    for i, k in enumerate(subnets):
        sync = contextlib.nullcontext() if (i == last or not hasattr(model, "no_sync")) else model.no_sync()
        with sync:
            with autocast(device, amp):
                if i == 0:
                    logits = model(largest_view, subnet=k)
                    loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
                    if distill == "inplace":
                        targets[core.largest] = F.softmax(logits.detach().float(), -1)
                else:
                    logits = model(student_view, subnet=k)
                    if distill == "none" or label_weight > 0:
                        loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
                    if distill != "none":
                        if distill == "ieb" and i == last and len(subnets) > 2:
                            # in-place ensemble bootstrapping: the smallest learns from the teacher's ensemble
                            target = torch.stack([targets[core.largest]] + [targets[j] for j in subnets[1:-1]]).mean(0)
                        else:
                            target = targets[core.largest]
                        soft = soft_cross_entropy(logits.float(), target)
                        loss = soft if label_weight <= 0 else (1 - label_weight) * soft + label_weight * loss
            loss.backward()
        name = "largest" if i == 0 else ("smallest" if i == last else f"random{i}")
        losses[f"loss_{name}"] = float(loss.detach())
    return losses


class SandwichStep:
    """One stage I optimiser step: the sandwich rule's forwards and backwards, clipping, the step, the EMA update.

    Call it on a batch ``(images, labels)``, or ``([view, view], labels)`` with
    MvCo. ``count`` is the global step; it seeds the sandwich sampling, so a
    resumed run (set ``count`` to the step it resumes at) and every DDP rank
    draw the same sub-networks as an uninterrupted run.
    """

    def __init__(
        self,
        model: DynamicNet,
        optimizer: torch.optim.Optimizer,
        ema: ModelEma | None,
        *,
        ddp: nn.Module | None = None,
        num_random: int = 2,
        distill: str = "ib",
        label_smoothing: float = 0.1,
        amp: bool = False,
        grad_clip: float | None = None,
        channels_last: bool = False,
        seed: int = 0,
        width_sampling: str = "discrete",
        label_weight: float = 0.0,
        teacher: nn.Module | None = None,
    ) -> None:
        if distill in ("ib", "ieb") and ema is None:
            raise ValueError(f"distill={distill!r} learns from an EMA teacher: pass one (or distill='inplace')")
        if distill == "source" and teacher is None:
            raise ValueError("distill='source' learns from a frozen source network: pass it as teacher=")
        self.teacher = teacher  # the frozen source network (distill="source"); never updated
        self.model, self.optimizer, self.ema, self.ddp = model, optimizer, ema, ddp or model
        self.num_random, self.distill, self.label_smoothing = num_random, distill, label_smoothing
        self.amp, self.grad_clip, self.channels_last, self.seed = amp, grad_clip, channels_last, seed
        self.width_sampling = width_sampling
        self.label_weight = label_weight
        self.device = next(model.parameters()).device
        self.count = 0

    def __call__(self, batch: tuple[Tensor | list[Tensor], Tensor]) -> dict[str, float]:
        images, labels = batch
        views = [v.to(self.device, non_blocking=True) for v in (images if isinstance(images, list) else [images])]
        if self.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        self.optimizer.zero_grad(set_to_none=True)
        losses = supernet_step(
            self.ddp,
            self.teacher if self.distill == "source" else None if self.ema is None else self.ema.module,
            views,
            labels.to(self.device, non_blocking=True),
            sample_subnets(self.model, self.count, self.seed, self.num_random, self.width_sampling),
            distill=self.distill,
            label_smoothing=self.label_smoothing,
            amp=self.amp,
            label_weight=self.label_weight,
        )
        if self.grad_clip:
            nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], self.grad_clip)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.count += 1
        return losses


def selection_top1(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    routed: Sequence[int],
    largest: int,
    prefix: str = "ema_top1",
) -> dict[str, float]:
    """Top-1 (%) of the slimmest and widest routed and of the largest sub-network: what selects stage I's best epoch.

    Keys ``{prefix}_slimmest``, ``{prefix}_widest``, ``{prefix}_largest``; a
    sub-network that is two of them (a network trained alone) is measured once.
    """
    measured: dict[int, float] = {}
    out = {}
    for name, k in (("slimmest", routed[0]), ("widest", routed[-1]), ("largest", largest)):
        if k not in measured:
            measured[k] = top1_accuracy(model, loader, device, subnet=k)
        out[f"{prefix}_{name}"] = measured[k]
    return out


def supernet_epoch_line(record: dict[str, Any]) -> str:
    """The epoch's log line after ``[supernet] epoch e/E Ns``: the learning rate, losses, selection top-1s."""
    shown = ", ".join(f"{k}={v:.3f}" for k, v in record.items() if k.startswith(("loss", "ema", "top1")))
    return f"lr={record['lr']:.4f} {shown}"


def build_optimizer(params: list[nn.Parameter], lr: float, sc: dict[str, Any]) -> torch.optim.Optimizer:
    """Masked SGD (the official recipe) or AdamW (transformers).

    Weight decay applies to weight matrices and kernels only: BN/LayerNorm
    scales and shifts and biases get none, as in the official recipe (and
    DeiT's), since decaying a normalisation scale only rescales features.
    """
    groups = [
        {"params": [p for p in params if p.dim() > 1], "weight_decay": sc["weight_decay"]},
        {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0},
    ]
    if sc["optimizer"] == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(sc["betas"]))
    return MaskedSGD(
        groups, lr, sc["momentum"], sc["weight_decay"], sc["nesterov"], mask_untouched=sc["mask_untouched"]
    )


def _model_spec(cfg: dict, num_classes: int, in_chans: int) -> dict[str, Any]:
    """What a checkpoint records to rebuild the model: the dataset's classes/channels unless the config overrides."""
    kwargs = {"num_classes": num_classes, "in_chans": in_chans, **cfg["model"]["kwargs"]}
    return {"name": cfg["model"]["name"], "kwargs": kwargs}


def build_model(cfg: dict, num_classes: int, in_chans: int) -> DynamicNet:
    """The config's model; a bad ``model.name`` or ``model.kwargs`` is a ``ConfigError`` naming the key."""
    spec = _model_spec(cfg, num_classes, in_chans)
    try:
        model = create_model(spec["name"], **spec["kwargs"])
    except (ValueError, TypeError) as err:
        raise model_config_error(spec["name"], err) from None
    if not isinstance(model, DynamicNet):
        raise ValueError(f"{spec['name']} is not a dynamic dsnet model")
    return model


def train_supernet(
    cfg: dict | str | Path,
    out: str | Path,
    resume: bool = False,
    overrides: list[str] | None = None,
    stop_after_epoch: int | None = None,
) -> dict[str, Any]:
    """Run stage I (and the BN recalibration that ends it). Returns the summary written to ``summary.json``.

    ``stop_after_epoch=e`` ends the process after epoch ``e`` is checkpointed, as if it had been killed
    there (time-boxed jobs; resume with ``resume=True``).
    """
    from dsnet.data import build_loader
    from dsnet.data.recipe import describe_recipe

    if not isinstance(cfg, dict):
        cfg = load_config(cfg, overrides)
    sc = cfg["supernet"]
    ctx, device = init_distributed(cfg["device"], cfg["distributed"]["backend"])
    seed_everything(cfg["seed"])
    threads = set_threads(cfg.get("threads"), override=False)  # --threads N (set earlier) wins
    views = 2 if sc["mvco"] else 1
    train_loader, info = build_loader(
        cfg["data"], "train", seed=cfg["seed"], rank=ctx.rank, world_size=ctx.world_size, device=device, views=views
    )
    if ctx.is_main:
        print(
            f"[supernet] {describe_recipe(info.recipe, cfg['data']['augment'])}; torch threads: {threads}", flush=True
        )
    val_loader, val_split = selection_loader(cfg["data"], cfg["seed"], device)
    if ctx.is_main:
        print(f"[supernet] data: {split_sizes(info.num_samples, val_loader, val_split)}", flush=True)
    # from trained weights (model.checkpoint_path): the source loads (a resume loads it too: it is the teacher)
    plan = plan_finetune(cfg)
    start = build_start_model(cfg, lambda c: build_model(c, info.num_classes, info.in_chans), plan)
    cfg = start.cfg  # model.kwargs.pre_gate_ratio when the routed range was widened to the source's widths
    run = RunDir(out, cfg, ctx, resume, "supernet")  # checks the folder and the resume state; writes nothing yet
    model = start.model.to(device)
    if start.report is not None and ctx.is_main:
        print(f"[supernet] {'source' if resume else 'initialised'}: {start.report}", flush=True)
    if sc["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    # the source network as loaded, before any step (a resume overwrites model's weights below)
    source = frozen_teacher(model) if plan.teacher == "source" else None
    source_top1 = None
    if plan.from_trained and ctx.is_main:
        source_top1 = top1_accuracy(model, val_loader, device, subnet=model.largest)
        print(
            f"[supernet] source network (largest sub-network as loaded): {source_top1:.2f}% top-1 on the "
            f"{val_split} split",
            flush=True,
        )
    for head in model.routing_heads():  # the slimming (and exit) head train in stage II
        head.requires_grad_(False)
    ema = ModelEma(model, sc["ema_decay"], warmup=sc["ema_warmup"], buffers=sc["ema_buffers"])
    params = [p for p in model.parameters() if p.requires_grad]
    global_batch = cfg["data"]["batch_size"] * ctx.world_size
    base_lr = effective_lr("supernet", sc, global_batch, ctx.is_main) * plan.lr_scale
    if ctx.is_main:
        print(describe_plan(plan, start, base_lr, sc["warmup_epochs"]), flush=True)
    optimizer = build_optimizer(params, base_lr, sc)
    steps_per_epoch = len(train_loader)
    if ctx.enabled:  # BN statistics over every rank's images, as one process with the global batch would have
        for bn in model.sliced_batchnorms():
            bn.sync = True
    routed = [s.index for s in model.subnets if s.routed]
    spec = _model_spec(cfg, info.num_classes, info.in_chans)
    step = SandwichStep(
        model,
        optimizer,
        ema,
        ddp=ddp_wrap(model, ctx, device),
        num_random=sc["num_random"],
        distill=plan.distill,
        label_smoothing=sc["label_smoothing"],
        amp=sc["amp"],
        grad_clip=sc["grad_clip"],
        channels_last=sc["channels_last"],
        seed=cfg["seed"],
        width_sampling=sc["width_sampling"],
        label_weight=sc["distill_label_weight"],
        teacher=source,
    )

    def begin_epoch(epoch: int) -> None:
        step.count = epoch * steps_per_epoch  # global step: seeds the sandwich sampling

    def evaluate(epoch: int, record: dict[str, Any]) -> None:
        if ctx.is_main:  # the EMA teacher on the selection split (BN statistics not yet recalibrated)
            record["selection_split"] = val_split
            record.update(selection_top1(ema.module, val_loader, device, routed, model.largest))

    def payload(epoch: int) -> dict[str, Any]:
        return {
            "state_dict": model.state_dict(),
            "ema_state_dict": ema.state_dict(),
            "step": (epoch + 1) * steps_per_epoch,
        }

    def load_weights(state: dict[str, Any]) -> None:
        load_state_into(model, state["state_dict"], run.last, state)
        load_state_into(ema.module, state["ema_state_dict"], run.last, state, what="EMA weights")
        ema.updates = state["step"]

    loop = TrainLoop.for_run(
        run,
        ctx,
        device,
        stop_after_epoch,
        "supernet",
        model,
        train_loader,
        optimizer,
        step,
        epochs=sc["epochs"],
        lr=base_lr,
        warmup_steps=round(plan.warmup_epochs * steps_per_epoch),
        min_lr=sc["min_lr"] * plan.lr_scale,
        selection_key="ema_top1_widest",
        selection_split=val_split,
        begin_epoch=begin_epoch,
        evaluate=evaluate,
        payload=payload,
        checkpoint={"model": spec, "dataset": dataclasses.asdict(info), "bn_calibrated": False},
        epoch_line=lambda epoch, record: supernet_epoch_line(record),
    )
    loop.start(load_weights)
    fitted = loop.fit()
    if fitted.stopped_after_epoch is not None:
        return {"stopped_after_epoch": fitted.stopped_after_epoch}
    result: dict[str, Any] = {
        "epochs": sc["epochs"],
        "best_metric": fitted.best_metric,
        "best_epoch": fitted.best_epoch,  # 1-based, as the logs count
        "selection_split": val_split,
        "rank_param_checksums": rank_checksums(model, ctx, device),
    }
    if ctx.is_main:
        show = cfg["log"]["progress"]
        result["calibration"] = calibrate_checkpoint(run.best, run.best, cfg, device, progress=show)
        own = [cfg["model"]["name"]]  # this run's own files name the caller's model
        if (
            read_checkpoint(run.last, trust_factories=own)["epoch"]
            == read_checkpoint(run.best, trust_factories=own)["epoch"]
        ):
            atomic_copy(run.best, run.last)  # same weights: no need to calibrate twice
        else:
            calibrate_checkpoint(run.last, run.last, cfg, device, progress=show)
        if plan.from_trained:
            result.update(_source_check(run.best, own, device, val_loader, val_split, source_top1, plan))
    run.write_summary(result)
    run.close()
    ctx.barrier()
    return result


def _source_check(
    best: Path,
    own: list[str],
    device: torch.device,
    loader: Any,
    split: str,
    source_top1: float | None,
    plan: FinetunePlan,
) -> dict[str, Any]:
    """The summary's fine-tuning entries: the source's and the final largest's top-1, a warning if it fell."""
    final, _ = load_model(best, map_location=device, trust_factories=own)  # calibrated EMA weights
    largest_top1 = top1_accuracy(final, loader, device, subnet=final.largest)
    out: dict[str, Any] = {
        "finetune": plan.as_dict(),
        "source_holdout_top1": source_top1,
        "largest_holdout_top1": largest_top1,
        "warnings": [],
    }
    said = None if source_top1 is None else source_warning(largest_top1, source_top1, split, plan.teacher)
    if said:
        out["warnings"].append(said)
        print(f"[supernet] {said}", flush=True)
    return out


def calibrate_checkpoint(
    src: str | Path,
    dst: str | Path,
    cfg: dict | None = None,
    device: torch.device | str = "cpu",
    num_batches: int | None = None,
    data_overrides: dict | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Recalibrate the BN statistics of a checkpoint's weights and save them to ``dst``.

    Both sets of weights a stage I checkpoint holds are recalibrated -- the EMA
    teacher's (what stage II and evaluation use) and the raw student's (what
    ``--no-ema`` evaluates) -- and ``bn_calibrated`` lists which.

    Everything is checked before the work: ``dst`` can be written, the
    checkpoint records a config with a data section, its weights fit its model.
    """
    from dsnet.data import build_loader, resolve_data_config
    from dsnet.data.recipe import with_recorded_recipe

    if num_batches is not None and num_batches < 1:
        raise ValueError(f"BN recalibration needs at least one batch per sub-network, got {num_batches}")
    check_output_file(dst, "--out")
    own = [cfg["model"]["name"]] if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict) else []
    ckpt = read_checkpoint(src, map_location="cpu", trust_factories=own)  # the caller's config names its model
    if cfg is None:
        cfg = ckpt.get("config")
        if not isinstance(cfg, dict) or not isinstance(cfg.get("data"), dict):
            raise ValueError(f"{src}: the checkpoint records no training config (data section) to calibrate with")
    data_cfg = with_recorded_recipe(resolve_data_config({**cfg["data"], **(data_overrides or {})}), ckpt.get("dataset"))
    num_batches = num_batches or cfg.get("supernet", {}).get("bn_calibration_batches", 200)
    model = build_checkpoint_model(ckpt, src).to(device)
    keys = [k for k in ("ema_state_dict", "state_dict") if ckpt.get(k) is not None]
    loader, _ = build_loader(data_cfg, "train", seed=cfg.get("seed", 0), device=device)
    num_batches = min(num_batches, len(loader))
    t0 = time.time()
    for key in keys:
        load_state_into(model, ckpt[key], src, ckpt)
        calibrate_bn(model, loader, num_batches, device=device, progress=progress)
        ckpt[key] = {k: v.cpu() for k, v in model.state_dict().items()}
        bad = nonfinite_tensors(ckpt[key])
        if bad:  # weights so large that the recalibrated statistics overflow: nothing is written
            raise FloatingPointError(
                f"{src}: BN recalibration gave statistics that are not finite ({', '.join(bad[:3])}"
                f"{', ...' if len(bad) > 3 else ''}): its weights overflow (training diverged?); {dst} not written"
            )
    ckpt["bn_calibrated"] = keys
    save_checkpoint(dst, {k: v for k, v in ckpt.items() if k != "format"})
    return {"batches_per_subnet": num_batches, "subnets": len(model.subnets), "seconds": round(time.time() - t0, 2)}
