"""Which key blocks each query block visits, and exact skipping of the rest.

A block whose every (query, key) pair is masked by structure (``causal``, ``window``) or
by data (value mask, full mask, segment ids that cannot meet) is skipped only when it
provably cannot contribute: Keras's rule turns its logits into ``s - 1e9``, and if a cheap
upper bound of ``s`` (:mod:`.bounds`) minus 1e9 lies so far below the row's running max
that ``exp`` of the difference is exactly 0 in the compute dtype, its softmax weights are
exactly 0. So rows that see no key (which Keras's rule makes average over every key) and
adversarially large logits still get the materialised path's numbers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from flax_dotattn._src.kernels.chunked import functions
from flax_dotattn._src.kernels.chunked.bounds import negligible
from flax_dotattn._src.kernels.chunked.layout import Blocked, Blocks, pair_slice
from flax_dotattn._src.kernels.chunked.operands import Static, pair_blocks
from flax_dotattn._src.masks import MASK_PENALTY
from flax_dotattn._src.mods import EMPTY
from flax_dotattn._src.scores import soft_cap
from flax_dotattn._src.types import Array

# compute(j, run, carry) -> carry: one key block's step; ``run`` is Python True or a
# traced bool saying whether block j must be computed.
Step = Callable[[Any, Any, Any], Any]


def band(static: Static, blocks: Blocks, key_offset: Any, i: Any, n_k: int):
    """Key blocks that ``causal``/``window`` may leave visible to query block i.

    Returns ``(j_lo, j_hi, n_steps)``: blocks ``j_lo <= j <= j_hi`` (traced ints), of which
    at most ``n_steps`` (static) exist.
    """
    block_q, block_k = pair_blocks(static, blocks)  # positions: rows interleave groups
    left, right = static.window or (None, None)
    if static.causal:
        right = 0 if right is None else min(right, 0)
    first_q, last_q = i * block_q, (i + 1) * block_q - 1
    # Per-row offsets [B] (query_offset per sequence): the union of the rows' bands.
    per_row = jnp.ndim(key_offset) > 0
    high, low = (jnp.max(key_offset), jnp.min(key_offset)) if per_row else (key_offset,) * 2
    j_lo = 0 if left is None else jnp.maximum((first_q - left - high) // block_k, 0)
    j_hi = n_k - 1 if right is None else jnp.minimum((last_q + right - low) // block_k, n_k - 1)
    n_steps = n_k
    if left is not None and right is not None and not per_row:
        # Keys first_q - left .. last_q + right: Bq + left + right positions, which can
        # straddle one block more than they fill.
        n_steps = min(n_k, -(-(block_q + left + right) // block_k) + 1)
    return j_lo, j_hi, n_steps


def may_see(static: Static, cut: Blocked, i: Any, j: Any) -> Any:
    """False only when some mask hides every pair of block (i, j) (data-dependent tests;
    positions are handled by :func:`band`). Python True when nothing is tested."""
    tests = []
    if cut.value_mask is not None:
        tests.append(jnp.any(cut.value_mask[j]))
    if cut.q_segment_range is not None and cut.kv_segment_range is not None:
        (q_lo, q_hi), (k_lo, k_hi) = cut.q_segment_range[i], cut.kv_segment_range[j]
        tests.append(jnp.any(jnp.maximum(q_lo, k_lo) <= jnp.minimum(q_hi, k_hi)))
    if cut.attention_mask is not None:
        blocks = pair_blocks(static, cut.blocks)
        tests.append(jnp.any(pair_slice(cut.attention_mask, blocks, i, j)))
    if static.mask_mod is not None and cut.mods is not None:
        known = functions.block_map(static, cut.blocks)
        if known is not None:  # classified while tracing: a table lookup
            tests.append(jnp.asarray(known.states)[i, j] != EMPTY)
        else:  # reads traced arrays: evaluated on the block
            tests.append(jnp.any(functions.visible(static, cut.mods, cut.blocks, i, j)))
    return functools.reduce(jnp.logical_and, tests) if tests else True


def masked_is_negligible(static: Static, cut: Blocked, i: Any, k_bound: Array, row_max: Array):
    """Whether masked logits bounded by ``q_bound * k_bound + max(bias) - 1e9`` have
    softmax weight exactly 0 in every real row of query block i (``row_max [B, Bq]``).

    A soft-cap is increasing, so the capped bound bounds the capped logits. A score
    function has no bound: its scores are taken to lie within ``±1e8`` (as
    :func:`dot_attention` documents), so that masked logits have weight exactly 0 in
    every row that sees a key (its max is above ``-1e9 / 2``), and a row that sees none
    visits every block."""
    block_q = cut.q.shape[2]
    real_row = (i * block_q + jnp.arange(block_q) < static.tq)[None, :]  # [1, Bq]
    if static.score_mod is not None:
        return jnp.all((row_max > -MASK_PENALTY / 2) | ~real_row)
    top = soft_cap(cut.q_bound[i] * k_bound + cut.bias_max, static.logits_soft_cap)
    top = top - MASK_PENALTY  # [B, Bq]
    return jnp.all(negligible(top, row_max) | ~real_row)


def needs_second_pass(static: Static, cut: Blocked, row_max: Array) -> Array:
    """Whether the second pass of :func:`sweep` can run for any query block, given the
    rows' final maxima ``row_max [nQ, B, Bq]`` (known to the derivative passes)."""
    done = jax.vmap(lambda i, m: masked_is_negligible(static, cut, i, cut.k_bound_all, m))(
        jnp.arange(cut.q.shape[0]), row_max
    )  # [nQ]: the test that ends each query block's sweep, for all blocks at once
    return ~jnp.all(done)


