"""``dsnet.serving_model``: the way to serve a dynamic model, and the measurement that picks its runtime.

.. code-block:: python

    import dsnet

    server = dsnet.serving_model("runs/fmnist_gate/best.ckpt")    # runtime="auto"
    logits = server(images)                                     # (N, C, H, W) float, as the data recipe prepares
    out = server.route(images)                                  # .logits, .choice (index into routing_space)
    server.bias = 0.5                                           # the knob: b > 0 saves compute

``runtime``: ``"eager"``, ``"eager-split"``, ``"compile"``, ``"onnx"`` (see :mod:`dsnet.export.serving`),
``"auto"`` (the runtime ``dsnet.export.serving.AUTO_RUNTIME`` names for this device and ``batch_size``, backed
by ``benchmarks/results/serving_paths.json``), or ``"measure"``: every installed runtime is built and timed here
and now, interleaved, on ``images`` at ``batch_size``, and the fastest is returned (its ``measurement``
attribute holds the timings).

:func:`bench_serving_paths` is the measurement behind ``AUTO_RUNTIME`` (``benchmarks/serving_paths.py``): each
runtime's dynamic model against the static networks it routes to, in the same runtime, on real images.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dsnet.bench.runner import cpu_name
from dsnet.bench.timing import interleaved, speedup_claim, summarize
from dsnet.export.serving import (
    RUNTIMES,
    ServingModel,
    SplitServing,
    build_serving,
    check_serving,
)
from dsnet.models.base import DynamicNet
from dsnet.utils.allocator import ALLOCATOR_SETTINGS, allocator_setting, steady_allocator

__all__ = ["SCHEMA", "serving_model", "measure_runtimes", "bench_serving_paths", "format_serving_report"]

SCHEMA = "dsnet-serving-paths-v1"


def _load(
    source: object, device: str | torch.device | None, use_ema: bool, trust_factories: Iterable[str]
) -> tuple[DynamicNet, dict[str, Any] | None]:
    from dsnet.train.load import LoadedCheckpoint, load

    dataset = None
    if isinstance(source, (str, os.PathLike)):
        source = load(source, use_ema=use_ema, map_location=device or "cpu", trust_factories=trust_factories)
    if isinstance(source, LoadedCheckpoint):
        dataset = {"name": source.dataset, "recipe": source.recipe, "class_names": source.classes}
        source = source.model
    if not isinstance(source, DynamicNet):
        raise TypeError(f"serving_model serves a DynamicNet (or its checkpoint), got {type(source).__name__}")
    if device is not None:
        source = source.to(device)
    return source.eval(), dataset


def serving_model(
    source: DynamicNet | str | os.PathLike | Any,
    runtime: str = "auto",
    *,
    bias: float = 0.0,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    threads: int | None = None,
    dtype: torch.dtype | None = None,
    channels_last: bool | None = None,
    compile: Mapping[str, Any] | None = None,  # noqa: A002 - torch.compile's keyword arguments
    onnx_dir: str | os.PathLike | None = None,
    images: Tensor | None = None,
    candidates: Sequence[str] = RUNTIMES,
    repeats: int = 7,
    use_ema: bool = True,
    trust_factories: Iterable[str] = (),
    allocator: str = "steady",
) -> ServingModel:
    """A ready-to-serve dynamic model: ``server(images) -> logits``, ``server.route(images)``, ``server.bias``.

    ``source``: a :class:`~dsnet.models.base.DynamicNet` (its gate trained), a :class:`dsnet.LoadedCheckpoint`,
    or a checkpoint path (loaded with :func:`dsnet.load`, ``use_ema`` and ``trust_factories`` passed on; the
    ONNX manifest then records its preprocessing and class names). ``runtime``: see the module docstring;
    a bad name is a one-line ``ValueError``. ``batch_size``: the batch size you will serve at, which ``"auto"``
    and ``"measure"`` choose for. ``images`` (``"measure"``): real images to time on (default: random ones,
    whose routing is not the gate's real mix). ``allocator="steady"`` (default) fixes glibc malloc's thresholds
    for the process (:func:`dsnet.utils.allocator.steady_allocator`: large activations stay in the process
    between calls; eager CNN inference at batch 32 measured 1.1-1.8x faster), ``"system"`` leaves malloc as it
    is. Other options: :func:`dsnet.export.serving.build_serving`.
    """
    choices = (*RUNTIMES, "auto", "measure")
    if runtime not in choices:
        raise ValueError(f"runtime must be one of {', '.join(choices)}, got {runtime!r}")
    if allocator not in ALLOCATOR_SETTINGS:
        raise ValueError(f"allocator must be one of {', '.join(ALLOCATOR_SETTINGS)}, got {allocator!r}")
    if allocator == "steady":
        steady_allocator()
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    model, dataset = _load(source, device, use_ema, trust_factories)
    opts: dict[str, Any] = {
        "bias": bias,
        "threads": threads,
        "dtype": dtype,
        "channels_last": channels_last,
        "compile": compile,
        "onnx_dir": onnx_dir,
        "dataset": dataset,
    }
    if runtime != "measure":
        return build_serving(model, runtime, batch_size=batch_size, **opts)
    bad = [c for c in candidates if c not in RUNTIMES]
    if bad or not candidates:
        raise ValueError(f"candidates must be among {', '.join(RUNTIMES)}, got {list(candidates)}")
    live: dict[str, ServingModel] = {}
    errors = []
    for name in dict.fromkeys(candidates):
        try:
            live[name] = build_serving(model, name, **opts)
        except (ImportError, ValueError, RuntimeError) as err:  # not installed here, or no compiler
            errors.append(f"{name}: {' '.join(str(err).split())}")
    if not live:
        raise RuntimeError(f"no serving runtime could be built: {'; '.join(errors)}")
    if images is None:
        images = torch.randn(max(batch_size, 16), *model.default_input_size)
    measurement = measure_runtimes(live, images, batch_size, repeats=repeats)
    best = live[measurement["fastest"]]
    best.measurement = measurement  # type: ignore[attr-defined]
    return best


def _batches(images: Tensor, batch_size: int, limit: int) -> list[Tensor]:
    if images.shape[0] < batch_size:
        raise ValueError(f"need at least {batch_size} images to time batches of {batch_size}, got {images.shape[0]}")
    n = max(batch_size, min(images.shape[0] // batch_size * batch_size, limit))
    return list(images[:n].split(batch_size))


def measure_runtimes(
    servers: Mapping[str, ServingModel],
    images: Tensor,
    batch_size: int,
    *,
    repeats: int = 7,
    warmup: int = 1,
    images_per_round: int = 32,
) -> dict[str, Any]:
    """Time each serving object on ``images`` in batches of ``batch_size``, interleaved; which is fastest.

    A round calls each object on the first ``images_per_round`` images (at least one batch), batch after
    batch. Returns ms per image (median over rounds) per runtime, ``fastest`` and, where there is a second,
    the noise rule's verdict on the fastest against it (``dsnet.bench.timing.speedup_claim``).
    """
    batches = _batches(images, batch_size, images_per_round)
    count = sum(b.shape[0] for b in batches)
    fns = {name: (lambda s=s: [s(b) for b in batches]) for name, s in servers.items()}
    samples = interleaved(fns, repeats, warmup)
    per_image = {name: [t / count for t in ts] for name, ts in samples.items()}
    medians = {name: summarize(ts).median for name, ts in per_image.items()}
    ranked = sorted(medians, key=medians.get)  # type: ignore[arg-type]
    out: dict[str, Any] = {
        "batch_size": batch_size,
        "ms_per_image": medians,
        "fastest": ranked[0],
        "rounds": repeats,
    }
    if len(ranked) > 1:
        out["vs_second"] = {"second": ranked[1], **speedup_claim(per_image[ranked[1]], per_image[ranked[0]]).as_dict()}
    return out


# ------------------------------------------------------------------------ the benchmark behind AUTO_RUNTIME
def bench_serving_paths(
    model: DynamicNet,
    images: Tensor,
    *,
    runtimes: Sequence[str] = RUNTIMES,
    batch_sizes: Sequence[int] = (1, 256),
    batch1_images: int = 64,
    repeats: int | None = None,
    warmup: int = 2,
    threads: int | None = None,
    compile: Mapping[str, Any] | None = None,  # noqa: A002
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Every runtime's dynamic model against the static networks it routes to, in the same runtime, on ``images``.

    ``images``: real, prepared images (the model's data recipe), at least ``max(batch_sizes)`` and
    ``batch1_images`` of them. At batch 1 a timed call is ``batch1_images`` single-image calls (each image
    routed by the gate on its own), reported per image; at batch ``B`` one call on the first ``B`` images.
    One interleaved loop per batch size (``dsnet.bench.timing.interleaved``) times, for every runtime, the
    dynamic model and each routed sub-network as a static network (``ServingModel.static_network``), plus the
    eager static networks (the reference: ``model.extract(k, inplace=True)``). Reported per runtime: ms, the
    speed-up over the widest routed network in the same runtime and over the eager widest (noise rule applied), and the
    time-per-multiply-add ratio of the dynamic model to the static networks it routes to (mix-weighted time over
    mix-weighted MACs; 1.0: routing, grouping and scatter cost nothing). Build time (export, compile) is not
    timed; it is reported as ``build_seconds`` (``compile_seconds``: the compiled warm-up alone).
    """
    log = log or (lambda _msg: None)
    model = model.eval()
    space = list(model.routing_space)
    size = tuple(images.shape[1:])
    subnet_macs = model.subnet_macs(size)
    routing_macs = [float(v) for v in model.routing_macs(size)]
    widest_j = max(range(len(space)), key=lambda j: subnet_macs[space[j]])
    need = max(max(batch_sizes), batch1_images if 1 in batch_sizes else 0)
    if images.shape[0] < need:
        raise ValueError(f"need at least {need} images, got {images.shape[0]}")
    torch_in = images.contiguous(memory_format=torch.channels_last)
    numpy_in = np.ascontiguousarray(images.numpy(), dtype=np.float32)

    servers: dict[str, ServingModel] = {}
    statics: dict[str, dict[int, Callable]] = {}
    build: dict[str, dict[str, Any]] = {}
    check_images = images[: min(256, images.shape[0])]
    for name in runtimes:
        log(f"building {name} ...")
        t0 = time.perf_counter()
        server = build_serving(model, name, threads=threads, compile=compile if name == "compile" else None)
        built = time.perf_counter() - t0
        t0 = time.perf_counter()
        if isinstance(server, SplitServing):  # compiled: only the graphs these batch sizes use
            statics[name] = {j: server.static_network(k, warmup=batch_sizes) for j, k in enumerate(space)}
        else:
            statics[name] = {j: server.static_network(k) for j, k in enumerate(space)}
        static_seconds = time.perf_counter() - t0
        servers[name] = server
        check = check_serving(server, model, check_images, biases=(0.0, 0.5, -0.5))
        build[name] = {
            "describe": server.describe(),
            "build_seconds": built,
            "static_build_seconds": static_seconds,
            "compile_seconds": getattr(server, "compile_seconds", None),
            "compiled_graphs": (getattr(server, "compiled_graphs", None) or [None])[0],
            "batch1_tuning": getattr(server, "batch1_tuning", None),  # onnx: the thread count timed for batch 1
            "check": check,
        }
        log(f"  {server.describe()}: built in {built:.1f} s (+{static_seconds:.1f} s static networks), "
            f"max |diff| vs eager {check['max_abs_diff']:.2e}, routing agrees: {check['routing_agrees']}")  # fmt: skip
    reference = servers.get("eager") or build_serving(model, "eager")
    eager_statics = statics.get("eager") or {j: reference.static_network(k) for j, k in enumerate(space)}

    results = []
    for batch in batch_sizes:
        rounds = repeats if repeats is not None else (15 if batch == 1 else 10)
        if batch == 1:
            t_in, n_in = list(torch_in[:batch1_images].split(1)), list(numpy_in[:batch1_images].reshape(-1, 1, *size))
        else:
            t_in, n_in = [torch_in[:batch]], [numpy_in[:batch]]
        per_call = len(t_in)
        with torch.inference_mode():
            choices = torch.cat([reference.route(x).choice.cpu() for x in t_in])
        counts = torch.bincount(choices, minlength=len(space)).tolist()
        weights = [c / sum(counts) for c in counts]
        fns: dict[str, Callable[[], object]] = {}

        def loop(fn: Callable, inputs: list) -> Callable[[], object]:
            return lambda: [fn(x) for x in inputs]

        def grouped(nets: Mapping[int, Callable], numpy: bool, n: int, routed: Tensor) -> Callable[[], object]:
            """The static networks on the groups the gate routed the first ``n`` images into, each as one batch."""
            parts = []
            for j in range(len(space)):
                rows = (routed == j).nonzero().flatten()
                if rows.numel():
                    x = numpy_in[:n][rows.numpy()] if numpy else torch_in[:n][rows]
                    parts.append((nets[j], x if numpy else x.contiguous(memory_format=torch.channels_last)))
            return lambda: [net(x) for net, x in parts]

        for j in range(len(space)):
            fns[f"reference:static{j}"] = loop(eager_statics[j], t_in)
        if batch > 1:
            fns["reference:grouped"] = grouped(eager_statics, False, batch, choices)
        for name, server in servers.items():
            inputs = n_in if name == "onnx" else t_in
            fns[f"{name}:dynamic"] = loop(server, inputs)
            if name != "eager":
                for j in range(len(space)):
                    fns[f"{name}:static{j}"] = loop(statics[name][j], inputs)
                if batch > 1:
                    fns[f"{name}:grouped"] = grouped(statics[name], name == "onnx", batch, choices)
        log(f"batch {batch}: timing {len(fns)} functions x {rounds} rounds ({per_call} calls each) ...")
        samples = interleaved(fns, rounds, warmup)
        samples = {k: [t / per_call for t in v] for k, v in samples.items()}  # ms per call of `batch` images
        eager_widest = samples[f"reference:static{widest_j}"]
        rows = []
        for name in servers:
            own = "reference" if name == "eager" else name
            dyn = samples[f"{name}:dynamic"]
            static_ms = [summarize(samples[f"{own}:static{j}"]).median for j in range(len(space))]
            widest = samples[f"{own}:static{widest_j}"]
            mean_macs = sum(w * m for w, m in zip(weights, routing_macs))
            static_macs = sum(w * subnet_macs[k] for w, k in zip(weights, space))
            static_time = sum(w * t for w, t in zip(weights, static_ms))
            dyn_ms = summarize(dyn).median
            # each routed group as one batch; at batch 1 the groups are single images: the mix-weighted static time
            grouped_ms = summarize(samples[f"{own}:grouped"]).median if batch > 1 else static_time
            rows.append(
                {
                    "runtime": name,
                    "dynamic_ms": dyn_ms,
                    "dynamic_iqr_ms": summarize(dyn).iqr,
                    "widest_ms": summarize(widest).median,
                    "static_ms": static_ms,
                    "speedup_vs_widest": speedup_claim(widest, dyn).as_dict(),
                    "speedup_vs_eager_widest": speedup_claim(eager_widest, dyn).as_dict(),
                    "time_per_mac_ratio": (dyn_ms / mean_macs) / (static_time / static_macs),
                    "grouped_static_ms": grouped_ms,
                    "time_per_mac_vs_grouped": (dyn_ms / mean_macs) / (grouped_ms / static_macs),
                    "theoretical_speedup": subnet_macs[space[widest_j]] / mean_macs,
                }
            )
        fastest = min(rows, key=lambda r: r["dynamic_ms"])["runtime"]
        results.append(
            {
                "batch_size": batch,
                "calls_per_round": per_call,
                "rounds": rounds,
                "mix": weights,
                "counts": counts,
                "mean_macs": sum(w * m for w, m in zip(weights, routing_macs)),
                "eager_widest_ms": summarize(eager_widest).median,
                "runtimes": rows,
                "fastest": fastest,
            }
        )
    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    return {
        "schema": SCHEMA,
        "machine": {
            "cpu": cpu_name(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "onnxruntime": ort_version,
            "threads": torch.get_num_threads(),
            "load_average_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "allocator": allocator_setting(),
        },
        "routing_space": space,
        "widest_choice": widest_j,
        "subnet_macs": [subnet_macs[k] for k in space],
        "routing_macs": routing_macs,
        "build": build,
        "results": results,
    }


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def format_serving_report(report: dict[str, Any]) -> str:
    """The report as markdown tables, one per batch size."""

    def claim(c: dict[str, Any]) -> str:
        return f"{c['speedup']:.2f}x" + ("" if c["clear"] else "?")

    lines = [
        f"Serving paths ({report['machine']['cpu']}, {report['machine']['threads']} threads, "
        f"torch {report['machine']['torch']}, onnxruntime {report['machine']['onnxruntime']}, "
        f"{report['machine'].get('allocator', 'unrecorded')} allocator)",
        "",
    ]
    for res in report["results"]:
        mix = "/".join(f"{w:.2f}" for w in res["mix"])
        lines += [
            f"Batch {res['batch_size']} (routing mix {mix}, {res['rounds']} interleaved rounds; "
            f"eager widest {res['eager_widest_ms']:.3f} ms per call):",
            "",
            "| runtime | dynamic ms | widest ms (same runtime) | speed-up vs widest | vs eager widest "
            "| time/MAC vs its statics | time/MAC vs its routed groups | build |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for row in res["runtimes"]:
            b = report["build"][row["runtime"]]
            built = f"{b['build_seconds']:.1f} s"
            if b.get("compiled_graphs"):
                built += f", {b['compiled_graphs']} graphs compiled in {b['compile_seconds']:.1f} s"
            lines.append(
                f"| {row['runtime']} | {row['dynamic_ms']:.3f} | {row['widest_ms']:.3f} | "
                f"{claim(row['speedup_vs_widest'])} | {claim(row['speedup_vs_eager_widest'])} | "
                f"{row['time_per_mac_ratio']:.2f}x | {_ratio(row.get('time_per_mac_vs_grouped'))} | {built} |"
            )
        lines += ["", f"Fastest dynamic model at batch {res['batch_size']}: {res['fastest']}", ""]
    lines.append("? = too noisy to claim (per-round ratio quartiles straddle 1, or fewer than 5 rounds)")
    lines.append(
        "time/MAC vs its statics: each static network on the whole batch, mix-weighted; vs its routed groups: "
        "the static networks on the groups the gate made, each group as one batch (at batch 1 the two agree)"
    )
    return "\n".join(lines)
