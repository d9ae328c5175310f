"""Pretrained weights into dsnet models: ``create_model(name, checkpoint_path=...)``.

One converter per source format, chosen by the keys the file holds:

=====================  ======================  =================================================
format                 into                    keys
=====================  ======================  =================================================
dsnet                  any dsnet model         a dsnet checkpoint or ``model.state_dict()``
torchvision/timm       ``DSResNet``            ``conv1``, ``bn1``, ``layer1.0.conv1`` ...,
ResNet                                         ``layer2.0.downsample.0/1``, ``fc``
timm ViT / DeiT        ``DSViT``               ``patch_embed.proj``, ``cls_token``, ``pos_embed``,
                                               ``blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``,
                                               ``norm``, ``head``
official DS-Net        ``DSMobileNetV1``       ``conv_stem``, ``bn1.aux_bn.i``,
                                               ``blocks.s.first_block`` / ``residual_blocks.j`` with
                                               ``conv_dw``, ``bn1``, ``gate.conv_reduce``,
                                               ``gate.conv_expand``, ``gate.gate.0``, ``conv_pw``, ``bn2``;
                                               ``classifier``
original network       ``make_dynamic`` nets   the converted network's own ``state_dict()`` keys
=====================  ======================  =================================================

Containers are unwrapped (``state_dict_ema`` / ``model_ema`` when
``use_ema``, else ``state_dict`` / ``model``; a ``module.`` prefix from
DataParallel is stripped). The official release (``DS_MBNet-70_1.pth.tar``)
is a timm ``CheckpointSaver`` file: ``state_dict``, ``state_dict_ema``,
``optimizer``, ``args`` (an ``argparse.Namespace``), ``epoch``.

**What is exact.** Imports of networks trained alone put their weights into
the full-width layers and their BatchNorm statistics into every statistics
slot; the gate's attention head starts as the identity (it had none), so the
largest sub-network computes the source network's function. ResNet imports
are then importance-ordered (:func:`dsnet.layers.channel_order.reorder_channels`, L1 by
default; ``importance=None`` keeps the source order bit for bit), so narrow
sub-networks start from the strongest channels; the full-width function is
unchanged up to float summation order. The official DS-Net supernet is
already nested: its channel order is kept, and each of its per-width
BatchNorm statistics (``aux_bn.i``, one per width of that layer) goes to the
statistics slots of the sub-networks that run that layer at that width, so
every sub-network reproduces the official one.

**What is adapted, with a warning.** A classifier whose number of classes
differs keeps its initialisation (fine-tuning on a new dataset); an RGB stem
loaded into a one-channel model has its kernel summed over the colour
channels (as timm does). Any other missing, unexpected or mis-shaped key is
an error naming the first few.
"""

from __future__ import annotations

import argparse
import os
import pickle
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from dsnet.models.base import EXIT_HEAD_PREFIX, DynamicNet

__all__ = ["ImportReport", "load_pretrained", "read_state_dict", "FORMATS"]


@dataclass
class ImportReport:
    """What :func:`load_pretrained` did."""

    source: str
    format: str
    loaded: int = 0
    initialised: list[str] = field(default_factory=list)  # model tensors the source does not have
    adapted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    reordered_groups: int = 0
    notes: list[str] = field(default_factory=list)  # what was done as the checkpoint records (not warned about)

    def __str__(self) -> str:
        parts = [f"loaded {self.loaded} tensors from {self.source} ({self.format})"]
        if self.initialised:
            parts.append(f"{len(self.initialised)} new tensors keep their initialisation (the gate)")
        parts += self.notes + self.adapted + self.skipped
        if self.reordered_groups:
            parts.append(f"channels of {self.reordered_groups} groups ordered by importance")
        return "; ".join(parts)


# ---------------------------------------------------------------------------------------------- reading
def _torch_load(path: Path) -> object:
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # the official checkpoints' "args"
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass
    except Exception as err:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from None
    # not plain tensors: only dsnet's own checkpoints (config, RNG states) are read in full, as --resume does
    from dsnet.utils.checkpoint import read_checkpoint_file

    try:
        return read_checkpoint_file(path)  # weights only, no factory check: the caller built the model
    except ValueError:
        raise ValueError(
            f"{path} holds Python objects other than tensors and is not a dsnet checkpoint; "
            "save its state_dict() and load that"
        ) from None


