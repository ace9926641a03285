"""Score and mask functions for :func:`flax_dotattn.dot_attention`'s ``score_mod`` and
``mask_mod``, and the registry that lets a config record one by name.

A ``score_mod(scores, q_pos, kv_pos) -> scores`` changes the logits after the scale, the
bias and the soft-cap and before the masks; a ``mask_mod(q_pos, kv_pos) -> bool`` is ANDed
with every other mask (a hidden pair has 1e9 subtracted, Keras's rule). ``scores`` is
``[..., Bq, Bk]`` float32 with the call's batch dims, ``q_pos`` int32 ``[Bq, 1]``
(``[..., Bq, 1]`` when ``query_offset`` differs per sequence) and ``kv_pos`` int32
``[1, Bk]``: absolute positions (query row ``i`` at ``query_offset + i``). The functions
are vectorised over a block: the xla path calls them once on every pair, the chunked path
once per block, in O(T) memory, and gradients reach the arrays they close over. Per-head or
per-example data is closed over with the batch dims' shape (ALiBi slopes ``[H, 1, 1]`` for
inputs ``[B, H, T, D]``).

Every recipe here equals a built-in where there is one (``causal``, ``window``,
``segment_ids``, ``logits_soft_cap``, a dense ``bias``); the tests check it.

Examples:
  ALiBi on ``[B, H, T, D]`` inputs, equal to the dense bias it replaces:

  >>> import jax.numpy as jnp, numpy as np
  >>> from flax_dotattn import dot_attention, mods
  >>> q = jnp.asarray(np.random.default_rng(0).normal(size=(1, 4, 6, 8)), jnp.float32)
  >>> slopes = mods.alibi_slopes(4)[:, None, None]                 # [H, 1, 1]
  >>> out = dot_attention(None, q, q, causal=True, score_mod=mods.alibi(slopes))
  >>> i = np.arange(6)
  >>> bias = -slopes * (i[:, None] - i[None, :])                   # [H, T, T]
  >>> bool(jnp.allclose(out, dot_attention(None, q, q, causal=True, bias=bias), atol=1e-6))
  True

  A prefix-LM mask (the first 3 tokens see each other, the rest is causal):

  >>> out = dot_attention(None, q, q, mask_mod=mods.prefix_lm(3))
  >>> keep = (i[None, :] < 3) | (i[None, :] <= i[:, None])
  >>> bool(jnp.allclose(out, dot_attention(None, q, q, attention_mask=keep), atol=1e-6))
  True
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from flax_dotattn._src.mods import register, registered_name
from flax_dotattn._src.types import Array, MaskMod, ScoreMod

__all__ = [
    "alibi",
    "alibi_slopes",
    "causal",
    "document",
    "prefix_lm",
    "register",
    "registered_name",
    "relative_position_bucket",
    "sliding_window",
    "soft_cap",
    "t5_bias",
]


def _lifted(*xs: Any) -> list[Array]:
    """The arrays with leading 1s up to their common rank (no implicit rank promotion)."""
    xs = tuple(jnp.asarray(x) for x in xs)
    rank = max(x.ndim for x in xs)
    return [x.reshape((1,) * (rank - x.ndim) + x.shape) for x in xs]


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi's per-head slopes ``[H]``: ``2 ** (-8 (h + 1) / H)`` for ``H`` a power of two,
    and for other ``H`` those of the next lower power of two followed by every other slope
    of the next higher one (Press et al., 2022).

    >>> from flax_dotattn import mods
    >>> mods.alibi_slopes(4).tolist()
    [0.25, 0.0625, 0.015625, 0.00390625]
    """
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int; received num_heads={num_heads!r}.")

    def powers(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

    low = 2 ** math.floor(math.log2(num_heads))
    slopes = powers(low) + powers(2 * low)[0::2][: num_heads - low]
    return np.asarray(slopes, np.float32)


def alibi(slopes: Any, *, causal: bool = True) -> ScoreMod:
    """ALiBi: ``scores - slope * distance``.

    Args:
      slopes: the slopes, shaped like the batch dims plus two trailing 1s (``[H, 1, 1]``
        for inputs ``[B, H, T, D]``); an array (learnable: gradients reach it) or a float.
      causal: True: the distance is ``q_pos - kv_pos`` (the original, for causal
        attention); False: ``|q_pos - kv_pos|`` (bidirectional).

    Returns:
      A ``score_mod``.
    """

    def score_mod(scores: Array, q_pos: Array, kv_pos: Array) -> Array:
        distance = q_pos - kv_pos  # [(...,) Bq, Bk]
        if not causal:
            distance = jnp.abs(distance)
        scores, slope, distance = _lifted(scores, jnp.asarray(slopes, scores.dtype), distance)
        return scores - slope * distance.astype(scores.dtype)

    return score_mod


def relative_position_bucket(
    relative_position: Array, *, bidirectional: bool = True, num_buckets: int = 32,
    max_distance: int = 128,
) -> Array:  # fmt: skip
    """T5's bucket of ``relative_position = kv_pos - q_pos``: exact buckets for small
    distances, logarithmic ones up to ``max_distance``; bidirectional buckets split the
    range between keys before and after the query (Raffel et al., 2020).

    >>> import jax.numpy as jnp
    >>> from flax_dotattn import mods
    >>> mods.relative_position_bucket(jnp.array([-3, -1, 0, 3, 200]), num_buckets=8,
    ...                               max_distance=16).tolist()
    [2, 1, 0, 6, 7]
    """
    n = -relative_position
    buckets = num_buckets
    offset = jnp.zeros_like(n)
    if bidirectional:
        buckets //= 2
        offset = jnp.where(n < 0, buckets, 0)
        n = jnp.abs(n)
    else:
        n = jnp.maximum(n, 0)
    exact = buckets // 2
    far = exact + (
        jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / exact)
        / math.log(max_distance / exact)
        * (buckets - exact)
    ).astype(n.dtype)
    far = jnp.minimum(far, buckets - 1)
    return offset + jnp.where(n < exact, n, far)


