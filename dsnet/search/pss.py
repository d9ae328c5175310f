"""Progressive sub-network search (PSS, Yang et al. 2020; SPEC 6.2).

The paper's abstract names the techniques -- trainable noise ranking, channel
groups with a fine-tuning threshold, sub-network re-selection -- but no code
or full text is public. This is the project's reconstruction [ours], from the
authors' Parametric Noise Injection and from AutoSlim:

1. **Start** from a trained network at the widest searched width (dsnet: the
   widest routed sub-network of a family, trained alone).
2. **Channel groups.** Each channel space after the gate (see
   :mod:`dsnet.search.channels`) is cut into groups of ``group_size`` width
   units (a DS-ViT's heads: one head per group, whatever ``group_size``).
   Stages before the gate are not searched: they run once for every
   sub-network, which is what lets the searched set serve as a DS-Net routing
   space [ours].
3. **Trainable noise ranking** (:mod:`dsnet.search.noise`): a learned noise
   scale per group, weights frozen; groups that tolerate much noise matter
   least. Each space's channels are then permuted once so its groups are in
   importance order, and keeping the ``k`` most important groups becomes a
   prefix slice.
4. **Progressive removal**, widest to slimmest: each step removes one group.
   Each space offers its least important kept group (the last of its order);
   the offer that costs the fewest held-out points per MAC saved is taken
   (AutoSlim's greedy step; ``across="noise"`` takes the most noise-tolerant
   offer instead, one global ranking by learned scale) [ours, see
   :meth:`ProgressiveSearch.remove_one`]. Every sub-network found is a prefix
   of the one before: the set is **nested**. The chain runs until the slimmest MAC target is met; the first
   chain member at or below a target *meets it within one group*.
5. **Selective fine-tuning**: after each step the held-out top-1 of the
   current sub-network is measured (BN statistics recalibrated for its widths
   first); only when it has fallen more than ``threshold`` points below the
   accuracy at the last fine-tuning (or the start), the nested set found so
   far -- the widest on labels, the target hits and the current one by in-place
   distillation from it, gradients summed (the sandwich step of stage I) --
   is fine-tuned for ``finetune_steps`` steps, and (``rerank``) the noise
   ranking is learned again on the kept groups, which permutes only channels
   every earlier chain member keeps, so nesting is preserved.
6. **Re-selection**: every chain member is a candidate (many more than
   needed). They are re-evaluated on the held-out split with the final
   weights, the Pareto-efficient ones (no other candidate is both cheaper and
   at least as accurate) are kept, and for each target the most accurate
   Pareto candidate within it is selected. Targets default to evenly spaced
   MACs between the widest and ``min_fraction`` of it.

Every decision reads the held-out slice of the training set (``data.holdout``)
or training batches; the reported split is never looked at.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from dsnet.models import create_model
from dsnet.models.base import DynamicNet
from dsnet.search.channels import ChannelSpace, channel_map, permute_space_
from dsnet.search.noise import importance_order, learn_noise_scales
from dsnet.train.bn_calibration import calibrate_bn
from dsnet.train.checkpoint import build_checkpoint_model, load_state_into, read_checkpoint, save_checkpoint
from dsnet.train.optim import MaskedSGD
from dsnet.train.run import top1_accuracy
from dsnet.train.supernet import supernet_step
from dsnet.utils.io import atomic_write_json, check_output_dir
from dsnet.utils.schema import Bool, Choice, Float, Int, Numbers, resolve_section, section_defaults

__all__ = [
    "PSS_DEFAULTS",
    "PSS_SCHEMA",
    "Candidate",
    "SearchResult",
    "ProgressiveSearch",
    "pareto_front",
    "reselect",
    "check_group_size",
    "check_targets",
    "run_pss",
    "cycle",
]

# Every knob of the search, [ours] where the paper is silent (see the module docstring); checked like the
# training recipe's keys (``dsnet.utils.schema``) and listed by ``dsnet config reference``.
PSS_SCHEMA: dict[str, Any] = {
    "group_size": Int(8, "[1, inf)", doc="width units per channel group"),
    "targets_mmacs": Numbers(None, "(0, inf)", null=True, doc="MAC targets (MMACs); null: num_subnets evenly spaced"),
    "num_subnets": Int(4, "[2, inf)", doc="with targets_mmacs null: how many evenly spaced targets"),
    "min_fraction": Float(0.2, "(0, 1]", doc="with targets_mmacs null: the slimmest target, a fraction of the widest"),
    "noise_steps": Int(100, "[1, inf)", doc="steps of noise-scale learning per ranking"),
    "noise_lr": Float(0.1, "(0, inf)", doc="learning rate of the noise scales"),
    "noise_reward": Float(1.0, "[0, inf)", doc="reward for noise (pushes useless groups' scales up)"),
    "across": Choice(
        "measured",
        ("measured", "noise", "uniform"),
        doc="who loses a group: measured points per MAC, noise rank, uniform (control)",
    ),
    "threshold": Float(
        1.0, "(-inf, inf)", doc="top-1 points lost since the last fine-tuning that trigger one (<0: always)"
    ),
    "finetune_steps": Int(100, "[0, inf)", doc="steps of each fine-tuning"),
    "finetune_lr": Float(0.02, "(0, inf)", doc="fine-tuning learning rate for data.batch_size 256 (scaled linearly)"),
    "weight_decay": Float(5.0e-5, "[0, inf)", doc="fine-tuning weight decay"),
    "rerank": Bool(True, doc="learn the ranking again after each fine-tuning"),
    "calibration_batches": Int(5, "[1, inf)", doc="BN recalibration batches of each candidate during the search"),
    "eval_batches": Int(None, "[1, inf)", null=True, doc="held-out batches per search-time evaluation (null: all)"),
}
PSS_DEFAULTS: dict[str, Any] = section_defaults(PSS_SCHEMA)


@dataclass
class Candidate:
    """One member of the search chain."""

    widths: tuple[int, ...]
    macs: int
    top1_search: float  # held-out top-1 when found (after fine-tuning, if that step fine-tuned)
    finetuned: bool = False
    removed: tuple[int, int] | None = None  # (space, group id in the original channel order)
    top1_final: float | None = None  # held-out top-1 with the final weights (re-selection)


@dataclass
class SearchResult:
    chain: list[Candidate]  # widest first, one group fewer per step
    targets: list[float]  # MACs, descending
    hits: list[int]  # chain index of the first member within each target
    selected: list[int]  # chain indices kept by re-selection, slimmest first
    finetunes: int = 0  # fine-tunings run, each pss.finetune_steps optimiser steps
    rankings: int = 0
    seconds: float = 0.0
    log: list[dict] = field(default_factory=list)
    finetune_steps_total: int = 0  # optimiser steps of all fine-tunings
    finetune_passes: int = 0  # sub-network forward+backward passes of those steps (the nested set, each step)
    noise_passes: int = 0  # forward+backward passes of noise-scale learning (weights frozen)
    evaluations: int = 0  # held-out evaluations (forward only, BN recalibrated first)
    finetune_schedule: list[float] | None = None  # MACs fine-tuned at when given a schedule (run's finetune_at_macs)

    @property
    def subnet_widths(self) -> list[list[int]]:
        return [list(self.chain[i].widths) for i in self.selected]

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["subnet_widths"] = self.subnet_widths
        return out


def cycle(loader, start_epoch: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
    """Batches of ``loader`` forever, a new epoch (reshuffled, re-augmented) each pass."""
    epoch = start_epoch
    while True:
        loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (MACs, top-1) points no other point beats: cheaper-or-equal and at least as accurate."""
    keep = []
    for i, (m, a) in enumerate(points):
        dominated = any((m2 <= m and a2 >= a) and (m2 < m or a2 > a) for j, (m2, a2) in enumerate(points) if j != i)
        if not dominated:
            keep.append(i)
    return keep


