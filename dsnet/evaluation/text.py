"""An evaluation report as console text: the tables ``dsnet eval`` prints, and the few-line summary.

The library returns the report (a dict, :func:`dsnet.evaluation.evaluate`); this turns it into text for
``dsnet eval`` and the quickstart's final screen, which both print it.
"""

from __future__ import annotations

from typing import Any

from dsnet.evaluation.stats import top1_interval
from dsnet.utils.table import format_table

__all__ = ["format_report", "format_summary"]


def _gate_label(report: dict[str, Any]) -> str:
    """Dynamic inference's label: "trained gate", unless a stage I checkpoint (its gate head never trained)."""
    if report.get("checkpoint_stage") == "supernet":
        return "untrained gate: a supernet checkpoint, run `dsnet train gate`"
    return "trained gate"


def _pm(value: float, pm: float | None, signed: bool = False) -> str:
    """``value ±pm`` (the 95% half-width; reports of an older dsnet have none: the value alone)."""
    text = f"{value:+.2f}" if signed else f"{value:.2f}"
    return text if pm is None else f"{text} ±{pm:.2f}"


def _count_pm(top1: float, n: int) -> float:
    """The 95% Wilson half-width of a top-1 (%) measured on ``n`` images."""
    return top1_interval(round(top1 * n / 100.0), n).half_width


def _pct(fractions: list[float]) -> str:
    return " / ".join(f"{100 * f:.0f}" for f in fractions)


def format_report(report: dict[str, Any]) -> str:
    """The report as console tables: static sub-networks, dynamic routing (overall and per class), the sweep."""
    k = report["top5_k"]
    choices = report["routing_choices"]
    size = "x".join(str(v) for v in report["input_size"])
    ds = report["dataset"]
    out = []
    rows = [
        [
            s["index"],
            " ".join(f"{n}={w}" for n, w in s["widths"].items()),
            round(s["macs"] / 1e6, 2),
            _pm(s["top1"], s.get("top1_pm95")),
            round(s["top5"], 2),
            "gate choice" if s["in_routing_space"] else ("routed" if s["routed"] else "training only"),
        ]
        for s in report["static"]
    ]
    title = f"{report['model']['name']} on {ds['name']} {ds['split']} ({ds['num_samples']} images, {size})"
    title += "; ± = 95% interval"
    out.append(format_table(["#", "widths", "MMACs", "top-1 %", f"top-{k} %", "role"], rows, title=title))

    dyn = report["dynamic"]
    rows = [
        [c["choice"], c["subnet"], round(c["macs"] / 1e6, 2), n, round(100 * f, 1)]
        for c, n, f in zip(choices, dyn["histogram"]["counts"], dyn["histogram"]["fractions"])
    ]
    title = (
        f"dynamic ({_gate_label(report)}, b=0): "
        f"top-1 {_pm(dyn['top1'], dyn.get('top1_pm95'))}%, top-{k} {dyn['top5']:.2f}%, "
        f"mean {dyn['mean_macs'] / 1e6:.2f} MMACs per sample"
    )
    out.append(format_table(["choice", "subnet", "MMACs (+gate)", "samples", "%"], rows, title="\n" + title))

    if len(dyn["per_class"]) <= 20:
        rows = [[c["name"], c["count"], _pct(c["histogram"]["fractions"])] for c in dyn["per_class"]]
        head = "% per choice (" + " / ".join(f"#{c['subnet']}" for c in choices) + ")"
        out.append(format_table(["class", "samples", head], rows, title="\nrouting per class"))
    else:
        out.append(f"\n(routing per class for {len(dyn['per_class'])} classes: see the JSON report)")

    rows = [
        [
            f"{p['bias']:+.4g}",
            _pm(p["top1"], p.get("top1_pm95")),
            round(p["top5"], 2),
            round(p["mean_macs"] / 1e6, 2),
            _pm(p["top1"] - p["static_top1_at_macs"], p.get("gain_over_static_pm95"), signed=True),
            _pm(p["top1"] - p["cascade_top1_at_macs"], p.get("gain_over_cascade_pm95"), signed=True),
            _pct(p["histogram"]["fractions"]),
        ]
        for p in report["sweep"]
    ]
    out.append(
        format_table(
            ["bias", "top-1 %", f"top-{k} %", "mean MMACs", "vs static", "vs cascade", "% per choice"],
            rows,
            title="\ngate-bias sweep (gate bias = b * " + str([round(r, 3) for r in report["bias_ramp"]]) + ")",
        )
    )
    rows = [
        [
            f"{c['threshold']:.3f}",
            _pm(c["top1"], _count_pm(c["top1"], ds["num_samples"])),
            round(c["mean_macs"] / 1e6, 2),
            round(100 * c["escalated"], 1),
        ]
        for c in report["baselines"]["cascade"]
    ]
    out.append(
        format_table(
            ["threshold", "top-1 %", "mean MMACs", "% escalated"],
            rows,
            title="\nconfidence cascade (no training): slimmest, then the widest when its max softmax < threshold",
        )
    )
    out.append("\n" + format_summary(report))
    return "\n".join(out)


