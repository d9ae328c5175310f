"""What both training stages share: the run directory, logs, checkpoints, resume, accuracy."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import random
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from dsnet.train.checkpoint import read_checkpoint, save_checkpoint
from dsnet.train.distributed import DistContext, all_reduce_sum
from dsnet.utils.io import atomic_write_text
from dsnet.utils.modes import temporary_mode

__all__ = [
    "RunDir",
    "autocast",
    "seed_everything",
    "selection_loader",
    "rng_state",
    "set_rng_state",
    "top1_accuracy",
    "unwrap",
    "train_epoch",
    "epoch_record",
]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on CUDA when ``enabled``; nothing on other devices."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def selection_loader(data_cfg: dict, seed: int, device: torch.device) -> tuple[Any, str]:
    """The loader model selection reads (best epoch, budget calibration) and its split's name.

    The held-out slice of the training set when ``data.holdout`` is set, so the
    reported split ("val") is never selected on; "val" otherwise (the run's
    summary says so).
    """
    from dsnet.data import build_loader

    split = "holdout" if data_cfg.get("holdout") else "val"
    loader, _ = build_loader(data_cfg, split, seed=seed, device=device)
    return loader, split


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@torch.no_grad()
def top1_accuracy(
    model: nn.Module, loader: Iterable, device: torch.device, subnet: int | None = None, max_batches: int | None = None
) -> float:
    """Top-1 (%) of sub-network ``subnet``, or of dynamic routing when ``subnet`` is None."""
    correct = total = 0
    with temporary_mode(model, False):
        for i, (images, labels) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            images, labels = images.to(device), labels.to(device)
            logits = model(images) if subnet is None else model(images, subnet=subnet)
            correct += int((logits.argmax(1) == labels).sum())
            total += labels.numel()
    return 100.0 * correct / max(1, total)


class RunDir:
    """A run's output folder: resolved config, metrics (JSONL + CSV), TensorBoard, checkpoints.

    Only the main process writes. A fresh run refuses a folder that already
    holds a checkpoint (so a finished run is never overwritten by accident);
    ``resume=True`` continues from its ``last.ckpt``.
    """

    def __init__(self, out: str | Path, cfg: dict, ctx: DistContext, resume: bool, stage: str) -> None:
        self.out = Path(out)
        self.ctx = ctx
        self.stage = stage
        self.last = self.out / "last.ckpt"
        self.best = self.out / "best.ckpt"
        if resume and not self.last.is_file():
            raise FileNotFoundError(f"--resume: no {self.last} to resume from")
        if not resume and self.last.is_file():
            raise ValueError(
                f"{self.out} already holds a run ({self.last.name}); pass --resume or choose another --out"
            )
        self.records: list[dict] = []
        self._tb = None
        if ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(yaml.safe_dump(cfg, sort_keys=False), self.out / "config.yaml")
            metrics = self.out / "metrics.jsonl"
            if resume and metrics.is_file():
                self.records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
            if cfg.get("log", {}).get("tensorboard", True):
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._tb = SummaryWriter(str(self.out / "tensorboard"))
                except (ImportError, ModuleNotFoundError):
                    self._tb = None

    def resume_state(self) -> dict[str, Any]:
        return read_checkpoint(self.last)

    def log(self, record: dict) -> None:
        """One line per epoch: appended to metrics.jsonl, the CSV rewritten, scalars to TensorBoard."""
        if not self.ctx.is_main:
            return
        record = {"stage": self.stage, "time": time.time(), **record}
        # a resumed run replaces records of epochs it re-runs
        self.records = [r for r in self.records if r.get("epoch") != record.get("epoch")] + [record]
        atomic_write_text("".join(json.dumps(r) + "\n" for r in self.records), self.out / "metrics.jsonl")
        keys = list(dict.fromkeys(k for r in self.records for k in r))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys)
        writer.writeheader()
        writer.writerows(self.records)
        atomic_write_text(buf.getvalue(), self.out / "metrics.csv")
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("epoch", "time"):
                    self._tb.add_scalar(f"{self.stage}/{k}", v, record.get("epoch", 0))
            self._tb.flush()

    def save(self, payload: dict, best: bool) -> None:
        if not self.ctx.is_main:
            return
        save_checkpoint(self.last, payload)
        if best:
            save_checkpoint(self.best, payload)

    def end_epoch(self, record: dict, metric: float, best_so_far: float, payload: dict) -> float:
        """Track the best ``metric``, log the epoch, write ``last`` (and ``best``). Returns the best metric."""
        best = max(best_so_far, metric)
        record["best_metric"] = best
        self.log(record)
        self.save({**payload, "best_metric": best, "metrics": record}, best=metric > best_so_far)
        return best

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def train_epoch(
    loader,
    epoch: int,
    lr_at: Callable[[int], float],
    optimizer: torch.optim.Optimizer,
    step: Callable[[Any], dict[str, float]],
    desc: str,
    show: bool,
    print_every: int,
) -> tuple[dict[str, float], float]:
    """One pass over ``loader``: set the scheduled learning rate, run ``step(batch)``, sum its statistics.

    ``step`` does the forward, backward and optimiser step and returns scalars
    to log. Returns the summed statistics and the last learning rate.
    """
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):  # dsnet's seeded loaders reshuffle per epoch; any iterable works
        sampler.set_epoch(epoch)
    steps_per_epoch = len(loader)
    sums: dict[str, float] = {}
    lr = optimizer.param_groups[0]["lr"]
    # disable=None: tqdm turns itself off when stderr is not a terminal (CI logs get the epoch lines only)
    bar = tqdm(loader, desc=desc, disable=None if show else True, leave=False)
    for i, batch in enumerate(bar):
        lr = lr_at(epoch * steps_per_epoch + i)
        for group in optimizer.param_groups:
            group["lr"] = lr
        stats = step(batch)
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + v
        if i % print_every == 0:
            bar.set_postfix(lr=f"{lr:.4f}", **{k: f"{v:.3f}" for k, v in stats.items() if k.startswith("loss")})
    return sums, lr


def epoch_record(
    epoch: int, lr: float, seconds: float, sums: dict[str, float], steps: int, ctx: DistContext, device: torch.device
) -> dict[str, Any]:
    """The epoch's log line: step statistics averaged over steps and ranks."""
    keys = sorted(sums)
    reduced = all_reduce_sum([sums[k] for k in keys], ctx, device)
    record: dict[str, Any] = {"epoch": epoch, "lr": lr, "epoch_time_s": round(seconds, 2)}
    record.update({k: v / (steps * ctx.world_size) for k, v in zip(keys, reduced, strict=True)})
    return record
