"""``MultiHeadDotAttentionFields``: the schema of ``MultiHeadDotAttentionConfig`` (the
multi-head modules' hyper-parameters).

The schema only: the head options (``num_heads``, ``key_dim``, ``value_dim``,
``output_shape``, ``use_bias``, ``num_kv_heads``), the attention options of
:class:`DotAttentionConfig` (checked by the same spec, :data:`OPTIONS`), and the ``dict``
round trip. Keras's ``MultiHeadAttention`` configs are translated by
:mod:`flax_dotattn._src.config.multi_head_keras` (the public class joining both is in
:mod:`flax_dotattn._src.config.classes`); files are read and written by
:mod:`flax_dotattn._src.config.files`. It knows nothing of the rest of the library.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Self, TypeVar

import numpy as np

from flax_dotattn._src.blocks import BlockSizes
from flax_dotattn._src.config.schema import DotAttentionFields, check_keys, plain_dict
from flax_dotattn._src.options import OPTIONS, check_bool, check_finite_float, fail
from flax_dotattn._src.types import (
    FloatDtypeName,
    Implementation,
    MaskMod,
    PrecisionName,
    ScoreMod,
    ScoreMode,
    Window,
)

#: The fields of :class:`DotAttentionConfig` that this config shares, checked by the
#: spec; ``scale_init`` is shared too but may be None here (``1 / sqrt(key_dim)``).
ATTENTION_FIELDS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(DotAttentionFields) if f.name != "scale_init"
)
#: The fields of the head layout, in constructor order.
HEAD_FIELDS: tuple[str, ...] = (
    "num_heads",
    "key_dim",
    "value_dim",
    "output_shape",
    "use_bias",
    "num_kv_heads",
    "attention_axes",
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


def _attention_axes(value: Any) -> tuple[int, ...] | None:
    """Keras's ``attention_axes``: None (Keras's default, every axis between the batch
    axis and the features) or one axis, an int or a 1-sequence (Keras's numbers: from
    the front with the batch axis 0, or from the back with the features -1)."""
    if value is None:
        return None
    axes = (value,) if isinstance(value, (int, np.integer)) else value
    if (
        not isinstance(axes, (tuple, list))
        or not axes
        or any(
            isinstance(a, (bool, np.bool_)) or not isinstance(a, (int, np.integer)) for a in axes
        )
    ):
        fail(
            "attention_axes must be None, an int or a tuple of ints (Keras's axis numbers); "
            f"received attention_axes={value!r}."
        )
    checked: tuple[int, ...] = tuple(int(a) for a in axes)
    if len(checked) != 1:
        fail(
            "attention_axes must name one axis: attention over several axes (Keras's "
            f"attention_axes={list(checked)}) has no equivalent here; received "
            f"attention_axes={value!r}."
        )
    if checked[0] in (0, -1):
        fail(
            "attention_axes cannot be the batch axis 0 or the features -1; received "
            f"attention_axes={value!r}."
        )
    return checked


_Config = TypeVar("_Config")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MultiHeadDotAttentionFields:
    """The fields and checks of :class:`MultiHeadDotAttentionConfig` (its schema, with no
    Keras: the Keras translation builds on it)."""

    num_heads: int
    key_dim: int
    value_dim: int | None = None
    output_shape: int | None = None
    use_bias: bool = True
    num_kv_heads: int | None = None
    attention_axes: tuple[int, ...] | None = (-2,)
    use_scale: bool = False
    scale_init: float | None = None
    query_scale: float | None = None
    score_mode: ScoreMode = "dot"
    dropout_rate: float = 0.0
    causal: bool = False
    deterministic: bool | None = None
    dtype: FloatDtypeName | None = None
    param_dtype: FloatDtypeName = "float32"
    precision: PrecisionName | None = None
    window: Window = None
    logits_soft_cap: float | None = None
    score_mod: ScoreMod | None = None
    mask_mod: MaskMod | None = None
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
        set_("attention_axes", _attention_axes(self.attention_axes))
        if self.query_scale is not None:
            set_("query_scale", check_finite_float("query_scale", self.query_scale))
            if self.use_scale:
                fail(
                    "query_scale is the fixed query factor of use_scale=False; with "
                    "use_scale=True the learned scale (scale_init) takes its place; received "
                    f"query_scale={self.query_scale!r} with use_scale=True."
                )
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
    def query_factor(self) -> float:
        """The fixed factor of the projected queries when ``use_scale=False``:
        ``query_scale``, or Keras's ``1 / sqrt(key_dim)`` when it is None."""
        return self.key_dim**-0.5 if self.query_scale is None else self.query_scale

    @property
    def initial_scale(self) -> float:
        """The learned scale's initial value, ``scale_init`` or else ``1 / sqrt(key_dim)``."""
        return 1.0 / math.sqrt(self.key_dim) if self.scale_init is None else self.scale_init

    @property
    def attention(self) -> DotAttentionFields:
        """The attention options as :class:`DotAttentionConfig`'s fields (``scale_init``
        resolved)."""
        shared = {name: getattr(self, name) for name in ATTENTION_FIELDS}
        return DotAttentionFields(**shared, scale_init=self.initial_scale)

    @classmethod
    def of(cls, obj: Any) -> Self:
        """Reads the fields from same-named attributes of ``obj`` (e.g. a module)."""
        return cls(**{f.name: getattr(obj, f.name) for f in dataclasses.fields(cls)})

    # -- dict ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Returns a plain ``dict`` of the fields (JSON/YAML-serialisable)."""
        data = plain_dict(self)
        if self.attention_axes is not None:
            data["attention_axes"] = list(self.attention_axes)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Builds a config from a mapping of field names; unknown or missing keys raise."""
        check_keys(cls, data)
        missing = [k for k in ("num_heads", "key_dim") if k not in data]
        if missing:
            fail(f"MultiHeadDotAttentionConfig needs {missing}; received keys {sorted(data)}.")
        return cls(**data)


def check_multi_head_config(config: _Config, where: str) -> _Config:
    """Returns ``config`` if it is a MultiHeadDotAttentionConfig, else a ValueError naming
    ``where``."""
    if not isinstance(config, MultiHeadDotAttentionFields):
        fail(f"{where} expects a MultiHeadDotAttentionConfig; received a {type(config).__name__}.")
    return config
