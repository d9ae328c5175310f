"""What the training stages share: the run folder, logs, checkpoints, resume, accuracy (the loop: dsnet.train.loop)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
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
from dsnet.utils.io import (
    atomic_copy,
    atomic_write_json,
    atomic_write_text,
    check_output_dir,
    remove_stale_temporaries,
)
from dsnet.utils.modes import temporary_mode

__all__ = [
    "RunDir",
    "config_difference",
    "autocast",
    "seed_everything",
    "selection_loader",
    "split_sizes",
    "rng_state",
    "set_rng_state",
    "top1_accuracy",
    "unwrap",
    "train_epoch",
    "check_finite",
    "epoch_record",
    "effective_lr",
]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain Python values (what the safe checkpoint loader accepts)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (name, [int(k) for k in keys.tolist()], int(pos), int(has_gauss), float(gauss)),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on CUDA when ``enabled``; nothing on other devices."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def selection_loader(data_cfg: dict, seed: int, device: torch.device) -> tuple[Any, str]:
    """The loader model selection reads (best epoch, budget calibration) and its split's name.

    The held-out slice of the training set (``data.holdout``: by default 10% of
    it, at most 5,000 images), so the reported split ("val") is never selected
    on; "val" only when ``data.holdout`` is 0 (the run's summary says so).
    """
    from dsnet.data import build_loader

    split = "val" if data_cfg.get("holdout") == 0 else "holdout"
    loader, _ = build_loader(data_cfg, split, seed=seed, device=device)
    return loader, split


def split_sizes(training: int, selection: Any, split: str) -> str:
    """The start-of-run count of images: ``training`` (after holdout and subset) and what
    :func:`selection_loader` gave; the test split's size only when selection reads it (``data.holdout: 0``)."""
    from dsnet.data import describe_split_sizes

    n = len(selection.dataset)
    return describe_split_sizes(training, n if split == "holdout" else 0, n if split == "val" else None)


def effective_lr(stage: str, sc: dict, global_batch: int, is_main: bool = True) -> float:
    """``lr * global batch / lr_reference_batch``, printed so the rescaling is never a surprise."""
    lr = sc["lr"] * global_batch / sc["lr_reference_batch"]
    if is_main:
        print(
            f"[{stage}] effective lr {lr:.4g} = {stage}.lr {sc['lr']:g} x global batch {global_batch} "
            f"/ {stage}.lr_reference_batch {sc['lr_reference_batch']}",
            flush=True,
        )
    return lr


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


# keys a resumed run may change: where things are and how they are shown, not what is computed
RESUME_MAY_CHANGE = ("device", "data.root", "data.workers", "data.download", "log", "distributed")


def config_difference(old: Any, new: Any, prefix: str = "") -> tuple[str, Any, Any] | None:
    """The first key (dotted) whose value differs between two resolved configs; keys one side lacks are skipped."""
    if prefix and any(prefix == k or prefix.startswith(k + ".") for k in RESUME_MAY_CHANGE):
        return None
    if isinstance(old, dict) and isinstance(new, dict):
        for key in old:
            if key in new:
                found = config_difference(old[key], new[key], f"{prefix}.{key}" if prefix else str(key))
                if found:
                    return found
        return None
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        old, new = list(old), list(new)
    return None if old == new else (prefix, old, new)


class RunDir:
    """A run's output folder: resolved config, metrics (JSONL + CSV), TensorBoard, checkpoints.

    Only the main process writes. A fresh run refuses a folder that already
    holds a checkpoint (so a finished run is never overwritten by accident);
    ``resume=True`` continues from its ``last.ckpt``. Construction checks
    everything and writes nothing: the folder can be written, the checkpoint
    to resume loads and was made with the same config (up to
    ``RESUME_MAY_CHANGE``). ``start()`` writes, once the stage has loaded the
    resume state into its model and optimiser.

    ``last.ckpt`` is the source of truth: it records the best epoch, and is
    written before ``best.ckpt``, so a kill between the two leaves a
    ``best.ckpt`` that ``start()`` repairs from ``last.ckpt`` (the best epoch
    is then the last one). Temporary files of killed writes are removed.
    """

    def __init__(
        self, out: str | Path, cfg: dict, ctx: DistContext, resume: bool, stage: str, python_api: bool = False
    ) -> None:
        # what the messages call the arguments: the command's options, or the Python API's keywords
        out_arg, resume_arg = ("out=", "resume=True") if python_api else ("--out", "--resume")
        same_config = "resume with the same arguments" if python_api else "resume without --config/--set"
        self.out = Path(out)
        self.cfg = cfg
        self.ctx = ctx
        self.stage = stage
        self.resume = resume
        self.last = self.out / "last.ckpt"
        self.best = self.out / "best.ckpt"
        if ctx.is_main:
            check_output_dir(self.out, out_arg)
        self.state: dict[str, Any] | None = None
        if resume:
            if not self.last.is_file():
                raise FileNotFoundError(f"{resume_arg}: no {self.last} to resume from")
            # the caller's config names the model: a factory it names is the caller's, the run's files may name it
            self.state = read_checkpoint(self.last, trust_factories=self._own_factories())
            if self.state.get("stage", stage) != stage:
                raise ValueError(f"{resume_arg}: {self.last} is a {self.state['stage']} run, not a {stage} run")
            diff = config_difference(self.state.get("config") or {}, cfg)
            if diff:
                key, old, new = diff
                raise ValueError(
                    f"{resume_arg}: {key} is {new!r} here but {old!r} in the run in {self.out}; a resumed run keeps "
                    f"its config ({same_config}, or start a new {out_arg})"
                )
        elif self.last.is_file():
            raise ValueError(
                f"{self.out} already holds a run ({self.last.name}); pass {resume_arg} or choose another {out_arg}"
            )
        self.records: list[dict] = []
        self._tb = None
        self.best_epoch: int | None = None if self.state is None else self.state.get("best_epoch")
        if self.state is not None and self.best_epoch is None:  # written before checkpoints recorded it
            try:
                self.best_epoch = read_checkpoint(self.best, trust_factories=self._own_factories())["epoch"]
            except (OSError, ValueError):
                self.best_epoch = self.state["epoch"]

    def _own_factories(self) -> list[str]:
        name = (self.cfg.get("model") or {}).get("name")
        return [name] if isinstance(name, str) else []

    def resume_state(self) -> dict[str, Any]:
        if self.state is None:
            raise ValueError("not resuming: no state to resume from")
        return self.state

    def start(self) -> None:
        """Create the folder, repair ``best.ckpt``, write the resolved config, open the logs (main process)."""
        if not self.ctx.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.out)
        if self.state is not None:
            self._repair_best(self.state)
        atomic_write_text(yaml.safe_dump(self.cfg, sort_keys=False), self.out / "config.yaml")
        metrics = self.out / "metrics.jsonl"
        if self.resume and metrics.is_file():
            done = self.state["epoch"] if self.state else -1
            records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
            # epochs past last.ckpt were logged by a run killed before it saved them: they are re-run
            self.records = [r for r in records if r.get("epoch", -1) <= done]
        if self.cfg.get("log", {}).get("tensorboard", True):
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out / "tensorboard"))
            except (ImportError, ModuleNotFoundError):
                self._tb = None

    def _repair_best(self, state: dict[str, Any]) -> None:
        """Make ``best.ckpt`` hold the best epoch ``last.ckpt`` records, copying ``last.ckpt`` where it is that one."""
        best_epoch = self.best_epoch
        try:
            ok = read_checkpoint(self.best, trust_factories=self._own_factories())["epoch"] == best_epoch
        except (OSError, ValueError):
            ok = False
        if ok:
            return
        if best_epoch != state["epoch"]:
            print(
                f"warning: {self.best} is missing or not the best epoch ({best_epoch + 1}) and cannot be rebuilt; "
                f"using {self.last.name} (epoch {state['epoch'] + 1}) as the best checkpoint",
                flush=True,
            )
        atomic_copy(self.last, self.best)
        self.best_epoch = state["epoch"]

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
        """``last.ckpt``, then (if ``best``) ``best.ckpt``: last first, so it always knows which epoch is best."""
        if not self.ctx.is_main:
            return
        save_checkpoint(self.last, payload)
        if best:
            save_checkpoint(self.best, payload)

    def write_summary(self, summary: dict[str, Any]) -> None:
        """The run's ``summary.json`` (main process), written atomically."""
        if self.ctx.is_main:
            atomic_write_json(summary, self.out / "summary.json")

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
    stage: str | None = None,
) -> tuple[dict[str, float], float]:
    """One pass over ``loader``: set the scheduled learning rate, run ``step(batch)``, sum its statistics.

    ``step`` does the forward, backward and optimiser step and returns scalars
    to log. Returns the summed statistics and the last learning rate. A
    non-finite statistic (a loss that turned nan or inf) stops training with
    ``FloatingPointError`` before anything of this epoch is saved.
    """
    stage = stage or desc.split()[0]
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
        check_finite(stats, stage, epoch, i, steps_per_epoch)
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + v
        if i % print_every == 0:
            bar.set_postfix(lr=f"{lr:.4f}", **{k: f"{v:.3f}" for k, v in stats.items() if k.startswith("loss")})
    return sums, lr


