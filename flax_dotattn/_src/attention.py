"""The pure dot-product (Luong-style) attention function with Keras 3 semantics.

Shape glossary: ``...`` any number of leading batch dims (including none), ``Tq`` query
length, ``Tv`` key/value length, ``D`` query/key depth, ``Dv`` value depth.

This module imports neither flax nor keras.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from flax_dotattn._src import masks as masks_lib
from flax_dotattn._src import validation

Array = jax.Array
Params = Mapping[str, Any] | None
Masks = Sequence[Any] | None


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


def _dropout(weights: Array, rate: float, rng: Array) -> Array:
    """Inverted dropout: keeps each weight with probability ``1 - rate``, scaled up."""
    keep_prob = 1.0 - rate
    keep = jax.random.bernoulli(rng, keep_prob, weights.shape)  # [..., Tq, Tv]
    return jnp.where(keep, weights / jnp.asarray(keep_prob, weights.dtype), 0)


def dot_attention(
    params: Params,
    query: Array,
    value: Array,
    key: Array | None = None,
    masks: Masks = None,
    causal: bool = False,
    *,
    score_mode: str = "dot",
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    deterministic: bool = True,
    return_attention_scores: bool = False,
    precision: Any = None,
    implementation: str | None = None,
) -> Array | tuple[Array, Array]:
    """Keras's dot-product (Luong-style) attention as a pure function.

    Computes, exactly as Keras 3's ``keras.layers.Attention``::

        scores  = query @ key^T               # "dot"; times params["scale"] if given
        scores  = w * sum(tanh(s * (q + k)))  # "concat"; w = concat_score_weight
        scores  = where(mask, scores, scores - 1e9)   # value mask AND causal mask
        weights = softmax(scores, axis=-1)            # then dropout if training
        output  = weights @ value                     # rows of masked queries -> 0

    There is no ``1/sqrt(D)`` factor: the learned ``scale`` plays that role.

    *Fully masked rows.* Masked logits have 1e9 *subtracted* (Keras's rule), so a query
    whose keys are all masked still gets a finite distribution: the softmax of its
    shifted logits, ``softmax(scores - 1e9)``. In float32 that subtraction rounds the
    logits to multiples of 64, so such rows are (near) uniform over the keys, not NaN.

    *Low precision.* For float16/bfloat16 inputs the logits, softmax and weighted sum
    run in float32 and the results are cast back, so no NaN/inf appears for finite
    inputs (Keras overflows to NaN on fully masked float16 rows).

    Args:
      params: None or a mapping with optional scalar leaves ``"scale"`` (Keras's
        ``use_scale`` weight) and ``"concat_score_weight"`` (required when
        ``score_mode="concat"``). Any other key raises ``ValueError``.
      query: ``[..., Tq, D]``, a real floating array.
      value: ``[..., Tv, Dv]``, same leading dims as ``query``.
      key: ``[..., Tv, D]`` or None, in which case ``value`` is used (as in Keras).
      masks: None or a pair ``(query_mask, value_mask)``; each is None or an array of
        shape ``[..., Tq]`` / ``[..., Tv]``, bool or numeric (nonzero keeps). Masked
        queries get zero output rows; masked values get no weight.
      causal: Python bool (static). Query ``i`` attends to keys ``j <= i``, top-left
        aligned when ``Tq != Tv`` (see :func:`make_causal_mask`).
      score_mode: ``"dot"`` or ``"concat"``.
      dropout_rate: probability in ``[0, 1)`` of dropping an attention weight.
      dropout_rng: PRNG key; required when dropout is active.
      deterministic: if True (default) no dropout is applied.
      return_attention_scores: also return the (post-dropout) attention weights.
      precision: matmul precision (``jax.lax.Precision`` or its name), or None.
      implementation: None (choose automatically) or ``"xla"`` (the materialised
        ``[..., Tq, Tv]`` computation).

    Returns:
      ``output [..., Tq, Dv]`` in the inputs' dtype, or ``(output, weights)`` with
      ``weights [..., Tq, Tv]`` when ``return_attention_scores`` is True. The weights
      are not zeroed for masked queries (as in Keras).

    Raises:
      ValueError: on bad shapes, dtypes, masks, params keys, ``score_mode``,
        ``implementation``, dropout settings, or a non-bool ``causal``.

    Examples:
      Keras's own 2x2 example; the weights are ``[1, e] / (1 + e)``:

      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> from flax_dotattn import dot_attention
      >>> query = jnp.array([[1.0, 0.0], [0.0, 1.0]])   # [Tq=2, D=2]
      >>> key = jnp.array([[0.0, 1.0], [1.0, 0.0]])     # [Tv=2, D=2]
      >>> value = jnp.array([[1.0, 2.0], [3.0, 4.0]])   # [Tv=2, Dv=2]
      >>> out, w = dot_attention(None, query, value, key, return_attention_scores=True)
      >>> print(np.asarray(w).round(3))
      [[0.269 0.731]
       [0.731 0.269]]
      >>> print(np.asarray(out).round(3))
      [[2.462 3.462]
       [1.538 2.538]]

      Causal attention with a learned scale and a padding mask on the keys:

      >>> params = {"scale": jnp.float32(2.0)}
      >>> masks = (None, jnp.array([True, False]))
      >>> print(dot_attention(params, query, value, key, masks, causal=True))
      [[1. 2.]
       [1. 2.]]
    """
    causal = validation.check_static_bool("causal", causal)
    deterministic = validation.check_static_bool("deterministic", deterministic)
    return_attention_scores = validation.check_static_bool(
        "return_attention_scores", return_attention_scores
    )
    validation.check_choice("implementation", implementation, validation.IMPLEMENTATIONS)
    dropout_rate = validation.check_dropout_rate(dropout_rate)
    inputs = validation.check_inputs(params, query, value, key, masks, score_mode)
    use_dropout = not deterministic and dropout_rate > 0.0
    if use_dropout and dropout_rng is None:
        raise ValueError(
            f"dropout_rng is required when deterministic=False and dropout_rate > 0; "
            f"received dropout_rng=None with dropout_rate={dropout_rate}."
        )

    cdt = inputs.compute_dtype
    tq, tv = inputs.query.shape[-2], inputs.key.shape[-2]
    scores = attention_scores(
        inputs.query,
        inputs.key,
        score_mode=score_mode,
        scale=inputs.scale,
        concat_score_weight=inputs.concat_score_weight,
        precision=precision,
        compute_dtype=cdt,
    )  # [..., Tq, Tv]
    score_mask = masks_lib.combine_score_mask(
        inputs.value_mask, causal, tq, tv, inputs.query.ndim - 2
    )
    scores = masks_lib.apply_score_mask(scores, score_mask)  # [..., Tq, Tv]
    weights = jax.nn.softmax(scores, axis=-1)  # [..., Tq, Tv]
    if use_dropout:
        weights = _dropout(weights, dropout_rate, dropout_rng)
    output = jnp.einsum(
        "...qk,...kd->...qd",
        weights,
        inputs.value.astype(cdt),
        precision=precision,
    )  # [..., Tq, Dv]
    if inputs.query_mask is not None:
        output = jnp.where(inputs.query_mask[..., None], output, 0)  # [..., Tq, Dv]
    output = output.astype(inputs.dtype)
    if return_attention_scores:
        return output, weights.astype(inputs.dtype)
    return output
