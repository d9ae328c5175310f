"""``dsnet bench``: sliced vs extracted vs zero-masked vs dynamic, measured side by side.

For every batch size, one interleaved timing loop covers, per sub-network
``k``: the sliced model ``model(x, subnet=k)``, the extracted static network
``model.extract(k, inplace=True)`` (as fast as the sliced model's cached
plan), the zero-masking baseline (full width of the widest
routed sub-network, channels beyond ``k`` masked), optionally the static
network in ONNX Runtime; plus the shared pre-gate part and the dynamic model
on a forced routing mix. From the medians it derives

* ``sliced_vs_static``: the cost of slicing itself (1.0 = none);
* ``real_speedup``: widest routed sub-network's latency / ``k``'s, and
  ``slicing_efficiency`` = real speed-up / theoretical MAC reduction;
* the dynamic model's latency against the mix-weighted prediction
  ``pre + sum_j w_j (static_j - pre)``, i.e. gate, grouping and scatter overhead.

Inputs are channels-last on CPU by default (measured faster for these models
on oneDNN; see docs/benchmarks.md "Methodology"); every method gets the same tensor.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from dsnet.bench.masking import ZeroMaskBaseline
from dsnet.bench.onnx_bundle import bench_onnx_dynamic, export_bench_bundle
from dsnet.bench.routing import mix_choices, mix_counts
from dsnet.bench.timing import interleaved, speedup_claim, summarize
from dsnet.models.base import DynamicNet
from dsnet.utils.allocator import allocator_setting
from dsnet.utils.latency import cpu_name
from dsnet.utils.table import format_table

__all__ = ["SCHEMA", "BenchConfig", "default_mix", "run_benchmark", "format_report", "cpu_name"]

SCHEMA = "dsnet-bench-v1"
BATCH1_CYCLE = 10  # batch-1 dynamic latency: a cycle of this many single-image calls over the mix


@dataclass
class BenchConfig:
    """What to measure. ``repeats=None`` picks 30 rounds at batch 1 and 7 at larger batches."""

    batch_sizes: list[int] = field(default_factory=lambda: [1, 32])
    threads: int | None = None
    device: str = "cpu"
    subnets: list[int] | None = None  # default: the routing space
    mix: list[float] | None = None  # default: default_mix(routing space)
    repeats: int | None = None
    warmup: int = 2
    input_size: tuple[int, ...] | None = None
    channels_last: bool | None = None  # None: on for CPU
    masked: bool = True
    dynamic: bool = True
    onnx: bool = False
    seed: int = 0

    def repeats_for(self, batch: int) -> int:
        return self.repeats if self.repeats is not None else (30 if batch == 1 else 7)


def default_mix(n: int) -> list[float]:
    """40/30/20/10 % for a four-way routing space, uniform otherwise."""
    return [0.4, 0.3, 0.2, 0.1] if n == 4 else [1.0 / n] * n


def _stats(samples: list[float]) -> dict[str, float | int]:
    return summarize(samples).as_dict()


def run_benchmark(
    model: DynamicNet,
    config: BenchConfig,
    model_name: str | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure ``model`` as ``config`` says; returns the report (the ``--json`` schema, see docs/benchmarks.md)."""
    log = log or (lambda _msg: None)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device")
    model = model.to(device).eval()
    space = list(model.routing_space)
    subnets = sorted(set(config.subnets if config.subnets is not None else space))
    for k in subnets:
        model.check_subnet(k)
    input_size = tuple(config.input_size or model.default_input_size)
    macs = model.subnet_macs(input_size)
    widest = max(space, key=lambda k: macs[k])
    measured = sorted(set(subnets) | {widest})
    mix = list(config.mix) if config.mix is not None else default_mix(len(space))
    if len(mix) != len(space):
        raise ValueError(f"--mix needs one fraction per routing choice ({len(space)}), got {len(mix)}")
    channels_last = device.type == "cpu" if config.channels_last is None else config.channels_last
    if config.masked and getattr(model, "idle_slicing", False):
        # a zero mask cannot express idle slicing (a slim block adds to a prefix of a full-width stream)
        log("zero-masking baseline skipped: not defined for ViT dynamic idle slicing")
        config = dataclasses.replace(config, masked=False)
    statics = {k: model.extract(k, inplace=True).eval() for k in measured}  # as fast as the plans

    onnx_sessions: dict[int, Any] = {}
    onnx_bundle = None
    tmp = None
    if config.onnx:
        from dsnet.export.onnx import export_static, ort_session

        tmp = tempfile.TemporaryDirectory(prefix="dsnet-bench-")
        for k in measured:
            log(f"exporting sub-network {k} to ONNX")
            path = export_static(model, k, os.path.join(tmp.name, f"subnet{k}.onnx"), input_size)
            onnx_sessions[k] = ort_session(path, config.threads)
        if config.dynamic:
            log("exporting the dynamic bundle to ONNX")
            onnx_bundle = export_bench_bundle(model, tmp.name, input_size, config.threads)

    report: dict[str, Any] = {
        "schema": SCHEMA,
        "model": model_name or type(model).__name__,
        "input_size": list(input_size),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "threads": torch.get_num_threads(),
        "allocator": allocator_setting(),
        "torch": torch.__version__,
        "channels_last": channels_last,
        "routing_space": space,
        "subnets": measured,
        "widest_routed": widest,
        "mix": mix,
        "macs": {str(k): macs[k] for k in measured},
        "results": [],
    }
    gen = torch.Generator().manual_seed(config.seed)
    try:
        for batch in config.batch_sizes:
            x = torch.randn(batch, *input_size, generator=gen).to(device)
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            result = _bench_batch(model, statics, onnx_sessions, x, measured, widest, mix, macs, config, device, log)
            if onnx_bundle is not None:
                log(f"batch {len(x)}: ONNX dynamic bundle vs widest routed sub-network, interleaved")
                result["onnx_dynamic"] = bench_onnx_dynamic(
                    onnx_bundle,
                    onnx_sessions[widest],
                    x.detach().cpu().contiguous().numpy(),
                    mix=mix,
                    choice_macs=model.routing_macs(input_size).tolist(),
                    widest_macs=macs[widest],
                    repeats=config.repeats_for(len(x)),
                    warmup=config.warmup,
                    cycle=BATCH1_CYCLE if len(x) == 1 else 1,
                    seed=config.seed,
                )
            report["results"].append(result)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return report


