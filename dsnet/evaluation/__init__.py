"""Evaluation reports: static sub-networks, dynamic routing and the gate-bias budget sweep (``dsnet eval``)."""

from dsnet.evaluation.core import SCHEMA_VERSION, auto_biases, bias_ramp, evaluate, routed_curve, sweep_point
from dsnet.evaluation.plot import plot_report

__all__ = ["SCHEMA_VERSION", "auto_biases", "bias_ramp", "evaluate", "plot_report", "routed_curve", "sweep_point"]
