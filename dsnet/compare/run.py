"""``dsnet compare``: every method on the same data and epochs, one evaluation, one timing harness.

Training config: the quickstart recipe (``dsnet.quickstart.QUICKSTART``, its
``--fast`` variant with ``--fast``) plus a held-out slice of the training
split (``data.holdout``) that every selection reads (best epoch, gate budget,
search decisions); the test split is evaluated once, at the end. Every method
gets the recipe's epochs. Output, in ``--out``: ``compare.json`` (one entry per
method point), ``compare.md`` (tables and the claims checked) and
``compare.png``; each seed's stages live in ``seed<i>/`` and are reused or
resumed by a re-run.
"""

from __future__ import annotations

import copy
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsnet.compare.core import (
    METHODS,
    CompareContext,
    Point,
    near_chance_margin,
    near_chance_methods,
    time_points,
)
from dsnet.search.pss import PSS_SCHEMA
from dsnet.utils.io import atomic_write_json, atomic_write_text, check_output_dir
from dsnet.utils.schema import Float, Int, Numbers, resolve_section, section_defaults, with_stage

__all__ = ["COMPARE_DEFAULTS", "COMPARE_SCHEMA", "compare_config", "run_compare", "gain_at_equal_macs"]

SCHEMA_VERSION = 1

# Settings of the comparison itself (``--set pss.threshold=2`` etc.); training keys go to the recipe.
COMPARE_SCHEMA: dict[str, Any] = {
    "pss": with_stage(PSS_SCHEMA, "compare, search"),
    "usnet": {
        "r_min": Float(None, "(0, 1]", null=True, doc="slimmest width multiplier (null: the slimmest routed one's)")
    },
    "eval": {
        "sweep": Int(9, "[2, inf)", doc="gate-bias sweep points per gated model"),
        "lcnet_skip_biases": Numbers(
            [-1.0, 0.0, 1.0, 2.0, 3.0],
            "(-inf, inf)",
            nonempty=True,
            doc="LC-Net run-time skip biases evaluated (> 0 skips more)",
        ),
    },
    "timing": {
        "batch_size": Int(256, "[1, inf)", doc="the large batch (ms per batch)"),
        "batch1_images": Int(32, "[1, inf)", doc="batch-1 latency: each of these test images alone (ms per image)"),
        "repeats": Int(10, "[1, inf)", doc="timed repeats per method, interleaved"),
        "warmup": Int(2, "[0, inf)", doc="untimed warm-up repeats"),
        "threads": Int(None, "[1, inf)", null=True, doc="torch threads for every method (null: torch's current)"),
    },
}
for _name in ("usnet", "eval", "timing"):
    COMPARE_SCHEMA[_name] = with_stage(COMPARE_SCHEMA[_name], "compare")
COMPARE_DEFAULTS: dict[str, Any] = section_defaults(COMPARE_SCHEMA)
# training images held out for selection: 10% of them (the data.holdout: null rule), at most these
HOLDOUT = {"full": 5000, "fast": 2500}
FAST_SETTINGS = ["pss.noise_steps=40", "pss.finetune_steps=40", "timing.repeats=6"]
_SETTING_SECTIONS = tuple(COMPARE_DEFAULTS)


