"""``MultiHeadDotAttentionConfig``: the multi-head modules' hyper-parameters.

The schema only: the head options (``num_heads``, ``key_dim``, ``value_dim``,
``output_shape``, ``use_bias``, ``num_kv_heads``), the attention options of
:class:`DotAttentionConfig` (checked by the same spec, :data:`OPTIONS`), and the ``dict``
round trip. Keras's ``MultiHeadAttention`` configs are translated by
:mod:`flax_dotattn._src.multi_head_keras`; files are read and written by
:mod:`flax_dotattn._src.config_files`. It knows nothing of the rest of the library.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from flax_dotattn._src.blocks import BlockSizes
from flax_dotattn._src.config import DotAttentionConfig, check_keys, plain_dict
from flax_dotattn._src.options import OPTIONS, check_bool, check_finite_float, fail
from flax_dotattn._src.types import (
    FloatDtypeName,
    Implementation,
    PrecisionName,
    ScoreMode,
    Window,
)

#: The fields of :class:`DotAttentionConfig` that this config shares, checked by the
#: spec; ``scale_init`` is shared too but may be None here (``1 / sqrt(key_dim)``).
ATTENTION_FIELDS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(DotAttentionConfig) if f.name != "scale_init"
)
#: The fields of the head layout, in constructor order.
HEAD_FIELDS: tuple[str, ...] = (
    "num_heads",
    "key_dim",
    "value_dim",
    "output_shape",
    "use_bias",
    "num_kv_heads",
)


def _positive_int(name: str, value: Any, *, optional: bool) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        fail(
            f"{name} must be a positive Python int{' or None' if optional else ''}; "
            f"received {name}={value!r} of type {type(value).__name__}."
        )
    if value <= 0:
        fail(f"{name} must be a positive int; received {name}={value!r}.")
    return int(value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MultiHeadDotAttentionConfig:
    """Hyper-parameters of :class:`MultiHeadDotAttention`, frozen, validated and hashable.

    The head options carry Keras ``MultiHeadAttention``'s names; the attention options are
    :class:`DotAttentionConfig`'s, with its checks. Initializers are not part of the config
    (they act at ``init`` only; the trained weights travel in the checkpoint).

    Shapes (``Din``: the query's last dim; ``H = num_heads``, ``Hkv = num_kv_heads``,
    ``G = H // Hkv`` query heads per key/value head): the queries are projected to
    ``[..., Tq, H, key_dim]``, the keys to ``[..., Tv, Hkv, key_dim]``, the values to
    ``[..., Tv, Hkv, value_dim]``, and the heads' outputs back to
    ``[..., Tq, output_shape]``.

    Attributes:
      num_heads: ``H``, the number of query heads.
      key_dim: ``Dk``, the depth of each query and key head.
      value_dim: ``Dv``, the depth of each value head (None: ``key_dim``).
      output_shape: the output's last dim (None: the query's last dim).
      use_bias: the four projections have biases (Keras's default: True).
      num_kv_heads: ``Hkv``, the key/value heads (None: ``num_heads``); it must divide
        ``num_heads``. Fewer is grouped-query attention (1: multi-query): query head
        ``h`` reads key/value head ``h // G``; keys and values are never repeated.
      use_scale: learn a scalar ``scale`` that multiplies the logits, initialised to
        ``scale_init``. Without it the projected queries are multiplied by
        ``1 / sqrt(key_dim)``, exactly as Keras's ``MultiHeadAttention`` does.
      scale_init: the learned ``scale``'s initial value; None (the default) is
        ``1 / sqrt(key_dim)``, so that both settings start from Keras's logits (in
        ``"dot"`` mode; with ``"concat"`` the learned scale multiplies ``q + k``).

    The other fields (``score_mode``, ``dropout_rate``, ``causal``, ``deterministic``,
    ``dtype``, ``param_dtype``, ``precision``, ``window``, ``implementation``,
    ``block_size``) are :class:`DotAttentionConfig`'s; ``dtype`` and ``precision`` also
    apply to the projections, and ``param_dtype`` is the kernels' and biases' dtype too.

    Examples:
      >>> from flax_dotattn import MultiHeadDotAttentionConfig
      >>> cfg = MultiHeadDotAttentionConfig(num_heads=4, key_dim=8, num_kv_heads=2)
      >>> cfg.value_depth, cfg.groups, round(cfg.initial_scale, 4)
      (8, 2, 0.3536)
      >>> MultiHeadDotAttentionConfig.from_dict(cfg.to_dict()) == cfg
      True
    """

    num_heads: int
    key_dim: int
    value_dim: int | None = None
    output_shape: int | None = None
    use_bias: bool = True
    num_kv_heads: int | None = None
    use_scale: bool = False
    scale_init: float | None = None
    score_mode: ScoreMode = "dot"
    dropout_rate: float = 0.0
    causal: bool = False
    deterministic: bool | None = None
    dtype: FloatDtypeName | None = None
    param_dtype: FloatDtypeName = "float32"
    precision: PrecisionName | None = None
    window: Window = None
    implementation: Implementation | None = None
    block_size: BlockSizes | None = None

    def __post_init__(self) -> None:
        def set_(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        set_("num_heads", _positive_int("num_heads", self.num_heads, optional=False))
        set_("key_dim", _positive_int("key_dim", self.key_dim, optional=False))
        for name in ("value_dim", "output_shape", "num_kv_heads"):
            set_(name, _positive_int(name, getattr(self, name), optional=True))
        set_("use_bias", check_bool("use_bias", self.use_bias))
        if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
            fail(
                "num_kv_heads must divide num_heads (each key/value head serves the same "
                f"number of query heads); received num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads}."
            )
        if self.scale_init is not None:
            set_("scale_init", check_finite_float("scale_init", self.scale_init))
        for name in ATTENTION_FIELDS:
            set_(name, OPTIONS[name].check(name, getattr(self, name)))

    # -- derived ------------------------------------------------------------------------

    @property
    def value_depth(self) -> int:
        """``Dv``: ``value_dim``, or ``key_dim`` when it is None."""
        return self.key_dim if self.value_dim is None else self.value_dim

    @property
    def kv_heads(self) -> int:
        """``Hkv``: ``num_kv_heads``, or ``num_heads`` when it is None."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def groups(self) -> int:
        """``G = H // Hkv``: query heads per key/value head."""
        return self.num_heads // self.kv_heads

    @property
    def initial_scale(self) -> float:
        """The learned scale's initial value, ``scale_init`` or else ``1 / sqrt(key_dim)``."""
        return 1.0 / math.sqrt(self.key_dim) if self.scale_init is None else self.scale_init

    @property
    def attention(self) -> DotAttentionConfig:
        """The attention options as a :class:`DotAttentionConfig` (``scale_init`` resolved)."""
        shared = {name: getattr(self, name) for name in ATTENTION_FIELDS}
        return DotAttentionConfig(**shared, scale_init=self.initial_scale)

    @classmethod
    def of(cls, obj: Any) -> MultiHeadDotAttentionConfig:
        """Reads the fields from same-named attributes of ``obj`` (e.g. a module)."""
        return cls(**{f.name: getattr(obj, f.name) for f in dataclasses.fields(cls)})

    # -- dict ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Returns a plain ``dict`` of the fields (JSON/YAML-serialisable)."""
        return plain_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MultiHeadDotAttentionConfig:
        """Builds a config from a mapping of field names; unknown or missing keys raise."""
        check_keys(cls, data)
        missing = [k for k in ("num_heads", "key_dim") if k not in data]
        if missing:
            fail(f"MultiHeadDotAttentionConfig needs {missing}; received keys {sorted(data)}.")
        return cls(**data)

    # -- Keras (translated in multi_head_keras, imported when called) --------------------

    @classmethod
    def from_keras(cls, keras_config: Mapping[str, Any]) -> MultiHeadDotAttentionConfig:
        """Builds a config from a Keras 3 ``MultiHeadAttention`` layer config.

        Mapping: ``num_heads``, ``key_dim``, ``value_dim``, ``use_bias`` as they are;
        ``output_shape`` an int or a 1-tuple; ``dropout`` -> ``dropout_rate``;
        ``sliding_window=w`` (Keras: ``|i - j| < w``) -> ``window=(w - 1, w - 1)``; the
        dtype policy as in :meth:`DotAttentionConfig.from_keras`. ``use_scale`` stays
        False, which multiplies the queries by ``1 / sqrt(key_dim)`` as Keras does.
        Dropped: ``name``, ``trainable``, ``seed``, ``flash_attention`` (a kernel
        choice), the initializers (the weights travel with
        :func:`multi_head_params_from_keras`). Raises for what has no equivalent:
        ``attention_axes`` other than the sequence axis, ``use_gate=True``, an
        ``output_shape`` of several dims, regularizers and constraints. A Keras layer built
        on ``[B, T, F]`` inputs records ``attention_axes=(1,)``, read here as the sequence
        axis; on inputs with more batch dims Keras attends over axis 1 with it, while
        this module attends over the axis before the features (Keras's ``(-2,)``).
        """
        from flax_dotattn._src.multi_head_keras import multi_head_fields_from_keras

        return cls(**multi_head_fields_from_keras(keras_config))

    def to_keras(self) -> dict[str, Any]:
        """Returns a config that ``keras.layers.MultiHeadAttention.from_config`` accepts.

        Raises a ValueError for what Keras cannot express: ``num_kv_heads`` fewer than
        ``num_heads``, ``score_mode="concat"``, a window that is not Keras's symmetric
        ``sliding_window``, ``output_shape=None`` is exported as None (Keras reads it
        as the query's last dim too). ``causal`` is a call argument in Keras
        (``use_causal_mask=True``) and is not exported; the learned scale travels with
        the weights (:func:`multi_head_params_to_keras` folds it into the query kernel).
        """
        from flax_dotattn._src.multi_head_keras import multi_head_config_to_keras

        return multi_head_config_to_keras(self)


def check_multi_head_config(config: Any, where: str) -> MultiHeadDotAttentionConfig:
    """Returns ``config`` if it is a MultiHeadDotAttentionConfig, else a ValueError naming
    ``where``."""
    if not isinstance(config, MultiHeadDotAttentionConfig):
        fail(f"{where} expects a MultiHeadDotAttentionConfig; received a {type(config).__name__}.")
    return config
