"""How much can any router gain over the confidence cascade with these sub-networks? A measured ceiling.

Usage (after ``dsnet quickstart --out runs/qs``)::

    python scripts/router_ceiling.py runs/qs/gate/best.ckpt --json benchmarks/results/router_ceiling_seed0.json

A router picks one routed sub-network per image; its accuracy is bounded by what can be told, per image, about
which sub-network is right. This script measures that bound with the information a router has, and with more:

* ``slim-info``: a learned selector that sees what the exit gate sees after the slimmest sub-network has run (its
  class probabilities, their entropy and margin). It predicts, per routing choice, the chance that the choice
  classifies the image correctly, and routes by ``p_j - lam * cost_j``.
* ``full-info``: the same selector given **every** routed sub-network's output (their probabilities, margins,
  entropies and whether they agree). No router can have this before running the wider sub-networks, so its
  curve (each choice charged only its own MACs) is an upper bound on what selection can reach with these
  predictors; it is not a deployable method.
* ``max-confidence``: the training-free full-information rule: the choice whose prediction is most confident.

Each selector is fitted on the held-out slice of the training set (``data.holdout`` of the checkpoint's recipe)
and read once on the test split, its curve traced by sweeping ``lam``. Reported next to the trained gate (bias
0), the cascade and the oracle at the gate's MACs, with the share of the oracle's gain over the static curve each
captures. If the full-information ceiling is within a few tenths of a point of the cascade, the cascade's
margin and the oracle capture targets are out of reach for any router over these sub-networks: the limit is
in the sub-networks' correlated errors, not in the gate.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsnet.data import build_loader
from dsnet.data.recipe import with_recorded_recipe
from dsnet.evaluation import baselines as bl
from dsnet.evaluation import evaluate
from dsnet.train.checkpoint import load_model
from dsnet.utils.io import atomic_write_json
from dsnet.utils.table import format_table

LAMBDAS = torch.cat([torch.zeros(1), torch.logspace(-4, 0.5, 120)])


@torch.inference_mode()
def collect(model: nn.Module, loader: Iterable) -> tuple[Tensor, Tensor]:
    """Every routed choice's logits ``(N, R, C)`` and the labels ``(N,)``."""
    space = list(model.routing_space)
    outs, labels = [], []
    for x, y in loader:
        h, _ = model.forward_pre(x, space[0])
        outs.append(torch.stack([model.forward_post(h, k).float() for k in space], dim=1))
        labels.append(y.long())
    return torch.cat(outs), torch.cat(labels)


def _stats(p: Tensor) -> Tensor:
    """Per-choice confidence features of probabilities ``(..., C)``: max, top-2 margin, entropy."""
    top = p.topk(2, dim=-1).values
    ent = -(p * p.clamp_min(1e-12).log()).sum(-1)
    return torch.stack([top[..., 0], top[..., 0] - top[..., 1], ent], dim=-1)


def features(logits: Tensor, full: bool) -> Tensor:
    """What a selector sees: the slimmest's output only, or every choice's (``full``)."""
    p = logits.softmax(-1)  # (N, R, C)
    slim = p[:, 0]
    parts = [_stats(slim), slim.sort(-1, descending=True).values[:, :3]]
    if full:
        r = p.shape[1]
        pred = p.argmax(-1)  # (N, R)
        parts.append(_stats(p[:, 1:]).flatten(1))
        agree = [(pred[:, i] == pred[:, j]).float() for i in range(r) for j in range(i + 1, r)]
        parts.append(torch.stack(agree, dim=1))
        for ref in (0, r - 1):  # how much each choice believes the slimmest's and the widest's answers
            parts.append(p.gather(-1, pred[:, ref].view(-1, 1, 1).expand(-1, r, 1)).squeeze(-1))
    return torch.cat(parts, dim=1)


class Selector(nn.Module):
    """``P(choice j is right | features)`` for every choice: a small MLP with one logit per choice."""

    def __init__(self, num_features: int, num_choices: int, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(num_features, hidden), nn.ReLU(), nn.Linear(hidden, num_choices))

    def forward(self, f: Tensor) -> Tensor:
        return self.net(f)


def fit(f: Tensor, correct: Tensor, seed: int, steps: int = 600) -> tuple[Selector, Tensor, Tensor]:
    """A selector fitted by binary cross-entropy (full batch, Adam, weight decay); features standardised."""
    torch.manual_seed(seed)
    mean, std = f.mean(0), f.std(0).clamp_min(1e-6)
    sel = Selector(f.shape[1], correct.shape[1])
    opt = torch.optim.Adam(sel.parameters(), lr=1e-2, weight_decay=1e-4)
    z, target = (f - mean) / std, correct.float()
    for _ in range(steps):
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(sel(z), target).backward()
        opt.step()
    return sel.eval(), mean, std


def curve(scores: Tensor, correct: Tensor, costs: Tensor) -> list[dict[str, float]]:
    """(mean MACs, top-1) of routing by ``argmax_j scores_j - lam * cost_j / cost_max`` along ``LAMBDAS``."""
    rel = costs / costs.max()
    rows = torch.arange(correct.shape[0])
    points = []
    for lam in LAMBDAS.tolist():
        choice = (scores - lam * rel).argmax(1)
        points.append(
            {
                "lam": lam,
                "top1": 100.0 * correct[rows, choice].double().mean().item(),
                "mean_macs": costs[choice].double().mean().item(),
                "mix": torch.bincount(choice, minlength=len(costs)).double().div(len(choice)).tolist(),
            }
        )
    return points


def at(points: list[dict[str, float]], macs: float) -> float:
    """A curve's envelope at ``macs`` (clamped at its ends)."""
    return bl.curve_at(bl.pareto_envelope(points), macs)


