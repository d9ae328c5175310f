"""Stage I from trained weights: the teacher, a fine-tuning schedule, the source's widths routed.

A supernet run *starts from trained weights* when ``model.checkpoint_path``
is set (any format :func:`~dsnet.models.pretrained.load_pretrained` reads: a
torchvision/timm network, a user's network made dynamic by ``make_dynamic``
through a ``module:factory`` name, a dsnet checkpoint) or when
``supernet.teacher: source`` says the model as built already holds them (a
factory that loads its own weights). Such a run must not lose what it starts
from, so by default (issue 19):

* **teacher** (``supernet.teacher: auto`` -> ``distill``): what
  ``supernet.distill`` says, as from scratch (by default the labels, for every
  sandwich member). ``supernet.teacher: source`` makes a frozen copy of the
  source network -- the largest sub-network as loaded, before any step, in
  eval mode, no gradients -- the other sub-networks' target (probabilities,
  temperature 1; the largest keeps training on the labels). Measured on
  Fashion-MNIST (docs/results.md, 2 seeds, two data sizes) the labels route
  1.3-2.4 points better: the students of a frozen source learn its answers and
  stay near them (the largest ends higher too: +0.04 to +3.0 points over the
  source on the held-out slice, against -0.25 to +1.4).
* **schedule** (``supernet.finetune_lr_scale: 0.3``,
  ``supernet.finetune_warmup_epochs: 0``): the recipe's lr and min_lr are
  scaled down (a from-scratch lr moves trained weights far from where they
  were good; x0.3 beat x0.1 and x1.0 with labels, same page) and the warm-up
  is not restarted.
* **routed range** (``supernet.finetune_pre_gate_ratio: 1.0``): the paper's
  models run every stage before the gate at the slimmest width, so the source
  network (every stage at full width) is only the training-only largest and
  no routed sub-network computes it: right after the import every routed one
  sits near chance. With the stages before the gate at full width the widest
  routed sub-network *is* the source network. The model is built with that
  ``pre_gate_ratio`` when it takes one, the model does not set one itself in
  ``model.kwargs``, and the source loads into it (a dsnet or official DS-Net
  supernet fixes its own sub-networks and keeps them).

The source's top-1 on the selection (held-out) split is measured once at the
start (``source_holdout_top1`` in the run summary); at the end of stage I a
largest sub-network below it is a one-line warning, in the summary too.
From random weights nothing here applies: the recipe's schedule, the model's
own routed range, and ``supernet.distill`` picks the teacher.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from dsnet.models.base import DynamicNet
from dsnet.models.pretrained import ImportReport, load_pretrained

__all__ = [
    "FinetunePlan",
    "SourceStart",
    "plan_finetune",
    "starts_from_trained",
    "build_start_model",
    "describe_plan",
    "frozen_teacher",
    "source_warning",
]

TEACHERS = ("auto", "source", "distill")


def starts_from_trained(cfg: dict) -> bool:
    """Whether stage I starts from trained weights: ``model.checkpoint_path`` set, or ``supernet.teacher: source``."""
    return bool(cfg["model"].get("checkpoint_path")) or cfg["supernet"].get("teacher") == "source"


@dataclass(frozen=True)
class FinetunePlan:
    """What stage I does about its starting weights (chosen from the config by :func:`plan_finetune`)."""

    from_trained: bool
    teacher: str  # "source": the frozen source network; "distill": supernet.distill decides
    teacher_choice: str  # supernet.teacher as configured ("auto", "source", "distill")
    distill: str  # what the students learn from, as supernet_step takes it ("source", "ib", "none", ...)
    lr_scale: float
    warmup_epochs: float
    pre_gate_ratio: float | None  # asked for (None: the model's own)

    def as_dict(self) -> dict[str, Any]:
        return {
            "from_trained": self.from_trained,
            "teacher": self.teacher,
            "distill": self.distill,
            "lr_scale": self.lr_scale,
            "warmup_epochs": self.warmup_epochs,
            "pre_gate_ratio": self.pre_gate_ratio,
        }


def plan_finetune(cfg: dict) -> FinetunePlan:
    """The teacher and schedule of a stage I run of the resolved ``cfg``."""
    sc = cfg["supernet"]
    trained = starts_from_trained(cfg)
    choice = sc.get("teacher", "auto")
    if choice not in TEACHERS:
        raise ValueError(f"supernet.teacher must be one of {', '.join(TEACHERS)}, got {choice!r}")
    teacher = "source" if choice == "source" else "distill"  # auto: distill, from scratch or not (measured)
    if not trained:
        return FinetunePlan(False, teacher, choice, sc["distill"], 1.0, sc["warmup_epochs"], None)
    warmup = sc.get("finetune_warmup_epochs")
    return FinetunePlan(
        True,
        teacher,
        choice,
        "source" if teacher == "source" else sc["distill"],
        float(sc.get("finetune_lr_scale", 0.3)),
        sc["warmup_epochs"] if warmup is None else float(warmup),
        sc.get("finetune_pre_gate_ratio", 1.0),
    )


@dataclass
class SourceStart:
    """The model stage I starts from, and what was done to get it."""

    cfg: dict  # the config, with ``model.kwargs.pre_gate_ratio`` when the routed range was widened
    model: DynamicNet
    report: ImportReport | None  # None: no checkpoint_path (the model as built)
    routed_source: bool  # the widest routed sub-network is the full-width (source) network
    notes: list[str] = field(default_factory=list)


def _widest_routable(model: DynamicNet) -> bool:
    return model.largest in model.routing_space


def build_start_model(cfg: dict, build: Callable[[dict], DynamicNet], plan: FinetunePlan) -> SourceStart:
    """Build the config's model (``build(cfg)``) and load ``model.checkpoint_path`` into it.

    Starting from trained weights with ``plan.pre_gate_ratio`` set, a model whose
    full-width network is not routable is rebuilt with that ``pre_gate_ratio``
    (recorded in the returned config's ``model.kwargs``, so checkpoints rebuild
    the same model) if it takes one and the source loads into it; otherwise the
    model keeps its own routed range and ``notes`` say why. ``cfg`` is not modified.
    """
    cfg = copy.deepcopy(cfg)
    path = cfg["model"].get("checkpoint_path")
    model = build(cfg)
    notes: list[str] = []
    kwargs = cfg["model"]["kwargs"]
    if plan.from_trained and plan.pre_gate_ratio is not None and not _widest_routable(model):
        if "pre_gate_ratio" in kwargs or "subnet_widths" in kwargs:
            key = "pre_gate_ratio" if "pre_gate_ratio" in kwargs else "subnet_widths"
            notes.append(f"model.kwargs.{key} is set: the routed range is the recipe's")
        else:
            wide = copy.deepcopy(cfg)
            wide["model"]["kwargs"]["pre_gate_ratio"] = plan.pre_gate_ratio
            try:
                with warnings.catch_warnings(record=True) as said:
                    warnings.simplefilter("always")
                    candidate = build(wide)
                    report = load_pretrained(candidate, path) if path else None
            except (ValueError, TypeError) as err:
                reason = " ".join(str(err).split())
                notes.append(f"not rebuilt with pre_gate_ratio={plan.pre_gate_ratio:g} ({reason[:160]})")
            else:
                if _widest_routable(candidate):
                    for w in said:
                        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
                    return SourceStart(wide, candidate, report, True, notes)
                notes.append(f"pre_gate_ratio={plan.pre_gate_ratio:g} leaves the full-width network unrouted")
    report = load_pretrained(model, path) if path else None
    return SourceStart(cfg, model, report, _widest_routable(model), notes)


def frozen_teacher(model: nn.Module) -> nn.Module:
    """A copy of ``model`` that cannot change: eval mode, no gradients (the source teacher)."""
    teacher = copy.deepcopy(model).eval()
    teacher.requires_grad_(False)
    return teacher


def describe_plan(plan: FinetunePlan, start: SourceStart | None, base_lr: float, recipe_warmup: float) -> str:
    """The start-of-run line: what stage I does about its starting weights, and why."""
    if not plan.from_trained:
        return (
            f"[supernet] schedule: from scratch (no model.checkpoint_path): the recipe's lr {base_lr:.4g} and "
            f"warm-up {recipe_warmup:g} epochs; teacher: supernet.distill={plan.distill}"
        )
    if plan.teacher == "source":
        teacher = "the frozen source network at full width, KL to its probabilities at T=1 (the largest: labels)"
    elif plan.distill == "none":
        teacher = "the labels, for every sub-network (supernet.distill=none)"
    else:
        teacher = f"as supernet.distill={plan.distill}"
    teacher += f" (supernet.teacher={plan.teacher_choice})"
    why = "model.checkpoint_path" if start is None or start.report is not None else "supernet.teacher=source"
    warmup = "no warm-up" if plan.warmup_epochs == 0 else f"warm-up {plan.warmup_epochs:g} epochs"
    routed = ""
    if start is not None:
        if start.routed_source:
            ratio = start.cfg["model"]["kwargs"].get("pre_gate_ratio")
            how = f" (pre_gate_ratio={ratio:g})" if isinstance(ratio, (int, float)) else ""
            routed = f"; routed range includes the source widths{how}"
        else:
            routed = "; the source network is the training-only largest, not routed"
        if start.notes:
            routed += f" [{'; '.join(start.notes)}]"
    return (
        f"[supernet] schedule: fine-tuning from trained weights ({why}): lr x{plan.lr_scale:g} = {base_lr:.4g} "
        f"(supernet.finetune_lr_scale), {warmup} (supernet.finetune_warmup_epochs), teacher: {teacher}{routed}; "
        "why: a from-scratch lr and a warm-up restart undo trained weights"
    )


def source_warning(
    largest_top1: float, source_top1: float, split: str = "holdout", teacher: str = "source"
) -> str | None:
    """The end-of-stage-I warning when the largest sub-network ends below the source network (None if not)."""
    if largest_top1 >= source_top1:
        return None
    hint = "a lower supernet.finetune_lr_scale or fewer supernet.epochs"
    if teacher != "source":
        hint += ", or supernet.teacher=source"
    return (
        f"warning: the largest sub-network ends at {largest_top1:.2f}% top-1 on the {split} split, below the "
        f"source network's {source_top1:.2f}% (-{source_top1 - largest_top1:.2f} points): fine-tuning lost "
        f"accuracy; try {hint}"
    )
