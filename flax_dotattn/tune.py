"""Tune the automatic choice for this device: ``python -m flax_dotattn.tune``.

Measures, on the device JAX runs on, where the chunked path starts to beat the
materialised one (the crossover of the automatic choice) and the chunked kernel's best
forward and derivative block sizes, forward and forward+backward, full and causal, then
writes them to a small JSON table in a per-user cache directory:
``$FLAX_DOTATTN_CACHE_DIR``, else ``$XDG_CACHE_HOME/flax_dotattn``, else
``~/.cache/flax_dotattn``. From then on ``dot_attention`` and ``which_implementation``
read it at trace time (the plan's reason ends in "(tuned on <device kind>)"); explicit
``implementation=`` and ``block_size=`` still win, dropout ignores it, and
``FLAX_DOTATTN_TUNING=off`` turns it off. The table applies to the backend, device kind,
jax version and flax_dotattn version it was measured with; run the tuner again after an
upgrade. It changes speed only: the same path gives the same numbers up to the rounding
of the blocks' sums.

The full grid takes about 1.5 to 3 minutes on a 2-core CPU, by its load; ``--quick`` is
shorter, ``--smoke`` takes seconds (tiny shapes, for tests: its timings mean nothing, so
it writes its table only where ``$FLAX_DOTATTN_CACHE_DIR`` names a directory).
On a TPU it also measures splash attention's forward and backward blocks
(``implementation="pallas_tpu"``), on a CUDA GPU the Triton kernel's (``"pallas_gpu"``),
bfloat16 at T = 1024, 4096 and 16384; elsewhere they are skipped, except that ``--smoke``
runs both in Pallas interpret mode (their code path, not their speed).

Examples:
  python -m flax_dotattn.tune                 # measure and write the table
  python -m flax_dotattn.tune --quick
  python -m flax_dotattn.tune --show          # the table in use, if any
  python -m flax_dotattn.tune --score-modes dot,concat --dtypes float32,bfloat16
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence

from flax_dotattn._src.tuning import table as tuning
from flax_dotattn._src.tuning import tuner
from flax_dotattn._src.tuning.table import cache_dir as cache_dir
from flax_dotattn._src.tuning.table import status as status

__all__ = ["cache_dir", "main", "status"]


def _parse_list(choices: Sequence[str], flag: str):
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(x.strip() for x in text.split(",") if x.strip())
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"{flag} takes a comma-separated subset of {list(choices)}; received {text!r}."
            )
        return items

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flax_dotattn.tune",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a shorter grid")
    size.add_argument("--smoke", action="store_true", help="a tiny grid in seconds (tests)")
    parser.add_argument(
        "--score-modes",
        type=_parse_list(("dot", "concat"), "--score-modes"),
        default=None,
        help="comma-separated subset of dot,concat (default: dot)",
    )
    parser.add_argument(
        "--dtypes",
        type=_parse_list(("float32", "bfloat16", "float16"), "--dtypes"),
        default=None,
        help="comma-separated input dtypes (default: float32)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--dry-run", action="store_true", help="measure and print, write no table")
    parser.add_argument("--show", action="store_true", help="print the table in use and exit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the tuner with command-line arguments ``argv`` (default: ``sys.argv``)."""
    args = _parser().parse_args(argv)
    if args.show:
        return _show()
    grid = tuner.GRIDS["smoke" if args.smoke else "quick" if args.quick else "full"]
    changes = {"score_modes": args.score_modes, "dtypes": args.dtypes}
    grid = dataclasses.replace(grid, **{k: v for k, v in changes.items() if v is not None})
    # A smoke table's timings mean nothing: it is written only where a cache directory is
    # named explicitly (as the tests do), never to a user's default cache.
    explicit_dir = bool(os.environ.get(tuning.CACHE_DIR_ENV))
    write = not args.dry_run and (explicit_dir or not args.smoke)
    print(f"Tuning on {tuner.machine()}; load average {tuner.load_average()}.", flush=True)
    result = tuner.run(grid, progress=not args.no_progress, write=write)
    print(json.dumps(result["cases"], indent=1))
    if args.dry_run:
        where = "nowhere (--dry-run)"
    else:
        where = result.get("path", f"nowhere (--smoke writes only to ${tuning.CACHE_DIR_ENV})")
    print(f"{result['seconds']} s; load average at end {result['load_average']['end']}.")
    print(f"Table written to {where}.")
    return 0


def _show() -> int:
    path = tuning.table_path()
    table = tuning.current_table()
    if not tuning.enabled():
        print(f"Tuning is off ({tuning.TUNING_ENV}); the shipped defaults apply.")
    elif table is None:
        print(f"No applicable table at {path}; the shipped defaults apply.")
    else:
        print(f"{path}:")
        shown = ("key", "machine", "created", "load_average", "cases", "kernels")
        print(json.dumps({k: table[k] for k in shown if k in table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
