"""Networks trained alone (SPEC 6.3): each routed sub-network's architecture, trained by itself.

A network trained alone is the family model with a single explicit
sub-network (``subnet_widths=[widths]``, with ``subnet_kernels=[kernels]``
for a family that slices kernels): exactly the layers, widths and gate
attention of that supernet sub-network, nothing shared. Stage I trains it with
the same data, epochs and schedule as the supernet; with one sub-network the
sandwich rule degenerates to that network on the labels
(``supernet.distill=none``: label-smoothed cross-entropy, no teacher), then its
BatchNorm statistics are recalibrated like every other model's.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from dsnet.models import create_model

__all__ = ["alone_widths", "alone_kernels", "alone_config"]


def _routed(cfg: dict, num_classes: int, in_chans: int) -> list:
    kwargs = {"num_classes": num_classes, "in_chans": in_chans, **cfg["model"]["kwargs"]}
    model = create_model(cfg["model"]["name"], **kwargs)
    return [model.subnets[k] for k in model.routing_space]


def alone_widths(cfg: dict, num_classes: int, in_chans: int) -> list[list[int]]:
    """The widths of every sub-network in the routing space of ``cfg``'s model, slimmest first."""
    return [list(s.widths) for s in _routed(cfg, num_classes, in_chans)]


def alone_kernels(cfg: dict, num_classes: int, in_chans: int) -> list[list[int] | None]:
    """Their kernel sizes per stage (families that slice kernels; None for the others), in the same order.

    Two routing choices of a kernel-slicing family can share their widths and differ in kernels only: pass
    each one's kernels to :func:`alone_config` with its widths.
    """
    return [None if s.kernels is None else list(s.kernels) for s in _routed(cfg, num_classes, in_chans)]


def alone_config(cfg: dict, widths: Sequence[int], kernels: Sequence[int] | None = None) -> dict[str, Any]:
    """The stage I config that trains the network of ``widths`` (and ``kernels``) alone, on ``cfg``'s data, schedule."""
    cfg = copy.deepcopy(cfg)
    own = ("subnet_widths", "subnet_kernels", "routing_space")
    kwargs = {k: v for k, v in cfg["model"]["kwargs"].items() if k not in own}
    cfg["model"]["kwargs"] = {**kwargs, "subnet_widths": [list(widths)]}
    if kernels is not None:
        cfg["model"]["kwargs"]["subnet_kernels"] = [list(kernels)]
    cfg["supernet"]["distill"] = "none"
    cfg["supernet"]["width_sampling"] = "discrete"
    return cfg