def reselect(points: Sequence[tuple[float, float]], targets: Sequence[float]) -> list[int]:
    """For each MAC target, the most accurate Pareto-efficient point within it; ascending MACs, no repeats."""
    front = pareto_front(points)
    chosen = set()
    for target in targets:
        within = [i for i in front if points[i][0] <= target * (1 + 1e-9)]
        if within:
            chosen.add(max(within, key=lambda i: (points[i][1], -points[i][0])))
    return sorted(chosen, key=lambda i: points[i][0])


def check_group_size(model: DynamicNet, widths: Sequence[int], group_size: int) -> None:
    """``ValueError`` unless ``group_size`` divides every searched stage's width in ``widths`` (the start).

    The searched stages are those of :func:`~dsnet.search.channels.channel_map`
    after the gate; a model without a channel map raises its own ``ValueError``.
    A space whose family fixes its group (``ChannelSpace.group``: a ViT's
    heads, one head a group) is not cut by ``group_size``.
    """
    spaces = [s for s in channel_map(model) if min(s.stages) >= model.gate_stage]
    if not spaces:
        raise ValueError("no channel space after the gate to search")
    for space in spaces:
        stage = space.stages[0]
        if space.group is not None:
            continue
        if space.units % group_size or widths[stage] % group_size:
            name = model.subnets[0].stage_names[stage]
            raise ValueError(
                f"pss.group_size={group_size} must divide the width of stage {name} "
                f"({widths[stage]} of {space.units} units)"
            )


