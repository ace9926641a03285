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

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

from flax_dotattn._src.blocks import BlockSizes
from flax_dotattn._src.masks import MASK_PENALTY, keep_mask
from flax_dotattn._src.scores import masked_logits
from flax_dotattn._src.types import Array


class Static(NamedTuple):
    """Static (hashable) settings of one chunked call."""

    score_mode: str
    causal: bool
    dropout_rate: float
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
    value_mask: Array | None  # bool [B, Tv]
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
    return x.reshape((x.shape[0], -1) + x.shape[3:])[:, :length]


def _underflow_gap(dtype: Any) -> float:
    """A gap ``g`` such that ``exp(x)`` is exactly 0 in ``dtype`` for every ``x < -g``."""
    return float(-np.log(np.finfo(jnp.dtype(dtype)).smallest_subnormal)) + 1.0


class _Blocked(NamedTuple):
    """The operands cut into blocks of one pass."""

    q: Array  # [nQ, B, Bq, D]
    k: Array  # [nK, B, Bk, D]
    v: Array  # [nK, B, Bk, Dv]
    value_mask: Array | None  # [nK, B, Bk]
    q_bound: Array  # [nQ, B, Bq]: bound of |s| per query row, divided by the key bound
    k_bound: Array  # [nK, B]: the key factor of that bound


def logit_bounds(static: Static, ops: Operands) -> tuple[Array, Array]:
    """``(q_bound [B, Tq], k_bound [B, Tv])`` with ``|s_ij| <= q_bound_i * k_bound_j``."""
    q, k = ops.q, ops.k
    if static.score_mode == "dot":
        scale = 1.0 if ops.scale is None else jnp.abs(ops.scale)
        return scale * jnp.linalg.norm(q, axis=-1), jnp.linalg.norm(k, axis=-1)
    # |w * sum(tanh)| <= |w| * D
    q_bound = jnp.broadcast_to(jnp.abs(ops.concat_score_weight) * q.shape[-1], q.shape[:2])
    return q_bound, jnp.ones(k.shape[:2], k.dtype)


def negligible(top: Array, row_max: Array) -> Array:
    """Whether logits at most ``top`` get softmax weight exactly 0 next to ``row_max``.

    False for NaN or -inf maxima.
    """
    slack = _underflow_gap(row_max.dtype) + 1e-4 * (jnp.abs(top) + jnp.abs(row_max))
    return top + slack < row_max


def _cut(static: Static, ops: Operands, blocks: tuple[int, int]) -> _Blocked:
    block_q, block_k = blocks
    q_bound, k_bound = logit_bounds(static, ops)  # [B, Tq], [B, Tv]
    return _Blocked(
        q=_to_blocks(ops.q, block_q),
        k=_to_blocks(ops.k, block_k),
        v=_to_blocks(ops.v, block_k),
        value_mask=None
        if ops.value_mask is None
        else _to_blocks(ops.value_mask, block_k, fill=False),
        q_bound=_to_blocks(q_bound, block_q),
        k_bound=_to_blocks(k_bound, block_k).max(-1),
    )


def _block_logits(static, blocks, key_offset, q_blk, k_blk, mask_blk, scale, weight, i, j) -> Array:
    """Masked logits ``[B, Bq, Bk]`` of block (i, j); padded keys get ``-inf``."""
    block_q, block_k = blocks
    q_pos = i * block_q + jnp.arange(block_q)  # [Bq]
    k_pos = j * block_k + jnp.arange(block_k)  # [Bk], local to this call's keys
    keep = keep_mask(q_pos, key_offset + k_pos, mask_blk, static.causal, batch_ndim=1)
    s = masked_logits(
        q_blk,
        k_blk,
        keep,
        score_mode=static.score_mode,
        scale=scale,
        concat_score_weight=weight,
        precision=static.precision,
        compute_dtype=q_blk.dtype,
    )  # [B, Bq, Bk]
    if static.tv % block_k:  # only the last block holds padding, but shapes are static
        s = jnp.where((k_pos < static.tv)[None, None, :], s, -jnp.inf)
    return s


def _run_block(static, blocks, ops, bounds, i, j, row_max, compute, carry):
    """``compute(carry)`` unless block (i, j) provably cannot contribute.

    A block can be skipped only when its every pair is masked by structure (``causal``:
    all its keys lie in the future of all its queries) *and* its masked logits, at most
    ``bound - 1e9``, are so far below every row's max so far (``row_max [B, Bq]``) that
    their softmax weights are exactly 0 in the compute dtype.
    """
    if not static.causal:
        return compute(carry)
    block_q, block_k = blocks
    all_future = ops.key_offset + j * block_k > (i + 1) * block_q - 1
    q_bound, k_bound = bounds  # [B, Bq], [B]
    top = q_bound * k_bound[:, None] - MASK_PENALTY  # [B, Bq], an upper bound of the logits
    real_row = (i * block_q + jnp.arange(block_q) < static.tq)[None, :]  # [1, Bq]
    skip = jnp.logical_and(all_future, jnp.all(negligible(top, row_max) | ~real_row))
    return lax.cond(skip, lambda c: c, compute, carry)


