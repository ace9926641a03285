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
from flax_dotattn._src import mods
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


#: Query rows per block where the row check needs the pairs (a full attention mask or
#: segment ids): it holds ``[..., block, Tv]`` booleans at a time.
ROWS_BLOCK = 512


def rows_with_keys(call: CheckedCall) -> Array | None:
    """Which query rows see at least one key, ``bool`` of the scores' rank less one
    (``[..., Tq]``, broadcastable; a masked query sees none); None when nothing masks.

    Causal, window, ``query_offset``, ``kv_length``, value masks and key-padding masks
    ``[..., 1, Tv]`` give each row a band of keys and a count of kept keys in it (a prefix
    sum over the keys): ``O(Tq + Tv)`` memory. A full ``attention_mask``, segment ids or a
    ``mask_mod`` need the pairs: they are reduced :data:`ROWS_BLOCK` query rows at a time.
    """
    inputs, options = call.inputs, call.options
    tq, tv = inputs.query.shape[-2], inputs.key.shape[-2]
    rank = inputs.query.ndim - 1  # of [..., Tq]
    positions = jnp.arange(tq, dtype=jnp.int32)
    if inputs.query_offset is not None:
        offset = jnp.asarray(inputs.query_offset, jnp.int32)
        positions = offset[..., None] + positions.reshape((1,) * offset.ndim + (tq,))
    q_pos = positions[..., :, None]  # [(...,) Tq, 1], as the kernels pass a mask_mod
    positions = positions.reshape((1,) * (rank - positions.ndim) + positions.shape)
    masking = inputs.masking
    value_mask, full = masking.value_mask, masking.attention_mask
    if full is not None and full.shape[-2] == 1:  # key padding: a value mask
        keys = full[..., 0, :]
        value_mask = keys if value_mask is None else value_mask & keys
        full = None
    seen: Array | None
    if full is not None or masking.query_segment_ids is not None or options.mask_mod is not None:
        seen = _rows_by_blocks(
            positions, q_pos, masking._replace(value_mask=value_mask, attention_mask=full), call
        )
    elif not options.causal and options.window is None and value_mask is None:
        seen = None if tv else jnp.zeros((1,) * (rank - 1) + (tq,), bool)
    else:
        seen = _rows_by_bands(positions, value_mask, options.causal, options.window, tv)
    if inputs.query_mask is not None:
        seen = inputs.query_mask if seen is None else seen & inputs.query_mask
    return seen


def _rows_by_bands(
    positions: Array,
    value_mask: Array | None,
    causal: bool,
    window: tuple[int | None, int | None] | None,
    tv: int,
) -> Array:
    """Rows whose band ``[lo, hi]`` of keys (from causal and the window) holds a kept key:
    ``count(hi) - count(lo - 1) > 0`` over the value mask's prefix sums."""
    lo = jnp.zeros_like(positions)
    hi = jnp.full_like(positions, tv - 1)
    if causal:
        hi = jnp.minimum(hi, positions)
    if window is not None:
        left, right = window
        if left is not None:
            lo = jnp.maximum(lo, positions - left)
        if right is not None:
            hi = jnp.minimum(hi, positions + right)
    nonempty = hi >= lo
    if value_mask is None:
        return nonempty
    counts = jnp.cumsum(value_mask.astype(jnp.int32), axis=-1)  # [..., Tv]
    counts = jnp.concatenate([jnp.zeros_like(counts[..., :1]), counts], axis=-1)  # [..., Tv+1]
    batch = jnp.broadcast_shapes(counts.shape[:-1], lo.shape[:-1])
    counts = jnp.broadcast_to(counts, (*batch, tv + 1))
    upper = jnp.broadcast_to(jnp.clip(hi + 1, 0, tv), (*batch, lo.shape[-1]))
    lower = jnp.broadcast_to(jnp.clip(lo, 0, tv), (*batch, lo.shape[-1]))
    kept = jnp.take_along_axis(counts, upper, axis=-1) - jnp.take_along_axis(counts, lower, axis=-1)
    return nonempty & (kept > 0)


def _rows_by_blocks(
    positions: Array, q_pos: Array, masking: masks_lib.Masking, call: CheckedCall
) -> Array:
    """Rows with a kept key, from the pairs' mask (the ``mask_mod`` ANDed in, at the
    rows' absolute positions ``q_pos [(...,) Tq, 1]``), :data:`ROWS_BLOCK` rows at a
    time."""
    inputs, options = call.inputs, call.options
    tq, tv = inputs.query.shape[-2], inputs.key.shape[-2]
    rank = inputs.query.ndim  # of the scores
    batch = jnp.broadcast_shapes(inputs.query.shape[:-2], inputs.key.shape[:-2])
    kv_pos = jnp.arange(tv, dtype=jnp.int32)[None, :]
    blocks = []
    for start in range(0, tq, ROWS_BLOCK):
        rows = slice(start, min(start + ROWS_BLOCK, tq))
        full = masking.attention_mask
        if full is not None and full.shape[-2] == tq:
            full = full[..., rows, :]
        q_seg = masking.query_segment_ids
        if q_seg is not None and q_seg.shape[-1] == tq:
            q_seg = q_seg[..., rows]
        keep = masks_lib.keep_mask(
            positions[..., rows],
            jnp.arange(tv),
            masks_lib.Masking(masking.value_mask, full, q_seg, masking.kv_segment_ids),
            causal=options.causal,
            window=options.window,
            batch_ndim=inputs.query.ndim - 2,
        )
        if options.mask_mod is not None:
            visible = mods.call_mask_mod(options.mask_mod, q_pos[..., rows, :], kv_pos, batch)
            visible = visible.reshape((1,) * (rank - visible.ndim) + visible.shape)
            keep = visible if keep is None else keep & visible
        assert keep is not None
        blocks.append(jnp.any(keep, axis=-1))  # [..., rows]
    if len(blocks) == 1:
        return blocks[0]
    batch = jnp.broadcast_shapes(*(b.shape[:-1] for b in blocks))
    return jnp.concatenate([jnp.broadcast_to(b, (*batch, b.shape[-1])) for b in blocks], -1)
