"""The one training loop: every stage and method runs its epochs through :class:`TrainLoop`.

Stage I (:func:`~dsnet.train.supernet.train_supernet`), stage II
(:func:`~dsnet.train.gate.train_gate`), LC-Net
(:func:`~dsnet.train.lcnet.train_lcnet`) and the Python API
(:func:`~dsnet.train.api.fit_supernet`, :func:`~dsnet.train.api.fit_gate`)
supply what is theirs -- the optimiser step, what an epoch adds to its record
(the evaluation on the selection split), which record key selects the best
epoch, what a checkpoint holds, the tail of the epoch's log line -- and the
loop does the rest, the same way for all of them:

* **epochs** on a cosine schedule (linear warm-up), the learning rate set per
  step; each step's statistics summed (:func:`~dsnet.train.run.train_epoch`:
  the progress bar, a non-finite loss stops training before the epoch is
  saved), averaged over steps and DDP ranks into the epoch's record;
* **selection**: the epoch whose record has the highest ``selection_key``
  value (computed on the held-out slice) is the best; none: the last one;
* **checkpoints**: with a :class:`~dsnet.train.run.RunDir`, ``last.ckpt`` then
  (if best) ``best.ckpt``, atomically, the last recording the best epoch; the
  record appended to the run's metrics; weights that are not finite stop the
  run without saving the epoch (with or without a run folder);
* **resume**: :meth:`TrainLoop.start` loads ``last.ckpt``'s weights (the
  method's loader), optimiser, epoch, best epoch and RNG states, so the
  resumed run continues on the uninterrupted run's trajectory;
* **DDP**: statistics reduced over ranks, only the main rank evaluates,
  writes and prints, a barrier after each epoch (:func:`ddp_wrap`,
  :func:`rank_checksums` for the methods);
* **callbacks**: after each epoch (its checkpoint written) every callback gets
  an :class:`EpochEnd`; one returning ``True`` stops training there, as if the
  process had been killed after that epoch (:func:`stop_after`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dsnet.train.checkpoint import nonfinite_tensors
from dsnet.train.distributed import DistContext
from dsnet.train.optim import cosine_lr
from dsnet.train.run import RunDir, epoch_record, rng_state, set_rng_state, train_epoch

__all__ = ["TrainLoop", "EpochEnd", "TrainResult", "Callback", "stop_after", "ddp_wrap", "rank_checksums"]


@dataclass(frozen=True)
class EpochEnd:
    """What a callback is given after an epoch, once its checkpoint is written (on every DDP rank).

    ``epoch`` and ``best_epoch`` count from 1, as the logs do; ``record`` is the
    epoch's log record (the main rank's holds the selection split's metrics).
    """

    epoch: int
    epochs: int
    record: dict[str, Any]
    metric: float | None
    best_metric: float | None
    best_epoch: int | None
    is_best: bool
    payload: dict[str, Any]  # the checkpoint's contents (weights as the model holds them: copy what you keep)


Callback = Callable[[EpochEnd], "bool | None"]


def stop_after(epoch: int) -> Callback:
    """A callback ending training after (0-based) ``epoch``, as if the process had been killed there."""
    return lambda end: end.epoch - 1 >= epoch


@dataclass
class TrainResult:
    """What a training loop ran: each epoch's record, the best epoch (1-based) and its metric, the run's files.

    It reads as the list of epoch records (``result[-1]["loss"]``, ``len(result)``,
    iteration), what the Python API returned before it returned this.
    """

    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None
    best_metric: float | None = None
    selection_split: str | None = None
    best_checkpoint: Path | None = None
    last_checkpoint: Path | None = None
    stopped_after_epoch: int | None = None  # 0-based, as ``stop_after_epoch`` counts

    def __len__(self) -> int:
        return len(self.history)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.history[index]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.history)

    def __bool__(self) -> bool:
        return bool(self.history)


def ddp_wrap(model: nn.Module, ctx: DistContext, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel under DDP, the model itself otherwise."""
    if not ctx.enabled:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def _param_checksum(model: nn.Module) -> float:
    return float(sum(p.detach().double().sum() * (i + 1) for i, p in enumerate(model.parameters())))


