"""What the fused GPU kernels (``"cudnn"``, ``"pallas_gpu"``) share: the learned scale
folded into query and key, the keys every query may see, and prefix lengths.

Both kernels take a static scale only and replace masked logits by a large negative
number (where Keras subtracts 1e9), so both need the same preparation: Keras's
``scale * (q @ k^T)`` enters through the inputs (:func:`fold_scale`), and the key padding
(value mask, ``kv_length``, an ``attention_mask [..., 1, Tv]``) becomes lengths or segment
ids (:func:`shown_keys`, :func:`prefix_lengths`).

Shape glossary: ``...`` batch dims, ``Tq``/``Tv`` query/key lengths, ``D`` depth.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax.numpy as jnp

from flax_dotattn._src.types import Array
from flax_dotattn._src.validation import AttentionInputs

#: The chunked kernel's entry, ``reference(call, with_stats=False)``, as the runner hands it
#: to a fused kernel: a fused kernel takes its forward-mode derivatives through it (the
#: kernels never import each other; the runner composes them).
Reference = Callable[..., Any]


class Fused(NamedTuple):
    """What a fused kernel returns for one call; the runner composes the fallback."""

    run: Callable[[], Array]  # the kernel's output [..., Tq, Dv] before the query mask
    exact: Array | None  # traced bool: the kernel gives Keras's numbers; None: always
    dtype: Any  # the output's dtype (the fallback's output is cast to it)


def fold_scale(query: Array, key: Array, scale: Array | None) -> tuple[Array, Array, Array]:
    """Folds the learned ``scale`` into query and key without overflow.

    The kernels take a static scale only, so a learned (traced) ``scale`` must enter
    through the inputs: ``q' = q * scale / 2**a`` (one rounding to the input dtype) and
    ``k' = k * 2**a`` (exact: a power of two), with ``a`` chosen so that both maxima are
    about ``sqrt(max|q * scale| * max|k|)``. Folding into ``q`` alone would overflow
    float16 for ``|q * scale| > 65504``.

    Args:
      query: ``[..., Tq, D]``, float16/bfloat16/float32.
      key: ``[..., Tv, D]``, same dtype.
      scale: scalar ``[]`` or None.

    Returns:
      ``(query', key', overflow)``: ``overflow`` (a traced bool) is True when even the
      balanced fold leaves a non-finite value, in which case the caller must fall back.

    Examples:
      >>> import jax.numpy as jnp
      >>> q, k = jnp.full((1, 2, 8), 300.0, jnp.float16), jnp.ones((1, 2, 8), jnp.float16)
      >>> q2, k2, overflow = fold_scale(q, k, jnp.float32(1000.0))  # q * scale > 65504
      >>> product = float(q2[0, 0, 0]) * float(k2[0, 0, 0])  # 300 * 1000, to float16's rounding
      >>> bool(overflow), abs(product / 300_000.0 - 1.0) < 2**-9
      (False, True)
    """
    if scale is None:
        return query, key, jnp.zeros((), bool)
    dtype = query.dtype
    scale = scale.astype(jnp.float32)
    q32, k32 = query.astype(jnp.float32), key.astype(jnp.float32)
    q_max = jnp.max(jnp.abs(q32)) * jnp.abs(scale) if query.size else jnp.float32(0)
    k_max = jnp.max(jnp.abs(k32)) if key.size else jnp.float32(0)
    shift = jnp.where(
        (q_max > 0) & (k_max > 0) & jnp.isfinite(q_max),
        jnp.round(0.5 * jnp.log2(jnp.maximum(q_max, 1e-30) / jnp.maximum(k_max, 1e-30))),
        0.0,
    )
    shift = jnp.clip(shift, -60.0, 60.0)
    q_folded = (q32 * (scale * jnp.exp2(-shift))).astype(dtype)  # [..., Tq, D]
    k_folded = (k32 * jnp.exp2(shift)).astype(dtype)  # [..., Tv, D]
    overflow = ~(jnp.all(jnp.isfinite(q_folded)) & jnp.all(jnp.isfinite(k_folded)))
    return q_folded, k_folded, overflow


def key_padding_mask(inputs: AttentionInputs) -> Array | None:
    """An ``attention_mask`` that masks keys only (``[..., 1, Tv]``), or None."""
    mask = inputs.masking.attention_mask
    if mask is None or mask.shape[-2] != 1:
        return None
    return mask


def dense_attention_mask(inputs: AttentionInputs) -> Array | None:
    """An ``attention_mask`` that masks (query, key) pairs (not ``[..., 1, Tv]``), or
    None."""
    return None if key_padding_mask(inputs) is not None else inputs.masking.attention_mask


def shown_keys(inputs: AttentionInputs) -> Array | None:
    """bool ``[..., Tv]``: the keys no mask hides from every query (the value mask, the
    filled ``kv_length`` and an ``attention_mask [..., 1, Tv]``), broadcast to the
    query's batch dims; None when nothing masks keys alone."""
    batch, tv = inputs.query.shape[:-2], inputs.key.shape[-2]
    shown = inputs.masking.value_mask
    padding = key_padding_mask(inputs)
    if padding is not None:
        keys = jnp.broadcast_to(padding[..., 0, :], batch + (tv,))
        shown = keys if shown is None else shown & keys
    return None if shown is None else jnp.broadcast_to(shown, batch + (tv,))


def prefix_lengths(mask: Array) -> tuple[Array, Array]:
    """Lengths of a bool ``[..., T]`` mask and whether it is a prefix mask.

    Returns:
      ``(lengths, is_prefix)``: int32 ``[...]`` the number of True entries per row, and
      a traced bool, True when every row is ``arange(T) < length``.

    Examples:
      >>> import jax.numpy as jnp
      >>> lengths, ok = prefix_lengths(jnp.array([[1, 1, 0], [1, 0, 0]], bool))
      >>> lengths.tolist(), bool(ok)
      ([2, 1], True)
      >>> bool(prefix_lengths(jnp.array([[0, 1, 1]], bool))[1])
      False
    """
    lengths = jnp.sum(mask, axis=-1, dtype=jnp.int32)  # [...]
    prefix = positions(mask.shape[-1], lengths.ndim) < lengths[..., None]  # [..., T]
    return lengths, jnp.all(prefix == mask)


def positions(n: int, batch_ndim: int) -> Array:
    """``arange(n)`` as ``[1, ..., 1, n]`` with ``batch_ndim`` leading 1s (no implicit
    rank promotion against ``[..., 1]`` operands)."""
    return jnp.arange(n).reshape((1,) * batch_ndim + (n,))
