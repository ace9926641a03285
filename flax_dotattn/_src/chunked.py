"""Memory-efficient attention: online softmax over blocks with a fused custom VJP.

The forward pass walks query blocks and, inside each, key blocks, keeping a running max,
normaliser and weighted sum (FlashAttention-2 style); it saves only the output and the row
log-sum-exp. The backward pass recomputes each block's probabilities and accumulates the
gradients of query, key, value and the learned scalars. Peak memory is O(T · block) in both
directions; the ``[..., Tq, Tv]`` score matrix is never formed.

The numbers are those of the materialised path (Keras's subtract-1e9 masking rule,
top-left causal mask, fully masked rows included) up to float rounding. Under ``causal``,
blocks entirely in the future are skipped, except for queries whose every key is masked
(those rows, by Keras's rule, still average over all keys).

Shape glossary: ``...`` batch dims, ``Tq``/``Tv`` query/key lengths, ``D`` query/key depth,
``Dv`` value depth, ``B`` the flattened batch, ``Bq``/``Bk`` block lengths.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from flax_dotattn._src.masks import apply_score_mask
from flax_dotattn._src.materialised import materialised_attention
from flax_dotattn._src.scores import attention_scores

#: Default ``(Bq, Bk)`` blocks, measured on a 2-core x86 CPU (see README's benchmark):
#: tall query blocks keep the matmuls large, short key blocks keep the working set in cache.
DEFAULT_BLOCK_SIZE = (2048, 256)
#: Concat mode forms a ``[B, Bq, Bk, D]`` tanh block, so its blocks are smaller.
DEFAULT_CONCAT_BLOCK_SIZE = (256, 128)


def default_block_size(score_mode: str) -> tuple[int, int]:
    """The measured default ``(Bq, Bk)`` for ``score_mode``."""
    return DEFAULT_CONCAT_BLOCK_SIZE if score_mode == "concat" else DEFAULT_BLOCK_SIZE


class _Spec(NamedTuple):
    """Static (hashable) settings of one chunked call."""

    score_mode: str
    causal: bool
    dropout_rate: float
    tq: int
    tv: int
    blocks: tuple[int, int]  # (Bq, Bk)
    materialise_primal: bool  # a forward that is not differentiated materialises
    with_stats: bool  # also return the softmax statistics (m, log l)
    precision: Any


def _logits(spec: _Spec, blocks, q_blk, k_blk, vm_blk, scale, cw, i, j, key_offset):
    """Masked logits of block (i, j): ``[B, Bq, Bk]``, plus the real-key indicator.

    ``key_offset`` is the global index of key 0 (nonzero for a shard of the keys).
    """
    block_q, block_k = blocks
    s = attention_scores(
        q_blk,
        k_blk,
        score_mode=spec.score_mode,
        scale=scale,
        concat_score_weight=cw,
        precision=spec.precision,
        compute_dtype=q_blk.dtype,
    )  # [B, Bq, Bk]
    q_idx = i * block_q + jnp.arange(block_q)  # [Bq]
    k_idx = j * block_k + jnp.arange(block_k)  # [Bk], local to this call's keys
    keep = None
    if spec.causal:
        keep = (q_idx[:, None] >= key_offset + k_idx[None, :])[None]  # [1, Bq, Bk]
    if vm_blk is not None:
        vkeep = vm_blk[:, None, :]  # [B, 1, Bk]
        keep = vkeep if keep is None else jnp.logical_and(keep, vkeep)
    s = apply_score_mask(s, keep)
    real_key = (k_idx < spec.tv)[None, None, :]  # [1, 1, Bk]; False on padding
    return s, real_key


def _needed(spec: _Spec, blocks, i, j, first_valid, key_offset):
    """Whether block (i, j) can contribute; only causal blocks in the future cannot."""
    if not spec.causal:
        return True
    block_q, block_k = blocks
    in_past = key_offset + j * block_k <= (i + 1) * block_q - 1
    # Queries before the first unmasked key are fully masked and see every key.
    has_fully_masked_rows = i * block_q < first_valid
    return jnp.logical_or(in_past, has_fully_masked_rows)


def _maybe(pred, fn, carry):
    """``fn(carry)`` when ``pred`` (a Python or traced bool), else ``carry`` unchanged."""
    if pred is True:
        return fn(carry)
    return lax.cond(pred, fn, lambda c: c, carry)


def _dropout_scale(spec: _Spec, rng, i, j, shape, dtype):
    """Inverted-dropout factors of block (i, j): 0 or ``1 / (1 - rate)``."""
    keep_prob = 1.0 - spec.dropout_rate
    key = jax.random.fold_in(jax.random.fold_in(rng, i), j)
    keep = jax.random.bernoulli(key, keep_prob, shape)
    return jnp.where(keep, jnp.asarray(1.0 / keep_prob, dtype), jnp.asarray(0.0, dtype))


def _to_blocks(x, block: int, fill=0):
    """``[B, T, ...]`` -> ``[n, B, block, ...]``, padding T up to a multiple of ``block``."""
    n_blocks = -(-x.shape[1] // block)
    pad = n_blocks * block - x.shape[1]
    if pad:
        widths = [(0, 0)] * x.ndim
        widths[1] = (0, pad)
        x = jnp.pad(x, widths, constant_values=fill)
    x = x.reshape((x.shape[0], n_blocks, block) + x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _from_blocks(x, length: int):
    """``[n, B, block, ...]`` -> ``[B, length, ...]``, dropping the padding."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape((x.shape[0], -1) + x.shape[3:])[:, :length]