def maybe(run: Any, fn: Callable, carry: Any) -> Any:
    """``fn(carry)`` where ``run`` (Python True or a traced bool), else ``carry``."""
    if run is True:
        return fn(carry)
    return lax.cond(run, fn, lambda c: c, carry)


def gated(compute: Callable[[Any, Any], Any]) -> Step:
    """``compute(j, carry)`` as a step of :func:`sweep` that runs only where it must."""
    return lambda j, run, carry: maybe(run, lambda c: compute(j, c), carry)


def _structural(static: Static, cut: Blocked) -> bool:
    """Whether anything but padding masks pairs, so that skipping can help."""
    return bool(
        static.causal
        or static.window is not None
        or cut.value_mask is not None
        or cut.attention_mask is not None
        or cut.q_segments is not None
        or static.mask_mod is not None
    )


def sweep(
    static: Static, cut: Blocked, key_offset: Any, i: Any, row_max: Callable,
    compute: Step, carry: Any, *, remat: bool, second_pass: bool = True,
) -> Any:  # fmt: skip
    """Runs ``compute(j, run, carry)`` over every key block j that can contribute to query
    block i, in two passes.

    Pass 1 walks the :func:`band` and runs the blocks some pair of which is visible. Pass
    2 runs the rest, each only if :func:`masked_is_negligible` cannot prove that its
    masked logits get zero weight (``row_max(carry)`` is the row max so far). It is
    itself skipped, in one test, when the bound over all keys already proves it: the
    usual case, since the rows' visible keys were seen in pass 1. ``second_pass=False``
    leaves it out (for callers that proved it unnecessary beforehand, see
    :func:`needs_second_pass`). ``remat`` rematerialises each step in reverse mode.
    """
    n_k = cut.k.shape[0]
    j_lo, j_hi, n_steps = band(static, cut.blocks, key_offset, i, n_k)
    known = functions.block_map(static, cut.blocks)
    if known is not None:  # the mask function's visible blocks, known while tracing
        j_lo = jnp.maximum(j_lo, jnp.asarray(known.first)[i])
        j_hi = jnp.minimum(j_hi, jnp.asarray(known.last)[i])
        n_steps = min(n_steps, known.steps)

    def first(t, carry):
        j = jnp.minimum(j_lo + t, n_k - 1)
        run = (j_lo + t < n_k) & (j_hi >= j_lo + t)
        see = may_see(static, cut, i, j)
        return compute(j, run if see is True else run & see, carry)

    def second(j, carry):
        in_band = (j >= j_lo) & (j < j_lo + n_steps) & (j <= j_hi)
        see = may_see(static, cut, i, j)
        in_first = in_band if see is True else in_band & see
        bound = cut.k_bound[j][:, None]  # [B, 1]
        run = ~in_first & ~masked_is_negligible(static, cut, i, bound, row_max(carry))
        return compute(j, run, carry)

    def every(j, carry):
        return compute(j, True, carry)

    if remat:
        first, second, every = (
            jax.checkpoint(f, prevent_cse=False) for f in (first, second, every)
        )
    if not _structural(static, cut):
        return lax.fori_loop(0, n_k, every, carry)
    carry = lax.fori_loop(0, n_steps, first, carry)
    if not second_pass:
        return carry
    done = masked_is_negligible(static, cut, i, cut.k_bound_all, row_max(carry))
    return lax.cond(done, lambda c: c, lambda c: lax.fori_loop(0, n_k, second, c), carry)