def _bench_batch(
    model: DynamicNet,
    statics: dict[int, torch.nn.Module],
    onnx_sessions: dict[int, Any],
    x: Tensor,
    measured: Sequence[int],
    widest: int,
    mix: Sequence[float],
    macs: Sequence[int],
    config: BenchConfig,
    device: torch.device,
    log: Callable[[str], None],
) -> dict[str, Any]:
    batch = x.shape[0]
    space = model.routing_space
    fns: dict[str, Callable[[], object]] = {}
    for k in measured:
        fns[f"sliced/{k}"] = lambda k=k: model(x, subnet=k)
        fns[f"static/{k}"] = lambda k=k: statics[k](x)
        if config.masked:
            baseline = ZeroMaskBaseline(model, k, x, wide=widest)
            fns[f"masked/{k}"] = lambda b=baseline: b(x)
        if k in onnx_sessions:
            x_np = x.detach().cpu().contiguous().numpy()
            fns[f"onnx/{k}"] = lambda k=k, x_np=x_np: onnx_sessions[k].run(None, {"input": x_np})

    dynamic: dict[str, Any] | None = None
    cycle = BATCH1_CYCLE if batch == 1 else 1
    if config.dynamic:
        choices = mix_choices(mix, batch * cycle, seed=config.seed)
        counts = mix_counts(mix, batch * cycle)

        def pre() -> object:
            h, z = model.forward_pre(x, space[0])
            return model.gate_logits(h, z)  # the real head (and, in exit mode, the slimmest): never forced

        fns["pre_gate"] = pre
        if model.gate_mode == "exit":  # every sample pays the slimmest; a wider choice adds its post-gate part
            fns["pre_part"] = lambda: model.forward_pre(x, space[0])

        def dyn() -> object:
            for _ in range(cycle):
                out = model(x)
            return out

        fns["dynamic"] = dyn
        if all(k in statics for k in space):
            # the issue-20 baseline: the extracted static network of each routing choice on the images routed to
            # it, each group as one batch (made ahead, untimed; batch 1: the cycle of single images, one by one)
            if batch == 1:
                calls = [(int(j), x) for j in choices]
            else:
                calls = []
                for j in range(len(space)):
                    rows_j = (choices == j).nonzero().flatten()
                    if rows_j.numel():
                        group = x.index_select(0, rows_j.to(x.device))
                        if x.dim() == 4 and not x.is_contiguous():  # channels-last input: groups the same
                            group = group.contiguous(memory_format=torch.channels_last)
                        calls.append((j, group))
            grouped_counts = [sum(g.shape[0] for j, g in calls if j == i) for i in range(len(space))]
            grouped_nets = [(statics[space[j]], g) for j, g in calls]

            def grouped() -> object:
                return [net(g) for net, g in grouped_nets]

            fns["grouped_static"] = grouped

    repeats = config.repeats_for(batch)
    log(f"batch {batch}: {len(fns)} methods x {repeats} interleaved rounds")
    with torch.inference_mode():
        if config.dynamic:
            with model.forced_routing(choices, batch):
                samples = interleaved(fns, repeats, config.warmup, device)
        else:
            samples = interleaved(fns, repeats, config.warmup, device)
    if config.dynamic:
        for name in ("dynamic", "grouped_static"):
            if name in samples:
                samples[name] = [t / cycle for t in samples[name]]
    methods = {name: _stats(ts) for name, ts in samples.items()}

    def med(name: str) -> float | None:
        return methods[name]["median"] if name in methods else None

    rows = []
    for k in measured:
        theo = macs[widest] / macs[k]
        sliced, static = med(f"sliced/{k}"), med(f"static/{k}")
        real = med(f"sliced/{widest}") / sliced
        static_real = med(f"static/{widest}") / static
        rows.append(
            {
                "subnet": k,
                "macs": macs[k],
                "theoretical_speedup": theo,
                "sliced_ms": sliced,
                "static_ms": static,
                "masked_ms": med(f"masked/{k}"),
                "onnx_ms": med(f"onnx/{k}"),
                "sliced_vs_static": sliced / static,
                "real_speedup": real,
                "real_speedup_claim": _claim(samples, f"sliced/{widest}", f"sliced/{k}", k == widest),
                "slicing_efficiency": real / theo,
                "static_real_speedup": static_real,
                "static_real_speedup_claim": _claim(samples, f"static/{widest}", f"static/{k}", k == widest),
                "static_efficiency": static_real / theo,
                "throughput_img_s": batch / (sliced / 1e3),
            }
        )
    result: dict[str, Any] = {"batch_size": batch, "repeats": repeats, "methods": methods, "per_subnet": rows}
    if config.dynamic:
        pre_ms = med("pre_gate")
        total = sum(counts)
        weights = [c / total for c in counts]
        missing = [k for k in space if f"static/{k}" not in methods]
        part_ms = med("pre_part")  # exit mode: the pre-gate part alone (pre_ms adds the slimmest and the head)
        if missing:
            predicted = None
        elif part_ms is None:  # the paper's gate: the shared part, then each sample's own post-gate part
            predicted = pre_ms + sum(w * (med(f"static/{k}") - pre_ms) for w, k in zip(weights, space))
        else:  # exit: everyone the slimmest and the decision, a wider choice its post-gate part on top
            predicted = pre_ms + sum(w * (med(f"static/{k}") - part_ms) for w, k in zip(weights[1:], space[1:]))
        dyn_ms = med("dynamic")
        # the claim that matters: real speed-up over the widest routed sub-network vs the MAC reduction
        choice_macs = model.routing_macs(tuple(x.shape[1:])).tolist()  # per choice, routing head (and exit) included
        mean_macs = sum(w * m for w, m in zip(weights, choice_macs))
        widest_ms = med(f"sliced/{widest}")
        dynamic = {
            "mean_macs": mean_macs,
            "theoretical_speedup": macs[widest] / mean_macs,
            "real_speedup": None if widest_ms is None else widest_ms / dyn_ms,
            "real_speedup_claim": _claim(samples, f"sliced/{widest}", "dynamic", widest_ms is None),
            "efficiency": None if widest_ms is None else (widest_ms / dyn_ms) / (macs[widest] / mean_macs),
            "mix": weights,
            "counts": counts,
            "samples_per_call": batch,
            "calls_per_cycle": cycle,
            "latency_ms": dyn_ms,
            "pre_gate_ms": pre_ms,
            "pre_part_ms": part_ms,
            "gate_mode": model.gate_mode,
            "predicted_ms": predicted,
            "vs_predicted": None if predicted is None else dyn_ms / predicted,
            "overhead_ms": None if predicted is None else dyn_ms - predicted,
            "throughput_img_s": batch / (dyn_ms / 1e3),
        }
        grouped_ms = med("grouped_static")
        if grouped_ms is not None:
            # MACs per call: the routed mix's (routing head, and in exit mode the slimmest, included) against the
            # static networks' own on the same groups; time per MAC of the one over the other's
            grouped_macs = sum(c * macs[k] for c, k in zip(counts, space)) / cycle
            dyn_macs = mean_macs * batch
            dynamic["grouped_static_ms"] = grouped_ms
            dynamic["grouped_static_macs"] = grouped_macs
            dynamic["grouped_static_counts"] = grouped_counts
            dynamic["per_mac_vs_grouped_static"] = (dyn_ms / dyn_macs) / (grouped_ms / grouped_macs)
            dynamic["vs_grouped_static_claim"] = _claim(samples, "grouped_static", "dynamic", False)
        result["dynamic"] = dynamic
    return result


