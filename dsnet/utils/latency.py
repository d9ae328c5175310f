"""Latency tables: what each routing choice of a model costs in milliseconds, on one machine, and where it applies.

A latency table is what ``dsnet bench --latency-table FILE`` measures (:mod:`dsnet.bench.latency`): for every
batch size and runtime (``eager`` PyTorch, ``onnx`` Runtime), the median milliseconds **per image** (and the
inter-quartile range) of the model's dynamic inference with every image routed to routing choice ``j`` -- the gate
runs, its cost is paid, and in ``"exit"`` mode the slimmest runs first, as a real routing to ``j`` costs. The
expected latency of a routing that sends a share ``s_j`` of the images to choice ``j`` is ``sum_j s_j * ms_j`` at
that batch size. A budget in milliseconds (``calibrate_budget(target_ms=..., latency_table=...)``,
``gate.target_ms``) is met with that cost in place of MACs; the knob is the model's own.

A table is a measurement of one setting, and it refuses to stand for another: it names the machine (the CPU or
CUDA device, ``platform.machine()``), the torch threads, the CPU allocator's setting (:mod:`dsnet.utils.allocator`;
checked when the table records it), the runtime and a fingerprint of the model's routing space (its class, gate
mode, input size, each routing choice's widths and kernels, the shapes of its weights). Using it
for a model, machine or thread count it was not measured on is a ``ValueError`` of one line that names the
difference, unless the caller allows it explicitly (``allow_foreign=True``, ``gate.latency_table_foreign: true``),
which warns in one line instead. The torch and dsnet versions are recorded, not checked.

File format (``SCHEMA``), JSON::

    schema        "dsnet-latency-table-v1"
    machine       {device: "cpu" | "cuda", device_name: str, arch: str (platform.machine()), threads: int,
                   system: str (platform.system()), allocator: "steady" | "system" (tables since 2026-12-07)}
    versions      {dsnet, torch, python[, onnxruntime]}
    model         {name: str, class: str, gate_mode: str, router: str, input_size: [C, H, W],
                   routing_space: [int], choices: [{choice, subnet, widths: [int], kernels: [int] | null,
                   macs: float}], fingerprint: str}
    channels_last bool
    rows          [{runtime: "eager" | "onnx", batch_size: int, repeats: int, warmup: int,
                    choices: [{choice, subnet, ms, iqr_ms, q1_ms, q3_ms, batch_ms}]  (ms: per image),
                    ordering: [{slimmer, wider, clear: bool, ratio_q1, ratio_q3, rounds}]  (the noise rule of
                    dsnet.bench.timing.speedup_claim between neighbouring choices)}]
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsnet.utils.allocator import allocator_setting

__all__ = [
    "SCHEMA",
    "RUNTIMES",
    "LatencyTable",
    "cpu_name",
    "machine_identity",
    "model_identity",
    "model_fingerprint",
    "load_latency_table",
    "choice_latencies",
]

SCHEMA = "dsnet-latency-table-v1"
RUNTIMES = ("eager", "onnx")
FOREIGN_HINT = (
    "measure a table here (dsnet bench --checkpoint CKPT --latency-table FILE), or pass allow_foreign=True "
    "(gate.latency_table_foreign: true, dsnet eval --latency-foreign) to use it anyway"
)


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else ``platform.processor()`` or the architecture."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_identity(device: str = "cpu", threads: int | None = None) -> dict[str, Any]:
    """This machine as a table names it: ``device`` type, its name (CPU model or CUDA device), arch, threads.

    ``threads`` defaults to torch's current intra-op thread count.
    """
    import torch

    kind = str(device).split(":")[0]
    if kind == "cuda":
        name = torch.cuda.get_device_name(device) if torch.cuda.is_available() else "no CUDA device"
    else:
        name = cpu_name()
    return {
        "device": kind,
        "device_name": name,
        "arch": platform.machine(),
        "system": platform.system(),
        "threads": int(torch.get_num_threads() if threads is None else threads),
        "allocator": allocator_setting(),
    }


def _input_size(model: Any, input_size: Sequence[int] | None) -> list[int]:
    return [int(v) for v in (input_size or model.default_input_size)]


def model_identity(model: Any, input_size: Sequence[int] | None = None, name: str | None = None) -> dict[str, Any]:
    """The ``model`` entry of a table: class, gate mode, input size, each routing choice's widths/kernels/MACs.

    ``model`` is a :class:`~dsnet.models.base.DynamicNet`; ``fingerprint`` hashes what decides the latency of
    the routing choices (see :func:`model_fingerprint`), not the weights' values.
    """
    size = _input_size(model, input_size)
    macs = model.routing_macs(size).tolist()
    choices = []
    for j, k in enumerate(model.routing_space):
        net = model.subnets[k]
        choices.append(
            {
                "choice": j,
                "subnet": int(k),
                "widths": [int(w) for w in net.widths],
                "kernels": None if net.kernels is None else [int(v) for v in net.kernels],
                "macs": float(macs[j]),
            }
        )
    return {
        "name": name or type(model).__name__,
        "class": type(model).__name__,
        "gate_mode": model.gate_mode,
        "router": model.router,
        "input_size": size,
        "routing_space": [int(k) for k in model.routing_space],
        "choices": choices,
        "fingerprint": model_fingerprint(model, size),
    }


def model_fingerprint(model: Any, input_size: Sequence[int] | None = None) -> str:
    """A short hash of what a routing choice's latency depends on: the model's class, gate mode, input size,
    each routing choice's widths and kernel sizes, and the names and shapes of every weight and buffer.

    The router (``logits``/``utility``) and the weights' values are not in it: neither changes what a choice
    costs, and stage II may change the router of the supernet a table was measured on.
    """
    shapes = sorted((name, list(t.shape)) for name, t in model.state_dict().items())
    nets = [model.subnets[k] for k in model.routing_space]
    spec = {
        "class": type(model).__name__,
        "gate_mode": model.gate_mode,
        "input_size": _input_size(model, input_size),
        "choices": [[list(n.widths), None if n.kernels is None else list(n.kernels)] for n in nets],
        "shapes": shapes,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _dsnet_version() -> str:
    """The installed dsnet's version (its package metadata; the root package is above this layer)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dsnet")
    except PackageNotFoundError:
        return "unknown"


