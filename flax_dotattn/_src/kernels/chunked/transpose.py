"""The reverse-mode derivative: the transpose of :mod:`.tangent`, written by hand.

With ``g = ct_out`` and ``delta = ct_c - sum(g * out)`` per row, block (i, j) gives
``ct_dv_j += (P * drop)^T g_i`` and ``ct_dS = P * (drop * g_i v_j^T + delta_i)``, which
the logits' VJP turns into the query, key, bias and scalar cotangents. Query blocks are
walked as in the forward (same band, same exact skipping); key-side cotangents accumulate
in place, so the pass needs O(T) memory and no ``[T, T]`` work beyond the visited blocks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from flax_dotattn._src.kernels.chunked.layout import (
    Blocked,
    add_at,
    from_blocks,
    pair_add,
    pair_block,
    pair_extent,
    to_blocks,
    unbroadcast,
    ungrouped_rows,
)
from flax_dotattn._src.kernels.chunked.layout import cut as cut_blocks
from flax_dotattn._src.kernels.chunked.operands import (
    Static,
    Tangents,
    pair_blocks,
    score_consts,
)
from flax_dotattn._src.kernels.chunked.skipping import needs_second_pass, sweep
from flax_dotattn._src.kernels.chunked.softmax import (
    block_logits,
    dropout_scale,
    dropped,
    probabilities,
)
from flax_dotattn._src.kernels.chunked.tangent import Residuals, row_blocks
from flax_dotattn._src.types import Array


class _Row(NamedTuple):
    """One query block's inputs to the transpose."""

    i: Array  # int32 [], the block's index
    q: Array  # [B, Bq, D]
    m: Array  # [B, Bq]
    norm: Array  # [B, Bq]
    g: Array  # [B, Bq, Dv], the output's cotangent
    delta: Array  # [B, Bq], ct_c - sum(g * out)


def _block_cotangents(
    static: Static, cut: Blocked, res: Residuals, present: Tangents, row: _Row, j: Any
) -> Tangents:
    """Block (i, j)'s share of every present cotangent (``query [B, Bq, D]``, ``key`` and
    ``value`` ``[B, Bk, ·]``, ``bias`` the block's ``[..., Bq|1, Bk|1]``, scalars)."""
    ops, i = res.ops, row.i
    fixed = Tangents(
        row.q, cut.k[j], None, pair_block(static, cut.bias, cut.blocks, i, j), ops.scale,
        ops.concat_score_weight, score_consts(ops) or None,
    )  # fmt: skip
    moving = Tangents(*(None if p is None else x for x, p in zip(fixed, present, strict=True)))
    moving = moving._replace(value=None)  # the logits do not read the values

    def logits(moving: Tangents) -> Array:
        chosen = zip(fixed, moving, present, strict=True)
        a = Tangents(*(x if p is None else y for x, y, p in chosen))
        assert a.query is not None and a.key is not None
        return block_logits(
            static, cut, ops.key_offset, i, j, a.query, a.key, a.bias, a.scale, a.concat_weight,
            a.mod_consts or (),
        )  # fmt: skip

    s, pull = jax.vjp(logits, moving) if present.moves_logits else (logits(moving), None)
    p = probabilities(s, row.m, row.norm)  # [B, Bq, Bk]
    drop = dropout_scale(static, ops.rng, i, j, p.shape, ops.q.dtype)
    cts = Tangents()
    if pull is not None:
        gv = jnp.einsum("bqd,bkd->bqk", row.g, cut.v[j], precision=static.precision)
        (cts,) = pull(p * (dropped(gv, drop) + row.delta[..., None]))
    if present.value is not None:
        cts = cts._replace(
            value=jnp.einsum("bqk,bqd->bkd", dropped(p, drop), row.g, precision=static.precision)
        )
    if cts.bias is not None and cut.bias is not None:  # summed over the broadcast dims
        positions = pair_blocks(static, cut.blocks)
        extent = cut.bias.shape[:-2] + pair_extent(cut.bias, positions)
        bias = ungrouped_rows(static, cts.bias).reshape(static.batch + positions)
        cts = cts._replace(bias=unbroadcast(bias, extent))
    return cts