def t5_bias(table: Array, *, bidirectional: bool = True, max_distance: int = 128) -> ScoreMod:
    """T5's learned relative-position bias: ``scores + table[h, bucket(kv_pos - q_pos)]``.

    Args:
      table: ``[H, num_buckets]``, learned (gradients reach it), for inputs whose last
        batch dim is the heads ``H`` (``[B, H, T, D]``).
      bidirectional, max_distance: see :func:`relative_position_bucket`.

    Returns:
      A ``score_mod``.
    """

    def score_mod(scores: Array, q_pos: Array, kv_pos: Array) -> Array:
        if q_pos.ndim > 2:
            raise ValueError(
                "t5_bias takes one query offset for the whole batch; received query "
                f"positions of shape {q_pos.shape} (query_offset per sequence)."
            )
        bucket = relative_position_bucket(
            kv_pos - q_pos, bidirectional=bidirectional, num_buckets=table.shape[-1],
            max_distance=max_distance,
        )  # fmt: skip  # [Bq, Bk]
        bias = jnp.take(jnp.asarray(table, scores.dtype), bucket, axis=-1)  # [H, Bq, Bk]
        scores, bias = _lifted(scores, bias)
        return scores + bias

    return score_mod


def soft_cap(cap: float) -> ScoreMod:
    """``cap * tanh(scores / cap)``: ``logits_soft_cap=cap`` as a score function (the
    built-in is cheaper: the chunked path bounds its logits)."""

    def score_mod(scores: Array, q_pos: Array, kv_pos: Array) -> Array:
        c = jnp.asarray(cap, scores.dtype)
        return c * jnp.tanh(scores / c)

    return score_mod


def causal() -> MaskMod:
    """``kv_pos <= q_pos``: ``causal=True`` as a mask function."""

    def mask_mod(q_pos: Array, kv_pos: Array) -> Array:
        return kv_pos <= q_pos

    return mask_mod


def sliding_window(left: int | None, right: int | None = 0) -> MaskMod:
    """``q_pos - left <= kv_pos <= q_pos + right`` (a None side unbounded):
    ``window=(left, right)`` as a mask function."""

    def mask_mod(q_pos: Array, kv_pos: Array) -> Array:
        q_pos, kv_pos = _lifted(q_pos, kv_pos)
        keep = jnp.ones(jnp.broadcast_shapes(q_pos.shape, kv_pos.shape), bool)
        if left is not None:
            keep = keep & (kv_pos >= q_pos - left)
        if right is not None:
            keep = keep & (kv_pos <= q_pos + right)
        return keep

    return mask_mod


def prefix_lm(prefix_length: Any) -> MaskMod:
    """Prefix-LM: keys before ``prefix_length`` are seen by every query, the rest causally.

    Args:
      prefix_length: a Python int, or an int array shaped like the batch dims plus two
        trailing 1s (``[B, 1, 1, 1]`` per example for inputs ``[B, H, T, D]``; a traced
        array is classified per block at run time).
    """

    def mask_mod(q_pos: Array, kv_pos: Array) -> Array:
        q_pos, kv_pos, prefix = _lifted(q_pos, kv_pos, prefix_length)
        return (kv_pos < prefix) | (kv_pos <= q_pos)

    return mask_mod


def document(segment_ids: Array) -> MaskMod:
    """Document masking for packed sequences: a query sees the keys of its own segment,
    ``segment_ids=(ids, ids)`` as a mask function.

    Args:
      segment_ids: int ``[..., T]``, the segment of each position (queries and keys share
        positions: self-attention with ``query_offset`` None or 0); its batch dims are
        the call's (``[B, 1, T]`` for inputs ``[B, H, T, D]``).
    """

    def mask_mod(q_pos: Array, kv_pos: Array) -> Array:
        if q_pos.ndim > 2:
            raise ValueError(
                "document takes one query offset for the whole batch; received query "
                f"positions of shape {q_pos.shape} (query_offset per sequence)."
            )
        ids = jnp.asarray(segment_ids)
        q_ids = jnp.take(ids, q_pos[:, 0], axis=-1, mode="clip")[..., :, None]  # [..., Bq, 1]
        kv_ids = jnp.take(ids, kv_pos[0], axis=-1, mode="clip")[..., None, :]  # [..., 1, Bk]
        return q_ids == kv_ids

    return mask_mod
