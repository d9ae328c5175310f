"""Training from Python: both stages on your own model and batches, without a config or a run directory.

``batches`` is anything that yields ``(images, labels)`` and can be iterated
once per epoch and has a length: a ``torch.utils.data.DataLoader``, a list of
tensors, dsnet's own loaders. The config-driven commands (``dsnet train
supernet|gate``) run the same steps (:class:`~dsnet.train.supernet.SandwichStep`,
:func:`~dsnet.train.gate.gate_step`) with checkpoints, resume, DDP and logs
around them.

.. code-block:: python

    model = dsnet.create_model("ds_resnet8_tiny", num_classes=10, in_chans=1)
    fit_supernet(model, train_batches, epochs=3, lr=0.1)        # stage I: sandwich rule (labels by default)
    calibrate_bn(model, train_batches, num_batches=50)          # fresh BN statistics per sub-network
    fit_gate(model, train_batches, epochs=2, target_fraction=0.6)  # stage II: the routing head only
    calibrate_budget(model, holdout_batches, target_fraction=0.6)  # meet the budget on held-out images
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from dsnet.models.base import DynamicNet
from dsnet.train.ema import ModelEma
from dsnet.train.gate import (
    GateObjective,
    freeze_backbone,
    gate_step,
    latency_cost_table,
    target_macs_of,
    widest_routed_macs,
)
from dsnet.train.optim import MaskedSGD, cosine_lr
from dsnet.train.run import train_epoch
from dsnet.train.supernet import SandwichStep, build_optimizer
from dsnet.utils.latency import choice_latencies

__all__ = ["fit_supernet", "fit_gate"]


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
) -> list[dict[str, float]]:
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
    afterwards. Returns the mean losses of each epoch.
    """
    steps = _steps(batches, "fit_supernet")
    model.gate.slim_head.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    settings = {"optimizer": optimizer, "weight_decay": weight_decay, "momentum": momentum, "nesterov": False}
    opt = build_optimizer(params, lr, {**settings, "betas": (0.9, 0.999), "mask_untouched": True})
    ema = ModelEma(model, ema_decay, warmup=ema_warmup) if distill in ("ib", "ieb") or use_ema else None
    step = SandwichStep(
        model, opt, ema, num_random=num_random, distill=distill, label_smoothing=label_smoothing, seed=seed
    )
    total, warmup = epochs * steps, round(warmup_epochs * steps)
    history = []
    for epoch in range(epochs):
        model.train()
        sums, _ = train_epoch(
            batches,
            epoch,
            lambda s: cosine_lr(s, total, lr, warmup),
            opt,
            step,
            f"supernet {epoch + 1}/{epochs}",
            progress,
            50,
        )
        history.append({k: v / steps for k, v in sums.items()})
    if use_ema and ema is not None:
        model.load_state_dict(ema.state_dict())
    model.gate.slim_head.requires_grad_(True)
    return history


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
) -> list[dict[str, float]]:
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
    loss by the table's costs instead; calibrate with the same arguments. Returns each
    epoch's mean losses and routing mix. The model is left in eval mode with
    its parameters' ``requires_grad`` as they were.
    """
    if macs_unit not in ("relative", "gmacs"):
        raise ValueError(f"macs_unit must be 'relative' or 'gmacs', got {macs_unit!r}")
    steps = _steps(batches, "fit_gate")
    objective = objective or GateObjective()
    size = _input_size(batches)
    device = next(model.parameters()).device
    table = model.routing_macs(size).to(device)
    unit = 1e9 if macs_unit == "gmacs" else widest_routed_macs(model, size)
    target = target_macs_of(target_fraction, target_mmacs, model, size)
    cost_table = None
    if target_ms is not None:
        if target is not None:
            raise ValueError("fit_gate: target_ms and target_fraction/target_mmacs are alternatives: set one")
        if latency_table is None:
            raise ValueError("fit_gate(target_ms=...) needs latency_table= (dsnet bench --latency-table FILE)")
        ms = choice_latencies(
            latency_table,
            model,
            size,
            batch_size=latency_batch_size,
            runtime=latency_runtime,
            allow_foreign=allow_foreign,
        )
        cost_table, target = latency_cost_table(table, ms, target_ms)
    trainable = {p: p.requires_grad for p in model.parameters()}
    model.train()
    head = freeze_backbone(model)
    opt = MaskedSGD(head, lr, momentum, weight_decay, mask_untouched=False)
    total = epochs * steps

    def step(batch: Any) -> dict[str, float]:
        opt.zero_grad(set_to_none=True)
        stats = gate_step(
            model, batch[0].to(device), batch[1].to(device), table, objective, unit, target, cost_table=cost_table
        )
        opt.step()
        return stats

    history = []
    try:
        for epoch in range(epochs):
            model.train()
            freeze_backbone(model)
            sums, _ = train_epoch(
                batches, epoch, lambda s: cosine_lr(s, total, lr), opt, step, f"gate {epoch + 1}/{epochs}", progress, 50
            )
            history.append({k: v / steps for k, v in sums.items()})
    finally:
        for p, flag in trainable.items():
            p.requires_grad_(flag)
        model.eval()
    return history
