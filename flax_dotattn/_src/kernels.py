"""The kernels, run with a checked call: the one place where options become arguments.

:func:`run` runs the kernel a :class:`~flax_dotattn._src.dispatch.Plan` names (``"xla"``,
``"chunked"`` or ``"cudnn"``). :func:`chunked` is the one call of the blockwise kernel,
which :func:`sequence_parallel_attention` uses too (per shard, with ``key_offset`` and
the softmax statistics). Shape glossary: see :mod:`flax_dotattn._src.masks`.
"""

from __future__ import annotations

from typing import Any

from flax_dotattn._src import cudnn
from flax_dotattn._src.chunked import attention as blockwise_attention
from flax_dotattn._src.dispatch import Plan
from flax_dotattn._src.masks import Masking
from flax_dotattn._src.types import Array
from flax_dotattn._src.validation import CheckedCall
from flax_dotattn._src.xla import materialised_attention


def chunked(call: CheckedCall, *, key_offset: int | Array = 0, with_stats: bool = False) -> Any:
    """The blockwise kernel on ``call``'s inputs, before the query mask.

    Returns:
      ``[..., Tq, Dv]`` in the compute dtype; with ``with_stats`` also the rows' softmax
      statistics ``(m, log_l)``, each ``[..., Tq]`` (see the kernel's ``attention``).
    """
    options, inputs = call.options, call.inputs
    return blockwise_attention(
        inputs.query,
        inputs.key,
        inputs.value,
        inputs.masking,
        inputs.bias,
        inputs.scale,
        inputs.concat_score_weight,
        block_sizes=options.block_size,
        score_mode=options.score_mode,
        causal=options.causal,
        window=options.window,
        dropout_rate=options.applied_dropout_rate,
        dropout_rng=call.dropout_rng,
        precision=options.lax_precision,
        compute_dtype=inputs.compute_dtype,
        key_offset=key_offset,
        with_stats=with_stats,
    )


def run(plan: Plan, call: CheckedCall) -> tuple[Array, Array | None]:
    """Runs ``plan``; returns the output before the query mask (and the weights for xla)."""
    if plan.implementation == "xla":
        return materialised_attention(call.options, call.inputs, call.dropout_rng)
    if plan.implementation == "cudnn":
        return _cudnn(call), None
    return chunked(call), None


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
        return chunked(call._replace(inputs=fallback))

    return cudnn.fused_attention(
        inputs.query,
        inputs.key,
        inputs.value,
        inputs.masking.value_mask,
        inputs.scale,
        causal=call.options.causal,
        fallback=keras,
    )
