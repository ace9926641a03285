"""The kernel as one differentiable function, and its entry point.

``attend`` is a ``jax.custom_jvp``. Its tangent (:mod:`.tangent`) is a ``linear_map``
whose transpose is written by hand (:mod:`.transpose`), so forward mode (``jax.jvp``,
``jax.jacfwd``) evaluates the tangent and reverse mode (``jax.grad``, ``jax.vjp``) runs the
transpose; both keep ``linear_map``'s batching (:mod:`.batching`) and second order.
Each block step is rematerialised, so every direction takes O(T · block) memory.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from flax_dotattn._src.kernels.chunked.batching import TangentMap, TransposeMap, batching_forward
from flax_dotattn._src.kernels.chunked.operands import (
    Operands,
    Static,
    Tangents,
    from_rows,
    prepare_grouped,
)
from flax_dotattn._src.kernels.chunked.tangent import Residuals
from flax_dotattn._src.kernels.linear_map import linear_map
from flax_dotattn._src.types import Array
from flax_dotattn._src.validation import CheckedCall


def tangent(static: Static, res: Residuals, tangents: Tangents) -> tuple[Array, Array]:
    """``(d_out [B, Tq, Dv], c [B, Tq])``, the JVP of the output and of ``log l``, as a
    ``linear_map`` (reverse mode transposes it by hand)."""
    return linear_map(TangentMap(static), TransposeMap(static, tangents.present()), res, tangents)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def attend(static: Static, ops: Operands) -> tuple[Array, Array, Array]:
    """``(out [B, Tq, Dv], m [B, Tq], l [B, Tq])``; see :func:`.forward.forward`."""
    return batching_forward(static)(ops)


def _zero_to_none(t: Any) -> Any:
    return None if isinstance(t, SymbolicZero) else t


def _mod_tangents(ops: Operands, t_ops: Operands) -> tuple[Array, ...] | None:
    """Tangents of the score function's floating arrays (zeros where symbolic), or None
    when none moves."""
    if ops.mods is None or t_ops.mods is None:
        return None
    primals, tangents = ops.mods.score_consts, t_ops.mods.score_consts
    if all(isinstance(t, SymbolicZero) for t in tangents):
        return None
    return tuple(
        jnp.zeros_like(p) if isinstance(t, SymbolicZero) else t
        for p, t in zip(primals, tangents, strict=True)
    )


def _attend_jvp(static: Static, primals, tangents):
    """``m`` is treated as a constant shift (tangent 0), so ``l`` carries the whole
    derivative of the log-sum-exp ``m + log l``; ``out`` is exact."""
    (ops,), (t_ops,) = primals, tangents
    out, m, norm = attend(static, ops)
    t = Tangents(
        query=_zero_to_none(t_ops.q),
        key=_zero_to_none(t_ops.k),
        value=_zero_to_none(t_ops.v),
        bias=_zero_to_none(t_ops.bias),
        scale=_zero_to_none(t_ops.scale),
        concat_weight=_zero_to_none(t_ops.concat_score_weight),
        mod_consts=_mod_tangents(ops, t_ops),
    )
    if all(x is None for x in t):
        return (out, m, norm), tuple(jnp.zeros_like(x) for x in (out, m, norm))
    d_out, c = tangent(static, Residuals(ops, out, m, norm), t)
    return (out, m, norm), (d_out, jnp.zeros_like(m), norm * c)


# symbolic_zeros: tangents of operands that do not move arrive as SymbolicZero.
attend.defjvp(_attend_jvp, symbolic_zeros=True)
#: Jitted, so that eager calls reuse the compiled kernel instead of re-tracing it.
attend_jit = jax.jit(attend, static_argnums=0)


def attention(call: CheckedCall, *, key_offset: int | Array = 0, with_stats: bool = False) -> Any:
    """Blockwise attention with Keras semantics on a checked call, before the query mask.

    Args:
      call: the checked inputs (``query [..., Tq, D]``, ``key [..., Tv, D]``, ``value
        [..., Tv, Dv]``, masks, bias, scalars), options and dropout key of an entry point.
        Under dropout the random pattern depends on the blocks.
      key_offset: global position of the first key, for a shard of a longer sequence (may
        be traced).
      with_stats: also return the softmax statistics of each row.

    Returns:
      ``[..., Tq, Dv]`` in the compute dtype; with ``with_stats``, also ``(m, log_l)``,
      each ``[..., Tq]``, the row max and log-normaliser: the row's log-sum-exp is
      ``m + log_l``. ``m`` carries no derivative; ``log_l`` carries that of the whole
      log-sum-exp, so use them as ``stop_gradient(m) + log_l``. Empty dimensions give
      zeros (``m = -inf``, ``log_l = -inf`` for rows without keys), as the materialised
      path does. A row whose every logit is ``-inf`` (a ``-inf`` bias) outputs NaN, as
      the materialised path and ``jax.nn`` do; with ``with_stats`` it outputs 0 with
      ``log_l = -inf`` (weight 0 when shards are merged).
    """
    inputs = call.inputs
    batch, tq = inputs.query.shape[:-2], inputs.query.shape[-2]
    tv, dv = inputs.key.shape[-2], inputs.value.shape[-1]
    if 0 in (math.prod(batch), tq, tv, dv):
        out = jnp.zeros(batch + (tq, dv), inputs.compute_dtype)
        stats = (jnp.full(batch + (tq,), -jnp.inf, inputs.compute_dtype),) * 2
        return (out, stats) if with_stats else out
    static, ops, (perm, _, g) = prepare_grouped(call, key_offset)
    # Eager calls go through the jitted kernel (compiled once per shape); traced calls
    # inline the kernel into the caller's trace.
    traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(ops))
    out, m, norm = (attend if traced else attend_jit)(static, ops)
    if not with_stats:
        out = jnp.where(norm[..., None] > 0, out, jnp.full((), jnp.nan, out.dtype))
        return from_rows(out, perm, batch, g)  # [..., Tq, Dv]
    # log(0) = -inf for rows that saw only -inf logits, with a zero (not NaN) derivative.
    seen = norm > 0
    log_l = jnp.where(seen, jnp.log(jnp.where(seen, norm, 1)), -jnp.inf)
    out = from_rows(out, perm, batch, g)
    return out, (from_rows(m, perm, batch, g), from_rows(log_l, perm, batch, g))
