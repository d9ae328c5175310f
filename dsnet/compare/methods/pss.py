"""Progressive sub-network search (SPEC 6.2, dsnet.search.pss), and a DS-Net gate on the searched set.

The search starts from the widest routed width trained alone (the ``alone``
method's widest network, trained once and shared) and targets the MACs of the
family's uniform routed sub-networks, so each searched sub-network meets one
uniform sub-network's budget: the comparison with uniform widths is at equal
MACs. ``pss_gate`` trains stage II on the searched supernet (its sub-networks
are the routing space).
"""

from __future__ import annotations

from pathlib import Path

from dsnet.compare.core import CompareContext, Method, Point, register_method, static_points, sweep_points
from dsnet.compare.methods.alone import alone_checkpoint, routed_widths

SEARCH = "pss/search"
GATE = "pss/gate"


def _alone_widest_key(ctx: CompareContext) -> str:
    return f"alone/net{len(routed_widths(ctx)) - 1}"


def uniform_targets(ctx: CompareContext) -> list[float]:
    """MACs of the family's uniform routed sub-networks: the search's targets."""
    from dsnet.models import create_model

    info = ctx.info
    kwargs = {"num_classes": info.num_classes, "in_chans": info.in_chans, **ctx.cfg["model"]["kwargs"]}
    model = create_model(ctx.cfg["model"]["name"], **kwargs)
    macs = model.subnet_macs((info.in_chans, info.image_size, info.image_size))
    return [float(macs[k]) for k in model.routing_space]


def searched_checkpoint(ctx: CompareContext) -> Path:
    from dsnet.search.pss import run_pss

    start = alone_checkpoint(ctx, len(routed_widths(ctx)) - 1)
    settings = ctx.settings["pss"]
    targets = None if settings.get("targets_mmacs") is not None else uniform_targets(ctx)
    ctx.stage(
        SEARCH,
        lambda out, resume: run_pss(
            start, ctx.cfg, settings, out, targets_macs=targets, device=ctx.device, progress=ctx.progress, log=ctx.log
        ),
        "progressive sub-network search from the widest network trained alone",
        {"config": ctx.cfg, "pss": settings, "targets": targets},
    )
    return ctx.stage_dir(SEARCH) / "best.ckpt"


class _PSSBase(Method):
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


@register_method
class ProgressiveSearch(_PSSBase):
    name = "pss"
    description = "progressive sub-network search: noise-ranked channel groups, nested non-uniform widths"

    def train(self, ctx: CompareContext) -> None:
        searched_checkpoint(ctx)

    def points(self, ctx: CompareContext) -> list[Point]:
        ckpt = ctx.stage_dir(SEARCH) / "best.ckpt"
        model = ctx.load(ckpt)
        return static_points(self.name, ctx.report(SEARCH, ckpt, model), model, lambda s: f"pss #{s['index']}")

    def stages(self, ctx: CompareContext) -> list[str]:
        return [_alone_widest_key(ctx), SEARCH]


@register_method
class SearchedGate(_PSSBase):
    name = "pss_gate"
    description = "DS-Net gate (stage II) over the searched sub-networks as routing space"

    def train(self, ctx: CompareContext) -> None:
        from dsnet.train.gate import train_gate

        supernet = searched_checkpoint(ctx)
        ctx.stage(
            GATE,
            lambda out, resume: train_gate(ctx.cfg, supernet, out, resume=resume),
            f"training a gate on the searched sub-networks, {ctx.cfg['gate']['epochs']} epochs",
            {"config": ctx.cfg, "pss": ctx.settings["pss"]},
        )

    def points(self, ctx: CompareContext) -> list[Point]:
        ckpt = ctx.stage_dir(GATE) / "best.ckpt"
        model = ctx.load(ckpt)
        return sweep_points(self.name, ctx.report(GATE, ckpt, model), model)

    def stages(self, ctx: CompareContext) -> list[str]:
        return [_alone_widest_key(ctx), SEARCH, GATE]
