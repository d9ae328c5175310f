"""Accuracy-vs-compute plot of an evaluation report.

Drawn on a bare ``matplotlib.figure.Figure`` with the Agg canvas rather than
through ``pyplot``: no global backend or figure state is touched, so it works
headless, in threads and inside a notebook alike.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from dsnet.utils.io import atomic_write_bytes

__all__ = ["plot_report"]


def plot_report(report: dict[str, Any], path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write a PNG of top-1 vs MMACs: static sub-networks, the gate's sweep and b=0 point, and the baselines.

    The baselines (confidence cascade, oracle, random router) are drawn when
    the report has them (schema 2).

    Written atomically, so an interrupted run never leaves a truncated image.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()

    routed = sorted((s for s in report["static"] if s["routed"]), key=lambda s: s["macs"])
    ax.plot(
        [s["macs"] / 1e6 for s in routed],
        [s["top1"] for s in routed],
        "o-",
        color="tab:blue",
        label="static sub-networks (routed)",
    )
    for s in routed:
        ax.annotate(
            f"#{s['index']}",
            (s["macs"] / 1e6, s["top1"]),
            textcoords="offset points",
            xytext=(4, -10),
            fontsize=7,
            color="tab:blue",
        )
    extra = [s for s in report["static"] if not s["routed"]]
    if extra:
        ax.plot(
            [s["macs"] / 1e6 for s in extra],
            [s["top1"] for s in extra],
            "s",
            color="tab:gray",
            markersize=7,
            label="largest (training only)",
        )
    sweep = sorted(report["sweep"], key=lambda p: (p["mean_macs"], -p["bias"]))
    ax.plot(
        [p["mean_macs"] / 1e6 for p in sweep],
        [p["top1"] for p in sweep],
        ".-",
        color="tab:orange",
        label="dynamic, gate-bias sweep",
    )
    base = report.get("baselines")
    if base:
        cascade = sorted(base["cascade"], key=lambda p: p["mean_macs"])
        ax.plot(
            [p["mean_macs"] / 1e6 for p in cascade],
            [p["top1"] for p in cascade],
            "^--",
            color="tab:green",
            markersize=4,
            label="confidence cascade (no training)",
        )
        oracle = base["oracle"]
        ax.plot(
            [p["mean_macs"] / 1e6 for p in oracle],
            [p["top1"] for p in oracle],
            ":",
            color="tab:purple",
            label="oracle router (ceiling)",
        )
        rnd = base["random"]
        ax.plot(
            [rnd["mean_macs"] / 1e6], [rnd["top1"]], "x", color="black", markersize=8, label="random router, gate's mix"
        )
    dyn = report["dynamic"]
    gate = "untrained gate" if report.get("checkpoint_stage") == "supernet" else "trained gate"  # stage I checkpoint
    ax.plot(
        [dyn["mean_macs"] / 1e6],
        [dyn["top1"]],
        "*",
        color="tab:red",
        markersize=16,
        markeredgecolor="black",
        label=f"dynamic, {gate} (b=0): {dyn['top1']:.2f}%",
        zorder=5,
    )
    size = "x".join(str(v) for v in report["input_size"][1:])
    ax.set_xlabel(f"MMACs per sample (input {size})")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(
        f"{report['model']['name']} on {report['dataset']['name']} "
        f"({report['dataset']['num_samples']} {report['dataset']['split']} images)"
    )
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return atomic_write_bytes(buf.getvalue(), path)
