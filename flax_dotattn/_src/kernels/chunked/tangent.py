"""The forward-mode derivative, blockwise and linear in the tangents.

For one query row, with ``P`` the softmax, ``dS`` the tangent of the logits and ``c`` the
row's ``sum(P * dS)`` (the tangent of its log-sum-exp)::

    d_out = sum_j (P * dS)_j v_j + P_j dv_j - c * out

Reverse mode transposes this map (:mod:`.transpose`), so both directions walk the same
blocks with the same exact skipping, in O(T · block) memory.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from flax_dotattn._src.kernels.chunked.layout import cut as cut_blocks
from flax_dotattn._src.kernels.chunked.layout import from_blocks, pad_pairs, pair_block, to_blocks
from flax_dotattn._src.kernels.chunked.operands import (
    Operands,
    Static,
    Tangents,
    pair_blocks,
    score_consts,
)
from flax_dotattn._src.kernels.chunked.skipping import gated, sweep
from flax_dotattn._src.kernels.chunked.softmax import (
    block_logits,
    dropout_scale,
    dropped,
    probabilities,
)
from flax_dotattn._src.types import Array


class Residuals(NamedTuple):
    """What the derivative passes read: the operands and the forward's results."""

    ops: Operands
    out: Array  # [B, Tq, Dv]
    m: Array  # [B, Tq], row max
    norm: Array  # [B, Tq], row normaliser l


def row_blocks(static: Static, res: Residuals, block_q: int) -> tuple[Array, Array, Array]:
    """``m``, ``l`` ``[nQ, B, Bq]`` and ``out`` ``[nQ, B, Bq, Dv]`` by query block; padded
    rows get ``m = +inf``, ``l = 1``, so that their ``P`` is exactly 0."""
    return (
        to_blocks(res.m, block_q, fill=jnp.inf),
        to_blocks(res.norm, block_q, fill=1),
        to_blocks(res.out, block_q),
    )


def tangent(static: Static, res: Residuals, tangents: Tangents) -> tuple[Array, Array]:
    """The JVP of the output and of ``log l``: ``(d_out [B, Tq, Dv], c [B, Tq])``."""
    blocks = static.derivative_blocks
    block_q, block_k = blocks
    ops = res.ops
    cut = cut_blocks(static, ops, blocks)
    t = tangents
    dkb = None if t.key is None else to_blocks(t.key, block_k)  # [nK, B, Bk, D]
    dvb = None if t.value is None else to_blocks(t.value, block_k)  # [nK, B, Bk, Dv]
    dbias = pad_pairs(t.bias, pair_blocks(static, blocks))  # [..., nQ*Bq/G, nK*Bk]

    def query_block(args):
        i, q_blk, m_blk, n_blk, o_blk, dq_blk = args

        def compute(j, carry):
            acc, c = carry
            primals = (
                q_blk, cut.k[j], pair_block(static, cut.bias, blocks, i, j), ops.scale,
                ops.concat_score_weight, score_consts(ops),
            )  # fmt: skip

            def logits(*args):
                return block_logits(static, cut, ops.key_offset, i, j, *args)

            if t.moves_logits:
                dk_blk = None if dkb is None else dkb[j]
                dbias_blk = pair_block(static, dbias, blocks, i, j)
                tans = (dq_blk, dk_blk, dbias_blk, t.scale, t.concat_weight, t.mod_consts)
                tans = tuple(
                    jax.tree.map(jnp.zeros_like, p) if d is None else d
                    for p, d in zip(primals, tans, strict=True)
                )
                s, ds = jax.jvp(logits, primals, tans)  # [B, Bq, Bk] each
            else:
                s = logits(*primals)
            p = probabilities(s, m_blk, n_blk)
            drop = dropout_scale(static, ops.rng, i, j, p.shape, ops.q.dtype)
            if t.moves_logits:
                pds = p * ds  # [B, Bq, Bk]
                c = c + pds.sum(-1)
                acc += jnp.einsum("bqk,bkd->bqd", dropped(pds, drop), cut.v[j],
                                  precision=static.precision)  # fmt: skip
            if dvb is not None:
                acc += jnp.einsum("bqk,bkd->bqd", dropped(p, drop), dvb[j],
                                  precision=static.precision)  # fmt: skip
            return acc, c

        init = (jnp.zeros_like(o_blk), jnp.zeros_like(m_blk))
        # Rematerialised (remat): reverse mode recomputes each block's P, never stores it.
        acc, c = sweep(
            static, cut, ops.key_offset, i, lambda _: m_blk, gated(compute), init, remat=True
        )
        return acc - c[..., None] * o_blk, c

    dqb = None if t.query is None else to_blocks(t.query, block_q)  # [nQ, B, Bq, D]
    xs = (jnp.arange(cut.q.shape[0]), cut.q, *row_blocks(static, res, block_q), dqb)
    # Each query block is rematerialised as a whole too, so that reverse mode stores only
    # its inputs (the skipping decisions of pass 2 would otherwise be kept per block).
    d_out, c = lax.map(jax.checkpoint(query_block, prevent_cse=False), xs)
    return from_blocks(d_out, static.tq), from_blocks(c, static.tq)
