"""``implementation="cudnn"``, the GPU path: ``jax.nn.dot_product_attention(implementation=
"cudnn")`` with Keras semantics.

:func:`map_arguments` turns a checked call into the arguments of
``jax.nn.dot_product_attention`` (:class:`CudnnArguments`); :func:`attention` runs them,
and :func:`ineligibility` says why a call cannot take this route. What maps where:

* Keras's logits are ``scale * (q @ k^T)`` with no ``1/sqrt(D)``: the learned scale is
  folded into query and key without overflow (see
  :func:`~flax_dotattn._src.kernels.fused_inputs.fold_scale`) and ``scale=1.0`` is passed.
* ``bias`` and a pair mask (``attention_mask [..., Tq, Tv]``) go to ``bias`` and ``mask``
  as ``[B or 1, 1, Tq, Tv]`` (cuDNN wants the full ``Tq`` and ``Tv``; a batch dim it
  shares stays 1). The bias is rounded to the inputs' dtype, as cuDNN takes it.
* Key padding (the value mask, ``kv_length``, an ``attention_mask [..., 1, Tv]``) goes to
  ``key_value_seq_lengths`` and the query mask to ``query_seq_lengths``, when each is a
  prefix (a traced check).
* ``causal`` becomes ``is_causal`` and ``window=(left, right)`` becomes
  ``local_window_size=(left, 0)`` with ``is_causal``: cuDNN's window looks left only, so a
  window is taken with ``causal=True`` or ``right == 0`` (then the two agree), and both
  only for ``Tq == Tv`` (where top-left and bottom-right alignment agree).

cuDNN replaces masked logits where Keras subtracts 1e9: the two agree except on a row that
sees no key, where Keras averages over every key. So whenever some row that the query mask
keeps sees no key, a mask is not a prefix, or the folded scale overflows, the chunked path
runs instead (a ``lax.cond``; under ``jax.vmap`` both branches run).

Shape glossary: ``...`` batch dims, ``B`` their product, ``Tq``/``Tv`` query/key lengths,
``D`` depth.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from flax_dotattn._src.kernels.chunked import attention as blockwise_attention
from flax_dotattn._src.kernels.fused_inputs import (
    dense_attention_mask,
    fold_scale,
    positions,
    prefix_lengths,
    shown_keys,
)
from flax_dotattn._src.masks import Masking, keep_mask
from flax_dotattn._src.options import AttentionOptions
from flax_dotattn._src.types import Array
from flax_dotattn._src.validation import AttentionInputs, CheckedCall

#: Head sizes the cuDNN flash-attention kernels accept on every GPU (Hopper takes 256,
#: but the choice is made at lowering, before the GPU is known).
MAX_HEAD_SIZE = 128


def ineligibility(inputs: AttentionInputs, options: AttentionOptions) -> str | None:
    """Why cuDNN (through ``jax.nn.dot_product_attention``) cannot run this call with
    Keras's numbers, or None when it can. Checks static properties only; the traced ones
    (prefix masks, rows without keys) are :func:`map_arguments`'s fallback."""
    batch, (tq, d) = inputs.query.shape[:-2], inputs.query.shape[-2:]
    tv, dv = inputs.value.shape[-2:]
    right = options.window[1] if options.window is not None else None
    pair = dense_attention_mask(inputs) is not None or inputs.bias is not None
    reasons = [
        (
            inputs.dtype not in (jnp.float16, jnp.bfloat16),
            f"dtype {inputs.dtype} is not float16/bfloat16",
        ),
        (options.score_mode != "dot", "score_mode is not 'dot'"),
        (options.dropout, "dropout is active"),
        (options.return_attention_scores, "the weights are requested"),
        (options.logits_soft_cap is not None, "logits_soft_cap given (the kernel has no soft-cap)"),
        (options.score_mod is not None, "score_mod given (the kernel takes no score function)"),
        (options.mask_mod is not None, "mask_mod given (the kernel takes no mask function)"),
        (
            d != dv or d % 8 or d > MAX_HEAD_SIZE,
            f"head sizes D={d}, Dv={dv} (need D == Dv, a multiple of 8, <= {MAX_HEAD_SIZE})",
        ),
        (0 in (math.prod(batch), tq, tv), "a dimension is empty"),
        (
            inputs.masking.query_segment_ids is not None,
            "segment_ids given (cuDNN takes packed sequences as offsets, not ids)",
        ),
        (
            inputs.query_offset is not None,
            "query_offset given (cuDNN's causal mask and window start at query 0)",
        ),
        (
            options.window is not None and not options.causal and right != 0,
            f"window={options.window} sees keys to the right with causal=False (cuDNN's "
            "window looks left only)",
        ),
        (
            (options.causal or options.window is not None) and tq != tv,
            f"causal or window with Tq={tq} != Tv={tv}",
        ),
        (
            pair and bool(tq % 2 or tv % 2),
            f"a bias or attention_mask with an odd length Tq={tq}, Tv={tv} (cuDNN's "
            "backward takes even lengths)",
        ),
    ]
    for failed, reason in reasons:
        if failed:
            return reason
    return None


