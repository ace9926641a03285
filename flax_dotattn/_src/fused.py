"""GPU fast path: ``jax.nn.dot_product_attention(implementation="cudnn")`` with Keras semantics.

Keras's logits are ``scale * (q @ k^T)`` with no ``1/sqrt(D)``: the learned scale is
folded into the query and ``scale=1.0`` is passed. The value mask becomes a boolean
``[B, 1, 1, Tv]`` mask and ``causal`` becomes ``is_causal`` (only for ``Tq == Tv``, where
top-left and bottom-right alignment agree). For rows that see no key, Keras's
subtract-1e9 rule gives a (near-uniform) distribution where the fused kernel would not,
so when any such row exists the call falls back to the chunked path (a ``lax.cond``).

Shape glossary: ``...`` batch dims, ``Tq``/``Tv`` query/key lengths, ``D`` depth.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from flax_dotattn._src.chunked import chunked_attention

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


def _rows_see_no_key(value_mask: jax.Array, causal: bool, tq: int) -> jax.Array:
    """Whether any query row has every key masked (then Keras's rule must be emulated)."""
    if not causal:
        return jnp.any(~value_mask.any(-1))
    first = jnp.where(value_mask.any(-1), jnp.argmax(value_mask, -1), tq)  # [...]
    return jnp.any(first > 0)  # row 0 sees key 0 only; under causal rows < first see none


def fused_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    value_mask: jax.Array | None,
    scale: jax.Array | None,
    *,
    causal: bool,
    precision: Any = None,
    jax_nn_implementation: str | None = "cudnn",
) -> jax.Array:
    """Keras attention through ``jax.nn.dot_product_attention``, before the query mask.

    Args:
      query: ``[..., Tq, D]`` float16/bfloat16.
      key: ``[..., Tv, D]``.
      value: ``[..., Tv, D]``.
      value_mask: bool ``[..., Tv]`` or None.
      scale: scalar ``[]`` or None.
      causal: top-left causal mask (requires ``Tq == Tv``).
      precision: used by the chunked fallback only.
      jax_nn_implementation: passed to ``jax.nn.dot_product_attention`` (``"cudnn"`` on
        GPU; ``"xla"`` lets the mapping be tested anywhere).

    Returns:
      ``[..., Tq, D]`` in the input dtype.
    """
    batch, (tq, d), tv = query.shape[:-2], query.shape[-2:], key.shape[-2]
    b = math.prod(batch)
    dtype = query.dtype
    q = query if scale is None else (query.astype(jnp.float32) * scale).astype(dtype)

    def fused(q, key, value, value_mask):
        mask = None if value_mask is None else value_mask.reshape(b, 1, 1, tv)
        out = jax.nn.dot_product_attention(
            q.reshape(b, tq, 1, d),
            key.reshape(b, tv, 1, d),
            value.reshape(b, tv, 1, d),
            mask=mask,
            scale=1.0,
            is_causal=causal,
            implementation=jax_nn_implementation,
        )  # [B, Tq, 1, D]
        return out.reshape(batch + (tq, d))

    if value_mask is None:
        return fused(q, key, value, None)

    def emulate_keras(q, key, value, value_mask):
        return chunked_attention(
            query,
            key,
            value,
            value_mask,
            scale,
            None,
            score_mode="dot",
            causal=causal,
            dropout_rate=0.0,
            dropout_rng=None,
            block_size=None,
            precision=precision,
            compute_dtype=jnp.float32,
        ).astype(dtype)

    return lax.cond(
        _rows_see_no_key(value_mask, causal, tq),
        emulate_keras,
        fused,
        q,
        key,
        value,
        value_mask,
    )
