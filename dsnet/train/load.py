"""``dsnet.load(path)``: any dsnet checkpoint back as a ready model, with the data recipe it was trained on.

One call for every checkpoint dsnet writes: stage I (``dsnet train supernet``,
``dsnet calibrate-bn``), stage II (``dsnet train gate``, either gate mode),
LC-Net, for registered models and ``"package.module:factory"`` networks
(``make_dynamic``) alike. The model is rebuilt from the architecture the
checkpoint records (``model.name`` + ``model.kwargs``, the gate mode
included), so nothing has to be passed again; its weights are loaded (the EMA
teacher's when the checkpoint has them and ``use_ema``), and it is returned
in eval mode.

.. code-block:: python

    loaded = dsnet.load("runs/fmnist_gate/best.ckpt")
    model = loaded.model                 # a DynamicNet, eval mode
    print(loaded.describe())             # stage, model, data recipe in one line each
    loaded.recipe["mean"], loaded.classes

``trust_factories`` names the ``module:function`` factories a checkpoint may
import and call (a factory is code: only those you trust); it is passed on to
:func:`dsnet.train.checkpoint.load_model`.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsnet.train.checkpoint import describe, load_model

__all__ = ["LoadedCheckpoint", "load"]


@dataclass(frozen=True)
class LoadedCheckpoint:
    """What :func:`load` returns: the model and what the checkpoint records about how it was trained."""

    model: nn.Module  # eval mode, on ``map_location``
    path: Path
    stage: str | None  # "supernet" (stage I, BN-calibrated or not), "gate" (stage II), "lcnet"; None: not recorded
    spec: dict[str, Any]  # {"name", "kwargs"}: how the model was rebuilt
    recipe: dict[str, Any] | None  # the data recipe (dsnet.data.recipe.Recipe as a dict): size, mean/std, crops
    classes: list[str] | None  # class names, index-aligned with the model's outputs
    dataset: str | None  # the dataset's name as recorded ("fashion_mnist", "folder", ...)
    ema: bool  # True: the EMA teacher's weights were loaded
    bn_calibrated: bool
    config: dict[str, Any] | None = field(default=None, repr=False)  # the run's resolved config, if recorded

    def describe(self) -> str:
        """A few lines: what the file holds, which weights were loaded, and its data recipe."""
        from dsnet.data.recipe import describe_recipe

        weights = "EMA weights" if self.ema else "weights"
        calibrated = ", BN-recalibrated" if self.bn_calibrated else ""
        mode = getattr(self.model, "gate_mode", None)
        gate = f", gate mode {mode}" if self.stage == "gate" and mode else ""
        lines = [
            f"{self.path}: {self.stage or 'unknown'} checkpoint of {describe(self.spec)} ({weights}{calibrated}{gate})"
        ]
        if self.recipe:
            lines.append(f"{self.dataset or 'data'}: {describe_recipe(self.recipe)}")
        if self.classes:
            shown = ", ".join(self.classes[:10]) + (" ..." if len(self.classes) > 10 else "")
            lines.append(f"{len(self.classes)} classes: {shown}")
        return "\n".join(lines)


def load(
    path: str | os.PathLike,
    *,
    use_ema: bool = True,
    map_location: str | torch.device = "cpu",
    trust_factories: Iterable[str] = (),
) -> LoadedCheckpoint:
    """Load any dsnet checkpoint: its model (rebuilt as recorded, weights loaded, eval mode) and its recipe.

    Args:
        path: a file written by ``dsnet train``, ``dsnet calibrate-bn`` or
            :func:`~dsnet.train.checkpoint.save_checkpoint`.
        use_ema: load the EMA teacher's weights when the checkpoint holds them (stage I); gate checkpoints
            hold one set.
        map_location: where the weights go.
        trust_factories: ``module:function`` model factories the checkpoint may run (see
            :func:`dsnet.train.checkpoint.load_model`).

    Not a dsnet checkpoint, or weights that do not fit the recorded model: a one-line ``ValueError``.
    """
    options: dict[str, Any] = {}
    if "trust_factories" in inspect.signature(load_model).parameters:
        options["trust_factories"] = tuple(trust_factories)
    model, ckpt = load_model(path, use_ema=use_ema, map_location=map_location, **options)
    info = ckpt.get("dataset") if isinstance(ckpt.get("dataset"), dict) else {}
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else None
    classes = info.get("class_names")
    return LoadedCheckpoint(
        model=model,
        path=Path(path),
        stage=ckpt.get("stage") if isinstance(ckpt.get("stage"), str) else None,
        spec={"name": ckpt["model"]["name"], "kwargs": dict(ckpt["model"].get("kwargs") or {})},
        recipe=dict(info["recipe"]) if isinstance(info.get("recipe"), dict) and info["recipe"] else None,
        classes=[str(c) for c in classes] if isinstance(classes, list) and classes else None,
        dataset=info.get("name") if isinstance(info.get("name"), str) else None,
        ema=bool(use_ema and ckpt.get("ema_state_dict")),
        bn_calibrated=bool(ckpt.get("bn_calibrated", False)),
        config=config,
    )