class CudnnArguments(NamedTuple):
    """The arguments :func:`attention` passes to ``jax.nn.dot_product_attention``."""

    query: Array  # [B, Tq, 1, D], scale folded in
    key: Array  # [B, Tv, 1, D], scale folded in
    value: Array  # [B, Tv, 1, D]
    bias: Array | None  # [B or 1, 1, Tq, Tv], the inputs' dtype
    mask: Array | None  # bool [B or 1, 1, Tq, Tv]
    is_causal: bool
    query_seq_lengths: Array | None  # int32 [B]
    key_value_seq_lengths: Array | None  # int32 [B]
    local_window_size: tuple[int, int] | None

    def run(self, implementation: Literal["xla", "cudnn"] | None) -> Array:
        """``jax.nn.dot_product_attention`` on these arguments: ``[B, Tq, 1, D]``."""
        query, key, value = self.query, self.key, self.value
        if implementation != "cudnn" and query.dtype == jnp.float16:
            # CPU dot_general has no float16 x float16 -> float32: the stand-in reads the
            # same (folded) float16 values in float32, as cuDNN accumulates in float32.
            query, key, value = (x.astype(jnp.float32) for x in (query, key, value))
        return jax.nn.dot_product_attention(
            query,
            key,
            value,
            bias=self.bias,
            mask=self.mask,
            scale=1.0,
            is_causal=self.is_causal,
            query_seq_lengths=self.query_seq_lengths,
            key_value_seq_lengths=self.key_value_seq_lengths,
            local_window_size=self.local_window_size,
            implementation=implementation,
        )


class Mapping(NamedTuple):
    """:class:`CudnnArguments` and when they give Keras's numbers."""

    arguments: CudnnArguments
    exact: Array | None  # traced bool; None when always (nothing to check)


def _pair_operand(x: Array, batch: tuple[int, ...], tq: int, tv: int) -> Array:
    """A ``[..., Tq, Tv]``-broadcastable array as ``[B or 1, 1, Tq, Tv]``."""
    x = jnp.broadcast_to(x, x.shape[:-2] + (tq, tv))
    if all(n == 1 for n in x.shape[:-2]):
        return x.reshape(1, 1, tq, tv)
    return jnp.broadcast_to(x, batch + (tq, tv)).reshape(-1, 1, tq, tv)


def _rows_without_keys(
    inputs: AttentionInputs,
    options: AttentionOptions,
    keys: Array | None,
    kv_len: Array | None,
) -> Array | None:
    """bool ``[..., Tq]`` (or ``[Tq]``): the rows that see no key; None when none can."""
    tq, tv = inputs.query.shape[-2], inputs.key.shape[-2]
    dense = dense_attention_mask(inputs)
    if dense is not None:  # the pairs are materialised already: read them
        visible = keep_mask(
            jnp.arange(tq),
            jnp.arange(tv),
            Masking(value_mask=keys, attention_mask=dense),
            causal=options.causal,
            window=options.window,
            batch_ndim=inputs.query.ndim - 2,
        )  # [..., Tq, Tv]
        return None if visible is None else ~jnp.any(visible, axis=-1)
    if kv_len is None:  # causal and window rows see their own key (Tq == Tv)
        return None
    rows = positions(tq, kv_len.ndim)  # [1.., Tq]
    last = kv_len[..., None] - 1  # [..., 1]
    if options.causal or options.window is not None:
        last = jnp.minimum(last, rows)  # [..., Tq]
    left = options.window[0] if options.window is not None else None
    first = jnp.zeros_like(rows) if left is None else jnp.maximum(rows - left, 0)
    return first > last  # [..., Tq]


