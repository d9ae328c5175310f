"""Training from Python: both stages on your own model and batches, with or without a run folder.

``batches`` is anything that yields ``(images, labels)`` and can be iterated
once per epoch and has a length: a ``torch.utils.data.DataLoader``, a list of
tensors, dsnet's own loaders. Both functions run the loop the config-driven
commands (``dsnet train supernet|gate``) run (:class:`~dsnet.train.loop.TrainLoop`,
with the same steps, :class:`~dsnet.train.supernet.SandwichStep` and
:class:`~dsnet.train.gate.GateStep`), and take what those have: ``device=``,
a ``holdout=`` loader that selects the best epoch (the model ends with its
weights), ``out=`` (a run folder: ``last.ckpt``/``best.ckpt`` written
atomically, metrics, ``summary.json``) with ``resume=True``, ``amp=``,
``callbacks=``/``on_epoch_end=`` (one :class:`~dsnet.train.loop.EpochEnd` per
epoch; returning ``True`` stops), DDP when a process group is initialised
(torchrun; your loaders shard the data). Both return a
:class:`~dsnet.train.loop.TrainResult`: each epoch's record, the best epoch and
its metric, the checkpoints' paths; it reads as the list of epoch records
they returned before.

.. code-block:: python

    model = dsnet.create_model("ds_resnet8_tiny", num_classes=10, in_chans=1)
    fit_supernet(model, train_batches, epochs=3, lr=0.1)        # stage I: sandwich rule (labels by default)
    calibrate_bn(model, train_batches, num_batches=50)          # fresh BN statistics per sub-network
    fit_gate(model, train_batches, epochs=2, target_fraction=0.6)  # stage II: the routing head only
    calibrate_budget(model, holdout_batches, target_fraction=0.6)  # meet the budget on held-out images

    result = fit_supernet(model, train_batches, epochs=30, holdout=holdout_batches, out="runs/sup", device="cuda")
    result.best_epoch, result.best_metric, result.best_checkpoint   # resume a killed run: resume=True
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dsnet.models.base import DynamicNet
from dsnet.train.checkpoint import load_state_into, read_checkpoint
from dsnet.train.distributed import DistContext
from dsnet.train.ema import ModelEma
from dsnet.train.gate import (
    GateObjective,
    GateStep,
    freeze_backbone,
    gate_epoch_line,
    gate_selection,
    latency_cost_table,
    target_macs_of,
    widest_routed_macs,
)
from dsnet.train.loop import Callback, EpochEnd, TrainLoop, TrainResult, ddp_wrap, rank_checksums
from dsnet.train.optim import MaskedSGD
from dsnet.train.run import RunDir
from dsnet.train.supernet import SandwichStep, build_optimizer, selection_top1, supernet_epoch_line
from dsnet.utils.latency import choice_latencies

__all__ = ["fit_supernet", "fit_gate", "TrainResult", "EpochEnd"]

HOLDOUT = "holdout"  # the split name the records' selection keys carry (holdout_top1, ...)
# arguments a resumed run may change (where and how it runs, not what it computes), or recorded elsewhere
RUN_ONLY = ("progress", "device", "out", "resume", "callbacks", "on_epoch_end", "verbose", "restore_best", "model_spec")


def _steps(batches: Iterable, what: str) -> int:
    try:
        steps = len(batches)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{what}: batches must have a length (a DataLoader or a list of (images, labels))") from None
    if steps == 0:
        raise ValueError(f"{what}: batches is empty")
    return steps


def _input_size(batches: Iterable) -> tuple[int, ...]:
    images = next(iter(batches))[0]
    images = images[0] if isinstance(images, list) else images
    return tuple(images.shape[1:])


def _context() -> DistContext:
    """The initialised process group's ranks (a torchrun launch), or a single process."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistContext()