def check_finite(stats: dict[str, float], stage: str, epoch: int, step: int, steps_per_epoch: int) -> None:
    """Raise ``FloatingPointError`` naming the stage, epoch and step if a logged value is nan or inf."""
    bad = {k: v for k, v in stats.items() if not math.isfinite(v)}
    if bad:
        what = ", ".join(f"{k}={v}" for k, v in bad.items())
        raise FloatingPointError(
            f"{stage} training diverged at epoch {epoch + 1}, step {step + 1}/{steps_per_epoch} "
            f"(global step {epoch * steps_per_epoch + step}): {what}; stopped without saving epoch {epoch + 1}. "
            f"Lower {stage}.lr or check the data"
        )


def epoch_record(
    epoch: int, lr: float, seconds: float, sums: dict[str, float], steps: int, ctx: DistContext, device: torch.device
) -> dict[str, Any]:
    """The epoch's log line: step statistics averaged over steps and ranks."""
    keys = sorted(sums)
    reduced = all_reduce_sum([sums[k] for k in keys], ctx, device)
    record: dict[str, Any] = {"epoch": epoch, "lr": lr, "epoch_time_s": round(seconds, 2)}
    record.update({k: v / (steps * ctx.world_size) for k, v in zip(keys, reduced, strict=True)})
    return record
