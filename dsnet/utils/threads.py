"""The process's torch thread count: one place that sets it, a default that is safe on a shared machine.

``set_threads(None)`` (auto) uses ``OMP_NUM_THREADS`` when it is set, else ``min(cores this process may run on, 8)``
(``os.sched_getaffinity``), divided among the processes of a ``torchrun``
launch on this node (``LOCAL_WORLD_SIZE``): torch's own default is every core
of the machine, which on a machine others are using too (or with several
ranks) means more busy threads than cores, and timings that mean nothing.
If the 1-minute load average says the machine is already busy, one warning
line says so (in the commands that report timings: bench, compare, quickstart).

Every command takes ``--threads N``; training configs have a top-level
``threads`` key (null: auto). A value given on the command line wins over the
config's.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import torch

__all__ = ["MAX_AUTO_THREADS", "auto_threads", "available_cores", "oversubscription", "set_threads", "warn_line"]

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


def oversubscription(threads: int) -> str | None:
    """A warning line if the machine is already busy (1-minute load + ``threads`` exceeds its cores), else None."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    cores = os.cpu_count() or 1
    if load + threads <= cores + 0.5:
        return None
    return (
        f"machine is oversubscribed: load {load:.1f} on {cores} cores; timings will be unreliable; consider --threads 1"
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