def _plain(value: Any) -> Any:
    """``value`` as the run's recorded config holds it: plain values as they are, anything else by its type's name."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float, str)) for v in value):
        return list(value)
    if isinstance(value, os.PathLike):
        return str(value)
    return type(value).__name__


class _KeepBest:
    """A callback keeping a copy of the best epoch's weights (``payload[key]``), to end the model on them."""

    def __init__(self, key: str) -> None:
        self.key, self.state = key, None

    def __call__(self, end: EpochEnd) -> None:
        if end.is_best:
            self.state = {k: v.detach().clone() for k, v in end.payload[self.key].items()}


def _fit(
    stage: str,
    model: nn.Module,
    batches: Iterable,
    optimizer: torch.optim.Optimizer,
    step: Callable[[Any], dict[str, float]],
    *,
    epochs: int,
    lr: float,
    device: torch.device,
    ctx: DistContext,
    settings: dict[str, Any],
    model_spec: dict[str, Any] | None,
    out: str | os.PathLike | None,
    resume: bool,
    holdout: Iterable | None,
    restore_best: bool,
    weights_key: str,
    selection_key: str,
    evaluate: Callable[[int, dict[str, Any]], None],
    payload: Callable[[int], dict[str, Any]],
    load_weights: Callable[[dict[str, Any], Path], None],
    epoch_line: Callable[[int, dict[str, Any]], str] | None,
    callbacks: Sequence[Callback],
    on_epoch_end: Callback | None,
    progress: bool,
    begin_epoch: Callable[[int], None],
    warmup_steps: int = 0,
) -> tuple[TrainResult, dict[str, Any] | None]:
    """The shared part of :func:`fit_supernet` and :func:`fit_gate`: the run folder, the loop, the best weights.

    Returns the loop's result and the weights ``weights_key`` of the best epoch
    (None without a holdout or ``restore_best``: the model keeps its last ones).
    """
    if resume and out is None:
        raise ValueError(f"fit_{stage}(resume=True) resumes the run in out=: pass out=")
    spec = model_spec or {"name": type(model).__name__, "kwargs": {}}
    cfg = {
        "model": {"name": spec["name"], "kwargs": spec.get("kwargs", {})},
        f"fit_{stage}": {k: _plain(v) for k, v in settings.items()},
        "log": {"tensorboard": False},
    }
    run = None if out is None else RunDir(out, cfg, ctx, resume, stage, python_api=True)
    keep = _KeepBest(weights_key) if holdout is not None and restore_best else None

    loop = TrainLoop(
        stage,
        model,
        batches,
        optimizer,
        step,
        epochs=epochs,
        lr=lr,
        warmup_steps=warmup_steps,
        device=device,
        ctx=ctx,
        run=run,
        selection_key=selection_key if holdout is not None else None,
        selection_split=HOLDOUT if holdout is not None else None,
        begin_epoch=begin_epoch,
        evaluate=evaluate,
        payload=payload,
        checkpoint={"model": spec},
        epoch_line=epoch_line,
        callbacks=[*([keep] if keep else []), *callbacks, *([on_epoch_end] if on_epoch_end else [])],
        progress=progress,
    )
    loop.start(None if run is None else lambda state: load_weights(state, run.last))
    result = loop.fit()
    if ctx.enabled:
        rank_checksums(model, ctx, device)  # DDP ranks ended with the same weights, or a RuntimeError
    best = None if keep is None else keep.state
    if run is not None:
        if keep is not None and best is None and result.best_epoch is not None:  # a finished run resumed: its best
            best = read_checkpoint(run.best, trust_factories=[spec["name"]])[weights_key]
        if result.stopped_after_epoch is None:
            run.write_summary(
                {
                    "epochs": epochs,
                    "best_metric": result.best_metric,
                    "best_epoch": result.best_epoch,
                    "selection_split": result.selection_split,
                }
            )
        run.close()
    return result, best


