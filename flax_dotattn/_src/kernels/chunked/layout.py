"""How operands are cut into blocks.

Per-position arrays ``[B, T, ...]`` become ``[n, B, block, ...]`` (padded to whole
blocks). Pair arrays ``[..., Tq, Tv]`` (a full mask, a bias and their cotangents) keep
their broadcastable batch dims and are read block by block; a size-1 (broadcast) axis
stays size 1 and is never padded or expanded, so a key-padding mask keeps O(T) memory.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp
from jax import lax

from flax_dotattn._src.kernels.chunked.bounds import logit_bounds
from flax_dotattn._src.kernels.chunked.operands import ModOperands, Operands, Static, pair_blocks
from flax_dotattn._src.types import Array

Blocks = tuple[int, int]  # (Bq, Bk)


def to_blocks(x: Array, block: int, fill: Any = 0) -> Array:
    """``[B, T, ...]`` -> ``[n, B, block, ...]``, padding T up to a multiple of ``block``."""
    n_blocks = -(-x.shape[1] // block)
    pad = n_blocks * block - x.shape[1]
    if pad:
        widths = [(0, 0)] * x.ndim
        widths[1] = (0, pad)
        x = jnp.pad(x, widths, constant_values=fill)
    x = x.reshape((x.shape[0], n_blocks, block) + x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def from_blocks(x: Array, length: int) -> Array:
    """``[n, B, block, ...]`` -> ``[B, length, ...]``, dropping the padding."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape((x.shape[0], x.shape[1] * x.shape[2]) + x.shape[3:])[:, :length]


def add_at(x: Array, j: Any, y: Array) -> Array:
    """``x.at[j].add(y)`` as a slice update (``.at[].add`` is a scatter, not in place)."""
    return lax.dynamic_update_index_in_dim(x, x[j] + y, j, axis=0)


def pair_extent(x: Array, blocks: Blocks) -> Blocks:
    """The extent of one block of a ``[..., Tq, Tv]`` array: 1 along a broadcast (size-1)
    axis, else the block size."""
    bq, bk = (1 if n == 1 else b for n, b in zip(x.shape[-2:], blocks, strict=True))
    return bq, bk


def pad_pairs(x: Array | None, blocks: Blocks, fill: Any = 0) -> Array | None:
    """Pads the ``[..., Tq, Tv]`` axes of a full mask or bias to whole blocks (a size-1,
    broadcast axis stays as it is)."""
    if x is None:
        return None
    pads = [(-n) % e for n, e in zip(x.shape[-2:], pair_extent(x, blocks), strict=True)]
    if not any(pads):
        return x
    widths = [(0, 0)] * (x.ndim - 2) + [(0, pad) for pad in pads]
    return jnp.pad(x, widths, constant_values=fill)


def _pair_offsets(x: Array, blocks: Blocks, i: Any, j: Any) -> tuple:
    """Where block (i, j) of a padded ``[..., Tq, Tv]`` array starts (0 along broadcast
    axes), as a full index."""
    sizes = zip(x.shape[-2:], blocks, (i, j), strict=True)
    starts = [0 if n == 1 else b * at for n, b, at in sizes]
    return (0,) * (x.ndim - 2) + tuple(starts)


def pair_slice(x: Array, blocks: Blocks, i: Any, j: Any) -> Array:
    """Block (i, j) of a padded ``[..., Tq, Tv]`` array, not broadcast: ``[..., Bq|1, Bk|1]``."""
    extent = x.shape[:-2] + pair_extent(x, blocks)
    return lax.dynamic_slice(x, _pair_offsets(x, blocks, i, j), extent)


def pair_add(x: Array, blocks: Blocks, i: Any, j: Any, y: Array) -> Array:
    """Adds ``y [..., Bq|1, Bk|1]`` to block (i, j) of a padded ``[..., Tq, Tv]`` array, in
    place (the counterpart of :func:`pair_slice`)."""
    return lax.dynamic_update_slice(
        x, pair_slice(x, blocks, i, j) + y, _pair_offsets(x, blocks, i, j)
    )


def pair_block(static: Static, x: Array | None, blocks: Blocks, i: Any, j: Any) -> Array | None:
    """Block (i, j) of a padded ``[..., Tq, Tv]`` array as ``[B, Bq, Bk]`` (``blocks`` in
    rows, query groups interleaved as the rows are), or None."""
    if x is None:
        return None
    positions = pair_blocks(static, blocks)
    x = pair_slice(x, positions, i, j)  # [..., Bq|1, Bk|1]
    x = jnp.broadcast_to(x, static.batch + positions)
    return grouped_rows(static, x.reshape((-1,) + positions))


