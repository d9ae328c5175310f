"""Stage II: gate training (SPEC section 3).

The supernet is frozen (BN in eval mode); only the gate's slimming head
trains, on three losses:

* **SGS** (sandwich gate sparsification): the slimmest and widest routed
  sub-networks label each image -- easy or hopeless -> slimmest, otherwise
  widest -- and the gate logits learn those labels (softmax applied once);
* **task**: cross-entropy of the dynamically routed output, each sample's
  output computed exactly by the sub-network it was routed to, scaled by its
  straight-through one-hot weight so the gradient reaches the gate;
* **complexity**: ``lambda * (mean MACs / unit)^2`` with MACs from the
  straight-through decision (forward = the real routed cost), or, with a
  target budget, ``lambda * ((mean MACs - target) / unit)^2``.

The backbone runs once per batch up to the gate; the slimmest and widest
outputs needed by SGS and the routed outputs reuse those features.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from dsnet.layers.gate import bias_ramp, straight_through_gumbel
from dsnet.models.base import DynamicNet
from dsnet.train.checkpoint import load_model, load_state_into
from dsnet.train.config import load_config
from dsnet.train.distributed import init_distributed
from dsnet.train.losses import complexity_loss, sgs_targets
from dsnet.train.optim import MaskedSGD, cosine_lr
from dsnet.train.run import (
    RunDir,
    effective_lr,
    epoch_record,
    rng_state,
    seed_everything,
    selection_loader,
    set_rng_state,
    train_epoch,
)
from dsnet.utils.modes import temporary_mode

__all__ = ["gate_step", "train_gate", "freeze_backbone", "evaluate_dynamic"]


def freeze_backbone(model: DynamicNet) -> list[torch.nn.Parameter]:
    """Only the slimming head trains; BN layers stay in eval mode (call after ``model.train()``)."""
    for p in model.parameters():
        p.requires_grad_(False)
    head = list(model.gate.slim_head.parameters())
    for p in head:
        p.requires_grad_(True)
    for bn in model.sliced_batchnorms():
        bn.eval()
    return head


def gate_step(
    model: DynamicNet,
    images: Tensor,
    labels: Tensor,
    macs_table: Tensor,
    gc: dict[str, Any],
    unit_macs: float,
    target_macs: float | None = None,
) -> dict[str, float]:
    """Losses of one stage II step, backward included (no optimiser step).

    ``target_macs`` is the budget the complexity loss steers toward (None: plain ``(MACs / unit)^2``).
    """
    space = model.routing_space
    n = len(space)
    with torch.no_grad():
        h, z = model.forward_pre(images, space[0])
        slim = model.forward_post(h, space[0])
        wide = model.forward_post(h, space[-1])
        target = sgs_targets(slim, wide, labels, n)
    gate_logits = model.gate.raw_logits(z)  # the stored budget bias is set after training, not trained through
    onehot = straight_through_gumbel(gate_logits, gc["tau"])
    choice = onehot.argmax(1)
    with torch.no_grad():
        routed = model._run_groups(h, choice, None)  # each sample's output from its own sub-network
    # forward value 1, gradient of the Gumbel-softmax: the task loss reaches the gate
    logits = routed * onehot.gather(1, choice[:, None])
    sgs = F.cross_entropy(gate_logits, target)
    task = F.cross_entropy(logits, labels)
    expected_macs = onehot @ macs_table
    cost = complexity_loss(expected_macs, gc["macs_weight"], unit_macs, target_macs)
    loss = gc["sgs_weight"] * sgs + gc["task_weight"] * task + cost
    loss.backward()
    return {
        "loss": float(loss.detach()),
        "loss_sgs": float(sgs.detach()),
        "loss_task": float(task.detach()),
        "loss_macs": float(cost.detach()),
        "train_mmacs": float(expected_macs.detach().mean()) / 1e6,
        "train_top1": 100.0 * float((routed.argmax(1) == labels).float().mean()),
        "sgs_wide_frac": float((target == n - 1).float().mean()),
    }


def target_macs(gc: dict[str, Any], macs_table: Tensor) -> float | None:
    """The budget in MACs per sample: ``target_mmacs``, or ``target_fraction`` of the widest routing choice."""
    if gc["target_mmacs"] is not None and gc["target_fraction"] is not None:
        raise ValueError("gate.target_mmacs and gate.target_fraction are alternatives: set one")
    if gc["target_mmacs"] is not None:
        return gc["target_mmacs"] * 1e6
    if gc["target_fraction"] is not None:
        if not 0.0 < gc["target_fraction"] <= 1.0:
            raise ValueError(f"gate.target_fraction must be in (0, 1], got {gc['target_fraction']}")
        return gc["target_fraction"] * float(macs_table[-1])
    return None


@torch.no_grad()
def calibrate_budget(
    model: DynamicNet, loader, device: torch.device, macs_table: Tensor, target: float, max_batches: int = 50
) -> float:
    """Set the gate's stored budget bias so dynamic inference averages ``target`` MACs on training images.

    The bias is ``b * bias_ramp`` (favouring slim choices for ``b > 0``); the
    mean routed MACs fall monotonically with ``b``, so bisection finds the
    smallest ``b`` that meets the budget. Returns ``b``.
    """
    ramp = bias_ramp(len(model.routing_space)).to(device)
    logits = []
    with temporary_mode(model, False):
        for i, (images, _) in enumerate(loader):
            if i >= max_batches:
                break
            _, z = model.forward_pre(images.to(device), model.routing_space[0])
            logits.append(model.gate.raw_logits(z))
    g = torch.cat(logits)
    table = macs_table.to(device)

    def mean_macs(b: float) -> float:
        return float(table[(g + b * ramp).argmax(1)].mean())

    lo, hi = -1.0, 1.0
    while mean_macs(lo) < target and lo > -1e6:
        lo *= 2
    while mean_macs(hi) > target and hi < 1e6:
        hi *= 2
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if mean_macs(mid) > target:
            lo = mid
        else:
            hi = mid
    model.gate.budget_bias.copy_(hi * ramp)
    return hi


@torch.no_grad()
def evaluate_dynamic(model: DynamicNet, loader, device: torch.device, macs_table: Tensor) -> dict[str, float]:
    """Dynamic top-1 (%) and mean MACs per sample (eval mode: argmax, no noise)."""
    correct = total = 0
    macs = 0.0
    counts = torch.zeros(len(model.routing_space))
    with temporary_mode(model, False):
        for images, labels in loader:
            r = model(images.to(device), return_routing=True)
            correct += int((r.logits.argmax(1) == labels.to(device)).sum())
            total += labels.numel()
            macs += float(macs_table[r.choice].sum())
            counts += torch.bincount(r.choice.cpu(), minlength=len(model.routing_space)).float()
    out = {"top1": 100.0 * correct / max(1, total), "mmacs": macs / max(1, total) / 1e6}
    out.update({f"route_{k}": float(c) / max(1, total) for k, c in zip(model.routing_space, counts, strict=True)})
    return out


def train_gate(
    cfg: dict | str | Path,
    supernet: str | Path,
    out: str | Path,
    resume: bool = False,
    overrides: list[str] | None = None,
    stop_after_epoch: int | None = None,
) -> dict[str, Any]:
    """Run stage II on a (BN-recalibrated) supernet checkpoint. Returns the summary.

    ``stop_after_epoch`` as in :func:`dsnet.train.supernet.train_supernet`.
    """
    from dsnet.data import build_loader

    if not isinstance(cfg, dict):
        cfg = load_config(cfg, overrides)
    gc = cfg["gate"]
    ctx, device = init_distributed(cfg["device"], cfg["distributed"]["backend"])
    seed_everything(cfg["seed"] + 1)
    model, sup = load_model(supernet, use_ema=True, map_location=device)
    if not isinstance(model, DynamicNet):
        raise ValueError(f"{supernet} does not hold a dynamic dsnet model")
    if not sup.get("bn_calibrated", False) and ctx.is_main:
        print(f"warning: {supernet} has not been BN-recalibrated; run `dsnet calibrate-bn` first for best results")
    train_loader, info = build_loader(
        cfg["data"], "train", seed=cfg["seed"] + 1, rank=ctx.rank, world_size=ctx.world_size, device=device
    )
    val_loader, val_split = selection_loader(cfg["data"], cfg["seed"], device)
    if info.num_classes != model.num_classes or info.in_chans != model.in_chans:
        raise ValueError(
            f"data ({info.name}: {info.num_classes} classes, {info.in_chans} channels) does not match the supernet "
            f"({model.num_classes} classes, {model.in_chans} channels)"
        )
    run = RunDir(out, cfg, ctx, resume, "gate")
    model.train()
    head = freeze_backbone(model)
    input_size = (info.in_chans, info.image_size, info.image_size)
    macs_table = model.routing_macs(input_size).to(device)
    unit = 1e9 if gc["macs_unit"] == "gmacs" else float(macs_table[-1])
    target = target_macs(gc, macs_table)
    budget_loader = None
    if target is not None and val_split == "holdout":  # calibrate the budget bias on held-out training images
        budget_loader = val_loader
    elif target is not None:  # no holdout: a separate, fixed pass over (augmented) training images
        budget_loader, _ = build_loader(cfg["data"], "train", seed=cfg["seed"] + 7, device=device)
        budget_loader.sampler.set_epoch(0)
    global_batch = cfg["data"]["batch_size"] * ctx.world_size
    base_lr = effective_lr("gate", gc, global_batch, ctx.is_main)
    optimizer = MaskedSGD(head, base_lr, gc["momentum"], gc["weight_decay"], mask_untouched=False)
    steps_per_epoch = len(train_loader)
    total_steps = gc["epochs"] * steps_per_epoch
    warmup = round(gc["warmup_epochs"] * steps_per_epoch)
    start_epoch, best_metric = 0, -1.0
    if resume:
        state = run.resume_state()
        load_state_into(model, state["state_dict"], run.last, state)
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, best_metric = state["epoch"] + 1, state["best_metric"]
        set_rng_state(state["rng"])
    run.start()
    spec = sup["model"]

    def step(batch) -> dict[str, float]:
        images, labels = batch
        optimizer.zero_grad(set_to_none=True)
        stats = gate_step(model, images.to(device), labels.to(device), macs_table, gc, unit, target)
        if ctx.enabled:  # only the head trains: average its gradient by hand
            for p in head:
                dist.all_reduce(p.grad)
                p.grad /= ctx.world_size
        optimizer.step()
        return stats

    for epoch in range(start_epoch, gc["epochs"]):
        model.train()
        freeze_backbone(model)
        t0 = time.time()
        sums, lr = train_epoch(
            train_loader,
            epoch,
            lambda s: cosine_lr(s, total_steps, base_lr, warmup, gc["min_lr"]),
            optimizer,
            step,
            f"gate {epoch + 1}/{gc['epochs']}",
            ctx.is_main and cfg["log"]["progress"],
            cfg["log"]["print_every"],
        )
        record = epoch_record(epoch, lr, time.time() - t0, sums, steps_per_epoch, ctx, device)
        if budget_loader is not None:
            record["budget_bias"] = calibrate_budget(model, budget_loader, device, macs_table, target)
            record["target_mmacs"] = target / 1e6
        if ctx.is_main:
            val = evaluate_dynamic(model, val_loader, device, macs_table)
            record.update({f"val_{k}": v for k, v in val.items()}, selection_split=val_split)
        metric = record.get("val_top1", -1.0)
        best_metric = run.end_epoch(
            record,
            metric,
            best_metric,
            {
                "model": spec,
                "state_dict": model.state_dict(),
                "ema_state_dict": None,
                "optimizer": optimizer.state_dict(),
                "epoch": epoch,
                "config": cfg,
                "stage": "gate",
                "supernet": str(supernet),
                "dataset": dataclasses.asdict(info),
                "rng": rng_state(),
                "bn_calibrated": sup.get("bn_calibrated", False),
            },
        )
        if ctx.is_main:
            print(
                f"[gate] epoch {epoch + 1}/{gc['epochs']} {record['epoch_time_s']:.1f}s "
                f"loss={record['loss']:.3f} sgs={record['loss_sgs']:.3f} task={record['loss_task']:.3f} "
                f"val_top1={record.get('val_top1', float('nan')):.2f} "
                f"val_mmacs={record.get('val_mmacs', float('nan')):.2f}",
                flush=True,
            )
        ctx.barrier()
        if stop_after_epoch is not None and epoch >= stop_after_epoch and epoch + 1 < gc["epochs"]:
            run.close()
            return {"stopped_after_epoch": epoch}
    result = {
        "epochs": gc["epochs"],
        "best_metric": best_metric,
        "best_epoch": run.best_epoch,
        "selection_split": val_split,
    }
    if ctx.is_main:
        from dsnet.utils.io import atomic_write_json

        atomic_write_json(result, run.out / "summary.json")
    run.close()
    return result
