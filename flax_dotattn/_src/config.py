"""``DotAttentionConfig``: the modules' hyper-parameters, frozen, validated and hashable.

The schema only: the fields, their checks (from :data:`flax_dotattn._src.options.OPTIONS`)
and the ``dict`` round trip. Files are read and written by
:mod:`flax_dotattn._src.config_files`, Keras configs translated by
:mod:`flax_dotattn._src.keras_interop`. It knows nothing of the rest of the library.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from flax_dotattn._src.blocks import BlockSizes
from flax_dotattn._src.options import check_fields, fail
from flax_dotattn._src.types import (
    FloatDtypeName,
    Implementation,
    PrecisionName,
    ScoreMode,
    Window,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DotAttentionConfig:
    """Hyper-parameters of :class:`DotAttention`, frozen, validated and hashable.

    The Linen and NNX modules declare the same fields (names and defaults; a test keeps
    them equal), and every field is checked by the same check as :func:`dot_attention`'s
    keyword argument of that name. Being hashable, a config can be a static argument of
    ``jax.jit`` or a Flax module attribute. Dtypes and precision are stored by name so the
    config serialises.

    Attributes:
      use_scale: learn a scalar ``scale`` that multiplies the logits (inside the ``tanh``
        in concat mode), initialised to ``scale_init`` (Keras ``use_scale``).
      scale_init: the learned ``scale``'s initial value, a float: 1.0 as in Keras; a
        transformer's usual ``1 / sqrt(D)`` for head depth ``D`` (e.g. 0.125 for 64).
      score_mode: ``"dot"`` (``query @ key^T``) or ``"concat"``
        (``sum(tanh(query + key))``), as Keras's ``score_mode``.
      dropout_rate: dropout on the attention weights, in ``[0, 1)`` (Keras ``dropout``).
      causal: query ``i`` attends to keys ``j <= i`` only, top-left aligned when
        ``Tq != Tv`` (see :func:`make_causal_mask`).
      deterministic: True disables dropout; None leaves it to the call, which must then
        decide whenever ``dropout_rate > 0``.
      dtype: computation dtype (name or dtype); inputs are cast to it (None: follow the
        inputs).
      param_dtype: dtype (name or dtype) of the learned scalars.
      precision: matmul precision: None, a ``jax.lax.Precision`` or its name
        (``"default"``, ``"high"``, ``"highest"``, any case).
      window: sliding window ``(left, right)``: query ``i`` sees keys
        ``i - left <= j <= i + right`` (global positions, top-left aligned like
        ``causal``; a None side, or one of 2**30 or more, is unbounded); with
        ``causal=True``, ``(w, 0)`` is a causal sliding window. The chunked path computes
        only the blocks inside the band.
      implementation: None (automatic), ``"xla"``, ``"chunked"``, ``"cudnn"``,
        ``"pallas_tpu"`` or ``"pallas_gpu"``; see :func:`dot_attention`.
      block_size: blocks of the chunked path: None (the measured default per score
        mode), an int, a pair ``(Bq, Bk)`` or a :class:`BlockSizes`.

    Examples:
      >>> from flax_dotattn import DotAttentionConfig
      >>> cfg = DotAttentionConfig(use_scale=True, causal=True)
      >>> DotAttentionConfig.from_dict(cfg.to_dict()) == cfg
      True
      >>> keras_cfg = {"name": "attention", "use_scale": True, "score_mode": "dot",
      ...              "dropout": 0.1, "seed": None, "dtype": "float32"}
      >>> DotAttentionConfig.from_keras(keras_cfg).dropout_rate
      0.1
    """

    use_scale: bool = False
    scale_init: float = 1.0
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
        check_fields(self)

    @classmethod
    def of(cls, obj: Any) -> DotAttentionConfig:
        """Reads the fields from same-named attributes of ``obj`` (e.g. a module)."""
        return cls(**{f.name: getattr(obj, f.name) for f in dataclasses.fields(cls)})

    def initial_value(self, param: str) -> float:
        """The initial value of the learned scalar ``param``: ``scale_init`` for
        ``"scale"``, 1.0 (Keras's) for ``"concat_score_weight"``."""
        return self.scale_init if param == "scale" else 1.0

    @property
    def param_names(self) -> tuple[str, ...]:
        """Names of the learned scalars, in Keras's ``get_weights()`` order."""
        names: tuple[str, ...] = ("scale",) if self.use_scale else ()
        if self.score_mode == "concat":
            names += ("concat_score_weight",)
        return names

    # -- dict ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Returns a plain ``dict`` of the fields (JSON/YAML-serialisable)."""
        return plain_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DotAttentionConfig:
        """Builds a config from a mapping of field names; unknown keys raise ValueError."""
        check_keys(cls, data)
        return cls(**data)

    # -- Keras (the translation lives in keras_interop, which sits on top of this module,
    # so it is imported when called) ----------------------------------------------------

    @classmethod
    def from_keras(cls, keras_config: Mapping[str, Any]) -> DotAttentionConfig:
        """Builds a config from a Keras ``Attention`` layer config.

        Accepts Keras 3's ``layer.get_config()`` (``use_scale``, ``score_mode``,
        ``dropout``, ``seed``, ``dtype`` as a name or a ``DTypePolicy`` dict), legacy
        ``tf.keras`` 2.x configs (which may carry ``causal``), and the serialised form
        ``{"class_name": "Attention", "config": {...}}``.

        Mapping: ``dropout`` -> ``dropout_rate``; a dtype policy ``"mixed_bfloat16"``
        -> ``dtype="bfloat16", param_dtype="float32"``; a plain ``"float32"`` -> both
        ``"float32"``. ``name``, ``trainable`` and ``seed`` are dropped (randomness
        comes from the ``"dropout"`` rng stream here). Any other unknown key raises.

        Args:
          keras_config: the Keras layer config mapping.

        Returns:
          The equivalent ``DotAttentionConfig``.

        Raises:
          ValueError: on unknown keys or invalid values.
        """
        from flax_dotattn._src.keras_interop import fields_from_keras

        return cls(**fields_from_keras(keras_config))

    def to_keras(self, *, legacy: bool = False) -> dict[str, Any]:
        """Returns a config that ``keras.layers.Attention.from_config`` accepts.

        What cannot be carried: ``deterministic`` (Keras uses the call's ``training``
        flag), ``precision``, ``implementation`` and ``block_size`` (Keras has one
        materialised path), ``window`` (with a warning: Keras has none),
        ``scale_init`` other than 1.0 (with a warning: Keras starts at 1.0); and in Keras 3
        (``legacy=False``) ``causal``, which is a call argument there
        (``layer(..., use_causal_mask=True)``): a warning is issued when a causal config
        is exported that way. ``dtype=None`` ("follow the inputs")
        exports as the ``param_dtype`` policy.

        Args:
          legacy: emit a ``tf.keras`` 2.x config (with ``causal``) instead of Keras 3's.

        Returns:
          A dict with ``name``, ``trainable``, ``dtype``, ``use_scale``, ``score_mode``,
          ``dropout`` and (Keras 3) ``seed`` or (legacy) ``causal``.
        """
        from flax_dotattn._src.keras_interop import config_to_keras

        return config_to_keras(self, legacy=legacy)


def field_values(config: Any) -> dict[str, Any]:
    """A config dataclass's fields as keyword arguments (of a module's constructor, say)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def plain_dict(config: Any) -> dict[str, Any]:
    """A config's fields as plain data (JSON/YAML-serialisable): ``block_size`` as a dict,
    ``window`` as a list."""
    data = field_values(config)
    if config.block_size is not None:
        data["block_size"] = config.block_size.to_dict()
    if config.window is not None:
        data["window"] = list(config.window)
    return data


def check_keys(cls: type, data: Any) -> None:
    """Raises a ValueError unless ``data`` is a mapping whose keys are fields of ``cls``."""
    name = cls.__name__
    if not isinstance(data, Mapping):
        fail(
            f"{name}.from_dict expects a mapping of field names; received a {type(data).__name__}."
        )
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in data if k not in fields)
    if unknown:
        fail(f"{name} got unknown keys {unknown}; expected keys from {sorted(fields)}.")


def check_config(config: Any, where: str) -> DotAttentionConfig:
    """Returns ``config`` if it is a DotAttentionConfig, else raises a ValueError naming
    ``where`` (the function that was given it)."""
    if not isinstance(config, DotAttentionConfig):
        fail(f"{where} expects a DotAttentionConfig; received a {type(config).__name__}.")
    return config
