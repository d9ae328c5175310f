"""DS-Net (stage I + BN recalibration + stage II gate), its static sub-networks, and the confidence cascade.

All three share one supernet, trained with the run's recipe (the quickstart's
by default). The gate's points are its budget sweep (the trained gate is the
bias-0 point); the static points are the routed sub-networks and the
training-only largest; the cascade (SPEC 6.3: run the slimmest routed
sub-network, and the widest too for samples whose top softmax is below a
threshold) comes from the evaluation report's ``baselines`` when
``dsnet.evaluation.evaluate`` provides them.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from dsnet.compare.core import (
    CompareContext,
    Method,
    Point,
    gate_compute,
    register_method,
    static_points,
    supernet_compute,
    sweep_points,
)
from dsnet.models.base import DynamicNet

__all__ = ["supernet_checkpoint", "cascade_forward"]

SUPERNET = "dsnet/supernet"
GATE = "dsnet/gate"


def supernet_checkpoint(ctx: CompareContext) -> Path:
    """Stage I (+ BN recalibration) of the run's recipe; shared by dsnet, static and cascade."""
    from dsnet.train.supernet import train_supernet

    ctx.stage(
        SUPERNET,
        lambda out, resume: train_supernet(ctx.cfg, out, resume=resume),
        f"training the DS-Net supernet, {ctx.cfg['supernet']['epochs']} epochs",
        ctx.cfg,
        ignore=("gate", "lcnet"),
        compute=supernet_compute(ctx, ctx.cfg),
    )
    return ctx.stage_dir(SUPERNET) / "best.ckpt"


def cascade_forward(model: DynamicNet, x: Tensor, threshold: float) -> Tensor:
    """Slimmest routed sub-network for every sample; the widest too where its top softmax is below ``threshold``.

    The pre-gate part runs once for both (SPEC 6.3); only the uncertain samples
    pay for the widest's post-gate part.
    """
    space = model.routing_space
    h, _ = model.forward_pre(x, space[0])
    out = model.forward_post(h, space[0])
    unsure = (out.softmax(-1).amax(-1) < threshold).nonzero().flatten()
    if unsure.numel():
        out = out.index_copy(0, unsure, model.forward_post(h.index_select(0, unsure), space[-1]))
    return out


@register_method
class DSNetGate(Method):
    name = "dsnet"
    description = "DS-Net: supernet + BN recalibration + gate (stage II); the gate-bias sweep"

    def train(self, ctx: CompareContext) -> None:
        from dsnet.train.gate import train_gate

        supernet = supernet_checkpoint(ctx)
        ctx.stage(
            GATE,
            lambda out, resume: train_gate(ctx.cfg, supernet, out, resume=resume),
            f"training the gate, {ctx.cfg['gate']['epochs']} epochs",
            ctx.cfg,
            ignore=("lcnet",),
            compute=gate_compute(ctx, ctx.cfg, len(ctx.load(supernet).routing_space)),
        )

    def points(self, ctx: CompareContext) -> list[Point]:
        ckpt = ctx.stage_dir(GATE) / "best.ckpt"
        model = ctx.load(ckpt)
        return sweep_points(self.name, ctx.report(GATE, ckpt, model), model)

    def stages(self, ctx: CompareContext) -> list[str]:
        return [SUPERNET, GATE]


@register_method
class StaticSubnets(Method):
    name = "static"
    description = "the DS-Net supernet's static sub-networks (uniform widths), no gate"

    def train(self, ctx: CompareContext) -> None:
        supernet_checkpoint(ctx)

    def points(self, ctx: CompareContext) -> list[Point]:
        ckpt = ctx.stage_dir(SUPERNET) / "best.ckpt"
        model = ctx.load(ckpt)
        report = ctx.report(SUPERNET, ckpt, model)

        def label(s: dict) -> str:
            return f"static #{s['index']}" + ("" if s["routed"] else " (largest)")

        return static_points(self.name, report, model, label, routed_only=False)

    def stages(self, ctx: CompareContext) -> list[str]:
        return [SUPERNET]


@register_method
class ConfidenceCascade(Method):
    name = "cascade"
    description = "confidence cascade on the DS-Net supernet: slimmest, then widest below a softmax threshold"

    def train(self, ctx: CompareContext) -> None:
        supernet_checkpoint(ctx)

    def points(self, ctx: CompareContext) -> list[Point]:
        ckpt = ctx.stage_dir(SUPERNET) / "best.ckpt"
        model = ctx.load(ckpt)
        report = ctx.report(SUPERNET, ckpt, model, require="baselines")
        cascade = (report.get("baselines") or {}).get("cascade")
        if not cascade:
            ctx.log(
                "[compare] cascade: the evaluation report has no baselines.cascade (a report of an older "
                "dsnet); skipped"
            )
            return []
        points = []
        for i, p in enumerate(sorted(cascade, key=lambda p: p["mean_macs"])):
            t = float(p["threshold"])
            points.append(
                Point(
                    f"cascade {i + 1}/{len(cascade)}",  # by index, as the sweeps: seeds average point by point
                    self.name,
                    p["top1"],
                    float(p["mean_macs"]),
                    "cascade",
                    {"threshold": t},
                    lambda x, t=t: cascade_forward(model, x, t),
                )
            )
        return points

    def stages(self, ctx: CompareContext) -> list[str]:
        return [SUPERNET]
