"""``compare.md``, the console summary and ``compare.png`` of a comparison (see :mod:`dsnet.compare.run`)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from dsnet.utils.io import atomic_write_bytes
from dsnet.utils.table import format_table

__all__ = ["render_markdown", "render_screen", "plot_compare"]

_COLORS = {
    "dsnet": "tab:red",
    "static": "tab:blue",
    "cascade": "tab:purple",
    "usnet": "tab:green",
    "alone": "tab:gray",
    "pss": "tab:orange",
    "pss_gate": "tab:brown",
    "pss_uniform": "tab:olive",
    "pss_uniform_gate": "tab:cyan",
}


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _impl(p: dict[str, Any], key: str) -> str:
    """`` (mask)``: the implementation timed, for points timed in several exact ones (LC-Net's channel modes)."""
    return f" ({p[key]})" if p.get(key) else ""


def _passes(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for p in sorted(result["points"], key=lambda p: (result["methods"].index(p["method"]), p["mmacs"])):
        top1 = _fmt(p["top1"]) + (f" ± {p['top1_std']:.2f}" if "top1_std" in p else "")
        rows.append(
            [
                p["method"],
                p["name"],
                top1,
                _fmt(p["mmacs"]),
                _fmt(p["latency_ms_b1"], 3) + _impl(p, "impl_b1"),
                _fmt(p["latency_ms_batch"], 1) + _impl(p, "impl_batch"),
                _fmt(p["train_seconds"], 0),
                _passes(p.get("train_fwd_bwd")),
            ]
        )
    return rows


def _headers(result: dict[str, Any]) -> list[str]:
    b = result["timing"]["batch_size"]
    return ["method", "point", "top-1 %", "MMACs", "ms/image (batch 1)", f"ms (batch {b})", "train s", "train passes"]


def _claim_lines(result: dict[str, Any]) -> list[str]:
    lines = []
    for name, c in result["claims"].items():
        line = (
            f"{name}: {c['method']} - {c['reference']} at equal MACs: mean {c['mean']:+.2f}, max {c['max']:+.2f}, "
            f"min {c['min']:+.2f} points over {c['points']} point(s)  [{c['claim']}]"
        )
        if c.get("differs"):
            line += f"; differs: {c['differs']}"
        if c.get("warning"):
            line += f"  **{c['warning']}**"
        lines.append(line)
    return lines


def _chance_lines(result: dict[str, Any]) -> list[str]:
    """One warning line per method near chance (``result["near_chance"]``; results of an older dsnet have none)."""
    return [w["warning"] for w in (result.get("near_chance") or {}).values()]


def _compute_lines(result: dict[str, Any]) -> list[str]:
    """The training compute table (markdown): passes and seconds per method, and how each stage was counted."""
    compute = result.get("train_compute") or {}
    lines = [
        "| method | train s | fwd+bwd passes | forward-only passes | stages (shared ones included) |",
        "|---|---|---|---|---|",
    ]
    for m, s in result["train_seconds"].items():
        c = compute.get(m)
        if c is None:
            lines.append(f"| {m} | {_fmt(s, 0)} | - | - | - |")
            continue
        how = "; ".join(f"{k}: {v['how']}" for k, v in c["stages"].items())
        lines.append(f"| {m} | {_fmt(s, 0)} | {_passes(c['fwd_bwd'])} | {_passes(c['fwd_only'])} | {how} |")
    batch = {v["batch_size"] for c in compute.values() if c for v in c["stages"].values()}
    lines += [
        "",
        "A pass is one sub-network's forward (and backward) over one training batch"
        + (f" of {', '.join(map(str, sorted(batch)))} images" if batch else "")
        + " (a sandwich step of 4 sub-networks is 4 passes); forward-only passes are teachers, the frozen supernet "
        "under a gate and the search's held-out evaluations (in training-batch equivalents). BN recalibration and "
        "per-epoch selection evaluations are not counted.",
    ]
    for m, n in (result.get("notes") or {}).items():
        lines.append(f"- {m}: " + ", ".join(f"{k} {v}" for k, v in n.items()))
    return lines


def render_markdown(result: dict[str, Any]) -> str:
    t = result["timing"]
    seeds = result["seeds"]
    lines = [
        f"# dsnet compare: {result['model']} on {result['dataset']['name']}",
        "",
        f"{result['dataset']['train_images']} training images, {result['dataset']['test_images']} test images; "
        f"{'--fast; ' if result['fast'] else ''}seeds {', '.join(map(str, seeds))}"
        + (" (top-1: mean ± std over seeds)" if len(seeds) > 1 else "")
        + f". Timing: {t['threads']} threads, {t['device']}, interleaved, median of {t['repeats']} rounds; "
        f"batch 1 = ms per image over {t['batch1_images']} test images run one at a time. {t['note']}.",
        "",
        "| " + " | ".join(_headers(result)) + " |",
        "|" + "---|" * len(_headers(result)),
    ]
    lines += ["| " + " | ".join(r) + " |" for r in _rows(result)]
    for warning in _chance_lines(result):
        lines += ["", f"**{warning}**"]
    noise = result.get("timing_noise")
    if noise:
        lines += [
            "",
            f"Timing noise floor: {noise['identical_networks']} widths appear in several methods as the same plain "
            f"network; their latencies differ by up to {100 * noise['latency_ms_b1_max_spread']:.0f}% at batch 1 "
            f"(median {100 * noise['latency_ms_b1_median_spread']:.0f}%) and up to "
            f"{100 * noise['latency_ms_batch_max_spread']:.0f}% at batch {t['batch_size']} "
            f"(median {100 * noise['latency_ms_batch_median_spread']:.0f}%). Smaller latency differences are noise.",
        ]
    lines += ["", "## Training compute per method", ""] + _compute_lines(result)
    if result["skipped"]:
        lines += ["", "## Skipped", ""] + [f"- {m}: {why}" for m, why in result["skipped"].items()]
    lines += ["", "## Claims at equal MACs (test split)", ""]
    lines += ["Each claim says what differs between its two methods: one thing is a controlled comparison.", ""]
    lines += [f"- {line}" for line in _claim_lines(result)] or ["- (no pair of methods to compare)"]
    lines += ["", f"Total time: {result['total_seconds']:.0f} s.", ""]
    return "\n".join(lines)


def render_screen(result: dict[str, Any]) -> str:
    lines = [
        "",
        "=" * 100,
        f"dsnet compare: {result['model']} on {result['dataset']['name']} ({result['dataset']['test_images']} test "
        f"images), total {result['total_seconds']:.0f} s",
        "",
        format_table(_headers(result), _rows(result), title="Points (test split)"),
        *_chance_lines(result),
        "",
        "Claims at equal MACs (top-1 points):",
    ]
    lines += [f"  {line}" for line in _claim_lines(result)] or ["  (no pair of methods to compare)"]
    lines += ["=" * 100]
    return "\n".join(lines)


def plot_compare(result: dict[str, Any], path: str | os.PathLike, dpi: int = 110) -> Path:
    """Top-1 vs MMACs, vs batch-1 latency and vs large-batch latency; one line per method. Written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    b = result["timing"]["batch_size"]
    panels = (
        ("mmacs", "MMACs per image"),
        ("latency_ms_b1", "ms per image, batch 1"),
        ("latency_ms_batch", f"ms per batch of {b}"),
    )
    fig = Figure(figsize=(16.0, 5.0))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), sharey=True)
    for ax, (key, label) in zip(axes, panels):
        for method in result["methods"]:
            pts = sorted(
                (p for p in result["points"] if p["method"] == method and p.get(key) is not None), key=lambda p: p[key]
            )
            if not pts:
                continue
            style = "o-" if pts[0]["kind"] == "static" else ".--"
            if key != "mmacs":  # accuracy is not monotone in measured time: markers, no connecting line
                style = "o" if pts[0]["kind"] == "static" else "."
            ax.plot(
                [p[key] for p in pts],
                [p["top1"] for p in pts],
                style,
                color=_COLORS.get(method),
                label=method,
                markersize=5,
            )
            gate = [p for p in pts if p["name"].endswith("(trained gate)")]
            if gate:
                ax.plot([gate[0][key]], [gate[0]["top1"]], "*", color=_COLORS.get(method), markersize=14, mec="k")
        ax.set_xlabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("top-1 accuracy (%), test split")
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle(
        f"{result['model']} on {result['dataset']['name']}"
        f"{' (--fast)' if result['fast'] else ''}: timing with {result['timing']['threads']} threads"
    )
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return atomic_write_bytes(buf.getvalue(), path)
