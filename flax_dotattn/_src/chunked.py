"""Memory-efficient attention: online softmax over blocks, differentiable in both modes.

The forward pass walks query blocks and, inside each, key blocks, keeping a running max
``m``, normaliser ``l`` and weighted sum (FlashAttention-2 style). The ``[..., Tq, Tv]``
score matrix is never formed.

Derivatives come from a ``jax.custom_jvp`` rule whose tangent is computed blockwise too:
for one query row, with ``P`` the softmax, ``dS`` the tangent of the logits and ``c`` the
row's ``sum(P * dS)`` (the tangent of its log-sum-exp),

    d_out = sum_j (P * dS)_j v_j + P_j dv_j - c * out

Forward-mode (``jax.jvp``, ``jax.jacfwd``) evaluates that rule directly; reverse mode
(``jax.grad``, ``jax.vjp``) is JAX's transpose of it: the rule is linear in the tangents
and each block step is rematerialised (``jax.checkpoint``), so the backward pass
recomputes ``P`` block by block and stores only the inputs, the output and ``(m, l)``.
Both directions take O(T · block) memory.

Block skipping. A block whose every (query, key) pair is masked by structure (``causal``:
all keys in the future) is skipped only when it provably cannot contribute: Keras's rule
turns its logits into ``s - 1e9``, and if a cheap upper bound of ``s`` (``|scale| * |q| *
max|k|`` in dot mode, ``|w| * D`` in concat mode) minus 1e9 lies so far below the row's
running max that ``exp`` of the difference is exactly 0 in the compute dtype, the block's
softmax weights are exactly 0. So rows that see no key (which Keras's rule makes average
over every key) and adversarially large logits still get the materialised path's numbers.

The numbers are those of the materialised path up to float rounding. Shape glossary:
``...`` batch dims, ``Tq``/``Tv`` query/key lengths, ``D`` query/key depth, ``Dv`` value
depth, ``B`` the flattened batch, ``Bq``/``Bk`` block lengths, ``nQ``/``nK`` block counts.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

from flax_dotattn._src.blocks import BlockSizes
from flax_dotattn._src.linear_map import linear_map
from flax_dotattn._src.masks import MASK_PENALTY, Masking, keep_mask
from flax_dotattn._src.scores import masked_logits
from flax_dotattn._src.types import Array


class Static(NamedTuple):
    """Static (hashable) settings of one chunked call."""

    score_mode: str
    causal: bool
    window: tuple[int | None, int | None] | None
    dropout_rate: float
    batch: tuple[int, ...]  # the batch dims ``...`` that ``B`` flattens
    tq: int
    tv: int
    forward_blocks: tuple[int, int]  # (Bq, Bk)
    backward_blocks: tuple[int, int]  # (Bq, Bk) of the derivative pass
    precision: Any


class Operands(NamedTuple):
    """Array operands of one chunked call, batch flattened to ``B``."""

    q: Array  # [B, Tq, D]
    k: Array  # [B, Tv, D]
    v: Array  # [B, Tv, Dv]
    masking: Masking  # value mask [B, Tv], full mask [..., Tq, Tv], segment ids [B, T]
    bias: Array | None  # [..., Tq, Tv], broadcastable batch dims
    key_offset: Array  # int32 [], global position of key 0
    scale: Array | None  # []
    concat_score_weight: Array | None  # []
    rng: Array | None  # dropout key


def _to_blocks(x: Array, block: int, fill: Any = 0) -> Array:
    """``[B, T, ...]`` -> ``[n, B, block, ...]``, padding T up to a multiple of ``block``."""
    n_blocks = -(-x.shape[1] // block)
    pad = n_blocks * block - x.shape[1]
    if pad:
        widths = [(0, 0)] * x.ndim
        widths[1] = (0, pad)
        x = jnp.pad(x, widths, constant_values=fill)
    x = x.reshape((x.shape[0], n_blocks, block) + x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _from_blocks(x: Array, length: int) -> Array:
    """``[n, B, block, ...]`` -> ``[B, length, ...]``, dropping the padding."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape((x.shape[0], x.shape[1] * x.shape[2]) + x.shape[3:])[:, :length]


def _pair_extent(x: Array, blocks: tuple[int, int]) -> tuple[int, int]:
    """The extent of one block of a ``[..., Tq, Tv]`` array: 1 along a broadcast (size-1)
    axis, else the block size."""
    return tuple(1 if n == 1 else b for n, b in zip(x.shape[-2:], blocks, strict=True))


def _pad_pairs(x: Array | None, blocks: tuple[int, int], fill: Any = 0) -> Array | None:
    """Pads the ``[..., Tq, Tv]`` axes of a full mask or bias to whole blocks (a size-1,
    broadcast axis stays as it is)."""
    if x is None:
        return None
    pads = [(-n) % e for n, e in zip(x.shape[-2:], _pair_extent(x, blocks), strict=True)]
    if not any(pads):
        return x
    widths = [(0, 0)] * (x.ndim - 2) + [(0, pad) for pad in pads]
    return jnp.pad(x, widths, constant_values=fill)


def _pair_offsets(x: Array, blocks: tuple[int, int], i, j) -> tuple:
    """Where block (i, j) of a padded ``[..., Tq, Tv]`` array starts (0 along broadcast
    axes), as a full index."""
    sizes = zip(x.shape[-2:], blocks, (i, j), strict=True)
    starts = [0 if n == 1 else b * at for n, b, at in sizes]
    return (0,) * (x.ndim - 2) + tuple(starts)


def _pair_slice(x: Array, blocks: tuple[int, int], i, j) -> Array:
    """Block (i, j) of a padded ``[..., Tq, Tv]`` array, not broadcast: ``[..., Bq|1, Bk|1]``."""
    extent = x.shape[:-2] + _pair_extent(x, blocks)
    return lax.dynamic_slice(x, _pair_offsets(x, blocks, i, j), extent)


def _pair_add(x: Array, blocks: tuple[int, int], i, j, y: Array) -> Array:
    """Adds ``y [..., Bq|1, Bk|1]`` to block (i, j) of a padded ``[..., Tq, Tv]`` array, in
    place (the counterpart of :func:`_pair_slice`)."""
    return lax.dynamic_update_slice(
        x, _pair_slice(x, blocks, i, j) + y, _pair_offsets(x, blocks, i, j)
    )


