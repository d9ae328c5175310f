"""Benchmarks of dynamic weight slicing: interleaved timing, zero-mask baseline, forced routing mixes."""

from dsnet.bench.masking import ZeroMaskBaseline, trace_widths
from dsnet.bench.routing import forced_routing, mix_choices, mix_counts
from dsnet.bench.runner import SCHEMA, BenchConfig, default_mix, format_report, run_benchmark
from dsnet.bench.timing import SpeedupClaim, Stats, interleaved, speedup_claim, summarize, time_once

__all__ = [
    "SCHEMA",
    "BenchConfig",
    "SpeedupClaim",
    "Stats",
    "ZeroMaskBaseline",
    "default_mix",
    "forced_routing",
    "format_report",
    "interleaved",
    "mix_choices",
    "mix_counts",
    "run_benchmark",
    "speedup_claim",
    "summarize",
    "time_once",
    "trace_widths",
]
