"""Keras attention logits: the ``"dot"`` and ``"concat"`` score functions.

Shape glossary: ``...`` batch dims, ``Tq``/``Tv`` query/key lengths, ``D`` depth.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def attention_scores(
    query: Array,
    key: Array,
    *,
    score_mode: str = "dot",
    scale: Array | None = None,
    concat_score_weight: Array | None = None,
    precision: Any = None,
    compute_dtype: Any = None,
) -> Array:
    """Computes the unmasked Keras attention logits.

    * ``"dot"``: ``scores = scale * (query @ key^T)`` (no ``1/sqrt(D)``).
    * ``"concat"``: ``scores = concat_score_weight * sum(tanh(scale * (q + k)), -1)``.

    ``scale`` is omitted when None.

    Args:
      query: ``[..., Tq, D]``.
      key: ``[..., Tv, D]``.
      score_mode: ``"dot"`` or ``"concat"``.
      scale: scalar ``[]`` or None.
      concat_score_weight: scalar ``[]``; required for ``"concat"``.
      precision: passed to the matmul (``jax.lax.Precision`` or its name).
      compute_dtype: dtype of the logits; defaults to the inputs' dtype.

    Returns:
      Logits ``[..., Tq, Tv]`` in ``compute_dtype``.
    """
    compute_dtype = compute_dtype or jnp.result_type(query, key)
    if score_mode == "dot":
        scores = jnp.einsum(
            "...qd,...kd->...qk",
            query,
            key,
            precision=precision,
            preferred_element_type=compute_dtype,
        )  # [..., Tq, Tv]
        if scale is not None:
            scores = scores * scale.astype(compute_dtype)
        return scores.astype(compute_dtype)
    # concat: a [..., Tq, Tv, D] intermediate, as in Keras.
    q = query.astype(compute_dtype)[..., :, None, :]  # [..., Tq, 1, D]
    k = key.astype(compute_dtype)[..., None, :, :]  # [..., 1, Tv, D]
    pre = q + k  # [..., Tq, Tv, D]
    if scale is not None:
        pre = scale.astype(compute_dtype) * pre
    weight = concat_score_weight.astype(compute_dtype)
    return weight * jnp.sum(jnp.tanh(pre), axis=-1)  # [..., Tq, Tv]
