"""The CPU memory allocator's settings for steady latency: glibc malloc's adaptive thresholds fixed.

glibc's malloc serves a request above its *mmap threshold* with fresh pages from the kernel and returns freed
memory above its *trim threshold* at the top of the heap to the kernel. Both thresholds adapt to the process's
allocations (the mmap threshold grows to the largest block freed, up to 32 MiB), so a network's activations of a
few to a few hundred MiB keep being mapped, faulted in page by page and unmapped again on every call until the
thresholds have caught up, and again whenever a larger batch comes. Measured on the 2-core development machine
(``docs/benchmarks.md``, "What changed for speed"; ``benchmarks/results/allocator.txt``): with both thresholds
fixed, ds_mobilenet_v1 and ds_resnet50 at batch 32 ran their slimmest sub-networks 1.4-1.8x faster and a
stage-I training step of ds_resnet8_tiny at batch 256 took 425-530 ms instead of 607-619 ms.

:func:`steady_allocator` fixes them (``mallopt``, what the ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` environment variables do at start-up): freed blocks below 1 GiB stay in the process
for the next call. The cost is that the process keeps its peak heap instead of returning it between calls,
which is what a serving or benchmarking process wants. Every ``dsnet`` command applies it
(``--allocator system`` leaves malloc as it is); a program of one's own calls it once at start-up. Latency
tables record :func:`allocator_setting` and a table measured under the other setting says so where it is used.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

__all__ = ["ALLOCATOR_SETTINGS", "STEADY_THRESHOLD", "allocator_setting", "steady_allocator"]

ALLOCATOR_SETTINGS = ("steady", "system")
STEADY_THRESHOLD = 1 << 30  # bytes: mmap and trim thresholds (mallopt takes an int: at most 2 GiB - 1)
_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

_state: dict[str, bool] = {"steady": False}


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def steady_allocator(threshold: int = STEADY_THRESHOLD) -> bool:
    """Fix glibc malloc's mmap and trim thresholds at ``threshold`` bytes for this process; True if applied.

    Both are needed: a fixed trim threshold alone turns the adaptation off with the mmap threshold at its
    128 KiB start, and every activation is mapped afresh (4x slower in a throwaway check). Does nothing and
    returns False where the C library is not glibc (macOS, musl, Windows). Safe to call more than once.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, int) or not 0 < threshold < 2**31:
        raise ValueError(f"threshold must be a positive number of bytes below 2 GiB, got {threshold!r}")
    libc = _glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, threshold))
    _state["steady"] = _state["steady"] or ok
    return ok


def allocator_setting() -> str:
    """``"steady"`` if this process's glibc thresholds are fixed (by :func:`steady_allocator` or both
    environment variables), else ``"system"``."""
    if _state["steady"] or all(os.environ.get(name, "").strip() for name in _ENV):
        return "steady"
    return "system"