def _claim(samples: dict[str, list[float]], reference: str, method: str, skip: bool) -> dict[str, Any] | None:
    """The noise rule (``dsnet.bench.timing.speedup_claim``) for ``method`` against ``reference``."""
    if skip or reference not in samples or method not in samples:
        return None
    return speedup_claim(samples[reference], samples[method]).as_dict()


def _speedup(value: float, claim: dict[str, Any] | None) -> str:
    """``1.85x``; ``1.03x?`` when the rounds do not agree enough to claim it."""
    return f"{value:.2f}x" + ("?" if claim is not None and not claim["clear"] else "")


NOISY_NOTE = (
    "? = too noisy to claim: fewer than 3 in 4 interleaved rounds agree on which is faster "
    "(the per-round ratios' quartiles straddle 1; see docs/benchmarks.md)"
)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _noise_suffix(claim: dict[str, Any] | None) -> str:
    if claim is None or claim["clear"]:
        return ""
    return (
        f" -- too noisy to claim (per-round ratios {claim['ratio_q1']:.2f}-{claim['ratio_q3']:.2f} "
        f"over {claim['rounds']} rounds)"
    )


def format_report(report: dict[str, Any]) -> str:
    """Console tables, one per batch size."""
    out = [
        f"{report['model']} at {'x'.join(map(str, report['input_size']))} on {report['device_name']} "
        f"({report['device']}, {report['threads']} threads, channels_last={report['channels_last']}"
        + (f", {report['allocator']} allocator" if report.get("allocator") else "")
        + "); "
        f"widest routed sub-network #{report['widest_routed']}; medians in ms"
    ]
    for res in report["results"]:
        rows = []
        for r in res["per_subnet"]:
            iqr = res["methods"][f"sliced/{r['subnet']}"]["iqr"]
            rows.append(
                [
                    r["subnet"],
                    round(r["macs"] / 1e6, 1),
                    f"{_ms(r['sliced_ms'])} ±{iqr / 2:.2f}",
                    _ms(r["static_ms"]),
                    f"{r['sliced_vs_static']:.3f}",
                    _ms(r["masked_ms"]),
                    _ms(r["onnx_ms"]),
                    f"{r['theoretical_speedup']:.2f}x",
                    _speedup(r["real_speedup"], r.get("real_speedup_claim")),
                    f"{r['slicing_efficiency']:.2f}",
                    round(r["throughput_img_s"], 1),
                ]
            )
        headers = [
            "subnet", "MMACs", "sliced (±IQR/2)", "static", "sliced/static", "masked", "onnx",
            "MAC red.", "real", "efficiency", "img/s",
        ]  # fmt: skip
        out.append("")
        out.append(format_table(headers, rows, title=f"batch {res['batch_size']} ({res['repeats']} rounds)"))
        noisy = [r for r in res["per_subnet"] if r.get("real_speedup_claim") and not r["real_speedup_claim"]["clear"]]
        if noisy:
            out.append(NOISY_NOTE)
        dyn = res.get("dynamic")
        if dyn:
            mix = "/".join(f"{w:.2f}" for w in dyn["mix"])
            vs = "-" if dyn["vs_predicted"] is None else f"{dyn['vs_predicted']:.3f}"
            out.append(
                f"dynamic, mix {mix}: {dyn['latency_ms']:.2f} ms per batch of {dyn['samples_per_call']} "
                f"vs predicted {_ms(dyn['predicted_ms'])} (ratio {vs}; "
                + (
                    f"pre-gate part {dyn['pre_part_ms']:.2f} ms, with the slimmest and the exit head "
                    f"{dyn['pre_gate_ms']:.2f} ms)"
                    if dyn.get("pre_part_ms") is not None
                    else f"pre-gate part {dyn['pre_gate_ms']:.2f} ms)"
                )
            )
            if dyn.get("grouped_static_ms") is not None:
                out.append(
                    f"dynamic vs the static networks it routes to, each group as one batch: "
                    f"{dyn['grouped_static_ms']:.2f} ms for {dyn['grouped_static_macs'] / 1e6:.1f} MMACs per call; "
                    f"time per MAC {dyn['per_mac_vs_grouped_static']:.3f}x theirs"
                )
            if dyn.get("real_speedup") is not None:
                out.append(
                    f"dynamic vs widest routed: {dyn['real_speedup']:.2f}x real for {dyn['theoretical_speedup']:.2f}x "
                    f"fewer MACs (efficiency {dyn['efficiency']:.2f}){_noise_suffix(dyn.get('real_speedup_claim'))}"
                )
        onnx = res.get("onnx_dynamic")
        if onnx:
            out.append(
                f"ONNX Runtime dynamic bundle ({onnx['session']['sessions']} sessions, "
                f"{onnx['session']['intra_op_threads']} threads, no spinning): {onnx['latency_ms']:.2f} ms per batch "
                f"of {onnx['samples_per_call']} vs widest routed alone {onnx['widest_ms']:.2f} ms -> "
                f"{onnx['real_speedup']:.2f}x real for {onnx['theoretical_speedup']:.2f}x fewer MACs"
                f"{_noise_suffix(onnx['real_speedup_claim'])}"
            )
    return "\n".join(out)
