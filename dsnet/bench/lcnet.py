"""``dsnet bench`` for LC-Nets: what per-input sparsity really costs, measured side by side.

DS-Net's argument (SPEC section 1, 6.1) is that skipping *arbitrary* channels
saves multiply-adds but not milliseconds, while a prefix slice of the same
size is an ordinary dense computation. This runner measures it on an LC-Net,
all methods in one interleaved loop (:func:`dsnet.bench.timing.interleaved`),
every skippable block forced to run unless stated:

* ``full``: every block at full width (the reference);
* at each channel density ``d`` (``k = round(d * planes)`` channels per block,
  so equal MACs): ``gather@d``, each sample's own ``k`` salient channels
  (per-sample weight gather + grouped convolution, the LC-Net inference);
  ``prefix@d``, the first ``k`` channels for every sample (what DS-Net
  computes; a different function, timed for its cost); ``mask@d``, full width
  with the dropped channels zeroed (the output of ``gather@d``, the cost of a
  masking implementation);
* layer skipping at each fraction ``f``: ``skip@f``, every skippable block
  skipped by a fraction ``f`` of the samples (grouped: the others are
  gathered, computed and scattered back), channels at full width, against
  ``full``; at batch 1 a cycle of single-image calls realises the fraction;
* ``lcnet``: the model's own decisions (its thresholds and density, gather).

Inputs are random, NCHW-contiguous (the grouped gather convolution folds the
batch into channels, which a channels-last tensor cannot do as a view).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from dsnet.bench.routing import mix_choices
from dsnet.bench.runner import cpu_name
from dsnet.bench.timing import interleaved, summarize
from dsnet.models.lcnet import LCResNet
from dsnet.utils.allocator import allocator_setting
from dsnet.utils.table import format_table

__all__ = ["LC_SCHEMA", "LCBenchConfig", "run_lcnet_benchmark", "format_lcnet_report", "inference_fn", "time_lcnet"]

LC_SCHEMA = "dsnet-lcnet-bench-v1"
BATCH1_CYCLE = 10  # batch 1: a cycle of this many single-image calls (skip fractions in steps of 0.1)


@dataclass
class LCBenchConfig:
    """What to measure. ``repeats=None`` picks 30 rounds at batch 1 and 7 at larger batches."""

    batch_sizes: list[int] = field(default_factory=lambda: [1, 32])
    densities: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    skip_fractions: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    threads: int | None = None
    device: str = "cpu"
    repeats: int | None = None
    warmup: int = 2
    input_size: tuple[int, ...] | None = None
    seed: int = 0

    def repeats_for(self, batch: int) -> int:
        return self.repeats if self.repeats is not None else (30 if batch == 1 else 7)


def inference_fn(model: LCResNet, x: Tensor, **options: Any) -> Callable[[], Tensor]:
    """A zero-argument callable running LC-Net inference on ``x`` (no autograd), for interleaved timing.

    ``options`` are :meth:`LCResNet.forward`'s (``channel_mode``, ``density``,
    ``skip_bias``, ``execute``). The model must be in eval mode.
    """
    if model.training:
        raise ValueError("time an LC-Net in eval mode (model.eval())")

    def run() -> Tensor:
        with torch.inference_mode():
            return model(x, **options)

    return run


def time_lcnet(
    model: LCResNet,
    images: Tensor,
    batch_sizes: Sequence[int] = (1, 32),
    repeats: int | None = None,
    warmup: int = 2,
    device: torch.device | str = "cpu",
    **options: Any,
) -> dict[int, dict[str, float | int]]:
    """Latency (ms per batch: median, quartiles, ...) of the model's own inference on real ``images``.

    For each batch size ``b``, the first ``b`` images are one batch (so the
    decisions are the model's on real data); each size is timed separately.
    To compare with other models, put :func:`inference_fn` callables into one
    :func:`dsnet.bench.timing.interleaved` loop instead.
    """
    model = model.to(device).eval()
    out: dict[int, dict[str, float | int]] = {}
    for b in batch_sizes:
        if not 0 < b <= images.shape[0]:
            raise ValueError(f"batch size {b} needs at least {b} images, got {images.shape[0]}")
        x = images[:b].to(device).contiguous()
        n = repeats if repeats is not None else (30 if b == 1 else 7)
        samples = interleaved({"lcnet": inference_fn(model, x, **options)}, n, warmup, device)
        out[b] = summarize(samples["lcnet"]).as_dict()
    return out


def _skip_pattern(model: LCResNet, fraction: float, total: int, seed: int) -> Tensor:
    """``(total, B)`` execute matrix: each skippable block skipped by ``round(fraction * total)`` samples."""
    cols = []
    for b, skippable in enumerate(model.skippable):
        if skippable:
            cols.append(mix_choices([1.0 - fraction, fraction], total, seed=seed + b) == 0)
        else:
            cols.append(torch.ones(total, dtype=torch.bool))
    return torch.stack(cols, 1)


def run_lcnet_benchmark(
    model: LCResNet, config: LCBenchConfig, model_name: str | None = None, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Measure ``model`` as ``config`` says; returns the report (schema ``dsnet-lcnet-bench-v1``)."""
    log = log or (lambda _msg: None)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device")
    for d in config.densities:
        if not 0.0 < d <= 1.0:
            raise ValueError(f"densities must be in (0, 1], got {d}")
    for f in config.skip_fractions:
        if not 0.0 <= f <= 1.0:
            raise ValueError(f"skip fractions must be in [0, 1], got {f}")
    if not any(model.skippable) and config.skip_fractions:
        log("no block of this model can be skipped: skipping measurements left out")
        config = dataclasses.replace(config, skip_fractions=[])
    model = model.to(device).eval()
    size = tuple(config.input_size or model.default_input_size)
    report: dict[str, Any] = {
        "schema": LC_SCHEMA,
        "model": model_name or type(model).__name__,
        "input_size": list(size),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "threads": torch.get_num_threads(),
        "allocator": allocator_setting(),
        "torch": torch.__version__,
        "density": model.density,
        "skippable": model.skippable,
        "densities": list(config.densities),
        "skip_fractions": list(config.skip_fractions),
        "results": [],
    }
    gen = torch.Generator().manual_seed(config.seed)
    for batch in config.batch_sizes:
        cycle = BATCH1_CYCLE if batch == 1 else 1
        xs = [torch.randn(batch, *size, generator=gen).to(device) for _ in range(cycle)]
        report["results"].append(_bench_batch(model, xs, size, config, device, log))
    return report


def _bench_batch(
    model: LCResNet,
    xs: list[Tensor],
    size: tuple[int, ...],
    config: LCBenchConfig,
    device: torch.device,
    log: Callable[[str], None],
) -> dict[str, Any]:
    batch, cycle = xs[0].shape[0], len(xs)
    total = batch * cycle
    all_run = torch.ones(batch, len(model.blocks), dtype=torch.bool, device=device)
    full_table = model.macs_table(size, 1.0)
    fns: dict[str, Callable[[], object]] = {}
    macs: dict[str, float] = {}  # useful multiply-adds per sample
    computed: dict[str, float] = {}  # multiply-adds the method actually performs per sample

    def add(name: str, options: list[dict[str, Any]], useful: float, done: float) -> None:
        calls = [inference_fn(model, x, **opt) for x, opt in zip(xs, options)]

        def run() -> object:
            for call in calls:
                out = call()
            return out

        fns[name] = run
        macs[name] = useful
        computed[name] = done

    full = float(full_table.all_executed)
    add("full", [dict(channel_mode="prefix", density=1.0, execute=all_run)] * cycle, full, full)
    for d in config.densities:
        useful = float(model.macs_table(size, d).all_executed)
        for mode in ("gather", "prefix", "mask"):
            opts = [dict(channel_mode=mode, density=d, execute=all_run)] * cycle
            add(f"{mode}@{d:g}", opts, useful, full if mode == "mask" else useful)
    for f in config.skip_fractions:
        pattern = _skip_pattern(model, f, total, config.seed).to(device)
        parts = list(pattern.split(batch))
        useful = float(full_table.per_sample(pattern).double().mean())
        add(f"skip@{f:g}", [dict(channel_mode="prefix", density=1.0, execute=p) for p in parts], useful, useful)
    own = torch.cat([model.count_macs(x) for x in xs]).double().mean().item()
    with torch.inference_mode():
        rates = torch.cat([model(x, return_decisions=True).execute for x in xs]).mean(0).tolist()
    add("lcnet", [{}] * cycle, own, own)

    repeats = config.repeats_for(batch)
    log(f"batch {batch}: {len(fns)} methods x {repeats} interleaved rounds")
    samples = interleaved(fns, repeats, config.warmup, device)
    methods = {name: summarize([t / cycle for t in ts]).as_dict() for name, ts in samples.items()}
    full_ms = methods["full"]["median"]
    rows = []
    for name in fns:
        ms = methods[name]["median"]
        reduction = full / macs[name]
        rows.append(
            {
                "method": name,
                "macs": macs[name],
                "computed_macs": computed[name],
                "median_ms": ms,
                "iqr_ms": methods[name]["iqr"],
                "speedup": full_ms / ms,
                "mac_reduction": reduction,
                "efficiency": (full_ms / ms) / reduction,
            }
        )
    equal_macs = []
    for d in config.densities:
        gather, prefix, mask = (methods[f"{m}@{d:g}"]["median"] for m in ("gather", "prefix", "mask"))
        equal_macs.append(
            {
                "density": d,
                "gather_vs_prefix": gather / prefix,
                "mask_vs_prefix": mask / prefix,
                "gather_vs_mask": gather / mask,
            }
        )
    return {
        "batch_size": batch,
        "calls_per_cycle": cycle,
        "repeats": repeats,
        "methods": methods,
        "rows": rows,
        "equal_macs": equal_macs,
        "lcnet_exec_rates": rates,
    }


def format_lcnet_report(report: dict[str, Any]) -> str:
    """Console tables, one per batch size."""
    out = [
        f"{report['model']} (LC-Net, density {report['density']:g}, "
        f"{sum(report['skippable'])}/{len(report['skippable'])} blocks skippable) at "
        f"{'x'.join(map(str, report['input_size']))} on {report['device_name']} ({report['device']}, "
        f"{report['threads']} threads); medians per batch in ms; speed-up and MAC reduction vs 'full'"
    ]
    for res in report["results"]:
        rows = [
            [r["method"], round(r["macs"] / 1e6, 2), round(r["computed_macs"] / 1e6, 2),
             f"{r['median_ms']:.2f} ±{r['iqr_ms'] / 2:.2f}", f"{r['mac_reduction']:.2f}x", f"{r['speedup']:.2f}x",
             f"{r['efficiency']:.2f}"]
            for r in res["rows"]
        ]  # fmt: skip
        headers = ["method", "MMACs", "MMACs computed", "ms (±IQR/2)", "MAC red.", "real", "efficiency"]
        title = f"batch {res['batch_size']} ({res['repeats']} rounds"
        title += f", cycles of {res['calls_per_cycle']} calls)" if res["calls_per_cycle"] > 1 else ")"
        out += ["", format_table(headers, rows, title=title)]
        for e in res["equal_macs"]:
            out.append(
                f"equal MACs at density {e['density']:g}: gather {e['gather_vs_prefix']:.2f}x and mask "
                f"{e['mask_vs_prefix']:.2f}x the time of a prefix slice"
            )
        rates = " ".join(f"{r:.2f}" for r in res["lcnet_exec_rates"])
        out.append(f"lcnet (own decisions) execution rate per block: {rates}")
    return "\n".join(out)
