"""US-Nets (SPEC 6.3): universally slimmable training over a fine width grid, no gate (see dsnet.baselines.usnet)."""

from __future__ import annotations

from dsnet.baselines.usnet import usnet_config
from dsnet.compare.core import CompareContext, Method, Point, register_method, static_points, supernet_compute

STAGE = "usnet"


@register_method
class USNet(Method):
    name = "usnet"
    description = "US-Nets: sandwich rule over continuous widths, in-place distillation, per-width BN calibration"

    def train(self, ctx: CompareContext) -> None:
        from dsnet.train.supernet import train_supernet

        cfg = usnet_config(ctx.cfg, ctx.settings["usnet"]["r_min"])
        n = len(cfg["model"]["kwargs"]["subnet_widths"])
        ctx.stage(
            STAGE,
            lambda out, resume: train_supernet(cfg, out, resume=resume),
            f"training a US-Net over {n} widths, {cfg['supernet']['epochs']} epochs",
            cfg,
            ignore=("gate", "lcnet"),
            compute=supernet_compute(ctx, cfg),
        )

    def points(self, ctx: CompareContext) -> list[Point]:
        ckpt = ctx.stage_dir(STAGE) / "best.ckpt"
        model = ctx.load(ckpt)
        report = ctx.report(STAGE, ckpt, model)
        return static_points(self.name, report, model, lambda s: f"usnet w={model.width_ratio(s['index']):.3f}")

    def stages(self, ctx: CompareContext) -> list[str]:
        return [STAGE]