def _pair_block(static: Static, x: Array, blocks: tuple[int, int], i, j) -> Array:
    """Block (i, j) of a padded ``[..., Tq, Tv]`` array, as ``[B, Bq, Bk]``."""
    x = _pair_slice(x, blocks, i, j)  # [..., Bq|1, Bk|1]
    return jnp.broadcast_to(x, static.batch + blocks).reshape((-1,) + blocks)


def _bias_block(static: Static, bias: Array | None, blocks, i, j) -> Array | None:
    """Block (i, j) ``[B, Bq, Bk]`` of a padded bias, or None."""
    return None if bias is None else _pair_block(static, bias, blocks, i, j)


def _underflow_gap(dtype: Any) -> float:
    """A gap ``g`` such that ``exp(x)`` is exactly 0 in ``dtype`` for every ``x < -g``."""
    return float(-np.log(np.finfo(jnp.dtype(dtype)).smallest_subnormal)) + 1.0


class _Blocked(NamedTuple):
    """The operands of one pass cut into its blocks, and the bounds used for skipping."""

    q: Array  # [nQ, B, Bq, D]
    k: Array  # [nK, B, Bk, D]
    v: Array  # [nK, B, Bk, Dv]
    value_mask: Array | None  # [nK, B, Bk]
    attention_mask: Array | None  # [..., nQ*Bq, nK*Bk]
    bias: Array | None  # [..., nQ*Bq, nK*Bk]
    q_segments: Array | None  # [nQ, B, Bq]
    kv_segments: Array | None  # [nK, B, Bk]
    q_segment_range: Array | None  # [nQ, 2, B]: min and max segment id of the block
    kv_segment_range: Array | None  # [nK, 2, B]
    q_bound: Array  # [nQ, B, Bq]: |logit| <= q_bound * k_bound (before the bias)
    k_bound: Array  # [nK, B]
    k_bound_all: Array  # []: max of k_bound
    bias_max: Array  # []: max of the bias (0 without one)


def logit_bounds(static: Static, ops: Operands) -> tuple[Array, Array]:
    """``(q_bound [B, Tq], k_bound [B, Tv])`` with ``|s_ij| <= q_bound_i * k_bound_j``
    (before any bias)."""
    q, k = ops.q, ops.k
    if static.score_mode == "dot":
        scale = 1.0 if ops.scale is None else jnp.abs(ops.scale)
        return scale * jnp.linalg.norm(q, axis=-1), jnp.linalg.norm(k, axis=-1)
    # |w * sum(tanh)| <= |w| * D
    q_bound = jnp.broadcast_to(jnp.abs(ops.concat_score_weight) * q.shape[-1], q.shape[:2])
    return q_bound, jnp.ones(k.shape[:2], k.dtype)


def negligible(top: Array, row_max: Array) -> Array:
    """Whether masked logits at most ``top`` get softmax weight exactly 0 next to
    ``row_max`` (elementwise). False for NaN or -inf maxima."""
    slack = _underflow_gap(row_max.dtype) + 1e-4 * (jnp.abs(top) + jnp.abs(row_max))
    return top + slack < row_max


def _cut(static: Static, ops: Operands, blocks: tuple[int, int]) -> _Blocked:
    block_q, block_k = blocks
    q, k, masking = ops.q, ops.k, ops.masking
    q_bound, k_bound = logit_bounds(static, ops)  # [B, Tq], [B, Tv]
    k_bound = _to_blocks(k_bound, block_k).max(-1)  # [nK, B]
    q_seg = kv_seg = q_range = kv_range = None
    if masking.query_segment_ids is not None:
        q_seg = _to_blocks(masking.query_segment_ids, block_q, fill=-1)  # [nQ, B, Bq]
        kv_seg = _to_blocks(masking.kv_segment_ids, block_k, fill=-2)  # [nK, B, Bk]
        # Padding ids (-1, -2) widen the ranges, which only makes the test weaker.
        q_range = jnp.stack([q_seg.min(-1), q_seg.max(-1)], axis=1)  # [nQ, 2, B]
        kv_range = jnp.stack([kv_seg.min(-1), kv_seg.max(-1)], axis=1)  # [nK, 2, B]
    bias = None if ops.bias is None else lax.stop_gradient(ops.bias)
    return _Blocked(
        q=_to_blocks(q, block_q),
        k=_to_blocks(k, block_k),
        v=_to_blocks(ops.v, block_k),
        value_mask=None
        if masking.value_mask is None
        else _to_blocks(masking.value_mask, block_k, fill=False),
        attention_mask=_pad_pairs(masking.attention_mask, blocks, fill=False),
        bias=_pad_pairs(ops.bias, blocks),
        q_segments=q_seg,
        kv_segments=kv_seg,
        q_segment_range=q_range,
        kv_segment_range=kv_range,
        q_bound=_to_blocks(q_bound, block_q),
        k_bound=k_bound,
        k_bound_all=k_bound.max() if k_bound.size else jnp.zeros((), k.dtype),
        bias_max=jnp.zeros((), q.dtype) if bias is None else bias.max().astype(q.dtype),
    )


def _block_logits(static, blocks, cut, key_offset, q_blk, k_blk, bias_blk, scale, weight, i, j):
    """Masked logits ``[B, Bq, Bk]`` of block (i, j); padded keys get ``-inf``.

    ``bias_blk`` is the bias's block ``[B, Bq, Bk]`` (or None): an argument so that
    derivatives reach it.
    """
    block_q, block_k = blocks
    q_pos = i * block_q + jnp.arange(block_q)  # [Bq]
    k_pos = j * block_k + jnp.arange(block_k)  # [Bk], local to this call's keys
    masking = Masking(
        value_mask=None if cut.value_mask is None else cut.value_mask[j],
        attention_mask=None
        if cut.attention_mask is None
        else _pair_block(static, cut.attention_mask, blocks, i, j),
        query_segment_ids=None if cut.q_segments is None else cut.q_segments[i],
        kv_segment_ids=None if cut.kv_segments is None else cut.kv_segments[j],
    )
    keep = keep_mask(
        q_pos, key_offset + k_pos, masking, causal=static.causal, window=static.window,
        batch_ndim=1,
    )  # fmt: skip
    s = masked_logits(
        q_blk,
        k_blk,
        keep,
        bias_blk,
        score_mode=static.score_mode,
        scale=scale,
        concat_score_weight=weight,
        precision=static.precision,
        compute_dtype=q_blk.dtype,
    )  # [B, Bq, Bk]
    if static.tv % block_k:  # only the last block holds padding, but shapes are static
        s = jnp.where((k_pos < static.tv)[None, None, :], s, -jnp.inf)
    return s


