"""Translation to and from Keras 3's ``MultiHeadAttention``: its config and its weights.

Keras's ``layer.get_weights()`` lists the ``EinsumDense`` kernels and biases of
``query``, ``key``, ``value`` and ``attention_output`` in that order (biases only with
``use_bias``), in the layouts this library uses: ``[Din, H, Dk]``, ``[H, Dk]``, ...,
``[H, Dv, Dout]``, ``[Dout]``. Keras multiplies the projected queries by
``1 / sqrt(key_dim)``; so does :class:`MultiHeadDotAttention` with ``use_scale=False``,
and with ``use_scale=True`` the learned ``scale`` starts at that factor on import and is
folded into the query kernel and bias on export.

Keras itself is never imported: this module works on plain dicts and lists of arrays.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from flax_dotattn._src.config.keras import (
    config_to_keras,
    fields_from_keras,
    layer_config,
    refuse_soft_cap,
)
from flax_dotattn._src.config.multi_head_schema import (
    MultiHeadDotAttentionFields,
    check_multi_head_config,
)
from flax_dotattn._src.config.schema import DotAttentionFields
from flax_dotattn._src.options import fail

#: Keys of Keras's config that must hold their default (no equivalent here).
_KERAS_DEFAULTS: dict[str, Any] = {
    "use_gate": False,
    "kernel_regularizer": None,
    "bias_regularizer": None,
    "activity_regularizer": None,
    "kernel_constraint": None,
    "bias_constraint": None,
}
_KERAS_DROPPED = frozenset(
    {"name", "trainable", "seed", "flash_attention", "kernel_initializer", "bias_initializer"}
)
_KERAS_FIELDS = frozenset(
    {"num_heads", "key_dim", "value_dim", "dropout", "use_bias", "output_shape"}
    | {"attention_axes", "sliding_window", "dtype"}
)
_PROJECTIONS = ("query", "key", "value", "out")


def multi_head_fields_from_keras(keras_config: Mapping[str, Any]) -> dict[str, Any]:
    """The config fields of a Keras ``MultiHeadAttention`` config (see
    :meth:`MultiHeadDotAttentionConfig.from_keras`); unchecked, the config checks them."""
    keras_config = layer_config(
        keras_config,
        "MultiHeadAttention",
        _KERAS_FIELDS | _KERAS_DROPPED | set(_KERAS_DEFAULTS),
        where="MultiHeadDotAttentionConfig.from_keras",
    )
    for name, default in _KERAS_DEFAULTS.items():
        if keras_config.get(name, default) != default:
            fail(
                f"from_keras: Keras's {name}={keras_config[name]!r} has no equivalent here "
                f"(expected {default!r})."
            )
    axes = keras_config.get("attention_axes")
    if axes is not None:
        listed = np.atleast_1d(axes).tolist()
        if len(listed) != 1:
            fail(
                f"from_keras: attention_axes={axes!r} (attention over several axes) has no "
                "equivalent here; expected None or one axis."
            )
        axes = tuple(listed)
    output_shape = keras_config.get("output_shape")
    if isinstance(output_shape, (list, tuple)):
        if len(output_shape) != 1:
            fail(f"from_keras: output_shape={output_shape!r} must be an int or a 1-tuple here.")
        output_shape = output_shape[0]
    window = keras_config.get("sliding_window")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            fail(
                f"from_keras: sliding_window must be None or a positive int; received "
                f"sliding_window={window!r}."
            )
        window = (window - 1, window - 1)
    shared = fields_from_keras({"dtype": keras_config.get("dtype")})
    return {
        "num_heads": keras_config.get("num_heads"),
        "key_dim": keras_config.get("key_dim"),
        "value_dim": keras_config.get("value_dim"),
        "output_shape": output_shape,
        "use_bias": keras_config.get("use_bias", True),
        "attention_axes": axes,
        "dropout_rate": keras_config.get("dropout", 0.0),
        "window": window,
        "dtype": shared["dtype"],
        "param_dtype": shared["param_dtype"],
    }


def multi_head_config_to_keras(config: MultiHeadDotAttentionFields) -> dict[str, Any]:
    """The Keras ``MultiHeadAttention`` config of ``config`` (see
    :meth:`MultiHeadDotAttentionConfig.to_keras`)."""
    check_multi_head_config(config, "to_keras")
    refuse_soft_cap(config)
    if config.kv_heads != config.num_heads:
        fail(
            f"to_keras: Keras has no grouped-query attention; received "
            f"num_kv_heads={config.num_kv_heads} with num_heads={config.num_heads}."
        )
    if config.score_mode != "dot":
        fail(
            "to_keras: Keras's MultiHeadAttention has dot scores only; received "
            f"score_mode={config.score_mode!r}."
        )
    if config.query_scale is not None and config.query_scale != config.key_dim**-0.5:
        fail(
            "to_keras: Keras's MultiHeadAttention multiplies the queries by "
            f"1 / sqrt(key_dim) = {config.key_dim**-0.5!r} and has no other factor; received "
            f"query_scale={config.query_scale!r}."
        )
    sliding_window = None
    if config.window is not None:
        left, right = config.window
        if left is None or left != right:
            fail(
                f"to_keras: Keras's sliding_window is symmetric and bounded (|i - j| < w); "
                f"received window={config.window}."
            )
        sliding_window = left + 1
    dtypes = DotAttentionFields(dtype=config.dtype, param_dtype=config.param_dtype)
    policy = config_to_keras(dtypes)["dtype"]  # the dtype policy, as for Attention
    return {
        "name": "multi_head_attention",
        "trainable": True,
        "dtype": policy,
        "num_heads": config.num_heads,
        "key_dim": config.key_dim,
        "value_dim": config.value_depth,
        "dropout": config.dropout_rate,
        "use_bias": config.use_bias,
        "output_shape": None if config.output_shape is None else (config.output_shape,),
        "attention_axes": None if config.attention_axes is None else list(config.attention_axes),
        "sliding_window": sliding_window,
        "seed": None,
    }


def _weight_names(config: MultiHeadDotAttentionFields) -> list[tuple[str, str]]:
    parts = ("kernel", "bias") if config.use_bias else ("kernel",)
    return [(proj, part) for proj in _PROJECTIONS for part in parts]


def multi_head_params_from_keras(
    weights: Sequence[Any], config: MultiHeadDotAttentionFields
) -> dict[str, Any]:
    """Converts Keras ``MultiHeadAttention.get_weights()`` to this library's params.

    Args:
      weights: ``[query kernel, query bias, key kernel, key bias, value kernel, value bias,
        output kernel, output bias]`` (no biases when ``use_bias=False``).
      config: the layer's config (``num_kv_heads`` must equal ``num_heads``).

    Returns:
      ``{"query", "key", "value", "out": {"kernel", "bias"}}`` as ``config.param_dtype``
      arrays, plus ``scale = 1 / sqrt(key_dim)`` when ``config.use_scale``: the params of
      :class:`MultiHeadDotAttention` (wrap as ``{"params": ...}`` for Linen).

    Raises:
      ValueError: for a wrong number of weights, a wrong shape or a config Keras cannot
        have (grouped-query, concat scores).
    """
    check_multi_head_config(config, "multi_head_params_from_keras")
    multi_head_config_to_keras(config)  # raises for what Keras cannot have
    names = _weight_names(config)
    if isinstance(weights, (str, bytes, Mapping)) or not isinstance(weights, Sequence):
        fail(
            f"multi_head_params_from_keras: weights must be a list of {len(names)} arrays; "
            f"received a {type(weights).__name__}."
        )
    if len(weights) != len(names):
        fail(
            f"multi_head_params_from_keras: expected {len(names)} weights "
            f"{[f'{p}/{w}' for p, w in names]} for use_bias={config.use_bias}; "
            f"received {len(weights)}."
        )
    params: dict[str, Any] = {proj: {} for proj in _PROJECTIONS}
    for (proj, part), w in zip(names, weights, strict=True):
        params[proj][part] = jnp.asarray(np.asarray(w), config.param_dtype)
    h, dk, dv = config.num_heads, config.key_dim, config.value_depth
    expected = {
        ("query", "kernel"): (h, dk),
        ("key", "kernel"): (h, dk),
        ("value", "kernel"): (h, dv),
    }
    for (proj, part), tail in expected.items():
        shape = params[proj][part].shape
        if len(shape) != 3 or shape[1:] != tail:
            fail(
                f"multi_head_params_from_keras: {proj} {part} must be [features, {tail[0]}, "
                f"{tail[1]}]; received shape {shape}."
            )
    if params["out"]["kernel"].shape[:2] != (h, dv):
        fail(
            f"multi_head_params_from_keras: the output kernel must be [{h}, {dv}, Dout]; "
            f"received shape {params['out']['kernel'].shape}."
        )
    if config.use_scale:
        params["scale"] = jnp.asarray(1.0 / math.sqrt(dk), config.param_dtype)
    return params


def multi_head_params_to_keras(
    params: Mapping[str, Any], config: MultiHeadDotAttentionFields
) -> list[np.ndarray]:
    """Converts this library's params to the list Keras ``set_weights()`` takes.

    A learned ``scale`` (``use_scale=True``) is folded into the query kernel and bias as
    ``scale * sqrt(key_dim)``, Keras's fixed ``1 / sqrt(key_dim)`` doing the rest.
    Linen variables ``{"params": {...}}`` are unwrapped.
    """
    check_multi_head_config(config, "multi_head_params_to_keras")
    multi_head_config_to_keras(config)
    if set(params) == {"params"}:
        params = params["params"]
    missing = [
        f"{p}/{w}"
        for p, w in _weight_names(config)
        if not isinstance(params.get(p), Mapping) or w not in params[p]
    ]
    if missing or (config.use_scale and "scale" not in params):
        fail(
            f"multi_head_params_to_keras: params lack {missing or ['scale']}; received keys "
            f"{sorted(params)}."
        )
    factor = float(params["scale"]) * math.sqrt(config.key_dim) if config.use_scale else 1.0
    out = []
    for proj, part in _weight_names(config):
        w = np.asarray(params[proj][part])
        out.append(w * np.asarray(factor, w.dtype) if proj == "query" else w)
    return out
