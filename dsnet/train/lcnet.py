"""LC-Net training and evaluation (SPEC 6.1): one stage, from scratch.

Each step trains the whole network, its L-Nets and C-Nets together on

* the task loss, cross-entropy of the output computed with the step's
  decisions (training computes densely: dropped channels are zeroed, skipped
  residual branches multiplied by ``g = 0``; only inference really skips);
* a **skip-rate** regulariser ``lambda_L * sum_b (mean_n g_b - t)^2`` over the
  skippable blocks (ConvNet-AIG's target-rate loss, defaults ``lambda_L = 2``,
  ``t = 0.6``), or, with ``regulariser: flops``, an **expected-FLOPs** target
  ``lambda_F * (E[MACs] / MACs_dense - rho)^2`` (LAUDNet), where each sample's
  MACs are the table cost of its straight-through decisions (forward: the real
  cost; backward: the Gumbel-softmax gradient);
* ``lambda_C * L1(a)``, the C-Net saliencies' mean (FBS's lasso; [ours] the
  mean over samples, blocks and channels, so ``lambda_C`` does not depend on
  the network's size). Kept in both regulariser settings.

The C-Nets keep a fixed fraction of channels (the model's ``density``), so
the density target holds by construction; the skip rate is what the
regulariser steers. The best epoch is chosen on ``data.holdout`` (a held-out
slice of the training split) when set; the reported split is evaluated once,
at the end, on the best checkpoint.

:func:`evaluate_lcnet` gives accuracy and mean MACs at any operating point
(run-time ``skip_bias`` and ``density``), for this module's summary and for
comparisons with DS-Net.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from dsnet.models import create_model
from dsnet.models.lcnet import LCMacs, LCResNet, LCResult
from dsnet.models.registry import list_models
from dsnet.train.checkpoint import load_model, load_state_into
from dsnet.train.config import load_config
from dsnet.train.distributed import init_distributed
from dsnet.train.loop import TrainLoop, ddp_wrap, rank_checksums
from dsnet.train.run import RunDir, seed_everything, selection_loader, split_sizes, unwrap
from dsnet.train.supernet import build_optimizer
from dsnet.utils.modes import temporary_mode
from dsnet.utils.table import format_table
from dsnet.utils.threads import set_threads

__all__ = [
    "lcnet_losses",
    "lcnet_step",
    "train_lcnet",
    "evaluate_lcnet",
    "calibrate_thresholds",
    "build_lcnet",
    "format_points",
]


def build_lcnet(cfg: dict, num_classes: int, in_chans: int) -> tuple[LCResNet, dict[str, Any]]:
    """The configured LC-Net and the spec a checkpoint records (the dataset's classes/channels unless overridden)."""
    name = cfg["model"]["name"]
    if name not in list_models(kind="lcnet"):
        raise ValueError(
            f"model.name={name!r} is not an LC-Net model; LC-Net models: {', '.join(list_models(kind='lcnet'))}"
        )
    spec = {"name": name, "kwargs": {"num_classes": num_classes, "in_chans": in_chans, **cfg["model"]["kwargs"]}}
    return create_model(spec["name"], **spec["kwargs"]), spec


def _check_section(lc: dict[str, Any], table: LCMacs) -> None:
    if not 0.0 <= lc["target_rate"] <= 1.0:
        raise ValueError(f"lcnet.target_rate must be in [0, 1], got {lc['target_rate']}")
    if lc["regulariser"] == "flops":
        if lc["target_flops"] is None:
            raise ValueError("lcnet.regulariser=flops needs lcnet.target_flops (a fraction of the dense MACs)")
        lo, hi = table.fixed / table.dense, table.all_executed / table.dense
        if not lo <= lc["target_flops"] <= hi:
            raise ValueError(
                f"lcnet.target_flops={lc['target_flops']} is out of reach: at this density a sample costs "
                f"{lo:.3f} (every skippable block skipped) to {hi:.3f} (none skipped) of the dense network's MACs"
            )
    for d in lc["eval_densities"]:
        if not isinstance(d, (int, float)) or isinstance(d, bool) or not 0.0 < d <= 1.0:
            raise ValueError(f"lcnet.eval_densities: each must be a number in (0, 1], got {d!r}")
    for b in lc["eval_skip_biases"]:
        if not isinstance(b, (int, float)) or isinstance(b, bool):
            raise ValueError(f"lcnet.eval_skip_biases: each must be a number, got {b!r}")


def lcnet_losses(
    result: LCResult, labels: Tensor, skippable: Sequence[bool], table: LCMacs, lc: dict[str, Any]
) -> dict[str, Tensor]:
    """The losses of one training step (see the module docstring); ``loss`` is their sum."""
    ce = F.cross_entropy(result.logits, labels, label_smoothing=lc["label_smoothing"])
    cols = [b for b, s in enumerate(skippable) if s]
    if lc["regulariser"] == "rates":
        rates = result.execute[:, cols].mean(0) if cols else result.logits.new_zeros(0)
        skip_loss = lc["rate_weight"] * ((rates - lc["target_rate"]) ** 2).sum()
    else:
        fraction = table.expected(result.execute).mean() / table.dense
        skip_loss = lc["flops_weight"] * (fraction - lc["target_flops"]) ** 2
    saliency = torch.stack([a.mean() for a in result.saliency]).mean()  # a >= 0 (ReLU): mean = L1 / size
    sal_loss = lc["saliency_weight"] * saliency
    return {"loss": ce + skip_loss + sal_loss, "loss_ce": ce, "loss_skip": skip_loss, "loss_saliency": sal_loss}


def lcnet_step(model: nn.Module, images: Tensor, labels: Tensor, table: LCMacs, lc: dict[str, Any]) -> dict[str, float]:
    """Forward + backward of one batch (no optimiser step); returns scalars to log."""
    core = unwrap(model)
    result = model(images, return_decisions=True, tau=lc["tau"])
    losses = lcnet_losses(result, labels, core.skippable, table, lc)
    losses["loss"].backward()
    stats = {k: float(v.detach()) for k, v in losses.items()}
    execute = result.execute.detach()
    cols = [b for b, s in enumerate(core.skippable) if s]
    stats["train_exec_rate"] = float(execute[:, cols].mean()) if cols else 1.0
    stats["train_mmacs"] = float(table.per_sample(execute).double().mean()) / 1e6
    stats["train_top1"] = 100.0 * float((result.logits.detach().argmax(1) == labels).float().mean())
    return stats


@torch.no_grad()
def evaluate_lcnet(
    model: LCResNet,
    loader: Iterable,
    device: torch.device | str = "cpu",
    skip_biases: Sequence[float] = (0.0,),
    densities: Sequence[float | None] = (None,),
    channel_mode: str = "mask",
    max_batches: int | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Accuracy vs mean MACs of an LC-Net at every (density, skip bias) operating point, one data pass.

    ``skip_bias`` is added to every block's skip threshold at run time (> 0
    skips more); ``density`` overrides the trained channel density (None: the
    model's). Returns one point per pair (densities outer, biases inner), each
    ``{skip_bias, density, top1, mean_macs, mmacs, dense_macs, mac_reduction,
    exec_rate, exec_rates, num_samples}``: ``mean_macs`` per sample as the
    gather path computes them (:meth:`LCResNet.per_sample_macs`),
    ``mac_reduction`` = dense ResNet MACs / ``mean_macs``, ``exec_rate`` the
    mean execution rate of the skippable blocks, ``exec_rates`` per block
    (1.0 for blocks that cannot be skipped). ``channel_mode="mask"``
    (default) computes the same outputs as ``"gather"`` (tested) and is the
    faster of the two for batched evaluation on a CPU.
    """
    device = torch.device(device)
    points = [(d, float(b)) for d in densities for b in skip_biases]
    correct = [0] * len(points)
    macs = [0.0] * len(points)
    executed: list[Tensor | None] = [None] * len(points)
    total = 0
    tables: dict[tuple, LCMacs] = {}
    with temporary_mode(model, False):
        bar = tqdm(loader, desc="LC-Net eval", disable=None if progress else True, leave=False)
        for i, (images, labels) in enumerate(bar):
            if max_batches is not None and i >= max_batches:
                break
            images, labels = images.to(device), labels.to(device)
            for j, (d, b) in enumerate(points):
                r = model(images, return_decisions=True, skip_bias=b, density=d, channel_mode=channel_mode)
                key = (tuple(images.shape[1:]), d)
                if key not in tables:
                    tables[key] = model.macs_table(key[0], d)
                correct[j] += int((r.logits.argmax(1) == labels).sum())
                macs[j] += float(tables[key].per_sample(r.execute).double().sum())
                ex = r.execute.double().sum(0).cpu()
                executed[j] = ex if executed[j] is None else executed[j] + ex
            total += labels.numel()
    if total == 0:
        raise ValueError("evaluate_lcnet: the loader yielded no samples")
    cols = [b for b, s in enumerate(model.skippable) if s]
    dense = next(iter(tables.values())).dense
    out = []
    for j, (d, b) in enumerate(points):
        rates = (executed[j] / total).tolist()
        mean_macs = macs[j] / total
        out.append(
            {
                "skip_bias": b,
                "density": model.density if d is None else float(d),
                "top1": 100.0 * correct[j] / total,
                "mean_macs": mean_macs,
                "mmacs": mean_macs / 1e6,
                "dense_macs": dense,
                "mac_reduction": dense / mean_macs,
                "exec_rate": sum(rates[c] for c in cols) / len(cols) if cols else 1.0,
                "exec_rates": rates,
                "num_samples": total,
            }
        )
    return out


@torch.no_grad()
def calibrate_thresholds(
    model: LCResNet, loader: Iterable, device: torch.device | str = "cpu", max_batches: int | None = 50
) -> list[float]:
    """Set each L-Net's stored threshold so inference executes its block as often as the sampled gate would.

    Training draws ``g ~ Bernoulli(sigmoid(margin))`` (straight-through
    Gumbel-softmax over two logits); the rate regulariser steers the mean of
    those draws. Inference decides deterministically, ``margin > threshold``.
    For each skippable block, in network order (a block's inputs depend on the
    earlier blocks' new thresholds), the threshold is placed so that exactly
    the fraction ``r_b = mean sigmoid(margin)`` of the loader's images, those
    with the largest margins, execute the block. Returns the thresholds per
    block (NaN for blocks that cannot be skipped).
    """
    device = torch.device(device)
    out = [math.nan] * len(model.blocks)
    with temporary_mode(model, False):
        for b, blk in enumerate(model.blocks):
            if not blk.skippable:
                continue
            margins = []
            for i, (images, _) in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                r = model(images.to(device), return_decisions=True, channel_mode="mask")
                margins.append(r.gate_margin[:, b].double())
            if not margins:
                raise ValueError("calibrate_thresholds: the loader yielded no images")
            m = torch.cat(margins).sort(descending=True).values
            n = m.numel()
            k = int(round(float(torch.sigmoid(m).mean()) * n))  # how many should execute
            if k == 0:
                thr = float(m[0])  # margin > max: none
            elif k == n:
                thr = float(m[-1]) - 1.0
            else:
                thr = 0.5 * float(m[k - 1] + m[k])
            blk.lnet.threshold.fill_(thr)
            out[b] = float(blk.lnet.threshold)
    return out


def format_points(points: Sequence[dict[str, Any]], title: str | None = None) -> str:
    """The operating points of :func:`evaluate_lcnet` as a console table."""
    rows = [
        [p["density"], p["skip_bias"], round(p["top1"], 2), round(p["mmacs"], 3), round(p["mac_reduction"], 2),
         round(p["exec_rate"], 3), " ".join(f"{r:.2f}" for r in p["exec_rates"])]
        for p in points
    ]  # fmt: skip
    headers = ["density", "skip bias", "top-1 %", "MMACs", "vs dense", "exec rate", "per block"]
    return format_table(headers, rows, title=title)


def _selection_record(model: LCResNet, loader, device: torch.device) -> dict[str, Any]:
    p = evaluate_lcnet(model, loader, device)[0]
    return {"sel_top1": p["top1"], "sel_mmacs": p["mmacs"], "sel_exec_rate": p["exec_rate"]}


def train_lcnet(
    cfg: dict | str | Path,
    out: str | Path,
    resume: bool = False,
    overrides: list[str] | None = None,
    stop_after_epoch: int | None = None,
) -> dict[str, Any]:
    """Train an LC-Net as ``cfg`` says. Returns the summary written to ``summary.json``.

    ``stop_after_epoch=e`` ends after epoch ``e`` is checkpointed, as if the
    process had been killed there; ``resume=True`` continues from
    ``last.ckpt`` on the same trajectory (decisions, data order, RNG).
    """
    from dsnet.data import build_loader

    if not isinstance(cfg, dict):
        cfg = load_config(cfg, overrides)
    lc = cfg["lcnet"]
    ctx, device = init_distributed(cfg["device"], cfg["distributed"]["backend"])
    seed_everything(cfg["seed"])
    threads = set_threads(cfg.get("threads"), override=False)  # --threads N (set earlier) wins
    train_loader, info = build_loader(
        cfg["data"], "train", seed=cfg["seed"], rank=ctx.rank, world_size=ctx.world_size, device=device
    )
    sel_loader, sel_split = selection_loader(cfg["data"], cfg["seed"], device)
    if ctx.is_main:
        print(
            f"[lcnet] {info.name}: {info.image_size} px, {info.num_classes} classes; torch threads: {threads}",
            flush=True,
        )
        print(f"[lcnet] data: {split_sizes(info.num_samples, sel_loader, sel_split)}", flush=True)
    if sel_split == "holdout":  # thresholds are calibrated on held-out training images
        cal_loader = sel_loader
    else:  # no holdout: a separate, fixed pass over (augmented) training images, as stage II does
        cal_loader, _ = build_loader(cfg["data"], "train", seed=cfg["seed"] + 7, device=device)
        cal_loader.sampler.set_epoch(0)
    model, spec = build_lcnet(cfg, info.num_classes, info.in_chans)
    model = model.to(device)
    table = model.macs_table((info.in_chans, info.image_size, info.image_size))
    _check_section(lc, table)
    run = RunDir(out, cfg, ctx, resume, "lcnet")
    params = [p for p in model.parameters() if p.requires_grad]
    base_lr = lc["lr"] * cfg["data"]["batch_size"] * ctx.world_size / lc["lr_reference_batch"]
    # [ours] plain SGD semantics: zero gradient rows come from per-sample channel choices, not from nested slices
    optimizer = build_optimizer(params, base_lr, {**lc, "mask_untouched": False})
    ddp = ddp_wrap(model, ctx, device)

    def step(batch) -> dict[str, float]:
        images, labels = batch
        optimizer.zero_grad(set_to_none=True)
        stats = lcnet_step(ddp, images.to(device, non_blocking=True), labels.to(device, non_blocking=True), table, lc)
        if lc["grad_clip"]:
            nn.utils.clip_grad_norm_(params, lc["grad_clip"])
        optimizer.step()
        return stats

    def evaluate(epoch: int, record: dict[str, Any]) -> None:
        if ctx.is_main:
            if lc["calibrate_thresholds"]:
                thresholds = calibrate_thresholds(model, cal_loader, device, lc["calibration_batches"])
                record["thresholds"] = [None if math.isnan(t) else t for t in thresholds]
            record.update(_selection_record(model, sel_loader, device), selection_split=sel_split)

    def epoch_line(epoch: int, record: dict[str, Any]) -> str:
        return (
            f"lr={record['lr']:.4f} loss={record['loss']:.3f} ce={record['loss_ce']:.3f} "
            f"train_exec={record['train_exec_rate']:.3f} train_mmacs={record['train_mmacs']:.3f} "
            f"{sel_split}: top1={record['sel_top1']:.2f} mmacs={record['sel_mmacs']:.3f} "
            f"exec={record['sel_exec_rate']:.3f}"
        )

    loop = TrainLoop.for_run(
        run,
        ctx,
        device,
        stop_after_epoch,
        "lcnet",
        model,
        train_loader,
        optimizer,
        step,
        epochs=lc["epochs"],
        lr=base_lr,
        warmup_steps=lc["warmup_epochs"] * len(train_loader),
        min_lr=lc["min_lr"],
        selection_key="sel_top1",
        selection_split=sel_split,
        evaluate=evaluate,
        payload=lambda epoch: {"state_dict": model.state_dict(), "ema_state_dict": None},
        checkpoint={"model": spec, "dataset": dataclasses.asdict(info)},
        epoch_line=epoch_line,
    )
    loop.start(lambda state: load_state_into(model, state["state_dict"], run.last, state))
    fitted = loop.fit()
    if fitted.stopped_after_epoch is not None:
        return {"stopped_after_epoch": fitted.stopped_after_epoch}
    checksums = rank_checksums(model, ctx, device)
    result: dict[str, Any] = {
        "epochs": lc["epochs"],
        "best_metric": fitted.best_metric,
        "selection_split": sel_split,
        "density": model.density,
        "keep_counts": model.keep_counts(),
        "skippable": model.skippable,
        "dense_mmacs": table.dense / 1e6,
        "rank_param_checksums": checksums,
    }
    if ctx.is_main and lc["final_eval"]:
        result["final_eval"] = _final_eval(run.best, cfg, device)
    run.write_summary(result)
    run.close()
    ctx.barrier()
    return result


def _final_eval(best: Path, cfg: dict, device: torch.device) -> dict[str, Any]:
    """The best checkpoint on the reported split: the trained point, a skip-bias sweep and a density sweep."""
    from dsnet.data import build_loader

    lc = cfg["lcnet"]
    model, ckpt = load_model(best, map_location=device)
    loader, _ = build_loader(cfg["data"], "val", seed=cfg["seed"], device=device)
    show = cfg["log"]["progress"]
    biases = sorted({0.0, *map(float, lc["eval_skip_biases"])})
    bias_points = evaluate_lcnet(model, loader, device, skip_biases=biases, progress=show)
    density_points = evaluate_lcnet(model, loader, device, densities=lc["eval_densities"], progress=show)
    trained = next(p for p in bias_points if p["skip_bias"] == 0.0)
    print(format_points(bias_points, title=f"best epoch ({ckpt['epoch'] + 1}) on the reported split: skip-bias sweep"))
    print(format_points(density_points, title="run-time density at skip bias 0"))
    return {
        "epoch": ckpt["epoch"],
        "trained_point": trained,
        "skip_bias_sweep": bias_points,
        "density_sweep": density_points,
    }
