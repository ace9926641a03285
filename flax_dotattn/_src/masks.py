"""Mask helpers: causal masks and the Keras "subtract a large number" masking rule.

Shape glossary used throughout flax_dotattn:

* ``...`` (``B…``): any number of leading batch dimensions, including none.
* ``Tq``: query length. ``Tv``: key/value length.
* ``D``: query/key depth. ``Dv``: value depth.

This module knows nothing of the rest of the library.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax.numpy as jnp

from flax_dotattn._src.types import Array

#: What Keras subtracts from the logits of masked positions (``scores - 1e9``).
MASK_PENALTY = 1.0e9


def make_causal_mask(tq: int, tv: int) -> Array:
    """Returns the Keras causal mask: query ``i`` may attend to key ``j`` iff ``j <= i``.

    The mask is top-left aligned when ``Tq != Tv``, exactly as Keras builds it from
    two cumulative sums (``row_index >= col_index``).

    Args:
      tq: query length ``Tq`` (a non-negative Python int).
      tv: key/value length ``Tv`` (a non-negative Python int).

    Returns:
      A bool array ``[Tq, Tv]``; ``True`` means "may attend".

    Raises:
      ValueError: if ``tq`` or ``tv`` is not a non-negative int.

    Examples:
      >>> from flax_dotattn import make_causal_mask
      >>> make_causal_mask(2, 4).astype(int).tolist()
      [[1, 0, 0, 0], [1, 1, 0, 0]]
    """
    for name, n in (("tq", tq), ("tv", tv)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(
                f"make_causal_mask: {name} must be a non-negative Python int; "
                f"received {name}={n!r}."
            )
    rows = jnp.arange(tq)[:, None]  # [Tq, 1]
    cols = jnp.arange(tv)[None, :]  # [1, Tv]
    return rows >= cols  # [Tq, Tv]


class Masking(NamedTuple):
    """Everything that masks (query, key) pairs, besides ``causal`` and ``window``.

    Each entry is None when absent. Value masks and segment ids are broadcast to the full
    batch (they are small); the full mask keeps its own (broadcastable) batch dims.
    """

    value_mask: Array | None = None  # bool [..., Tv]
    attention_mask: Array | None = None  # bool, broadcastable to [..., Tq, Tv], same rank
    query_segment_ids: Array | None = None  # int [..., Tq]
    kv_segment_ids: Array | None = None  # int [..., Tv]


def keep_mask(
    query_positions: Array,
    key_positions: Array,
    masking: Masking,
    *,
    causal: bool,
    window: tuple[int | None, int | None] | None,
    batch_ndim: int,
) -> Array | None:
    """Which (query, key) pairs may attend: every mask ANDed.

    Both the materialised path (all positions) and the chunked path (one block's
    positions and mask slices) build their masks here.

    Args:
      query_positions: int ``[Tq]``, global positions of the queries, or ``[..., Tq]``
        with batch dims (at most ``batch_ndim``, broadcastable) when they differ per
        sequence (``query_offset``).
      key_positions: int ``[Tv]`` (or ``[..., Tv]``), global positions of the keys.
      masking: the value mask ``[..., Tv]``, full mask ``[..., Tq, Tv]`` and segment ids
        ``[..., Tq]`` / ``[..., Tv]`` of these positions (None entries are ignored).
      causal: AND in "key position <= query position" (top-left aligned, as
        :func:`make_causal_mask`).
      window: None or ``(left, right)``: AND in ``q - left <= k <= q + right`` (a None
        side is unbounded).
      batch_ndim: number of leading batch dims ``...`` of the scores; position masks
        get that many leading 1s so no implicit rank promotion happens.

    Returns:
      A bool mask of the scores' rank that broadcasts to ``[..., Tq, Tv]``, ``True`` =
      keep, or None when nothing is masked.
    """
    masks = []
    q_pos = query_positions[..., :, None]  # [(...,) Tq, 1]
    k_pos = key_positions[..., None, :]  # [(...,) 1, Tv]
    rank = max(q_pos.ndim, k_pos.ndim)  # positions may carry (broadcastable) batch dims
    q_pos = q_pos.reshape((1,) * (rank - q_pos.ndim) + q_pos.shape)
    k_pos = k_pos.reshape((1,) * (rank - k_pos.ndim) + k_pos.shape)
    position_masks = []
    if causal:
        position_masks.append(q_pos >= k_pos)
    if window is not None:
        left, right = window
        if left is not None:
            position_masks.append(k_pos >= q_pos - left)
        if right is not None:
            position_masks.append(k_pos <= q_pos + right)
    for visible in position_masks:  # [(...,) Tq, Tv]
        masks.append(visible.reshape((1,) * (batch_ndim + 2 - visible.ndim) + visible.shape))
    if masking.value_mask is not None:
        masks.append(masking.value_mask[..., None, :])  # [..., 1, Tv]
    if masking.attention_mask is not None:
        masks.append(masking.attention_mask)  # [..., Tq, Tv] (broadcastable)
    q_seg, kv_seg = masking.query_segment_ids, masking.kv_segment_ids
    if q_seg is not None and kv_seg is not None:  # given together
        same = q_seg[..., :, None] == kv_seg[..., None, :]
        masks.append(same)  # [..., Tq, Tv]
    if not masks:
        return None
    return functools.reduce(jnp.logical_and, masks)


def apply_score_mask(scores: Array, mask: Array | None) -> Array:
    """Applies Keras's masking rule: masked logits become ``scores - 1e9``.

    The penalty is *subtracted*, not substituted, so a row whose keys are all masked
    keeps the softmax of its (shifted) scores instead of becoming NaN.

    Args:
      scores: logits ``[..., Tq, Tv]``.
      mask: bool mask broadcastable to ``scores``, ``True`` = keep; or None.

    Returns:
      The masked logits ``[..., Tq, Tv]``, same dtype as ``scores``.
    """
    if mask is None:
        return scores
    return jnp.where(mask, scores, scores - jnp.asarray(MASK_PENALTY, scores.dtype))
