"""The rows as text: a Markdown table, JSON files and console lines."""

from __future__ import annotations

import json
from typing import Any


def _ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}x"


def to_markdown(rows: list[dict[str, Any]], header: str) -> str:
    """The rows as a Markdown table; "vs naive" / "vs torch" are the other's time over
    this row's (above 1: this row is faster)."""
    lines = [
        header,
        "",
        "| shape (B x T) | mode | impl | median ms | GFLOP/s | peak MiB | vs naive | vs torch |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ms = "—" if r["seconds"] is None else f"{r['seconds'] * 1e3:.2f}"
        gf = "—" if r["gflops"] is None else f"{r['gflops']:.1f}"
        mem = "—" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}"
        mode = r["mode"] + (" causal" if r.get("causal") else "")
        lines.append(
            f"| {r['batch']}x{r['length']} | {mode} | {r['impl']} | {ms} | {gf} | {mem} | "
            f"{_ratio(r['speedup_vs_naive'])} | {_ratio(r.get('speedup_vs_torch'))} |"
        )
    return "\n".join(lines) + "\n"


def table_line(row: dict[str, Any]) -> str:
    """One row of the shapes x modes table as the console shows it while measuring."""
    peak, naive, torch = row["peak_mib"], row["speedup_vs_naive"], row["speedup_vs_torch"]
    line = (
        f"{row['batch']}x{row['length']:<6} {row['mode']:8} {row['impl']:8} "
        f"{row['seconds'] * 1e3:10.2f} ms {row['gflops']:8.1f} GFLOP/s  peak "
        f"{'n/a' if peak is None else f'{peak:.1f} MiB':>12}"
    )
    line += "" if naive is None else f"  {naive:5.2f}x vs naive"
    return line + ("" if torch is None else f"  {torch:5.2f}x vs torch")


def scenario_line(row: dict[str, Any], first: str) -> str:
    """One timed scenario entry as the console shows it, against the scenario's ``first``."""
    return (
        f"{row['scenario']:8} {row['entry']:22} {row['seconds'] * 1e3:10.1f} ms  "
        f"{row['speedup_vs_first']:6.2f}x vs {first}"
    )


def write_markdown(path: str, rows: list[dict[str, Any]], header: str) -> None:
    """Writes :func:`to_markdown` to ``path``."""
    with open(path, "w") as f:
        f.write(to_markdown(rows, header))


def write_json(path: str, rows: list[dict[str, Any]], **fields: Any) -> None:
    """Writes ``{**fields, "rows": rows}`` to ``path``, indented: the file ``--json``
    writes and ``--from-json`` reads (``fields``: ``machine``, and for the table ``depth``
    and ``load_average_1min``)."""
    with open(path, "w") as f:
        json.dump({**fields, "rows": rows}, f, indent=2)


def read_json(path: str) -> dict[str, Any]:
    """A file written by :func:`write_json`."""
    with open(path) as f:
        return json.load(f)
