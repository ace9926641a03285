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

Examples:
  python -m flax_dotattn.bench                      # the README table (several minutes)
  python -m flax_dotattn.bench --shapes 8x512 --impls naive,default --no-memory
  python -m flax_dotattn.bench --markdown bench.md --json bench.json
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

IMPLS = ("naive", "default", "xla", "chunked", "jax_nn", "keras")
MODES = ("fwd", "fwd_bwd")
DEFAULT_SHAPES = ("32x128", "8x512", "4x1024", "1x4096", "1x16384")
LONG_SHAPE = "1x65536"  # chunked forward+backward only


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


def build(impl: str, mode: str, b: int, t: int, d: int) -> tuple[Callable, tuple]:
    """Returns a jitted function and its inputs for one benchmark entry."""
    import jax
    import jax.numpy as jnp

    from flax_dotattn import dot_attention

    key = jax.random.key(0)
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (b, t, d), jnp.float32) * 0.1
    k = jax.random.normal(kk, (b, t, d), jnp.float32) * 0.1
    v = jax.random.normal(kv, (b, t, d), jnp.float32)

    if impl == "naive":

        def attend(q, k, v):
            s = jnp.einsum("bqd,bkd->bqk", q, k)  # [B, Tq, Tv]
            return jnp.einsum("bqk,bkd->bqd", jax.nn.softmax(s, axis=-1), v)

    elif impl in ("default", "xla", "chunked"):
        implementation = None if impl == "default" else impl

        def attend(q, k, v):
            return dot_attention(None, q, v, k, implementation=implementation)

    elif impl == "jax_nn":

        def attend(q, k, v):
            out = jax.nn.dot_product_attention(
                q[:, :, None], k[:, :, None], v[:, :, None], scale=1.0
            )  # [B, T, 1, D]
            return out[:, :, 0]

    elif impl == "keras":
        os.environ.setdefault("KERAS_BACKEND", "jax")
        import keras

        if keras.backend.backend() != "jax":
            raise RuntimeError("the keras entry needs KERAS_BACKEND=jax")
        layer = keras.layers.Attention()

        def attend(q, k, v):
            return layer([q, v, k])

    else:
        raise ValueError(f"impl must be one of {IMPLS}; received {impl!r}.")

    if mode == "fwd":
        fn = jax.jit(attend)
    else:
        fn = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v) ** 2), argnums=(0, 1, 2)))
    return fn, (q, k, v)


def flops(mode: str, b: int, t: int, d: int) -> float:
    """Model FLOPs: 2 matmuls forward, 4 more backward (recomputation not counted)."""
    per_matmul = 2.0 * b * t * t * d
    return per_matmul * (2 if mode == "fwd" else 6)


def time_entries(
    impls: Sequence[str], mode: str, b: int, t: int, d: int, repeats: int
) -> dict[str, float]:
    """Median wall time per call (seconds) of each implementation, after warm-up.

    Samples are interleaved across implementations (one sample of each in turn), so slow
    drifts of a shared machine affect all of them alike. Each sample runs enough
    back-to-back calls to last ~50 ms, so that sub-millisecond entries are not dominated by
    timer and dispatch noise.
    """
    import jax

    entries = {}
    for impl in impls:
        fn, args = build(impl, mode, b, t, d)
        jax.block_until_ready(fn(*args))  # compile and warm up
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        calls = max(1, int(0.05 / max(time.perf_counter() - start, 1e-6)))
        entries[impl] = (fn, args, calls)
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    for _ in range(repeats):
        for impl, (fn, args, calls) in entries.items():
            start = time.perf_counter()
            for _ in range(calls):
                out = fn(*args)
            jax.block_until_ready(out)
            times[impl].append((time.perf_counter() - start) / calls)
    return {impl: statistics.median(ts) for impl, ts in times.items()}


def _vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory_here(impl: str, mode: str, b: int, t: int, d: int) -> float:
    """Peak extra resident memory (MiB) of one run; call in a fresh process."""
    import jax

    fn, args = build(impl, mode, b, t, d)
    fn = fn.lower(*args).compile()
    jax.block_until_ready(args)
    before = _vm_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    jax.block_until_ready(fn(*args))
    return (_vm_kib("VmHWM") - before) / 1024


def measure_memory(impl: str, mode: str, b: int, t: int, d: int, timeout: float) -> float | None:
    """Runs :func:`measure_memory_here` in a fresh subprocess; None if it failed."""
    cmd = [
        sys.executable,
        "-m",
        "flax_dotattn.bench",
        "--_memory-probe",
        f"{impl},{mode},{b},{t},{d}",
    ]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)
        return float(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError) as e:
        detail = getattr(e, "stderr", "") or ""
        print(f"memory probe {impl} {mode} {b}x{t} failed: {e} {detail[-500:]}", file=sys.stderr)
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


def to_markdown(rows: list[dict[str, Any]], header: str) -> str:
    lines = [
        header,
        "",
        "| shape (B x T) | mode | impl | median ms | GFLOP/s | peak MiB | vs naive |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        ms = "—" if r["seconds"] is None else f"{r['seconds'] * 1e3:.2f}"
        gf = "—" if r["gflops"] is None else f"{r['gflops']:.1f}"
        mem = "—" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}"
        ratio = "—" if r["speedup_vs_naive"] is None else f"{r['speedup_vs_naive']:.2f}x"
        lines.append(
            f"| {r['batch']}x{r['length']} | {r['mode']} | {r['impl']} | {ms} | "
            f"{gf} | {mem} | {ratio} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flax_dotattn.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--shapes",
        type=lambda s: [_parse_shape(x) for x in s.split(",")],
        default=[_parse_shape(s) for s in DEFAULT_SHAPES],
        help="comma-separated BATCHxLENGTH list (default: %(default)s)",
    )
    parser.add_argument("--depth", type=_positive_int("--depth"), default=64)
    parser.add_argument("--impls", type=_parse_list(IMPLS, "--impls"), default=list(IMPLS))
    parser.add_argument("--modes", type=_parse_list(MODES, "--modes"), default=list(MODES))
    parser.add_argument("--repeats", type=_positive_int("--repeats"), default=7)
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
    parser.add_argument("--json", help="also write the rows as JSON to this path")
    parser.add_argument("--markdown", help="also write a Markdown table to this path")
    parser.add_argument("--_memory-probe", dest="memory_probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.memory_probe:
        impl, mode, b, t, d = args.memory_probe.split(",")
        print(measure_memory_here(impl, mode, int(b), int(t), int(d)))
        return 0

    impls = list(args.impls)
    if "keras" in impls:
        os.environ.setdefault("KERAS_BACKEND", "jax")
        try:
            import keras  # noqa: F401
        except ImportError:
            print("keras is not installed: skipping the keras entry", file=sys.stderr)
            impls.remove("keras")
    groups = [(b, t, mode, impls) for (b, t) in args.shapes for mode in args.modes]
    if args.long:
        b, t = _parse_shape(LONG_SHAPE)
        groups.append((b, t, "fwd_bwd", ["chunked"]))

    rows: list[dict[str, Any]] = []
    header = f"Machine: {machine()}; D = {args.depth}, float32."
    print(header, flush=True)
    for b, t, mode, group in groups:
        linear = ("chunked", "default")
        group = [i for i in group if i in linear or t <= args.max_naive_length]
        repeats = args.repeats if b * t * t <= 2**26 else max(1, min(args.repeats, 5))
        seconds = time_entries(group, mode, b, t, args.depth, repeats)
        base = seconds.get("naive")
        for impl in group:
            peak = None if args.no_memory else measure_memory(impl, mode, b, t, args.depth, 900)
            row = dict(
                batch=b,
                length=t,
                depth=args.depth,
                mode=mode,
                impl=impl,
                seconds=seconds[impl],
                gflops=flops(mode, b, t, args.depth) / seconds[impl] / 1e9,
                peak_mib=peak,
                speedup_vs_naive=None if base is None else base / seconds[impl],
            )
            rows.append(row)
            print(
                f"{b}x{t:<6} {mode:8} {impl:8} {seconds[impl] * 1e3:10.2f} ms "
                f"{row['gflops']:8.1f} GFLOP/s  peak "
                f"{'n/a' if peak is None else f'{peak:.1f} MiB':>12}"
                + ("" if base is None else f"  {base / seconds[impl]:5.2f}x vs naive"),
                flush=True,
            )

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "depth": args.depth, "rows": rows}, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(to_markdown(rows, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
