"""Runs the kernels that :func:`~flax_dotattn._src.dispatch.plans` names, one per
platform, chosen when the call is lowered. Shape glossary: see
:mod:`flax_dotattn._src.masks`.

The runner is where kernels meet: they never import each other. A fused kernel
(``cudnn``, ``pallas_tpu``, ``pallas_gpu``) returns its output with a run-time predicate
(:class:`~flax_dotattn._src.kernels.fused_inputs.Fused`: "every kept row sees a key",
"the scale folds", ...), and the runner composes the fallback to the chunked kernel where
the predicate fails (a ``lax.cond``) and hands the kernel the chunked kernel's entry as the
reference its forward-mode derivatives go through (:func:`run_fused`).

When every platform's plan is the same (an explicit implementation, or a call no
accelerator kernel takes), that kernel is traced alone. Otherwise each distinct plan is
traced once and ``jax.lax.platform_dependent`` picks the branch of the platform the call
is lowered for: ``jax.jit`` on the current backend, or ``jax.export`` /
``.lower(...)`` for another (a TPU export from a CPU host lowers the TPU branch only).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jax import lax

from flax_dotattn._src import dispatch
from flax_dotattn._src.dispatch import Plan
from flax_dotattn._src.kernels import capabilities, chunked, cudnn, pallas_gpu, pallas_tpu
from flax_dotattn._src.kernels.fused_inputs import Fused
from flax_dotattn._src.kernels.xla import materialised_attention
from flax_dotattn._src.types import Array
from flax_dotattn._src.validation import CheckedCall


def run_per_platform(call: CheckedCall) -> tuple[Array, Array | None]:
    """Runs the plan of the platform the call is lowered for; returns the output before
    the query mask, in the compute dtype (and the weights for xla, when they are asked
    for: then every platform runs xla)."""
    plans = dispatch.plans(call.inputs, call.options)
    here = dispatch.current_platform()
    # What is traced: the implementation, and for a Pallas kernel whether it is
    # interpreted (it is not on its own platform).
    keys = {p: (plan.implementation, _compiled(plan, p)) for p, plan in plans.items()}
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


def _compiled(plan: Plan, platform: str) -> bool:
    """Whether ``plan`` runs a Pallas kernel compiled for ``platform`` (not interpreted)."""
    own_platform = capabilities.TABLE[plan.implementation].platform
    return plan.implementation in dispatch.PALLAS_KERNELS and own_platform == platform


def run(plan: Plan, call: CheckedCall, *, platform: str) -> tuple[Array, Array | None]:
    """Runs ``plan`` as lowered for ``platform``; returns the output before the query mask
    (and the weights for xla)."""
    if plan.implementation == "xla":
        return materialised_attention(call.options, call.inputs, call.dropout_rng)
    if plan.implementation == "cudnn":
        return run_fused(cudnn.attention, call), None
    if plan.implementation == "pallas_tpu":
        return run_fused(pallas_tpu.splash_attention, call, interpret=platform != "tpu"), None
    if plan.implementation == "pallas_gpu":
        return run_fused(pallas_gpu.attention, call, interpret=platform != "cuda"), None
    return chunked.attention(call), None


def run_fused(kernel: Callable[..., Fused], call: CheckedCall, **kwargs: Any) -> Array:
    """A fused kernel's output where it gives Keras's numbers, else the chunked kernel's.

    Args:
      kernel: a fused kernel's entry (``cudnn.attention``, ``pallas_tpu.splash_attention``,
        ``pallas_gpu.attention``), called with ``call``, ``reference=`` the chunked
        kernel's entry, and ``kwargs``.
      call: a checked call the kernel takes (its static eligibility holds).
      **kwargs: the kernel's own keywords (``interpret=``, ...).

    Returns:
      ``[..., Tq, Dv]`` before the query mask, in the kernel's output dtype.
    """
    fused = kernel(call, reference=chunked.attention, **kwargs)
    if fused.exact is None:
        return fused.run()

    def keras() -> Array:
        return chunked.attention(call).astype(fused.dtype)

    return lax.cond(fused.exact, fused.run, keras)
