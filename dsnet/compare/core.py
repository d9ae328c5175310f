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
    "supernet_compute",
    "gate_compute",
    "static_points",
    "sweep_points",
    "time_points",
    "near_chance_margin",
    "near_chance_methods",
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
    # exact alternative implementations of ``runner`` (the same outputs): each is timed, the fastest is reported
    variants: dict[str, Callable[[Tensor], Tensor]] | None = field(default=None, repr=False, compare=False)

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

    def notes(self, ctx: CompareContext) -> dict[str, Any]:
        """Facts about the method's training a reader needs to judge a comparison (e.g. the fine-tuning done)."""
        return {}


METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available to ``dsnet compare --methods``."""
    if cls.name in METHODS:
        raise ValueError(f"compare method {cls.name!r} registered twice")
    METHODS[cls.name] = cls
    return cls


def near_chance_margin(num_classes: int) -> float:
    """Top-1 points above chance (``100 / num_classes``) within which a model has learnt too little for a
    comparison with it to mean anything: chance itself (so below twice chance), at least 5 and at most 10 points
    (10 classes: below 20%; 2 classes: below 60%; 100 classes: below 6%)."""
    return max(5.0, min(100.0 / num_classes, 10.0))


def near_chance_methods(points: list[dict[str, Any]], num_classes: int | None) -> dict[str, dict[str, Any]]:
    """The methods whose *best* point (``compare.json`` points) is within :func:`near_chance_margin` of chance.

    ``{method: {"best_top1", "chance_top1", "margin", "warning"}}``, in the points' order; the warning is the
    one line that the report and the console print for the method.
    """
    if not num_classes:
        return {}
    chance, margin = 100.0 / num_classes, near_chance_margin(num_classes)
    best: dict[str, float] = {}
    for p in points:
        best[p["method"]] = max(best.get(p["method"], float("-inf")), float(p["top1"]))
    return {
        m: {
            "best_top1": top1,
            "chance_top1": chance,
            "margin": margin,
            "warning": (
                f"warning: {m} is near chance (best top-1 {top1:.1f}%, chance {chance:.1f}% for {num_classes} "
                f"classes, within {margin:g} points): its numbers and every claim about it are not meaningful; "
                "train longer or on more data"
            ),
        }
        for m, top1 in best.items()
        if top1 < chance + margin
    }


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
        self._steps: dict[str, int] = {}

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

    def steps_per_epoch(self, cfg: dict[str, Any]) -> int:
        """Optimiser steps per training epoch of a stage config (the length of its training loader)."""
        from dsnet.data import build_loader

        key = json.dumps(cfg["data"], sort_keys=True, default=str)
        if key not in self._steps:
            self._steps[key] = len(build_loader(cfg["data"], "train", seed=int(cfg["seed"]), device=self.device)[0])
        return self._steps[key]

    # --------------------------------------------------------------- stages
    def stage_dir(self, key: str) -> Path:
        return self.root / key

    def stage(
        self,
        key: str,
        run: Callable[[Path, bool], Any],
        what: str,
        config: Any,
        ignore: tuple[str, ...] = (),
        compute: Callable[[Path], dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Run a training stage into ``root/key``, or reuse it if finished, or resume it if interrupted.

        ``run(out, resume)`` must write ``out/summary.json`` last. ``config``
        (JSON-serialisable) is everything the stage's result depends on: a
        finished stage is reused only if it matches, so changing a setting
        never silently reuses a stage trained with another. The stage's wall
        time is kept in ``out/stage.json``; a stage that had to resume says so
        (its time then excludes the interrupted part). ``ignore`` names the
        recipe sections the stage does not read (stage I ignores ``gate``), so
        changing one of them does not invalidate it. ``compute(out)`` (after the run) says what the stage
        cost in sub-network passes (:func:`supernet_compute`); it is kept in ``stage.json`` beside the time.
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
            record = json.loads(record_path.read_text())
            if compute is not None and "compute" not in record:  # a stage finished by an older dsnet
                record["compute"] = compute(out)
                atomic_write_json(record, record_path)
            return record
        resume = (out / "last.ckpt").is_file()
        self.log(f"[compare] {key}: {'resuming' if resume else what}")
        atomic_write_json({"fingerprint": fingerprint, "config": config}, started)
        t0 = time.time()
        run(out, resume)
        record = {"stage": key, "seconds": round(time.time() - t0, 2), "how": "resumed" if resume else "trained"}
        if compute is not None:
            record["compute"] = compute(out)
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

    def compute(self, keys: list[str]) -> dict[str, Any] | None:
        """Training compute of finished stages: summed passes, and each stage's record (None if one is missing).

        ``fwd_bwd``: sub-network forward+backward passes over a training batch (a sandwich step of 4
        sub-networks counts 4); ``fwd_only``: sub-network forwards without a weight gradient (teachers, the
        frozen supernet under a gate, held-out evaluations in training-batch equivalents). BN recalibration
        and per-epoch selection evaluations are not counted.
        """
        stages = {}
        for key in keys:
            path = self.stage_dir(key) / "stage.json"
            record = json.loads(path.read_text()) if path.is_file() else {}
            if "compute" not in record:
                return None
            stages[key] = record["compute"]
        return {
            "fwd_bwd": sum(int(c["fwd_bwd"]) for c in stages.values()),
            "fwd_only": sum(int(c["fwd_only"]) for c in stages.values()),
            "seconds": self.seconds(keys),
            "stages": stages,
        }

    # ----------------------------------------------------------- evaluation
    def load(self, checkpoint: str | Path) -> DynamicNet:
        from dsnet.train.checkpoint import load_model

        model, _ = load_model(checkpoint, map_location=self.device, trust_factories=[self.cfg["model"]["name"]])
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


def supernet_compute(ctx: CompareContext, cfg: dict[str, Any]) -> Callable[[Path], dict[str, Any]]:
    """The ``compute`` of a stage I run of ``cfg`` (DS-Net supernet, US-Net, a network trained alone).

    Each step trains the sandwich: ``num_random + 2`` sub-networks forward and backward (one for a network
    with a single sub-network); distilling from the EMA teacher (``ib``, ``ieb``) adds its forwards.
    """

    def compute(out: Path) -> dict[str, Any]:
        sc = cfg["supernet"]
        widths = cfg["model"]["kwargs"].get("subnet_widths")
        single = widths is not None and len(widths) == 1
        per_step = 1 if single else sc["num_random"] + 2
        views = 2 if sc["mvco"] else 1
        teacher = 0 if single else {"ib": views, "ieb": views * (1 + sc["num_random"])}.get(sc["distill"], 0)
        steps = sc["epochs"] * ctx.steps_per_epoch(cfg)
        return {
            "steps": steps,
            "fwd_bwd": steps * per_step,
            "fwd_only": steps * teacher,
            "batch_size": cfg["data"]["batch_size"],
            "how": f"{sc['epochs']} epochs x {steps // max(1, sc['epochs'])} steps x {per_step} sub-network(s)"
            + (f" + {teacher} teacher forward(s) per step ({sc['distill']})" if teacher else ""),
        }

    return compute


def gate_compute(ctx: CompareContext, cfg: dict[str, Any], routing_choices: int) -> Callable[[Path], dict[str, Any]]:
    """The ``compute`` of a stage II run: the frozen supernet runs every routing choice forward on each batch
    (its pre-gate part once); only the small routing head gets a gradient, so no forward+backward pass."""

    def compute(out: Path) -> dict[str, Any]:
        gc = cfg["gate"]
        steps = gc["epochs"] * ctx.steps_per_epoch(cfg)
        return {
            "steps": steps,
            "fwd_bwd": 0,
            "fwd_only": steps * routing_choices,
            "batch_size": cfg["data"]["batch_size"],
            "how": f"{gc['epochs']} epochs x {steps // max(1, gc['epochs'])} steps x {routing_choices} routing "
            "choices forward (frozen supernet; backward into the routing head only)",
        }

    return compute


def _without_logging(config: Any) -> Any:
    if isinstance(config, dict):
        return {k: _without_logging(v) for k, v in config.items() if k != "log"}
    return config


def _static_runner(model: DynamicNet, subnet: int) -> Callable[[Tensor], Tensor]:
    static = model.extract(subnet, inplace=True).eval()
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
    ramp = model.bias_direction(report.get("input_size"))  # the report's sweep moved the gate along this
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
) -> dict[str, dict[str, Any]]:
    """Latency of every point, all interleaved, with the same threads.

    Batch 1: each of the first ``batch1_images`` images alone, one call each;
    the reported number is milliseconds per image (averaged over those
    images, since input-dependent methods cost more on some). Batch
    ``batch_size``: one call on that many images, milliseconds per call.
    Medians over ``repeats`` rounds.

    A point with ``variants`` (exact alternative implementations, e.g. LC-Net's ``gather`` and ``mask``
    channel modes) has every variant timed in the same interleaved loop, after checking that they give the
    same outputs on the large batch; at each batch size the fastest variant's time is reported, and which
    one it was (``impl_b1``, ``impl_batch``; every variant's times under ``variants``). Taking the minimum
    of noisy medians favours a variant slightly; the noise floor of the run bounds that.
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
    diffs: dict[str, float] = {}
    for p in timed:
        impls = p.variants or {"": p.runner}
        if p.variants:
            outs = {impl: r(big).float() for impl, r in impls.items()}
            first = next(iter(outs.values()))
            diffs[p.name] = max(float((o - first).abs().max()) for o in outs.values())
            for impl, o in outs.items():
                if not torch.allclose(o, first, rtol=1e-4, atol=1e-5):
                    raise ValueError(f"{p.name}: variant {impl!r} is not an exact implementation ({diffs[p.name]:.3g})")
        for impl, r in impls.items():
            fns[f"{p.name}\x00{impl}\x00b1"] = lambda r=r: [r(x) for x in singles]
            fns[f"{p.name}\x00{impl}\x00batch"] = lambda r=r: r(big)
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
    out: dict[str, dict[str, Any]] = {}
    for p in timed:
        impls = list(p.variants or {"": p.runner})
        b1s = {i: summarize(samples[f"{p.name}\x00{i}\x00b1"]) for i in impls}
        batches = {i: summarize(samples[f"{p.name}\x00{i}\x00batch"]) for i in impls}
        fast_b1 = min(impls, key=lambda i: b1s[i].median)
        fast_batch = min(impls, key=lambda i: batches[i].median)
        b1, batch = b1s[fast_b1], batches[fast_batch]
        out[p.name] = {
            "latency_ms_b1": b1.median / batch1_images,
            "latency_ms_batch": batch.median,
            "iqr_ms_b1": b1.iqr / batch1_images,
            "iqr_ms_batch": batch.iqr,
        }
        if p.variants:
            out[p.name].update(
                impl_b1=fast_b1,
                impl_batch=fast_batch,
                variants={
                    i: {"latency_ms_b1": b1s[i].median / batch1_images, "latency_ms_batch": batches[i].median}
                    for i in impls
                },
                variants_max_abs_diff=diffs[p.name],
            )
    return out
