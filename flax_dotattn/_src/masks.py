"""Mask helpers: causal masks and the Keras "subtract a large number" masking rule.

Shape glossary used throughout flax_dotattn:

* ``...`` (``B…``): any number of leading batch dimensions, including none.
* ``Tq``: query length. ``Tv``: key/value length.
* ``D``: query/key depth. ``Dv``: value depth.

This module knows nothing of the rest of the library.
"""

from __future__ import annotations

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


def keep_mask(
    query_positions: Array,
    key_positions: Array,
    value_mask: Array | None,
    causal: bool,
    batch_ndim: int,
) -> Array | None:
    """Which (query, key) pairs may attend: the value mask AND the causal mask.

    Both the materialised path (all positions) and the chunked path (one block's
    positions) build their masks here.

    Args:
      query_positions: int ``[Tq]``, global positions of the queries.
      key_positions: int ``[Tv]``, global positions of the keys.
      value_mask: bool ``[..., Tv]`` or None.
      causal: AND in "key position <= query position" (top-left aligned, as
        :func:`make_causal_mask`).
      batch_ndim: number of leading batch dims ``...`` of the scores; the causal mask
        gets that many leading 1s so no implicit rank promotion happens.

    Returns:
      A bool mask of the scores' rank that broadcasts to ``[..., Tq, Tv]``
      (``[..., 1, Tv]``, ``[1.., Tq, Tv]`` or ``[..., Tq, Tv]``), ``True`` = keep, or None
      when nothing is masked.
    """
    mask = None if value_mask is None else value_mask[..., None, :]  # [..., 1, Tv]
    if causal:
        visible = query_positions[:, None] >= key_positions[None, :]  # [Tq, Tv]
        visible = visible.reshape((1,) * batch_ndim + visible.shape)
        mask = visible if mask is None else jnp.logical_and(mask, visible)
    return mask


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
