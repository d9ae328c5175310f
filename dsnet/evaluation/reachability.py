"""Which routing choices a gate can reach at all, at any value of its knob [ours].

Every operating point of a gate is ``argmax_j (s_j + b * d_j)``: scores ``s``
(the gate logits, or the utility router's probabilities), the model's
``bias_direction`` ``d`` and one scalar knob ``b``. For one image, choice ``j``
wins for some ``b`` exactly when ``(d_j, s_j)`` is a vertex of the upper convex
hull of the points ``(d_k, s_k)``: the set of ``b`` where ``j`` wins is an
interval (the intersection of one half-line per rival), and it is non-empty
iff its lower end is below its upper end. A choice that no image can reach is
dead weight whatever budget is asked for -- with SGS-trained logits the middle
widths typically are.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from dsnet.models.base import DynamicNet
from dsnet.utils.modes import temporary_mode

__all__ = ["reachable_choices", "reachability_summary", "routing_reachability"]


def reachable_choices(scores: Tensor, direction: Tensor) -> Tensor:
    """``(N, R)`` bool: whether choice ``j`` is image ``i``'s ``argmax(scores_i + b * direction)`` for some real ``b``.

    Exact (float64), with ``argmax``'s tie rule (the first maximal index
    wins); a choice that can only tie, at a single ``b``, counts as
    unreachable.
    """
    s = torch.as_tensor(scores).double()
    d = torch.as_tensor(direction).double().to(s.device).flatten()
    if s.dim() != 2 or s.shape[1] != d.numel():
        raise ValueError(
            f"scores must be (N, {d.numel()}) for a direction of {d.numel()} choices, got {tuple(s.shape)}"
        )
    r = d.numel()
    ds = s[:, :, None] - s[:, None, :]  # (N, j, k): s_j - s_k
    dd = (d[:, None] - d[None, :]).expand_as(ds)  # d_j - d_k
    # j beats k at b iff ds + b * dd > 0: a lower bound on b where dd > 0, an upper one where dd < 0
    t = -ds / dd.where(dd != 0, torch.ones_like(dd))
    inf = torch.full_like(t, float("inf"))
    lower = torch.where(dd > 0, t, -inf).amax(dim=2)
    upper = torch.where(dd < 0, t, inf).amin(dim=2)
    # equal directions: the bias never separates them; j needs the higher score (ties go to the lower index)
    earlier = torch.ones(r, r, dtype=torch.bool, device=s.device).tril(-1)  # k < j
    need = torch.where(earlier, ds > 0, ds >= 0)
    ok = torch.where(dd == 0, need, torch.ones_like(need)).all(dim=2)
    return ok & (lower < upper)


def reachability_summary(scores: Tensor, direction: Tensor, router: str | None = None) -> dict[str, Any]:
    """The report entry: per choice, the share of images it wins for some knob value (JSON-serialisable).

    ``{router, direction: [R], reachable_fraction: [R], mean_reachable_choices, num_samples}``.
    """
    mask = reachable_choices(scores, direction)
    n = int(mask.shape[0])
    fractions = mask.double().mean(dim=0).tolist() if n else [0.0] * int(mask.shape[1])
    return {
        "router": router,
        "direction": [float(v) for v in torch.as_tensor(direction).flatten().tolist()],
        "reachable_fraction": [float(f) for f in fractions],
        "mean_reachable_choices": float(mask.sum(dim=1).double().mean()) if n else 0.0,
        "num_samples": n,
    }


@torch.inference_mode()
def routing_reachability(
    model: DynamicNet, loader: Iterable, *, device: str | torch.device = "cpu", max_batches: int | None = None
) -> dict[str, Any]:
    """For each routing choice, the fraction of ``loader``'s images it wins at SOME value of the knob ``b``.

    Reads the gate's deployed scores (``model.gate_logits``: the stored
    budget bias included, which moves along the same direction and so changes
    nothing here) and ``model.bias_direction`` at the images' size. Returns
    :func:`reachability_summary`'s dict. The model is left in its mode.
    """
    if not isinstance(model, DynamicNet):
        raise TypeError(f"routing_reachability needs a dynamic dsnet model, got {type(model).__name__}")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be at least 1, got {max_batches}")
    device = torch.device(device)
    scores, input_size = [], None
    with temporary_mode(model.to(device), False):
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            images = batch["image"] if isinstance(batch, dict) else batch[0]
            images = images.to(device)
            if images.shape[0] == 0:
                continue
            input_size = tuple(int(v) for v in images.shape[1:])
            h, z = model.forward_pre(images, model.routing_space[0])
            scores.append(model.gate_logits(h, z)[0].float().cpu())
    if input_size is None:
        raise ValueError("routing_reachability: the loader yielded no images")
    return reachability_summary(torch.cat(scores), model.bias_direction(input_size), model.router)
