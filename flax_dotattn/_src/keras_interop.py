"""Weight conversion between Keras's ``Attention`` layer and flax_dotattn params.

Keras stores the learned scalars as the list that ``layer.get_weights()`` returns and
``layer.set_weights()`` takes: ``scale`` first (when ``use_scale``), then
``concat_score_weight`` (when ``score_mode="concat"``). Keras itself is never imported:
this module works on plain lists of arrays.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from flax_dotattn._src.config import DotAttentionConfig
from flax_dotattn._src.types import Array


def _check_config(config: Any, fn: str) -> None:
    if not isinstance(config, DotAttentionConfig):
        raise ValueError(
            f"{fn}: config must be a DotAttentionConfig; received a {type(config).__name__}."
        )


def params_from_keras(weights: Sequence[Any], config: DotAttentionConfig) -> dict[str, Array]:
    """Converts Keras ``layer.get_weights()`` output to a flax_dotattn params dict.

    Args:
      weights: list of scalar arrays, ordered ``[scale?, concat_score_weight?]``.
      config: the layer's config (decides which scalars are expected).

    Returns:
      ``{"scale": [], "concat_score_weight": []}`` restricted to what ``config`` uses,
      as ``config.param_dtype`` arrays; pass it (wrapped as ``{"params": ...}``) to
      :class:`DotAttention` or directly to :func:`dot_attention`.

    Raises:
      ValueError: when the list has the wrong length or a weight is not a scalar.

    Examples:
      >>> import numpy as np
      >>> from flax_dotattn import DotAttentionConfig, params_from_keras
      >>> cfg = DotAttentionConfig(use_scale=True, score_mode="concat")
      >>> params = params_from_keras([np.float32(0.5), np.float32(2.0)], cfg)
      >>> sorted(params), float(params["scale"])
      (['concat_score_weight', 'scale'], 0.5)
    """
    _check_config(config, "params_from_keras")
    names = config.param_names
    if isinstance(weights, (str, bytes, Mapping)) or not isinstance(weights, Sequence):
        raise ValueError(
            f"params_from_keras: weights must be a list of {len(names)} scalar arrays "
            f"{list(names)}; received a {type(weights).__name__}."
        )
    if len(weights) != len(names):
        raise ValueError(
            f"params_from_keras: expected {len(names)} weights {list(names)} for "
            f"use_scale={config.use_scale}, score_mode={config.score_mode!r}; "
            f"received {len(weights)}."
        )
    params = {}
    for name, w in zip(names, weights, strict=True):
        arr = np.asarray(w)
        if arr.shape != ():
            raise ValueError(
                f"params_from_keras: weight {name!r} must be a scalar of shape (); "
                f"received shape {arr.shape}."
            )
        params[name] = jnp.asarray(arr, dtype=config.param_dtype)
    return params


def params_to_keras(
    params: Mapping[str, Any] | None, config: DotAttentionConfig
) -> list[np.ndarray]:
    """Converts flax_dotattn params to the list Keras ``layer.set_weights()`` takes.

    Args:
      params: ``{"scale": [], "concat_score_weight": []}`` as ``config`` requires;
        Linen variables ``{"params": {...}}`` are unwrapped.
      config: the layer's config.

    Returns:
      A list of NumPy scalars ordered ``[scale?, concat_score_weight?]``.

    Raises:
      ValueError: when ``params`` lacks an expected scalar or has an extra one.
    """
    _check_config(config, "params_to_keras")
    params = {} if params is None else params
    if set(params) == {"params"} and isinstance(params["params"], Mapping):
        params = params["params"]
    names = config.param_names
    if not isinstance(params, Mapping) or set(params) != set(names):
        received = sorted(params) if isinstance(params, Mapping) else type(params).__name__
        raise ValueError(
            f"params_to_keras: expected params with keys {sorted(names)} for "
            f"use_scale={config.use_scale}, score_mode={config.score_mode!r}; "
            f"received {received}."
        )
    out = []
    for name in names:
        arr = np.asarray(params[name])
        if arr.shape != ():
            raise ValueError(
                f"params_to_keras: params[{name!r}] must be a scalar of shape (); "
                f"received shape {arr.shape}."
            )
        out.append(arr)
    return out