def _versions(onnx: bool = False) -> dict[str, str]:
    import torch

    out = {"dsnet": _dsnet_version(), "torch": torch.__version__, "python": platform.python_version()}
    if onnx:
        try:
            import onnxruntime

            out["onnxruntime"] = onnxruntime.__version__
        except ImportError:
            pass
    return out


@dataclass
class LatencyTable:
    """A latency table (see the module docstring for the file format); ``data`` is its JSON content."""

    data: dict[str, Any]
    path: str | None = field(default=None, compare=False)

    # ------------------------------------------------------------------ building and files
    @classmethod
    def build(
        cls,
        model: Any,
        rows: Sequence[Mapping[str, Any]],
        *,
        input_size: Sequence[int] | None = None,
        model_name: str | None = None,
        device: str = "cpu",
        threads: int | None = None,
        channels_last: bool = False,
    ) -> LatencyTable:
        """A table for ``model`` on this machine from measured (or, in tests, made-up) ``rows``.

        Each row: ``runtime``, ``batch_size`` and ``choices`` (one ``{ms, ...}`` per routing choice, in
        routing-space order; ``ms`` per image); ``choice``/``subnet`` are filled in.
        """
        space = list(model.routing_space)
        out_rows = []
        for row in rows:
            if row["runtime"] not in RUNTIMES:
                raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {row['runtime']!r}")
            if len(row["choices"]) != len(space):
                raise ValueError(f"a row needs one entry per routing choice ({len(space)}), got {len(row['choices'])}")
            choices = []
            for j, entry in enumerate(row["choices"]):
                entry = dict(entry)
                ms = float(entry["ms"])
                if not ms > 0:
                    raise ValueError(f"routing choice {j}: ms must be positive, got {ms}")
                entry.update(choice=j, subnet=int(space[j]), ms=ms)
                choices.append(entry)
            out_rows.append({**row, "batch_size": int(row["batch_size"]), "choices": choices})
        data = {
            "schema": SCHEMA,
            "machine": machine_identity(device, threads),
            "versions": _versions(onnx=any(r["runtime"] == "onnx" for r in out_rows)),
            "model": model_identity(model, input_size, model_name),
            "channels_last": bool(channels_last),
            "rows": out_rows,
        }
        return cls(data)

    @classmethod
    def load(cls, path: str | os.PathLike) -> LatencyTable:
        """Read a table written by :meth:`save` (``dsnet bench --latency-table``); a wrong file is a ValueError."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"latency table {path}: not JSON ({err})") from None
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            found = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"latency table {path}: expected schema {SCHEMA!r}, got {found!r}")
        for key in ("machine", "model", "rows"):
            if key not in data:
                raise ValueError(f"latency table {path}: no {key!r} entry")
        return cls(data, str(path))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the table as JSON (atomically)."""
        from dsnet.utils.io import atomic_write_json

        self.path = str(path)
        return atomic_write_json(self.data, path)

    # ------------------------------------------------------------------ reading
    @property
    def label(self) -> str:
        return f"latency table {self.path}" if self.path else "the latency table"

    @property
    def rows(self) -> list[dict[str, Any]]:
        return list(self.data["rows"])

    def settings(self) -> list[tuple[str, int]]:
        """``(runtime, batch_size)`` of every row."""
        return [(r["runtime"], int(r["batch_size"])) for r in self.data["rows"]]

    def row(self, batch_size: int | None = None, runtime: str | None = None) -> dict[str, Any]:
        """The row measured at ``batch_size`` in ``runtime``.

        ``runtime=None``: the table's only runtime, else ``eager``. ``batch_size=None``: the runtime's only
        batch size (several: an error asking for one). A missing row is a ValueError naming what was measured.
        """
        measured = self.settings()
        if not measured:
            raise ValueError(f"{self.label} has no rows")
        runtimes = sorted({r for r, _ in measured})
        if runtime is None:
            runtime = runtimes[0] if len(runtimes) == 1 else "eager"
        batches = sorted(b for r, b in measured if r == runtime)
        what = ", ".join(f"{r} at batch {b}" for r, b in measured)
        if not batches:
            raise ValueError(f"{self.label} has no {runtime} rows (measured: {what})")
        if batch_size is None:
            if len(batches) > 1:
                raise ValueError(
                    f"{self.label} has {runtime} rows at batch sizes {batches}: say which one "
                    "(batch_size=, gate.latency_batch_size, --latency-batch-size)"
                )
            batch_size = batches[0]
        for r in self.data["rows"]:
            if r["runtime"] == runtime and int(r["batch_size"]) == int(batch_size):
                return r
        raise ValueError(f"{self.label} has no row for {runtime} at batch {batch_size} (measured: {what})")

    def choice_ms(self, batch_size: int | None = None, runtime: str | None = None) -> list[float]:
        """Median milliseconds per image of each routing choice (routing-space order) in that row."""
        return [float(c["ms"]) for c in self.row(batch_size, runtime)["choices"]]

    def expected_ms(self, shares: Sequence[float], batch_size: int | None = None, runtime: str | None = None) -> float:
        """``sum_j shares_j * ms_j``: the expected ms per image of a routing mix (shares normalised to sum 1)."""
        ms = self.choice_ms(batch_size, runtime)
        if len(shares) != len(ms):
            raise ValueError(f"need one share per routing choice ({len(ms)}), got {len(shares)}")
        total = float(sum(shares))
        if not total > 0:
            raise ValueError(f"routing shares must have a positive sum, got {list(shares)}")
        return sum(float(s) * m for s, m in zip(shares, ms)) / total

    # ------------------------------------------------------------------ where it applies
    def differences(
        self,
        model: Any | None = None,
        input_size: Sequence[int] | None = None,
        *,
        runtime: str | None = None,
        threads: int | None = None,
    ) -> list[str]:
        """What differs between the table's setting and the current one (empty: it applies here).

        Compared: the machine (the CUDA device for a CUDA table; for a CPU table the CPU, the architecture and
        the torch threads, ``threads`` or torch's current count, and the allocator's setting where the table records
        it), the runtime (``runtime`` must be measured),
        and, with ``model``, the fingerprint of its routing space at ``input_size``.
        """
        out: list[str] = []
        m = self.data["machine"]
        here = machine_identity(m.get("device", "cpu"), threads)
        if m.get("device_name") != here["device_name"]:
            out.append(f"{m.get('device', 'cpu')} {m.get('device_name')!r} in the table, {here['device_name']!r} here")
        if m.get("arch") != here["arch"]:
            out.append(f"architecture {m.get('arch')} in the table, {here['arch']} here")
        if m.get("device", "cpu") == "cpu" and int(m.get("threads", 0)) != here["threads"]:
            out.append(f"{m.get('threads')} torch threads in the table, {here['threads']} here")
        if m.get("device", "cpu") == "cpu" and m.get("allocator", here["allocator"]) != here["allocator"]:
            out.append(
                f"allocator {m.get('allocator')} in the table, {here['allocator']} here "
                "(dsnet.utils.allocator.steady_allocator; dsnet's --allocator)"
            )
        if runtime is not None and runtime not in {r for r, _ in self.settings()}:
            measured = ", ".join(sorted({r for r, _ in self.settings()}))
            out.append(f"runtime {runtime} not measured (the table has {measured})")
        if model is not None:
            out += self._model_differences(model, input_size)
        return out

    def _model_differences(self, model: Any, input_size: Sequence[int] | None) -> list[str]:
        t = self.data["model"]
        if t.get("fingerprint") == model_fingerprint(model, input_size):
            return []
        here = model_identity(model, input_size)
        name = f"{t.get('name')}" if t.get("name") else "the table's model"
        what = []
        for key, label in (("class", "class"), ("gate_mode", "gate mode"), ("input_size", "input size")):
            if t.get(key) != here[key]:
                what.append(f"{label} {_short(t.get(key))} vs {_short(here[key])}")
        table_nets = [(c["widths"], c.get("kernels")) for c in t.get("choices", [])]
        here_nets = [(c["widths"], c["kernels"]) for c in here["choices"]]
        if table_nets != here_nets:
            what.append(f"routing choices' widths {_nets(table_nets)} vs {_nets(here_nets)}")
        if not what:
            what.append("weight shapes differ")
        return [f"model fingerprint {t.get('fingerprint')} ({name}) vs {here['fingerprint']} here: {'; '.join(what)}"]

    def check(
        self,
        model: Any | None = None,
        input_size: Sequence[int] | None = None,
        *,
        runtime: str | None = None,
        threads: int | None = None,
        allow_foreign: bool = False,
    ) -> list[str]:
        """Raise a one-line ValueError naming what differs (:meth:`differences`); with ``allow_foreign``,
        warn in one line instead. Returns the differences."""
        diffs = self.differences(model, input_size, runtime=runtime, threads=threads)
        if diffs:
            message = f"{self.label} was measured for another setting: {'; '.join(diffs)}"
            if not allow_foreign:
                raise ValueError(f"{message} -- {FOREIGN_HINT}")
            warnings.warn(f"{message} (used anyway: allow_foreign)", stacklevel=3)
        return diffs

    def resolve(
        self,
        model: Any,
        input_size: Sequence[int] | None = None,
        *,
        batch_size: int | None = None,
        runtime: str | None = None,
        allow_foreign: bool = False,
    ) -> dict[str, Any]:
        """The row to use for ``model`` here, checked (:meth:`check`) and selected (:meth:`row`).

        A ``runtime`` the table does not have is a difference like the others: with ``allow_foreign`` the
        table's only runtime stands in for it (warned).
        """
        diffs = self.check(model, input_size, runtime=runtime, allow_foreign=allow_foreign)
        if runtime is not None and any(d.startswith(f"runtime {runtime} ") for d in diffs):
            runtime = None  # allowed: the table's only runtime (row() says so if there are several)
        row = self.row(batch_size, runtime)
        if len(row["choices"]) != len(model.routing_space):
            raise ValueError(
                f"{self.label} has {len(row['choices'])} routing choices, the model {len(model.routing_space)}: "
                "it cannot stand for this model, even allowed"
            )
        return row

    def describe(self, batch_size: int | None = None, runtime: str | None = None) -> str:
        """``eager, batch 64, on cpu 'Intel ...' (x86_64), 4 threads``: the row and where it was measured."""
        row = self.row(batch_size, runtime)
        m = self.data["machine"]
        return (
            f"{row['runtime']}, batch {row['batch_size']}, measured on {m.get('device')} {m.get('device_name')!r} "
            f"({m.get('arch')}, {m.get('threads')} threads)"
        )


