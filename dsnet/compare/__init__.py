"""``dsnet compare``: DS-Net and its rivals (US-Nets, networks trained alone, progressive sub-network search,
a confidence cascade) trained on the same data with the same epochs, evaluated and timed by one harness."""

from dsnet.compare import methods  # noqa: F401  (registers the methods)
from dsnet.compare.core import METHODS, CompareContext, Method, Point, register_method, time_points
from dsnet.compare.run import COMPARE_DEFAULTS, compare_config, gain_at_equal_macs, run_compare

__all__ = [
    "METHODS",
    "COMPARE_DEFAULTS",
    "CompareContext",
    "Method",
    "Point",
    "compare_config",
    "gain_at_equal_macs",
    "register_method",
    "run_compare",
    "time_points",
]
