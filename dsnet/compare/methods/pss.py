"""Progressive sub-network search (SPEC 6.2, dsnet.search.pss), a DS-Net gate on the searched set, and a control.

The search starts from the widest routed width trained alone (the ``alone``
method's widest network, trained once and shared) and targets the MACs of the
family's uniform routed sub-networks, so each searched sub-network meets one
uniform sub-network's budget: the comparison with uniform widths is at equal
MACs. ``pss_gate`` trains stage II on the searched supernet (its sub-networks
are the routing space).

``pss_uniform`` (and ``pss_uniform_gate``) is the control [ours]: the same
start, noise ranking, removal chain, fine-tuning and re-selection, but groups
are removed so that every searched stage keeps the same fraction of its width
(``pss.across=uniform``): the chain passes through the uniform widths. It
separates what the *width allocation* buys from what the search's training
(a network trained alone, then fine-tuned) buys, which the comparison with the
DS-Net supernet's uniform sub-networks mixes up.

**The same fine-tuning.** The search fine-tunes when its held-out accuracy
has fallen by ``pss.threshold``, so a control deciding for itself would
fine-tune a different number of times, and a gap between the two would be in
the weights, not the widths. The control therefore does not decide: it runs
the search first and repeats its fine-tuning schedule (``finetune_at_macs``
of :func:`dsnet.search.pss.run_pss`): one fine-tuning of ``pss.finetune_steps``
steps at the first chain member at or below each MAC count where the search
fine-tuned. Both run the same number of fine-tuning steps (``finetunes`` and
``finetune_steps_total`` in each ``summary.json``, ``notes`` in compare.json).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dsnet.compare.core import (
    CompareContext,
    Method,
    Point,
    gate_compute,
    register_method,
    static_points,
    sweep_points,
    without_sections,
)
from dsnet.compare.methods.alone import alone_checkpoint, routed_widths


def uniform_targets(ctx: CompareContext) -> list[float]:
    """MACs of the family's uniform routed sub-networks: the search's targets."""
    from dsnet.models import create_model

    info = ctx.info
    kwargs = {"num_classes": info.num_classes, "in_chans": info.in_chans, **ctx.cfg["model"]["kwargs"]}
    model = create_model(ctx.cfg["model"]["name"], **kwargs)
    macs = model.subnet_macs((info.in_chans, info.image_size, info.image_size))
    return [float(macs[k]) for k in model.routing_space]


class _Search(Method):
    """A search variant: ``across`` is the ``pss.across`` rule, ``key`` its stage folder."""

    across: str | None = None  # None: the pss.across setting
    key = "pss"
    follows: str | None = None  # the stage folder of the search whose fine-tuning schedule this one repeats

    def applicable(self, ctx: CompareContext) -> str | None:
        from dsnet.models import create_model
        from dsnet.search.channels import channel_map

        info = ctx.info
        kwargs = {"num_classes": info.num_classes, "in_chans": info.in_chans, **ctx.cfg["model"]["kwargs"]}
        try:
            channel_map(create_model(ctx.cfg["model"]["name"], **kwargs))
        except ValueError as err:
            return str(err)
        return None

    def settings(self, ctx: CompareContext) -> dict:
        settings = dict(ctx.settings["pss"])
        if self.across is not None:
            settings["across"] = self.across
        return settings

    def searched(self, ctx: CompareContext) -> Path:
        from dsnet.search.pss import run_pss

        start = alone_checkpoint(ctx, len(routed_widths(ctx)) - 1)
        settings = self.settings(ctx)
        targets = None if settings.get("targets_mmacs") is not None else uniform_targets(ctx)
        schedule = self.schedule(ctx)
        ctx.stage(
            f"{self.key}/search",
            lambda out, resume: run_pss(
                start,
                ctx.cfg,
                settings,
                out,
                targets_macs=targets,
                device=ctx.device,
                progress=ctx.progress,
                log=ctx.log,
                finetune_at_macs=schedule,
            ),
            f"progressive sub-network search (across={settings['across']}) from the widest network trained alone"
            + ("" if schedule is None else f", fine-tuning where {self.follows} did ({len(schedule)} times)"),
            {
                "config": without_sections(ctx.cfg, ("gate", "lcnet")),  # sections it never reads
                "pss": settings,
                "targets": targets,
                **({} if schedule is None else {"finetune_at_macs": schedule}),
            },
            compute=lambda out: search_compute(ctx, out),
        )
        return ctx.stage_dir(f"{self.key}/search") / "best.ckpt"

    def schedule(self, ctx: CompareContext) -> list[float] | None:
        """The MACs at which the followed search fine-tuned (running it first), or None for a search of its own."""
        if self.follows is None:
            return None
        lead = _Search()
        lead.key = self.follows
        lead.searched(ctx)
        summary = json.loads((ctx.stage_dir(f"{self.follows}/search") / "summary.json").read_text())
        schedule = [float(c["macs"]) for c in summary["chain"] if c["finetuned"]]
        if len(schedule) != summary["finetunes"]:
            raise RuntimeError(f"{self.follows}/search: {summary['finetunes']} fine-tunings, {len(schedule)} marked")
        return schedule

    def notes(self, ctx: CompareContext) -> dict[str, Any]:
        path = ctx.stage_dir(f"{self.key}/search") / "summary.json"
        if not path.is_file():
            return {}
        summary = json.loads(path.read_text())
        return {
            "finetunes": summary["finetunes"],
            "finetune_steps_total": summary.get("finetune_steps_total"),
            "finetune_schedule": "threshold" if self.follows is None else f"repeats {self.follows}'s",
        }

    def search_stages(self, ctx: CompareContext) -> list[str]:
        return [f"alone/net{len(routed_widths(ctx)) - 1}", f"{self.key}/search"]


class _SearchStatic(_Search):
    def train(self, ctx: CompareContext) -> None:
        self.searched(ctx)

    def points(self, ctx: CompareContext) -> list[Point]:
        key = f"{self.key}/search"
        ckpt = ctx.stage_dir(key) / "best.ckpt"
        model = ctx.load(ckpt)
        return static_points(self.name, ctx.report(key, ckpt, model), model, lambda s: f"{self.name} #{s['index']}")

    def stages(self, ctx: CompareContext) -> list[str]:
        return self.search_stages(ctx)


class _SearchGate(_Search):
    def train(self, ctx: CompareContext) -> None:
        from dsnet.train.gate import train_gate

        supernet = self.searched(ctx)
        ctx.stage(
            f"{self.key}/gate",
            lambda out, resume: train_gate(ctx.cfg, supernet, out, resume=resume),
            f"training a gate on the {self.key} sub-networks, {ctx.cfg['gate']['epochs']} epochs",
            {"config": without_sections(ctx.cfg, ("lcnet",)), "pss": self.settings(ctx)},
            compute=gate_compute(ctx, ctx.cfg, len(ctx.load(supernet).routing_space)),
        )

    def points(self, ctx: CompareContext) -> list[Point]:
        key = f"{self.key}/gate"
        ckpt = ctx.stage_dir(key) / "best.ckpt"
        model = ctx.load(ckpt)
        return sweep_points(self.name, ctx.report(key, ckpt, model), model)

    def stages(self, ctx: CompareContext) -> list[str]:
        return [*self.search_stages(ctx), f"{self.key}/gate"]


@register_method
class ProgressiveSearch(_SearchStatic):
    name = "pss"
    description = "progressive sub-network search: noise-ranked channel groups, nested non-uniform widths"


@register_method
class SearchedGate(_SearchGate):
    name = "pss_gate"
    description = "DS-Net gate (stage II) over the searched sub-networks as routing space"


@register_method
class UniformSearchControl(_SearchStatic):
    name = "pss_uniform"
    description = "control: the search's training with uniform widths (pss.across=uniform)"
    across = "uniform"
    key = "pss_uniform"
    follows = "pss"


@register_method
class UniformSearchGate(_SearchGate):
    name = "pss_uniform_gate"
    description = "control: a gate over the uniform widths of pss_uniform"
    across = "uniform"
    key = "pss_uniform"
    follows = "pss"


def search_compute(ctx: CompareContext, out: Path) -> dict[str, Any]:
    """A finished search's passes, from its ``summary.json``: fine-tuning and noise learning forward+backward;
    held-out evaluations (each with its BN recalibration) and the final re-selection, forward only."""
    summary = json.loads((out / "summary.json").read_text())
    data, s = ctx.cfg["data"], summary["settings"]
    holdout = int(data["holdout"])
    if s.get("eval_batches") is not None:
        holdout = min(holdout, int(s["eval_batches"]) * int(data["eval_batch_size"]))
    batch = int(data["batch_size"])
    evaluations = int(summary.get("evaluations", 0))
    per_eval = holdout / batch + int(s["calibration_batches"])  # in training-batch equivalents
    final = len(summary["chain"]) * int(data["holdout"]) / batch + int(s["calibration_batches"])
    return {
        "steps": int(summary.get("finetune_steps_total", 0)),
        "fwd_bwd": int(summary.get("finetune_passes", 0)) + int(summary.get("noise_passes", 0)),
        "fwd_only": round(evaluations * per_eval + final),
        "batch_size": batch,
        "how": f"{summary['finetunes']} fine-tunings x {s['finetune_steps']} steps over the nested set "
        f"({summary.get('finetune_passes', 0)} passes) + {summary['rankings']} noise rankings x "
        f"{s['noise_steps']} steps; {evaluations} held-out evaluations forward only",
    }
