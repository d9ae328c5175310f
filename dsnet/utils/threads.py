"""The process's torch thread count: one place that sets it, a default that is safe on a shared machine.

``set_threads(None)`` (auto) uses ``OMP_NUM_THREADS`` when it is set, else ``min(cores this process may run on, 8)``
(``os.sched_getaffinity``), divided among the processes of a ``torchrun``
launch on this node (``LOCAL_WORLD_SIZE``): torch's own default is every core
of the machine, which on a machine others are using too (or with several
ranks) means more busy threads than cores, and timings that mean nothing.
If other processes keep the machine's cores busy (their running threads, read from
``/proc``; the 1-minute load average elsewhere), one warning line says so (in the
commands that report timings: bench, compare, quickstart).

Every command takes ``--threads N``; training configs have a top-level
``threads`` key (null: auto). A value given on the command line wins over the
config's.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

__all__ = [
    "MAX_AUTO_THREADS",
    "auto_threads",
    "available_cores",
    "oversubscription",
    "others_running",
    "set_threads",
    "warn_line",
]

MAX_AUTO_THREADS = 8  # beyond this, intra-op threads of small-batch CNN inference/training rarely help

_state: dict[str, object] = {"threads": None, "explicit": False, "warned": False}


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity; ``os.cpu_count()`` where that is unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def auto_threads() -> int:
    """``min(available cores / local processes, 8)``, at least 1; ``OMP_NUM_THREADS``, when set, wins."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:  # the usual way to cap a process's threads: honoured, not overridden
        return int(env)
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return max(1, min(available_cores() // local, MAX_AUTO_THREADS))


def _own_running() -> int:
    """This process's threads that are running or runnable now (``/proc/self/task/*/stat`` state ``R``)."""
    count = 0
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        count += state == "R"
    return count


def others_running(samples: int = 5, interval: float = 0.02) -> float | None:
    """Threads of *other* processes running or runnable now: the median over ``samples`` readings of the
    kernel's count (``/proc/loadavg``) less this process's own. None where ``/proc`` does not say (not Linux).

    Unlike the 1-minute load average it leaves out this process's own work: a check made after a training or
    timing loop in the same process would otherwise see the machine as busy with itself.
    """
    counts = []
    try:
        for i in range(samples):
            if i:
                time.sleep(interval)
            with open("/proc/loadavg") as f:
                runnable = int(f.read().split()[3].split("/")[0])
            counts.append(max(0, runnable - _own_running()))
    except (OSError, ValueError, IndexError):
        return None
    return float(statistics.median(counts))


def oversubscription(threads: int) -> str | None:
    """A warning line if the machine is already busy, else None: other processes' running threads
    (:func:`others_running`; the 1-minute load average where that is unknown) plus ``threads`` exceed its cores."""
    load = others_running()
    what = "other processes' running threads"
    if load is None:
        what = "load"
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            return None
    cores = os.cpu_count() or 1
    if load + threads <= cores + 0.5:
        return None
    return (
        f"machine is oversubscribed: {what} {load:.1f} on {cores} cores; timings will be unreliable; "
        "consider --threads 1"
    )


def warn_line(message: str) -> None:
    """``warning: message`` on stderr, from the first rank only."""
    if os.environ.get("RANK", "0") == "0":  # one line per launch, not one per rank
        print(f"warning: {message}", file=sys.stderr, flush=True)


def set_threads(threads: int | None = None, *, override: bool = True, warn: Callable[[str], None] | None = None) -> int:
    """Set torch's intra-op thread count for this process, once; returns the count in effect.

    ``threads=None`` is auto (:func:`auto_threads`) and changes nothing once a
    count has been set. An explicit count is applied, except that
    ``override=False`` (a config's value) does not replace an explicit count
    set earlier (the command line's ``--threads``). ``warn`` (e.g.
    :func:`warn_line`; the commands that report timings pass it) receives the
    oversubscription warning, at most once per process.
    """
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer or null (auto), got {threads!r}")
    current = _state["threads"]
    if current is not None and (threads is None or (not override and _state["explicit"])):
        return int(current)  # type: ignore[arg-type]
    count = auto_threads() if threads is None else threads
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    _state["threads"] = count
    _state["explicit"] = bool(_state["explicit"]) or threads is not None
    if warn is not None and not _state["warned"]:
        _state["warned"] = True
        message = oversubscription(count)
        if message:
            warn(message)
    return count