def measure(model: nn.Module, holdout: Iterable, test: Iterable, seed: int = 0) -> dict[str, Any]:
    """The report of the module docstring for one model."""
    report = evaluate(model, test, sweep=11, progress=False)
    s = report["summary"]
    costs = torch.tensor([c["macs"] for c in report["routing_choices"]], dtype=torch.float64)
    fit_logits, fit_labels = collect(model, holdout)
    test_logits, test_labels = collect(model, test)
    fit_correct = fit_logits.argmax(-1) == fit_labels[:, None]
    test_correct = test_logits.argmax(-1) == test_labels[:, None]
    gate_macs, static_at = s["dynamic_mean_macs"], s["static_top1_at_dynamic_macs"]
    oracle_at = bl.oracle_at(test_correct, [float(c) for c in costs], [gate_macs])[0]
    rows: dict[str, Any] = {}
    for name, full in (("slim-info", False), ("full-info", True)):
        sel, mean, std = fit(features(fit_logits, full), fit_correct, seed)
        with torch.no_grad():
            scores = torch.sigmoid(sel((features(test_logits, full) - mean) / std)).double()
            fit_scores = torch.sigmoid(sel((features(fit_logits, full) - mean) / std)).double()
        pts = curve(scores, test_correct, costs)
        best = max(p["top1"] for p in pts)
        rows[name] = {
            "top1_at_gate_macs": at(pts, gate_macs),
            "best_top1": best,
            "holdout_best_top1_in_sample": max(p["top1"] for p in curve(fit_scores, fit_correct, costs)),
            "mix_at_best": min((p for p in pts if p["top1"] == best), key=lambda p: p["mean_macs"])["mix"],
            "envelope": [(m / 1e6, t) for m, t in zip(*bl.pareto_envelope(pts))],
        }
    conf = test_logits.softmax(-1).max(-1).values
    pick = conf.argmax(1)
    rows["max-confidence"] = {
        "top1_at_gate_macs": None,
        "best_top1": 100.0 * test_correct[torch.arange(len(pick)), pick].double().mean().item(),
        "mean_macs_if_charged_one_choice": costs[pick].mean().item(),
    }
    for row in rows.values():
        t = row["top1_at_gate_macs"]
        row["capture_at_gate_macs"] = None if t is None else bl.oracle_capture(t, static_at, oracle_at)
    widest = report["static"][model.routing_space[-1]]["top1"]
    return {
        "gate": {
            "top1": s["dynamic_top1"],
            "mean_macs": gate_macs,
            "routing": report["dynamic"]["histogram"]["fractions"],
            "capture": s["oracle_capture"],
        },
        "static_at_gate_macs": static_at,
        "cascade_at_gate_macs": s["cascade_top1_at_dynamic_macs"],
        "oracle_at_gate_macs": oracle_at,
        "oracle_any_choice_right": 100.0 * test_correct.any(1).double().mean().item(),
        "widest_routed_top1": widest,
        "routing_choice_macs": costs.tolist(),
        "selectors": rows,
    }


def _pct(share: float | None) -> float | None:
    return None if share is None else 100.0 * share


def render(results: list[dict[str, Any]]) -> str:
    def mean(vals: list[float | None]) -> str:
        v = [x for x in vals if x is not None]
        if len(v) < 2:
            return f"{v[0]:.2f}" if v else "-"
        return f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f}"

    rows = [
        ["static curve", mean([r["static_at_gate_macs"] for r in results]), "0", "-"],
        ["cascade", mean([r["cascade_at_gate_macs"] for r in results]), "-", "-"],
        [
            "trained gate (bias 0)",
            mean([r["gate"]["top1"] for r in results]),
            mean([_pct(r["gate"]["capture"]) for r in results]),
            "-",
        ],
    ]
    for name in ("slim-info", "full-info", "max-confidence"):
        sel = [r["selectors"][name] for r in results]
        cap = [_pct(s["capture_at_gate_macs"]) for s in sel]
        rows.append([name, mean([s["top1_at_gate_macs"] for s in sel]), mean(cap), mean([s["best_top1"] for s in sel])])
    rows.append(
        [
            "oracle",
            mean([r["oracle_at_gate_macs"] for r in results]),
            "100",
            mean([r["oracle_any_choice_right"] for r in results]),
        ]
    )
    head = ["router (test split)", "top-1 % at the gate's MACs", "oracle gain captured %", "best top-1 % at any MACs"]
    macs = mean([r["gate"]["mean_macs"] / 1e6 for r in results])
    return (
        f"gate's MACs: {macs} MMACs; widest routed: {mean([r['widest_routed_top1'] for r in results])} %\n"
        + format_table(head, rows)
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+", help="trained gate checkpoints (dsnet quickstart's gate/best.ckpt)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    results = []
    for path in args.checkpoints:
        model, ckpt = load_model(path)
        data = with_recorded_recipe(ckpt["config"]["data"], ckpt.get("dataset"))  # prepared as training did
        if not data.get("holdout"):
            print(f"{path}: its recipe holds no slice out (data.holdout); the selectors need one", file=sys.stderr)
            return 2
        holdout, _ = build_loader(data, "holdout", seed=0)
        test, _ = build_loader(data, "val", seed=0)
        result = measure(model, holdout, test, seed=int(ckpt["config"].get("seed", 0)))
        result["checkpoint"] = str(path)
        result["checkpoint_seed"] = ckpt["config"].get("seed")
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "selectors"}, default=str), flush=True)
    print(render(results))
    if args.json:
        atomic_write_json({"results": results, "table": render(results)}, Path(args.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
