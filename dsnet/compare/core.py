"""What every method of ``dsnet compare`` shares: points, the method registry, stages, one evaluation and one timing.

A **method** (one module each, see :mod:`dsnet.compare.methods`) trains or
derives its models through :meth:`CompareContext.stage` (finished stages are
reused, interrupted ones resume) and returns **points**: named operating
points with top-1 and MACs on the test split, each with a ``runner`` (a
function of a batch of images) that :func:`time_points` times against every
other method's, interleaved, with the same threads. Registering a class with
:func:`register_method` adds it to the CLI.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from dsnet.models.base import DynamicNet
from dsnet.utils.io import atomic_write_json

__all__ = [
    "Point",
    "Method",
    "METHODS",
    "register_method",
    "CompareContext",
    "without_sections",
    "static_points",
    "sweep_points",
    "time_points",
]


@dataclass
class Point:
    """One operating point of a method, measured on the test split."""

    name: str  # unique within the comparison, e.g. "usnet w=0.50"
    method: str
    top1: float  # %
    macs: float  # multiply-adds per image (mean over the test split for input-dependent methods)
    kind: str = "static"  # static | dynamic (gate) | cascade
    params: dict[str, Any] = field(default_factory=dict)  # widths, gate bias, threshold...
    runner: Callable[[Tensor], Tensor] | None = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "method": self.method,
            "kind": self.kind,
            "top1": self.top1,
            "mmacs": self.macs / 1e6,
            "params": self.params,
        }


class Method:
    """A method of the comparison. Subclasses set ``name`` and ``description`` and implement the three steps."""

    name: ClassVar[str]
    description: ClassVar[str]

    def applicable(self, ctx: CompareContext) -> str | None:
        """Why this method cannot run on this model family, or None."""
        return None

    def train(self, ctx: CompareContext) -> None:
        """Train or derive everything the points need, through ``ctx.stage`` (so it is resumable)."""
        raise NotImplementedError

    def points(self, ctx: CompareContext) -> list[Point]:
        """The method's points on the test split (evaluate through ``ctx.report`` so results are cached)."""
        raise NotImplementedError

    def stages(self, ctx: CompareContext) -> list[str]:
        """The stages whose training time is this method's cost (shared stages count for each method using them)."""
        raise NotImplementedError


METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available to ``dsnet compare --methods``."""
    if cls.name in METHODS:
        raise ValueError(f"compare method {cls.name!r} registered twice")
    METHODS[cls.name] = cls
    return cls


class CompareContext:
    """One seed's run directory, configuration, data and cached results."""

    def __init__(
        self,
        cfg: dict[str, Any],
        settings: dict[str, Any],
        root: str | Path,
        device: torch.device,
        progress: bool = False,
        log: Callable[[str], None] = print,
    ) -> None:
        self.cfg = cfg
        self.settings = settings
        self.root = Path(root)
        self.device = device
        self.progress = progress
        self.log = log
        self._loaders: dict[str, Any] = {}
        self._info = None

    # ----------------------------------------------------------------- data
    @property
    def seed(self) -> int:
        return int(self.cfg["seed"])

    def loader(self, split: str):
        """The evaluation loader of ``split`` ("val" is the reported test split), built once."""
        from dsnet.data import build_loader

        if split not in self._loaders:
            self._loaders[split] = build_loader(self.cfg["data"], split, seed=self.seed, device=self.device)
        return self._loaders[split][0]

    @property
    def info(self):
        """The test split's ``DatasetInfo``."""
        self.loader("val")
        return self._loaders["val"][1]

    # --------------------------------------------------------------- stages
    def stage_dir(self, key: str) -> Path:
        return self.root / key

    def stage(
        self, key: str, run: Callable[[Path, bool], Any], what: str, config: Any, ignore: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        """Run a training stage into ``root/key``, or reuse it if finished, or resume it if interrupted.

        ``run(out, resume)`` must write ``out/summary.json`` last. ``config``
        (JSON-serialisable) is everything the stage's result depends on: a
        finished stage is reused only if it matches, so changing a setting
        never silently reuses a stage trained with another. The stage's wall
        time is kept in ``out/stage.json``; a stage that had to resume says so
        (its time then excludes the interrupted part). ``ignore`` names the
        recipe sections the stage does not read (stage I ignores ``gate``), so
        changing one of them does not invalidate it.
        """
        out = self.stage_dir(key)
        if ignore and isinstance(config, dict):
            config = without_sections(config, ignore)
        record_path = out / "stage.json"
        config = _without_logging(config)  # progress bars and log files do not change a result
        fingerprint = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
        started = out / "stage_config.json"
        if started.is_file() and json.loads(started.read_text())["fingerprint"] != fingerprint:
            raise ValueError(
                f"{out} holds a stage run with other settings; use another --out (or delete {out}) to run it again"
            )
        if (out / "summary.json").is_file() and record_path.is_file():
            self.log(f"[compare] {key}: reusing finished stage")
            return json.loads(record_path.read_text())
        resume = (out / "last.ckpt").is_file()
        self.log(f"[compare] {key}: {'resuming' if resume else what}")
        atomic_write_json({"fingerprint": fingerprint, "config": config}, started)
        t0 = time.time()
        run(out, resume)
        record = {"stage": key, "seconds": round(time.time() - t0, 2), "how": "resumed" if resume else "trained"}
        atomic_write_json(record, record_path)
        return record

    def seconds(self, keys: list[str]) -> float | None:
        """Total recorded wall time of finished stages (None if one is missing)."""
        total = 0.0
        for key in keys:
            path = self.stage_dir(key) / "stage.json"
            if not path.is_file():
                return None
            total += json.loads(path.read_text())["seconds"]
        return total

    # ----------------------------------------------------------- evaluation
    def load(self, checkpoint: str | Path) -> DynamicNet:
        from dsnet.train.checkpoint import load_model

        model, _ = load_model(checkpoint, map_location=self.device)
        return model

    def cached(
        self,
        key: str,
        checkpoint: str | Path,
        compute: Callable[[], dict[str, Any]],
        valid: Callable[[dict[str, Any]], bool] = lambda cached: True,
    ) -> dict[str, Any]:
        """A test-split result of a checkpoint, cached in ``root/key/report_test.json``.

        The cache is used unless the checkpoint is newer or ``valid`` rejects it
        (written by an older version or with other settings); otherwise
        ``compute()`` runs and its result replaces the cache.
        """
        path = self.stage_dir(key) / "report_test.json"
        if path.is_file() and path.stat().st_mtime >= Path(checkpoint).stat().st_mtime:
            cached = json.loads(path.read_text())
            if valid(cached):
                return cached
        result = compute()
        atomic_write_json(result, path)
        return result

    def report(
        self, key: str, checkpoint: str | Path, model: DynamicNet | None = None, require: str | None = None
    ) -> dict[str, Any]:
        """``dsnet.evaluation.evaluate`` of a checkpoint on the test split, cached (:meth:`cached`).

        A cached report lacking the key ``require`` (written by an older
        ``evaluate``) is evaluated again.
        """
        from dsnet.evaluation import evaluate

        def compute() -> dict[str, Any]:
            info = self.info
            return evaluate(
                model or self.load(checkpoint),
                self.loader("val"),
                sweep=self.settings["eval"]["sweep"],
                device=self.device,
                progress=self.progress,
                model_name=self.cfg["model"]["name"],
                dataset_name=info.name,
                class_names=info.class_names,
                split="test",
            )

        return self.cached(key, checkpoint, compute, lambda cached: require is None or require in cached)


def without_sections(cfg: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """``cfg`` without the top-level recipe sections ``names`` (those a stage never reads)."""
    return {k: v for k, v in cfg.items() if k not in names}


def _without_logging(config: Any) -> Any:
    if isinstance(config, dict):
        return {k: _without_logging(v) for k, v in config.items() if k != "log"}
    return config


def _static_runner(model: DynamicNet, subnet: int) -> Callable[[Tensor], Tensor]:
    static = model.extract(subnet).eval()
    return lambda x: static(x)


def static_points(
    method: str, report: dict[str, Any], model: DynamicNet, label: Callable[[dict[str, Any]], str], routed_only=True
) -> list[Point]:
    """A point per static sub-network of an evaluation report; timed as the extracted plain network."""
    points = []
    for s in report["static"]:
        if routed_only and not s["routed"]:
            continue
        points.append(
            Point(
                label(s),
                method,
                s["top1"],
                float(s["macs"]),
                "static",
                {"subnet": s["index"], "widths": s["widths"]},
                _static_runner(model, s["index"]),
            )
        )
    return points


def sweep_points(method: str, report: dict[str, Any], model: DynamicNet) -> list[Point]:
    """The gate's budget sweep (and the trained gate, bias 0) of a report; timed as real dynamic inference."""
    from dsnet.evaluation import bias_ramp

    ramp = bias_ramp(len(model.routing_space))
    points = []
    sweep = sorted(report["sweep"], key=lambda p: p["bias"])
    for i, p in enumerate(sweep):
        bias = float(p["bias"])
        name = f"{method} (trained gate)" if bias == 0.0 else f"{method} sweep {i + 1}/{len(sweep)}"
        vector = (bias * ramp).tolist()
        points.append(
            Point(
                name,
                method,
                p["top1"],
                float(p["mean_macs"]),
                "dynamic",
                {"bias": bias, "routing": p["histogram"]["fractions"]},
                lambda x, v=vector: model(x, gate_bias=v),
            )
        )
    return points


@torch.inference_mode()
def time_points(
    points: list[Point],
    images: Tensor,
    *,
    batch_size: int,
    batch1_images: int,
    repeats: int,
    warmup: int = 2,
    threads: int | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """Latency of every point, all interleaved, with the same threads.

    Batch 1: each of the first ``batch1_images`` images alone, one call each;
    the reported number is milliseconds per image (averaged over those
    images, since input-dependent methods cost more on some). Batch
    ``batch_size``: one call on that many images, milliseconds per call.
    Medians over ``repeats`` rounds.
    """
    from dsnet.bench.timing import interleaved, summarize

    timed = [p for p in points if p.runner is not None]
    if not timed:
        return {}
    if images.shape[0] < max(batch_size, batch1_images):
        raise ValueError(f"timing needs {max(batch_size, batch1_images)} images, got {images.shape[0]}")
    big = images[:batch_size].to(device)
    singles = [images[i : i + 1].to(device) for i in range(batch1_images)]
    fns: dict[str, Callable[[], object]] = {}
    for p in timed:
        fns[f"{p.name}\x00b1"] = lambda r=p.runner: [r(x) for x in singles]
        fns[f"{p.name}\x00batch"] = lambda r=p.runner: r(big)
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=repeats, desc="timing", disable=None, leave=False)
    try:
        samples = interleaved(
            fns, repeats, warmup=warmup, device=device, progress=(lambda i, n: bar.update(1)) if bar else None
        )
    finally:
        torch.set_num_threads(old_threads)
        if bar is not None:
            bar.close()
    out: dict[str, dict[str, float]] = {}
    for p in timed:
        b1 = summarize(samples[f"{p.name}\x00b1"])
        batch = summarize(samples[f"{p.name}\x00batch"])
        out[p.name] = {
            "latency_ms_b1": b1.median / batch1_images,
            "latency_ms_batch": batch.median,
            "iqr_ms_b1": b1.iqr / batch1_images,
            "iqr_ms_batch": batch.iqr,
        }
    return out
