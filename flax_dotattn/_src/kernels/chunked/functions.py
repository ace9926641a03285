"""The score and mask functions on one block: its absolute positions, its scores in the
call's batch layout, and the mask function's visibility test.

The kernel's blocks are rows ``[B, Bq * G, Bk]`` (batch flattened in ``static.perm``'s
order, query groups interleaved); the functions see ``[..., Bq, Bk]`` in the call's own
batch order, ``q_pos [(...,) Bq, 1]`` and ``kv_pos [1, Bk]``.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from flax_dotattn._src import mods
from flax_dotattn._src.kernels.chunked.operands import ModOperands, Static, pair_blocks
from flax_dotattn._src.types import Array


def positions(
    static: Static, ops: ModOperands, blocks: tuple[int, int], i: Any, j: Any
) -> tuple[Array, Array]:
    """``(q_pos [(...,) Bq, 1], kv_pos [1, Bk])`` of block (i, j), absolute int32."""
    bq, bk = pair_blocks(static, blocks)
    start = ops.query_start
    rows = i * bq + jnp.arange(bq, dtype=jnp.int32)
    q_pos = start[..., None] + rows.reshape((1,) * start.ndim + rows.shape)
    kv_pos = ops.kv_start + j * bk + jnp.arange(bk, dtype=jnp.int32)
    return q_pos[..., None], kv_pos[None, :]


def _ungrouped(static: Static, x: Array) -> Array:
    """``[B, Bq * G, ...]`` -> ``[B * G, Bq, ...]``."""
    g = static.groups
    if g == 1:
        return x
    x = x.reshape((x.shape[0], x.shape[1] // g, g) + x.shape[2:])
    return jnp.swapaxes(x, 1, 2).reshape((x.shape[0] * g, x.shape[1]) + x.shape[3:])


def _grouped(static: Static, x: Array) -> Array:
    """``[B * G, Bq, ...]`` -> ``[B, Bq * G, ...]``."""
    g = static.groups
    if g == 1:
        return x
    x = x.reshape((x.shape[0] // g, g) + x.shape[1:])
    return jnp.swapaxes(x, 1, 2).reshape((x.shape[0], x.shape[2] * g) + x.shape[3:])


def to_call(static: Static, x: Array) -> Array:
    """Rows ``[B, Bq * G, Bk]`` -> ``[..., Bq, Bk]`` in the call's batch order."""
    nb = len(static.batch)
    x = _ungrouped(static, x)  # [B * G, Bq, Bk]
    x = x.reshape(static.batch + x.shape[1:])
    inverse = tuple(int(a) for a in np.argsort(static.perm))
    return jnp.transpose(x, inverse + (nb, nb + 1))


def from_call(static: Static, x: Array) -> Array:
    """``[..., Bq, Bk]`` in the call's batch order -> rows ``[B, Bq * G, Bk]``."""
    nb = len(static.batch)
    x = jnp.transpose(x, static.perm + (nb, nb + 1))
    return _grouped(static, x.reshape((-1,) + x.shape[nb:]))


def score_modifier(
    static: Static, ops: ModOperands, blocks: tuple[int, int], i: Any, j: Any,
    consts: tuple[Array, ...],
) -> Any:  # fmt: skip
    """The score function of block (i, j) on row scores ``[B, Bq * G, Bk]`` (None without
    one); ``consts`` are its floating arrays (differentiable arguments)."""
    fn = static.score_mod
    if fn is None:
        return None
    q_pos, kv_pos = positions(static, ops, blocks, i, j)

    def modify(scores: Array) -> Array:
        out = fn(to_call(static, scores), q_pos, kv_pos, consts=consts, other=ops.score_other)
        return from_call(static, out.astype(scores.dtype))

    return modify


def visible(static: Static, ops: ModOperands, blocks: tuple[int, int], i: Any, j: Any) -> Array:
    """The mask function on block (i, j) as rows ``bool [B, Bq * G, Bk]``."""
    assert static.mask_mod is not None, "a mask function is given"
    q_pos, kv_pos = positions(static, ops, blocks, i, j)
    keep = static.mask_mod(q_pos, kv_pos, consts=ops.mask_consts)
    bq, bk = pair_blocks(static, blocks)
    batch = tuple(static.batch[a] for a in np.argsort(static.perm))  # the call's order
    return from_call(static, jnp.broadcast_to(keep, batch + (bq, bk)))


def block_map(static: Static, blocks: tuple[int, int]) -> mods.BlockMap | None:
    """The mask function's map of the blocks ``blocks`` (rows), if known while tracing."""
    if static.mask_tables is None:
        return None
    return static.mask_tables.maps.get(pair_blocks(static, blocks))
