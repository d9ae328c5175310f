"""Run configuration: YAML recipes + ``--set key=value`` overrides, validated before any work starts.

``SCHEMA`` below is the single source of truth: one line per key with its
default, type, range or choices, the stage that reads it and what it means
(the ``data`` section's table lives with the data package). A key that is not
known, a value of the wrong type or out of its range is a ``ConfigError``
that names the key: a typo in a recipe must not silently train with the
default for hours, and ``lr: -0.1`` must not train at all. The same table
generates docs/config.md (``dsnet config reference``, :mod:`dsnet.cli.config`, which gathers every table).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

from dsnet.data.config import DATA_SCHEMA, resolve_data_config
from dsnet.utils.schema import (
    Bool,
    Choice,
    ConfigError,
    Device,
    Float,
    Int,
    Key,
    Mapping,
    Numbers,
    PathKey,
    Str,
    load_yaml,
    resolve_section,
    section_defaults,
    with_stage,
)

__all__ = [
    "SCHEMA",
    "DEFAULTS",
    "OPTIMISER_KEYS",
    "load_config",
    "resolve_config",
    "apply_overrides",
    "ConfigError",
    "check_model_config",
]

S1, S2, BOTH = "supernet", "gate", "supernet, gate"


def _optimiser_keys(epochs: int) -> dict[str, Key]:
    """The optimiser and schedule keys stage I and LC-Net share (same defaults but the epochs)."""
    return {
        "epochs": Int(epochs, "[1, inf)", doc="training epochs"),
        "optimizer": Choice("sgd", ("sgd", "adamw"), doc="sgd: masked SGD (official); adamw: for transformers"),
        "lr": Float(0.1, "(0, inf)", doc="peak learning rate for a global batch of lr_reference_batch"),
        "lr_reference_batch": Int(256, "[1, inf)", doc="lr is scaled by global batch / this (printed at start)"),
        "momentum": Float(0.9, "[0, 1)", doc="SGD momentum"),
        "nesterov": Bool(False, doc="Nesterov momentum (sgd)"),
        "betas": Numbers([0.9, 0.999], "[0, 1)", length=2, doc="AdamW betas (adamw only)"),
        "weight_decay": Float(1e-4, "[0, inf)", doc="weight decay"),
        "warmup_epochs": Float(1.0, "[0, inf)", doc="linear warm-up, in epochs (fractions allowed), <= epochs"),
        "min_lr": Float(0.0, "[0, inf)", doc="final learning rate of the cosine schedule, <= lr"),
    }


# the keys of that table, by name (``dsnet compare`` gives LC-Net the recipe's stage I values of these)
OPTIMISER_KEYS: tuple[str, ...] = tuple(_optimiser_keys(epochs=1))

# One table per section: default, range or choices, which stage reads it, what it means.
# The ``data`` section's table lives with the data package (dsnet.data.config.DATA_SCHEMA).
SCHEMA: dict[str, Any] = {
    "seed": Int(0, "[0, inf)", stage="supernet, gate, calibrate-bn", doc="seeds data order, sampling, init"),
    "device": Device("auto", stage=BOTH, doc="auto: cuda:LOCAL_RANK when CUDA is available, else cpu"),
    "threads": Int(
        None,
        "[1, inf)",
        null=True,
        stage="supernet, gate, lcnet",
        doc="torch threads per process (null: min(cores available, 8); --threads N wins)",
    ),
    "model": with_stage(
        {
            "name": Str("ds_mobilenet_v1_cifar", doc="registered model (`dsnet models`)"),
            "kwargs": Mapping(
                doc="create_model arguments, checked by building the model; num_classes/in_chans: the dataset's; "
                "every option with its default: `dsnet models --options NAME`"
            ),
            "checkpoint_path": PathKey(
                None, null=True, doc="stage I starts from these weights (torchvision/timm/official DS-Net/dsnet)"
            ),
        },
        S1,
    ),
    "data": DATA_SCHEMA,
    "supernet": with_stage(
        {
            **_optimiser_keys(epochs=10),
            "label_smoothing": Float(0.1, "[0, 1)", doc="label smoothing of the largest sub-network's loss"),
            "num_random": Int(2, "[0, inf)", doc="sandwich rule: largest + num_random random + smallest"),
            "width_sampling": Choice(
                "discrete",
                ("discrete", "continuous"),
                doc="discrete: random routed sub-networks; continuous: US-Nets widths r ~ U[r_min, 1]",
            ),
            "distill": Choice(
                "none",
                ("ib", "ieb", "inplace", "none"),
                doc="teacher of the other sub-networks; none: labels (chosen by measurement); ib: the paper's",
            ),
            "teacher": Choice(
                "auto",
                ("auto", "source", "distill"),
                doc="source: the frozen trained network at full width teaches the others (KL, T=1); distill: "
                "supernet.distill does; auto: distill, also from trained weights (labels routed 1.3-2.4 points better)",
            ),
            "finetune_lr_scale": Float(
                0.3, "(0, inf)", doc="from trained weights: lr and min_lr times this (a recipe's lr is for scratch)"
            ),
            "finetune_warmup_epochs": Float(
                0.0,
                "[0, inf)",
                null=True,
                doc="from trained weights: warm-up epochs (0: no restart; null: the recipe's warmup_epochs)",
            ),
            "finetune_pre_gate_ratio": Float(
                1.0,
                "(0, 1]",
                null=True,
                doc="from trained weights: the model's pre_gate_ratio, so the widest routed sub-network is the "
                "source network (null: the model's own; model.kwargs wins)",
            ),
            "ema_decay": Float(0.997, "[0, 1)", doc="decay of the EMA teacher"),
            "ema_warmup": Bool(True, doc="decay min(ema_decay, (1+t)/(10+t)): a usable teacher from the start"),
            "ema_buffers": Choice(
                "average", ("average", "copy"), doc="BN statistics of the EMA teacher: averaged (timm) or copied"
            ),
            "distill_label_weight": Float(
                0.0, "[0, 1]", doc="students' loss: (1-w) * distillation + w * label CE [ours]; 0: the paper's"
            ),
            "mvco": Bool(False, doc="multi-view consistency: two augmented views per image"),
            "mask_untouched": Bool(True, doc="no weight decay / momentum for channels that got no gradient"),
            "amp": Bool(True, doc="bfloat16 autocast on CUDA; ignored on CPU"),
            "grad_clip": Float(None, "(0, inf)", null=True, doc="clip the gradient norm to this (null: off)"),
            "bn_calibration_batches": Int(
                200, "[1, inf)", stage="supernet, calibrate-bn", doc="training batches per sub-network"
            ),
            "channels_last": Bool(False, doc="channels-last memory format"),
        },
        S1,
    ),
    "gate": with_stage(
        {
            "epochs": Int(3, "[1, inf)", doc="training epochs"),
            "lr": Float(0.08, "(0, inf)", doc="peak learning rate for a global batch of lr_reference_batch"),
            "lr_reference_batch": Int(512, "[1, inf)", doc="lr is scaled by global batch / this (printed at start)"),
            "momentum": Float(0.9, "[0, 1)", doc="SGD momentum"),
            "weight_decay": Float(0.01, "[0, inf)", doc="weight decay of the slimming head"),
            "warmup_epochs": Float(0.0, "[0, inf)", doc="linear warm-up, in epochs (fractions allowed), <= epochs"),
            "min_lr": Float(0.0, "[0, inf)", doc="final learning rate of the cosine schedule, <= lr"),
            "mode": Choice(
                "exit", ("pre", "exit"), doc="exit: decides after the slimmest ran (measured); pre: the paper's gate"
            ),
            "router": Choice(
                "logits",
                ("logits", "utility"),
                doc="logits: SGS-trained logits (paper); utility: per-width P(correct), BCE (other losses off)",
            ),
            "tau": Float(1.0, "(0, inf)", doc="Gumbel-softmax temperature"),
            "sgs_weight": Float(1.0, "[0, inf)", doc="weight of the sandwich gate sparsification loss"),
            "sgs_targets": Choice(
                "cheapest", ("sandwich", "cheapest"), doc="cheapest: any width (measured); sandwich: the paper's"
            ),
            "task_weight": Float(1.0, "[0, inf)", doc="weight of the routed output's cross-entropy"),
            "task_loss": Choice(
                "mixed", ("mixed", "routed", "expected"), doc="mixed: every choice gets a gradient; routed: paper"
            ),
            "macs_weight": Float(0.5, "[0, inf)", doc="lambda of the complexity loss"),
            "macs_unit": Choice("gmacs", ("gmacs", "relative"), doc="gmacs: (mean GMACs)^2; relative: / widest"),
            "target_mmacs": Float(None, "(0, inf)", null=True, doc="budget in MMACs per sample (or target_fraction)"),
            "target_fraction": Float(
                None, "(0, 1]", null=True, doc="budget as a fraction of the widest routed sub-network's MACs"
            ),
            "target_ms": Float(
                None,
                "(0, inf)",
                null=True,
                doc="budget in milliseconds per image from gate.latency_table (not with target_mmacs/target_fraction)",
            ),
            "latency_table": PathKey(
                None,
                null=True,
                doc="latency table (`dsnet bench --checkpoint CKPT --latency-table FILE`): target_ms routes against "
                "its ms per routing choice; each epoch logs the expected ms (holdout_ms)",
            ),
            "latency_batch_size": Int(
                None, "[1, inf)", null=True, doc="the table's row: this batch size (null: the table's only one)"
            ),
            "latency_runtime": Choice("eager", ("eager", "onnx"), doc="the table's row: this runtime"),
            "latency_table_foreign": Bool(
                False, doc="use a table measured on another machine, thread count, runtime or model (warns)"
            ),
            "amp": Bool(True, doc="bfloat16 autocast of the frozen backbone's forwards on CUDA; ignored on CPU"),
        },
        S2,
    ),
    # LC-Net (``dsnet train lcnet``, SPEC 6.1): the rival of dynamic slicing, trained on its own
    "lcnet": with_stage(
        {
            **_optimiser_keys(epochs=6),
            "label_smoothing": Float(0.0, "[0, 1)", doc="label smoothing of the cross-entropy"),
            "grad_clip": Float(None, "(0, inf)", null=True, doc="clip the gradient norm to this (null: off)"),
            "tau": Float(1.0, "(0, inf)", doc="Gumbel-softmax temperature of the L-Nets"),
            "regulariser": Choice(
                "rates", ("rates", "flops"), doc="rates: per-block execution rate target; flops: expected-MACs target"
            ),
            "target_rate": Float(0.6, "(0, 1]", doc="t: target execution rate of every skippable block (ConvNet-AIG)"),
            "rate_weight": Float(2.0, "[0, inf)", doc="lambda_L of the rate loss (ConvNet-AIG)"),
            "target_flops": Float(None, "(0, 1]", null=True, doc="rho: mean MACs / dense MACs (regulariser: flops)"),
            "flops_weight": Float(2.0, "[0, inf)", doc="lambda_F of the expected-MACs loss"),
            "saliency_weight": Float(1e-3, "[0, inf)", doc="lambda_C: L1 of the C-Net saliencies"),
            "calibrate_thresholds": Bool(
                True, doc="each epoch: inference executes each block as often as its sampled gate"
            ),
            "calibration_batches": Int(50, "[1, inf)", doc="holdout batches the threshold calibration reads"),
            "final_eval": Bool(True, doc="after training: the best checkpoint on the reported split, once"),
            "eval_skip_biases": Numbers(
                [-2.0, -1.0, 0.0, 1.0, 2.0], "(-inf, inf)", doc="skip-bias operating points of the final evaluation"
            ),
            "eval_densities": Numbers([0.25, 0.75, 1.0], "(0, 1]", doc="run-time densities evaluated at skip bias 0"),
        },
        "lcnet",
    ),
    "log": with_stage(
        {
            "print_every": Int(50, "[1, inf)", doc="steps between progress-bar postfix updates"),
            "tensorboard": Bool(True, doc="TensorBoard logs when the tensorboard package is installed"),
            "progress": Bool(True, doc="progress bars (only on a terminal)"),
        },
        BOTH,
    ),
    "distributed": with_stage(
        {"backend": Choice("auto", ("auto", "nccl", "gloo"), doc="auto: nccl on CUDA, gloo on CPU")}, BOTH
    ),
}

DEFAULTS: dict[str, Any] = section_defaults(SCHEMA)


def _cross_check(cfg: dict) -> None:
    """Constraints between keys (each key's own range is in the table)."""
    for stage in ("supernet", "gate", "lcnet"):
        sc = cfg[stage]
        if sc["warmup_epochs"] > sc["epochs"]:
            raise ConfigError(
                f"{stage}.warmup_epochs: must be <= {stage}.epochs ({sc['epochs']}), got {sc['warmup_epochs']}"
            )
        if stage == "supernet" and (sc["finetune_warmup_epochs"] or 0) > sc["epochs"]:
            raise ConfigError(
                f"supernet.finetune_warmup_epochs: must be <= supernet.epochs ({sc['epochs']}), "
                f"got {sc['finetune_warmup_epochs']}"
            )
        if sc["min_lr"] > sc["lr"]:
            raise ConfigError(f"{stage}.min_lr: must be <= {stage}.lr ({sc['lr']}), got {sc['min_lr']}")
    gc = cfg["gate"]
    if gc["target_mmacs"] is not None and gc["target_fraction"] is not None:
        raise ConfigError("gate.target_fraction: gate.target_mmacs is set too; they are alternatives, set one")
    for other in ("target_mmacs", "target_fraction"):
        if gc["target_ms"] is not None and gc[other] is not None:
            raise ConfigError(f"gate.target_ms: gate.{other} is set too; they are alternatives, set one")
    if gc["target_ms"] is not None and gc["latency_table"] is None:
        raise ConfigError(
            "gate.target_ms: needs gate.latency_table (measure one: dsnet bench --checkpoint CKPT --latency-table FILE)"
        )


def _set_dotted(cfg: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = cfg
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {k} is not a mapping")
    node[keys[-1]] = value


def apply_overrides(cfg: dict, overrides: list[str] | None) -> dict:
    """``["supernet.epochs=3", "data.root=/x"]`` -> values parsed as YAML scalars."""
    cfg = copy.deepcopy(cfg)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {key}: cannot parse {raw!r} ({err})") from None
        _set_dotted(cfg, key.strip(), value)
    return cfg


def resolve_config(cfg: dict | None) -> dict:
    """Defaults merged with ``cfg``, every key's type and range checked (errors name the key)."""
    cfg = dict(cfg) if isinstance(cfg, dict) else cfg
    data = cfg.pop("data", None) if isinstance(cfg, dict) else None
    out = resolve_section(SCHEMA, cfg, "")
    out["data"] = resolve_data_config(data)
    _cross_check(out)
    return out


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> dict:
    """Read a YAML recipe (or start from defaults), apply overrides, validate."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no config file at {path}")
        try:
            raw = load_yaml(path.read_text(), str(path)) or {}  # a key given twice is an error, not the last wins
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    return resolve_config(apply_overrides(raw, overrides))


def model_config_error(name: str, err: Exception) -> ConfigError:
    """A model constructor's complaint as a ``ConfigError`` naming ``model.name`` or ``model.kwargs``."""
    message = " ".join(str(err).split())
    if message.startswith("unknown model"):
        return ConfigError(f"model.name: {message}")
    return ConfigError(f"model.kwargs: {message if message.startswith(name) else f'{name}: {message}'}")


def check_model_config(cfg: dict) -> None:
    """Build ``model.name`` with ``model.kwargs`` to validate them (what ``dsnet config check`` does).

    The kwargs are free-form, so the model's constructor is their validation:
    an unknown argument or a bad value (e.g. duplicate ``width_ratios``) is a
    ``ConfigError`` naming ``model.kwargs`` (or ``model.name``).
    """
    from dsnet.models import create_model
    from dsnet.models.base import DynamicNet
    from dsnet.models.registry import check_factory_trusted

    name, kwargs = cfg["model"]["name"], cfg["model"]["kwargs"]
    # checking a recipe (perhaps someone else's) builds its model: a factory there runs only if allowed
    check_factory_trusted(name, "the recipe (model.name)")
    try:
        model = create_model(name, **kwargs)  # the meta device would be free but costs ~10 s to set up once
    except (ValueError, TypeError) as err:
        raise model_config_error(name, err) from None
    from dsnet.models.lcnet import LCResNet

    if not isinstance(model, (DynamicNet, LCResNet)):
        raise ConfigError(f"model.name: {name} is neither a dynamic dsnet model nor an LC-Net")
