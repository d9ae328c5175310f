"""The kernel dimension against width alone, at equal MACs and at equal measured latency (DS-Net++ on Fashion-MNIST).

``ds_mbv2_tiny`` slices widths and depthwise kernels (3 widths x kernels {3, 5, 7}; its gate routes 6 of them,
3x3 or 7x7 at each width); ``ds_mbv2_tiny_width`` is its width-only control (4 widths, 3x3 only, the same MAC
range). Both train with the quickstart recipe (``dsnet.quickstart``, ``--set model.name=...``): the same data,
epochs and schedule, the held-out slice choosing epochs and the gate's operating point, the test split read once
by the recipe's evaluation (the networks each routed sub-network would be trained alone, which the recipe also
trains, come along in the results). One seed per invocation, kept under ``benchmarks/results/``, then merged:

    python benchmarks/kernel_vs_width.py run --model ds_mbv2_tiny --seed 0 --threads 1
    python benchmarks/kernel_vs_width.py run --model ds_mbv2_tiny_width --seed 0 --threads 1
    ...                                                          # seeds 1, 2 of both
    python benchmarks/kernel_vs_width.py latency --threads 2     # on an otherwise idle machine
    python benchmarks/kernel_vs_width.py merge                   # kernel_vs_width.{json,md}, docs/kernel_vs_width.png

Once-for-all's learned kernel transformation against the plain centre crop: ``run --model ds_mbv2_tiny --transform``
(the same recipe with ``model.kwargs={kernel_transform: true}``; files named ``ds_mbv2_tiny_transform``) for the
seeds the plain kernel model has, then ``transform [--fast]``: ``benchmarks/results/kernel_transform[_fast].{json,md}``,
each static sub-network's top-1 with the matrices minus without, per seed, then mean ± std.

``run`` writes ``benchmarks/results/kernel_vs_width_<model>_seed<K>[_fast].json`` (the run folder is
``runs/kvw/<model>_seed<K>[_fast]``; a re-run reuses its finished stages, and a finished run with the same recipe
is not evaluated again). ``latency`` extracts every routed sub-network of both models as a static network with
its BatchNorms folded (the eager split's plain graphs: ``dsnet.export.serving.build_serving(model,
"eager-split").static_network(k)``, as ``benchmarks/serving_paths.py`` times them) and times them all in one
interleaved loop per batch size; weights do not change latency, so a trained checkpoint is used where a ``run``
left one, else a fresh initialisation (the JSON says which). ``merge`` averages the seeds both models have (mean
and sample std), compares each width-only routed point with the kernel model's upper envelope (Pareto front of
its static points, linearly interpolated) at the same MMACs and at the same measured ms per image (batch 1 and
the large batch); points outside the kernel model's range are "out of range", never extrapolated.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from itertools import zip_longest
from pathlib import Path
from typing import Any

RESULTS = Path("benchmarks/results")
PREFIX = "kernel_vs_width"
KERNEL, WIDTH = "ds_mbv2_tiny", "ds_mbv2_tiny_width"
MODELS = (KERNEL, WIDTH)
# the kernel model with once-for-all's learned kernel transformation matrices: ``run --model ds_mbv2_tiny
# --transform`` (files and run folders named by this label), compared with the plain crop by ``transform``
TRANSFORM = f"{KERNEL}_transform"
TRANSFORM_OVERRIDES = ["model.kwargs={kernel_transform: true}"]
TRANSFORM_PREFIX = "kernel_transform"
LATENCY_FILE = f"{PREFIX}_latency.json"
PLOT = Path("docs/kernel_vs_width.png")
# --smoke (hidden): the pipeline end to end in about a minute, numbers meaningless; never into benchmarks/results
SMOKE = [
    "data.train_subset=512",
    "data.holdout=500",
    "data.val_subset=1000",
    "supernet.epochs=1",
    "supernet.bn_calibration_batches=2",
    "gate.epochs=1",
]
SMOKE_DIR = Path("/tmp/kvw_smoke")


# ------------------------------------------------------------------------------------- pure helpers (tested)
def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The upper envelope's knots: ``(cost, accuracy)`` points that no other point dominates, cheapest first.

    A point is dominated when another costs at most as much and is at least as accurate (one of the two strictly);
    of points with equal cost only the most accurate stays. The knots' accuracy increases with cost.
    """
    front: list[tuple[float, float]] = []
    for x, y in sorted(((float(x), float(y)) for x, y in points), key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            if front and x == front[-1][0]:
                continue
            front.append((x, y))
    return front


def envelope_at(points: Sequence[tuple[float, float]], x: float) -> float | None:
    """The upper envelope of ``points`` at cost ``x``: linear between the Pareto front's knots; None out of range.

    The range is the points' cost range, ``[min cost, max cost]``. Past the front's last knot (the most accurate
    point) but inside the range the envelope stays at that accuracy: the dearer points are dominated by it.
    """
    if not points:
        return None
    lo, hi = min(float(p[0]) for p in points), max(float(p[0]) for p in points)
    if not (lo <= x <= hi) or not math.isfinite(x):
        return None
    front = pareto_front(points)
    if x >= front[-1][0]:
        return front[-1][1]
    for (x0, y0), (x1, y1) in zip(front, front[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return front[0][1]  # x == lo: the cheapest point is the front's first knot


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (None for a single value) of per-seed values."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("no values to average")
    return {
        "mean": statistics.fmean(vals),
        "std": statistics.stdev(vals) if len(vals) > 1 else None,
        "n": len(vals),
        "values": vals,
    }


def compare_point(
    x: float | Sequence[float], top1: Sequence[float], reference: Sequence[Sequence[tuple[float, float]]]
) -> dict:
    """One point (cost ``x``, its top-1 per seed) against a reference model's ``(cost, top-1)`` points per seed.

    ``reference[i]`` is seed ``i``'s points (same seed order as ``top1``); ``x`` is one cost, or one per seed
    (reported as their mean). The reference's envelope is read at ``x`` per seed; the difference is reference -
    point, per seed, then mean and std. Out of the reference's range in any seed: ``status`` "out of range", no
    reference value.
    """
    if len(top1) != len(reference):
        raise ValueError(f"{len(top1)} seeds of the point, {len(reference)} of the reference")
    xs = [float(x)] * len(top1) if isinstance(x, (int, float)) else [float(v) for v in x]
    if len(xs) != len(top1):
        raise ValueError(f"{len(xs)} costs for {len(top1)} seeds")
    at = [envelope_at(pts, xi) for pts, xi in zip(reference, xs)]
    out: dict[str, Any] = {"x": statistics.fmean(xs), "top1": mean_std(top1)}
    if any(a is None for a in at):
        return {**out, "status": "out of range", "reference_top1": None, "difference": None}
    diffs = [a - t for a, t in zip(at, top1)]
    return {**out, "status": "in range", "reference_top1": mean_std(at), "difference": mean_std(diffs)}


def _gate_vs(point: dict[str, Any]) -> dict[str, Any]:
    """A gate's ``compare_point`` with ``gain`` added: gate - envelope per seed (the negated difference)."""
    d = point["difference"]
    return {**point, "gain": None if d is None else mean_std([-v for v in d["values"]])}


def _setting_key(run: dict[str, Any]) -> str:
    return json.dumps(run["setting"], sort_keys=True)


def _subnet_fields(s: dict[str, Any]) -> dict[str, Any]:
    """What names a static sub-network in a merged result: index, widths, kernels, MMACs, routed."""
    return {k: s.get(k) for k in ("index", "widths", "kernels", "mmacs", "routed")}


def _check_same(runs: list[dict[str, Any]], model: str) -> list[dict[str, Any]]:
    """The static sub-networks every seed of ``model`` agrees on (index, MMACs, routed); raises otherwise."""
    first = runs[0]["static"]
    shape = [(s["index"], s["mmacs"], s["routed"]) for s in first]
    for r in runs[1:]:
        if [(s["index"], s["mmacs"], s["routed"]) for s in r["static"]] != shape:
            raise ValueError(f"{model}: seeds {runs[0]['seed']} and {r['seed']} have different sub-networks")
    return first


def merge_runs(runs: list[dict[str, Any]], latency: dict[str, Any] | None = None) -> dict[str, Any]:
    """Mean ± std over the seeds present for both models (same setting), and the comparisons (see the docstring).

    ``runs``: per-seed results (``run``'s JSON); ``latency``: ``latency``'s JSON or None. Raises ``ValueError``
    when the runs differ in setting, a model is missing, a seed repeats, or the latency file's sub-networks do not
    match the runs'.
    """
    if not runs:
        raise ValueError("no per-seed results to merge")
    settings = {_setting_key(r) for r in runs}
    if len(settings) > 1:
        raise ValueError(f"the per-seed results differ in setting ({len(settings)} settings): not merging")
    by_model: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in MODELS}
    for r in runs:
        if r["model"] not in by_model:
            raise ValueError(f"unexpected model {r['model']!r} (expected {', '.join(MODELS)})")
        if r["seed"] in by_model[r["model"]]:
            raise ValueError(f"{r['model']} seed {r['seed']} given twice")
        by_model[r["model"]][r["seed"]] = r
    missing = [m for m in MODELS if not by_model[m]]
    if missing:
        raise ValueError(f"no results for {', '.join(missing)}")
    seeds = sorted(set(by_model[KERNEL]) & set(by_model[WIDTH]))
    if not seeds:
        raise ValueError("no seed is present for both models")
    dropped = {m: sorted(set(by_model[m]) - set(seeds)) for m in MODELS}
    per = {m: [by_model[m][s] for s in seeds] for m in MODELS}
    statics = {m: _check_same(per[m], m) for m in MODELS}

    lat_ms: dict[str, dict[int, dict[str, float]]] = {m: {} for m in MODELS}
    batches: list[str] = []
    if latency is not None:
        batches = [str(b) for b in latency["batch_sizes"]]
        for m in MODELS:
            routed = {s["index"]: s["mmacs"] for s in statics[m] if s["routed"]}
            timed = {s["index"]: s for s in latency["models"][m]["subnets"]}
            if {k: round(t["mmacs"], 4) for k, t in timed.items()} != {k: round(v, 4) for k, v in routed.items()}:
                raise ValueError(f"{m}: the latency file's routed sub-networks (index, MMACs) differ from the runs'")
            lat_ms[m] = {k: t["ms"] for k, t in timed.items()}

    curves: dict[str, list[dict[str, Any]]] = {}
    for m in MODELS:
        rows = []
        for i, s in enumerate(statics[m]):
            rows.append(
                _subnet_fields(s)
                | {"top1": mean_std([r["static"][i]["top1"] for r in per[m]]), "ms": lat_ms[m].get(s["index"])}
            )
        curves[m] = rows

    def ref_points(m: str, x_of: Callable[[dict[str, Any]], float | None], routed_only: bool) -> list[list]:
        return [
            [(x_of(s), s["top1"]) for s in r["static"] if (s["routed"] or not routed_only) and x_of(s) is not None]
            for r in per[m]
        ]

    def width_points(x_of: Callable[[dict[str, Any]], float | None], reference: list[list]) -> list[dict[str, Any]]:
        out = []
        for i, s in enumerate(statics[WIDTH]):
            if not s["routed"] or x_of(s) is None:
                continue
            point = compare_point(x_of(s), [r["static"][i]["top1"] for r in per[WIDTH]], reference)
            out.append({"index": s["index"], "mmacs": s["mmacs"], **point})
        return out

    def macs_of(s: dict[str, Any]) -> float:
        return s["mmacs"]

    equal_macs = {
        "all_static": width_points(macs_of, ref_points(KERNEL, macs_of, routed_only=False)),
        "routed_only": width_points(macs_of, ref_points(KERNEL, macs_of, routed_only=True)),
    }
    equal_latency: dict[str, list[dict[str, Any]]] = {}
    for b in batches:
        kernel_pts = [
            [(lat_ms[KERNEL][s["index"]][b], s["top1"]) for s in r["static"] if s["routed"]] for r in per[KERNEL]
        ]
        rows = []
        for i, s in enumerate(statics[WIDTH]):
            if s["routed"]:
                x = lat_ms[WIDTH][s["index"]][b]
                point = compare_point(x, [r["static"][i]["top1"] for r in per[WIDTH]], kernel_pts)
                rows.append({"index": s["index"], "mmacs": s["mmacs"], **point})
        equal_latency[b] = rows

    gates = {}
    for m in MODELS:
        g = [r["gate"] for r in per[m]]
        mixes = [r["gate"]["mix"] for r in per[m]]
        other = KERNEL if m == WIDTH else WIDTH
        own_pts = ref_points(m, macs_of, routed_only=False)
        other_pts = ref_points(other, macs_of, routed_only=False)
        gates[m] = {
            "top1": mean_std([p["top1"] for p in g]),
            "mmacs": mean_std([p["mmacs"] for p in g]),
            "routing_space": g[0]["routing_space"],
            "mix": [statistics.fmean(col) for col in zip(*mixes)],
            "vs_own_static": _gate_vs(compare_point([p["mmacs"] for p in g], [p["top1"] for p in g], own_pts)),
            "vs_other_static": _gate_vs(compare_point([p["mmacs"] for p in g], [p["top1"] for p in g], other_pts)),
        }
    return {
        "schema": f"{PREFIX}-v1",
        "setting": per[KERNEL][0]["setting"],
        "seeds": seeds,
        "dropped_seeds": dropped,
        "models": {m: {"static": curves[m], "gate": gates[m]} for m in MODELS},
        "at_equal_macs": equal_macs,
        "at_equal_latency": equal_latency,
        "latency": None
        if latency is None
        else {k: latency.get(k) for k in ("threads", "runtime", "batch_sizes", "oversubscribed", "weights")},
        "train_seconds": {
            m: {
                key: mean_std([r["train_seconds"][key] for r in per[m]])
                for key in ("supernet", "alone", "gate")
                if all(r["train_seconds"].get(key) is not None for r in per[m])
            }
            for m in MODELS
        },
    }


def _pm(v: dict[str, Any] | None, digits: int = 2, signed: bool = False) -> str:
    if v is None:
        return "out of range"
    mean = f"{v['mean']:+.{digits}f}" if signed else f"{v['mean']:.{digits}f}"
    return mean + ("" if v["std"] is None else f" ± {v['std']:.{digits}f}")


def _arch(s: dict[str, Any]) -> str:
    names = [n for n in s["widths"] if n not in ("stem",)]
    kernels = s.get("kernels") or {}
    return " ".join(f"{n}={s['widths'][n]}" + (f"/{kernels[n]}" if n in kernels else "") for n in names)


def render_markdown(merged: dict[str, Any]) -> str:
    """The merged result as markdown tables."""
    seeds = merged["seeds"]
    lat = merged["latency"]
    batches = [] if lat is None else [str(b) for b in lat["batch_sizes"]]
    name = merged["setting"].get("name", "?")
    lines = [
        f"# Kernel dimension vs width alone ({name} setting, seeds {seeds}: mean ± sample std)",
        "",
        f"`{KERNEL}` (widths x depthwise kernels, 6 routed) against `{WIDTH}` (width only, 3x3, 4 routed), "
        "trained with the quickstart recipe on Fashion-MNIST; top-1 on the test split.",
    ]
    if lat is None:
        lines += ["", "No latency measured (`python benchmarks/kernel_vs_width.py latency`): no ms columns."]
    else:
        note = (
            " **The machine looked oversubscribed while timing: ms are unreliable.**" if lat["oversubscribed"] else ""
        )
        weights = ", ".join(f"{m}: {w}" for m, w in (lat.get("weights") or {}).items())
        lines += [
            "",
            f"Latency: {lat['runtime']} static networks (BatchNorm folded), {lat['threads']} threads, ms per image, "
            f"interleaved; weights {weights}.{note}",
        ]
    for m in MODELS:
        heads = ["#", "sub-network (width/kernel)", "MMACs", "top-1 %", "routed"] + [f"ms b{b}" for b in batches]
        lines += ["", f"## {m}: static sub-networks", "", "| " + " | ".join(heads) + " |"]
        lines.append("|" + "|".join("---:" if h not in heads[1:2] else "---" for h in heads) + "|")
        for s in merged["models"][m]["static"]:
            ms = [("" if s["ms"] is None else f"{s['ms'][b]:.4f}") for b in batches]
            cells = [str(s["index"]), _arch(s), f"{s['mmacs']:.2f}", _pm(s["top1"]), "yes" if s["routed"] else ""]
            lines.append("| " + " | ".join(cells + ms) + " |")

    def compare_table(title: str, rows: list[dict[str, Any]], unit: str | None = None, fmt: str = "") -> list[str]:
        extra = "" if unit is None else f" {unit} |"
        out = [
            "",
            f"## {title}",
            "",
            f"| {WIDTH} # | MMACs |{extra} {WIDTH} top-1 | {KERNEL} envelope | {KERNEL} - {WIDTH} |",
            "|---:|---:|" + ("" if unit is None else "---:|") + "---:|---:|---:|",
        ]
        for r in rows:
            x = "" if unit is None else f" {format(r['x'], fmt)} |"
            out.append(
                f"| {r['index']} | {r['mmacs']:.2f} |{x} {_pm(r['top1'])} | "
                f"{_pm(r['reference_top1'])} | {_pm(r['difference'], signed=True)} |"
            )
        return out

    lines += compare_table(
        f"At equal MACs: {KERNEL}'s envelope over all its static sub-networks",
        merged["at_equal_macs"]["all_static"],
    )
    lines += compare_table(
        f"At equal MACs: {KERNEL}'s envelope over its routed sub-networks only",
        merged["at_equal_macs"]["routed_only"],
    )
    for b, rows in merged["at_equal_latency"].items():
        lines += compare_table(
            f"At equal latency, batch {b}: {KERNEL}'s routed sub-networks' envelope", rows, f"ms/image b{b}", ".4f"
        )
    lines += [
        "",
        "## The trained gates",
        "",
        "| model | top-1 % | MMACs | routing mix (slim -> wide) | own static envelope | gate - own | "
        "other model's envelope | gate - other |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for m in MODELS:
        g = merged["models"][m]["gate"]
        own, other = g["vs_own_static"], g["vs_other_static"]
        lines.append(
            f"| {m} | {_pm(g['top1'])} | {_pm(g['mmacs'])} | {' '.join(f'{f:.2f}' for f in g['mix'])} | "
            f"{_pm(own['reference_top1'])} | {_pm(own['gain'], signed=True)} | "
            f"{_pm(other['reference_top1'])} | {_pm(other['gain'], signed=True)} |"
        )
    lines += [
        "",
        "Envelope: the upper envelope (Pareto front) of the model's static points, linear between its knots, read per "
        "seed; the difference is per seed, then mean ± std. Outside the other model's range: out of range, never "
        "extrapolated.",
    ]
    if any(merged["dropped_seeds"].values()):
        lines.append(f"Seeds left out (not present for both models): {merged['dropped_seeds']}")
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------- kernel transform
def _without_model_kwargs(run: dict[str, Any]) -> str:
    setting = json.loads(json.dumps(run["setting"]))
    if isinstance(setting.get("recipe", {}).get("model"), dict):
        setting["recipe"]["model"]["kwargs"] = None
    return json.dumps(setting, sort_keys=True)


def _largest_kernel(subnet: dict[str, Any]) -> int:
    return max((subnet.get("kernels") or {}).values(), default=0)


def compare_transform(crop: list[dict[str, Any]], transformed: list[dict[str, Any]]) -> dict[str, Any]:
    """The kernel model with once-for-all's kernel transformation minus the plain crop, per sub-network and seed.

    ``crop``/``transformed``: per-seed results of ``KERNEL`` and ``TRANSFORM`` (``run``'s JSON). Only seeds both
    have are compared; the settings must agree except ``model.kwargs`` (the switch itself) and the sub-networks
    must be the same. Per static sub-network: both top-1s and the difference (transform - crop), each mean ±
    std over seeds; summaries over the sub-networks by kernel size (the largest kernel is the stored weight in
    both, so it differs only through shared training) and over the routed ones; the gates likewise.
    Raises ``ValueError`` on mismatches.
    """
    by: dict[str, dict[int, dict[str, Any]]] = {KERNEL: {}, TRANSFORM: {}}
    for label, runs in ((KERNEL, crop), (TRANSFORM, transformed)):
        for r in runs:
            if r["model"] != label:
                raise ValueError(f"expected {label} results, got {r['model']!r}")
            if r["seed"] in by[label]:
                raise ValueError(f"{label} seed {r['seed']} given twice")
            by[label][r["seed"]] = r
    seeds = sorted(set(by[KERNEL]) & set(by[TRANSFORM]))
    if not seeds:
        raise ValueError(f"no seed is present for both {KERNEL} and {TRANSFORM}")
    pairs = [(by[KERNEL][k], by[TRANSFORM][k]) for k in seeds]
    if len({_without_model_kwargs(r) for pair in pairs for r in pair}) > 1:
        raise ValueError("the runs differ in setting (beyond model.kwargs): not comparing")
    statics = _check_same([r for pair in pairs for r in pair], f"{KERNEL} vs {TRANSFORM}")
    per_label = ((KERNEL, [a for a, _ in pairs]), (TRANSFORM, [b for _, b in pairs]))
    rows = []
    for i, s in enumerate(statics):
        c = [a["static"][i]["top1"] for a, _ in pairs]
        t = [b["static"][i]["top1"] for _, b in pairs]
        rows.append(
            _subnet_fields(s)
            | {
                "crop_top1": mean_std(c),
                "transform_top1": mean_std(t),
                "difference": mean_std([b - a for a, b in zip(c, t)]),
            }
        )

    def summary(selected: list[dict[str, Any]]) -> dict[str, Any] | None:
        if not selected:
            return None  # per seed: the mean difference over the selected sub-networks, then mean ± std
        per_seed = [statistics.fmean(r["difference"]["values"][j] for r in selected) for j in range(len(seeds))]
        return {"subnets": [r["index"] for r in selected], "difference": mean_std(per_seed)}

    kernels = sorted({_largest_kernel(r) for r in rows})
    by_kernel = {str(k): summary([r for r in rows if _largest_kernel(r) == k]) for k in kernels}
    gates = {
        label: {key: mean_std([r["gate"][key] for r in runs]) for key in ("top1", "mmacs")}
        | {"mix": [statistics.fmean(col) for col in zip(*(r["gate"]["mix"] for r in runs))]}
        for label, runs in per_label
    }
    return {
        "schema": f"{TRANSFORM_PREFIX}-v1",
        "setting": pairs[0][0]["setting"]["name"],
        "seeds": seeds,
        "dropped_seeds": {m: sorted(set(by[m]) - set(seeds)) for m in by},
        "subnets": rows,
        "all": summary(rows),
        "routed": summary([r for r in rows if r["routed"]]),
        "by_largest_kernel": by_kernel,
        "gates": gates,
        "gate_difference": mean_std([b["gate"]["top1"] - a["gate"]["top1"] for a, b in pairs]),
        "train_seconds": {
            m: mean_std([r["train_seconds"]["supernet"] for r in runs])
            for m, runs in per_label
            if all(r["train_seconds"].get("supernet") is not None for r in runs)
        },
    }


def render_transform(cmp: dict[str, Any]) -> str:
    """``compare_transform``'s result as markdown."""
    lines = [
        f"# Once-for-all's kernel transformation vs the plain centre crop ({cmp['setting']} setting, "
        f"seeds {cmp['seeds']}: mean ± sample std)",
        "",
        f"`{KERNEL}` trained with the quickstart recipe, with `model.kwargs={{kernel_transform: true}}` "
        "(transform) and without (crop); top-1 on the test split; difference = transform - crop, per seed.",
        "",
        "| # | sub-network (width/kernel) | MMACs | routed | crop top-1 | transform top-1 | transform - crop |",
        "|---:|---|---:|---|---:|---:|---:|",
    ]
    for r in cmp["subnets"]:
        lines.append(
            f"| {r['index']} | {_arch(r)} | {r['mmacs']:.2f} | {'yes' if r['routed'] else ''} | "
            f"{_pm(r['crop_top1'])} | {_pm(r['transform_top1'])} | {_pm(r['difference'], signed=True)} |"
        )
    lines += ["", "| sub-networks | transform - crop (mean over them, per seed) |", "|---|---:|"]
    lines.append(f"| all {len(cmp['all']['subnets'])} | {_pm(cmp['all']['difference'], signed=True)} |")
    if cmp["routed"]:
        lines.append(f"| routed ({len(cmp['routed']['subnets'])}) | {_pm(cmp['routed']['difference'], signed=True)} |")
    for k, v in cmp["by_largest_kernel"].items():
        if v is not None:
            lines.append(f"| largest kernel {k}x{k} ({len(v['subnets'])}) | {_pm(v['difference'], signed=True)} |")
    g = cmp["gates"]
    lines += [
        "",
        "| gate | top-1 % | MMACs | routing mix (slim -> wide) |",
        "|---|---:|---:|---|",
        *(
            f"| {m} | {_pm(g[m]['top1'])} | {_pm(g[m]['mmacs'])} | {' '.join(f'{f:.2f}' for f in g[m]['mix'])} |"
            for m in (KERNEL, TRANSFORM)
        ),
        "",
        f"Gate top-1, transform - crop: {_pm(cmp['gate_difference'], signed=True)}.",
    ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ run
def _suffix(fast: bool, smoke: bool) -> str:
    return "_smoke" if smoke else ("_fast" if fast else "")


def _epoch_seconds(folder: Path) -> list[float]:
    """``epoch_time_s`` per epoch of a stage's ``metrics.jsonl`` (the last record of an epoch, if resumed)."""
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return []
    epochs: dict[int, float] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line) if line.strip() else {}
        if "epoch_time_s" in rec:
            epochs[int(rec.get("epoch", len(epochs)))] = float(rec["epoch_time_s"])
    return [epochs[k] for k in sorted(epochs)]


def seed_result(
    model: str,
    seed: int,
    setting: dict[str, Any],
    result: dict[str, Any],
    report: dict[str, Any],
    run_dir: Path,
    steps_per_epoch: int,
) -> dict[str, Any]:
    """The per-seed result from the quickstart's ``quickstart.json`` and ``report.json`` (nothing re-evaluated)."""
    static = [
        {
            "index": s["index"],
            "widths": s["widths"],
            "kernels": s.get("kernels"),
            "mmacs": s["macs"] / 1e6,
            "top1": s["top1"],
            "routed": bool(s["in_routing_space"]),
            "routable": bool(s["routed"]),
        }
        for s in report["static"]
    ]
    dyn = report["dynamic"]
    sup_epochs = _epoch_seconds(run_dir / "supernet")
    alone = [_epoch_seconds(d) for d in sorted((run_dir / "alone").glob("net*"))]
    return {
        "schema": f"{PREFIX}-seed-v1",
        "model": model,
        "seed": seed,
        "setting": setting,
        "dataset": report["dataset"]["name"],
        "test_images": report["dataset"]["num_samples"],
        "static": static,
        "gate": {
            "top1": dyn["top1"],
            "mmacs": dyn["mean_macs"] / 1e6,
            "routing_space": report["model"]["routing_space"],
            "mix": dyn["histogram"]["fractions"],
            "operating_point_chosen_on_holdout": result["claims"].get("best_matching_point"),
        },
        "alone": [{**a, "mmacs": a["macs"] / 1e6} for a in report.get("alone") or []],
        "train_seconds": {  # the stages' epochs (metrics.jsonl), whichever invocation trained them
            "supernet": round(sum(sup_epochs), 1) if sup_epochs else None,
            "alone": round(sum(sum(a) for a in alone), 1) if alone and all(alone) else None,
            "gate": round(sum(g), 1) if (g := _epoch_seconds(run_dir / "gate")) else None,
        },
        "supernet_step_seconds": round(statistics.fmean(sup_epochs) / steps_per_epoch, 4) if sup_epochs else None,
        "steps_per_epoch": steps_per_epoch,
        "quickstart_timings_s": result["timings_s"],  # this invocation's wall clock (0 for a reused stage)
        "stages": result["stages"],
        "claims": result["claims"],
        "checkpoints": {"gate": result["files"]["gate"], "supernet": result["files"]["supernet"]},
        "files": {"quickstart": str(run_dir / "quickstart.json"), "report": result["files"]["report"]},
    }


def report_alone(run_dir: Path) -> list:
    """The networks trained alone in a finished quickstart run folder (empty when it skipped them)."""
    report = run_dir / "report.json"
    return json.loads(report.read_text()).get("alone") or [] if report.is_file() else []


def run_seed(
    model: str,
    seed: int,
    fast: bool,
    threads: int | None,
    out: Path,
    results: Path,
    smoke: bool = False,
    alone: bool = False,
    transform: bool = False,
) -> Path:
    """One seed of one model with the quickstart recipe; returns the per-seed results file.

    ``transform``: the kernel model with once-for-all's kernel transformation matrices (label ``TRANSFORM``).
    """
    from dsnet.data import build_loader
    from dsnet.quickstart import quickstart_config, run_quickstart
    from dsnet.utils.io import atomic_write_json
    from dsnet.utils.threads import set_threads

    if model not in MODELS:
        raise SystemExit(f"--model must be one of {', '.join(MODELS)}")
    if transform and model != KERNEL:
        raise SystemExit(f"--transform needs --model {KERNEL} (the only model with kernel choices)")
    if threads:
        set_threads(threads)
    overrides = [
        f"model.name={model}",
        f"seed={seed}",
        *(TRANSFORM_OVERRIDES if transform else []),
        *(SMOKE if smoke else []),
    ]
    label = TRANSFORM if transform else model
    cfg = json.loads(json.dumps(quickstart_config(fast, None, overrides)))
    suffix = _suffix(fast, smoke)
    run_dir = out / f"{label}_seed{seed}{suffix}"
    target = results / f"{PREFIX}_{label}_seed{seed}{suffix}.json"
    qs_file = run_dir / "quickstart.json"
    done = qs_file.is_file() and (run_dir / "report.json").is_file()
    if done and json.loads(qs_file.read_text()).get("config") == cfg and (bool(report_alone(run_dir)) or not alone):
        print(f"[kernel_vs_width] {label} seed {seed}: reusing the finished run in {run_dir}", flush=True)
        result = json.loads(qs_file.read_text())
    else:
        result = run_quickstart(run_dir, fast, None, overrides, alone=alone)
    report = json.loads(Path(result["files"]["report"]).read_text())
    train_loader, _ = build_loader(cfg["data"], "train", seed=seed)
    setting = {
        "name": "smoke" if smoke else ("fast" if fast else "full"),
        "alone": alone,
        "recipe": {k: v for k, v in cfg.items() if k != "seed"} | {"model": {**cfg["model"], "name": None}},
    }
    res = seed_result(label, seed, setting, result, report, run_dir, len(train_loader))
    results.mkdir(parents=True, exist_ok=True)
    atomic_write_json(res, target)
    routed = [s for s in res["static"] if s["routed"]]
    g = res["gate"]
    print(
        f"[kernel_vs_width] {label} seed {seed}: routed "
        + ", ".join(f"{s['mmacs']:.2f} MMACs {s['top1']:.2f}%" for s in routed)
        + f"; gate {g['top1']:.2f}% at {g['mmacs']:.2f} MMACs; supernet step {res['supernet_step_seconds']} s"
        + f" ({res['steps_per_epoch']} steps/epoch) -> {target}",
        flush=True,
    )
    return target


# -------------------------------------------------------------------------------------------- latency
def _latency_model(name: str, results: Path) -> tuple[Any, str, str | None]:
    """``name`` from the lowest seed's trained checkpoint under ``results`` if one exists, else freshly built."""
    import dsnet
    from dsnet.quickstart import quickstart_config
    from dsnet.train.supernet import build_model

    files = sorted(
        results.glob(f"{PREFIX}_{name}_seed*.json"),
        key=lambda p: (p.stem.endswith(("_fast", "_smoke")), p.stem),
    )
    for f in files:
        ckpt = json.loads(f.read_text()).get("checkpoints", {}).get("gate")
        if ckpt and Path(ckpt).is_file():
            return dsnet.load(ckpt).model.eval(), f"trained checkpoint {ckpt}", ckpt
    model = build_model(quickstart_config(overrides=[f"model.name={name}"]), 10, 1)  # Fashion-MNIST: 10 classes, 1 ch
    return model.eval(), "fresh initialisation (no trained checkpoint found; weights do not change latency)", None


def measure_latency(
    threads: int,
    batch_sizes: Sequence[int],
    results: Path,
    repeats: int | None,
    batch1_images: int,
    warmup: int,
    runtime: str,
) -> dict[str, Any]:
    """Every routed sub-network of both models as a BN-folded static network, timed in one interleaved loop."""
    import os
    import platform

    import torch

    from dsnet.bench.timing import interleaved, summarize
    from dsnet.export.serving import build_serving
    from dsnet.utils.latency import cpu_name
    from dsnet.utils.threads import oversubscription, set_threads, warn_line

    t_start = time.perf_counter()
    threads = set_threads(threads, warn=warn_line)
    before = oversubscription(threads)
    nets: dict[str, dict[int, Callable]] = {}
    info: dict[str, dict[str, Any]] = {}
    size = None
    for name in MODELS:
        model, weights, ckpt = _latency_model(name, results)
        print(f"[kernel_vs_width] {name}: {weights}", file=sys.stderr, flush=True)
        msize = tuple(model.default_input_size)
        if size is not None and msize != size:
            raise SystemExit(f"the two models take different inputs: {size} and {msize}")
        size = msize
        server = build_serving(model, runtime)
        nets[name] = {k: server.static_network(k) for k in model.routing_space}
        macs = model.subnet_macs(size)
        info[name] = {
            "weights": weights,
            "checkpoint": ckpt,
            "routing_space": list(model.routing_space),
            "describe": server.describe(),
            "subnets": [
                {
                    "index": k,
                    "widths": model.subnets[k].as_dict(),
                    "kernels": model.subnets[k].kernel_dict(),
                    "mmacs": float(macs[k]) / 1e6,
                    "ms": {},
                    "iqr_ms": {},
                    "batch_ms": {},
                    "rounds": {},
                }
                for k in model.routing_space
            ],
        }
    gen = torch.Generator().manual_seed(0)
    need = max(max(batch_sizes), batch1_images)
    images = torch.randn(need, *size, generator=gen).contiguous(memory_format=torch.channels_last)
    # alternate the models: kernel #0, width #0, kernel #1, ... (interleaved() rotates the start every round)
    order = [
        (m, k)
        for pair in zip_longest(*[[(m, k) for k in nets[m]] for m in MODELS], fillvalue=(None, None))
        for m, k in pair
        if m is not None
    ]
    for batch in batch_sizes:
        inputs = list(images[:batch1_images].split(1)) if batch == 1 else [images[:batch]]
        rounds = repeats or (40 if batch == 1 else 20)
        fns = {f"{m}:{k}": (lambda f=nets[m][k], xs=inputs: [f(x) for x in xs]) for m, k in order}
        print(
            f"[kernel_vs_width] batch {batch}: {len(fns)} static networks x {rounds} rounds "
            f"({len(inputs)} call(s) of {inputs[0].shape[0]} image(s) each)",
            file=sys.stderr,
            flush=True,
        )
        with torch.inference_mode():
            samples = interleaved(fns, rounds, warmup)
        per_image = inputs[0].shape[0] * len(inputs)
        for m, k in order:
            s = summarize(samples[f"{m}:{k}"])
            row = next(r for r in info[m]["subnets"] if r["index"] == k)
            row["ms"][str(batch)] = s.median / per_image
            row["iqr_ms"][str(batch)] = s.iqr / per_image
            row["batch_ms"][str(batch)] = s.median / len(inputs)
            row["rounds"][str(batch)] = s.n
    after = oversubscription(threads)
    return {
        "schema": f"{PREFIX}-latency-v1",
        "runtime": runtime,
        "how": f"build_serving(model, {runtime!r}).static_network(k): each routed sub-network as a static network, "
        "BatchNorm folded; all sub-networks of both models in one interleaved loop per batch size (models "
        "alternating), median over rounds; batch 1: a timed call is one image after another",
        "input": f"seeded N(0, 1) images {'x'.join(map(str, size))}, channels-last (content does not change latency)",
        "threads": threads,
        "batch_sizes": [int(b) for b in batch_sizes],
        "batch1_images": batch1_images,
        "warmup": warmup,
        "oversubscribed": bool(before or after),
        "oversubscription_warnings": [w for w in (before, after) if w],
        "load_average_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "machine": {"cpu": cpu_name(), "platform": platform.platform(), "torch": torch.__version__},
        "weights": {m: info[m]["weights"] for m in MODELS},
        "models": info,
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }


def format_latency(lat: dict[str, Any]) -> str:
    batches = [str(b) for b in lat["batch_sizes"]]
    lines = [
        f"{lat['runtime']} static networks, {lat['threads']} threads, ms per image (median; ±IQR/2)"
        + (" -- OVERSUBSCRIBED" if lat["oversubscribed"] else "")
    ]
    for m in MODELS:
        lines.append(f"{m} ({lat['weights'][m]})")
        for s in lat["models"][m]["subnets"]:
            cells = "  ".join(f"b{b} {s['ms'][b]:.4f} ±{s['iqr_ms'][b] / 2:.4f}" for b in batches)
            lines.append(f"  #{s['index']} {s['mmacs']:.2f} MMACs  {cells}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ plot
def plot(merged: dict[str, Any], path: Path, dpi: int = 110) -> Path | None:
    """Top-1 against MMACs and against ms per image (each timed batch size), both models. None without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    import io

    from dsnet.utils.io import atomic_write_bytes

    batches = [] if merged["latency"] is None else [str(b) for b in merged["latency"]["batch_sizes"]]
    panels = [("mmacs", "MMACs per image")] + [(b, f"ms per image, batch {b}") for b in batches]
    fig = Figure(figsize=(5.5 * len(panels), 4.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    colors = {KERNEL: "tab:blue", WIDTH: "tab:orange"}
    for ax, (key, label) in zip(axes, panels):
        for m in MODELS:
            rows = merged["models"][m]["static"]
            if key != "mmacs":
                rows = [r for r in rows if r["ms"] is not None]

            def x(r: dict[str, Any], key: str = key) -> float:
                return r["mmacs"] if key == "mmacs" else r["ms"][key]

            for routed in (True, False):
                pts = [r for r in rows if r["routed"] == routed]
                if not pts:
                    continue
                ax.errorbar(
                    [x(r) for r in pts],
                    [r["top1"]["mean"] for r in pts],
                    yerr=[r["top1"]["std"] or 0.0 for r in pts],
                    fmt="o" if routed else "s",
                    mfc=colors[m] if routed else "none",
                    color=colors[m],
                    capsize=2,
                    markersize=5,
                    label=f"{m} {'routed' if routed else 'static, not routed'}",
                )
            pts_xy = [(x(r), r["top1"]["mean"]) for r in rows]
            front = pareto_front(pts_xy)
            if front and max(p[0] for p in pts_xy) > front[-1][0]:  # the envelope stays flat past its best point
                front.append((max(p[0] for p in pts_xy), front[-1][1]))
            ax.plot([p[0] for p in front], [p[1] for p in front], "-", color=colors[m], alpha=0.6)
            if key == "mmacs":
                g = merged["models"][m]["gate"]
                ax.plot([g["mmacs"]["mean"]], [g["top1"]["mean"]], "*", color=colors[m], mec="k", markersize=14,
                        label=f"{m} trained gate")  # fmt: skip
        ax.set_xlabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("top-1 % (test split), mean ± std over seeds")
    axes[0].legend(loc="best", fontsize=7)
    threads = "" if merged["latency"] is None else f"; timing: {merged['latency']['threads']} threads"
    fig.suptitle(f"Kernel dimension vs width alone ({merged['setting']['name']}, seeds {merged['seeds']}{threads})")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return atomic_write_bytes(buf.getvalue(), path)


# ------------------------------------------------------------------------------------------------ main
def _ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="one seed of one model with the quickstart recipe")
    r.add_argument("--model", choices=MODELS, required=True)
    r.add_argument("--seed", type=int, required=True)
    r.add_argument("--fast", action="store_true", help="the quickstart's --fast setting")
    r.add_argument("--threads", type=int, default=None)
    r.add_argument("--out", type=Path, default=None, help="run folders (default runs/kvw)")
    r.add_argument(
        "--alone", action="store_true", help="also train every routed sub-network alone (doubles the run time)"
    )
    r.add_argument(
        "--transform", action="store_true", help=f"{KERNEL} with once-for-all's kernel transformation matrices"
    )
    r.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    r.add_argument("--results", type=Path, default=None, help=argparse.SUPPRESS)
    lt = sub.add_parser("latency", help="time every routed static sub-network of both models, interleaved")
    lt.add_argument("--threads", type=int, default=2)
    lt.add_argument("--batches", type=_ints, default=[1, 256])
    lt.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 40 at batch 1, else 20)")
    lt.add_argument("--batch1-images", type=int, default=32, help="images one after another per batch-1 timing")
    lt.add_argument("--warmup", type=int, default=2)
    lt.add_argument("--runtime", choices=("eager-split", "eager"), default="eager-split")
    lt.add_argument("--results", type=Path, default=RESULTS, help=argparse.SUPPRESS)
    lt.add_argument("--json", type=Path, default=None, help=argparse.SUPPRESS)
    mg = sub.add_parser("merge", help="merge the per-seed results (and the latency file) under benchmarks/results/")
    mg.add_argument("--fast", action="store_true", help="merge the --fast results")
    mg.add_argument("--results", type=Path, default=RESULTS, help=argparse.SUPPRESS)
    mg.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    mg.add_argument("--plot", type=Path, default=None, help=argparse.SUPPRESS)
    tf = sub.add_parser("transform", help="the kernel transformation vs the plain crop, from the per-seed results")
    tf.add_argument("--fast", action="store_true", help="compare the --fast results")
    tf.add_argument("--results", type=Path, default=RESULTS, help=argparse.SUPPRESS)
    tf.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.cmd == "run":
        results = args.results or (SMOKE_DIR / "results" if args.smoke else RESULTS)
        out = args.out or (SMOKE_DIR / "runs" if args.smoke else Path("runs/kvw"))
        run_seed(args.model, args.seed, args.fast, args.threads, out, results, args.smoke, args.alone, args.transform)
        return 0

    from dsnet.utils.io import atomic_write_json, atomic_write_text

    if args.cmd == "latency":
        lat = measure_latency(
            args.threads, args.batches, args.results, args.repeats, args.batch1_images, args.warmup, args.runtime
        )
        target = args.json or args.results / LATENCY_FILE
        atomic_write_json(lat, target)
        print(format_latency(lat))
        print(f"[kernel_vs_width] {target}")
        return 0

    suffix = _suffix(args.fast, args.smoke)
    if args.cmd == "transform":
        return _transform_main(args.results, suffix)
    files = [f for m in MODELS for f in _seed_files(args.results, m, suffix)]
    if not files:
        raise SystemExit(f"no {PREFIX}_<model>_seed<K>{suffix}.json under {args.results}: run seeds first")
    lat_file = args.results / LATENCY_FILE
    latency = json.loads(lat_file.read_text()) if lat_file.is_file() else None
    try:
        merged = merge_runs([json.loads(f.read_text()) for f in files], latency)
    except ValueError as err:
        raise SystemExit(f"merge: {err}") from None
    merged["files"] = [str(f) for f in files] + ([str(lat_file)] if latency is not None else [])
    name = f"{PREFIX}{suffix}"
    atomic_write_json(merged, args.results / f"{name}.json")
    text = render_markdown(merged)
    atomic_write_text(text, args.results / f"{name}.md")
    png = plot(merged, args.plot or (PLOT if not suffix else args.results / f"{name}.png"))
    print(text)
    print(f"[kernel_vs_width] {args.results / name}.json, .md" + (f", {png}" if png else " (no matplotlib: no plot)"))
    return 0


def _seed_files(results: Path, label: str, suffix: str) -> list[Path]:
    """``kernel_vs_width_<label>_seed<K><suffix>.json`` under ``results`` (exactly that label and suffix)."""
    return [
        f
        for f in sorted(results.glob(f"{PREFIX}_{label}_seed*.json"))
        if f.stem.removeprefix(f"{PREFIX}_{label}_seed").lstrip("0123456789") == suffix
    ]


def _transform_main(results: Path, suffix: str) -> int:
    from dsnet.utils.io import atomic_write_json, atomic_write_text

    crop, transformed = _seed_files(results, KERNEL, suffix), _seed_files(results, TRANSFORM, suffix)
    if not crop or not transformed:
        raise SystemExit(
            f"transform: need {PREFIX}_{KERNEL}_seed<K>{suffix}.json and {PREFIX}_{TRANSFORM}_seed<K>{suffix}.json "
            f"under {results} (run --model {KERNEL} [--transform])"
        )
    try:
        cmp = compare_transform(
            [json.loads(f.read_text()) for f in crop], [json.loads(f.read_text()) for f in transformed]
        )
    except ValueError as err:
        raise SystemExit(f"transform: {err}") from None
    cmp["files"] = [str(f) for f in crop + transformed]
    name = f"{TRANSFORM_PREFIX}{suffix}"
    atomic_write_json(cmp, results / f"{name}.json")
    text = render_transform(cmp)
    atomic_write_text(text, results / f"{name}.md")
    print(text)
    print(f"[kernel_vs_width] {results / name}.json, .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
