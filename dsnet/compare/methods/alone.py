"""Networks trained alone (SPEC 6.3): every routed sub-network's architecture, trained by itself, same epochs."""

from __future__ import annotations

from pathlib import Path

from dsnet.baselines.alone import alone_config, alone_kernels, alone_widths
from dsnet.compare.core import CompareContext, Method, Point, register_method, static_points, supernet_compute

__all__ = ["routed_widths", "alone_checkpoint"]


def routed_widths(ctx: CompareContext) -> list[list[int]]:
    """The widths of the family's routed sub-networks (the DS-Net routing space), slimmest first."""
    info = ctx.info
    return alone_widths(ctx.cfg, info.num_classes, info.in_chans)


def alone_checkpoint(ctx: CompareContext, k: int) -> Path:
    """Train (or reuse) the network of routed width ``k`` alone; shared with progressive search (the widest)."""
    from dsnet.train.supernet import train_supernet

    widths = routed_widths(ctx)[k]
    cfg = alone_config(ctx.cfg, widths, alone_kernels(ctx.cfg, ctx.info.num_classes, ctx.info.in_chans)[k])
    key = f"alone/net{k}"
    ctx.stage(
        key,
        lambda out, resume: train_supernet(cfg, out, resume=resume),
        f"training {widths} alone, {cfg['supernet']['epochs']} epochs",
        cfg,
        ignore=("gate", "lcnet"),
        compute=supernet_compute(ctx, cfg),
    )
    return ctx.stage_dir(key) / "best.ckpt"


@register_method
class TrainedAlone(Method):
    name = "alone"
    description = "each routed width trained alone with the same epochs"

    def train(self, ctx: CompareContext) -> None:
        for k in range(len(routed_widths(ctx))):
            alone_checkpoint(ctx, k)

    def points(self, ctx: CompareContext) -> list[Point]:
        points = []
        for k in range(len(routed_widths(ctx))):
            key = f"alone/net{k}"
            ckpt = ctx.stage_dir(key) / "best.ckpt"
            model = ctx.load(ckpt)
            points += static_points(self.name, ctx.report(key, ckpt, model), model, lambda s, k=k: f"alone #{k}")
        return points

    def stages(self, ctx: CompareContext) -> list[str]:
        return [f"alone/net{k}" for k in range(len(routed_widths(ctx)))]
