"""A benchmark run as result rows: shapes x modes x implementations, or the scenarios.

Each row is printed as it is measured (see :mod:`flax_dotattn.bench.report`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax

from flax_dotattn.bench import report
from flax_dotattn.bench.entries import (
    DECODE_LENGTHS,
    MEMORY_ENTRIES,
    SCENARIO_ENTRIES,
    SCENARIO_LENGTH,
    SCENARIO_LENGTHS,
    WINDOW_MEMORY_LENGTHS,
    build_entry,
    flops,
)
from flax_dotattn.bench.measure import measure_memory, time_entries

#: Seconds a memory probe may take before it counts as failed.
PROBE_TIMEOUT = 900
#: The implementations run at every length; the others form the T x T scores.
LINEAR = ("chunked", "default")


class Group(NamedTuple):
    """Entries timed together (interleaved): one shape and mode, several implementations."""

    batch: int
    length: int
    mode: str
    impls: list[str]


def table_rows(
    groups: Sequence[Group],
    *,
    depth: int,
    causal: bool,
    repeats: int,
    max_naive_length: int,
    memory: bool,
) -> list[dict[str, Any]]:
    """Times each group and, unless ``memory`` is False, probes each entry's peak memory;
    prints and returns one row per entry. Implementations outside :data:`LINEAR` are
    skipped beyond ``max_naive_length``, and large groups take at most 5 samples."""
    rows = []
    for b, t, mode, impls in groups:
        impls = [i for i in impls if i in LINEAR or t <= max_naive_length]
        samples = repeats if b * t * t <= 2**26 else max(1, min(repeats, 5))
        specs = {
            impl: dict(impl=impl, mode=mode, b=b, t=t, d=depth, causal=causal) for impl in impls
        }
        seconds = time_entries(specs, samples)
        for impl in impls:
            peak = measure_memory(specs[impl], PROBE_TIMEOUT) if memory else None
            rows.append(_row(specs[impl], seconds, peak))
            print(report.table_line(rows[-1]), flush=True)
    return rows


def _row(spec: dict[str, Any], seconds: dict[str, float], peak: float | None) -> dict[str, Any]:
    """One entry's row, as ``--json`` writes it; ``seconds`` holds its whole group."""
    mode, b, t, d, causal = spec["mode"], spec["b"], spec["t"], spec["d"], spec["causal"]
    own, base, torch_time = seconds[spec["impl"]], seconds.get("naive"), seconds.get("torch_sdpa")
    return dict(
        batch=b,
        length=t,
        depth=d,
        mode=mode,
        causal=causal,
        impl=spec["impl"],
        seconds=own,
        gflops=flops(mode, b, t, d, causal) / own / 1e9,
        peak_mib=peak,
        speedup_vs_naive=None if base is None else base / own,
        speedup_vs_torch=None if torch_time is None else torch_time / own,
    )


def scenario_rows(names: Sequence[str], repeats: int, memory: bool) -> list[dict[str, Any]]:
    """Times each scenario's entries (interleaved) and, for the window, its peak memory
    against T; prints and returns one row per entry."""
    rows = []
    for scenario in names:
        if scenario == "decode":
            rows += _decode_timings(repeats)
            continue
        if scenario == "serving":
            from flax_dotattn.bench.serving import serving_rows  # imports the Flax module

            rows += serving_rows(repeats)
            continue
        rows += _scenario_timings(scenario, repeats)
        if scenario == "window" and memory:
            rows += _window_memory()
        if scenario in MEMORY_ENTRIES and memory:
            rows += _entry_memory(scenario)
        if scenario == "flax":
            rows += _compiled_temp_memory(scenario)
    return rows


def _scenario_timings(scenario: str, repeats: int) -> list[dict[str, Any]]:
    entries = SCENARIO_ENTRIES[scenario]
    length = SCENARIO_LENGTHS.get(scenario, SCENARIO_LENGTH)
    specs = {e: {"scenario": e, "t": length} for e in entries}
    seconds = time_entries(specs, repeats)
    rows = []
    for e in entries:
        row = dict(scenario=scenario, entry=e, length=length, seconds=seconds[e])
        row["speedup_vs_first"] = seconds[entries[0]] / seconds[e]
        rows.append(row)
        print(report.scenario_line(row, entries[0]), flush=True)
    return rows


def _entry_memory(scenario: str) -> list[dict[str, Any]]:
    """Each entry's peak memory at the scenario's length (a fresh process each)."""
    rows = []
    length = SCENARIO_LENGTHS.get(scenario, SCENARIO_LENGTH)
    for e in MEMORY_ENTRIES[scenario]:
        peak = measure_memory({"scenario": e, "t": length}, PROBE_TIMEOUT)
        rows.append(dict(scenario=scenario, entry=e, length=length, peak_mib=peak))
        print(f"{scenario:8} {e:22} T={length:<6} peak {peak} MiB", flush=True)
    return rows


def _compiled_temp_memory(scenario: str) -> list[dict[str, Any]]:
    """Each entry's temporaries as XLA's compiler accounts them (no run needed)."""
    rows = []
    length = SCENARIO_LENGTHS.get(scenario, SCENARIO_LENGTH)
    for e in SCENARIO_ENTRIES[scenario]:
        fn, args = build_entry({"scenario": e, "t": length})
        analysis = jax.jit(fn).lower(*args).compile().memory_analysis()  # fn is jitted already
        assert analysis is not None, "XLA:CPU reports its compiled memory"
        temp = analysis.temp_size_in_bytes / 2**20
        rows.append(dict(scenario=scenario, entry=e, length=length, temp_mib=temp))
        print(f"{scenario:8} {e:22} T={length:<6} compiled temporaries {temp:.0f} MiB", flush=True)
    return rows


def _decode_timings(repeats: int) -> list[dict[str, Any]]:
    """One decoding step, cached against recomputed, at each of :data:`DECODE_LENGTHS`."""
    entries = SCENARIO_ENTRIES["decode"]
    rows = []
    for t in DECODE_LENGTHS:
        seconds = time_entries({e: {"scenario": e, "t": t} for e in entries}, repeats)
        for e in entries:
            row = dict(scenario="decode", entry=e, length=t, seconds=seconds[e])
            row["speedup_vs_first"] = seconds[entries[0]] / seconds[e]
            rows.append(row)
            print(report.scenario_line(row, entries[0]) + f"  T={t}", flush=True)
    return rows


def _window_memory() -> list[dict[str, Any]]:
    """The sliding window's peak memory at each of :data:`WINDOW_MEMORY_LENGTHS`."""
    rows = []
    for t in WINDOW_MEMORY_LENGTHS:
        peak = measure_memory({"scenario": "causal_window_256", "t": t}, PROBE_TIMEOUT)
        rows.append(dict(scenario="window", entry="causal_window_256", length=t, peak_mib=peak))
        print(f"window   causal_window_256 T={t:<6} peak {peak} MiB", flush=True)
    return rows