def fit_supernet(
    model: DynamicNet,
    batches: Iterable,
    *,
    epochs: int,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    warmup_epochs: float = 0.0,
    optimizer: str = "sgd",
    num_random: int = 2,
    distill: str = "none",
    label_smoothing: float = 0.1,
    ema_decay: float = 0.997,
    ema_warmup: bool = True,
    use_ema: bool = True,
    seed: int = 0,
    progress: bool = True,
    device: torch.device | str | None = None,
    holdout: Iterable | None = None,
    restore_best: bool = True,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    amp: bool = False,
    callbacks: Sequence[Callback] = (),
    on_epoch_end: Callback | None = None,
    verbose: bool = False,
    model_spec: dict[str, Any] | None = None,
) -> TrainResult:
    """Stage I on ``model``, in place: the sandwich rule (SPEC section 3).

    Each step trains the largest sub-network on the labels and ``num_random``
    random routed ones plus the slimmest on the labels too (``distill="none"``,
    the default: measured best at short schedules), or on the EMA teacher's
    predictions (``"ib"``, the paper's in-place bootstrapping; ``"ieb"``,
    ``"inplace"``), then one
    optimiser step (masked SGD, or ``"adamw"``) on a cosine schedule.
    ``lr`` is the learning rate as given (no batch-size rescaling). With
    ``use_ema`` the model ends with the EMA teacher's weights, as the
    command-line stage I does. The slimming head is not trained here (stage
    II trains it). Run :func:`~dsnet.train.bn_calibration.calibrate_bn`
    afterwards.

    As the command line's stage I: ``device`` (the model moves there; batches
    follow it), ``amp`` (bfloat16 autocast on CUDA), ``holdout`` (batches the
    best epoch is chosen on: top-1 of the widest routed sub-network of the
    weights the model ends with, ``ema_top1_*`` or ``top1_*`` in the records;
    with ``restore_best`` the model ends with that epoch's weights), ``out`` (a
    run folder: ``last.ckpt`` and ``best.ckpt``, ``metrics.jsonl``/``.csv``,
    ``config.yaml``, ``summary.json``; ``resume=True`` continues a killed run
    from ``last.ckpt`` on the uninterrupted run's trajectory, refusing other
    settings; ``model_spec``, ``{name, kwargs}``, is recorded so that
    ``dsnet.load`` can rebuild the model, by default its class name),
    ``callbacks`` / ``on_epoch_end`` (called with an
    :class:`~dsnet.train.loop.EpochEnd` after each epoch; ``True`` stops),
    ``verbose`` (the command's epoch line). Returns a
    :class:`~dsnet.train.loop.TrainResult` (each epoch's mean losses and
    selection metrics, as a list; the best epoch, its metric, the checkpoints).
    """
    steps = _steps(batches, "fit_supernet")
    settings = {k: v for k, v in locals().items() if k not in ("model", "batches", "steps")}
    for key in RUN_ONLY:
        settings.pop(key)  # where and how it runs, not what it computes
    settings["holdout"] = holdout is not None
    ctx = _context()
    if device is not None:
        model.to(device)
    where = next(model.parameters()).device
    heads = model.routing_heads()  # stage II trains them
    for head in heads:
        head.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    sgd = {"optimizer": optimizer, "weight_decay": weight_decay, "momentum": momentum, "nesterov": False}
    opt = build_optimizer(params, lr, {**sgd, "betas": (0.9, 0.999), "mask_untouched": True})
    ema = ModelEma(model, ema_decay, warmup=ema_warmup) if distill in ("ib", "ieb") or use_ema else None
    step = SandwichStep(
        model,
        opt,
        ema,
        ddp=ddp_wrap(model, ctx, where),
        num_random=num_random,
        distill=distill,
        label_smoothing=label_smoothing,
        amp=amp,
        seed=seed,
    )
    final_ema = use_ema and ema is not None  # the model ends with the EMA weights: select on those
    judged, prefix = (ema.module, "ema_top1") if final_ema else (model, "top1")
    routed = [s.index for s in model.subnets if s.routed]

    def begin_epoch(epoch: int) -> None:
        step.count = epoch * steps  # global step: seeds the sandwich sampling (a resumed run draws the same)

    def evaluate(epoch: int, record: dict[str, Any]) -> None:
        if holdout is not None and ctx.is_main:
            record["selection_split"] = HOLDOUT
            record.update(selection_top1(judged, holdout, where, routed, model.largest, prefix))

    def payload(epoch: int) -> dict[str, Any]:
        return {
            "state_dict": model.state_dict(),
            "ema_state_dict": None if ema is None else ema.state_dict(),
            "step": (epoch + 1) * steps,
            "bn_calibrated": False,
        }

    def load_weights(state: dict[str, Any], path: Path) -> None:
        load_state_into(model, state["state_dict"], path, state)
        if ema is not None:
            load_state_into(ema.module, state["ema_state_dict"], path, state, what="EMA weights")
            ema.updates = state["step"]

    try:
        result, best = _fit(
            "supernet",
            model,
            batches,
            opt,
            step,
            epochs=epochs,
            lr=lr,
            warmup_steps=round(warmup_epochs * steps),
            device=where,
            ctx=ctx,
            settings=settings,
            model_spec=model_spec,
            out=out,
            resume=resume,
            holdout=holdout,
            restore_best=restore_best,
            weights_key="ema_state_dict" if final_ema else "state_dict",
            selection_key=f"{prefix}_widest",
            evaluate=evaluate,
            payload=payload,
            load_weights=load_weights,
            epoch_line=(lambda epoch, record: supernet_epoch_line(record)) if verbose else None,
            callbacks=callbacks,
            on_epoch_end=on_epoch_end,
            progress=progress,
            begin_epoch=begin_epoch,
        )
        if best is not None:
            model.load_state_dict(best)
        elif final_ema:
            model.load_state_dict(ema.state_dict())
    finally:
        for head in heads:
            head.requires_grad_(True)
    return result


