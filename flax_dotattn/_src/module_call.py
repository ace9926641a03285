"""What the Linen and NNX modules share: their fields and their one call path.

Both modules take their fields from :class:`DotAttentionConfig` (names, types, defaults
and docs) and call :func:`dot_attention` through :func:`module_attention`, which resolves
the call arguments against the fields, casts the inputs and draws the dropout key.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp

from flax_dotattn._src.attention import dot_attention
from flax_dotattn._src.config import OPTIONS, DotAttentionConfig, check_option
from flax_dotattn._src.types import Array, Masks

#: Options that :func:`dot_attention` takes as keyword arguments (the rest, such as
#: ``use_scale`` and the dtypes, are the module's business).
_FUNCTION_OPTIONS = tuple(
    name
    for name in OPTIONS
    if name in inspect.signature(dot_attention).parameters
    and name not in ("causal", "deterministic", "window")
)


def option_annotations() -> dict[str, Any]:
    """``{name: type}`` of every option, for a module's field declarations."""
    return {name: f.type for name, f in OPTIONS.items()}


def option_defaults() -> dict[str, Any]:
    """``{name: default}`` of every option."""
    return {name: f.default for name, f in OPTIONS.items()}


def option_parameters() -> list[inspect.Parameter]:
    """Keyword-only signature parameters of every option (for NNX's ``__init__``)."""
    return [
        inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type
        )
        for name, f in OPTIONS.items()
    ]


def check_config(config: Any, where: str) -> DotAttentionConfig:
    """Returns ``config`` if it is a DotAttentionConfig, else raises a ValueError."""
    if not isinstance(config, DotAttentionConfig):
        raise ValueError(
            f"{where} expects a DotAttentionConfig; received a {type(config).__name__}."
        )
    return config


def config_fields(config: DotAttentionConfig) -> dict[str, Any]:
    """The config's options as keyword arguments of a module constructor."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def module_attention(
    config: DotAttentionConfig,
    params: Mapping[str, Array],
    query: Array,
    value: Array,
    key: Array | None,
    masks: Masks,
    causal: bool | None,
    *,
    deterministic: bool | None,
    return_attention_scores: bool,
    attention_mask: Array | None = None,
    bias: Array | None = None,
    segment_ids: tuple[Array, Array] | None = None,
    window: tuple[int | None, int | None] | None = None,
    dropout_rng: Callable[[], Array],
    where_deterministic: str,
) -> Array | tuple[Array, Array]:
    """Calls :func:`dot_attention` for a module whose fields are ``config``.

    Args:
      config: the module's validated fields.
      params: the learned scalars, ``{name: []}`` for ``config.param_names``.
      query, value, key, masks: as :func:`dot_attention`.
      causal: the call's override of ``config.causal`` (None: keep it).
      deterministic: the call's override of ``config.deterministic`` (None: keep it).
      return_attention_scores, attention_mask, bias, segment_ids: as
        :func:`dot_attention`.
      window: the call's override of ``config.window`` (None: keep it).
      dropout_rng: returns the dropout key; called only when dropout is active.
      where_deterministic: where the user can set ``deterministic`` (for the error).

    Raises:
      ValueError: when dropout is configured but neither the field nor the call sets
        ``deterministic``, and for everything :func:`dot_attention` rejects.
    """
    causal = config.causal if causal is None else check_option("causal", causal)
    window = config.window if window is None else check_option("window", window)
    if deterministic is None:
        deterministic = config.deterministic
    else:
        deterministic = check_option("deterministic", deterministic)
    if deterministic is None:
        if config.dropout_rate > 0.0:
            raise ValueError(
                "DotAttention with dropout_rate > 0 needs deterministic=True/False "
                f"({where_deterministic}); received neither."
            )
        deterministic = True
    if config.dtype is not None:
        query, value = jnp.asarray(query, config.dtype), jnp.asarray(value, config.dtype)
        key = None if key is None else jnp.asarray(key, config.dtype)
    use_dropout = not deterministic and config.dropout_rate > 0.0
    return dot_attention(
        params,
        query,
        value,
        key,
        masks,
        causal,
        attention_mask=attention_mask,
        bias=bias,
        segment_ids=segment_ids,
        window=window,
        deterministic=deterministic,
        dropout_rng=dropout_rng() if use_dropout else None,
        return_attention_scores=return_attention_scores,
        **{name: getattr(config, name) for name in _FUNCTION_OPTIONS},
    )