def _forward(spec: _Spec, blocks, q, k, v, vm, first_valid, key_offset, scale, cw, rng):
    """Returns the output (before the query mask) and the softmax statistics.

    Args: ``q [B, Tq, D]``, ``k [B, Tv, D]``, ``v [B, Tv, Dv]``, ``vm [B, Tv]`` or None.

    Returns: ``out [B, Tq, Dv]`` and ``(m, l)``, each ``[nQ, B, Bq]``: the row max and
    normaliser, so that ``P = exp(S - m) / l``. They are kept apart rather than as
    ``m + log(l)``: for fully masked rows ``m`` is near -1e9, where float32 spacing (64)
    would swallow ``log(l)``.
    """
    block_q, block_k = blocks
    qb = _to_blocks(q, block_q)  # [nQ, B, Bq, D]
    kb, vb = _to_blocks(k, block_k), _to_blocks(v, block_k)  # [nK, B, Bk, D|Dv]
    vmb = None if vm is None else _to_blocks(vm, block_k, fill=False)  # [nK, B, Bk]
    dtype = q.dtype

    def query_block(args):
        i, q_blk = args
        shape = q_blk.shape[:-1]  # [B, Bq]
        init = (
            jnp.full(shape, -jnp.inf, dtype),  # running max m
            jnp.zeros(shape, dtype),  # running normaliser l
            jnp.zeros(shape + (v.shape[-1],), dtype),  # running weighted sum
        )

        def key_block(j, carry):
            def compute(carry):
                m, norm, acc = carry
                vm_blk = None if vmb is None else vmb[j]
                s, real = _logits(spec, blocks, q_blk, kb[j], vm_blk, scale, cw, i, j, key_offset)
                s = jnp.where(real, s, -jnp.inf)  # [B, Bq, Bk]
                m_new = jnp.maximum(m, s.max(-1))  # [B, Bq]
                alpha = jnp.exp(m - m_new)  # [B, Bq]
                p = jnp.exp(s - m_new[..., None])  # [B, Bq, Bk]
                norm = norm * alpha + p.sum(-1)
                if spec.dropout_rate > 0.0:
                    p = p * _dropout_scale(spec, rng, i, j, p.shape, dtype)
                pv = jnp.einsum("bqk,bkd->bqd", p, vb[j], precision=spec.precision)
                return m_new, norm, acc * alpha[..., None] + pv  # [B, Bq, Dv]

            needed = _needed(spec, blocks, i, j, first_valid, key_offset)
            return _maybe(needed, compute, carry)

        m, norm, acc = lax.fori_loop(0, kb.shape[0], key_block, init)
        return acc / norm[..., None], (m, norm)

    out, stats = lax.map(query_block, (jnp.arange(qb.shape[0]), qb))
    return _from_blocks(out, spec.tq), stats


