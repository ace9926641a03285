"""Runs the kernels that :func:`~flax_dotattn._src.dispatch.plans` names, one per
platform, chosen when the call is lowered. Shape glossary: see
:mod:`flax_dotattn._src.masks`.

When every platform's plan is the same (an explicit implementation, or a call no
accelerator kernel takes), that kernel is traced alone. Otherwise each distinct plan is
traced once and ``jax.lax.platform_dependent`` picks the branch of the platform the call
is lowered for: ``jax.jit`` on the current backend, or ``jax.export`` /
``.lower(...)`` for another (a TPU export from a CPU host lowers the TPU branch only).
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
from jax import lax

from flax_dotattn._src import cudnn, dispatch, pallas_tpu
from flax_dotattn._src.chunked import attention as blockwise_attention
from flax_dotattn._src.dispatch import Plan
from flax_dotattn._src.masks import Masking
from flax_dotattn._src.types import Array
from flax_dotattn._src.validation import CheckedCall
from flax_dotattn._src.xla import materialised_attention


def run_per_platform(call: CheckedCall) -> tuple[Array, Array | None]:
    """Runs the plan of the platform the call is lowered for; returns the output before
    the query mask, in the compute dtype (and the weights for xla, when they are asked
    for: then every platform runs xla)."""
    plans = dispatch.plans(call.inputs, call.options)
    here = dispatch.current_platform()
    # What is traced: the implementation, and for "pallas_tpu" whether it is interpreted.
    keys = {
        p: (plan.implementation, plan.implementation == "pallas_tpu" and p == "tpu")
        for p, plan in plans.items()
    }
    if len(set(keys.values())) == 1:
        return run(plans[here], call, platform=here)

    def branch(platform: str) -> Callable[[], Array]:
        def fn() -> Array:
            output, _ = run(plans[platform], call, platform=platform)
            return output.astype(call.inputs.compute_dtype)

        return fn

    traced: dict[tuple[object, ...], Callable[[], Array]] = {}
    branches = {p: traced.setdefault(key, branch(p)) for p, key in keys.items()}
    return lax.platform_dependent(**branches, default=branches["cpu"]), None


def run(plan: Plan, call: CheckedCall, *, platform: str) -> tuple[Array, Array | None]:
    """Runs ``plan`` as lowered for ``platform``; returns the output before the query mask
    (and the weights for xla)."""
    if plan.implementation == "xla":
        return materialised_attention(call.options, call.inputs, call.dropout_rng)
    if plan.implementation == "cudnn":
        return _cudnn(call), None
    if plan.implementation == "pallas_tpu":
        return pallas_tpu.splash_attention(call, interpret=platform != "tpu"), None
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
