"""The tuner behind ``python -m flax_dotattn.tune``: measures this device, writes the table.

For each case (score mode, full or causal, input dtype) of a :class:`Grid` it measures,
with jitted calls of :func:`~flax_dotattn.dot_attention` at ``[B, T, D]`` (``B`` =
``tokens // T``):

1. the chunked kernel's forward blocks ``(Bq, Bk)`` at each of ``block_lengths``, timing
   the forward pass, then its derivative blocks with those forward blocks, timing
   forward+backward (the gradients of ``sum(out**2)``);
2. the crossover: at each of ``crossover_lengths``, the materialised path (``"xla"``)
   against the chunked one with the blocks just chosen, forward and forward+backward. The
   paths are compared by the geometric mean of chunked's two speed-ups (so neither mode
   loses more than the other gains), and the crossover is set between the last length
   where xla won and the first from which chunked always won.

Each choice keeps the shipped default (blocks, or the path the shipped crossover takes)
unless a candidate is faster by :data:`MARGIN` (3 %) twice in a row (a second interleaved
measurement of the two), so that the noise of a shared machine does not move it.

Candidates are timed interleaved (one sample of each in turn, the order reversed every
other round, so a drift of a shared machine touches all alike) and compared by their
median. The table (:mod:`flax_dotattn._src.tuning.table`) records the decisions, every median,
the machine and its load.

Sliding windows are not measured: a window narrows the tuned blocks by the rule of
:meth:`~flax_dotattn.BlockSizes.default`. The GPU/TPU Pallas kernels' block grids
(:data:`ACCELERATOR_KERNELS`, :mod:`flax_dotattn._src.tuning.kernel_tuners`) are measured on their
own platform (splash on TPU, Triton on a CUDA GPU), with the same margin and confirmation;
on other hosts they are skipped, except in ``--smoke``, which runs them in Pallas
interpret mode so that the code path is tested (those timings mean nothing).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from flax_dotattn._src import dispatch
from flax_dotattn._src.attention import dot_attention
from flax_dotattn._src.blocks import BlockSizes
from flax_dotattn._src.dispatch import CHUNKED_CROSSOVER_BYTES
from flax_dotattn._src.tuning import kernel_tuners
from flax_dotattn._src.tuning import table as tuning
from flax_dotattn._src.tuning.timing import attention_inputs, time_interleaved
from flax_dotattn._src.types import Implementation, ScoreMode

Pair = tuple[int, int]
_IMPLEMENTATIONS: tuple[Implementation, ...] = ("xla", "chunked")
#: A measured choice replaces the shipped one only when it is this much faster (the
#: noise of a shared machine is not a reason to move away from the defaults).
MARGIN = 1.03


@dataclasses.dataclass(frozen=True)
class Grid:
    """What the tuner measures (see the module docstring)."""

    score_modes: tuple[ScoreMode, ...] = ("dot",)
    causal: tuple[bool, ...] = (False, True)
    dtypes: tuple[str, ...] = ("float32",)
    depth: int = 64
    tokens: int = 4096
    block_lengths: tuple[int, ...] = (1024, 4096)
    crossover_lengths: tuple[int, ...] = (256, 512, 1024, 2048)
    forward_candidates: tuple[Pair, ...] = (
        (256, 256),
        (512, 128),
        (512, 256),
        (512, 512),
        (1024, 128),
        (1024, 256),
        (1024, 512),
        (2048, 256),
        (2048, 512),
    )
    backward_candidates: tuple[Pair, ...] = ((512, 256), (1024, 256), (2048, 256), (1024, 512))
    concat_candidates: tuple[Pair, ...] = ((128, 64), (128, 128), (256, 128), (256, 256))
    concat_lengths: tuple[int, ...] = (64, 128, 256, 512)
    repeats: int = 5
    sample_seconds: float = 0.03
    #: The accelerator kernels' grid: lengths, tokens per shape, head size and dtype, and
    #: at most this many candidates per choice (None: all).
    kernel_lengths: tuple[int, ...] = (1024, 4096, 16384)
    kernel_tokens: int = 65536
    kernel_depth: int = 128
    kernel_dtype: str = "bfloat16"
    kernel_candidates: int | None = None
    #: On a host without an accelerator, run the accelerator kernels' tuners in Pallas's
    #: interpret mode (``--smoke``); otherwise they are skipped there.
    interpret_accelerator_kernels: bool = False

    def batch(self, length: int) -> int:
        return max(1, self.tokens // length)


GRIDS = {
    # About 1.5 to 3 minutes on a 2-core CPU, by its load.
    "full": Grid(),
    "quick": Grid(
        block_lengths=(1024, 4096),
        crossover_lengths=(512, 1024, 2048),
        forward_candidates=((512, 256), (1024, 256), (2048, 256), (512, 512)),
        backward_candidates=((1024, 256), (2048, 256)),
        repeats=3,
        kernel_lengths=(1024, 4096),
        kernel_candidates=4,
    ),
    # Seconds: tiny shapes, one case, for tests of the mechanics (the timings mean nothing).
    "smoke": Grid(
        causal=(False,),
        tokens=64,
        block_lengths=(64,),
        crossover_lengths=(64,),
        forward_candidates=((32, 32),),
        backward_candidates=(),
        repeats=1,
        sample_seconds=0.0,
        kernel_lengths=(256,),
        kernel_tokens=256,
        kernel_depth=16,
        kernel_dtype="float32",
        kernel_candidates=2,
        interpret_accelerator_kernels=True,
    ),
}


class KernelTuner(Protocol):
    """Tunes one accelerator (Pallas) kernel: measures its block grid for ``grid`` and
    returns a JSON-serialisable entry, stored in the table under ``kernels[name]`` and
    read back with :func:`flax_dotattn._src.tuning.table.kernel_entry`. ``interpret`` is True
    off the kernel's platform (``--smoke`` only: the code path runs, the timings mean
    nothing); ``choose`` times candidates and keeps the shipped one unless another wins
    twice (:meth:`_Recorder.choose`)."""

    def __call__(
        self, grid: Grid, *, interpret: bool, choose: kernel_tuners.Choose
    ) -> dict[str, Any]: ...


#: The accelerator (Pallas) kernels' tuners and the platform each runs compiled on, by
#: kernel name.
ACCELERATOR_KERNELS: dict[str, tuple[KernelTuner, str]] = {
    name: (functools.partial(kernel_tuners.tune_kernel, space), space.platform)
    for name, space in kernel_tuners.SPACES.items()
}


@functools.cache  # one jitted function per entry: compiled once per shape
def _entry(
    mode: str,
    score_mode: ScoreMode,
    causal: bool,
    implementation: Implementation,
    blocks: BlockSizes | None,
) -> Callable:
    def attend(q, k, v):
        return dot_attention(
            None,
            q,
            v,
            k,
            causal=causal,
            score_mode=score_mode,
            implementation=implementation,
            block_size=blocks,
        )

    if mode == "fwd":
        return jax.jit(attend)
    loss = lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32) ** 2)  # noqa: E731
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _pick(seconds: dict[str, float], shipped: str) -> str:
    """The fastest candidate if it beats the shipped one by :data:`MARGIN`, else that."""
    best = min(seconds, key=seconds.__getitem__)
    return best if seconds[best] * MARGIN < seconds[shipped] else shipped


def _pair(name: str) -> Pair:
    bq, bk = name.split("x")
    return int(bq), int(bk)


def _clip(pair: Pair, t: int) -> Pair:
    return min(pair[0], t), min(pair[1], t)


def _unique(pairs: Sequence[Pair], t: int) -> list[Pair]:
    return list(dict.fromkeys(_clip(p, t) for p in pairs))


class _Progress:
    """A rich progress bar when ``bar`` is True and rich is installed, else one printed
    line per step; the decisions are printed either way."""

    def __init__(self, total: int, bar: bool) -> None:
        self.total, self.done, self.bar, self.task = total, 0, None, None
        if bar:
            try:
                from rich.progress import Progress
            except ImportError:
                return
            self.bar = Progress(transient=False)
            self.task = self.bar.add_task("tuning", total=total)

    @contextmanager
    def running(self) -> Iterator[_Progress]:
        if self.bar is None:
            yield self
            return
        with self.bar:
            yield self

    def step(self, what: str) -> None:
        self.done += 1
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, advance=1, description=what)
        else:
            print(f"[{self.done}/{self.total}] {what}", flush=True)

    def log(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text)
        else:
            print(text, flush=True)


def _steps(grid: Grid) -> int:
    per_case = {
        "dot": 2 * len(grid.block_lengths) + len(grid.crossover_lengths),
        "concat": 2 * len(grid.concat_lengths[-1:]) + len(grid.concat_lengths),
    }
    return len(grid.causal) * len(grid.dtypes) * sum(per_case[m] for m in grid.score_modes)


class _Recorder:
    """Times candidates interleaved, keeps the measurements and reports progress."""

    def __init__(self, grid: Grid, progress: _Progress) -> None:
        self.grid, self.progress = grid, progress
        self.records: list[dict[str, Any]] = []

    def measure(
        self, case: str, what: str, batch: int, length: int,
        entries: dict[str, tuple[Callable, tuple]],
    ) -> dict[str, float]:  # fmt: skip
        seconds = time_interleaved(entries, self.grid.repeats, self.grid.sample_seconds)
        self.records.append(
            {"case": case, "what": what, "batch": batch, "length": length, "seconds": seconds}
        )
        line = f"{case} {what} {batch}x{length}"
        (self.progress.log if what.endswith("again") else self.progress.step)(line)
        return seconds

    def choose(
        self, case: str, what: str, batch: int, length: int,
        entries: dict[str, tuple[Callable, tuple]], shipped: str,
    ) -> str:  # fmt: skip
        """The candidate that beat ``shipped`` by :data:`MARGIN` twice in a row, else it."""
        choice = _pick(self.measure(case, what, batch, length, entries), shipped)
        if choice != shipped:
            again = {choice: entries[choice], shipped: entries[shipped]}
            choice = _pick(self.measure(case, f"{what} again", batch, length, again), shipped)
        return choice


def tune_case(
    grid: Grid, score_mode: ScoreMode, causal: bool, dtype: str, recorder: _Recorder
) -> dict[str, Any]:
    """Measures one case; returns its table entry (the measurements go to ``recorder``)."""
    name = tuning.case_name(score_mode, causal, dtype)
    if score_mode == "concat":
        block_lengths = grid.concat_lengths[-1:]
        crossover_lengths, fwd_cands = grid.concat_lengths, grid.concat_candidates
        bwd_cands = grid.concat_candidates
    else:
        block_lengths, crossover_lengths = grid.block_lengths, grid.crossover_lengths
        fwd_cands, bwd_cands = grid.forward_candidates, grid.backward_candidates
    progress = recorder.progress

    def with_args(t: int, fns: dict[str, Callable]) -> dict[str, tuple[Callable, tuple]]:
        args = attention_inputs(grid.batch(t), t, grid.depth, dtype)
        return {label: (fn, args) for label, fn in fns.items()}

    def measure(t: int, fns: dict[str, Callable], what: str) -> dict[str, float]:
        return recorder.measure(name, what, grid.batch(t), t, with_args(t, fns))

    def choose(t: int, fns: dict[str, Callable], what: str, shipped: str) -> str:
        return recorder.choose(name, what, grid.batch(t), t, with_args(t, fns), shipped)

    entries: list[dict[str, Any]] = []
    ranges = tuning.length_ranges(block_lengths)
    for t, (min_length, max_length) in zip(block_lengths, ranges, strict=True):
        shipped = BlockSizes.default(score_mode, causal=causal, length=t)
        fwd = {
            f"{bq}x{bk}": _entry(
                "fwd", score_mode, causal, "chunked", BlockSizes(block_q=bq, block_k=bk)
            )
            for bq, bk in _unique([shipped.forward, *fwd_cands], t)
        }
        shipped_fwd = "{}x{}".format(*_clip(shipped.forward, t))
        bq, bk = _pair(choose(t, fwd, "forward blocks", shipped_fwd))

        def both(pair: Pair, bq: int = bq, bk: int = bk) -> BlockSizes:
            return BlockSizes(
                block_q=bq, block_k=bk, block_q_backward=pair[0], block_k_backward=pair[1]
            )

        bwd = {
            f"{p[0]}x{p[1]}": _entry("fwd_bwd", score_mode, causal, "chunked", both(p))
            for p in _unique([shipped.backward, (bq, bk), *bwd_cands], t)
        }
        shipped_bwd = "{}x{}".format(*_clip(shipped.backward, t))
        best = both(_pair(choose(t, bwd, "backward blocks", shipped_bwd)))
        entries.append({"min_length": min_length, "max_length": max_length, **best.to_dict()})
        progress.log(f"{name}: T={t} blocks forward {best.forward}, backward {best.backward}")

    def blocks_for(t: int) -> BlockSizes:  # as tuning.lookup reads the entries
        entry = tuning.entry_for_length(entries, t)
        if entry is None:
            return BlockSizes.default(score_mode, causal=causal, length=t)
        return BlockSizes(**{k: v for k, v in entry.items() if not k.endswith("length")})

    per_score = grid.depth if score_mode == "concat" else 1
    itemsize = jnp.dtype(jnp.float32 if jnp.finfo(dtype).bits < 32 else dtype).itemsize

    def size(t: int) -> int:
        return t * t * per_score * itemsize

    chunked_wins = []
    for t in crossover_lengths:
        fns = {
            f"{impl}/{mode}": _entry(
                mode, score_mode, causal, impl, blocks_for(t) if impl == "chunked" else None
            )
            for mode in ("fwd", "fwd_bwd")
            for impl in _IMPLEMENTATIONS
        }
        shipped_wins = size(t) >= CHUNKED_CROSSOVER_BYTES[score_mode]
        for what in ("crossover", "crossover again"):  # a switch must show twice
            seconds = measure(t, fns, what)
            ratios = [seconds[f"xla/{m}"] / seconds[f"chunked/{m}"] for m in ("fwd", "fwd_bwd")]
            speedup = math.sqrt(math.prod(ratios))  # chunked's, geometric mean of both modes
            wins = speedup * MARGIN >= 1.0 if shipped_wins else speedup > MARGIN
            if wins == shipped_wins:
                break
        chunked_wins.append(wins)
        recorder.records[-1]["chunked_speedup"] = {"fwd": ratios[0], "fwd_bwd": ratios[1]}
        progress.log(
            f"{name}: T={t} chunked/xla speed-up forward {ratios[0]:.2f}x, "
            f"forward+backward {ratios[1]:.2f}x -> {'chunked' if wins else 'xla'}"
        )
    first = len(chunked_wins)
    while first > 0 and chunked_wins[first - 1]:
        first -= 1
    if first == len(crossover_lengths):  # xla won at the longest length measured
        crossover = size(2 * crossover_lengths[-1])
    elif first == 0:
        crossover = size(crossover_lengths[0])
    else:
        crossover = size(round(math.sqrt(crossover_lengths[first - 1] * crossover_lengths[first])))
    return {"crossover_bytes": crossover, "blocks": entries}


def _kernels_to_run(grid: Grid) -> dict[str, bool]:
    """The accelerator kernels this run tunes, each with whether it is interpreted (off
    its own platform, only with ``grid.interpret_accelerator_kernels``)."""
    here = dispatch.current_platform()
    return {
        name: platform != here
        for name, (_, platform) in ACCELERATOR_KERNELS.items()
        if platform == here or grid.interpret_accelerator_kernels
    }


def tune(
    grid: Grid, *, progress: bool = True
) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """Measures every case of ``grid`` and runs the accelerator kernels' tuners; returns
    the table's cases, the kernels' entries and the measurements."""
    to_run = _kernels_to_run(grid)
    steps = _steps(grid) + 2 * len(grid.causal) * len(grid.kernel_lengths) * len(to_run)
    bar = _Progress(steps, progress)
    recorder = _Recorder(grid, bar)
    cases, kernels = {}, {}
    with bar.running():
        for score_mode in grid.score_modes:
            for dtype in grid.dtypes:
                for causal in grid.causal:
                    case = tune_case(grid, score_mode, causal, dtype, recorder)
                    cases[tuning.case_name(score_mode, causal, dtype)] = case
        for kernel, (tuner, platform) in ACCELERATOR_KERNELS.items():
            if kernel not in to_run:
                bar.log(f"{kernel}: skipped (runs on {platform}; --smoke runs it interpreted)")
                continue
            interpret = to_run[kernel]
            kernels[kernel] = tuner(grid, interpret=interpret, choose=recorder.choose)
            bar.log(f"{kernel}{' (interpreted)' if interpret else ''}: {kernels[kernel]}")
    return cases, kernels, recorder.records


def machine() -> str:
    """The device (for a CPU: its model and cores) and the jax version, in one line."""
    key = tuning.device_key()
    return f"{key['backend']} ({key['device_kind']}); jax {key['jax']}"


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def run(grid: Grid, *, progress: bool = True, write: bool = True) -> dict[str, Any]:
    """Tunes and (unless ``write`` is False) writes the table; returns what it wrote."""
    load = load_average()
    started = time.perf_counter()
    cases, kernels, records = tune(grid, progress=progress)
    extra = {
        "kernels": kernels,
        "machine": machine(),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "load_average": {"start": load, "end": load_average()},
        "seconds": round(time.perf_counter() - started, 1),
        "grid": dataclasses.asdict(grid),
        "measurements": records,
    }
    if write:
        extra["path"] = str(tuning.write_table(cases, **extra))
    return {"cases": cases, **extra}