def _public(spec: _Spec, out, stats):
    """What :func:`_flash` returns: ``out``, plus ``(m, log l)`` ``[B, Tq]`` if asked."""
    if not spec.with_stats:
        return out, None
    m, norm = stats
    return out, (_from_blocks(m, spec.tq), _from_blocks(jnp.log(norm), spec.tq))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(spec, q, k, v, vm, first_valid, key_offset, scale, cw, rng):
    """Returns ``(out [B, Tq, Dv], stats)``; see :func:`_public`.

    Gradients: ``m`` is a constant shift (no gradient); the VJP of ``log l`` is that of
    the whole log-sum-exp ``m + log l`` (the softmax probabilities). Exact for any use
    that depends on the statistics through ``stop_gradient(m) + log l``.
    """
    if spec.materialise_primal:  # not differentiated, and faster materialised
        return materialised_attention(
            q,
            k,
            v,
            vm,
            scale,
            cw,
            score_mode=spec.score_mode,
            causal=spec.causal,
            dropout_rate=0.0,
            dropout_rng=None,
            precision=spec.precision,
            compute_dtype=q.dtype,
        )[0], None
    args = (q, k, v, vm, first_valid, key_offset, scale, cw, rng)
    return _public(spec, *_forward(spec, spec.blocks, *args))


def _flash_fwd(spec, q, k, v, vm, first_valid, key_offset, scale, cw, rng):
    args = (q, k, v, vm, first_valid, key_offset, scale, cw, rng)
    out, stats = _forward(spec, spec.blocks, *args)
    return _public(spec, out, stats), (*args, out, stats)


