"""Switch a model's train/eval mode temporarily, restoring every module's own flag.

``model.train(was_training)`` is not a restore: it overwrites the flag of every
submodule, e.g. un-freezing the BN layers that gate training keeps in eval mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

__all__ = ["temporary_mode"]


@contextlib.contextmanager
def temporary_mode(model: nn.Module, training: bool) -> Iterator[nn.Module]:
    flags = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag
