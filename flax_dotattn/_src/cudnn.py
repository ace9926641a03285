"""``implementation="cudnn"``, the GPU path: ``jax.nn.dot_product_attention(implementation=
"cudnn")`` with Keras semantics.

Keras's logits are ``scale * (q @ k^T)`` with no ``1/sqrt(D)``: the learned scale is
folded into query and key without overflow (:func:`fold_scale`) and ``scale=1.0`` is
passed. The value mask becomes a boolean
``[B, 1, 1, Tv]`` mask and ``causal`` becomes ``is_causal`` (only for ``Tq == Tv``, where
top-left and bottom-right alignment agree). For rows that see no key, Keras's
subtract-1e9 rule gives a (near-uniform) distribution where the fused kernel would not,
so when any such row exists the dispatcher falls back to the chunked path (a
``lax.cond`` on :func:`needs_fallback`).

Shape glossary: ``...`` batch dims, ``Tq``/``Tv`` query/key lengths, ``D`` depth.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax import lax

from flax_dotattn._src.types import Array

#: Head sizes the cuDNN flash-attention kernels accept.
MAX_HEAD_SIZE = 128


def ineligibility(
    query_shape: tuple[int, ...],
    value_shape: tuple[int, ...],
    dtype: Any,
    *,
    score_mode: str,
    causal: bool,
    dropout: bool,
    return_attention_scores: bool,
) -> str | None:
    """Why the fused kernel cannot run these inputs, or None when it can."""
    d, dv = query_shape[-1], value_shape[-1]
    reasons = [
        (
            jnp.dtype(dtype) not in (jnp.float16, jnp.bfloat16),
            f"dtype {jnp.dtype(dtype)} is not float16/bfloat16",
        ),
        (score_mode != "dot", "score_mode is not 'dot'"),
        (dropout, "dropout is active"),
        (return_attention_scores, "the weights are requested"),
        (
            d != dv or d % 8 or d > MAX_HEAD_SIZE,
            f"head sizes D={d}, Dv={dv} (need D == Dv, a multiple of 8, <= {MAX_HEAD_SIZE})",
        ),
        (causal and query_shape[-2] != value_shape[-2], "causal with Tq != Tv"),
    ]
    for failed, reason in reasons:
        if failed:
            return reason
    return None


def _rows_see_no_key(value_mask: Array, causal: bool, tq: int) -> Array:
    """Whether any query row has every key masked (then Keras's rule must be emulated)."""
    if not causal:
        return jnp.any(~value_mask.any(-1))
    first = jnp.where(value_mask.any(-1), jnp.argmax(value_mask, -1), tq)  # [...]
    return jnp.any(first > 0)  # row 0 sees key 0 only; under causal rows < first see none


def fold_scale(query: Array, key: Array, scale: Array | None) -> tuple[Array, Array, Array]:
    """Folds the learned ``scale`` into query and key without overflow.

    The kernel takes a static scale only, so a learned (traced) ``scale`` must enter
    through the inputs: ``q' = q * scale / 2**a`` (one rounding to the input dtype) and
    ``k' = k * 2**a`` (exact: a power of two), with ``a`` chosen so that both maxima are
    about ``sqrt(max|q * scale| * max|k|)``. Folding into ``q`` alone would overflow
    float16 for ``|q * scale| > 65504``.

    Args:
      query: ``[..., Tq, D]``, float16/bfloat16.
      key: ``[..., Tv, D]``, same dtype.
      scale: scalar ``[]`` or None.

    Returns:
      ``(query', key', overflow)``: ``overflow`` (a traced bool) is True when even the
      balanced fold leaves a non-finite value, in which case the caller must fall back.
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


def _needs_fallback(
    query: Array, value_mask: Array | None, overflow: Array, *, causal: bool
) -> Array:
    """Whether the fused kernel would differ from Keras here (a traced bool).

    True when some row sees no key (Keras's subtract-1e9 rule then averages over every
    key, the kernel would not) or when the folded scale overflows.
    """
    if value_mask is None:
        return overflow
    return overflow | _rows_see_no_key(value_mask, causal, query.shape[-2])


def fused_attention(
    query: Array,
    key: Array,
    value: Array,
    value_mask: Array | None,
    scale: Array | None,
    *,
    causal: bool,
    fallback: Callable[[Array, Array, Array, Array | None], Array],
    jax_nn_implementation: Literal["xla", "cudnn"] | None = "cudnn",
) -> Array:
    """Keras attention through ``jax.nn.dot_product_attention``, before the query mask.

    Where the kernel would give other numbers than Keras (a row that sees no key, or a
    scale that cannot be folded without overflow), ``fallback(query, key, value,
    value_mask)`` runs instead (a ``lax.cond``; the dispatcher passes the chunked path).

    Args:
      query: ``[..., Tq, D]`` float16/bfloat16.
      key: ``[..., Tv, D]``.
      value: ``[..., Tv, D]``.
      value_mask: bool ``[..., Tv]`` or None.
      scale: scalar ``[]`` or None.
      causal: top-left causal mask (requires ``Tq == Tv``).
      fallback: Keras's numbers for the same inputs (before the query mask).
      jax_nn_implementation: passed to ``jax.nn.dot_product_attention`` (``"cudnn"`` on
        GPU; ``"xla"`` lets the mapping be tested anywhere, float16 being read in
        float32 there).

    Returns:
      ``[..., Tq, D]`` in the input dtype.
    """
    batch, (tq, d), tv = query.shape[:-2], query.shape[-2:], key.shape[-2]
    b = math.prod(batch)
    q_folded, k_folded, overflow = fold_scale(query, key, scale)

    def fused(q, k, v, vm):
        q, k = q_folded, k_folded
        if jax_nn_implementation != "cudnn" and query.dtype == jnp.float16:
            # CPU dot_general has no float16 x float16 -> float32: the stand-in reads the
            # same (folded) float16 values in float32, as cuDNN accumulates in float32.
            q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
        out = jax.nn.dot_product_attention(
            q.reshape(b, tq, 1, d),
            k.reshape(b, tv, 1, d),
            v.reshape(b, tv, 1, d),
            mask=None if vm is None else vm.reshape(b, 1, 1, tv),
            scale=1.0,
            is_causal=causal,
            implementation=jax_nn_implementation,
        )  # [B, Tq, 1, D]
        return out.reshape(batch + (tq, d)).astype(query.dtype)

    def keras(q, k, v, vm):
        return fallback(q, k, v, vm).astype(query.dtype)

    if value_mask is None and scale is None:
        return fused(query, key, value, None)
    use_fallback = _needs_fallback(query, value_mask, overflow, causal=causal)
    return lax.cond(use_fallback, keras, fused, query, key, value, value_mask)