def _accumulate(acc: Tangents, blocks, i: Any, j: Any, new: Tangents) -> Tangents:
    """Adds block (i, j)'s cotangents: the query's to the block's own accumulator, the
    keys', values' and bias's in place at their block, the scalars'."""

    def at(a: Any, b: Any, add: Callable) -> Any:
        return None if a is None or b is None else add(a, b)

    def plus(a: Array, b: Array) -> Array:
        return a + b

    return Tangents(
        query=at(acc.query, new.query, plus),
        key=at(acc.key, new.key, lambda a, b: add_at(a, j, b)),
        value=at(acc.value, new.value, lambda a, b: add_at(a, j, b)),
        bias=at(acc.bias, new.bias, lambda a, b: pair_add(a, blocks, i, j, b)),
        scale=at(acc.scale, new.scale, plus),
        concat_weight=at(acc.concat_weight, new.concat_weight, plus),
        mod_consts=at(acc.mod_consts, new.mod_consts, lambda a, b: jax.tree.map(plus, a, b)),
    )


def _query_block(static, cut, res, present, second_pass: bool, keyside: Tangents, row: _Row):
    """One query block's sweep: ``(keyside, ct_q [B, Bq, D] or None)``."""

    def compute(j, run, acc):
        step = jax.checkpoint(
            lambda j: _block_cotangents(static, cut, res, present, row, j), prevent_cse=False
        )
        if run is True:
            new = step(j)
        else:
            zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(step, j))
            new = lax.cond(run, step, lambda _: zeros, j)
        return _accumulate(acc, pair_blocks(static, cut.blocks), row.i, j, new)

    init = keyside._replace(query=None if present.query is None else jnp.zeros_like(row.q))
    acc = sweep(
        static, cut, res.ops.key_offset, row.i, lambda _: row.m, compute, init, remat=False,
        second_pass=second_pass,
    )  # fmt: skip
    return acc._replace(query=None), acc.query


def transpose(
    static: Static, res: Residuals, present: Tangents, ct_out: Array, ct_c: Array
) -> Tangents:
    """The cotangents of the tangents that ``present`` marks, given those of
    :func:`.tangent.tangent`'s outputs (``ct_out [B, Tq, Dv]``, ``ct_c [B, Tq]``); shapes
    as the tangents, None elsewhere."""
    blocks = static.derivative_blocks
    ops = res.ops
    cut = cut_blocks(static, ops, blocks)
    dtype = ops.q.dtype
    delta = ct_c.astype(dtype) - jnp.sum(ct_out * res.out, axis=-1, dtype=dtype)  # [B, Tq]
    m, norm, _ = row_blocks(static, res, blocks[0])
    rows = _Row(
        jnp.arange(cut.q.shape[0]), cut.q, m, norm, to_blocks(ct_out.astype(dtype), blocks[0]),
        to_blocks(delta, blocks[0]),
    )  # fmt: skip

    def zeros(x, p):
        return None if p is None else jax.tree.map(jnp.zeros_like, x)

    keyside = Tangents(  # accumulated in place over all query blocks
        key=zeros(cut.k, present.key),  # [nK, B, Bk, D]
        value=zeros(cut.v, present.value),  # [nK, B, Bk, Dv]
        bias=zeros(cut.bias, present.bias),  # padded [..., nQ*Bq, nK*Bk]
        scale=zeros(jnp.zeros((), dtype), present.scale),
        concat_weight=zeros(jnp.zeros((), dtype), present.concat_weight),
        mod_consts=zeros(score_consts(ops), present.mod_consts),
    )

    def scan(second_pass: bool):
        block = functools.partial(_query_block, static, cut, res, present, second_pass)
        return lax.scan(block, keyside, rows)

    # Decided once for all query blocks (the rows' maxima are known): a test per query
    # block would put the key-side accumulators through a conditional, copying them.
    keyside, ct_q = lax.cond(
        needs_second_pass(static, cut, m), lambda: scan(True), lambda: scan(False)
    )
    return _unblocked(static, res, keyside._replace(query=ct_q))


def _unblocked(static: Static, res: Residuals, cts: Tangents) -> Tangents:
    """Blocked cotangents back to the tangents' shapes, the padding dropped."""

    def rows(x, length):
        return None if x is None else from_blocks(x, length)

    bias = cts.bias
    if bias is not None and res.ops.bias is not None:
        bias = bias[..., : res.ops.bias.shape[-2], : res.ops.bias.shape[-1]]
    return cts._replace(
        query=rows(cts.query, static.tq),
        key=rows(cts.key, static.tv),
        value=rows(cts.value, static.tv),
        bias=bias,
    )