def _short(value: Any) -> str:
    if isinstance(value, list):
        return "x".join(map(str, value))
    return str(value)


def _nets(nets: Sequence[tuple[Any, Any]]) -> str:
    def one(widths: Sequence[int], kernels: Sequence[int] | None) -> str:
        text = "-".join(map(str, widths))
        return text if kernels is None else f"{text}/k{'-'.join(map(str, kernels))}"

    return "[" + ", ".join(one(w, k) for w, k in nets) + "]"


def load_latency_table(table: LatencyTable | str | os.PathLike | Mapping[str, Any]) -> LatencyTable:
    """A :class:`LatencyTable` from a path, a loaded table, or its JSON content as a dict."""
    if isinstance(table, LatencyTable):
        return table
    if isinstance(table, (str, os.PathLike)):
        return LatencyTable.load(table)
    if isinstance(table, Mapping):
        if table.get("schema") != SCHEMA:
            raise ValueError(f"not a latency table: expected schema {SCHEMA!r}, got {table.get('schema')!r}")
        return LatencyTable(dict(table))
    raise TypeError(f"latency_table must be a path or a LatencyTable, got {type(table).__name__}")


def choice_latencies(
    table: LatencyTable | str | os.PathLike | Mapping[str, Any] | Sequence[float],
    model: Any,
    input_size: Sequence[int] | None = None,
    *,
    batch_size: int | None = None,
    runtime: str | None = None,
    allow_foreign: bool = False,
) -> list[float]:
    """Milliseconds per image of each of ``model``'s routing choices, from a latency table checked to apply.

    ``table``: a path, a :class:`LatencyTable`, or a plain sequence of numbers (one ms per routing choice,
    taken as given: nothing to check). The row is ``(batch_size, runtime)`` (see :meth:`LatencyTable.row`);
    a table measured for another machine, thread count, runtime or model raises (see :meth:`LatencyTable.check`).
    """
    if isinstance(table, Sequence) and not isinstance(table, (str, bytes)):
        ms = [float(v) for v in table]
        if len(ms) != len(model.routing_space) or not all(v > 0 for v in ms):
            raise ValueError(
                f"latency_table as numbers: need one positive ms per routing choice ({len(model.routing_space)}), "
                f"got {ms}"
            )
        return ms
    row = load_latency_table(table).resolve(
        model, input_size, batch_size=batch_size, runtime=runtime, allow_foreign=allow_foreign
    )
    return [float(c["ms"]) for c in row["choices"]]