def read_state_dict(source: str | os.PathLike | Mapping[str, Tensor], use_ema: bool = True) -> tuple[dict, str]:
    """The state dict in a file (or mapping), unwrapped from its container. Returns it and its container's name."""
    if isinstance(source, Mapping):
        obj: object = source
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint at {path}")
        obj = _torch_load(path)
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a state dict or a checkpoint dict, found {type(obj).__name__}")
    container = "state dict"
    fmt = obj.get("format")
    if isinstance(fmt, str) and fmt.startswith("dsnet-checkpoint"):
        key = "ema_state_dict" if use_ema and obj.get("ema_state_dict") else "state_dict"
        obj, container = obj[key], f"dsnet checkpoint, {key}"
    else:
        keys = ("state_dict_ema", "model_ema", "state_dict", "model") if use_ema else ("state_dict", "model")
        for key in keys:
            if isinstance(obj.get(key), Mapping):
                obj, container = obj[key], key
                break
    state = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not state:
        raise ValueError("the checkpoint holds no tensors")
    if all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state, container


# --------------------------------------------------------------------------------------- shared loading
def _fmt_keys(keys: list[str]) -> str:
    more = f" ... ({len(keys)} in all)" if len(keys) > 5 else ""
    return ", ".join(keys[:5]) + more


def _first_conv_adapted(key: str, value: Tensor, target: Tensor, report: ImportReport) -> Tensor | None:
    """An RGB first convolution for a one-channel model: sum over the colour channels (timm's rule)."""
    if value.dim() == 4 and target.dim() == 4 and value.shape[1] == 3 and target.shape[1] == 1:
        if value.shape[0] == target.shape[0] and value.shape[2:] == target.shape[2:]:
            report.adapted.append(f"{key}: 3 input channels summed into 1")
            return value.sum(1, keepdim=True)
    return None


def _finish(
    model: nn.Module,
    mapped: dict[str, Tensor],
    unconsumed: list[str],
    report: ImportReport,
    *,
    optional: Callable[[str], bool],
    classifier: tuple[str, ...],
    first_conv: str | None,
) -> None:
    """Check and load converted tensors: every model key must be mapped unless ``optional`` (the gate)."""
    own = model.state_dict()
    if unconsumed:
        raise ValueError(
            f"{report.source} ({report.format}) has keys {type(model).__name__} has no place for: "
            f"{_fmt_keys(unconsumed)}"
        )
    missing = [k for k in own if k not in mapped and not optional(k)]
    if missing:
        raise ValueError(f"{report.source} ({report.format}) lacks {_fmt_keys(missing)}")
    new = dict(own)
    skipped_classifier = False
    for key, value in mapped.items():
        target = own[key]
        value = value.to(target.dtype)
        if value.shape != target.shape and target.dim() == value.dim() + 1 and target.shape[1:] == value.shape:
            value = value.expand_as(target).clone()  # one BN statistic -> every statistics slot
        if value.shape != target.shape and key == first_conv:
            adapted = _first_conv_adapted(key, value, target, report)
            value = value if adapted is None else adapted
        if value.shape != target.shape and key in classifier:
            skipped_classifier = True
            continue
        if value.shape != target.shape:
            raise ValueError(
                f"{report.source} ({report.format}): {key} has shape {tuple(value.shape)}, "
                f"the model's is {tuple(target.shape)}"
            )
        new[key] = value
        report.loaded += 1
    if skipped_classifier:
        report.skipped.append(
            f"classifier ({', '.join(classifier)}) has another number of classes: it keeps its initialisation"
        )
    report.initialised = [k for k in own if k not in mapped]
    model.load_state_dict(new)


def _gate_keys(model: nn.Module) -> Callable[[str], bool]:
    """The routing keys a source network lacks: the gate's and the exit head's (they keep their initialisation)."""
    gate = model.gate
    prefixes = (next(n for n, m in model.named_modules() if m is gate) + ".", _EXIT_HEAD)
    return lambda key: key.startswith(prefixes)


# ---------------------------------------------------------------------------------------------- formats
@dataclass(frozen=True)
class Format:
    """A source format: which models it applies to, how its keys are recognised, how it loads."""

    name: str
    applies: Callable[[nn.Module], bool]
    detect: Callable[[nn.Module, dict], bool]
    load: Callable[[nn.Module, dict, ImportReport, object], None]


_EXIT_HEAD = EXIT_HEAD_PREFIX  # the early-exit routing head of gate_mode="exit" (DynamicNet.set_gate_mode)


