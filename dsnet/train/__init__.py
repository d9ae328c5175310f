"""Two-stage training: supernet (stage I), BN recalibration, gate (stage II), budget calibration.

From Python, on your own model and batches (see :mod:`dsnet.train.api`)::

    from dsnet.train import fit_supernet, calibrate_bn, fit_gate, calibrate_budget

From a config, with run directories, checkpoints, resume and DDP:
:func:`~dsnet.train.supernet.train_supernet`, :func:`~dsnet.train.gate.train_gate`
(``dsnet train supernet|gate``). Both ways, and LC-Net, run one loop
(:class:`~dsnet.train.loop.TrainLoop`); ``fit_*`` take ``out=``/``resume=``,
``holdout=``, ``device=``, ``amp=`` and callbacks too, and return a
:class:`~dsnet.train.loop.TrainResult`.
"""

from dsnet.train.api import fit_gate, fit_supernet
from dsnet.train.bn_calibration import calibrate_bn
from dsnet.train.gate import GateObjective, calibrate_budget, train_gate
from dsnet.train.loop import EpochEnd, TrainLoop, TrainResult
from dsnet.train.supernet import train_supernet

__all__ = [
    "EpochEnd",
    "GateObjective",
    "TrainLoop",
    "TrainResult",
    "calibrate_bn",
    "calibrate_budget",
    "fit_gate",
    "fit_supernet",
    "train_gate",
    "train_supernet",
]
