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

Each run prints whether ``dot_attention``'s automatic choice read a table tuned for this
device (``python -m flax_dotattn.tune``) and records it in ``--json`` and ``--markdown``;
``FLAX_DOTATTN_TUNING=off`` measures the shipped defaults.

``--causal`` times causal attention instead (every implementation's own causal option;
GFLOP/s then count half the score matrix).

``--scenarios window,packing`` times the masking features against what a user would do
without them, at T = 16384, forward+backward: a causal sliding window ``(256, 0)`` against
full causal attention (and its peak memory at T = 4096, 8192 and 16384), and 8 sequences
of 2048 packed into one row with ``segment_ids`` against the same row with a hand-built
block-diagonal ``attention_mask`` on the xla path and against a batch of 8 x 2048.
``--scenarios gqa`` times grouped-query attention at B = 4, 32 query heads, 4 key/value
heads, T = 2048, causal, forward+backward: key/value ``[B, 4, 1, T, D]`` shared by 8 query
groups against the same call with key/value repeated (``jnp.repeat``), and multi-query
attention (one key/value head), with the peak memory of each.
``--scenarios decode`` times one decoding step (4 heads, forward) at cache lengths 1024 to
16384: the new query against the cache (``query_offset``/``kv_length``) against causal
attention over the whole prefix.
``--scenarios flax`` times Flax's own ``nn.MultiHeadDotProductAttention`` (8 heads of 64)
at 1 x 8192, forward+backward, with its default ``attention_fn`` against
:func:`flax_dotattn.flax_attention_fn`, and prints each one's compiled temporaries (XLA's
accounting) and, unless ``--no-memory``, its peak memory.
``--scenarios serving`` times ``MultiHeadDotAttention`` decoding steps (see
:mod:`flax_dotattn.bench.serving`): a local layer (window 1024) at position 32767 on its
full cache against a rolling cache of 1025 slots (with each cache's size), and a ragged
batch of 8 sequences in one step against one call per sequence.
``--scenarios alibi,softcap,mask_mods`` times the score and mask functions: ALiBi as a
``score_mod`` against plain causal attention on the chunked path at T = 16384 (and the peak
memory of ALiBi as a ``score_mod`` and as a dense ``[T, T]`` bias), ``logits_soft_cap=50``
against plain full attention at T = 4096, and at T = 4096 ``causal=True`` against the same
as a ``mask_mod``, a prefix-LM ``mask_mod``, and 8 packed documents as ``segment_ids``
against the same as a ``mask_mod`` (forward+backward).

``--device`` times the accelerator table instead: bfloat16 ``[1, 8, T, 128]``, T = 1024 to
32768, forward and forward+backward, ``dot_attention`` (automatic, each row naming the
kernel it took) against ``jax.nn.dot_product_attention`` with cuDNN (GPU), splash
attention called directly (TPU) and the naive einsum (see :mod:`flax_dotattn.bench.device`).

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
  python -m flax_dotattn.bench --scenarios gqa --repeats 1
  python -m flax_dotattn.bench --scenarios decode --no-memory
  python -m flax_dotattn.bench --scenarios flax --repeats 3 --no-memory
  python -m flax_dotattn.bench --scenarios serving --repeats 5 --json serving.json
  python -m flax_dotattn.bench --scenarios alibi,softcap,mask_mods --repeats 5
  python -m flax_dotattn.bench --device --causal --json device.json --markdown device.md
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence

from flax_dotattn.bench import baselines, device, report, runs
from flax_dotattn.bench.entries import (
    IMPLS,
    MODES,
    SCENARIO_LENGTH,
    SCENARIO_LENGTHS,
    SCENARIOS,
)
from flax_dotattn.bench.measure import load_average, machine, measure_memory_here, time_entries
from flax_dotattn.bench.plot import plot, plot_title, require_matplotlib
from flax_dotattn.tune import status as tuning_status

DEFAULT_SHAPES = ("32x128", "8x512", "4x1024", "1x4096", "1x16384")
LONG_SHAPE = "1x65536"  # chunked forward+backward only
#: ``--quick``: one sequence per shape (so the x axis is T alone), 3 samples, no Keras.
QUICK_SHAPES = ("1x256", "1x1024", "1x4096")
QUICK_IMPLS = ("naive", "default", "xla", "chunked", "jax_nn")
QUICK_REPEATS = 3
ALL_IMPLS = IMPLS + tuple(i for i in device.DEVICE_IMPLS if i not in IMPLS)


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


def _add_measure_options(parser: argparse.ArgumentParser) -> None:
    """What to measure: shapes, implementations, modes, scenarios and samples."""
    parser.add_argument(
        "--shapes",
        type=lambda s: [_parse_shape(x) for x in s.split(",")],
        default=None,
        help=f"comma-separated BATCHxLENGTH list (default: {','.join(DEFAULT_SHAPES)})",
    )
    parser.add_argument(
        "--depth",
        type=_positive_int("--depth"),
        default=None,
        help=f"head size D (default: 64; {device.DEVICE_DEPTH} with --device)",
    )
    parser.add_argument(
        "--impls",
        type=_parse_list(ALL_IMPLS, "--impls"),
        default=None,
        help=f"comma-separated subset of {','.join(IMPLS)}; with --device, of "
        f"{','.join(device.DEVICE_IMPLS)} (default: all)",
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
        "--device",
        action="store_true",
        help="time the accelerator table instead (bfloat16, T = 1k..32k; see above)",
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


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    """Where the rows go, or where they come from (``--from-json``)."""
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
    # Run by measure.measure_memory in a fresh process: prints one entry's peak MiB.
    parser.add_argument("--_memory-probe", dest="memory_probe", help=argparse.SUPPRESS)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flax_dotattn.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_measure_options(parser)
    _add_output_options(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark with command-line arguments ``argv`` (default: ``sys.argv``)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.memory_probe:
        print(measure_memory_here(json.loads(args.memory_probe)))
        return 0
    if args.scenarios:
        return _run_scenarios(args)
    wanted = device.DEVICE_IMPLS if args.device else IMPLS
    wrong = [i for i in args.impls or () if i not in wanted]
    if wrong:
        parser.error(
            f"--impls takes a comma-separated subset of {list(wanted)}"
            f"{' with --device' if args.device else ''}; received {','.join(args.impls)!r}."
        )
    if args.device:
        return _run_device(args)
    if args.plot:
        try:
            require_matplotlib()  # fail now, not after minutes of measuring
        except RuntimeError as e:
            parser.error(str(e))
    if args.from_json:
        return _redraw(args)
    return _run_table(args)


def _run_scenarios(args: argparse.Namespace) -> int:
    """``--scenarios``: times them, prints the machine and its load, writes ``--json``."""
    header = (
        f"Machine: {machine()}; D = 64, float32, T = {SCENARIO_LENGTH}, forward+backward "
        f"(gqa: T = {SCENARIO_LENGTHS['gqa']}; flax: T = {SCENARIO_LENGTHS['flax']}, "
        f"8 heads; softcap, mask_mods: T = {SCENARIO_LENGTHS['softcap']}; decode: forward, "
        "T = the cache length)."
    )
    print(header, f"Load average (1 min) at start: {load_average()[0]:.2f}.", flush=True)
    print(f"Tuning: {tuning_status()}.", flush=True)
    rows = runs.scenario_rows(args.scenarios, args.repeats or 5, not args.no_memory)
    print(f"Load average (1 min) at end: {load_average()[0]:.2f}.")
    if args.json:
        report.write_json(args.json, rows, machine=machine(), tuning=tuning_status())
    return 0


def _run_device(args: argparse.Namespace) -> int:
    """``--device``: the accelerator table, with ``--json`` and ``--markdown``."""
    if args.shapes is None:
        args.shapes = [(device.DEVICE_BATCH, t) for t in device.DEVICE_LENGTHS]
    impls = device.available(args.impls or device.DEVICE_IMPLS)
    depth = args.depth or device.DEVICE_DEPTH
    header = f"Machine: {machine()}; bfloat16 [B, H={device.DEVICE_HEADS}, T, D={depth}]" + (
        ", causal." if args.causal else "."
    )
    print(header, flush=True)
    table = []
    for b in sorted({b for b, _ in args.shapes}):
        table += device.rows(
            impls,
            [t for bb, t in args.shapes if bb == b],
            batch=b,
            heads=device.DEVICE_HEADS,
            depth=depth,
            modes=args.modes,
            causal=args.causal,
            repeats=args.repeats or 5,
            max_naive_length=args.max_naive_length,
            time_entries=time_entries,
        )
    if args.json:
        report.write_json(args.json, table, machine=machine(), depth=depth)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(device.to_markdown(table, header))
    return 0


def _redraw(args: argparse.Namespace) -> int:
    """``--from-json``: the Markdown table and the figure of a saved run."""
    saved = report.read_json(args.from_json)
    rows, depth = saved["rows"], saved.get("depth", args.depth or 64)
    header = f"Machine: {saved['machine']}; D = {depth}, float32."
    if "tuning" in saved:
        header += f" Tuning: {saved['tuning']}."
    title = plot_title(saved["machine"], depth, saved.get("load_average_1min"))
    _write_table_and_figure(args, rows, header, title)
    return 0


def _with_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Options left unset take the --quick or the full run's values."""
    if args.shapes is None:
        args.shapes = [_parse_shape(s) for s in (QUICK_SHAPES if args.quick else DEFAULT_SHAPES)]
    if args.impls is None:
        args.impls = list(QUICK_IMPLS if args.quick else IMPLS)
    if args.repeats is None:
        args.repeats = QUICK_REPEATS if args.quick else 7
    if args.depth is None:
        args.depth = 64
    return args


def _groups(args: argparse.Namespace) -> list[runs.Group]:
    """One group of entries, timed together, per shape and mode."""
    impls = baselines.available(args.impls)
    groups = [runs.Group(b, t, mode, impls) for (b, t) in args.shapes for mode in args.modes]
    if args.long:
        b, t = _parse_shape(LONG_SHAPE)
        groups.append(runs.Group(b, t, "fwd_bwd", ["chunked"]))
    return groups


def _run_table(args: argparse.Namespace) -> int:
    """The table over shapes, modes and implementations, and the files asked for."""
    groups = _groups(_with_defaults(args))
    load_start = load_average()
    header = f"Machine: {machine()}; D = {args.depth}, float32" + (
        ", causal." if args.causal else "."
    )
    print(header, f"Load average (1 min) at start: {load_start[0]:.2f}.", flush=True)
    tuned = tuning_status()
    print(f"Tuning: {tuned}.", flush=True)
    rows = runs.table_rows(
        groups,
        depth=args.depth,
        causal=args.causal,
        repeats=args.repeats,
        max_naive_length=args.max_naive_length,
        memory=not args.no_memory,
    )
    load = [load_start[0], load_average()[0]]
    header += f" Load average (1 min): {load[0]:.2f} at start, {load[1]:.2f} at end."
    header += f" Tuning: {tuned}."
    print(f"Load average (1 min) at end: {load[1]:.2f}.")
    if args.json:
        saved = {"machine": machine(), "depth": args.depth, "load_average_1min": load}
        saved["tuning"] = tuned
        report.write_json(args.json, rows, **saved)
    _write_table_and_figure(args, rows, header, plot_title(machine(), args.depth, load))
    return 0


def _write_table_and_figure(
    args: argparse.Namespace, rows: list[dict], header: str, title: str
) -> None:
    """``--markdown`` and ``--plot``, when given."""
    if args.markdown:
        report.write_markdown(args.markdown, rows, header)
    if args.plot:
        plot(rows, args.plot, title)
        print(f"plot: {args.plot}")