def fit_gate(
    model: DynamicNet,
    batches: Iterable,
    *,
    epochs: int,
    lr: float = 0.5,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    objective: GateObjective | None = None,
    target_fraction: float | None = None,
    target_mmacs: float | None = None,
    target_ms: float | None = None,
    latency_table: Any = None,
    latency_batch_size: int | None = None,
    latency_runtime: str | None = None,
    allow_foreign: bool = False,
    macs_unit: str = "relative",
    progress: bool = True,
    device: torch.device | str | None = None,
    holdout: Iterable | None = None,
    restore_best: bool = True,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    amp: bool = False,
    callbacks: Sequence[Callback] = (),
    on_epoch_end: Callback | None = None,
    verbose: bool = False,
    model_spec: dict[str, Any] | None = None,
) -> TrainResult:
    """Stage II on ``model``, in place: only the routing head trains, the backbone is frozen (BN in eval mode).

    The loss is ``objective`` (:class:`~dsnet.train.gate.GateObjective`:
    SGS + task + complexity; defaults as the command line's). With a budget
    (``target_fraction`` of the widest routed sub-network's MACs, or
    ``target_mmacs``) the complexity loss steers toward it; then call
    :func:`~dsnet.train.gate.calibrate_budget` on held-out images so the gate
    meets it. ``macs_unit``: ``"relative"`` (MACs as a fraction of the widest
    routed) or ``"gmacs"`` (the official ``(mean GMACs)^2``). A latency budget,
    ``target_ms`` per image with a ``latency_table`` (a path, a
    :class:`~dsnet.utils.latency.LatencyTable`, or one ms per routing choice;
    its row ``latency_batch_size``/``latency_runtime``, checked as
    :func:`~dsnet.train.gate.calibrate_budget` does), steers the complexity
    loss by the table's costs instead; calibrate with the same arguments. The
    model is left in eval mode with its parameters' ``requires_grad`` as they
    were.

    ``device``, ``amp`` (the frozen backbone's forwards), ``out``/``resume``,
    ``model_spec``, ``callbacks``/``on_epoch_end``, ``verbose`` as in
    :func:`fit_supernet`. With ``holdout`` each epoch calibrates the budget
    bias on it (when there is a budget), then measures the gate there
    (``holdout_top1``, ``holdout_mmacs``, routing mix, ``holdout_ms`` with a
    latency table) and the best epoch is the most accurate, as the command
    line's stage II does; with ``restore_best`` the model ends with that
    epoch's weights and budget bias. Returns a
    :class:`~dsnet.train.loop.TrainResult` (each epoch's mean losses and
    routing mix, as a list).
    """
    if macs_unit not in ("relative", "gmacs"):
        raise ValueError(f"macs_unit must be 'relative' or 'gmacs', got {macs_unit!r}")
    steps = _steps(batches, "fit_gate")
    objective = objective or GateObjective()
    settings = {k: v for k, v in locals().items() if k not in ("model", "batches", "steps", "objective")}
    for key in RUN_ONLY:
        settings.pop(key)  # where and how it runs, not what it computes
    settings.update({f"objective_{k}": v for k, v in vars(objective).items()}, holdout=holdout is not None)
    ctx = _context()
    if device is not None:
        model.to(device)
    size = _input_size(batches)
    where = next(model.parameters()).device
    table = model.routing_macs(size).to(where)
    unit = 1e9 if macs_unit == "gmacs" else widest_routed_macs(model, size)
    target = target_macs_of(target_fraction, target_mmacs, model, size)
    cost_table, loss_target, choice_ms = None, target, None
    if target_ms is not None:
        if target is not None:
            raise ValueError("fit_gate: target_ms and target_fraction/target_mmacs are alternatives: set one")
        if latency_table is None:
            raise ValueError("fit_gate(target_ms=...) needs latency_table= (dsnet bench --latency-table FILE)")
    if latency_table is not None and (target_ms is not None or holdout is not None):
        choice_ms = choice_latencies(
            latency_table,
            model,
            size,
            batch_size=latency_batch_size,
            runtime=latency_runtime,
            allow_foreign=allow_foreign,
        )
    if target_ms is not None:
        cost_table, loss_target = latency_cost_table(table, choice_ms, target_ms)
    budgeted = target is not None or target_ms is not None
    trainable = {p: p.requires_grad for p in model.parameters()}
    model.train()
    head = freeze_backbone(model)
    opt = MaskedSGD(head, lr, momentum, weight_decay, mask_untouched=False)
    step = GateStep(model, opt, table, objective, unit, loss_target, amp=amp, cost_table=cost_table, ctx=ctx)

    def evaluate(epoch: int, record: dict[str, Any]) -> None:
        if holdout is not None:
            gate_selection(
                model,
                record,
                loader=holdout,
                split=HOLDOUT,
                macs_table=table,
                budget_loader=holdout if budgeted else None,
                target_macs=target,
                target_ms=target_ms,
                choice_ms=choice_ms,
                evaluate=ctx.is_main,
            )

    def payload(epoch: int) -> dict[str, Any]:
        return {"state_dict": model.state_dict(), "ema_state_dict": None}

    def load_weights(state: dict[str, Any], path: Path) -> None:
        load_state_into(model, state["state_dict"], path, state)

    try:
        result, best = _fit(
            "gate",
            model,
            batches,
            opt,
            step,
            epochs=epochs,
            lr=lr,
            device=where,
            ctx=ctx,
            settings=settings,
            model_spec=model_spec,
            out=out,
            resume=resume,
            holdout=holdout,
            restore_best=restore_best,
            weights_key="state_dict",
            selection_key=f"{HOLDOUT}_top1",
            evaluate=evaluate,
            payload=payload,
            load_weights=load_weights,
            epoch_line=(lambda epoch, record: gate_epoch_line(record, HOLDOUT)) if verbose else None,
            callbacks=callbacks,
            on_epoch_end=on_epoch_end,
            progress=progress,
            begin_epoch=lambda epoch: freeze_backbone(model),
        )
        if best is not None:
            model.load_state_dict(best)
    finally:
        for p, flag in trainable.items():
            p.requires_grad_(flag)
        model.eval()
    return result
