"""Block-size tuners of the accelerator (Pallas) kernels, run by ``python -m flax_dotattn.tune``.

Each kernel's tuner measures, at each of the grid's ``kernel_lengths`` (full and causal),
the kernel's forward blocks by timing the forward pass, then its backward blocks with
those forward blocks by timing forward+backward, through
``dot_attention(..., implementation=<kernel>)`` on ``[N, T, D]`` inputs. A candidate is
traced and compiled inside :func:`flax_dotattn._src.tuning.table.kernel_override`, so it runs
exactly what a table holding it would make the kernel run. The entry it returns is read
back by the kernel through :func:`flax_dotattn._src.tuning.table.kernel_blocks`::

    {"interpreted": false, "depth": 128, "dtype": "bfloat16",
     "full": [{"min_length": 724, "max_length": 2896, "forward": [512, 512],
               "backward": [512, 512]}, ...],
     "causal": [...]}

(splash's blocks are ``(block_q, block_kv)`` pairs; the Triton kernel's are one length
each, ``block_q = block_k``). On the kernel's own platform the timings are real; elsewhere
(``--smoke`` on a CPU host) the kernel runs in Pallas interpret mode, so that the code
path is exercised; those timings mean nothing, and the entry says ``"interpreted": true``,
which the kernels ignore.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from flax_dotattn._src.attention import dot_attention
from flax_dotattn._src.kernels import pallas_gpu, pallas_tpu
from flax_dotattn._src.tuning import table as tuning
from flax_dotattn._src.tuning.timing import attention_inputs
from flax_dotattn._src.types import Implementation

Blocks = Any  # one kernel's blocks: a (q, kv) pair (splash) or an int (Triton)


class Choose(Protocol):
    """The tuner's choice among ``entries`` (label -> (function, arguments)): the fastest
    if it beats ``shipped`` by the tuner's margin twice in a row, else ``shipped``."""

    def __call__(
        self, case: str, what: str, batch: int, length: int,
        entries: dict[str, tuple[Callable, tuple]], shipped: str,
    ) -> str: ...  # fmt: skip


@dataclasses.dataclass(frozen=True)
class KernelSpace:
    """One kernel's tunable blocks."""

    name: Implementation  # the implementation and the table's kernels key
    platform: str  # where it runs compiled (elsewhere: interpreted)
    forward: tuple[Blocks, ...]  # candidates
    backward: tuple[Blocks, ...]
    shipped: Callable[[int], tuple[Blocks, Blocks]]  # (forward, backward) at length T
    fits: Callable[[Blocks, int], bool]  # whether blocks fit a (padded) length T

    def label(self, blocks: Blocks) -> str:
        return "x".join(map(str, blocks)) if isinstance(blocks, tuple) else str(blocks)

    def json(self, blocks: Blocks) -> Any:
        return list(blocks) if isinstance(blocks, tuple) else blocks


def _splash_shipped(t: int) -> tuple[Blocks, Blocks]:
    blocks = pallas_tpu.shipped_blocks(t, t)
    return blocks[:2], blocks[2:]


def _triton_shipped(t: int) -> tuple[Blocks, Blocks]:
    blocks = pallas_gpu.shipped_blocks(t)
    return blocks.forward, blocks.backward


SPLASH = KernelSpace(
    name=pallas_tpu.NAME,
    platform="tpu",
    forward=(
        (512, 512),
        (256, 512),
        (512, 1024),
        (1024, 512),
        (1024, 1024),
        (256, 256),
        (128, 128),
    ),
    backward=((512, 512), (256, 512), (512, 1024), (1024, 1024), (256, 256), (128, 128)),
    shipped=_splash_shipped,
    fits=lambda b, t: all(x % pallas_tpu.LANES == 0 and t % x == 0 for x in b),
)
TRITON = KernelSpace(
    name=pallas_gpu.NAME,
    platform="cuda",
    forward=(128, 64, 32),
    backward=(32, 64, 16),
    shipped=_triton_shipped,
    fits=lambda b, t: b >= 16 and t % b == 0,
)
#: The kernels with a tuner, by name.
SPACES = {space.name: space for space in (SPLASH, TRITON)}


def _compiled(
    space: KernelSpace, mode: str, causal: bool, forward: Blocks, backward: Blocks, args: tuple
) -> Callable:
    """The kernel with these blocks, traced and compiled under an override of its entry."""

    def attend(q, k, v):
        return dot_attention(None, q, v, k, causal=causal, implementation=space.name)

    fn: Callable = attend
    if mode == "fwd_bwd":
        loss = lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32) ** 2)  # noqa: E731
        fn = jax.grad(loss, argnums=(0, 1, 2))
    entry = {"forward": space.json(forward), "backward": space.json(backward)}
    with tuning.kernel_override(space.name, {"causal" if causal else "full": [entry]}):
        return jax.jit(fn).lower(*args).compile()


def _candidates(
    space: KernelSpace, first: Blocks, rest: Sequence[Blocks], t: int, limit: int | None
):
    """``first`` (the shipped blocks), then the candidates that fit ``T``, without repeats,
    at most ``limit`` in all."""
    fitting = [first, *(b for b in rest if space.fits(b, t))]
    return list(dict.fromkeys(fitting))[:limit]


def tune_kernel(
    space: KernelSpace, grid: Any, *, interpret: bool, choose: Choose
) -> dict[str, Any]:
    """Measures ``space``'s blocks over ``grid`` (a :class:`flax_dotattn._src.tuning.tuner.Grid`);
    returns its table entry (see the module docstring)."""
    lengths = grid.kernel_lengths
    # Interpreted timings mean nothing: the kernels ignore such an entry (the kernel
    # interprets itself off its platform, so ``interpret`` changes nothing else here).
    # The head size and dtype measured: wider calls keep the kernel's own blocks.
    entry: dict[str, Any] = {
        "interpreted": interpret,
        "depth": grid.kernel_depth,
        "dtype": grid.kernel_dtype,
    }
    for causal in grid.causal:
        case = f"{space.name}/{'causal' if causal else 'full'}/{grid.kernel_dtype}"
        entries: list[dict[str, Any]] = []
        for t, (min_length, max_length) in zip(lengths, tuning.length_ranges(lengths), strict=True):
            n = max(1, grid.kernel_tokens // t)
            args = attention_inputs(n, t, grid.kernel_depth, grid.kernel_dtype)
            shipped_fwd, shipped_bwd = space.shipped(t)
            fwd = {
                space.label(b): (_compiled(space, "fwd", causal, b, shipped_bwd, args), args)
                for b in _candidates(space, shipped_fwd, space.forward, t, grid.kernel_candidates)
            }
            labels = {space.label(b): b for b in (shipped_fwd, *space.forward)}
            forward = labels[choose(case, "forward blocks", n, t, fwd, space.label(shipped_fwd))]
            bwd = {
                space.label(b): (_compiled(space, "fwd_bwd", causal, forward, b, args), args)
                for b in _candidates(space, shipped_bwd, space.backward, t, grid.kernel_candidates)
            }
            labels = {space.label(b): b for b in (shipped_bwd, *space.backward)}
            backward = labels[choose(case, "backward blocks", n, t, bwd, space.label(shipped_bwd))]
            entries.append(
                {
                    "min_length": min_length,
                    "max_length": max_length,
                    "forward": space.json(forward),
                    "backward": space.json(backward),
                }
            )
        entry["causal" if causal else "full"] = entries
    return entry