def _match_gate_mode(model: nn.Module, state: dict, report: ImportReport) -> None:
    """A stage II checkpoint of ``gate_mode="exit"`` into a model built with ``"pre"``, or the reverse.

    The routing head is the only difference (the supernet's weights are the
    same): a model without an exit head gets one when the checkpoint has it
    (the checkpoint's gate mode wins: it is what was trained), and an exit
    head the checkpoint lacks (a stage I checkpoint) keeps its initialisation
    (stage II trains it).
    """
    if not isinstance(model, DynamicNet):
        return
    has_head = DynamicNet.gate_mode_of(state) == "exit"
    if has_head and model.exit_head is None:
        model.set_gate_mode("exit")
        report.notes.append("gate_mode set to 'exit' as the checkpoint's gate is an early-exit head")
    elif not has_head and model.exit_head is not None:
        report.initialised += [k for k in model.state_dict() if k.startswith(_EXIT_HEAD)]
        report.notes.append(
            "the checkpoint has no exit head (a stage I checkpoint, or the paper's gate): the model's exit head "
            "starts untrained; build with gate_mode='pre' to route with the checkpoint's own gate"
        )


def _load_dsnet(model: nn.Module, state: dict, report: ImportReport, importance: object) -> None:
    _match_gate_mode(model, state, report)
    own = {k: v for k, v in model.state_dict().items() if k not in report.initialised}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        what = []
        if missing:
            what.append(f"missing {_fmt_keys(missing)}")
        if unexpected:
            what.append(f"unexpected {_fmt_keys(unexpected)}")
        if shapes:
            what.append(f"other shapes (checkpoint vs model) {_fmt_keys(shapes)}")
        hint = ""
        if "dsnet checkpoint" in report.format:
            hint = f"; dsnet.load({report.source!r}) rebuilds the model it records"
        raise ValueError(
            f"{report.source} ({report.format}) does not fit {type(model).__name__}: {'; '.join(what)}{hint}"
        )
    model.load_state_dict(state, strict=not report.initialised)
    report.loaded = len(state)


def _is_dsnet_state(model: nn.Module, state: dict) -> bool:
    """dsnet's own keys, gate included (timm ViT keys are dsnet's too, but no source network has the gate)."""
    own = {k for k in model.state_dict() if not k.startswith(_EXIT_HEAD)}  # either gate mode's checkpoint
    state = {k: v for k, v in state.items() if not k.startswith(_EXIT_HEAD)}
    is_gate = _gate_keys(model)
    return len(own & set(state)) >= 0.9 * max(len(own), len(state)) and any(is_gate(k) for k in state)


def _resnet_key(model: nn.Module) -> Callable[[str], str | None]:
    """torchvision/timm ResNet key -> DSResNet key."""
    stage_index: dict[tuple[int, int], int] = {}
    counts: dict[int, int] = {}
    for i, s in enumerate(model._block_stage):
        stage_index[(s, counts.get(s, 0))] = i
        counts[s] = counts.get(s, 0) + 1
    renames = {"downsample.0": "shortcut.conv", "downsample.1": "shortcut.bn"}

    def convert(key: str) -> str | None:
        head, _, rest = key.partition(".")
        if head == "conv1":
            return f"stem.{rest}"
        if head == "bn1":
            return f"stem_bn.{rest}"
        if head == "fc":
            return f"classifier.{rest}"
        if head.startswith("layer") and head[5:].isdigit():
            block, _, tail = rest.partition(".")
            i = stage_index.get((int(head[5:]), int(block))) if block.isdigit() else None
            if i is None:
                return None
            for old, new in renames.items():
                if tail.startswith(old + "."):
                    tail = new + tail[len(old) :]
            return f"blocks.{i}.{tail}"
        return None

    return convert


def _load_resnet(model: nn.Module, state: dict, report: ImportReport, importance: object) -> None:
    to_ours = _resnet_key(model)
    own = model.state_dict()
    mapped, unconsumed = {}, []
    for key, value in state.items():
        ours = to_ours(key)
        if ours is None or ours not in own:
            unconsumed.append(key)
        else:
            mapped[ours] = value
    _finish(
        model,
        mapped,
        unconsumed,
        report,
        optional=_gate_keys(model),
        classifier=("classifier.weight", "classifier.bias"),
        first_conv="stem.weight",
    )
    model.gate.init_identity_attention()
    if importance is not None and importance != "none":
        from dsnet.layers.channel_order import reorder_channels

        report.reordered_groups = reorder_channels(model, importance)