def rank_checksums(model: nn.Module, ctx: DistContext, device: torch.device) -> list[float]:
    """Every rank's parameter checksum; a ``RuntimeError`` if DDP ranks ended with different weights."""
    value = _param_checksum(model)
    if not ctx.enabled:
        return [value]
    out = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(ctx.world_size)]
    dist.all_gather(out, torch.tensor([value], dtype=torch.float64, device=device))
    checksums = [float(t) for t in out]
    if len(set(checksums)) != 1:
        raise RuntimeError(f"DDP ranks diverged: parameter checksums {checksums}")
    return checksums


def check_finite_weights(payload: dict[str, Any], stage: str, epoch: int) -> None:
    """A diverged run saves nothing, even if its loss stayed finite: ``FloatingPointError`` naming the tensors."""
    for key in ("state_dict", "ema_state_dict"):
        bad = nonfinite_tensors(payload.get(key) or {})
        if bad:
            shown = ", ".join(bad[:3]) + (f", ... ({len(bad)} in all)" if len(bad) > 3 else "")
            raise FloatingPointError(
                f"{stage} training diverged at epoch {epoch + 1}: its weights are not finite ({shown}); "
                f"stopped without saving epoch {epoch + 1}. Lower {stage}.lr or check the data"
            )


class TrainLoop:
    """Epochs of one stage or method: schedule, steps, selection, checkpoints, resume, DDP, logs, callbacks.

    ``step(batch)`` does one optimiser step and returns scalars to log (see
    :func:`~dsnet.train.run.train_epoch`). The learning rate follows
    ``cosine_lr`` from ``lr`` (``warmup_steps`` of linear warm-up) to
    ``min_lr`` over ``epochs``; ``schedule`` replaces it (global step -> lr).

    Per epoch: ``model.train()`` and ``begin_epoch(epoch)``; the steps;
    ``evaluate(epoch, record)`` adds to the record (it decides which ranks
    evaluate); the record's ``selection_key`` value (-1 where absent, e.g. on
    the other ranks) selects the best epoch, higher is better (no key: every
    epoch is the newest best); ``payload(epoch)`` gives the weights
    (``state_dict``, ``ema_state_dict``) and what else changes per epoch,
    checked finite; with a ``run`` the checkpoint is that with the
    ``checkpoint`` entries (the model spec, the dataset, ...), the optimiser,
    epoch, config, stage, RNG states, best metric, best epoch and the record,
    written as ``last.ckpt`` (and ``best.ckpt``); the main rank prints
    ``[stage] epoch e/E Ns `` followed by ``epoch_line(epoch, record)``;
    then the callbacks. Epochs count from 0 here and from 1 in logs and
    summaries.
    """

    def __init__(
        self,
        stage: str,
        model: nn.Module,
        loader: Any,
        optimizer: torch.optim.Optimizer,
        step: Callable[[Any], dict[str, float]],
        *,
        epochs: int,
        lr: float,
        device: torch.device,
        warmup_steps: int = 0,
        min_lr: float = 0.0,
        schedule: Callable[[int], float] | None = None,
        ctx: DistContext | None = None,
        run: RunDir | None = None,
        selection_key: str | None = None,
        selection_split: str | None = None,
        begin_epoch: Callable[[int], None] | None = None,
        evaluate: Callable[[int, dict[str, Any]], None] | None = None,
        payload: Callable[[int], dict[str, Any]] | None = None,
        checkpoint: dict[str, Any] | None = None,
        epoch_line: Callable[[int, dict[str, Any]], str] | None = None,
        callbacks: Sequence[Callback] = (),
        progress: bool = True,
        print_every: int = 50,
    ) -> None:
        self.stage, self.model, self.loader, self.optimizer, self.step = stage, model, loader, optimizer, step
        self.epochs, self.device, self.ctx, self.run = epochs, device, ctx or DistContext(), run
        self.steps_per_epoch = len(loader)
        if self.steps_per_epoch == 0:
            raise ValueError(
                "the training set is smaller than one batch: lower data.batch_size or raise data.train_subset"
            )
        total = epochs * self.steps_per_epoch
        self.lr_at = schedule or (lambda s: cosine_lr(s, total, lr, warmup_steps, min_lr))
        self.selection_key, self.selection_split = selection_key, selection_split
        self.begin_epoch, self.evaluate, self.payload, self.epoch_line = begin_epoch, evaluate, payload, epoch_line
        self.checkpoint = checkpoint or {}
        self.callbacks = list(callbacks)
        self.progress, self.print_every = progress, print_every
        self.start_epoch = 0
        self.best_metric: float | None = -1.0 if selection_key else None
        self.best_epoch: int | None = None  # 0-based
        self._started = False

    @classmethod
    def for_run(
        cls, run: RunDir, ctx: DistContext, device: torch.device, stop_after_epoch: int | None, *args, **kwargs
    ) -> TrainLoop:
        """A config-driven stage's loop: its run folder, ranks and device, the config's ``log`` settings, and
        ``stop_after_epoch`` (end after that epoch, as if killed there). The rest as :class:`TrainLoop` takes it."""
        log = run.cfg["log"]
        stop = [] if stop_after_epoch is None else [stop_after(stop_after_epoch)]
        return cls(*args, device=device, ctx=ctx, run=run, progress=log["progress"], print_every=log["print_every"],
                   callbacks=[*stop, *kwargs.pop("callbacks", ())], **kwargs)  # fmt: skip

    def start(self, load_weights: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Resume if the run folder says so (``load_weights(state)``, optimiser, epoch, best, RNG), then open it."""
        run = self.run
        if run is not None and run.resume:
            state = run.resume_state()
            if load_weights is not None:
                load_weights(state)
            self.optimizer.load_state_dict(state["optimizer"])
            self.start_epoch, self.best_metric = state["epoch"] + 1, state["best_metric"]
            set_rng_state(state["rng"])
        if run is not None:
            run.start()
            self.best_epoch = run.best_epoch
        self._started = True

    def fit(self) -> TrainResult:
        """Run the remaining epochs. Returns what ran (``stopped_after_epoch`` set when a callback stopped it)."""
        if not self._started:
            self.start()
        result = TrainResult(selection_split=self.selection_split)
        if self.run is not None:
            result.best_checkpoint, result.last_checkpoint = self.run.best, self.run.last
        ctx = self.ctx
        for epoch in range(self.start_epoch, self.epochs):
            self.model.train()
            if self.begin_epoch is not None:
                self.begin_epoch(epoch)
            t0 = time.time()
            sums, lr = train_epoch(
                self.loader,
                epoch,
                self.lr_at,
                self.optimizer,
                self.step,
                f"{self.stage} {epoch + 1}/{self.epochs}",
                ctx.is_main and self.progress,
                self.print_every,
            )
            seconds = time.time() - t0
            record = epoch_record(epoch, lr, seconds, sums, self.steps_per_epoch, ctx, self.device)
            if self.evaluate is not None:
                self.evaluate(epoch, record)
            end = self._end_epoch(epoch, record)
            result.history.append(record)
            if ctx.is_main and self.epoch_line is not None:
                print(
                    f"[{self.stage}] epoch {epoch + 1}/{self.epochs} {seconds:.1f}s {self.epoch_line(epoch, record)}",
                    flush=True,
                )
            ctx.barrier()
            stop = [bool(callback(end)) for callback in self.callbacks]
            if any(stop) and epoch + 1 < self.epochs:
                result.stopped_after_epoch = epoch
                break
        result.best_metric = self.best_metric
        result.best_epoch = None if self.best_epoch is None else self.best_epoch + 1
        if result.stopped_after_epoch is not None and self.run is not None:
            self.run.close()
        return result

    def _end_epoch(self, epoch: int, record: dict[str, Any]) -> EpochEnd:
        """Select, check the weights, log the record, write ``last`` (and ``best``)."""
        metric = None
        if self.selection_key is None:
            is_best = True
        else:
            metric = record.get(self.selection_key, -1.0)
            is_best = metric > self.best_metric or self.best_epoch is None
            if is_best:
                self.best_metric = metric
            record["best_metric"] = self.best_metric
        if is_best:
            self.best_epoch = epoch
        payload = self.payload(epoch) if self.payload is not None else {}
        check_finite_weights(payload, self.stage, epoch)
        if self.run is not None:
            self.run.best_epoch = self.best_epoch
            self.run.log(record)
            payload = {
                **self.checkpoint,
                **payload,
                "optimizer": self.optimizer.state_dict(),
                "epoch": epoch,
                "config": self.run.cfg,
                "stage": self.stage,
                "rng": rng_state(),
                "best_metric": self.best_metric,
                "best_epoch": self.best_epoch,
                "metrics": record,
            }
            self.run.save(payload, best=is_best)
        return EpochEnd(epoch + 1, self.epochs, record, metric, self.best_metric, self.best_epoch + 1, is_best, payload)
