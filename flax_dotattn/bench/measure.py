"""Measurements: median wall time, peak memory, and the machine and its load.

Peak memory is measured in a fresh subprocess per entry: the rise of the process's peak
resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` after compilation) while
the compiled function runs, so compilation and the inputs are not counted.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from typing import Any

import jax

from flax_dotattn._src.tuning.timing import time_interleaved
from flax_dotattn.bench.entries import build_entry


def time_entries(specs: dict[str, dict[str, Any]], repeats: int) -> dict[str, float]:
    """Median wall time per call (seconds) of each entry (name -> spec), after warm-up.
    Samples are interleaved across entries (one sample of each in turn, the order reversed
    every other round), so slow drifts of a shared machine affect all of them alike. Each
    sample runs enough back-to-back calls to last ~50 ms, so that sub-millisecond entries
    are not dominated by timer and dispatch noise.
    """
    return time_interleaved({name: build_entry(spec) for name, spec in specs.items()}, repeats)


def _vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory_here(spec: dict[str, Any]) -> float:
    """Peak extra resident memory (MiB) of one run; call in a fresh process."""
    fn, args = build_entry({**spec, "check": False})
    if hasattr(fn, "lower"):
        fn = fn.lower(*args).compile()
    # torch runs without a warm-up call: one would leave its buffers in the allocator's
    # free lists, to be reused unseen, whereas JAX's first run allocates its own.
    jax.block_until_ready(args)
    before = _vm_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    jax.block_until_ready(fn(*args))
    return (_vm_kib("VmHWM") - before) / 1024


def measure_memory(spec: dict[str, Any], timeout: float) -> float | None:
    """Runs :func:`measure_memory_here` in a fresh subprocess (the CLI's hidden
    ``--_memory-probe``); None if it failed."""
    cmd = [sys.executable, "-m", "flax_dotattn.bench", "--_memory-probe", json.dumps(spec)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)
        return float(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError) as e:
        detail = getattr(e, "stderr", "") or ""
        print(f"memory probe {spec} failed: {e} {detail[-500:]}", file=sys.stderr)
        return None


def machine() -> str:
    """The device, the host's CPU and cores, and the jax version, in one line."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    device = jax.devices()[0]
    return (
        f"{device.platform.upper()} ({getattr(device, 'device_kind', '')}); host {cpu}, "
        f"{os.cpu_count()} cores; jax {jax.__version__}"
    )


def load_average() -> tuple[float, float, float]:
    """The 1-, 5- and 15-minute load averages (how busy the machine was)."""
    try:
        return os.getloadavg()
    except OSError:  # not available on this platform
        return (float("nan"),) * 3