def format_summary(report: dict[str, Any]) -> str:
    """The gate against every baseline at its own MACs, in a few lines (eval and the quickstart print it)."""
    s = report["summary"]
    w = s["widest_routed"]
    rnd = s["random_router"]
    bias = report["model"].get("budget_bias")
    capture = s["oracle_capture"]
    lines = [
        f"gate mode {report.get('gate_mode', 'pre')!r}; stored budget bias "
        + ("none" if bias is None else "[" + ", ".join(f"{b:+.3f}" for b in bias) + "]"),
        f"widest routed #{w['index']}: top-1 {_pm(w['top1'], w.get('top1_pm95'))}% at {w['macs'] / 1e6:.2f} MMACs; "
        f"dynamic ({_gate_label(report)}): {_pm(s['dynamic_top1'], s.get('dynamic_top1_pm95'))}% at "
        f"{s['dynamic_mean_macs'] / 1e6:.2f} MMACs ({s['mac_reduction']:.2f}x fewer MACs); ± = 95% interval",
        f"at {s['dynamic_mean_macs'] / 1e6:.2f} MMACs: gate {s['dynamic_top1']:.2f}% | static curve "
        f"{s['static_top1_at_dynamic_macs']:.2f}% "
        f"({_pm(s['top1_gain_at_equal_macs'], s.get('top1_gain_at_equal_macs_pm95'), signed=True)})"
        + (" [outside the static range: clamped]" if s["interpolation_clamped"] else "")
        + f" | cascade {s['cascade_top1_at_dynamic_macs']:.2f}% "
        f"({_pm(s['gain_over_cascade'], s.get('gain_over_cascade_pm95'), signed=True)})"
        f" | oracle {s['oracle_top1_at_dynamic_macs']:.2f}%"
        + ("; margins: paired 95% intervals" if "top1_gain_at_equal_macs_pm95" in s else ""),
        f"random router with the gate's mix: {rnd['top1']:.2f}% at {rnd['mean_macs'] / 1e6:.2f} MMACs; "
        "share of the oracle's gain over the static curve the gate captures: "
        + ("n/a" if capture is None else f"{100 * capture:.0f}%"),
    ]
    routing = report.get("routing")
    if routing:  # which widths the knob can reach at all (dsnet.evaluation.reachability)
        subnets = [c["subnet"] for c in report["routing_choices"]]
        shares = " / ".join(f"#{k} {100 * f:.0f}%" for k, f in zip(subnets, routing["reachable_fraction"]))
        lines.append(f"router {routing['router']!r}: images each choice wins at some bias b: {shares}")
    worst_static, worst_cascade = s["sweep_min_gain_over_static"], s["sweep_min_gain_over_cascade"]
    if worst_static is not None:
        lines.append(
            f"along the sweep (points inside the static range): worst margin over the static curve "
            f"{_pm(worst_static, s.get('sweep_min_gain_over_static_pm95'), signed=True)}, over the cascade "
            f"{_pm(worst_cascade, s.get('sweep_min_gain_over_cascade_pm95'), signed=True)} points"
        )
    return "\n".join(lines)