def _load_vit(model: nn.Module, state: dict, report: ImportReport, importance: object) -> None:
    from dsnet.layers.transformer import resample_pos_embed

    own = model.state_dict()
    mapped, unconsumed = {}, []
    for key, value in state.items():
        if key not in own:
            unconsumed.append(key)
            continue
        if key == "pos_embed" and value.shape != own[key].shape and value.shape[-1] == own[key].shape[-1]:
            prefix = model.num_prefix_tokens
            side = round((value.shape[1] - prefix) ** 0.5)
            if side * side == value.shape[1] - prefix:
                value = resample_pos_embed(value, model.grid, (side, side), prefix)
                report.adapted.append(f"pos_embed: {side}x{side} grid resampled to {model.grid[0]}x{model.grid[1]}")
        mapped[key] = value
    _finish(
        model,
        mapped,
        unconsumed,
        report,
        optional=_gate_keys(model),
        classifier=("head.weight", "head.bias"),
        first_conv="patch_embed.proj.weight",
    )
    model.gate.init_identity_attention()


def _bn_slot_widths(model: nn.Module) -> dict[str, dict[int, int]]:
    """DS-MobileNetV1: for every BN, the width it normalises in each statistics slot it uses."""
    seen: dict[str, dict[int, int]] = {}
    for k in range(len(model.subnets)):
        widths, slots = model.subnets[k].widths, model.slots(k)
        seen.setdefault("stem_bn", {})[slots[0]] = widths[0]
        for i, stage in enumerate(model._block_stage):
            width, in_slot, slot = model._block_args(i, k)
            in_width = widths[stage - 1] if model._block_first[i] else widths[stage]
            seen.setdefault(f"blocks.{i}.bn1", {})[in_slot] = in_width
            seen.setdefault(f"blocks.{i}.bn2", {})[slot] = width
    return seen


def _official_block_names(model: nn.Module) -> list[str]:
    names, within = [], 0
    for i, first in enumerate(model._block_first):
        within = 0 if first else within + 1
        stage = model._block_stage[i] - 1
        names.append(f"blocks.{stage}.first_block" if first else f"blocks.{stage}.residual_blocks.{within - 1}")
    return names


def _load_official(model: nn.Module, state: dict, report: ImportReport, importance: object) -> None:
    own = model.state_dict()
    slot_widths = _bn_slot_widths(model)
    mapped: dict[str, Tensor] = {}
    consumed: set[str] = set()

    def take(src: str, dst: str, reshape: bool = False) -> None:
        if src in state:
            value = state[src]
            mapped[dst] = value.flatten(1) if reshape else value
            consumed.add(src)

    def take_bn(src: str, dst: str) -> None:
        """Official per-width BN (``aux_bn.i``, one per width, affine on the last) -> per-slot statistics."""
        aux = []
        while f"{src}.aux_bn.{len(aux)}.running_mean" in state:
            aux.append(f"{src}.aux_bn.{len(aux)}")
        if not aux:
            return
        widths = [state[f"{a}.running_mean"].numel() for a in aux]
        mean, var = own[f"{dst}.running_mean"].clone(), own[f"{dst}.running_var"].clone()
        tracked = own[f"{dst}.num_batches_tracked"].clone()
        for slot, width in slot_widths[dst].items():
            if width not in widths:
                raise ValueError(
                    f"{report.source} ({report.format}): {src} has statistics for widths {widths}, "
                    f"the model runs {dst} at width {width}"
                )
            a = aux[widths.index(width)]
            mean[slot, :width] = state[f"{a}.running_mean"]
            var[slot, :width] = state[f"{a}.running_var"]
            tracked[slot] = state.get(f"{a}.num_batches_tracked", torch.tensor(0))
        mapped.update({f"{dst}.running_mean": mean, f"{dst}.running_var": var, f"{dst}.num_batches_tracked": tracked})
        for a in aux:
            consumed.update(k for k in state if k.startswith(a + "."))
        take(f"{aux[-1]}.weight", f"{dst}.weight")
        take(f"{aux[-1]}.bias", f"{dst}.bias")

    take("conv_stem.weight", "stem.weight")
    take_bn("bn1", "stem_bn")
    for i, src in enumerate(_official_block_names(model)):
        dst = f"blocks.{i}"
        take(f"{src}.conv_dw.weight", f"{dst}.dw.weight")
        take_bn(f"{src}.bn1", f"{dst}.bn1")
        for part in ("reduce", "expand"):
            take(f"{src}.gate.conv_{part}.weight", f"{dst}.se.{part}.weight", reshape=True)
            take(f"{src}.gate.conv_{part}.bias", f"{dst}.se.{part}.bias")
        head = f"{src}.gate.gate.0.weight"
        if head in state:
            consumed.add(head)
            if f"{dst}.se.slim_head.weight" in own and own[f"{dst}.se.slim_head.weight"].numel() == state[head].numel():
                mapped[f"{dst}.se.slim_head.weight"] = state[head].flatten(1)
            else:
                report.skipped.append(
                    f"{head}: the official gate head has {state[head].shape[0]} choices, "
                    f"this model's routing space another number: it keeps its initialisation"
                )
        take(f"{src}.conv_pw.weight", f"{dst}.pw.weight")
        take_bn(f"{src}.bn2", f"{dst}.bn2")
    take("classifier.weight", "classifier.weight")
    take("classifier.bias", "classifier.bias")
    gate_state = ("se.budget_bias", "se.attention_gain", "se.slim_head.weight")
    _finish(
        model,
        mapped,
        [k for k in state if k not in consumed],
        report,
        optional=lambda k: k.endswith(gate_state) or k.startswith(_EXIT_HEAD),
        classifier=("classifier.weight", "classifier.bias"),
        first_conv="stem.weight",
    )