def grouped_rows(static: Static, x: Array) -> Array:
    """``[B * G, Bq, ...]`` (groups last in the batch) -> rows ``[B, Bq * G, ...]``."""
    g = static.groups
    if g == 1:
        return x
    x = x.reshape((x.shape[0] // g, g) + x.shape[1:])
    return jnp.swapaxes(x, 1, 2).reshape((x.shape[0], x.shape[2] * g) + x.shape[3:])


def ungrouped_rows(static: Static, x: Array) -> Array:
    """The inverse of :func:`grouped_rows`: ``[B, Bq * G, ...]`` -> ``[B * G, Bq, ...]``."""
    g = static.groups
    if g == 1:
        return x
    x = x.reshape((x.shape[0], x.shape[1] // g, g) + x.shape[2:])
    return jnp.swapaxes(x, 1, 2).reshape((x.shape[0] * g, x.shape[1]) + x.shape[3:])


def unbroadcast(x: Array, shape: tuple[int, ...]) -> Array:
    """Sums ``x`` over the dims that broadcasting ``shape`` to ``x.shape`` added."""
    lead = x.ndim - len(shape)
    x = x.sum(tuple(range(lead))) if lead else x
    dims = tuple(a for a, n in enumerate(shape) if n == 1 and x.shape[a] != 1)
    return x.sum(dims, keepdims=True) if dims else x


class Blocked(NamedTuple):
    """The operands of one pass cut into its blocks, and the bounds used for skipping."""

    q: Array  # [nQ, B, Bq, D]
    k: Array  # [nK, B, Bk, D]
    v: Array  # [nK, B, Bk, Dv]
    value_mask: Array | None  # [nK, B, Bk]
    attention_mask: Array | None  # [..., nQ*Bq/G, nK*Bk] (positions, not rows)
    bias: Array | None  # [..., nQ*Bq/G, nK*Bk]
    q_segments: Array | None  # [nQ, B, Bq]
    kv_segments: Array | None  # [nK, B, Bk]
    q_segment_range: Array | None  # [nQ, 2, B]: min and max segment id of the block
    kv_segment_range: Array | None  # [nK, 2, B]
    q_bound: Array  # [nQ, B, Bq]: |logit| <= q_bound * k_bound (before the bias)
    k_bound: Array  # [nK, B]
    k_bound_all: Array  # []: max of k_bound
    bias_max: Array  # []: max of the bias (0 without one)
    mods: ModOperands | None = None  # positions and arrays of the score/mask functions

    @property
    def blocks(self) -> Blocks:
        return self.q.shape[2], self.k.shape[2]


def _segments(ops: Operands, blocks: Blocks) -> tuple[Array | None, ...]:
    """Blocked segment ids ``[nQ, B, Bq]``, ``[nK, B, Bk]`` and their per-block ranges
    ``[n, 2, B]`` (min, max), or Nones. Padding ids (-1, -2) widen the ranges, which only
    makes the skipping test weaker."""
    masking = ops.masking
    if masking.query_segment_ids is None:
        return None, None, None, None
    assert masking.kv_segment_ids is not None, "segment ids come in pairs"
    q_seg = to_blocks(masking.query_segment_ids, blocks[0], fill=-1)
    kv_seg = to_blocks(masking.kv_segment_ids, blocks[1], fill=-2)
    q_range = jnp.stack([q_seg.min(-1), q_seg.max(-1)], axis=1)
    kv_range = jnp.stack([kv_seg.min(-1), kv_seg.max(-1)], axis=1)
    return q_seg, kv_seg, q_range, kv_range


def cut(static: Static, ops: Operands, blocks: Blocks) -> Blocked:
    """Cuts ``ops`` into ``blocks`` and computes the skipping bounds."""
    block_q, block_k = blocks
    q_bound, k_bound = logit_bounds(static, ops)  # [B, Tq], [B, Tv]
    k_bound = to_blocks(k_bound, block_k).max(-1)  # [nK, B]
    value_mask = ops.masking.value_mask
    bias = None if ops.bias is None else lax.stop_gradient(ops.bias)
    q_seg, kv_seg, q_range, kv_range = _segments(ops, blocks)
    return Blocked(
        q=to_blocks(ops.q, block_q),
        k=to_blocks(ops.k, block_k),
        v=to_blocks(ops.v, block_k),
        value_mask=None if value_mask is None else to_blocks(value_mask, block_k, fill=False),
        attention_mask=pad_pairs(
            ops.masking.attention_mask, pair_blocks(static, blocks), fill=False
        ),
        bias=pad_pairs(ops.bias, pair_blocks(static, blocks)),
        q_segments=q_seg,
        kv_segments=kv_seg,
        q_segment_range=q_range,
        kv_segment_range=kv_range,
        q_bound=to_blocks(q_bound, block_q),
        k_bound=k_bound,
        k_bound_all=k_bound.max() if k_bound.size else jnp.zeros((), ops.k.dtype),
        bias_max=jnp.zeros((), ops.q.dtype) if bias is None else bias.max().astype(ops.q.dtype),
        mods=ops.mods,
    )
