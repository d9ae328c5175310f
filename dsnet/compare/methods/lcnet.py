"""LC-Net (SPEC 6.1): per-input block and channel skipping, DS-Net's rival, on the same data and epochs.

The LC-Net counterpart of the compared family (``ds_resnet8_tiny`` ->
``lc_resnet8_tiny``) is trained by :func:`dsnet.train.lcnet.train_lcnet` with
the recipe's data, batch, learning rate and epochs (the LC-Net recipe's
defaults otherwise: C-Net density 0.5, ConvNet-AIG rate target 0.6); its best
epoch and skip thresholds come from the held-out slice like every method's.
Its points are the run-time skip-bias sweep (``--set eval.lcnet_skip_biases=[...]``),
evaluated once on the test split and timed as real skipping inference
(skipped blocks not computed), with each exact channel implementation --
``gather`` (kept channels gathered per sample) and ``mask`` (full width,
dropped channels zeroed: the same outputs) -- timed at each batch size and the
fastest reported (``impl_b1``, ``impl_batch`` in compare.json).
"""

from __future__ import annotations

import copy
from typing import Any

from dsnet.compare.core import CompareContext, Method, Point, register_method
from dsnet.models import list_models
from dsnet.train.config import OPTIMISER_KEYS

__all__ = ["lcnet_model_name", "lcnet_config"]

STAGE = "lcnet"
DENSITY = 0.5  # the LC-Net recipe's C-Net density (configs/lcnet_fashion_mnist.yaml)
EXACT = ("gather", "mask")  # channel modes with the same outputs ("prefix" computes another function)


def lcnet_model_name(name: str) -> str | None:
    """The registered LC-Net of a DS-Net family (``ds_resnet20_cifar`` -> ``lc_resnet20_cifar``), or None."""
    candidate = "lc_" + name.removeprefix("ds_")
    return candidate if candidate in list_models(kind="lcnet") else None


def lcnet_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The compared recipe turned into an LC-Net recipe: same data, seed, optimiser settings and epochs."""
    name = lcnet_model_name(cfg["model"]["name"])
    if name is None:
        raise ValueError(f"no LC-Net counterpart of {cfg['model']['name']!r}")
    out = copy.deepcopy(cfg)
    kwargs = {k: v for k, v in cfg["model"]["kwargs"].items() if k in ("num_classes", "in_chans")}
    out["model"] = {"name": name, "kwargs": {**kwargs, "density": DENSITY}, "checkpoint_path": None}
    sc, lc = cfg["supernet"], out["lcnet"]
    for key in (*OPTIMISER_KEYS, "grad_clip"):
        lc[key] = sc[key]
    lc["final_eval"] = False  # the comparison evaluates the test split itself, once
    return out


@register_method
class LCNet(Method):
    name = "lcnet"
    description = "LC-Net: per-input block skipping (L-Nets) and channel gathering (C-Nets), same epochs"

    def applicable(self, ctx: CompareContext) -> str | None:
        if lcnet_model_name(ctx.cfg["model"]["name"]) is None:
            return f"LC-Net exists for the ResNet families only ({', '.join(list_models(kind='lcnet'))})"
        return None

    def train(self, ctx: CompareContext) -> None:
        from dsnet.train.lcnet import train_lcnet

        cfg = lcnet_config(ctx.cfg)
        ctx.stage(
            STAGE,
            lambda out, resume: train_lcnet(cfg, out, resume=resume),
            f"training {cfg['model']['name']}, {cfg['lcnet']['epochs']} epochs",
            cfg,
            ignore=("gate", "supernet"),  # the supernet's optimiser settings are copied into lcnet
            compute=lambda out: _compute(ctx, cfg),
        )

    def points(self, ctx: CompareContext) -> list[Point]:
        from dsnet.train.lcnet import evaluate_lcnet

        ckpt = ctx.stage_dir(STAGE) / "best.ckpt"
        model = ctx.load(ckpt)
        biases = [float(b) for b in ctx.settings["eval"]["lcnet_skip_biases"]]

        def compute() -> dict[str, Any]:
            ctx.log(f"[compare] lcnet: evaluating {len(biases)} skip biases on the test split")
            found = evaluate_lcnet(model, ctx.loader("val"), ctx.device, skip_biases=biases, progress=ctx.progress)
            return {"skip_biases": biases, "points": found}

        cached = ctx.cached(STAGE, ckpt, compute, lambda cached: cached.get("skip_biases") == biases)
        points = []
        for p in cached["points"]:
            b = float(p["skip_bias"])
            points.append(
                Point(
                    "lcnet (trained)" if b == 0.0 else f"lcnet skip bias {b:+g}",
                    self.name,
                    p["top1"],
                    float(p["mean_macs"]),
                    "dynamic",
                    {"skip_bias": b, "density": p["density"], "exec_rate": p["exec_rate"]},
                    lambda x, b=b: model(x, skip_bias=b),
                    variants={mode: (lambda x, b=b, m=mode: model(x, skip_bias=b, channel_mode=m)) for mode in EXACT},
                )
            )
        return points

    def stages(self, ctx: CompareContext) -> list[str]:
        return [STAGE]


def _compute(ctx: CompareContext, cfg: dict[str, Any]) -> dict[str, Any]:
    """One LC-Net forward+backward per step (full-width model with its skip and channel gates)."""
    lc = cfg["lcnet"]
    steps = lc["epochs"] * ctx.steps_per_epoch(cfg)
    return {
        "steps": steps,
        "fwd_bwd": steps,
        "fwd_only": 0,
        "batch_size": cfg["data"]["batch_size"],
        "how": f"{lc['epochs']} epochs x {steps // max(1, lc['epochs'])} steps x 1 network (gates trained jointly)",
    }
