"""Keras attention logits: the ``"dot"`` and ``"concat"`` score functions.

:func:`logits` and :func:`masked_logits` are the unchecked building blocks every kernel
uses; :func:`attention_scores` is the public, validated entry point.

Shape glossary: ``...`` batch dims, ``Tq``/``Tv`` query/key lengths, ``D`` depth.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from flax_dotattn._src import validation
from flax_dotattn._src.masks import apply_score_mask
from flax_dotattn._src.options import check_precision, float_dtype_name, to_lax_precision
from flax_dotattn._src.types import Array, ScoreMode


def logits(
    query: Array,
    key: Array,
    *,
    score_mode: str,
    scale: Array | None,
    concat_score_weight: Array | None,
    precision: Any,
    compute_dtype: Any,
) -> Array:
    """Unmasked logits ``[..., Tq, Tv]`` in ``compute_dtype``; arguments are trusted."""
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
    scores = jnp.sum(jnp.tanh(pre), axis=-1)  # [..., Tq, Tv]
    if concat_score_weight is not None:  # always, once checked: concat mode requires it
        scores = concat_score_weight.astype(compute_dtype) * scores
    return scores


def soft_cap(scores: Array, cap: float | None) -> Array:
    """``cap * tanh(scores / cap)`` (``scores`` itself when ``cap`` is None)."""
    if cap is None:
        return scores
    c = jnp.asarray(cap, scores.dtype)
    return c * jnp.tanh(scores / c)


def masked_logits(
    query: Array,
    key: Array,
    keep: Array | None,
    bias: Array | None = None,
    *,
    logits_soft_cap: float | None = None,
    modify: Callable[[Array], Array] | None = None,
    **options: Any,
) -> Array:
    """:func:`logits`, plus ``bias`` (broadcastable), soft-capped (``cap * tanh(s /
    cap)``), changed by ``modify`` (a ``score_mod`` with its positions bound), then
    Keras's masking rule (``keep``: bool, broadcastable; masked logits get 1e9
    subtracted)."""
    scores = logits(query, key, **options)  # [..., Tq, Tv]
    if bias is not None:
        scores = scores + bias.astype(scores.dtype)
    scores = soft_cap(scores, logits_soft_cap)
    if modify is not None:
        scores = modify(scores)
    return apply_score_mask(scores, keep)  # [..., Tq, Tv]


def attention_scores(
    query: Array,
    key: Array,
    *,
    score_mode: ScoreMode = "dot",
    scale: Array | float | None = None,
    concat_score_weight: Array | float | None = None,
    precision: Any = None,
    compute_dtype: Any = None,
) -> Array:
    """Computes the unmasked Keras attention logits.

    * ``"dot"``: ``scores = scale * (query @ key^T)`` (no ``1/sqrt(D)``).
    * ``"concat"``: ``scores = concat_score_weight * sum(tanh(scale * (q + k)), -1)``.

    ``scale`` is omitted when None.

    Args:
      query: ``[..., Tq, D]``, a real floating array.
      key: ``[..., Tv, D]``, depth ``D`` as ``query``; batch dims broadcast against the
        query's (size-1 dims for shared keys, as in :func:`dot_attention`).
      score_mode: ``"dot"`` or ``"concat"``.
      scale: a scalar (array of shape ``()`` or Python number) or None.
      concat_score_weight: a scalar; required for ``"concat"``, rejected for ``"dot"``.
      precision: passed to the matmul (``jax.lax.Precision`` or its name), or None.
      compute_dtype: dtype of the logits; defaults to the inputs' dtype (float32 for
        float16/bfloat16 inputs, as in :func:`dot_attention`).

    Returns:
      Logits ``[..., Tq, Tv]`` in ``compute_dtype``.

    Raises:
      ValueError: on bad shapes, dtypes, ``score_mode``, scalars or ``precision``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax_dotattn import attention_scores
      >>> q = jnp.array([[1.0, 0.0], [0.0, 1.0]])   # [Tq=2, D=2]
      >>> k = jnp.array([[0.0, 1.0], [1.0, 0.0]])   # [Tv=2, D=2]
      >>> attention_scores(q, k, scale=2.0).tolist()
      [[0.0, 2.0], [2.0, 0.0]]
      >>> attention_scores(q, k, score_mode="concat", concat_score_weight=1.0).shape
      (2, 2)
    """
    inputs = validation.check_inputs(
        validation.params_of(scale=scale, concat_score_weight=concat_score_weight),
        query,
        key,
        key,
        None,
        score_mode,
        value_name="key",
    )
    lax_precision = to_lax_precision(check_precision("precision", precision))
    compute_dtype = (
        inputs.compute_dtype
        if compute_dtype is None
        else jnp.dtype(float_dtype_name("compute_dtype", compute_dtype))
    )
    return logits(
        inputs.query,
        inputs.key,
        score_mode=score_mode,
        scale=inputs.scale,
        concat_score_weight=inputs.concat_score_weight,
        precision=lax_precision,
        compute_dtype=compute_dtype,
    )
