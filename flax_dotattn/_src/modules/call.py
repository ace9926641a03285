"""The one call path of the Linen and NNX modules.

Both modules declare the fields of :class:`DotAttentionConfig` and call
:func:`module_attention`, which resolves the call's arguments against the fields, casts
the inputs, draws the dropout key and runs what :func:`dot_attention` runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp

from flax_dotattn._src import masks as masks_lib
from flax_dotattn._src.attention import attend
from flax_dotattn._src.config.schema import DotAttentionFields, field_values
from flax_dotattn._src.options import OPTIONS
from flax_dotattn._src.types import Array
from flax_dotattn._src.validation import CheckedCall, check_call

#: The call arguments that override the field of the same name when they are not None.
_OVERRIDES = ("causal", "window", "deterministic")


def module_attention(
    config: DotAttentionFields,
    params: Mapping[str, Array],
    arguments: Mapping[str, Any],
    *,
    dropout_rng: Callable[[], Array],
    where_deterministic: str,
    zero_rows_without_keys: bool = False,
) -> Array | tuple[Array, Array]:
    """Runs :func:`dot_attention` for a module whose fields are ``config``.

    Args:
      config: the module's validated fields.
      params: the learned scalars, ``{name: []}`` for ``config.param_names``.
      arguments: the module call's arguments by name (its ``locals()`` on entry):
        ``query``, ``value``, ``key``, ``masks``, ``attention_mask``, ``bias``,
        ``segment_ids`` and ``return_attention_scores`` as :func:`dot_attention` takes
        them; ``causal``, ``window`` and ``deterministic`` override the fields when not
        None.
      dropout_rng: returns the dropout key; called only when dropout is active.
      where_deterministic: where the user can set ``deterministic`` (for the error).
      zero_rows_without_keys: Keras ``MultiHeadAttention``'s rule (its masked softmax):
        a query row that sees no key (every key masked, or a masked query) gets zero
        weights and a zero output, instead of :func:`dot_attention`'s (Keras
        ``Attention``'s) softmax over the shifted logits.

    Raises:
      ValueError: when dropout is configured but neither the field nor the call sets
        ``deterministic``, and for everything :func:`dot_attention` rejects.
    """
    # The fields, then the call's arguments; check_call reads the options among them.
    call = {**field_values(config), **arguments, "params": params}
    for name in _OVERRIDES:
        value = arguments[name]
        call[name] = getattr(config, name) if value is None else OPTIONS[name].check(name, value)
    if call["deterministic"] is None:
        if config.dropout_rate > 0.0:
            raise ValueError(
                "DotAttention with dropout_rate > 0 needs deterministic=True/False "
                f"({where_deterministic}); received neither."
            )
        call["deterministic"] = True
    if config.dtype is not None:
        for name in ("query", "value", "key"):
            if call[name] is not None:
                call[name] = jnp.asarray(call[name], config.dtype)
    use_dropout = not call["deterministic"] and config.dropout_rate > 0.0
    call["dropout_rng"] = dropout_rng() if use_dropout else None
    checked = check_call(call)
    result = attend(checked)
    if not zero_rows_without_keys:
        return result
    seen = rows_with_keys(checked)
    if seen is None:
        return result
    output, weights = result if isinstance(result, tuple) else (result, None)
    output = jnp.where(seen[..., None], output, jnp.zeros((), output.dtype))  # [..., Tq, Dv]
    if weights is None:
        return output
    return output, jnp.where(seen[..., None], weights, jnp.zeros((), weights.dtype))


def rows_with_keys(call: CheckedCall) -> Array | None:
    """Which query rows see at least one key, ``bool`` broadcastable to ``[..., Tq]``
    (a masked query sees none); None when nothing masks.

    The any-reduction over the keys fuses with the mask's comparisons (XLA does not
    store the ``[..., Tq, Tv]`` mask), so its cost is one pass over the pairs' positions
    and masks.
    """
    inputs, options = call.inputs, call.options
    tq, tv = inputs.query.shape[-2], inputs.key.shape[-2]
    query_positions = jnp.arange(tq)  # [Tq]
    if inputs.query_offset is not None:  # [(...,) Tq]
        offset = jnp.asarray(inputs.query_offset)
        query_positions = offset[..., None] + query_positions.reshape(
            (1,) * offset.ndim + query_positions.shape
        )
    keep = masks_lib.keep_mask(
        query_positions,
        jnp.arange(tv),
        inputs.masking,
        causal=options.causal,
        window=options.window,
        batch_ndim=inputs.query.ndim - 2,
    )
    seen = None if keep is None else jnp.any(keep, axis=-1)  # [..., Tq]
    if tv == 0:
        seen = jnp.zeros((1,) * (inputs.query.ndim - 2) + (tq,), bool)
    if inputs.query_mask is not None:
        seen = inputs.query_mask if seen is None else seen & inputs.query_mask
    return seen