def _at_most_zero(x: Array) -> Array:
    """``x`` with positive entries set to 0, with derivative 1 at 0 (unlike ``minimum``).

    ``s - m <= 0`` in exact arithmetic, but XLA may recompute ``s`` for the ``exp`` with
    another rounding than for the max; at ``|s| ~ 1e13`` one ulp exceeds ``exp``'s range.
    """
    return jnp.where(x > 0, jnp.zeros_like(x), x)


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
        i, q_blk, q_bound = args
        shape = q_blk.shape[:-1]  # [B, Bq]
        init = (
            jnp.full(shape, -jnp.inf, dtype),  # running max m
            jnp.zeros(shape, dtype),  # running normaliser l
            jnp.zeros(shape + (dv,), dtype),  # running weighted sum
        )

        def key_block(j, carry):
            def compute(carry):
                m, norm, acc = carry
                mask_blk = None if cut.value_mask is None else cut.value_mask[j]
                s = _block_logits(
                    static,
                    blocks,
                    ops.key_offset,
                    q_blk,
                    cut.k[j],
                    mask_blk,
                    ops.scale,
                    ops.concat_score_weight,
                    i,
                    j,
                )  # [B, Bq, Bk]
                m_new = jnp.maximum(m, s.max(-1))  # [B, Bq]
                alpha = jnp.exp(m - m_new)  # [B, Bq]
                p = jnp.exp(_at_most_zero(s - m_new[..., None]))  # [B, Bq, Bk]
                norm = norm * alpha + p.sum(-1)
                if static.dropout_rate > 0.0:
                    p = p * _dropout_scale(static, ops.rng, i, j, p.shape, dtype)
                pv = jnp.einsum("bqk,bkd->bqd", p, cut.v[j], precision=static.precision)
                return m_new, norm, acc * alpha[..., None] + pv  # [B, Bq, Dv]

            bounds = (q_bound, cut.k_bound[j])
            return _run_block(static, blocks, ops, bounds, i, j, carry[0], compute, carry)

        m, norm, acc = lax.fori_loop(0, cut.k.shape[0], key_block, init)
        return acc / norm[..., None], m, norm

    out, m, norm = lax.map(query_block, (jnp.arange(cut.q.shape[0]), cut.q, cut.q_bound))
    return _from_blocks(out, static.tq), _from_blocks(m, static.tq), _from_blocks(norm, static.tq)


def _tangent(static, ops, tangents, out, m, norm) -> tuple[Array, Array]:
    """The JVP of the output and of ``log l``, blockwise; linear in ``tangents``.

    Args:
      tangents: ``(dq, dk, dv, dscale, dconcat_score_weight)``, each None when zero.
      out, m, norm: the forward's output ``[B, Tq, Dv]`` and statistics ``[B, Tq]``.

    Returns:
      ``(d_out [B, Tq, Dv], c [B, Tq])``, ``c`` being the tangent of ``log l``.
    """
    dq, dk, dv, dscale, dcw = tangents
    scores_move = any(t is not None for t in (dq, dk, dscale, dcw))
    # Dropout is drawn per forward block, so the derivative pass must use those blocks.
    blocks = static.forward_blocks if static.dropout_rate > 0.0 else static.backward_blocks
    block_q, block_k = blocks
    cut = _cut(static, ops, blocks)
    dtype = ops.q.dtype
    dqb = None if dq is None else _to_blocks(dq, block_q)  # [nQ, B, Bq, D]
    dkb = None if dk is None else _to_blocks(dk, block_k)  # [nK, B, Bk, D]
    dvb = None if dv is None else _to_blocks(dv, block_k)  # [nK, B, Bk, Dv]
    # Padded query rows get m = +inf, l = 1, so that their P is exactly 0.
    mb = _to_blocks(m, block_q, fill=jnp.inf)  # [nQ, B, Bq]
    nb = _to_blocks(norm, block_q, fill=1)  # [nQ, B, Bq]
    ob = _to_blocks(out, block_q)  # [nQ, B, Bq, Dv]

    def query_block(args):
        i, q_blk, q_bound, m_blk, n_blk, o_blk, dq_blk = args

        def key_block(j, carry):
            def compute(carry):
                acc, c = carry
                mask_blk = None if cut.value_mask is None else cut.value_mask[j]

                def scores(q_, k_, scale, weight):
                    return _block_logits(
                        static, blocks, ops.key_offset, q_, k_, mask_blk, scale, weight, i, j
                    )

                primals = (q_blk, cut.k[j], ops.scale, ops.concat_score_weight)
                if scores_move:
                    tans = (dq_blk, None if dkb is None else dkb[j], dscale, dcw)
                    tans = tuple(
                        jax.tree.map(jnp.zeros_like, p) if t is None else t
                        for p, t in zip(primals, tans, strict=True)
                    )
                    s, ds = jax.jvp(scores, primals, tans)  # [B, Bq, Bk] each
                else:
                    s = scores(*primals)
                p = jnp.exp(_at_most_zero(s - m_blk[..., None])) / n_blk[..., None]
                drop = None
                if static.dropout_rate > 0.0:
                    drop = _dropout_scale(static, ops.rng, i, j, p.shape, dtype)
                if scores_move:
                    pds = p * ds  # [B, Bq, Bk]
                    c = c + pds.sum(-1)
                    pds = pds if drop is None else pds * drop
                    acc = acc + jnp.einsum(
                        "bqk,bkd->bqd", pds, cut.v[j], precision=static.precision
                    )
                if dvb is not None:
                    pd = p if drop is None else p * drop
                    acc = acc + jnp.einsum("bqk,bkd->bqd", pd, dvb[j], precision=static.precision)
                return acc, c

            bounds = (q_bound, cut.k_bound[j])
            return _run_block(static, blocks, ops, bounds, i, j, m_blk, compute, carry)

        # Rematerialised: reverse mode recomputes each block's P instead of storing it.
        key_block = jax.checkpoint(key_block, prevent_cse=False)

        init = (jnp.zeros(o_blk.shape, dtype), jnp.zeros(m_blk.shape, dtype))
        acc, c = lax.fori_loop(0, cut.k.shape[0], key_block, init)
        return acc - c[..., None] * o_blk, c

    xs = (jnp.arange(cut.q.shape[0]), cut.q, cut.q_bound, mb, nb, ob, dqb)  # dqb may be None
    d_out, c = lax.map(query_block, xs)
    return _from_blocks(d_out, static.tq), _from_blocks(c, static.tq)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _attend(static: Static, ops: Operands) -> tuple[Array, Array, Array]:
    """``(out [B, Tq, Dv], m [B, Tq], l [B, Tq])``; see :func:`_forward`."""
    return _forward(static, ops)


