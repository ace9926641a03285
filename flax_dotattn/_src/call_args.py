"""Call-time arguments shared by the Linen and NNX modules."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from flax_dotattn._src.config import DotAttentionConfig


def resolve_call(
    config: DotAttentionConfig, causal: bool | None, deterministic: bool | None, hint: str
) -> tuple[bool, bool]:
    """Call arguments override the module's fields; returns ``(causal, deterministic)``.

    ``deterministic`` may stay unset only when there is no dropout to decide about.
    """
    causal = config.causal if causal is None else causal
    deterministic = config.deterministic if deterministic is None else deterministic
    if deterministic is None:
        if config.dropout_rate > 0.0:
            raise ValueError(
                f"DotAttention with dropout_rate > 0 needs deterministic=True/False ({hint}); "
                "received neither."
            )
        deterministic = True
    return causal, deterministic


def cast_inputs(dtype: Any, query: Any, value: Any, key: Any) -> tuple[Any, Any, Any]:
    """Casts query, value and key (when given) to the module's ``dtype`` (None: as is)."""
    if dtype is None:
        return query, value, key
    cast = (jnp.asarray(x, dtype) for x in (query, value))
    return *cast, None if key is None else jnp.asarray(key, dtype)
