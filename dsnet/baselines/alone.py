"""Networks trained alone (SPEC 6.3): each routed sub-network's architecture, trained by itself.

A network trained alone is the family model with a single explicit
sub-network (``subnet_widths=[widths]``): exactly the layers, widths and gate
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

__all__ = ["alone_widths", "alone_config"]


def alone_widths(cfg: dict, num_classes: int, in_chans: int) -> list[list[int]]:
    """The widths of every sub-network in the routing space of ``cfg``'s model, slimmest first."""
    kwargs = {"num_classes": num_classes, "in_chans": in_chans, **cfg["model"]["kwargs"]}
    model = create_model(cfg["model"]["name"], **kwargs)
    return [list(model.subnets[k].widths) for k in model.routing_space]


def alone_config(cfg: dict, widths: Sequence[int]) -> dict[str, Any]:
    """The stage I config that trains the network of ``widths`` alone, on ``cfg``'s data and schedule."""
    cfg = copy.deepcopy(cfg)
    kwargs = {k: v for k, v in cfg["model"]["kwargs"].items() if k not in ("subnet_widths", "routing_space")}
    cfg["model"]["kwargs"] = {**kwargs, "subnet_widths": [list(widths)]}
    cfg["supernet"]["distill"] = "none"
    cfg["supernet"]["width_sampling"] = "discrete"
    return cfg
