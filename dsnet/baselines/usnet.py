"""US-Nets (universally slimmable networks, Yu & Huang 2019) in dsnet's supernet framework (SPEC 6.3).

US-Nets train one network for *any* width multiplier in ``[r_min, 1]``: the
sandwich rule over continuous random widths, in-place distillation from the
widest, no gate, and BatchNorm statistics calibrated per width after training;
the user picks the width at run time. In dsnet:

* **Width grid.** Channel counts are rounded to the stage's channel multiple
  (8 for CNNs, whole heads for ViTs), so a continuous multiplier ``r`` maps to
  one of finitely many width tuples: :func:`usnet_widths` lists every distinct
  one, ``r_min`` to 1, as an explicit sub-network list. That grid *is* the
  continuum at this granularity: no width the rounding can produce is missing.
* **Which stages slim.** The multiplier scales every stage after the gate of
  the family's DS-Net configuration; the stages before the gate stay at its
  pre-gate width [ours]: every method of ``dsnet compare`` then shares one
  trunk and one MAC range, and the US-Net's sub-networks form a valid routing
  space.
* **Training** is stage I with ``supernet.width_sampling=continuous`` (the
  random widths are ``r ~ U[r_min, 1]``, mapped to the nearest grid point)
  and ``supernet.distill=inplace`` (the widest's own detached prediction is
  the students' target); no gate is trained.
* **BN calibration** per width after training is stage I's recalibration over
  every grid point.
* **Run time:** ``model(x, width=0.6)`` runs the grid point nearest the
  multiplier (:meth:`dsnet.models.DynamicNet.subnet_for_width`).
"""

from __future__ import annotations

import copy
from typing import Any

from dsnet.models import create_model
from dsnet.models.base import DynamicNet

__all__ = ["usnet_widths", "usnet_config"]


def _round(value: float, multiple: int, cap: int) -> int:
    return min(cap, max(multiple, int(round(value / multiple)) * multiple))


def usnet_widths(model: DynamicNet, r_min: float | None = None, resolution: int = 1000) -> list[list[int]]:
    """Every distinct width tuple a multiplier in ``[r_min, 1]`` gives, slimmest first.

    The widest routed sub-network of ``model`` is the multiplier-1 network;
    ``r_min`` defaults to the slimmest routed sub-network's multiplier. Stages
    before the gate keep their (shared) width.
    """
    routed = [s for s in model.subnets if s.routed]
    widest = routed[-1].widths
    if r_min is None:
        r_min = model.width_ratio(routed[0].index)
    if not 0.0 < r_min <= 1.0:
        raise ValueError(f"usnet r_min must be in (0, 1], got {r_min}")
    grid: list[list[int]] = []
    for i in range(resolution + 1):
        r = r_min + (1.0 - r_min) * i / resolution
        widths = [
            w if s < model.gate_stage else _round(w * r, model.width_multiple(s), w) for s, w in enumerate(widest)
        ]
        if not grid or widths != grid[-1]:
            grid.append(widths)
    return grid


def usnet_config(cfg: dict, r_min: float | None = None) -> dict[str, Any]:
    """The stage I config that trains a US-Net of ``cfg``'s model family on ``cfg``'s data and schedule."""
    from dsnet.data import build_dataset

    cfg = copy.deepcopy(cfg)
    _, info = build_dataset(cfg["data"], "val")
    kwargs = {"num_classes": info.num_classes, "in_chans": info.in_chans, **cfg["model"]["kwargs"]}
    kwargs.pop("subnet_widths", None)
    family = create_model(cfg["model"]["name"], **kwargs)
    cfg["model"]["kwargs"] = {**cfg["model"]["kwargs"], "subnet_widths": usnet_widths(family, r_min)}
    cfg["supernet"]["distill"] = "inplace"
    cfg["supernet"]["width_sampling"] = "continuous"
    return cfg
