"""Translation to and from Keras's ``Attention`` layer: its config and its weights.

Configs: :meth:`DotAttentionConfig.from_keras` and :meth:`DotAttentionConfig.to_keras`
call :func:`fields_from_keras` and :func:`config_to_keras`, which map Keras 3's
``layer.get_config()`` (and legacy ``tf.keras`` configs) onto the config's fields and back.

Weights: Keras stores the learned scalars as the list that ``layer.get_weights()`` returns
and ``layer.set_weights()`` takes: ``scale`` first (when ``use_scale``), then
``concat_score_weight`` (when ``score_mode="concat"``).

Keras itself is never imported: this module works on plain dicts and lists of arrays.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence, Set
from typing import Any

import jax.numpy as jnp
import numpy as np

from flax_dotattn._src.config.schema import DotAttentionFields, check_config
from flax_dotattn._src.options import fail, float_dtype_name
from flax_dotattn._src.types import Array

# -- configs ----------------------------------------------------------------------------

#: The Keras config keys that carry a field of the config.
_KERAS_KEYS = frozenset({"use_scale", "score_mode", "dropout", "causal", "dtype"})

# Generic Keras ``Layer`` keys that carry nothing this library models; ignored on import.
_KERAS_IGNORED_KEYS = frozenset(
    {
        "name",
        "trainable",
        "seed",
        "batch_input_shape",
        "batch_shape",
        "input_shape",
        "autocast",
        "dynamic",
    }
)


def layer_config(
    keras_config: Any, class_name: str, allowed: Set[str], *, where: str
) -> Mapping[str, Any]:
    """The inner config of a Keras layer config (``{"class_name", "config"}`` or the inner
    dict itself), checked: a mapping, of layer ``class_name``, with keys from ``allowed``.
    ``where`` names the caller in the errors."""
    if not isinstance(keras_config, Mapping):
        fail(
            f"{where} expects a Keras layer config dict; received a {type(keras_config).__name__}."
        )
    if "class_name" in keras_config and "config" in keras_config:
        if keras_config["class_name"] != class_name:
            article = "an" if class_name[0] in "AEIOU" else "a"
            fail(
                f"from_keras expects {article} {class_name!r} layer config; received "
                f"class_name={keras_config['class_name']!r}."
            )
        keras_config = keras_config["config"]
    unknown = sorted(str(k) for k in keras_config if k not in allowed)
    if unknown:
        fail(
            f"from_keras got unknown Keras config keys {unknown}; expected keys from "
            f"{sorted(allowed)}."
        )
    return keras_config


def fields_from_keras(keras_config: Mapping[str, Any]) -> dict[str, Any]:
    """The config fields of a Keras ``Attention`` layer config (see
    :meth:`DotAttentionConfig.from_keras`); unchecked, the config checks them."""
    keras_config = layer_config(
        keras_config, "Attention", _KERAS_KEYS | _KERAS_IGNORED_KEYS, where="from_keras"
    )
    dtype, param_dtype = _from_keras_dtype(keras_config.get("dtype"))
    return {
        "use_scale": keras_config.get("use_scale", False),
        "score_mode": keras_config.get("score_mode", "dot"),
        "dropout_rate": keras_config.get("dropout", 0.0),
        "causal": keras_config.get("causal", False),
        "dtype": dtype,
        "param_dtype": param_dtype,
    }


def _from_keras_dtype(policy: Any) -> tuple[str | None, str | None]:
    """Maps a Keras dtype policy (name or serialised dict) to ``(dtype, param_dtype)``."""
    if policy is None:
        return None, "float32"
    name = policy.get("config", {}).get("name") if isinstance(policy, Mapping) else policy
    if not isinstance(name, str):
        fail(f"from_keras could not read the Keras dtype policy {policy!r}.")
    if name.startswith("mixed_"):
        return float_dtype_name("dtype", name[len("mixed_") :]), "float32"
    return float_dtype_name("dtype", name), float_dtype_name("param_dtype", name)


def refuse_soft_cap(config: Any) -> None:
    """Raises a ValueError when ``config`` soft-caps the logits or holds a score or mask
    function, which Keras's layers cannot express."""
    if config.logits_soft_cap is not None:
        fail(
            "to_keras: Keras's attention layers have no soft-cap; received "
            f"logits_soft_cap={config.logits_soft_cap} (set it to None to export)."
        )
    for name in ("score_mod", "mask_mod"):
        if getattr(config, name) is not None:
            fail(
                f"to_keras: Keras's attention layers take no {name}; received "
                f"{name}={getattr(config, name)!r} (set it to None to export)."
            )


def config_to_keras(config: DotAttentionFields, *, legacy: bool = False) -> dict[str, Any]:
    """The Keras ``Attention`` layer config of ``config`` (see
    :meth:`DotAttentionConfig.to_keras`)."""
    policy: str
    refuse_soft_cap(config)
    if config.dtype is None or config.dtype == config.param_dtype:
        policy = config.param_dtype
    elif config.param_dtype == "float32" and config.dtype in ("float16", "bfloat16"):
        policy = f"mixed_{config.dtype}"
    else:
        fail(
            f"to_keras cannot express dtype={config.dtype!r} with "
            f"param_dtype={config.param_dtype!r} as a Keras dtype policy."
        )
    keras_config: dict[str, Any] = {
        "name": "attention",
        "trainable": True,
        "dtype": policy,
        "use_scale": config.use_scale,
        "score_mode": config.score_mode,
        "dropout": config.dropout_rate,
    }
    if legacy:
        keras_config["causal"] = config.causal
    else:
        keras_config["seed"] = None
        if config.causal:
            warnings.warn(
                "Keras 3's Attention has no causal config entry; call the layer with "
                "use_causal_mask=True instead.",
                UserWarning,
                stacklevel=3,
            )
    if config.use_scale and config.scale_init != 1.0:
        warnings.warn(
            f"Keras's Attention initialises scale to 1.0; scale_init={config.scale_init} "
            "is not exported (the trained value travels with the weights, see "
            "params_to_keras).",
            UserWarning,
            stacklevel=3,
        )
    if config.window is not None:
        warnings.warn(
            f"Keras's Attention has no sliding window; window={config.window} is not "
            "exported (build the equivalent mask yourself).",
            UserWarning,
            stacklevel=3,
        )
    return keras_config


# -- weights ----------------------------------------------------------------------------


def params_from_keras(weights: Sequence[Any], config: DotAttentionFields) -> dict[str, Array]:
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
    check_config(config, "params_from_keras")
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
    params: Mapping[str, Any] | None, config: DotAttentionFields
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
    check_config(config, "params_to_keras")
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
