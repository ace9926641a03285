"""``implementation="xla"``, the materialised path: form the ``[..., Tq, Tv]`` scores,
softmax, weighted sum (Keras's computation, step by step).

Shape glossary: ``...`` batch dims, ``Tq``/``Tv`` query/key lengths, ``D`` query/key depth,
``Dv`` value depth.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flax_dotattn._src import masks as masks_lib
from flax_dotattn._src import mods
from flax_dotattn._src.options import AttentionOptions
from flax_dotattn._src.scores import masked_logits
from flax_dotattn._src.types import Array
from flax_dotattn._src.validation import AttentionInputs


def dropout_weights(weights: Array, rate: float, rng: Array) -> Array:
    """Inverted dropout: keeps each weight with probability ``1 - rate``, scaled up."""
    keep_prob = 1.0 - rate
    keep = jax.random.bernoulli(rng, keep_prob, weights.shape)  # [..., Tq, Tv]
    return jnp.where(keep, weights / jnp.asarray(keep_prob, weights.dtype), 0)


def softmax(scores: Array) -> tuple[Array, Array]:
    """``jax.nn.softmax`` over the keys, and which rows have one: ``(weights, seen)``,
    ``seen [..., Tq, 1]`` False for a row whose every logit is ``-inf`` (a ``-inf`` bias),
    whose weights are 0 here. The caller writes NaN into such rows through a constant,
    after the weighted sum, so their derivative is 0, not NaN: a query mask that zeroes
    the row leaves every gradient finite, as on the chunked path."""
    if scores.shape[-1] == 0:  # no keys: no logits, nothing to write NaN into
        return scores, jnp.ones(scores.shape[:-1] + (1,), bool)
    top = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    seen = top > -jnp.inf
    unnormalised = jnp.exp(scores - jnp.where(seen, top, jnp.zeros((), top.dtype)))
    total = jnp.sum(unnormalised, axis=-1, keepdims=True)
    return unnormalised / jnp.where(seen, total, jnp.ones((), total.dtype)), seen


def materialised_attention(
    options: AttentionOptions, inputs: AttentionInputs, dropout_rng: Array | None
) -> tuple[Array, Array]:
    """Keras's computation, step by step, before the query mask.

    Args:
      options: the call's options (score mode, causal, window, dropout, precision).
      inputs: the checked arrays: query ``[..., Tq, D]``, key ``[..., Tv, D]``, value
        ``[..., Tv, Dv]``, the masking (value mask ``[..., Tv]``, full mask broadcastable
        to ``[..., Tq, Tv]``, segment ids ``[..., Tq]`` / ``[..., Tv]``), the bias
        (broadcastable to ``[..., Tq, Tv]``, same rank), the scalars and the compute
        dtype (float32 for 16-bit inputs); ``query_offset`` (``[]`` or at the batch's
        rank) moves the queries' positions for ``causal`` and ``window``.
      dropout_rng: PRNG key when dropout applies, else None.

    Returns:
      ``(output [..., Tq, Dv], weights [..., Tq, Tv])`` in the compute dtype.
    """
    query, key, value = inputs.query, inputs.key, inputs.value
    compute_dtype, precision = inputs.compute_dtype, options.lax_precision
    query_positions = jnp.arange(query.shape[-2])  # [Tq]
    offset = inputs.query_offset  # [] or at the batch's rank
    if offset is not None:  # [(...,) Tq]
        query_positions = offset[..., None] + query_positions.reshape(
            (1,) * offset.ndim + query_positions.shape
        )
    keep = masks_lib.keep_mask(
        query_positions,
        jnp.arange(key.shape[-2]),
        inputs.masking,
        causal=options.causal,
        window=options.window,
        batch_ndim=query.ndim - 2,
    )
    # The score and mask functions see every pair at once: q_pos [(...,) Tq, 1], kv_pos
    # [1, Tv], absolute int32 positions.
    q_pos = query_positions.astype(jnp.int32)[..., :, None]
    kv_pos = jnp.arange(key.shape[-2], dtype=jnp.int32)[None, :]
    batch = jnp.broadcast_shapes(query.shape[:-2], key.shape[:-2])
    if options.mask_mod is not None:
        visible = mods.call_mask_mod(options.mask_mod, q_pos, kv_pos, batch)
        visible = visible.reshape((1,) * (len(batch) + 2 - visible.ndim) + visible.shape)
        keep = visible if keep is None else keep & visible
    modify = None
    if options.score_mod is not None:
        score_mod = options.score_mod

        def modify(scores: Array) -> Array:
            return mods.call_score_mod(score_mod, scores, q_pos, kv_pos)

    scores = masked_logits(
        query,
        key,
        keep,
        inputs.bias,
        logits_soft_cap=options.logits_soft_cap,
        modify=modify,
        score_mode=options.score_mode,
        scale=inputs.scale,
        concat_score_weight=inputs.concat_score_weight,
        precision=precision,
        compute_dtype=compute_dtype,
    )  # [..., Tq, Tv]
    if inputs.bias is None and scores.shape[-1] > 0:
        # Masks subtract 1e9 (Keras's rule), so only a bias can make a whole row -inf: the
        # plain softmax, which XLA:CPU fuses with both products into one kernel (1.3x
        # faster than the guarded one at 32 x 128).
        top = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
        unnormalised = jnp.exp(scores - top)
        weights, seen = unnormalised / jnp.sum(unnormalised, axis=-1, keepdims=True), None
    else:
        weights, seen = softmax(scores)  # [..., Tq, Tv], [..., Tq, 1]
    if dropout_rng is not None:
        weights = dropout_weights(weights, options.applied_dropout_rate, dropout_rng)
    output = jnp.einsum(
        "...qk,...kd->...qd", weights, value.astype(compute_dtype), precision=precision
    )  # [..., Tq, Dv]
    if seen is None:
        return output, weights
    nan = jnp.full((), jnp.nan, output.dtype)  # rows without a softmax (every logit -inf)
    return jnp.where(seen, output, nan), jnp.where(seen, weights, nan)