def _load_source(model: nn.Module, state: dict, report: ImportReport, importance: object) -> None:
    # the default ranking follows the one the network was made dynamic with
    report.reordered_groups = model.load_source_state_dict(state, "same" if importance == "l1" else importance)
    report.loaded = len(state)


def _family(cls_name: str) -> Callable[[nn.Module], bool]:
    return lambda model: any(c.__name__ == cls_name for c in type(model).__mro__)


def _is_source_state(model: nn.Module, state: dict) -> bool:
    return set(state) <= (model._source_keys | set(model.net.state_dict()))


FORMATS: tuple[Format, ...] = (
    Format("dsnet", lambda m: isinstance(m, DynamicNet), _is_dsnet_state, _load_dsnet),
    Format(
        "torchvision/timm ResNet",
        _family("DSResNet"),
        lambda m, s: "conv1.weight" in s and "layer1.0.conv1.weight" in s,
        _load_resnet,
    ),
    Format(
        "timm ViT/DeiT",
        _family("DSViT"),
        lambda m, s: "patch_embed.proj.weight" in s and "blocks.0.attn.qkv.weight" in s,
        _load_vit,
    ),
    Format(
        "official DS-Net",
        _family("DSMobileNetV1"),
        lambda m, s: "conv_stem.weight" in s and any(k.startswith("blocks.0.first_block.") for k in s),
        _load_official,
    ),
    Format("original network (make_dynamic)", _family("FxDynamicNet"), _is_source_state, _load_source),
)


def load_pretrained(
    model: nn.Module,
    source: str | os.PathLike | Mapping[str, Tensor],
    *,
    importance: object = "l1",
    use_ema: bool = True,
) -> ImportReport:
    """Load ``source`` (a file or a state dict) into ``model``, converting from the format its keys reveal.

    ``importance`` orders channels after importing a network trained alone
    (ResNet formats and ``make_dynamic`` networks; ``None`` keeps the source
    order). ``use_ema`` prefers the EMA weights of checkpoints that hold both.
    Returns an :class:`ImportReport`; adaptations are also warned about.
    """
    state, container = read_state_dict(source, use_ema)
    label = "<state dict>" if isinstance(source, Mapping) else str(source)
    candidates = [f for f in FORMATS if f.applies(model)]
    matches = [f for f in candidates if f.detect(model, state)]
    if not matches:
        raise ValueError(
            f"cannot tell the format of {label}: its keys ({_fmt_keys(sorted(state))}) fit none of the "
            f"formats {type(model).__name__} imports ({', '.join(f.name for f in candidates)})"
        )
    fmt = matches[0]
    report = ImportReport(label, f"{fmt.name} format, {container}")
    fmt.load(model, state, report, importance)
    for note in report.adapted + report.skipped:
        warnings.warn(f"{label}: {note}", stacklevel=2)
    return report
