"""One block's masked logits and softmax weights, as every pass computes them."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from flax_dotattn._src.kernels.chunked import functions
from flax_dotattn._src.kernels.chunked.layout import Blocked, pair_block
from flax_dotattn._src.kernels.chunked.operands import Static, query_positions
from flax_dotattn._src.masks import Masking, keep_mask
from flax_dotattn._src.scores import masked_logits
from flax_dotattn._src.types import Array


def block_logits(
    static: Static, cut: Blocked, key_offset: Array, i: Any, j: Any,
    q_blk: Array, k_blk: Array, bias_blk: Array | None, scale: Array | None,
    weight: Array | None, score_consts: tuple[Array, ...] = (),
) -> Array:  # fmt: skip
    """Masked logits ``[B, Bq, Bk]`` of block (i, j); padded keys get ``-inf``.

    The differentiable operands (the query and key blocks, the bias block ``[B, Bq, Bk]``,
    the scalars and the score function's floating arrays) are arguments, so that
    derivatives reach them.
    """
    blocks = cut.blocks
    block_q, block_k = blocks
    q_pos = query_positions(static, i * block_q, block_q)  # [Bq]
    k_pos = j * block_k + jnp.arange(block_k)  # [Bk], local to this call's keys
    masking = Masking(
        value_mask=None if cut.value_mask is None else cut.value_mask[j],
        attention_mask=pair_block(static, cut.attention_mask, blocks, i, j),
        query_segment_ids=None if cut.q_segments is None else cut.q_segments[i],
        kv_segment_ids=None if cut.kv_segments is None else cut.kv_segments[j],
    )
    # [Bk], or [B, Bk] for per-row offsets (query_offset per sequence)
    k_global = key_offset[..., None] + k_pos.reshape((1,) * key_offset.ndim + k_pos.shape)
    keep = keep_mask(
        q_pos, k_global, masking, causal=static.causal, window=static.window, batch_ndim=1
    )
    modify = None
    if cut.mods is not None:
        if static.mask_mod is not None:
            visible = functions.visible(static, cut.mods, blocks, i, j)  # [B, Bq, Bk]
            keep = visible if keep is None else keep & visible
        modify = functions.score_modifier(static, cut.mods, blocks, i, j, score_consts)
    s = masked_logits(
        q_blk,
        k_blk,
        keep,
        bias_blk,
        logits_soft_cap=static.logits_soft_cap,
        modify=modify,
        score_mode=static.score_mode,
        scale=scale,
        concat_score_weight=weight,
        precision=static.precision,
        compute_dtype=q_blk.dtype,
    )  # [B, Bq, Bk]
    if static.tv % block_k:  # only the last block holds padding, but shapes are static
        s = jnp.where((k_pos < static.tv)[None, None, :], s, -jnp.inf)
    return s


def at_most_zero(x: Array) -> Array:
    """``x`` with positive entries set to 0, with derivative 1 at 0 (unlike ``minimum``).

    ``s - m <= 0`` in exact arithmetic, but XLA may recompute ``s`` for the ``exp`` with
    another rounding than for the max; at ``|s| ~ 1e13`` one ulp exceeds ``exp``'s range.
    """
    return jnp.where(x > 0, jnp.zeros_like(x), x)


def finite_shift(row_max: Array) -> Array:
    """The row max, with 0 for rows whose logits so far are all ``-inf`` (a ``-inf``
    bias): ``exp(-inf - -inf)`` is NaN, ``exp(-inf - 0)`` the 0 those weights are."""
    return jnp.where(row_max == -jnp.inf, jnp.zeros((), row_max.dtype), row_max)


def probabilities(s: Array, row_max: Array, norm: Array) -> Array:
    """Softmax weights ``[B, Bq, Bk]`` of logits ``s`` from the rows' final statistics
    ``[B, Bq]``; 0 (not NaN) in rows that saw only ``-inf`` logits, whose ``norm`` is 0."""
    norm = jnp.where(norm == 0, jnp.ones((), norm.dtype), norm)
    return jnp.exp(at_most_zero(s - finite_shift(row_max)[..., None])) / norm[..., None]


def dropout_scale(static: Static, rng: Array | None, i: Any, j: Any, shape, dtype) -> Array | None:
    """Inverted-dropout factors of block (i, j), 0 or ``1 / (1 - rate)``; None without
    dropout. Drawn per forward block, so every pass draws the same pattern."""
    if static.dropout_rate == 0.0:
        return None
    assert rng is not None, "dropout has a key"
    keep_prob = 1.0 - static.dropout_rate
    key = jax.random.fold_in(jax.random.fold_in(rng, i), j)
    keep = jax.random.bernoulli(key, keep_prob, shape)
    return jnp.where(keep, jnp.asarray(1.0 / keep_prob, dtype), jnp.asarray(0.0, dtype))


def dropped(p: Array, drop: Array | None) -> Array:
    """``p`` times the dropout factors (``p`` itself without dropout)."""
    return p if drop is None else p * drop
