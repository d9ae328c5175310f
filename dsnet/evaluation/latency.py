"""Milliseconds next to MACs in an evaluation report, from a latency table (``dsnet eval --latency-table``).

Each routing choice's cost in ms per image is the table's row (one batch size, one runtime; measured here
with ``dsnet bench --latency-table``, checked to fit this model, machine and thread count, see
:mod:`dsnet.utils.latency`). A routing mix's expected latency is ``sum_j share_j * ms_j``: the dynamic point's
(the gate's mix at its stored bias, on the evaluated images) and every sweep point's. A routing choice's ms is
also what its static sub-network costs when every image is routed to it (gate included: the dynamic model's
path, not an extracted network).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from dsnet.utils.latency import LatencyTable, load_latency_table
from dsnet.utils.table import format_table

__all__ = ["latency_report", "latency_entry", "format_latency_report"]


def latency_report(
    report: Mapping[str, Any],
    model: Any,
    table: LatencyTable | str | os.PathLike,
    *,
    batch_size: int | None = None,
    runtime: str | None = None,
    allow_foreign: bool = False,
) -> dict[str, Any]:
    """The ``latency`` entry of an evaluation report (JSON-serialisable) for ``model`` and its ``report``.

    ``{table, row: {runtime, batch_size}, machine, choices: [{choice, subnet, macs, ms}], dynamic: {mean_macs,
    ms}, sweep: [{bias, top1, mean_macs, ms}]}``; ms per image. A table that does not fit raises (one line).
    """
    t = load_latency_table(table)
    size = tuple(report["input_size"])
    row = t.resolve(model, size, batch_size=batch_size, runtime=runtime, allow_foreign=allow_foreign)
    return latency_entry(report, t, row)


def latency_entry(report: Mapping[str, Any], table: LatencyTable, row: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`latency_report` from a row already resolved (checked) with :meth:`LatencyTable.resolve`."""
    t = table
    ms = [float(c["ms"]) for c in row["choices"]]

    def expected(fractions: Sequence[float]) -> float:
        return sum(float(f) * m for f, m in zip(fractions, ms))

    return {
        "table": t.path,
        "row": {"runtime": row["runtime"], "batch_size": int(row["batch_size"])},
        "machine": dict(t.data["machine"]),
        "choices": [{**c, "ms": m} for c, m in zip(report["routing_choices"], ms)],
        "dynamic": {
            "mean_macs": report["dynamic"]["mean_macs"],
            "ms": expected(report["dynamic"]["histogram"]["fractions"]),
        },
        "sweep": [
            {
                "bias": p["bias"],
                "top1": p["top1"],
                "mean_macs": p["mean_macs"],
                "ms": expected(p["histogram"]["fractions"]),
            }
            for p in report["sweep"]
        ],
    }


def format_latency_report(latency: Mapping[str, Any]) -> str:
    """The ``latency`` entry as console text: per routing choice and for the dynamic point, MMACs and ms."""
    m, row = latency["machine"], latency["row"]
    where = (
        f"{row['runtime']}, batch {row['batch_size']}, measured on {m.get('device')} {m.get('device_name')!r} "
        f"({m.get('threads')} threads)"
    )
    rows = [[c["choice"], c["subnet"], round(c["macs"] / 1e6, 2), f"{c['ms']:.4f}"] for c in latency["choices"]]
    dyn = latency["dynamic"]
    rows.append(["dynamic", "-", round(dyn["mean_macs"] / 1e6, 2), f"{dyn['ms']:.4f}"])
    out = [
        format_table(
            ["choice", "subnet", "MMACs", "ms/image"],
            rows,
            title=f"latency ({latency.get('table') or 'latency table'}: {where}); dynamic = the gate's mix, "
            "sum of share x ms",
        )
    ]
    sweep = [[f"{p['bias']:+.3g}", round(p["top1"], 2), round(p["mean_macs"] / 1e6, 2), f"{p['ms']:.4f}"]
             for p in latency["sweep"]]  # fmt: skip
    out += ["", format_table(["bias", "top-1 %", "MMACs", "ms/image"], sweep, title="gate-bias sweep, expected ms")]
    return "\n".join(out)