def check_targets(
    targets: Sequence[float], start_macs: float | None = None, min_macs: float | None = None
) -> list[float]:
    """MAC targets checked before a search starts, descending; each error names the target.

    Every target must be a finite positive number; with ``start_macs`` /
    ``min_macs`` (the start network's MACs and the smallest the search can
    reach, every searched stage at one group) each must lie between them: a
    target above the start is met by the start alone and one below the
    smallest cannot be met. At least two distinct targets: the searched
    supernet needs two sub-networks to route between.
    """
    values = [float(t) for t in targets]
    bad = [t for t in values if not math.isfinite(t) or t <= 0]
    if bad:
        raise ValueError(f"MAC targets must be finite positive numbers, got {', '.join(f'{t:g}' for t in bad)}")
    values = sorted(set(values), reverse=True)
    if len(values) < 2:
        raise ValueError(
            f"MAC targets: got {len(values)} distinct target(s) ({', '.join(f'{t / 1e6:g}' for t in values)} MMACs); "
            "the searched supernet needs at least two sub-networks: give two targets or more"
        )
    if start_macs is not None:
        above = [t for t in values if t > start_macs * (1 + 1e-9)]
        if above:
            raise ValueError(
                f"MAC targets {', '.join(f'{t / 1e6:g}' for t in above)} MMACs are above the start network's "
                f"{start_macs / 1e6:.4g} MMACs: each target must be at most the start's MACs"
            )
    if min_macs is not None:
        below = [t for t in values if t < min_macs * (1 - 1e-9)]
        if below:
            raise ValueError(
                f"MAC targets {', '.join(f'{t / 1e6:g}' for t in below)} MMACs are below {min_macs / 1e6:.4g} MMACs, "
                "the smallest network the search can reach (every searched stage at one group)"
            )
    return values


