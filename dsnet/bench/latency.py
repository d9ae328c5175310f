"""``dsnet bench --latency-table FILE``: each routing choice's latency here, and a check that a budget is met.

:func:`measure_latency_table` times the model's dynamic inference with every image routed to routing choice
``j`` (the gate runs and is paid for; the knob's own ``gate_bias`` decides), for each batch size and runtime,
every choice of a batch size in one interleaved loop (:func:`dsnet.bench.timing.interleaved`): eager PyTorch,
and with ``onnx`` the exported dynamic bundle in ONNX Runtime (``dsnet.export.OnnxDynamicModel``, forced to the
choice). The result is a :class:`~dsnet.utils.latency.LatencyTable` (milliseconds per image, median and IQR);
between neighbouring choices the noise rule of :func:`~dsnet.bench.timing.speedup_claim` says whether the
wider one is clearly slower.

:func:`measure_routed_latency` is the check of a budget: the model routed by its own gate on real images, timed
per image at one batch size in the same harness, interleaved with every choice forced again (so a machine that
changed speed since the table was measured shows as drift, not as a missed target), against the table's
prediction ``sum_j share_j * ms_j`` for the shares the gate chose on those images.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from dsnet.bench.onnx_bundle import export_bench_bundle
from dsnet.bench.runner import BATCH1_CYCLE, BenchConfig
from dsnet.bench.timing import interleaved, speedup_claim, summarize
from dsnet.models.base import DynamicNet
from dsnet.utils.latency import RUNTIMES, LatencyTable, load_latency_table
from dsnet.utils.table import format_table

__all__ = ["measure_latency_table", "format_latency_table", "measure_routed_latency", "FORCE"]

FORCE = 1e9  # the gate bias that forces a routing choice: far above any gate score


def _force(model: DynamicNet, j: int) -> list[float]:
    return [FORCE if i == j else 0.0 for i in range(len(model.routing_space))]


def _input(batch: int, input_size: Sequence[int], device: torch.device, channels_last: bool, gen) -> Tensor:  # noqa: ANN001
    x = torch.randn(batch, *input_size, generator=gen).to(device)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _calls(fn: Callable[..., object], inputs: Sequence[object], **kwargs: object) -> Callable[[], object]:
    """One timing: ``fn(x, **kwargs)`` for every ``x`` of ``inputs``, in order."""
    return lambda: [fn(x, **kwargs) for x in inputs]


def _set_threads(threads: int | None) -> int:
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    return old


def measure_latency_table(
    model: DynamicNet,
    *,
    batch_sizes: Sequence[int] = (1, 32),
    runtimes: Sequence[str] = ("eager",),
    repeats: int | None = None,
    warmup: int = 2,
    settle: bool = True,
    threads: int | None = None,
    device: str = "cpu",
    input_size: Sequence[int] | None = None,
    channels_last: bool | None = None,
    model_name: str | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> LatencyTable:
    """Measure ``model``'s latency table here: per batch size and runtime, ms per image of each routing choice.

    ``repeats=None``: 30 interleaved rounds at batch 1, 7 at larger batches (as ``dsnet bench``). ``threads``:
    torch and ONNX Runtime intra-op threads while measuring (None: torch's current count), recorded in the
    table. Inputs are channels-last on CPU unless ``channels_last=False``. ``settle=True`` (default): each batch
    size's timings first run untimed for as many rounds as they are then timed. A fresh process measured 10-35 %
    slower in its first pass than in its second and third (glibc's malloc adapts its mmap and trim thresholds to
    the allocations it sees, so early large activations are fresh pages; ``docs/benchmarks.md``, "Latency
    budgets"): a table measured in that pass overstated every choice's latency, and a budget calibrated to it
    came in 10-30 % under its target.
    """
    log = log or (lambda _msg: None)
    bad = [r for r in runtimes if r not in RUNTIMES]
    if bad or not runtimes:
        raise ValueError(f"runtimes must be among {', '.join(RUNTIMES)}, got {list(runtimes)}")
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"batch sizes must be positive, got {list(batch_sizes)}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda asked for, but torch sees no CUDA device")
    if "onnx" in runtimes and dev.type != "cpu":
        raise ValueError("the onnx runtime is measured on the CPU (device cpu)")
    model = model.to(dev).eval()
    size = tuple(input_size or model.default_input_size)
    channels_last = dev.type == "cpu" if channels_last is None else channels_last
    plan = BenchConfig(repeats=repeats, warmup=warmup)
    old_threads = _set_threads(threads)
    tmp = None
    try:
        measured_threads = torch.get_num_threads()
        bundle = None
        if "onnx" in runtimes:
            tmp = tempfile.TemporaryDirectory(prefix="dsnet-latency-")
            log("exporting the dynamic bundle to ONNX")
            bundle = export_bench_bundle(model, tmp.name, size, measured_threads)
        gen = torch.Generator().manual_seed(seed)
        rows = []
        for batch in batch_sizes:
            x = _input(batch, size, dev, channels_last, gen)
            cycle = BATCH1_CYCLE if batch == 1 else 1  # batch 1: a cycle of calls per timing, as dsnet bench
            fns: dict[str, Callable[[], object]] = {}
            x_np = x.detach().cpu().contiguous().numpy()
            for j in range(len(model.routing_space)):
                if "eager" in runtimes:
                    fns[f"eager/{j}"] = _calls(model, [x] * cycle, gate_bias=_force(model, j))
                if bundle is not None:
                    forced = torch.full((batch,), j, dtype=torch.long).numpy()
                    fns[f"onnx/{j}"] = _calls(bundle, [x_np] * cycle, choice=forced)
            rounds = plan.repeats_for(batch)
            log(f"batch {batch}: {len(fns)} routing choice x runtime timings x {rounds} interleaved rounds")
            with torch.inference_mode():
                if settle:
                    interleaved(fns, rounds, 0, dev)
                samples = interleaved(fns, rounds, warmup, dev)
            samples = {k: [v / cycle for v in vs] for k, vs in samples.items()}
            for runtime in runtimes:
                rows.append(_row(runtime, batch, rounds, warmup, samples, len(model.routing_space), cycle))
    finally:
        torch.set_num_threads(old_threads)
        if tmp is not None:
            tmp.cleanup()
    return LatencyTable.build(
        model,
        rows,
        input_size=size,
        model_name=model_name,
        device=dev.type if dev.type == "cpu" else str(dev),
        threads=measured_threads,
        channels_last=channels_last,
    )


def _row(
    runtime: str, batch: int, rounds: int, warmup: int, samples: dict[str, list[float]], n: int, cycle: int
) -> dict:
    choices = []
    for j in range(n):
        s = summarize(samples[f"{runtime}/{j}"])
        choices.append(
            {
                "ms": s.median / batch,
                "iqr_ms": s.iqr / batch,
                "q1_ms": s.q1 / batch,
                "q3_ms": s.q3 / batch,
                "batch_ms": s.median,
                "rounds": s.n,
            }
        )
    ordering = []
    for j in range(n - 1):
        claim = speedup_claim(samples[f"{runtime}/{j + 1}"], samples[f"{runtime}/{j}"])  # wider over slimmer
        ordering.append({"slimmer": j, "wider": j + 1, **claim.as_dict()})
    return {
        "runtime": runtime,
        "batch_size": batch,
        "repeats": rounds,
        "warmup": warmup,
        "calls_per_timing": cycle,
        "choices": choices,
        "ordering": ordering,
    }


def format_latency_table(table: LatencyTable) -> str:
    """The table on the console: one block per (runtime, batch size), a row per routing choice."""
    d = table.data
    m, mod = d["machine"], d["model"]
    out = [
        f"{mod['name']} at {'x'.join(map(str, mod['input_size']))} on {m['device']} {m['device_name']!r} "
        f"({m['arch']}, {m['threads']} threads, channels_last={d['channels_last']}); fingerprint {mod['fingerprint']}"
    ]
    noisy = False
    for row in d["rows"]:
        clear = {o["wider"]: o["clear"] for o in row.get("ordering", [])}
        rows = []
        for c, info in zip(row["choices"], mod["choices"]):
            mark = "" if clear.get(c["choice"], True) else "?"
            noisy |= bool(mark)
            kernels = f" k{'-'.join(map(str, info['kernels']))}" if info.get("kernels") else ""
            rows.append(
                [
                    c["choice"],
                    c["subnet"],
                    "-".join(map(str, info["widths"])) + kernels,
                    round(info["macs"] / 1e6, 2),
                    f"{c['ms']:.4f}{mark}",
                    f"{c['iqr_ms'] / 2:.4f}",
                    f"{c['batch_ms']:.3f}",
                ]
            )
        headers = ["choice", "subnet", "widths", "MMACs", "ms/image", "±IQR/2", "ms/batch"]
        title = f"{row['runtime']}, batch {row['batch_size']} ({row['repeats']} rounds)"
        out += ["", format_table(headers, rows, title=title)]
    if noisy:
        out.append(
            "? = not clearly slower than the next slimmer choice: fewer than 3 in 4 interleaved rounds agree "
            "(more --repeats, a quieter machine)"
        )
    return "\n".join(out)


def _batches(images: Tensor, batch_size: int) -> list[Tensor]:
    n = images.shape[0] // batch_size
    if n < 1:
        raise ValueError(f"need at least {batch_size} images for batch {batch_size}, got {images.shape[0]}")
    return [images[i * batch_size : (i + 1) * batch_size] for i in range(n)]


@torch.inference_mode()
def measure_routed_latency(
    model: DynamicNet,
    images: Tensor,
    table: LatencyTable | str | os.PathLike,
    *,
    batch_size: int,
    runtime: str = "eager",
    repeats: int = 9,
    warmup: int = 2,
    device: str = "cpu",
    channels_last: bool | None = None,
    threads: int | None = None,
    allow_foreign: bool = False,
) -> dict[str, Any]:
    """The model routed by its own gate (its stored budget bias) on ``images``, timed per image at ``batch_size``.

    ``images`` are split into batches of ``batch_size`` (the tail dropped); a round runs them all routed, and
    them all with every image forced to each routing choice in turn (as the table measured it), interleaved:
    every timing covers the same calls, so a busy machine's pre-emptions fall on all of them alike. Returns:

    * ``routed_ms`` (median ms per image, ``routed_iqr_ms``), ``shares`` (the gate's mix on the images);
    * ``table_ms``: ``sum_j shares_j * ms_j`` from ``table``; ``fresh_ms``: the same from the choices timed now;
    * ``drift``: per choice, its ms now over the table's; ``round_ratio_q1``/``q3``: quartiles of the per-round
      ratio routed / fresh prediction (how well the latency model holds, noise included).
    """
    t = load_latency_table(table)
    dev = torch.device(device)
    model = model.to(dev).eval()
    size = tuple(images.shape[1:])
    t.check(model, size, runtime=runtime, threads=threads, allow_foreign=allow_foreign)
    table_choice_ms = t.choice_ms(batch_size, runtime)
    channels_last = dev.type == "cpu" if channels_last is None else channels_last
    batches = [b.to(dev) for b in _batches(images, batch_size)]
    if channels_last and images.dim() == 4:
        batches = [b.contiguous(memory_format=torch.channels_last) for b in batches]
    counts = torch.zeros(len(model.routing_space), dtype=torch.long)
    for b in batches:
        counts += torch.bincount(model(b, return_routing=True).choice.cpu(), minlength=len(model.routing_space))
    shares = (counts.double() / counts.sum()).tolist()
    n_images = len(batches) * batch_size
    old_threads = _set_threads(threads)
    tmp = None
    try:
        fns: dict[str, Callable[[], object]] = {}
        if runtime == "eager":
            fns["routed"] = _calls(model, batches)
            for j in range(len(model.routing_space)):
                fns[f"choice/{j}"] = _calls(model, batches, gate_bias=_force(model, j))
        elif runtime == "onnx":
            tmp = tempfile.TemporaryDirectory(prefix="dsnet-latency-")
            bundle = export_bench_bundle(model, tmp.name, size, torch.get_num_threads())
            arrays = [b.detach().cpu().contiguous().numpy() for b in batches]
            fns["routed"] = _calls(bundle, arrays)
            for j in range(len(model.routing_space)):
                fns[f"choice/{j}"] = _calls(bundle, arrays, choice=torch.full((batch_size,), j).numpy())
        else:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
        samples = interleaved(fns, repeats, warmup, dev)
    finally:
        torch.set_num_threads(old_threads)
        if tmp is not None:
            tmp.cleanup()
    routed = [v / n_images for v in samples["routed"]]
    per_choice = [[v / n_images for v in samples[f"choice/{j}"]] for j in range(len(model.routing_space))]
    predicted_rounds = [sum(s * c[r] for s, c in zip(shares, per_choice)) for r in range(repeats)]
    ratios = summarize([a / p for a, p in zip(routed, predicted_rounds)])
    fresh = [statistics.median(c) for c in per_choice]
    stats = summarize(routed)
    return {
        "runtime": runtime,
        "batch_size": batch_size,
        "images": n_images,
        "repeats": repeats,
        "shares": shares,
        "routed_ms": stats.median,
        "routed_iqr_ms": stats.iqr,
        "routed_q1_ms": stats.q1,
        "routed_q3_ms": stats.q3,
        "routed_rounds_ms": routed,
        "table_ms": sum(s * m for s, m in zip(shares, table_choice_ms)),
        "fresh_ms": sum(s * m for s, m in zip(shares, fresh)),
        "fresh_choice_ms": fresh,
        "table_choice_ms": table_choice_ms,
        "drift": [f / m for f, m in zip(fresh, table_choice_ms)],
        "round_ratio_median": ratios.median,
        "round_ratio_q1": ratios.q1,
        "round_ratio_q3": ratios.q3,
    }
