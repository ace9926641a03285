"""The forward pass: an online softmax over key blocks (FlashAttention-2 style).

Each query block walks its key blocks keeping a running max ``m``, normaliser ``l`` and
weighted sum; the ``[..., Tq, Tv]`` score matrix is never formed.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from flax_dotattn._src.kernels.chunked.layout import cut as cut_blocks
from flax_dotattn._src.kernels.chunked.layout import from_blocks, pair_block
from flax_dotattn._src.kernels.chunked.operands import Operands, Static, score_consts
from flax_dotattn._src.kernels.chunked.skipping import gated, sweep
from flax_dotattn._src.kernels.chunked.softmax import (
    at_most_zero,
    block_logits,
    dropout_scale,
    dropped,
    finite_shift,
)
from flax_dotattn._src.types import Array


def forward(static: Static, ops: Operands) -> tuple[Array, Array, Array]:
    """Returns ``out [B, Tq, Dv]`` and the row statistics ``m, l [B, Tq]``.

    ``P = exp(S - m) / l``. They are kept apart rather than as ``m + log(l)``: for fully
    masked rows ``m`` is near -1e9, where float32 spacing (64) would swallow ``log(l)``.
    Rows that saw only ``-inf`` logits (a ``-inf`` bias) have ``l = 0`` and output 0
    here, a finite residual for the derivative passes and for merging shards.
    """
    blocks = static.forward_blocks
    cut = cut_blocks(static, ops, blocks)
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
            bias_blk = pair_block(static, cut.bias, blocks, i, j)
            s = block_logits(
                static, cut, ops.key_offset, i, j, q_blk, cut.k[j], bias_blk, ops.scale,
                ops.concat_score_weight, score_consts(ops),
            )  # fmt: skip
            m_new = jnp.maximum(m, s.max(-1))  # [B, Bq]
            shift = finite_shift(m_new)  # a row that has seen only -inf logits so far
            alpha = jnp.exp(m - shift)  # [B, Bq]
            p = jnp.exp(at_most_zero(s - shift[..., None]))  # [B, Bq, Bk]
            norm = norm * alpha + p.sum(-1)
            p = dropped(p, dropout_scale(static, ops.rng, i, j, p.shape, dtype))
            pv = jnp.einsum("bqk,bkd->bqd", p, cut.v[j], precision=static.precision)
            return m_new, norm, acc * alpha[..., None] + pv  # [B, Bq, Dv]

        m, norm, acc = sweep(
            static, cut, ops.key_offset, i, lambda c: c[0], gated(compute), init, remat=False
        )
        safe = jnp.where(norm > 0, norm, jnp.ones((), dtype))
        return acc / safe[..., None], m, norm

    out, m, norm = lax.map(query_block, (jnp.arange(cut.q.shape[0]), cut.q))
    return from_blocks(out, static.tq), from_blocks(m, static.tq), from_blocks(norm, static.tq)