class ProgressiveSearch:
    """The search state: working weights, channel order, kept groups per searched space.

    ``model`` is a trained single-sub-network dsnet model (its one sub-network
    is the start); ``spec`` rebuilds its family (``{"name", "kwargs"}``) through
    the registry, or through ``factory(**kwargs)`` when given.
    """

    def __init__(
        self,
        model: DynamicNet,
        spec: dict[str, Any],
        train_loader,
        holdout_loader,
        settings: dict[str, Any] | None = None,
        *,
        seed: int = 0,
        device: torch.device | str = "cpu",
        progress: bool = False,
        log=print,
        factory=None,
        input_size: Sequence[int] | None = None,
    ) -> None:
        self.factory = factory
        self.input_size = None if input_size is None else tuple(input_size)  # (C, H, W) MACs are counted at
        self.settings = resolve_section(PSS_SCHEMA, settings, "pss")  # every key checked, errors name it
        if len(model.subnets) != 1:
            raise ValueError("progressive search starts from a network with one sub-network (trained alone)")
        self.device = torch.device(device)
        self.work = model.to(self.device)
        own = {k: v for k, v in spec["kwargs"].items() if k not in ("subnet_widths", "routing_space")}
        self.spec = {"name": spec["name"], "kwargs": own}
        self.train_loader = train_loader
        self.holdout_loader = holdout_loader
        self.batches = cycle(train_loader, start_epoch=10_000 + seed)  # never the training run's own epochs
        self.seed = seed
        self.progress = progress
        self.log = log
        g = self.settings["group_size"]
        start = model.subnets[0].widths
        self.spaces: list[ChannelSpace] = [
            s for s in channel_map(model) if min(s.stages) >= model.gate_stage
        ]  # only stages after the gate are searched
        if not self.spaces:
            raise ValueError("no channel space after the gate to search")
        check_group_size(model, start, g)
        self.group_sizes = [g if space.group is None else space.group for space in self.spaces]  # units per group
        self.kept: list[int] = [start[space.stages[0]] // gs for space, gs in zip(self.spaces, self.group_sizes)]
        self.base_widths = start
        # group id (original order) at each position of each space
        self.group_ids = [torch.arange(space.units // gs) for space, gs in zip(self.spaces, self.group_sizes)]
        self.log_alpha: list[Tensor] = []
        self.result_log: list[dict] = []
        self.finetunes = 0
        self.rankings = 0
        self.counts = {"finetune_steps_total": 0, "finetune_passes": 0, "noise_passes": 0, "evaluations": 0}

    # ------------------------------------------------------------ networks
    def widths(self) -> tuple[int, ...]:
        out = list(self.base_widths)
        for space, k, g in zip(self.spaces, self.kept, self.group_sizes, strict=True):
            for s in space.stages:
                out[s] = k * g
        return tuple(out)

    def smallest_widths(self) -> tuple[int, ...]:
        """The widths with every searched space at one group: the slimmest the search can reach."""
        out = list(self.base_widths)
        for space, g in zip(self.spaces, self.group_sizes, strict=True):
            for s in space.stages:
                out[s] = g
        return tuple(out)

    def build(self, subnet_widths: Sequence[Sequence[int]], routing_space: Sequence[int] | None = None) -> DynamicNet:
        """A model of the family with these sub-networks, holding the working weights (BN statistics unset)."""
        kwargs = {**self.spec["kwargs"], "subnet_widths": [list(w) for w in subnet_widths]}
        if routing_space is not None:
            kwargs["routing_space"] = list(routing_space)
        net = (self.factory(**kwargs) if self.factory else create_model(self.spec["name"], **kwargs)).to(self.device)
        own = dict(self.work.named_parameters())
        with torch.no_grad():
            for name, p in net.named_parameters():
                if name in own and own[name].shape == p.shape:  # the gate head's size follows the routing space
                    p.copy_(own[name])
        return net

    def macs(self, widths: Sequence[int]) -> int:
        net = self.build([widths])
        return net.subnet_macs(self.input_size)[0]

    def evaluate(self, widths: Sequence[int]) -> float:
        """Held-out top-1 of one width configuration, BN statistics recalibrated for it first."""
        self.counts["evaluations"] += 1
        net = self.build([widths])
        self._calibrate(net)
        return top1_accuracy(net, self.holdout_loader, self.device, subnet=0, max_batches=self.settings["eval_batches"])

    def _calibrate(self, net: DynamicNet, batches: int | None = None) -> None:
        calibrate_bn(
            net,
            self.train_loader,
            min(batches or self.settings["calibration_batches"], len(self.train_loader)),
            device=self.device,
            progress=False,
        )

    # ------------------------------------------------------------- ranking
    def rank(self) -> None:
        """Learn the noise scales of the kept groups and put each space's kept groups in importance order."""
        s = self.settings
        net = self.build([self.widths()])
        self._calibrate(net)
        log_alpha = learn_noise_scales(
            net,
            0,
            self.spaces,
            self.kept,
            self.group_sizes,
            self.batches,
            s["noise_steps"],
            lr=s["noise_lr"],
            reward=s["noise_reward"],
            seed=self.seed * 7919 + self.rankings,
            device=self.device,
        )
        self.rankings += 1
        self.counts["noise_passes"] += s["noise_steps"]
        self.log_alpha = []
        for i, (space, k, la) in enumerate(zip(self.spaces, self.kept, log_alpha, strict=True)):
            g = self.group_sizes[i]
            order = importance_order(la)  # over the kept positions
            full = torch.cat([order, torch.arange(k, space.units // g)])  # removed groups stay at the tail
            unit_order = (full[:, None] * g + torch.arange(g)).flatten()
            permute_space_(self.work, space, unit_order)
            self.group_ids[i] = self.group_ids[i][full]
            self.log_alpha.append(la[order])

    def next_removal(self) -> int | None:
        """The space whose next group to go (its last kept one) tolerates the most noise; None if none can shrink."""
        best, best_value = None, None
        for i, k in enumerate(self.kept):
            if k <= 1:
                continue
            value = float(self.log_alpha[i][k - 1])
            if best_value is None or value > best_value:
                best, best_value = i, value
        return best

    def remove_one(self, current: Candidate) -> tuple[tuple[int, int], tuple[int, ...], int, float] | None:
        """Remove one group; returns (removed (space, group id), widths, MACs, held-out top-1), or None.

        Each space offers its least important kept group (the noise ranking's
        choice within the space). ``across="noise"`` removes the offer with
        the largest learned noise scale; ``across="measured"`` (default)
        measures every offer on the held-out slice and removes the one that
        loses the fewest points per MAC saved (AutoSlim's greedy step) [ours:
        noise scales of different layers are not on one scale -- a stage with
        many groups has many individually dispensable ones -- and on
        Fashion-MNIST the noise-only rule cut the last stage to 8 channels].
        ``across="uniform"`` is the control: it shrinks the space with the
        largest kept fraction, so the chain passes through the uniform widths
        and only the width allocation differs from the search.
        """
        offers = [i for i, k in enumerate(self.kept) if k > 1]
        if not offers:
            return None
        if self.settings["across"] == "noise":
            offers = [self.next_removal()]
        elif self.settings["across"] == "uniform":  # the control: keep every space at the same fraction
            groups = [space.units // g for space, g in zip(self.spaces, self.group_sizes)]
            offers = [max(offers, key=lambda i: (self.kept[i] / groups[i], groups[i]))]
        best = None
        for i in offers:
            self.kept[i] -= 1
            widths = self.widths()
            macs = self.macs(widths)
            top1 = self.evaluate(widths)
            self.kept[i] += 1
            cost = (current.top1_search - top1) / max(1, current.macs - macs)
            if best is None or cost < best[0]:
                best = (cost, i, widths, macs, top1)
        _, i, widths, macs, top1 = best
        removed = (i, int(self.group_ids[i][self.kept[i] - 1]))
        self.kept[i] -= 1
        return removed, widths, macs, top1

    # ---------------------------------------------------------- fine-tuning
    def finetune(self, nets: Sequence[Sequence[int]]) -> None:
        """The nested set ``nets`` (slimmest first): widest on labels, the rest by in-place distillation."""
        s = self.settings
        model = self.build(nets)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        lr = s["finetune_lr"] * _batch_size(self.train_loader) / 256
        optimizer = MaskedSGD(params, lr, 0.9, s["weight_decay"])
        order = [model.largest, *range(len(nets) - 1)]
        for _ in range(s["finetune_steps"]):
            images, labels = next(self.batches)
            optimizer.zero_grad(set_to_none=True)
            supernet_step(
                model, None, [images.to(self.device)], labels.to(self.device), order, distill="inplace", amp=False
            )
            optimizer.step()
        own = dict(model.named_parameters())
        with torch.no_grad():
            for name, p in self.work.named_parameters():
                if own[name].shape == p.shape:
                    p.copy_(own[name])
        self.finetunes += 1
        self.counts["finetune_steps_total"] += s["finetune_steps"]
        self.counts["finetune_passes"] += s["finetune_steps"] * len(nets)

    # --------------------------------------------------------------- search
    def run(self, targets: Sequence[float], finetune_at_macs: Sequence[float] | None = None) -> SearchResult:
        """Search to every MAC target (descending), then re-select. Returns the chain and the selection.

        ``finetune_at_macs`` replaces the ``threshold`` rule by a fixed schedule: one fine-tuning (and
        re-ranking) at the first chain member at or below each of these MACs -- several at one member that
        passes several, and those the chain never reaches at its last member. Given another search's
        fine-tuning MACs, a control gets exactly as many fine-tuning steps, at the same points of the MAC range.
        """
        t0 = time.time()
        s = self.settings
        start_macs = self.macs(self.widths())
        targets = check_targets(targets, start_macs, self.macs(self.smallest_widths()))
        self.rank()
        start_top1 = self.evaluate(self.widths())
        chain = [Candidate(self.widths(), start_macs, start_top1)]
        hits: dict[int, int] = {j: 0 for j, t in enumerate(targets) if start_macs <= t}
        reference = start_top1
        schedule = None if finetune_at_macs is None else sorted((float(m) for m in finetune_at_macs), reverse=True)
        bar = tqdm(total=max(1, start_macs - targets[-1]), desc="PSS", disable=None if self.progress else True)
        while chain[-1].macs > targets[-1]:
            step = self.remove_one(chain[-1])
            if step is None:
                self.log(f"[pss] cannot reach {targets[-1] / 1e6:.2f} MMACs: every searched stage is at one group")
                break
            removed, widths, macs, top1 = step
            finetuned = False
            if schedule is None:
                due = int(reference - top1 > s["threshold"])
            else:  # the chain ends at this member if it meets the slimmest target: the rest of the schedule is due
                due = len(schedule) if macs <= targets[-1] else sum(m >= macs for m in schedule)
                schedule = schedule[due:]
            if due:
                found = {chain[h].widths for h in hits.values()} | {widths, chain[0].widths}
                nested = sorted(found, key=lambda w: sum(w))  # a chain: fewer groups = slimmer in every stage
                for i in range(due):
                    self.finetune(nested)
                    if s["rerank"] and i < due - 1:
                        self.rank()
                before = top1
                top1 = self.evaluate(widths)
                reference, finetuned = top1, True
                self.result_log.append({"step": len(chain), "finetune": True, "top1_before": before, "top1": top1})
                self.log(
                    f"[pss] step {len(chain)}: {list(widths)} {macs / 1e6:.2f} MMACs, held-out top-1 {before:.2f} "
                    f"-> fine-tuned {top1:.2f}"
                )
                if s["rerank"]:
                    self.rank()
            chain.append(Candidate(widths, macs, top1, finetuned, removed))
            for j, t in enumerate(targets):
                if j not in hits and macs <= t:
                    hits[j] = len(chain) - 1
            bar.update(chain[-2].macs - macs)
            bar.set_postfix(mmacs=f"{macs / 1e6:.2f}", top1=f"{top1:.1f}", finetunes=self.finetunes)
        bar.close()
        self._final_accuracy(chain)
        points = [(c.macs, c.top1_final) for c in chain]
        selected = sorted(reselect(points, targets), key=lambda j: chain[j].macs)
        return SearchResult(
            chain,
            targets,
            [hits.get(j, -1) for j in range(len(targets))],
            selected,
            self.finetunes,
            self.rankings,
            round(time.time() - t0, 2),
            self.result_log,
            **self.counts,
            finetune_schedule=None if finetune_at_macs is None else [float(m) for m in finetune_at_macs],
        )

    def _final_accuracy(self, chain: list[Candidate]) -> None:
        """Every chain member's held-out top-1 with the final weights (one model holds the whole nested chain)."""
        nets = [c.widths for c in reversed(chain)]
        model = self.build(nets)
        self._calibrate(model)
        for j, c in enumerate(reversed(chain)):
            c.top1_final = top1_accuracy(model, self.holdout_loader, self.device, subnet=j)

    def final_model(self, result: SearchResult, calibration_batches: int) -> DynamicNet:
        """The searched supernet: the selected sub-networks (all routed), BN statistics calibrated per sub-network."""
        nets = result.subnet_widths
        model = self.build(nets, routing_space=list(range(len(nets))))
        self._calibrate(model, calibration_batches)
        return model.eval()


def _batch_size(loader) -> int:
    sampler = getattr(loader, "sampler", None)
    return int(getattr(sampler, "batch_size", 256))


def run_pss(
    start_checkpoint: str | Path,
    cfg: dict,
    settings: dict[str, Any],
    out: str | Path,
    *,
    targets_macs: Sequence[float] | None = None,
    subnet: int | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    log=print,
    replace: bool = True,
    finetune_at_macs: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Search from a trained network and save the searched supernet (``out/best.ckpt``, ``summary.json``).

    Everything is checked before the search: ``out`` can be written (and,
    unless ``replace``, holds no earlier search), the targets are finite,
    between the slimmest reachable network's MACs and the start's, at least
    two; the checkpoint holds a DS-Net model whose weights fit it.

    The start is the checkpoint's network if it has one sub-network (trained
    alone), else its sub-network ``subnet`` (default: the widest routed one).
    ``cfg`` is the run's training config: its data section gives the training
    batches and the held-out slice (``data.holdout`` must be set: search
    decisions never read the reported split). ``finetune_at_macs``: fine-tune on this schedule instead of
    the threshold rule (see :meth:`ProgressiveSearch.run`).
    """
    from dsnet.data import build_loader

    if cfg["data"].get("holdout") == 0:
        raise ValueError("progressive search selects on data.holdout: it is 0 (e.g. --set data.holdout=5000)")
    out = check_output_dir(out, "--out")  # before the search, not at its end
    if not replace and any((out / name).exists() for name in ("best.ckpt", "summary.json")):
        raise ValueError(
            f"--out {out} already holds a search (best.ckpt, summary.json); pass --overwrite to replace it "
            "or choose another --out"
        )
    settings = {**PSS_DEFAULTS, **settings}
    if targets_macs is None and settings["targets_mmacs"] is not None:
        targets_macs = [t * 1e6 for t in settings["targets_mmacs"]]
    if targets_macs is not None:
        check_targets(targets_macs)
    ckpt = read_checkpoint(start_checkpoint)
    spec = copy.deepcopy(ckpt["model"])
    spec.setdefault("kwargs", {})
    model = build_checkpoint_model(ckpt, start_checkpoint)
    if not isinstance(model, DynamicNet):
        raise ValueError(
            f"{start_checkpoint} is an LC-Net checkpoint ({spec['name']}); search applies to DS-Net supernets "
            "(or networks trained alone)"
        )
    use_ema = bool(ckpt.get("ema_state_dict"))
    load_state_into(model, ckpt["ema_state_dict"] if use_ema else ckpt["state_dict"], start_checkpoint, ckpt)
    if len(model.subnets) > 1 or subnet is not None:  # start from one sub-network of a supernet
        k = model.check_subnet([s.index for s in model.subnets if s.routed][-1] if subnet is None else subnet)
        kwargs = {n: v for n, v in spec["kwargs"].items() if n not in ("subnet_widths", "routing_space")}
        spec["kwargs"] = {**kwargs, "subnet_widths": [list(model.subnets[k].widths)]}
        single = create_model(spec["name"], **spec["kwargs"])
        own = dict(model.named_parameters())
        with torch.no_grad():
            for name, p in single.named_parameters():
                if own[name].shape == p.shape:  # BN statistics are recalibrated by the search
                    p.copy_(own[name])
        model = single
        log(f"[pss] starting from sub-network #{k} {list(model.subnets[0].widths)} of {start_checkpoint}")
    check_group_size(model, model.subnets[0].widths, settings["group_size"])
    train_loader, info = build_loader(cfg["data"], "train", seed=cfg["seed"], device=device)
    holdout_loader, _ = build_loader(cfg["data"], "holdout", seed=cfg["seed"], device=device)
    search = ProgressiveSearch(
        model,
        spec,
        train_loader,
        holdout_loader,
        settings,
        seed=cfg["seed"],
        device=device,
        progress=progress,
        log=log,
        input_size=(info.in_chans, info.image_size, info.image_size),
    )
    start_macs = search.macs(search.widths())
    if targets_macs is None:
        n = settings["num_subnets"]
        lo = settings["min_fraction"] * start_macs
        targets_macs = [lo + (start_macs - lo) * i / max(1, n - 1) for i in range(n)]
    result = search.run(targets_macs, finetune_at_macs)  # checks the targets against the start and the slimmest first
    if len(result.selected) < 2:
        log(
            f"[pss] warning: re-selection kept {len(result.selected)} sub-network for the targets "
            f"{[round(t / 1e6, 3) for t in result.targets]} MMACs (a slimmer candidate was at least as accurate)"
        )
    calibration = cfg["supernet"]["bn_calibration_batches"]
    final = search.final_model(result, calibration)
    final_spec = copy.deepcopy(search.spec)
    final_spec["kwargs"]["subnet_widths"] = result.subnet_widths
    final_spec["kwargs"]["routing_space"] = list(range(len(result.subnet_widths)))
    save_checkpoint(
        out / "best.ckpt",
        {
            "model": final_spec,
            "state_dict": final.state_dict(),
            "ema_state_dict": None,
            "config": cfg,
            "stage": "pss",
            "start": str(start_checkpoint),
            "bn_calibrated": True,
            "dataset": ckpt.get("dataset"),
        },
    )
    summary = {
        "start": str(start_checkpoint),
        "start_macs": start_macs,
        "settings": settings,
        "selection_split": "holdout",
        **result.as_dict(),
    }
    atomic_write_json(summary, out / "summary.json")
    return summary