# -- which blocks run ---------------------------------------------------------------------


def _band(static: Static, blocks, key_offset, i, n_k: int):
    """Key blocks that ``causal``/``window`` may leave visible to query block i.

    Returns ``(j_lo, j_hi, n_steps)``: blocks ``j_lo <= j <= j_hi`` (traced ints), of which
    at most ``n_steps`` (static) exist.
    """
    block_q, block_k = blocks
    left, right = static.window or (None, None)
    if static.causal:
        right = 0 if right is None else min(right, 0)
    first_q, last_q = i * block_q, (i + 1) * block_q - 1
    j_lo = 0 if left is None else jnp.maximum((first_q - left - key_offset) // block_k, 0)
    j_hi = (
        n_k - 1 if right is None else jnp.minimum((last_q + right - key_offset) // block_k, n_k - 1)
    )
    n_steps = n_k
    if left is not None and right is not None:
        n_steps = min(n_k, -(-(block_q + left + right) // block_k) + 1)
    return j_lo, j_hi, n_steps


def _may_see(cut: _Blocked, i, j):
    """False only when some mask hides every pair of block (i, j) (data-dependent tests;
    positions are handled by :func:`_band`). Python True when nothing is tested."""
    tests = []
    if cut.value_mask is not None:
        tests.append(jnp.any(cut.value_mask[j]))
    if cut.q_segment_range is not None:
        (q_lo, q_hi), (k_lo, k_hi) = cut.q_segment_range[i], cut.kv_segment_range[j]
        tests.append(jnp.any(jnp.maximum(q_lo, k_lo) <= jnp.minimum(q_hi, k_hi)))
    if cut.attention_mask is not None:
        blocks = (cut.q.shape[2], cut.k.shape[2])
        tests.append(jnp.any(_pair_slice(cut.attention_mask, blocks, i, j)))
    return functools.reduce(jnp.logical_and, tests) if tests else True


def _negligible(static: Static, cut: _Blocked, i, k_bound, row_max) -> Array:
    """Whether masked logits bounded by ``q_bound * k_bound + max(bias) - 1e9`` have
    softmax weight exactly 0 in every real row of query block i (``row_max [B, Bq]``)."""
    block_q = cut.q.shape[2]
    top = cut.q_bound[i] * k_bound + cut.bias_max - MASK_PENALTY  # [B, Bq]
    real_row = (i * block_q + jnp.arange(block_q) < static.tq)[None, :]  # [1, Bq]
    return jnp.all(negligible(top, row_max) | ~real_row)


def _maybe(run, fn, carry):
    """``fn(carry)`` where ``run`` (Python True or a traced bool), else ``carry``."""
    if run is True:
        return fn(carry)
    return lax.cond(run, fn, lambda c: c, carry)


def _gated(compute):
    """``compute(j, carry)`` as a step of :func:`_sweep` that runs only where it must."""
    return lambda j, run, carry: _maybe(run, lambda c: compute(j, c), carry)


def _sweep(
    static, blocks, cut, key_offset, i, row_max, compute, carry, *, remat: bool,
    second_pass: bool = True,
):  # fmt: skip
    """Runs ``compute(j, run, carry)`` over every key block j that can contribute to query
    block i, in two passes; ``run`` (Python True or a traced bool) says whether block j
    must be computed (:func:`_gated` makes a step that skips it otherwise).

    Pass 1 walks the band of :func:`_band` and runs the blocks some pair of which is
    visible. Pass 2 runs the rest, each only if :func:`_negligible` cannot prove that its
    masked logits get zero weight (``row_max(carry)`` is the row max so far), so skipping
    is exact under Keras's subtract-1e9 rule. It is itself skipped, in one test, when the
    bound over all keys already proves it: the usual case, since the rows' visible keys
    were seen in pass 1. ``second_pass=False`` leaves it out (for callers that proved it
    unnecessary for every query block beforehand, see :func:`_needs_second_pass`).
    """
    n_k = cut.k.shape[0]
    j_lo, j_hi, n_steps = _band(static, blocks, key_offset, i, n_k)

    def in_first_pass(j):
        in_band = (j >= j_lo) & (j < j_lo + n_steps) & (j <= j_hi)
        see = _may_see(cut, i, j)
        return in_band if see is True else in_band & see

    def first(t, carry):
        j = jnp.minimum(j_lo + t, n_k - 1)
        run = (j_lo + t < n_k) & (j_hi >= j_lo + t)
        see = _may_see(cut, i, j)
        run = run if see is True else run & see
        return compute(j, run, carry)

    def second(j, carry):
        bound = cut.k_bound[j][:, None]  # [B, 1]
        run = ~in_first_pass(j) & ~_negligible(static, cut, i, bound, row_max(carry))
        return compute(j, run, carry)

    def every(j, carry):
        return compute(j, True, carry)

    if remat:
        first, second, every = (
            jax.checkpoint(f, prevent_cse=False) for f in (first, second, every)
        )
    structural = (
        static.causal
        or static.window is not None
        or cut.value_mask is not None
        or cut.attention_mask is not None
        or cut.q_segments is not None
    )
    if not structural:
        return lax.fori_loop(0, n_k, every, carry)
    carry = lax.fori_loop(0, n_steps, first, carry)
    if not second_pass:
        return carry
    done = _negligible(static, cut, i, cut.k_bound_all, row_max(carry))
    return lax.cond(done, lambda c: c, lambda c: lax.fori_loop(0, n_k, second, c), carry)


def _needs_second_pass(static: Static, cut: _Blocked, row_max: Array) -> Array:
    """Whether the second pass of :func:`_sweep` can run for any query block, given the
    rows' final maxima ``row_max [nQ, B, Bq]`` (known to the derivative passes)."""
    done = jax.vmap(lambda i, m: _negligible(static, cut, i, cut.k_bound_all, m))(
        jnp.arange(cut.q.shape[0]), row_max
    )  # [nQ]: the test that ends each query block's sweep, for all blocks at once
    return ~jnp.all(done)


def _at_most_zero(x: Array) -> Array:
    """``x`` with positive entries set to 0, with derivative 1 at 0 (unlike ``minimum``).

    ``s - m <= 0`` in exact arithmetic, but XLA may recompute ``s`` for the ``exp`` with
    another rounding than for the max; at ``|s| ~ 1e13`` one ulp exceeds ``exp``'s range.
    """
    return jnp.where(x > 0, jnp.zeros_like(x), x)


def _finite_shift(row_max: Array) -> Array:
    """The row max, with 0 for rows whose logits so far are all ``-inf`` (a ``-inf``
    bias): ``exp(-inf - -inf)`` is NaN, ``exp(-inf - 0)`` the 0 those weights are."""
    return jnp.where(row_max == -jnp.inf, jnp.zeros((), row_max.dtype), row_max)


def _probabilities(s: Array, row_max: Array, norm: Array) -> Array:
    """Softmax weights ``[B, Bq, Bk]`` of logits ``s`` from the rows' final statistics
    ``[B, Bq]``; 0 (not NaN) in rows that saw only ``-inf`` logits, whose ``norm`` is 0."""
    norm = jnp.where(norm == 0, jnp.ones((), norm.dtype), norm)
    return jnp.exp(_at_most_zero(s - _finite_shift(row_max)[..., None])) / norm[..., None]


def _dropout_scale(static: Static, rng: Array, i, j, shape, dtype) -> Array:
    """Inverted-dropout factors of block (i, j): 0 or ``1 / (1 - rate)``."""
    keep_prob = 1.0 - static.dropout_rate
    key = jax.random.fold_in(jax.random.fold_in(rng, i), j)
    keep = jax.random.bernoulli(key, keep_prob, shape)
    return jnp.where(keep, jnp.asarray(1.0 / keep_prob, dtype), jnp.asarray(0.0, dtype))


def _forward(static: Static, ops: Operands) -> tuple[Array, Array, Array]:
    """Returns ``out [B, Tq, Dv]`` and the row statistics ``m, l [B, Tq]``.

    ``P = exp(S - m) / l``. They are kept apart rather than as ``m + log(l)``: for fully
    masked rows ``m`` is near -1e9, where float32 spacing (64) would swallow ``log(l)``.
    """
    blocks = static.forward_blocks
    cut = _cut(static, ops, blocks)
    dtype = ops.q.dtype
    dv = ops.v.shape[-1]

    def query_block(args):
        i, q_blk = args
        shape = q_blk.shape[:-1]  # [B, Bq]
        init = (
            jnp.full(shape, -jnp.inf, dtype),  # running max m
            jnp.zeros(shape, dtype),  # running normaliser l
            jnp.zeros(shape + (dv,), dtype),  # running weighted sum
        )

        def compute(j, carry):
            m, norm, acc = carry
            s = _block_logits(
                static, blocks, cut, ops.key_offset, q_blk, cut.k[j],
                _bias_block(static, cut.bias, blocks, i, j), ops.scale,
                ops.concat_score_weight, i, j,
            )  # fmt: skip
            m_new = jnp.maximum(m, s.max(-1))  # [B, Bq]
            shift = _finite_shift(m_new)  # a row that has seen only -inf logits so far
            alpha = jnp.exp(m - shift)  # [B, Bq]
            p = jnp.exp(_at_most_zero(s - shift[..., None]))  # [B, Bq, Bk]
            norm = norm * alpha + p.sum(-1)
            if static.dropout_rate > 0.0:
                p = p * _dropout_scale(static, ops.rng, i, j, p.shape, dtype)
            pv = jnp.einsum("bqk,bkd->bqd", p, cut.v[j], precision=static.precision)
            return m_new, norm, acc * alpha[..., None] + pv  # [B, Bq, Dv]

        m, norm, acc = _sweep(
            static, blocks, cut, ops.key_offset, i, lambda c: c[0], _gated(compute), init,
            remat=False,
        )  # fmt: skip
        # Rows that saw only -inf logits (norm 0) get 0 here, a finite residual for the
        # derivative passes and the sharded merge; chunked_attention reports them as NaN.
        safe = jnp.where(norm > 0, norm, jnp.ones((), dtype))
        return acc / safe[..., None], m, norm

    out, m, norm = lax.map(query_block, (jnp.arange(cut.q.shape[0]), cut.q))
    return _from_blocks(out, static.tq), _from_blocks(m, static.tq), _from_blocks(norm, static.tq)


def _tangent_blocks(static, ops, tangents, out, m, norm) -> tuple[Array, Array]:
    """The JVP of the output and of ``log l``, blockwise; linear in ``tangents``.

    Args:
      tangents: ``(dq, dk, dv, dbias, dscale, dconcat_score_weight)``, None when zero.
      out, m, norm: the forward's output ``[B, Tq, Dv]`` and statistics ``[B, Tq]``.

    Returns:
      ``(d_out [B, Tq, Dv], c [B, Tq])``, ``c`` being the tangent of ``log l``.
    """
    dq, dk, dv, dbias, dscale, dcw = tangents
    scores_move = any(t is not None for t in (dq, dk, dbias, dscale, dcw))
    # Dropout is drawn per forward block, so the derivative pass must use those blocks.
    blocks = static.forward_blocks if static.dropout_rate > 0.0 else static.backward_blocks
    block_q, block_k = blocks
    cut = _cut(static, ops, blocks)
    dtype = ops.q.dtype
    dqb = None if dq is None else _to_blocks(dq, block_q)  # [nQ, B, Bq, D]
    dkb = None if dk is None else _to_blocks(dk, block_k)  # [nK, B, Bk, D]
    dvb = None if dv is None else _to_blocks(dv, block_k)  # [nK, B, Bk, Dv]
    dbias = _pad_pairs(dbias, blocks)  # [..., nQ*Bq, nK*Bk]
    # Padded query rows get m = +inf, l = 1, so that their P is exactly 0.
    mb = _to_blocks(m, block_q, fill=jnp.inf)  # [nQ, B, Bq]
    nb = _to_blocks(norm, block_q, fill=1)  # [nQ, B, Bq]
    ob = _to_blocks(out, block_q)  # [nQ, B, Bq, Dv]

    def query_block(args):
        i, q_blk, m_blk, n_blk, o_blk, dq_blk = args

        def compute(j, carry):
            acc, c = carry

            def scores(q_, k_, bias, scale, weight):
                return _block_logits(
                    static, blocks, cut, ops.key_offset, q_, k_, bias, scale, weight, i, j
                )

            bias_blk = _bias_block(static, cut.bias, blocks, i, j)
            primals = (q_blk, cut.k[j], bias_blk, ops.scale, ops.concat_score_weight)
            if scores_move:
                dbias_blk = _bias_block(static, dbias, blocks, i, j)
                tans = (dq_blk, None if dkb is None else dkb[j], dbias_blk, dscale, dcw)
                tans = tuple(
                    jax.tree.map(jnp.zeros_like, p) if t is None else t
                    for p, t in zip(primals, tans, strict=True)
                )
                s, ds = jax.jvp(scores, primals, tans)  # [B, Bq, Bk] each
            else:
                s = scores(*primals)
            p = _probabilities(s, m_blk, n_blk)
            drop = None
            if static.dropout_rate > 0.0:
                drop = _dropout_scale(static, ops.rng, i, j, p.shape, dtype)
            if scores_move:
                pds = p * ds  # [B, Bq, Bk]
                c = c + pds.sum(-1)
                pds = pds if drop is None else pds * drop
                acc = acc + jnp.einsum("bqk,bkd->bqd", pds, cut.v[j], precision=static.precision)
            if dvb is not None:
                pd = p if drop is None else p * drop
                acc = acc + jnp.einsum("bqk,bkd->bqd", pd, dvb[j], precision=static.precision)
            return acc, c

        init = (jnp.zeros(o_blk.shape, dtype), jnp.zeros(m_blk.shape, dtype))
        # Rematerialised (remat): reverse mode recomputes each block's P, never stores it.
        acc, c = _sweep(
            static, blocks, cut, ops.key_offset, i, lambda _: m_blk, _gated(compute), init,
            remat=True,
        )  # fmt: skip
        return acc - c[..., None] * o_blk, c

    xs = (jnp.arange(cut.q.shape[0]), cut.q, mb, nb, ob, dqb)  # dqb may be None
    # Each query block is rematerialised as a whole too, so that reverse mode stores only
    # its inputs (the skipping decisions of pass 2 would otherwise be kept per block).
    d_out, c = lax.map(jax.checkpoint(query_block, prevent_cse=False), xs)
    return _from_blocks(d_out, static.tq), _from_blocks(c, static.tq)


def _add_at(x: Array, j, y: Array) -> Array:
    """``x.at[j].add(y)`` as a slice update (``.at[].add`` is a scatter, not in place)."""
    return lax.dynamic_update_index_in_dim(x, x[j] + y, j, axis=0)


def _unbroadcast(x: Array, shape: tuple[int, ...]) -> Array:
    """Sums ``x`` over the dims that broadcasting ``shape`` to ``x.shape`` added."""
    lead = x.ndim - len(shape)
    x = x.sum(tuple(range(lead))) if lead else x
    dims = tuple(a for a, n in enumerate(shape) if n == 1 and x.shape[a] != 1)
    return x.sum(dims, keepdims=True) if dims else x


def _transpose_blocks(static, ops, present, out, m, norm, ct_out, ct_c) -> tuple:
    """The transpose of :func:`_tangent_blocks` (reverse mode), written by hand.

    With ``g = ct_out`` and ``delta = ct_c - sum(g * out)`` per row, block (i, j) gives
    ``ct_dv_j += (P * drop)^T g_i`` and ``ct_dS = P * (drop * g_i v_j^T + delta_i)``, which
    the logits' VJP turns into the query, key, bias and scalar cotangents. Query blocks
    are walked as in the forward (same band, same exact skipping); key-side cotangents
    accumulate in place, so the pass needs O(T) memory and no ``[T, T]`` work beyond the
    visited blocks.

    Returns:
      ``(ct_dq, ct_dk, ct_dv, ct_dbias, ct_dscale, ct_dcw)``, None where ``present`` is
      False; shapes as the tangents of :func:`_tangent_blocks`.
    """
    has_q, has_k, has_v, has_bias, has_scale, has_w = present
    want = (has_q, has_k, has_bias, has_scale, has_w)  # the logits' arguments
    scores_move = any(want)
    blocks = static.forward_blocks if static.dropout_rate > 0.0 else static.backward_blocks
    block_q = blocks[0]
    cut = _cut(static, ops, blocks)
    dtype = ops.q.dtype
    mb = _to_blocks(m, block_q, fill=jnp.inf)  # [nQ, B, Bq]
    nb = _to_blocks(norm, block_q, fill=1)  # [nQ, B, Bq]
    gb = _to_blocks(ct_out.astype(dtype), block_q)  # [nQ, B, Bq, Dv]
    delta = ct_c.astype(dtype) - jnp.sum(ct_out * out, axis=-1, dtype=dtype)  # [B, Tq]
    deltab = _to_blocks(delta, block_q)  # [nQ, B, Bq]
    zero = jnp.zeros((), dtype)
    keyside = (  # accumulated in place over all query blocks
        jnp.zeros_like(cut.k) if has_k else None,  # [nK, B, Bk, D]
        jnp.zeros_like(cut.v) if has_v else None,  # [nK, B, Bk, Dv]
        jnp.zeros_like(cut.bias) if has_bias else None,  # padded [..., nQ*Bq, nK*Bk]
        zero if has_scale else None,
        zero if has_w else None,
    )

    def query_block(second_pass, keyside, xs):
        i, q_blk, m_blk, n_blk, g_blk, d_blk = xs

        def contributions(j):
            bias_blk = _bias_block(static, cut.bias, blocks, i, j)
            args = (q_blk, cut.k[j], bias_blk, ops.scale, ops.concat_score_weight)

            def scores(*moving):
                it = iter(moving)
                full = [next(it) if w else a for a, w in zip(args, want, strict=True)]
                return _block_logits(static, blocks, cut, ops.key_offset, *full, i, j)

            moving = [a for a, w in zip(args, want, strict=True) if w]
            s, pull = jax.vjp(scores, *moving) if scores_move else (scores(), None)
            p = _probabilities(s, m_blk, n_blk)  # [B, Bq, Bk]
            drop = None
            if static.dropout_rate > 0.0:
                drop = _dropout_scale(static, ops.rng, i, j, p.shape, dtype)
            ct_v = None
            if has_v:
                pd = p if drop is None else p * drop
                ct_v = jnp.einsum("bqk,bqd->bkd", pd, g_blk, precision=static.precision)
            cts = [None] * 5
            if scores_move:
                gv = jnp.einsum("bqd,bkd->bqk", g_blk, cut.v[j], precision=static.precision)
                gv = gv if drop is None else gv * drop
                it = iter(pull(p * (gv + d_blk[..., None])))
                cts = [next(it) if w else None for w in want]
            ct_q, ct_k, ct_bias, ct_scale, ct_w = cts
            if ct_bias is not None:
                ct_bias = _unbroadcast(
                    ct_bias.reshape(static.batch + blocks),
                    cut.bias.shape[:-2] + _pair_extent(cut.bias, blocks),
                )
            return ct_q, (ct_k, ct_v, ct_bias, ct_scale, ct_w)

        def compute(j, run, carry):
            ct_q, keyside = carry
            step = jax.checkpoint(contributions, prevent_cse=False)
            if run is True:
                new_q, new = step(j)
            else:
                shapes = jax.eval_shape(step, j)
                new_q, new = lax.cond(
                    run,
                    step,
                    lambda _: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes),
                    j,
                )
            ct_k, ct_v, ct_bias, ct_scale, ct_w = keyside
            if ct_k is not None:
                ct_k = _add_at(ct_k, j, new[0])
            if ct_v is not None:
                ct_v = _add_at(ct_v, j, new[1])
            if ct_bias is not None:
                ct_bias = _pair_add(ct_bias, blocks, i, j, new[2])
            ct_scale = None if ct_scale is None else ct_scale + new[3]
            ct_w = None if ct_w is None else ct_w + new[4]
            ct_q = None if ct_q is None else ct_q + new_q
            return ct_q, (ct_k, ct_v, ct_bias, ct_scale, ct_w)

        init = (jnp.zeros_like(q_blk) if has_q else None, keyside)
        ct_q, keyside = _sweep(
            static, blocks, cut, ops.key_offset, i, lambda _: m_blk, compute, init,
            remat=False, second_pass=second_pass,
        )  # fmt: skip
        return keyside, ct_q

    xs = (jnp.arange(cut.q.shape[0]), cut.q, mb, nb, gb, deltab)

    # Decided once for all query blocks (the rows' maxima are known): a test per query
    # block would put the key-side accumulators through a conditional, copying them.
    keyside, ct_q = lax.cond(
        _needs_second_pass(static, cut, mb),
        lambda: lax.scan(functools.partial(query_block, True), keyside, xs),
        lambda: lax.scan(functools.partial(query_block, False), keyside, xs),
    )
    ct_k, ct_v, ct_bias, ct_scale, ct_w = keyside
    return (
        None if ct_q is None else _from_blocks(ct_q, static.tq),
        None if ct_k is None else _from_blocks(ct_k, static.tv),
        None if ct_v is None else _from_blocks(ct_v, static.tv),
        None if ct_bias is None else ct_bias[..., : ops.bias.shape[-2], : ops.bias.shape[-1]],
        ct_scale,
        ct_w,
    )


# -- under jax.vmap: the mapped axis joins the batch ---------------------------------------


def _foldable(batched: Operands) -> bool:
    """Whether a vmapped axis can join the batch: the scalars and the key must be shared."""
    shared = (batched.key_offset, batched.scale, batched.concat_score_weight, batched.rng)
    return not any(jax.tree.leaves(shared))


def _fold_rows(x: Array | None, batched: bool | None, n: int) -> Array | None:
    """``[n, B, ...]`` (or ``[B, ...]`` shared by the n) -> ``[n * B, ...]``."""
    if x is None:
        return None
    x = x if batched else jnp.broadcast_to(x, (n,) + x.shape)
    return x.reshape((n * x.shape[1],) + x.shape[2:])


def _unfold_rows(x: Array | None, n: int) -> Array | None:
    return None if x is None else x.reshape((n, x.shape[0] // n) + x.shape[1:])


def _fold_pairs(static: Static, x: Array | None, batched: bool | None, n: int) -> Array | None:
    """A broadcastable ``[..., Tq, Tv]`` array for the batch ``(n,) + static.batch``."""
    if x is None or not batched:
        return x  # broadcasts along the new leading batch dim by itself
    lacking = len(static.batch) + 2 - (x.ndim - 1)
    return x.reshape(x.shape[:1] + (1,) * lacking + x.shape[1:])


def _fold_residuals(static, residuals, batched, n, bias_moves: bool):
    """Folds ``(ops, out, m, norm)``; None when the mapped axis cannot join the batch."""
    ops, out, m, norm = residuals
    ops_b, out_b, m_b, norm_b = batched
    if not _foldable(ops_b):
        return None
    if bias_moves and ops.bias is not None and not ops_b.bias:
        # Its cotangent must come out per mapped element.
        ops = ops._replace(bias=jnp.broadcast_to(ops.bias, (n,) + ops.bias.shape))
        ops_b = ops_b._replace(bias=True)
    folded = Static(**{**static._asdict(), "batch": (n,) + static.batch})
    rows = functools.partial(_fold_rows, n=n)
    masking, masking_b = ops.masking, ops_b.masking
    ops = ops._replace(
        q=rows(ops.q, ops_b.q),
        k=rows(ops.k, ops_b.k),
        v=rows(ops.v, ops_b.v),
        masking=Masking(
            value_mask=rows(masking.value_mask, masking_b.value_mask),
            attention_mask=_fold_pairs(static, masking.attention_mask, masking_b.attention_mask, n),
            query_segment_ids=rows(masking.query_segment_ids, masking_b.query_segment_ids),
            kv_segment_ids=rows(masking.kv_segment_ids, masking_b.kv_segment_ids),
        ),
        bias=_fold_pairs(static, ops.bias, ops_b.bias, n),
    )
    residuals = (ops, rows(out, out_b), rows(m, m_b), rows(norm, norm_b))
    return folded, residuals


def _bias_shape(residuals, batched) -> tuple[int, ...] | None:
    """The per-element shape of the bias (that of its tangent), or None."""
    bias, bias_b = residuals[0].bias, batched[0].bias
    return None if bias is None else bias.shape[1:] if bias_b else bias.shape


@dataclasses.dataclass(frozen=True)
class _TangentMap:
    """:func:`_tangent_blocks` as a hashable map ``(residuals, tangents) -> (d_out, c)``."""

    static: Static

    def __call__(self, residuals, tangents):
        ops, out, m, norm = residuals
        return _tangent_blocks(self.static, ops, tangents, out, m, norm)

    def fold(self, n, residuals, batched, tangents):
        """The map for a vmapped axis of size ``n`` joined to the batch (linear_map's
        batching protocol; the tangents are mapped along axis 0)."""
        dq, dk, dv, dbias, dscale, dcw = tangents
        if dscale is not None or dcw is not None:
            return None  # per-element tangents of the scalars: leave it to jax.vmap
        got = _fold_residuals(self.static, residuals, batched, n, dbias is not None)
        if got is None:
            return None
        static, residuals = got
        rows = functools.partial(_fold_rows, batched=True, n=n)
        tangents = (rows(dq), rows(dk), rows(dv), _fold_pairs(self.static, dbias, True, n))
        tangents += (None, None)
        present = tuple(t is not None for t in tangents)

        def unfold(outputs):
            return tuple(_unfold_rows(x, n) for x in outputs)

        return _TangentMap(static), _TransposeMap(static, present), residuals, tangents, unfold


@dataclasses.dataclass(frozen=True)
class _TransposeMap:
    """:func:`_transpose_blocks` as a hashable map ``(residuals, cts) -> tangent cts``."""

    static: Static
    present: tuple[bool, ...]

    def __call__(self, residuals, cts):
        ops, out, m, norm = residuals
        return _transpose_blocks(self.static, ops, self.present, out, m, norm, *cts)

    def fold(self, n, residuals, batched, cts):
        """As :meth:`_TangentMap.fold`, for the transpose."""
        if self.present[4] or self.present[5]:
            return None  # per-element cotangents of the scalars: leave it to jax.vmap
        bias_shape = _bias_shape(residuals, batched)
        got = _fold_residuals(self.static, residuals, batched, n, self.present[3])
        if got is None:
            return None
        static, residuals = got
        cts = tuple(_fold_rows(x, True, n) for x in cts)

        def unfold(outputs):
            ct_dq, ct_dk, ct_dv, ct_dbias, _, _ = outputs
            if ct_dbias is not None:
                ct_dbias = ct_dbias.reshape((n,) + bias_shape)
            rows = (_unfold_rows(x, n) for x in (ct_dq, ct_dk, ct_dv))
            return (*rows, ct_dbias, None, None)

        return (_TransposeMap(static, self.present), _TangentMap(static), residuals, cts, unfold)


def _tangent(static, ops, tangents, out, m, norm) -> tuple[Array, Array]:
    """:func:`_tangent_blocks` (same arguments and results), transposed by
    :func:`_transpose_blocks` in reverse mode."""
    present = tuple(t is not None for t in tangents)
    return linear_map(
        _TangentMap(static), _TransposeMap(static, present), (ops, out, m, norm), tangents
    )


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _attend(static: Static, ops: Operands) -> tuple[Array, Array, Array]:
    """``(out [B, Tq, Dv], m [B, Tq], l [B, Tq])``; see :func:`_forward`."""
    return _batching_forward(static)(ops)


@functools.cache
def _batching_forward(static: Static):
    """:func:`_forward` for ``static``, which under ``jax.vmap`` takes the mapped axis into
    its batch (one kernel over ``n * B`` rows) instead of being vectorised op by op, where
    data-dependent skipping tests would turn into selects that run every block.

    Only ever evaluated, never differentiated: :func:`_attend`'s JVP rule does that.
    """

    @jax.custom_batching.custom_vmap
    def forward(ops: Operands):
        return _forward(static, ops)

    @forward.def_vmap
    def _(n, in_batched, ops):
        (batched,) = in_batched
        residuals = (ops, None, None, None)
        got = _fold_residuals(static, residuals, (batched, None, None, None), n, False)
        if got is None:  # per-element scalars or dropout keys
            axes = jax.tree.map(lambda b: 0 if b else None, batched)
            out = jax.vmap(functools.partial(_forward, static), in_axes=(axes,))(ops)
        else:
            folded, (ops, *_) = got
            out = tuple(_unfold_rows(x, n) for x in _batching_forward(folded)(ops))
        return out, (True, True, True)

    return forward


def attend_jvp(static: Static, primals, tangents):
    """The JVP rule of :func:`_attend` (also used by the dispatcher's hybrid path).

    ``m`` is treated as a constant shift (tangent 0), so ``l`` carries the whole
    derivative of the log-sum-exp ``m + log l``; ``out`` is exact.
    """
    (ops,), (t_ops,) = primals, tangents
    out, m, norm = _attend(static, ops)
    tangents = (t_ops.q, t_ops.k, t_ops.v, t_ops.bias, t_ops.scale, t_ops.concat_score_weight)
    tangents = tuple(None if isinstance(t, SymbolicZero) else t for t in tangents)
    if all(t is None for t in tangents):
        zeros = tuple(jnp.zeros_like(x) for x in (out, m, norm))
        return (out, m, norm), zeros
    d_out, c = _tangent(static, ops, tangents, out, m, norm)
    return (out, m, norm), (d_out, jnp.zeros_like(m), norm * c)


_attend.defjvp(attend_jvp, symbolic_zeros=True)
#: Jitted, so that eager calls reuse the compiled kernel instead of re-tracing it.
_attend_jit = jax.jit(_attend, static_argnums=0)


def prepare(
    query: Array,
    key: Array,
    value: Array,
    masking: Masking,
    bias: Array | None,
    scale: Array | None,
    concat_score_weight: Array | None,
    *,
    score_mode: str,
    causal: bool,
    window: tuple[int | None, int | None] | None = None,
    dropout_rate: float,
    dropout_rng: Array | None,
    block_sizes: BlockSizes | None,
    precision: Any,
    compute_dtype: Any,
    key_offset: int | Array = 0,
) -> tuple[Static, Operands]:
    """Flattens the batch, casts to ``compute_dtype`` and fixes the static settings."""
    batch = query.shape[:-2]
    tq, d = query.shape[-2:]
    tv, dv = value.shape[-2:]
    b = math.prod(batch)
    blocks = block_sizes or BlockSizes.default(score_mode, window, causal)
    cdt = jnp.dtype(compute_dtype)
    static = Static(
        score_mode=score_mode,
        causal=causal,
        window=window,
        dropout_rate=float(dropout_rate),
        batch=tuple(batch),
        tq=tq,
        tv=tv,
        forward_blocks=_clip(blocks.forward, tq, tv),
        backward_blocks=_clip(blocks.backward, tq, tv),
        precision=precision,
    )

    def flat(x: Array | None, t: int) -> Array | None:
        return None if x is None else x.reshape(b, t)

    ops = Operands(
        q=query.astype(cdt).reshape(b, tq, d),
        k=key.astype(cdt).reshape(b, tv, d),
        v=value.astype(cdt).reshape(b, tv, dv),
        masking=Masking(
            value_mask=flat(masking.value_mask, tv),
            attention_mask=masking.attention_mask,
            query_segment_ids=flat(masking.query_segment_ids, tq),
            kv_segment_ids=flat(masking.kv_segment_ids, tv),
        ),
        bias=None if bias is None else bias.astype(cdt),
        key_offset=jnp.asarray(key_offset, jnp.int32),
        scale=None if scale is None else scale.astype(cdt),
        concat_score_weight=None
        if concat_score_weight is None
        else concat_score_weight.astype(cdt),
        rng=dropout_rng if dropout_rate > 0.0 else None,
    )
    return static, ops


def chunked_attention(
    query: Array,
    key: Array,
    value: Array,
    masking: Masking,
    bias: Array | None,
    scale: Array | None,
    concat_score_weight: Array | None,
    *,
    with_stats: bool = False,
    **options: Any,
) -> Array | tuple[Array, tuple[Array, Array]]:
    """Blockwise attention with Keras semantics, before the query mask.

    Args:
      query: ``[..., Tq, D]``.
      key: ``[..., Tv, D]``.
      value: ``[..., Tv, Dv]``.
      masking: value mask ``[..., Tv]``, full mask (broadcastable ``[..., Tq, Tv]``) and
        segment ids ``[..., Tq]`` / ``[..., Tv]``, each None when absent.
      bias: float, broadcastable ``[..., Tq, Tv]`` (same rank), or None.
      scale: scalar ``[]`` or None.
      concat_score_weight: scalar ``[]`` (concat mode) or None.
      with_stats: also return the softmax statistics of each row.
      **options: the keyword arguments of :func:`prepare`: ``score_mode``, ``causal``,
        ``window``, ``dropout_rate`` (the random pattern depends on the blocks),
        ``dropout_rng``, ``block_sizes`` (None: :meth:`BlockSizes.default`),
        ``precision``, ``compute_dtype`` (of the whole computation: float32 for 16-bit
        inputs) and ``key_offset`` (global position of the first key, for a shard of a
        longer sequence; may be traced).

    Returns:
      ``[..., Tq, Dv]`` in ``compute_dtype``; with ``with_stats``, also ``(m, log_l)``,
      each ``[..., Tq]``, the row max and log-normaliser: the row's log-sum-exp is
      ``m + log_l``. ``m`` carries no derivative; ``log_l`` carries that of the whole
      log-sum-exp, so use them as ``stop_gradient(m) + log_l``. Empty dimensions give
      zeros (``m = -inf``, ``log_l = -inf`` for rows without keys), as the materialised
      path does.
    """
    batch, tq, tv, dv = query.shape[:-2], query.shape[-2], key.shape[-2], value.shape[-1]
    cdt = jnp.dtype(options["compute_dtype"])
    if 0 in (math.prod(batch), tq, tv, dv):
        out = jnp.zeros(batch + (tq, dv), cdt)
        stats = (jnp.full(batch + (tq,), -jnp.inf, cdt),) * 2
        return (out, stats) if with_stats else out
    static, ops = prepare(query, key, value, masking, bias, scale, concat_score_weight, **options)
    # Eager calls go through the jitted kernel (compiled once per shape); traced calls
    # inline the kernel into the caller's trace.
    traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(ops))
    out, m, norm = (_attend if traced else _attend_jit)(static, ops)
    if not with_stats:
        # A row whose every logit is -inf (a -inf bias) has no softmax: NaN, as the
        # materialised path and jax.nn give.
        out = jnp.where(norm[..., None] > 0, out, jnp.full((), jnp.nan, out.dtype))
        return out.reshape(batch + (tq, dv))  # [..., Tq, Dv]
    out = out.reshape(batch + (tq, dv))
    # log(0) = -inf for rows that saw only -inf logits, with a zero (not NaN) derivative.
    seen = norm > 0
    log_l = jnp.where(seen, jnp.log(jnp.where(seen, norm, 1)), -jnp.inf)
    return out, (m.reshape(batch + (tq,)), log_l.reshape(batch + (tq,)))


def _clip(blocks: tuple[int, int], tq: int, tv: int) -> tuple[int, int]:
    return max(1, min(blocks[0], tq)), max(1, min(blocks[1], tv))