def attend_jvp(static: Static, primals, tangents):
    """The JVP rule of :func:`_attend` (also used by the dispatcher's hybrid path).

    ``m`` is treated as a constant shift (tangent 0), so ``l`` carries the whole
    derivative of the log-sum-exp ``m + log l``; ``out`` is exact.
    """
    (ops,), (t_ops,) = primals, tangents
    out, m, norm = _attend(static, ops)
    zero = lambda t: None if isinstance(t, SymbolicZero) else t  # noqa: E731
    tangents = (t_ops.q, t_ops.k, t_ops.v, t_ops.scale, t_ops.concat_score_weight)
    tangents = tuple(zero(t) for t in tangents)
    if all(t is None for t in tangents):
        zeros = tuple(jnp.zeros_like(x) for x in (out, m, norm))
        return (out, m, norm), zeros
    d_out, c = _tangent(static, ops, tangents, out, m, norm)
    return (out, m, norm), (d_out, jnp.zeros_like(m), norm * c)


_attend.defjvp(attend_jvp, symbolic_zeros=True)


def prepare(
    query: Array,
    key: Array,
    value: Array,
    value_mask: Array | None,
    scale: Array | None,
    concat_score_weight: Array | None,
    *,
    score_mode: str,
    causal: bool,
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
    blocks = block_sizes or BlockSizes.default(score_mode)
    cdt = jnp.dtype(compute_dtype)
    static = Static(
        score_mode=score_mode,
        causal=causal,
        dropout_rate=float(dropout_rate),
        tq=tq,
        tv=tv,
        forward_blocks=_clip(blocks.forward, tq, tv),
        backward_blocks=_clip(blocks.backward, tq, tv),
        precision=precision,
    )
    ops = Operands(
        q=query.astype(cdt).reshape(b, tq, d),
        k=key.astype(cdt).reshape(b, tv, d),
        v=value.astype(cdt).reshape(b, tv, dv),
        value_mask=None if value_mask is None else value_mask.reshape(b, tv),
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
    value_mask: Array | None,
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
      value_mask: bool ``[..., Tv]`` or None.
      scale: scalar ``[]`` or None.
      concat_score_weight: scalar ``[]`` (concat mode) or None.
      with_stats: also return the softmax statistics of each row.
      **options: the keyword arguments of :func:`prepare`: ``score_mode``, ``causal``,
        ``dropout_rate`` (the random pattern depends on the blocks), ``dropout_rng``,
        ``block_sizes`` (None: :meth:`BlockSizes.default`), ``precision``,
        ``compute_dtype`` (of the whole computation: float32 for 16-bit inputs) and
        ``key_offset`` (global position of the first key, for a shard of a longer
        sequence; may be traced).

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
    static, ops = prepare(query, key, value, value_mask, scale, concat_score_weight, **options)
    out, m, norm = _attend(static, ops)
    out = out.reshape(batch + (tq, dv))  # [..., Tq, Dv]
    if not with_stats:
        return out
    return out, (m.reshape(batch + (tq,)), jnp.log(norm).reshape(batch + (tq,)))


def _clip(blocks: tuple[int, int], tq: int, tv: int) -> tuple[int, int]:
    return max(1, min(blocks[0], tq)), max(1, min(blocks[1], tv))
