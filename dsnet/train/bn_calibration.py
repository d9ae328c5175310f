"""BatchNorm recalibration: fresh running statistics for every sub-network (SPEC section 1).

During supernet training each width's statistics are updated only on the
steps that sampled it, with a momentum that mixes in stale weights; after
training they are reset and re-estimated as a plain (cumulative) average over
training batches, forward only, for each sub-network in turn.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from dsnet.models.base import DynamicNet

__all__ = ["calibrate_bn"]


@torch.no_grad()
def calibrate_bn(
    model: DynamicNet,
    loader: Iterable,
    num_batches: int,
    subnets: Sequence[int] | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> DynamicNet:
    """Reset and re-estimate the BN statistics of ``subnets`` (default: all).

    Only statistics change: parameters are untouched (the forward passes run
    without gradient). Slots shared by several sub-networks (the pre-gate
    stages) are averaged over all of their passes.
    """
    if num_batches < 1:
        raise ValueError(f"BN recalibration needs at least one batch, got {num_batches}")
    subnets = list(range(len(model.subnets))) if subnets is None else list(subnets)
    for k in subnets:
        model.check_subnet(k)
    bns = model.sliced_batchnorms()
    slots = sorted({s for k in subnets for s in model.slots(k)})
    momenta = [bn.momentum for bn in bns]
    flags = [(m, m.training) for m in model.modules()]
    for bn in bns:
        bn.running_mean[slots] = 0.0
        bn.running_var[slots] = 1.0
        bn.num_batches_tracked[slots] = 0
        bn.momentum = None  # cumulative average
    model.train()
    bar = tqdm(
        total=num_batches * len(subnets), desc="BN recalibration", disable=None if progress else True, leave=False
    )
    try:
        for k in subnets:
            for i, batch in enumerate(loader):
                if i >= num_batches:
                    break
                images = batch[0]
                images = images[0] if isinstance(images, (list, tuple)) else images
                model(images.to(device, non_blocking=True), subnet=k)
                bar.update(1)
    finally:
        bar.close()
        for bn, m in zip(bns, momenta, strict=True):
            bn.momentum = m
        for m, flag in flags:
            m.training = flag
    return model
