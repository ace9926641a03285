"""Benchmark: ``python -m flax_dotattn.bench``.

Times forward and forward+backward passes of each implementation of Keras-style
dot-product attention (no ``1/sqrt(D)``, softmax over keys, weighted sum of values) and
reports the median time, achieved GFLOP/s and peak memory. Peak memory is measured in a
fresh subprocess per entry: the rise of the process's peak resident set (``VmHWM``, reset
through ``/proc/self/clear_refs`` after compilation) while the compiled function runs, so
compilation and the inputs are not counted.

Implementations:

* ``naive``: einsum -> softmax -> einsum, the textbook baseline.
* ``default``: :func:`flax_dotattn.dot_attention` with automatic dispatch.
* ``xla`` / ``chunked``: :func:`flax_dotattn.dot_attention` with that implementation.
* ``jax_nn``: ``jax.nn.dot_product_attention`` on ``[B, T, 1, D]`` with ``scale=1.0``.
* ``keras``: Keras 3's ``keras.layers.Attention`` on the JAX backend (when installed).
* ``torch_sdpa``: PyTorch's ``torch.nn.functional.scaled_dot_product_attention`` with
  ``scale=1.0`` on the same inputs (as ``[B, 1, T, D]``: only 4-D inputs reach its fused
  CPU kernel), ``torch.set_num_threads`` set to the cores JAX uses,
  its outputs (and gradients) checked against ``dot_attention`` before timing (when
  PyTorch is installed: ``pip install -e ".[bench]"``; never needed otherwise).

``--causal`` times causal attention instead (every implementation's own causal option;
GFLOP/s then count half the score matrix).

``--scenarios window,packing`` times the masking features against what a user would do
without them, at T = 16384, forward+backward: a causal sliding window ``(256, 0)`` against
full causal attention (and its peak memory at T = 4096, 8192 and 16384), and 8 sequences
of 2048 packed into one row with ``segment_ids`` against the same row with a hand-built
block-diagonal ``attention_mask`` on the xla path and against a batch of 8 x 2048.

``--plot PATH`` draws the results (time and peak memory against T, forward and
forward+backward, one line per implementation) with matplotlib, which is imported only
then (``pip install -e ".[examples]"``); ``--from-json`` redraws a saved ``--json`` run
without measuring again.

Examples:
  python -m flax_dotattn.bench                      # the full table (several minutes)
  python -m flax_dotattn.bench --quick --plot bench.png --json bench.json   # ~2 minutes
  python -m flax_dotattn.bench --shapes 8x512 --impls naive,default --no-memory
  python -m flax_dotattn.bench --markdown bench.md --json bench.json
  python -m flax_dotattn.bench --from-json bench.json --plot bench.png
  python -m flax_dotattn.bench --impls default,torch_sdpa --causal --shapes 1x4096
  python -m flax_dotattn.bench --scenarios window,packing
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

IMPLS = ("naive", "default", "xla", "chunked", "jax_nn", "keras", "torch_sdpa")
SCENARIOS = ("window", "packing")
MODES = ("fwd", "fwd_bwd")
DEFAULT_SHAPES = ("32x128", "8x512", "4x1024", "1x4096", "1x16384")
LONG_SHAPE = "1x65536"  # chunked forward+backward only
#: ``--quick``: one sequence per shape (so the x axis is T alone), 3 samples, no Keras.
QUICK_SHAPES = ("1x256", "1x1024", "1x4096")
QUICK_IMPLS = ("naive", "default", "xla", "chunked", "jax_nn")
QUICK_REPEATS = 3
#: One colour and marker per implementation, the same in every panel.
#: Open markers and dashes let lines that coincide (naive, xla and the automatic choice
#: below the crossover run the same computation) show through each other.
_STYLE = {
    "naive": dict(color="black", marker="o", linestyle="--", fillstyle="none"),
    "default": dict(color="tab:blue", marker="s", linestyle="-", fillstyle="full"),
    "xla": dict(color="tab:cyan", marker="v", linestyle=":", fillstyle="none"),
    "chunked": dict(color="tab:orange", marker="D", linestyle="-", fillstyle="none"),
    "jax_nn": dict(color="tab:green", marker="^", linestyle="-", fillstyle="full"),
    "keras": dict(color="tab:red", marker="x", linestyle="-.", fillstyle="full"),
    "torch_sdpa": dict(color="tab:purple", marker="P", linestyle="-", fillstyle="full"),
}
_LABELS = {
    "naive": "naive einsum-softmax-einsum",
    "default": "dot_attention (automatic)",
    "xla": 'dot_attention "xla"',
    "chunked": 'dot_attention "chunked"',
    "jax_nn": "jax.nn.dot_product_attention",
    "keras": "keras.layers.Attention",
    "torch_sdpa": "torch scaled_dot_product_attention",
}


def _parse_shape(text: str) -> tuple[int, int]:
    try:
        b, t = (int(x) for x in text.lower().split("x"))
    except ValueError:
        b = t = 0
    if b < 1 or t < 1:
        raise argparse.ArgumentTypeError(
            f"--shapes entries must look like BATCHxLENGTH with positive ints, e.g. "
            f"'8x512'; received {text!r}."
        )
    return b, t


def _parse_list(choices: Sequence[str], flag: str) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"{flag} takes a comma-separated subset of {list(choices)}; received {text!r}."
            )
        return items

    return parse


def _positive_int(flag: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(f"{flag} must be a positive int; received {text!r}.")
        return value

    return parse


def _inputs(b: int, t: int, d: int):
    import jax
    import jax.numpy as jnp

    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (b, t, d), jnp.float32) * 0.1
    k = jax.random.normal(kk, (b, t, d), jnp.float32) * 0.1
    v = jax.random.normal(kv, (b, t, d), jnp.float32)
    return q, k, v


def _jitted(attend: Callable, mode: str) -> Callable:
    import jax
    import jax.numpy as jnp

    if mode == "fwd":
        return jax.jit(attend)
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v) ** 2), argnums=(0, 1, 2)))


def cores() -> int:
    """The cores this process may run on (XLA's CPU client uses all of them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _build_torch(mode: str, q, k, v, causal: bool, check: bool) -> tuple[Callable, tuple]:
    """torch SDPA on copies of ``q, k, v``, checked against :func:`dot_attention` (unless
    ``check`` is False: the memory probe must not run it before measuring)."""
    import jax
    import numpy as np
    import torch
    from torch.nn import functional

    from flax_dotattn import dot_attention

    torch.set_num_threads(cores())
    grad = mode != "fwd"
    # [B, 1, T, D]: torch takes its fused CPU (flash) kernel only for 4-D inputs.
    qt, kt, vt = (torch.from_numpy(np.array(x)[:, None]).requires_grad_(grad) for x in (q, k, v))

    def run(q_, k_, v_):
        sdpa = functional.scaled_dot_product_attention
        if not grad:
            with torch.no_grad():
                return sdpa(q_, k_, v_, is_causal=causal, scale=1.0)
        out = sdpa(q_, k_, v_, is_causal=causal, scale=1.0)
        return torch.autograd.grad((out**2).sum(), (q_, k_, v_))

    if not check:
        return run, (qt, kt, vt)
    ours = _jitted(lambda q, k, v: dot_attention(None, q, v, k, causal=causal), mode)(q, k, v)
    theirs = run(qt, kt, vt)
    for a, b in zip(jax.tree.leaves(ours), (theirs,) if not grad else theirs, strict=True):
        np.testing.assert_allclose(b.detach().numpy()[:, 0], np.asarray(a), rtol=2e-3, atol=2e-4)
    return run, (qt, kt, vt)


def build(
    impl: str, mode: str, b: int, t: int, d: int, causal: bool = False, check: bool = True
) -> tuple[Callable, tuple]:
    """Returns a jitted function (a torch one for ``torch_sdpa``) and its inputs for one
    benchmark entry."""
    import jax
    import jax.numpy as jnp

    from flax_dotattn import dot_attention

    q, k, v = _inputs(b, t, d)
    if impl == "torch_sdpa":
        return _build_torch(mode, q, k, v, causal, check)

    if impl == "naive":

        def attend(q, k, v):
            s = jnp.einsum("bqd,bkd->bqk", q, k)  # [B, Tq, Tv]
            if causal:
                s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
            return jnp.einsum("bqk,bkd->bqd", jax.nn.softmax(s, axis=-1), v)

    elif impl in ("default", "xla", "chunked"):
        implementation = None if impl == "default" else impl

        def attend(q, k, v):
            return dot_attention(None, q, v, k, causal=causal, implementation=implementation)

    elif impl == "jax_nn":

        def attend(q, k, v):
            out = jax.nn.dot_product_attention(
                q[:, :, None], k[:, :, None], v[:, :, None], scale=1.0, is_causal=causal
            )  # [B, T, 1, D]
            return out[:, :, 0]

    elif impl == "keras":
        os.environ.setdefault("KERAS_BACKEND", "jax")
        import keras

        if keras.backend.backend() != "jax":
            raise RuntimeError("the keras entry needs KERAS_BACKEND=jax")
        layer = keras.layers.Attention()

        def attend(q, k, v):
            return layer([q, v, k], use_causal_mask=causal)

    else:
        raise ValueError(f"impl must be one of {IMPLS}; received {impl!r}.")
    return _jitted(attend, mode), (q, k, v)


def build_scenario(name: str, t: int = 16384, d: int = 64) -> tuple[Callable, tuple]:
    """One forward+backward entry of ``--scenarios``, by name:

    * ``causal_full``: full causal attention, automatic dispatch;
    * ``causal_window_256``: causal sliding window ``(256, 0)``;
    * ``packed_segment_ids``: 8 sequences packed into one row with ``segment_ids``;
    * ``packed_full_mask_xla``: the same row with a block-diagonal ``attention_mask``
      ``[T, T]`` on the xla path (what a user would build by hand);
    * ``packed_as_batch``: the 8 sequences as a batch of 8.
    """
    import jax.numpy as jnp

    from flax_dotattn import dot_attention

    q, k, v = _inputs(1, t, d)
    segments = jnp.repeat(jnp.arange(8), t // 8)  # [T]
    options = {
        "causal_full": dict(causal=True),
        "causal_window_256": dict(causal=True, window=(256, 0)),
        "packed_segment_ids": dict(segment_ids=(segments, segments)),
        "packed_full_mask_xla": dict(
            attention_mask=segments[:, None] == segments[None, :], implementation="xla"
        ),
        "packed_as_batch": dict(),
    }[name]
    if name == "packed_as_batch":
        q, k, v = (x.reshape(8, t // 8, d) for x in (q, k, v))
    return _jitted(lambda q, k, v: dot_attention(None, q, v, k, **options), "fwd_bwd"), (q, k, v)


#: The entries of each scenario; the first is the one the others are compared with.
SCENARIO_ENTRIES = {
    "window": ("causal_full", "causal_window_256"),
    "packing": ("packed_segment_ids", "packed_full_mask_xla", "packed_as_batch"),
}
#: Lengths at which the window's peak memory is measured (it should grow linearly).
WINDOW_MEMORY_LENGTHS = (4096, 8192, 16384)


def flops(mode: str, b: int, t: int, d: int, causal: bool = False) -> float:
    """Model FLOPs: 2 matmuls forward, 4 more backward (recomputation not counted); half
    of them under ``causal``."""
    per_matmul = 2.0 * b * t * t * d * (0.5 if causal else 1.0)
    return per_matmul * (2 if mode == "fwd" else 6)


def build_entry(spec: dict[str, Any]) -> tuple[Callable, tuple]:
    """:func:`build` or :func:`build_scenario` from a spec: ``{"scenario": name, "t": T}``
    or ``{"impl", "mode", "b", "t", "d", "causal"}``."""
    if "scenario" in spec:
        return build_scenario(spec["scenario"], spec["t"], spec.get("d", 64))
    return build(
        spec["impl"],
        spec["mode"],
        spec["b"],
        spec["t"],
        spec["d"],
        spec.get("causal", False),
        spec.get("check", True),
    )


def time_entries(specs: dict[str, dict[str, Any]], repeats: int) -> dict[str, float]:
    """Median wall time per call (seconds) of each entry (name -> spec), after warm-up.

    Samples are interleaved across entries (one sample of each in turn), so slow drifts of
    a shared machine affect all of them alike. Each sample runs enough back-to-back calls
    to last ~50 ms, so that sub-millisecond entries are not dominated by timer and
    dispatch noise.
    """
    import jax

    entries = {}
    for name, spec in specs.items():
        fn, args = build_entry(spec)
        jax.block_until_ready(fn(*args))  # compile and warm up
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        calls = max(1, int(0.05 / max(time.perf_counter() - start, 1e-6)))
        entries[name] = (fn, args, calls)
    times: dict[str, list[float]] = {name: [] for name in specs}
    for _ in range(repeats):
        for name, (fn, args, calls) in entries.items():
            start = time.perf_counter()
            for _ in range(calls):
                out = fn(*args)
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - start) / calls)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory_here(spec: dict[str, Any]) -> float:
    """Peak extra resident memory (MiB) of one run; call in a fresh process."""
    import jax

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
    """Runs :func:`measure_memory_here` in a fresh subprocess; None if it failed."""
    cmd = [sys.executable, "-m", "flax_dotattn.bench", "--_memory-probe", json.dumps(spec)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)
        return float(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError) as e:
        detail = getattr(e, "stderr", "") or ""
        print(f"memory probe {spec} failed: {e} {detail[-500:]}", file=sys.stderr)
        return None


def machine() -> str:
    import jax

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


def _require_matplotlib():
    """Imports matplotlib with a non-interactive backend, or explains how to get it."""
    try:
        import matplotlib
    except ImportError as e:
        raise RuntimeError(
            "--plot needs matplotlib, which is not installed; it comes with the examples "
            'extra: pip install -e ".[examples]" (or pip install matplotlib).'
        ) from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(rows: Sequence[dict[str, Any]], path: str, title: str = "") -> str:
    """Draws time and peak memory against T, forward and forward+backward, to ``path``.

    Four panels on log axes: median time (top) and peak memory (bottom), forward (left)
    and forward+backward (right), one line per implementation in the same colour
    everywhere. Entries without a value (e.g. ``--no-memory``) are left out.

    Args:
      rows: result rows as :func:`main` writes them to ``--json`` (``batch``, ``length``,
        ``mode``, ``impl``, ``seconds``, ``peak_mib``).
      path: image file to write; the suffix picks the format (``.png``, ``.svg``, ...).
      title: figure title, e.g. the machine and its load.

    Returns:
      ``path``.

    Raises:
      RuntimeError: when matplotlib is not installed.
    """
    plt = _require_matplotlib()
    batches = {r["batch"] for r in rows}
    ticks = sorted({(r["length"], r["batch"]) for r in rows})
    panels = (("seconds", 1e3, "median time per call (ms)"), ("peak_mib", 1.0, "peak MiB"))
    if all(r.get("peak_mib") is None for r in rows):  # --no-memory: time panels only
        panels = panels[:1]
    fig, axes = plt.subplots(
        len(panels), 2, figsize=(10, 3.6 * len(panels) + 0.6), sharex=True, squeeze=False
    )
    for col, mode in enumerate(MODES):
        for row, (field, factor, label) in enumerate(panels):
            ax = axes[row][col]
            for impl in IMPLS:
                points = sorted(
                    (r["length"], r[field] * factor)
                    for r in rows
                    if r["impl"] == impl
                    and r["mode"] == mode
                    and r.get(field) is not None
                    and r[field] > 0
                )
                if not points:
                    continue
                lengths, values = zip(*points, strict=True)
                ax.plot(lengths, values, label=_LABELS[impl], linewidth=1.5, **_STYLE[impl])
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(True, which="major", alpha=0.3)
            ax.set_ylabel(label)
            if row == 0:
                ax.set_title("forward" if mode == "fwd" else "forward + backward")
            if row == len(panels) - 1:
                ax.set_xlabel("sequence length T" + ("" if len(batches) == 1 else " (B x T)"))
                ax.set_xticks([t for t, _ in ticks])
                if len(batches) == 1:
                    ax.set_xticklabels([str(t) for t, _ in ticks])
                else:
                    ax.set_xticklabels([f"{b}x{t}" for t, b in ticks], rotation=35, ha="right")
                ax.minorticks_off()
    handles: dict[str, Any] = {}  # one legend entry per implementation, across panels
    for ax in (a for line in axes for a in line):
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=3, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 0.97 if title else 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_title(machine_text: str, depth: int, load: Sequence[float] | None) -> str:
    """The figure title: machine, depth and dtype, and the load average during the run."""
    text = f"{machine_text}; D = {depth}, float32"
    if load:
        text += f"\nload average (1 min) {load[0]:.2f} at start, {load[-1]:.2f} at end"
    return text


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


def scenario_rows(names: Sequence[str], repeats: int, memory: bool) -> list[dict[str, Any]]:
    """Times each scenario's entries (interleaved) and, for the window, its peak memory
    against T; prints and returns one row per entry."""
    rows = []
    for scenario in names:
        entries = SCENARIO_ENTRIES[scenario]
        seconds = time_entries({e: {"scenario": e, "t": 16384} for e in entries}, repeats)
        base = seconds[entries[0]]
        for e in entries:
            row = dict(scenario=scenario, entry=e, length=16384, seconds=seconds[e])
            row["speedup_vs_first"] = base / seconds[e]
            rows.append(row)
            print(
                f"{scenario:8} {e:22} {seconds[e] * 1e3:10.1f} ms  "
                f"{base / seconds[e]:6.2f}x vs {entries[0]}",
                flush=True,
            )
        if scenario == "window" and memory:
            for t in WINDOW_MEMORY_LENGTHS:
                peak = measure_memory({"scenario": "causal_window_256", "t": t}, 900)
                rows.append(dict(scenario=scenario, entry="causal_window_256", length=t,
                                 peak_mib=peak))  # fmt: skip
                print(f"window   causal_window_256 T={t:<6} peak {peak} MiB", flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flax_dotattn.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--shapes",
        type=lambda s: [_parse_shape(x) for x in s.split(",")],
        default=None,
        help=f"comma-separated BATCHxLENGTH list (default: {','.join(DEFAULT_SHAPES)})",
    )
    parser.add_argument("--depth", type=_positive_int("--depth"), default=64)
    parser.add_argument(
        "--impls",
        type=_parse_list(IMPLS, "--impls"),
        default=None,
        help=f"comma-separated subset of {','.join(IMPLS)} (default: all)",
    )
    parser.add_argument("--modes", type=_parse_list(MODES, "--modes"), default=list(MODES))
    parser.add_argument("--causal", action="store_true", help="causal attention everywhere")
    parser.add_argument(
        "--scenarios",
        type=_parse_list(SCENARIOS, "--scenarios"),
        default=None,
        help=f"time these masking scenarios instead ({','.join(SCENARIOS)}), see above",
    )
    parser.add_argument(
        "--repeats", type=_positive_int("--repeats"), default=None, help="samples (default: 7)"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip memory probes")
    parser.add_argument(
        "--long",
        action="store_true",
        help=f"add {LONG_SHAPE} forward+backward for the chunked path",
    )
    parser.add_argument(
        "--max-naive-length",
        type=_positive_int("--max-naive-length"),
        default=16384,
        help="skip T² implementations beyond this length",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a short run: shapes {','.join(QUICK_SHAPES)}, {QUICK_REPEATS} samples, "
        f"implementations {','.join(QUICK_IMPLS)} (unless --shapes/--impls/--repeats given)",
    )
    parser.add_argument("--json", help="also write the rows as JSON to this path")
    parser.add_argument(
        "--plot",
        help="also draw time and peak memory against T to this image (needs matplotlib)",
    )
    parser.add_argument(
        "--from-json",
        dest="from_json",
        help="do not measure: read a --json file written earlier (use with --plot/--markdown)",
    )
    parser.add_argument("--markdown", help="also write a Markdown table to this path")
    parser.add_argument("--_memory-probe", dest="memory_probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.memory_probe:
        print(measure_memory_here(json.loads(args.memory_probe)))
        return 0
    if args.scenarios:
        header = f"Machine: {machine()}; D = 64, float32, T = 16384, forward+backward."
        print(header, f"Load average (1 min) at start: {load_average()[0]:.2f}.", flush=True)
        rows = scenario_rows(args.scenarios, args.repeats or 5, not args.no_memory)
        print(f"Load average (1 min) at end: {load_average()[0]:.2f}.")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"machine": machine(), "rows": rows}, f, indent=2)
        return 0

    if args.plot:
        try:
            _require_matplotlib()  # fail now, not after minutes of measuring
        except RuntimeError as e:
            parser.error(str(e))
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        rows, depth = saved["rows"], saved.get("depth", args.depth)
        load = saved.get("load_average_1min")
        header = f"Machine: {saved['machine']}; D = {depth}, float32."
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(to_markdown(rows, header))
        if args.plot:
            plot(rows, args.plot, plot_title(saved["machine"], depth, load))
            print(f"plot: {args.plot}")
        return 0

    # Options left unset take the --quick or the full run's values.
    if args.shapes is None:
        args.shapes = [_parse_shape(s) for s in (QUICK_SHAPES if args.quick else DEFAULT_SHAPES)]
    if args.impls is None:
        args.impls = list(QUICK_IMPLS if args.quick else IMPLS)
    if args.repeats is None:
        args.repeats = QUICK_REPEATS if args.quick else 7

    impls = list(args.impls)
    if "keras" in impls:
        os.environ.setdefault("KERAS_BACKEND", "jax")
        try:
            import keras  # noqa: F401
        except ImportError:
            print("keras is not installed: skipping the keras entry", file=sys.stderr)
            impls.remove("keras")
    if "torch_sdpa" in impls:
        try:
            import torch  # noqa: F401
        except ImportError:
            print(
                'PyTorch is not installed (pip install -e ".[bench]"): skipping torch_sdpa',
                file=sys.stderr,
            )
            impls.remove("torch_sdpa")
    groups = [(b, t, mode, impls) for (b, t) in args.shapes for mode in args.modes]
    if args.long:
        b, t = _parse_shape(LONG_SHAPE)
        groups.append((b, t, "fwd_bwd", ["chunked"]))

    rows: list[dict[str, Any]] = []
    load_start = load_average()
    header = f"Machine: {machine()}; D = {args.depth}, float32" + (
        ", causal." if args.causal else "."
    )
    print(header, f"Load average (1 min) at start: {load_start[0]:.2f}.", flush=True)
    for b, t, mode, group in groups:
        linear = ("chunked", "default")
        group = [i for i in group if i in linear or t <= args.max_naive_length]
        repeats = args.repeats if b * t * t <= 2**26 else max(1, min(args.repeats, 5))
        specs = {
            impl: dict(impl=impl, mode=mode, b=b, t=t, d=args.depth, causal=args.causal)
            for impl in group
        }
        seconds = time_entries(specs, repeats)
        base, torch_time = seconds.get("naive"), seconds.get("torch_sdpa")
        for impl in group:
            peak = None if args.no_memory else measure_memory(specs[impl], 900)
            row = dict(
                batch=b,
                length=t,
                depth=args.depth,
                mode=mode,
                causal=args.causal,
                impl=impl,
                seconds=seconds[impl],
                gflops=flops(mode, b, t, args.depth, args.causal) / seconds[impl] / 1e9,
                peak_mib=peak,
                speedup_vs_naive=None if base is None else base / seconds[impl],
                speedup_vs_torch=None if torch_time is None else torch_time / seconds[impl],
            )
            rows.append(row)
            print(
                f"{b}x{t:<6} {mode:8} {impl:8} {seconds[impl] * 1e3:10.2f} ms "
                f"{row['gflops']:8.1f} GFLOP/s  peak "
                f"{'n/a' if peak is None else f'{peak:.1f} MiB':>12}"
                + ("" if base is None else f"  {base / seconds[impl]:5.2f}x vs naive")
                + ("" if torch_time is None else f"  {torch_time / seconds[impl]:5.2f}x vs torch"),
                flush=True,
            )

    load = [load_start[0], load_average()[0]]
    header += f" Load average (1 min): {load[0]:.2f} at start, {load[1]:.2f} at end."
    print(f"Load average (1 min) at end: {load[1]:.2f}.")
    if args.json:
        with open(args.json, "w") as f:
            saved = {"machine": machine(), "depth": args.depth, "load_average_1min": load}
            json.dump({**saved, "rows": rows}, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(to_markdown(rows, header))
    if args.plot:
        plot(rows, args.plot, plot_title(machine(), args.depth, load))
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
