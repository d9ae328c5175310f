"""``dsnet bench --onnx``: the exported dynamic bundle against its widest routed sub-network alone, in ONNX Runtime.

The bundle (``dsnet.export.OnnxDynamicModel``: pre-gate graph, one graph per
routing choice) is timed on the same forced routing mix as the eager dynamic
model, interleaved with the widest routed sub-network's static graph, every
session with the same intra-op threads and options (no spinning, sequential;
see ``dsnet.export.onnx.ort_session``). At batch 1 a round runs a cycle of
single-image calls over the mix, as the eager measurement does.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from dsnet.bench.routing import mix_choices, mix_counts
from dsnet.bench.timing import interleaved, speedup_claim, summarize
from dsnet.models.base import DynamicNet

__all__ = ["export_bench_bundle", "bench_onnx_dynamic"]


def export_bench_bundle(
    model: DynamicNet, folder: str | os.PathLike, input_size: Sequence[int], threads: int | None
) -> Any:
    """Export ``model``'s dynamic bundle into ``folder`` and open it (``OnnxDynamicModel``)."""
    from dsnet.export.onnx import OnnxDynamicModel, export_dynamic

    manifest = export_dynamic(model, os.path.join(folder, "dynamic.onnx"), input_size)
    return OnnxDynamicModel(manifest, threads)


def bench_onnx_dynamic(
    bundle: Any,
    widest_session: Any,
    images: np.ndarray,
    *,
    mix: Sequence[float],
    choice_macs: Sequence[float],
    widest_macs: int,
    repeats: int,
    warmup: int,
    cycle: int,
    seed: int = 0,
) -> dict[str, Any]:
    """Time the bundle on a forced mix against ``widest_session`` (the widest routed sub-network's graph).

    ``choice_macs``: each routing choice's MACs per sample, routing head included (``DynamicNet.routing_macs``:
    in exit mode every choice pays the slimmest); ``widest_macs``: the widest routed sub-network's.
    """
    batch = images.shape[0]
    images = np.ascontiguousarray(images, dtype=np.float32)
    choices = mix_choices(mix, batch * cycle, seed=seed).numpy()
    counts = mix_counts(mix, batch * cycle)

    def dynamic() -> object:
        out = None
        for c in range(cycle):
            out = bundle(images, choice=choices[c * batch : (c + 1) * batch])
        return out

    samples = interleaved(
        {"onnx_dynamic": dynamic, "onnx_widest": lambda: widest_session.run(None, {"input": images})},
        repeats,
        warmup,
    )
    samples["onnx_dynamic"] = [t / cycle for t in samples["onnx_dynamic"]]
    stats = {name: summarize(ts) for name, ts in samples.items()}
    weights = [c / sum(counts) for c in counts]
    mean_macs = sum(w * m for w, m in zip(weights, choice_macs))
    claim = speedup_claim(samples["onnx_widest"], samples["onnx_dynamic"])
    options = bundle.pre.get_session_options()
    theoretical = widest_macs / mean_macs
    return {
        "latency_ms": stats["onnx_dynamic"].median,
        "latency_iqr_ms": stats["onnx_dynamic"].iqr,
        "widest_ms": stats["onnx_widest"].median,
        "widest_iqr_ms": stats["onnx_widest"].iqr,
        "real_speedup": claim.speedup,
        "real_speedup_claim": claim.as_dict(),
        "theoretical_speedup": theoretical,
        "efficiency": claim.speedup / theoretical,
        "mean_macs": mean_macs,
        "mix": weights,
        "counts": counts,
        "samples_per_call": batch,
        "calls_per_cycle": cycle,
        "session": {
            "intra_op_threads": options.intra_op_num_threads,
            "allow_spinning": options.get_session_config_entry("session.intra_op.allow_spinning"),
            "sessions": 1 + len(bundle.post),
        },
    }