def compare_config(
    fast: bool = False, data: str | None = None, overrides: list[str] | None = None, model: str | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(training config, comparison settings) from the quickstart recipe, ``--fast`` and ``--set`` overrides.

    ``data`` may be a Fashion-MNIST folder or an image folder (``train/`` and
    ``val/`` or ``test/`` class folders, :func:`dsnet.data.is_image_folder`),
    unless ``--set data.dataset=...`` names the dataset. Unless set, the
    held-out slice is 10% of the training images, at most :data:`HOLDOUT`
    (5,000; 2,500 with ``--fast``), and ``--fast``'s training subset is
    dropped when the data has fewer images than it.
    """
    from dsnet.data import holdout_size, is_image_folder, training_images
    from dsnet.quickstart import quickstart_config
    from dsnet.train.config import apply_overrides

    ours = [o for o in overrides or [] if o.split("=", 1)[0].split(".", 1)[0] in _SETTING_SECTIONS]
    training = [o for o in overrides or [] if o not in ours]
    given = {o.split("=", 1)[0].strip() for o in training}
    cap = HOLDOUT["fast" if fast else "full"]
    extra = [f"data.holdout={cap}"] + ([f"model.name={model}"] if model else [])
    cfg = quickstart_config(fast, data, extra + training)
    if "data.dataset" not in given and is_image_folder(cfg["data"]["root"]):  # --data <image folder>
        cfg = quickstart_config(fast, data, [*extra, "data.dataset=imagefolder", *training])
    try:
        num_train = training_images(cfg["data"])
    except (OSError, ValueError):
        num_train = None  # not readable here: run_compare says so, with instructions
    if num_train is not None:
        d = cfg["data"]
        if "data.holdout" not in given:
            d["holdout"] = holdout_size(None, num_train, cap)
        if d["train_subset"] is not None and d["train_subset"] >= num_train - d["holdout"]:
            d["train_subset"] = None  # --fast's subset is more than the data has: all of it
    raw = apply_overrides({}, (FAST_SETTINGS if fast else []) + ours)
    return cfg, resolve_section(COMPARE_SCHEMA, raw, "")


def gain_at_equal_macs(points: list[dict[str, Any]], reference: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Top-1 of ``points`` minus the ``reference`` curve (linear in MACs) at the same MACs.

    Only points inside the reference's MAC range count (no extrapolation).
    Returns mean, max, min and how many points, or None if none is inside.
    """
    ref = sorted((p["mmacs"], p["top1"]) for p in reference)
    if len(ref) < 2:
        return None
    lo, hi = ref[0][0], ref[-1][0]
    diffs = [
        p["top1"] - float(np.interp(p["mmacs"], [m for m, _ in ref], [a for _, a in ref]))
        for p in points
        if lo - 1e-9 <= p["mmacs"] <= hi + 1e-9
    ]
    if not diffs:
        return None
    return {"mean": float(np.mean(diffs)), "max": float(max(diffs)), "min": float(min(diffs)), "points": len(diffs)}


# (claim name, method, reference method, what the papers say, what differs between the two methods): a claim
# whose "differs" names one thing is controlled; one naming several cannot say which of them made the gap.
# {distill}, {sampling}: the run's stage I settings.
CLAIMS = (
    (
        "pss_vs_usnet",
        "pss",
        "usnet",
        "PSS paper: +2.3 points average (+4.4 max) over US-Nets at equal size",
        "weights (the widest trained alone, then searched and fine-tuned vs a US-Net supernet), widths "
        "(searched vs uniform grid), training compute",
    ),
    (
        "pss_vs_uniform",
        "pss",
        "static",
        "searched non-uniform widths beat the supernet's uniform widths",
        "weights (the widest trained alone + the search's fine-tuning vs DS-Net stage I) and widths: "
        "pss_vs_pss_uniform is the controlled version",
    ),
    (
        "usnet_vs_static",
        "usnet",
        "static",
        "continuous-width training vs DS-Net's 4-width supernet",
        "three things at once: the teacher (the widest routed sub-network's own prediction vs DS-Net's "
        "{distill} teacher at its wider training-only largest), the distillation (inplace vs {distill}) and "
        "the width sampling (continuous over the US-Net grid vs {sampling} over the routed widths)",
    ),
    (
        "static_vs_alone",
        "static",
        "alone",
        "sharing weights in a supernet vs each width trained alone",
        "weight sharing (sandwich with {distill} distillation vs each width alone on labels); the same architectures",
    ),
    (
        "dsnet_vs_static",
        "dsnet",
        "static",
        "DS-Net: the gate beats the static sub-networks at equal MACs",
        "the router only (the same supernet weights)",
    ),
    (
        "pss_vs_pss_uniform",
        "pss",
        "pss_uniform",
        "searched vs uniform widths, the same start and fine-tuning",
        "the width allocation only: the same start and the same fine-tuning steps at the same MACs (the "
        "fine-tuned nested sets differ with the widths)",
    ),
    (
        "pss_gate_vs_dsnet",
        "pss_gate",
        "dsnet",
        "a gate over searched widths vs DS-Net's gate over its supernet",
        "the supernet (searched from a network trained alone vs DS-Net stage I) and its widths; the same gate training",
    ),
    (
        "pss_gate_vs_pss_uniform_gate",
        "pss_gate",
        "pss_uniform_gate",
        "gate over searched vs uniform widths, same training",
        "the width allocation only (as pss_vs_pss_uniform); the same gate training",
    ),
    (
        "pss_gate_vs_pss",
        "pss_gate",
        "pss",
        "the gate over the searched sub-networks vs those sub-networks",
        "the router only (the same weights)",
    ),
    (
        "pss_uniform_gate_vs_pss_uniform",
        "pss_uniform_gate",
        "pss_uniform",
        "the control's gate vs its sub-networks",
        "the router only (the same weights)",
    ),
    (
        "cascade_vs_dsnet",
        "cascade",
        "dsnet",
        "a training-free confidence cascade vs the trained gate",
        "the router only (the same supernet weights)",
    ),
    (
        "lcnet_vs_dsnet",
        "lcnet",
        "dsnet",
        "LC-Net's per-input block/channel skipping vs DS-Net's gate at equal MACs",
        "architecture, training and router (LC-Net trained with its gates vs a supernet and a gate); the same "
        "data and epochs",
    ),
    (
        "lcnet_vs_static",
        "lcnet",
        "static",
        "LC-Net vs DS-Net's static sub-networks at equal MACs",
        "architecture, training and routing; the same data and epochs",
    ),
)


def _routed_only(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [p for p in points if "(largest)" not in p["name"]]


def check_claims(
    points: list[dict[str, Any]], num_classes: int | None = None, cfg: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Each claim of :data:`CLAIMS` whose two methods ran: the gain at equal MACs, what differs, and a flag
    when a compared model is within :func:`~dsnet.compare.core.near_chance_margin` points of chance
    (``100 / num_classes``)."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        by_method.setdefault(p["method"], []).append(p)
    sc = (cfg or {}).get("supernet", {})
    fields = {"distill": sc.get("distill", "ib"), "sampling": sc.get("width_sampling", "discrete")}
    claims = {}
    for name, a, b, what, differs in CLAIMS:
        if a in by_method and b in by_method:
            gain = gain_at_equal_macs(_routed_only(by_method[a]), _routed_only(by_method[b]))
            if gain is not None:
                claims[name] = {"method": a, "reference": b, "claim": what, "differs": differs.format(**fields), **gain}
                if num_classes:
                    chance, margin = 100.0 / num_classes, near_chance_margin(num_classes)
                    compared = _routed_only(by_method[a]) + _routed_only(by_method[b])
                    near = [p["name"] for p in compared if p["top1"] < chance + margin]
                    claims[name]["chance_top1"] = chance
                    if near:
                        claims[name]["near_chance"] = near
                        claims[name]["warning"] = (
                            f"near chance: not meaningful ({len(near)} of {len(compared)} compared point(s) "
                            f"within {margin:g} points of chance, {chance:.1f}%)"
                        )
    return claims


def aggregate_points(per_seed: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Mean over seeds of the points present in every seed (by name); spread as the standard deviation."""
    names = [p["name"] for p in per_seed[0]]
    common = [n for n in names if all(any(p["name"] == n for p in seed) for seed in per_seed)]
    out = []
    for name in common:
        rows = [next(p for p in seed if p["name"] == name) for seed in per_seed]
        point = copy.deepcopy(rows[0])
        point["top1"] = float(np.mean([r["top1"] for r in rows]))
        point["mmacs"] = float(np.mean([r["mmacs"] for r in rows]))
        if len(rows) > 1:
            point["top1_std"] = float(np.std([r["top1"] for r in rows], ddof=1))
            point["top1_per_seed"] = [r["top1"] for r in rows]
        out.append(point)
    return out


def timing_noise(points: list[dict[str, Any]]) -> dict[str, Any] | None:
    """How far apart the timings of *identical* plain networks came out: the run's timing noise floor.

    Static points of different methods with the same widths extract to the
    same plain network (``alone #k`` and ``static #k``, US-Nets grid points),
    so any difference between their latencies is measurement noise.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        if p["kind"] == "static" and p.get("latency_ms_batch") and "widths" in p["params"]:
            groups.setdefault(json.dumps(p["params"]["widths"], sort_keys=True), []).append(p)
    pairs = [g for g in groups.values() if len(g) > 1]
    if not pairs:
        return None
    out: dict[str, Any] = {"identical_networks": len(pairs)}
    for key in ("latency_ms_b1", "latency_ms_batch"):
        spreads = [max(p[key] for p in g) / min(p[key] for p in g) - 1.0 for g in pairs]
        out[f"{key}_max_spread"] = float(max(spreads))
        out[f"{key}_median_spread"] = float(np.median(spreads))
    return out


def _timing_images(ctx: CompareContext, n: int) -> torch.Tensor:
    images = []
    count = 0
    for x, _ in ctx.loader("val"):
        images.append(x)
        count += len(x)
        if count >= n:
            break
    x = torch.cat(images)
    if len(x) < n:  # a tiny test split: repeat it
        x = x.repeat(-(-n // len(x)), 1, 1, 1)
    return x[:n]


def _check_search_settings(names: list[str], cfg: dict[str, Any], settings: dict[str, Any], info: Any) -> None:
    """The search settings the search methods would reject after the networks trained, checked now."""
    if not any(n.startswith("pss") for n in names):
        return
    from dsnet.models import create_model
    from dsnet.search.channels import channel_map
    from dsnet.search.pss import check_group_size, check_targets

    kwargs = {"num_classes": info.num_classes, "in_chans": info.in_chans, **cfg["model"]["kwargs"]}
    model = create_model(cfg["model"]["name"], **kwargs)
    try:
        channel_map(model)
    except ValueError:
        return  # no channel map: the search methods say they do not apply (and are skipped)
    start = model.subnets[model.routing_space[-1]].widths  # the search starts from the widest routed network
    check_group_size(model, start, settings["pss"]["group_size"])
    if settings["pss"]["targets_mmacs"] is not None:
        check_targets([t * 1e6 for t in settings["pss"]["targets_mmacs"]])


def run_compare(
    out: str | Path = "runs/compare",
    *,
    fast: bool = False,
    data: str | None = None,
    methods: list[str] | None = None,
    seeds: int = 1,
    model: str | None = None,
    overrides: list[str] | None = None,
    progress: bool = True,
    log=print,
) -> dict[str, Any]:
    """Train/derive, evaluate and time every method; write compare.json/.md/.png. Returns compare.json's content."""
    from dsnet.compare.methods import DEFAULT_ORDER
    from dsnet.compare.report import plot_compare, render_markdown, render_screen
    from dsnet.data import build_dataset, describe_split_sizes, holdout_size, training_images

    t_start = time.time()
    if methods is not None and not list(methods):
        raise ValueError(f"--methods: empty method list; name one or more of {', '.join(METHODS)} (omit it for all)")
    names = list(methods) if methods is not None else [m for m in DEFAULT_ORDER if m in METHODS]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"--methods lists a method twice: {','.join(names)}")
    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    cfg0, settings = compare_config(fast, data, overrides, model)
    if cfg0["data"]["holdout"] == 0:
        raise ValueError("dsnet compare makes every choice on data.holdout (held-out training images): set it > 0")
    cfg0["log"]["progress"] = cfg0["log"]["progress"] and progress
    out = check_output_dir(out, "--out")  # compare.json is written at the end: fail now, not after training
    _, info = build_dataset(cfg0["data"], "val")  # fails in a second, with instructions, if the data is missing
    train_info = build_dataset(cfg0["data"], "train")[1]
    _check_search_settings(names, cfg0, settings, train_info)
    held_out = holdout_size(cfg0["data"]["holdout"], training_images(cfg0["data"]))  # data.holdout: null too
    sizes = describe_split_sizes(train_info.num_samples, held_out, info.num_samples)
    log(
        f"[compare] {cfg0['model']['name']} on {info.name}: {sizes}, {cfg0['supernet']['epochs']} epochs "
        f"each{' (--fast)' if fast else ''}; methods: {', '.join(names)}"
    )
    device = torch.device("cpu")
    instances = [METHODS[m]() for m in names]
    per_seed_points: list[list[dict[str, Any]]] = []
    train_seconds: dict[str, list[float | None]] = {m: [] for m in names}
    train_compute: dict[str, dict[str, Any] | None] = {}
    notes: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    timed_points: list[Point] = []
    ctx0 = None
    for seed in range(seeds):
        cfg = copy.deepcopy(cfg0)
        cfg["seed"] = cfg0["seed"] + seed
        ctx = CompareContext(cfg, settings, out / f"seed{seed}", device, progress=progress, log=log)
        active = []
        for method in instances:
            reason = method.applicable(ctx)
            if reason:
                if seed == 0:
                    log(f"[compare] {method.name}: not applicable to {cfg['model']['name']} ({reason}); skipped")
                skipped[method.name] = reason
            else:
                active.append(method)
        for method in active:
            method.train(ctx)
        points: list[Point] = []
        for method in active:
            found = method.points(ctx)
            if not found:
                skipped.setdefault(method.name, "no points (see the log)")
            points += found
            train_seconds[method.name].append(ctx.seconds(method.stages(ctx)))
            if seed == 0:  # passes follow from the settings: the same every seed
                train_compute[method.name] = ctx.compute(method.stages(ctx))
                notes[method.name] = method.notes(ctx)
        per_seed_points.append([p.as_dict() for p in points])
        if seed == 0:
            timed_points, ctx0 = points, ctx
    # one timing harness: every point of seed 0, interleaved, the same threads
    t = settings["timing"]
    threads = t["threads"] or torch.get_num_threads()
    log(f"[compare] timing {len(timed_points)} points (batch 1 and {t['batch_size']}, {threads} threads, interleaved)")
    images = _timing_images(ctx0, max(t["batch_size"], t["batch1_images"]))
    latency = time_points(
        timed_points,
        images,
        batch_size=t["batch_size"],
        batch1_images=t["batch1_images"],
        repeats=t["repeats"],
        warmup=t["warmup"],
        threads=threads,
        device=device,
        progress=progress,
    )
    points = aggregate_points(per_seed_points)
    method_seconds = {}
    for m, values in train_seconds.items():
        known = [v for v in values if v is not None]
        method_seconds[m] = float(np.mean(known)) if known else None
    for p in points:
        p.update(latency.get(p["name"], {"latency_ms_b1": None, "latency_ms_batch": None}))
        p["batch_size"] = t["batch_size"]
        p["train_seconds"] = method_seconds.get(p["method"])
        p["train_fwd_bwd"] = (train_compute.get(p["method"]) or {}).get("fwd_bwd")
    result = {
        "schema_version": SCHEMA_VERSION,
        "model": cfg0["model"]["name"],
        "dataset": {
            "name": info.name,
            "test_images": info.num_samples,
            "train_images": train_info.num_samples,
            "num_classes": info.num_classes,
        },
        "fast": fast,
        "seeds": [cfg0["seed"] + s for s in range(seeds)],
        "methods": names,
        "skipped": skipped,
        "train_seconds": method_seconds,
        "train_seconds_per_seed": train_seconds,
        "train_compute": {
            m: None if c is None else {**c, "seconds": method_seconds.get(m)} for m, c in train_compute.items()
        },
        "notes": {m: n for m, n in notes.items() if n},
        "timing": {
            "threads": threads,
            "batch_size": t["batch_size"],
            "batch1_images": t["batch1_images"],
            "repeats": t["repeats"],
            "device": str(device),
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "note": "interleaved round-robin; re-run on an idle machine for absolute numbers",
        },
        "points": points,
        "per_seed_points": per_seed_points if seeds > 1 else None,
        "claims": check_claims(points, info.num_classes, cfg0),
        "near_chance": near_chance_methods(points, info.num_classes),  # one warning line per method
        "timing_noise": timing_noise(points),
        "config": cfg0,
        "settings": settings,
        "total_seconds": round(time.time() - t_start, 1),
    }
    atomic_write_json(result, out / "compare.json")
    atomic_write_text(render_markdown(result), out / "compare.md")
    plot_compare(result, out / "compare.png")
    log(render_screen(result))
    return result
