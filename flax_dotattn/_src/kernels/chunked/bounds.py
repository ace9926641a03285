"""Cheap upper bounds on the logits, and the test that a masked logit's weight is 0.

Block skipping is exact under Keras's subtract-1e9 rule only where a masked block's
softmax weights are provably exactly 0 in the compute dtype; these are the two halves of
that proof.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from flax_dotattn._src.kernels.chunked.operands import Operands, Static
from flax_dotattn._src.types import Array


def underflow_gap(dtype: Any) -> float:
    """A gap ``g`` such that ``exp(x)`` is exactly 0 in ``dtype`` for every ``x < -g``."""
    return float(-np.log(np.finfo(jnp.dtype(dtype)).smallest_subnormal)) + 1.0


def logit_bounds(static: Static, ops: Operands) -> tuple[Array, Array]:
    """``(q_bound [B, Tq], k_bound [B, Tv])`` with ``|s_ij| <= q_bound_i * k_bound_j``
    (before any bias): ``|scale| |q| |k|`` in dot mode, ``|w| D`` in concat mode."""
    q, k = ops.q, ops.k
    if static.score_mode == "dot":
        scale = 1.0 if ops.scale is None else jnp.abs(ops.scale)
        return scale * jnp.linalg.norm(q, axis=-1), jnp.linalg.norm(k, axis=-1)
    weight = ops.concat_score_weight
    assert weight is not None, "concat mode has a weight"
    q_bound = jnp.broadcast_to(jnp.abs(weight) * q.shape[-1], q.shape[:2])
    return q_bound, jnp.ones(k.shape[:2], k.dtype)


def negligible(top: Array, row_max: Array) -> Array:
    """Whether masked logits at most ``top`` get softmax weight exactly 0 next to
    ``row_max`` (elementwise). False for NaN or -inf maxima."""
    slack = underflow_gap(row_max.dtype) + 1e-4 * (jnp.abs(top) + jnp.abs(row_max))
    return top + slack < row_max
