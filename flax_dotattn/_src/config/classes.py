"""The public config classes: each schema with its Keras translation.

The schemas (:mod:`.schema`, :mod:`.multi_head_schema`) know nothing of Keras, and the
translations (:mod:`.keras`, :mod:`.multi_head_keras`) build on the schemas; the classes
users meet join the two here, so no module imports one that imports it back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from flax_dotattn._src.config.keras import config_to_keras, fields_from_keras
from flax_dotattn._src.config.multi_head_keras import (
    multi_head_config_to_keras,
    multi_head_fields_from_keras,
)
from flax_dotattn._src.config.multi_head_schema import MultiHeadDotAttentionFields
from flax_dotattn._src.config.schema import DotAttentionFields


@dataclasses.dataclass(frozen=True, kw_only=True)
class DotAttentionConfig(DotAttentionFields):
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
      logits_soft_cap: None or a float ``cap > 0``: the logits (bias included) become
        ``cap * tanh(logits / cap)`` before the masks (see :func:`dot_attention`).
        ``to_keras`` refuses it: Keras has no soft-cap.
      score_mod: None, a score function (see :func:`dot_attention`), or the name of one
        registered with :func:`flax_dotattn.mods.register`. A config writes a registered
        function by its name and refuses an unregistered one (a function cannot be
        serialised); ``to_keras`` refuses it.
      mask_mod: None, a mask function or a registered name, as ``score_mod``.
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

        return config_to_keras(self, legacy=legacy)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MultiHeadDotAttentionConfig(MultiHeadDotAttentionFields):
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
      query_scale: the fixed factor of the projected queries with ``use_scale=False``
        (Gemma's ``query_pre_attn_scalar ** -0.5``, say); None (the default) is Keras's
        ``1 / sqrt(key_dim)``. Keras export refuses other values.
      attention_axes: the axis attended over, in Keras's numbers: ``(-2,)`` (the default)
        is the axis before the features, for any number of batch dims; ``(a,)`` moves
        axis ``a`` of the inputs there (the other axes become batch dims, in order, for
        the masks and the returned weights ``[..., H, Tq, Tv]``) and back; None is
        Keras's default (every axis between the batch axis and the features), which is
        one axis on rank-3 inputs only: higher ranks raise (attention over several axes
        has no equivalent here).

    The other fields (``score_mode``, ``dropout_rate``, ``causal``, ``deterministic``,
    ``dtype``, ``param_dtype``, ``precision``, ``window``, ``logits_soft_cap``,
    ``score_mod``, ``mask_mod``, ``implementation``, ``block_size``) are
    :class:`DotAttentionConfig`'s; ``dtype`` and ``precision`` also apply to the
    projections, and ``param_dtype`` is the kernels' and biases' dtype too.

    Examples:
      >>> from flax_dotattn import MultiHeadDotAttentionConfig
      >>> cfg = MultiHeadDotAttentionConfig(num_heads=4, key_dim=8, num_kv_heads=2)
      >>> cfg.value_depth, cfg.groups, round(cfg.initial_scale, 4)
      (8, 2, 0.3536)
      >>> MultiHeadDotAttentionConfig.from_dict(cfg.to_dict()) == cfg
      True
    """

    @classmethod
    def from_keras(cls, keras_config: Mapping[str, Any]) -> MultiHeadDotAttentionConfig:
        """Builds a config from a Keras 3 ``MultiHeadAttention`` layer config.

        Mapping: ``num_heads``, ``key_dim``, ``value_dim``, ``use_bias`` as they are;
        ``output_shape`` an int or a 1-tuple; ``dropout`` -> ``dropout_rate``;
        ``sliding_window=w`` (Keras: ``|i - j| < w``) -> ``window=(w - 1, w - 1)``; the
        dtype policy as in :meth:`DotAttentionConfig.from_keras`. ``use_scale`` stays
        False, which multiplies the queries by ``1 / sqrt(key_dim)`` as Keras does.
        ``attention_axes`` as it is (Keras's numbers: None or one axis). Dropped:
        ``name``, ``trainable``, ``seed``, ``flash_attention`` (a kernel choice), the
        initializers (the weights travel with :func:`multi_head_params_from_keras`).
        Raises for what has no equivalent: ``attention_axes`` of several axes,
        ``use_gate=True``, an ``output_shape`` of several dims, regularizers and
        constraints. A Keras layer built on ``[B, T, F]`` inputs records
        ``attention_axes=(1,)``: on inputs with more axes Keras attends over axis 1 with
        it, and so does this module. An unbuilt layer's ``attention_axes=None`` attends
        over every axis between the batch axis and the features, one axis on rank-3
        inputs only: the module refuses inputs of higher rank with it.
        """

        return cls(**multi_head_fields_from_keras(keras_config))

    def to_keras(self) -> dict[str, Any]:
        """Returns a config that ``keras.layers.MultiHeadAttention.from_config`` accepts.

        Raises a ValueError for what Keras cannot express: ``num_kv_heads`` fewer than
        ``num_heads``, ``score_mode="concat"``, a window that is not Keras's symmetric
        ``sliding_window``, a ``query_scale`` other than ``1 / sqrt(key_dim)``;
        ``output_shape=None`` is exported as None (Keras reads it
        as the query's last dim too). ``causal`` is a call argument in Keras
        (``use_causal_mask=True``) and is not exported; the learned scale travels with
        the weights (:func:`multi_head_params_to_keras` folds it into the query kernel).
        """

        return multi_head_config_to_keras(self)
