"""The materialised path: form the ``[..., Tq, Tv]`` scores, softmax, weighted sum.

Shape glossary: ``...`` batch dims, ``Tq``/``Tv`` query/key lengths, ``D`` query/key depth,
``Dv`` value depth.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from flax_dotattn._src import masks as masks_lib
from flax_dotattn._src.scores import masked_logits
from flax_dotattn._src.types import Array


def dropout_weights(weights: Array, rate: float, rng: Array) -> Array:
    """Inverted dropout: keeps each weight with probability ``1 - rate``, scaled up."""
    keep_prob = 1.0 - rate
    keep = jax.random.bernoulli(rng, keep_prob, weights.shape)  # [..., Tq, Tv]
    return jnp.where(keep, weights / jnp.asarray(keep_prob, weights.dtype), 0)


def materialised_attention(
    query: Array,
    key: Array,
    value: Array,
    masking: masks_lib.Masking,
    bias: Array | None,
    scale: Array | None,
    concat_score_weight: Array | None,
    *,
    score_mode: str,
    causal: bool,
    window: tuple[int | None, int | None] | None = None,
    dropout_rate: float,
    dropout_rng: Array | None,
    precision: Any,
    compute_dtype: Any,
) -> tuple[Array, Array]:
    """Keras's computation, step by step, before the query mask.

    Args:
      query: ``[..., Tq, D]``.
      key: ``[..., Tv, D]``.
      value: ``[..., Tv, Dv]``.
      masking: value mask ``[..., Tv]``, full mask (broadcastable ``[..., Tq, Tv]``) and
        segment ids ``[..., Tq]`` / ``[..., Tv]``, each None when absent.
      bias: float, broadcastable ``[..., Tq, Tv]`` (same rank), or None.
      scale: scalar ``[]`` or None.
      concat_score_weight: scalar ``[]`` (concat mode) or None.
      score_mode: ``"dot"`` or ``"concat"``.
      causal: apply the top-left causal mask.
      window: None or the sliding window ``(left, right)``.
      dropout_rate: dropout rate on the weights (0 disables).
      dropout_rng: PRNG key when ``dropout_rate > 0``.
      precision: matmul precision.
      compute_dtype: dtype of the computation (float32 for 16-bit inputs).

    Returns:
      ``(output [..., Tq, Dv], weights [..., Tq, Tv])`` in ``compute_dtype``.
    """
    tq, tv = query.shape[-2], key.shape[-2]
    keep = masks_lib.keep_mask(
        jnp.arange(tq),
        jnp.arange(tv),
        masking,
        causal=causal,
        window=window,
        batch_ndim=query.ndim - 2,
    )
    scores = masked_logits(
        query,
        key,
        keep,
        bias,
        score_mode=score_mode,
        scale=scale,
        concat_score_weight=concat_score_weight,
        precision=precision,
        compute_dtype=compute_dtype,
    )  # [..., Tq, Tv]
    weights = jax.nn.softmax(scores, axis=-1)  # [..., Tq, Tv]
    if dropout_rate > 0.0:
        weights = dropout_weights(weights, dropout_rate, dropout_rng)
    output = jnp.einsum(
        "...qk,...kd->...qd", weights, value.astype(compute_dtype), precision=precision
    )  # [..., Tq, Dv]
    return output, weights