def _flash_bwd(spec, residuals, cotangents):
    q, k, v, vm, first_valid, key_offset, scale, cw, rng, out, (m, norm) = residuals
    dout, dstats = cotangents
    blocks = block_q, block_k = spec.blocks
    qb, dob = _to_blocks(q, block_q), _to_blocks(dout, block_q)  # [nQ, B, Bq, D|Dv]
    kb, vb = _to_blocks(k, block_k), _to_blocks(v, block_k)  # [nK, B, Bk, D|Dv]
    vmb = None if vm is None else _to_blocks(vm, block_k, fill=False)  # [nK, B, Bk]
    # rowsum(dP * P), minus the cotangent of log-sum-exp (whose VJP is P): [nQ, B, Bq].
    delta = jnp.sum(dout * out, axis=-1)  # [B, Tq]
    if dstats is not None:
        delta = delta - dstats[1]
    delta = _to_blocks(delta, block_q)
    dtype = q.dtype

    def key_block(carry, xs):
        j, k_blk, v_blk, vm_blk = xs

        def query_block(i, c):
            def compute(c):
                dk, dv, dq, dscale, dcw = c

                def logits(q_blk, k_blk, scale, cw):
                    return _logits(spec, blocks, q_blk, k_blk, vm_blk, scale, cw, i, j, key_offset)[
                        0
                    ]

                s, logits_vjp = jax.vjp(logits, qb[i], k_blk, scale, cw)  # [B, Bq, Bk]
                real = (j * block_k + jnp.arange(block_k) < spec.tv)[None, None]
                p = jnp.exp(s - m[i][..., None]) / norm[i][..., None]  # [B, Bq, Bk]
                p = jnp.where(real, p, 0.0)
                dp = jnp.einsum("bqd,bkd->bqk", dob[i], v_blk, precision=spec.precision)
                if spec.dropout_rate > 0.0:
                    drop = _dropout_scale(spec, rng, i, j, p.shape, dtype)
                    pd, dp = p * drop, dp * drop
                else:
                    pd = p
                dv = dv + jnp.einsum("bqk,bqd->bkd", pd, dob[i], precision=spec.precision)
                ds = p * (dp - delta[i][..., None])  # [B, Bq, Bk]
                dq_i, dk_j, dsc, dw = logits_vjp(ds)
                return dk + dk_j, dv, dq.at[i].add(dq_i), dscale + dsc, dcw + dw

            return _maybe(_needed(spec, blocks, i, j, first_valid, key_offset), compute, c)

        dq, dscale, dcw = carry
        init = (jnp.zeros_like(k_blk), jnp.zeros_like(v_blk), dq, dscale, dcw)
        dk, dv, dq, dscale, dcw = lax.fori_loop(0, qb.shape[0], query_block, init)
        return (dq, dscale, dcw), (dk, dv)

    xs = (jnp.arange(kb.shape[0]), kb, vb, vmb)
    init = (jnp.zeros_like(qb), jnp.zeros_like(scale), jnp.zeros_like(cw))
    (dq, dscale, dcw), (dk, dv) = lax.scan(key_block, init, xs)
    dq, dk, dv = _from_blocks(dq, spec.tq), _from_blocks(dk, spec.tv), _from_blocks(dv, spec.tv)
    return dq, dk, dv, None, None, None, dscale, dcw, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def chunked_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    value_mask: jax.Array | None,
    scale: jax.Array | None,
    concat_score_weight: jax.Array | None,
    *,
    score_mode: str,
    causal: bool,
    dropout_rate: float,
    dropout_rng: jax.Array | None,
    block_size: int | tuple[int, int] | None,
    precision: Any,
    compute_dtype: Any,
    materialise_primal: bool = False,
    key_offset: int | jax.Array = 0,
    with_stats: bool = False,
) -> jax.Array | tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Blockwise attention with Keras semantics, before the query mask.

    Args:
      query: ``[..., Tq, D]``.
      key: ``[..., Tv, D]``.
      value: ``[..., Tv, Dv]``.
      value_mask: bool ``[..., Tv]`` or None.
      scale: scalar ``[]`` or None.
      concat_score_weight: scalar ``[]`` (concat mode) or None.
      score_mode: ``"dot"`` or ``"concat"``.
      causal: apply the top-left causal mask.
      dropout_rate: dropout rate (0 disables); the random pattern depends on the blocks.
      dropout_rng: PRNG key when ``dropout_rate > 0``.
      block_size: block length for queries and keys, a pair ``(Bq, Bk)``, or None
        for :func:`default_block_size`.
      precision: matmul precision.
      compute_dtype: dtype of the whole computation (float32 for 16-bit inputs).
      materialise_primal: run a forward pass that is *not* differentiated through the
        materialised path. Automatic dispatch sets it for mid-sized inputs, where the
        materialised forward is faster while training still gets the chunked forward and
        backward. Not with dropout (the two paths draw different patterns).
      key_offset: global index of the first key (for a shard of a longer sequence: the
        causal mask compares global positions). May be traced.
      with_stats: also return the softmax statistics of each row.

    Returns:
      ``[..., Tq, Dv]`` in ``compute_dtype``; with ``with_stats``, also ``(m, log_l)``,
      each ``[..., Tq]``, the row max and log-normaliser: the row's log-sum-exp is
      ``m + log_l``. ``m`` carries no gradient; ``log_l``'s gradient is that of the whole
      log-sum-exp, so use them as ``stop_gradient(m) + log_l``.
    """
    batch = query.shape[:-2]
    tq, d = query.shape[-2:]
    tv, dv = value.shape[-2:]
    b = math.prod(batch)
    blocks = _clip_blocks(block_size or default_block_size(score_mode), tq, tv)
    cdt = jnp.dtype(compute_dtype)
    q = query.astype(cdt).reshape(b, tq, d)  # [B, Tq, D]
    k = key.astype(cdt).reshape(b, tv, d)  # [B, Tv, D]
    v = value.astype(cdt).reshape(b, tv, dv)  # [B, Tv, Dv]
    key_offset = jnp.asarray(key_offset, jnp.int32)
    # Global index of the first key any row may see (queries before it are fully masked
    # under causal); the max over the batch, and tq when some row has no unmasked key.
    vm, first_valid = None, key_offset
    if value_mask is not None:
        vm = value_mask.reshape(b, tv)  # [B, Tv]
        first = jnp.where(vm.any(-1), key_offset + jnp.argmax(vm, -1), tq)
        first_valid = first.max().astype(jnp.int32)
    if materialise_primal and (dropout_rate > 0.0 or with_stats):
        raise ValueError("materialise_primal needs dropout_rate=0 and with_stats=False")
    spec = _Spec(
        score_mode,
        causal,
        float(dropout_rate),
        tq,
        tv,
        blocks,
        materialise_primal,
        with_stats,
        precision,
    )
    one = jnp.ones((), cdt)
    scale = one if scale is None else scale.astype(cdt)
    cw = one if concat_score_weight is None else concat_score_weight.astype(cdt)
    rng = dropout_rng if dropout_rate > 0.0 else None
    out, stats = _flash(spec, q, k, v, vm, first_valid, key_offset, scale, cw, rng)
    out = out.reshape(batch + (tq, dv))  # [..., Tq, Dv]
    if not with_stats:
        return out
    m, log_norm = (x.reshape(batch + (tq,)) for x in stats)  # [..., Tq]
    return out, (m, log_norm)


def _clip_blocks(block_size: int | tuple[int, int], tq: int, tv: int) -> tuple[int, int]:
    block_q, block_k = block_size if isinstance(block_size, tuple) else (block_size,) * 2
    return min(block_q, tq), min(block_k, tv)
