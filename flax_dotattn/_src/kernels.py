"""Runs the kernel a :class:`~flax_dotattn._src.dispatch.Plan` names (``"xla"``,
``"chunked"`` or ``"cudnn"``) on a checked call. Shape glossary: see
:mod:`flax_dotattn._src.masks`.
"""

from __future__ import annotations

import jax.numpy as jnp

from flax_dotattn._src import cudnn
from flax_dotattn._src.chunked import attention as blockwise_attention
from flax_dotattn._src.dispatch import Plan
from flax_dotattn._src.masks import Masking
from flax_dotattn._src.types import Array
from flax_dotattn._src.validation import CheckedCall
from flax_dotattn._src.xla import materialised_attention


def run(plan: Plan, call: CheckedCall) -> tuple[Array, Array | None]:
    """Runs ``plan``; returns the output before the query mask (and the weights for xla)."""
    if plan.implementation == "xla":
        return materialised_attention(call.options, call.inputs, call.dropout_rng)
    if plan.implementation == "cudnn":
        return _cudnn(call), None
    return blockwise_attention(call), None


def _cudnn(call: CheckedCall) -> Array:
    """The fused kernel, with the chunked path where the kernel would differ from Keras."""
    inputs = call.inputs

    def keras(query: Array, key: Array, value: Array, value_mask: Array | None) -> Array:
        fallback = inputs._replace(
            query=query,
            key=key,
            value=value,
            masking=Masking(value_mask=value_mask),
            bias=None,
            concat_score_weight=None,
        )
        return blockwise_attention(call._replace(inputs=fallback))

    # Key/value with size-1 batch dims the query does not have (grouped-query attention)
    # are broadcast to the query's batch here, a copy: this route does not yet map them
    # onto the fused kernel's own grouped heads.
    batch = inputs.query.shape[:-2]
    key, value, value_mask = (
        None if x is None else jnp.broadcast_to(x, batch + x.shape[len(batch) :])
        for x in (inputs.key, inputs.value, inputs.masking.value_mask)
    )
    return cudnn.fused_attention(
        inputs.query,
        key,
        value,
        value_mask,
        inputs.scale,
        causal=call.options.causal,
        fallback=keras,
    )