def map_arguments(inputs: AttentionInputs, options: AttentionOptions) -> Mapping:
    """The ``jax.nn.dot_product_attention`` arguments of an eligible call (see the module
    docstring), and the traced condition under which they give Keras's numbers."""
    query = inputs.query
    batch, (tq, d) = query.shape[:-2], query.shape[-2:]
    tv = inputs.key.shape[-2]
    dtype = inputs.dtype
    # Key/value batch dims may broadcast against the query's: cuDNN wants them equal.
    key = jnp.broadcast_to(inputs.key.astype(dtype), batch + (tv, d))
    value = jnp.broadcast_to(inputs.value.astype(dtype), batch + (tv, d))
    query, key, overflow = fold_scale(query.astype(dtype), key, inputs.scale)
    checks = [] if inputs.scale is None else [~overflow]

    keys = shown_keys(inputs)
    kv_len = q_len = None
    if keys is not None:
        kv_len, kv_prefix = prefix_lengths(keys)  # [...]
        checks.append(kv_prefix)
    if inputs.query_mask is not None:
        q_len, q_prefix = prefix_lengths(inputs.query_mask)  # [...]
        checks.append(q_prefix)
    empty = _rows_without_keys(inputs, options, keys, kv_len)
    if empty is not None:
        if q_len is not None:  # rows the query mask drops may see nothing
            kept = positions(tq, q_len.ndim) < q_len[..., None]  # [..., Tq]
            empty = empty & kept.reshape((1,) * (empty.ndim - kept.ndim) + kept.shape)
        checks.append(~jnp.any(empty))

    dense = dense_attention_mask(inputs)
    left = options.window[0] if options.window is not None else None

    def lengths(x: Array | None) -> Array | None:
        return None if x is None else x.reshape(-1)  # [B]

    arguments = CudnnArguments(
        query=query.reshape(-1, tq, 1, d),
        key=key.reshape(-1, tv, 1, d),
        value=value.reshape(-1, tv, 1, d),
        bias=None
        if inputs.bias is None
        else _pair_operand(inputs.bias.astype(dtype), batch, tq, tv),
        mask=None if dense is None else _pair_operand(dense, batch, tq, tv),
        is_causal=options.causal or options.window is not None,
        query_seq_lengths=lengths(q_len),
        key_value_seq_lengths=lengths(kv_len),
        local_window_size=None if left is None else (left, 0),
    )
    exact = None
    for check in checks:
        exact = check if exact is None else exact & check
    return Mapping(arguments, exact)


def attention(
    call: CheckedCall, *, jax_nn_implementation: Literal["xla", "cudnn"] | None = "cudnn"
) -> Array:
    """Keras attention through ``jax.nn.dot_product_attention``, before the query mask.

    Where the kernel would give other numbers than Keras (see the module docstring), the
    chunked path runs instead.

    Args:
      call: a checked call that :func:`ineligibility` accepts.
      jax_nn_implementation: passed to ``jax.nn.dot_product_attention``: ``"cudnn"`` on a
        GPU; ``"xla"`` runs the same mapping anywhere (float16 read in float32 there).

    Returns:
      ``[..., Tq, Dv]`` in the inputs' dtype.
    """
    inputs = call.inputs
    batch, tq, dv = inputs.query.shape[:-2], inputs.query.shape[-2], inputs.value.shape[-1]
    mapping = map_arguments(inputs, call.options)

    def fused() -> Array:
        out = mapping.arguments.run(jax_nn_implementation)  # [B, Tq, 1, Dv]
        return out.reshape(batch + (tq, dv)).astype(inputs.dtype)

    def keras() -> Array:
        return blockwise_attention(call).astype(inputs.dtype)

    if mapping.exact is None:
        return fused()
    return lax.cond(mapping.exact, fused, keras)
