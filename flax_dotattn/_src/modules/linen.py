"""``DotAttention``: a thin Flax Linen module over :func:`dot_attention`.

The module owns the learned scalars and the dropout rng; every number comes from
:func:`flax_dotattn.dot_attention`. Shape glossary: see :mod:`flax_dotattn._src.masks`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from flax_dotattn._src.config.classes import DotAttentionConfig
from flax_dotattn._src.config.schema import check_config, field_values
from flax_dotattn._src.modules import call as module_call
from flax_dotattn._src.types import (
    Array,
    BlockSizeLike,
    DTypeLike,
    Implementation,
    MaskMod,
    Masks,
    PrecisionLike,
    ScoreMod,
    ScoreMode,
    Window,
)


class DotAttention(nn.Module):
    """Keras's ``Attention`` layer as a Flax Linen module.

    Params (both initialised to 1.0, as in Keras): ``scale: f32[]`` when ``use_scale``
    and ``concat_score_weight: f32[]`` when ``score_mode="concat"``. Dropout draws from
    the ``"dropout"`` rng stream. The fields are the options of
    :class:`DotAttentionConfig`, with the same names, defaults and checks (the fields are
    checked when the module is called, or read as :attr:`config`).

    Attributes:
      use_scale: create the learned ``scale`` param, which multiplies the logits (inside
        the ``tanh`` in concat mode), as Keras's ``use_scale``.
      scale_init: the ``scale`` param's initial value: 1.0 as in Keras; ``1 / sqrt(D)``
        for a transformer's usual logits (``D`` the query depth).
      score_mode: ``"dot"`` or ``"concat"`` (which creates the ``concat_score_weight``
        param), as Keras's ``score_mode``.
      dropout_rate: dropout on the attention weights, in ``[0, 1)`` (Keras ``dropout``).
      causal: the default of the call's ``causal``: query ``i`` attends to keys
        ``j <= i`` only.
      deterministic: the default of the call's ``deterministic`` (True: no dropout);
        with None the call must decide whenever ``dropout_rate > 0``.
      dtype: the inputs are cast to this dtype before the call (None: follow the
        inputs).
      param_dtype: dtype of the learned params.
      precision: matmul precision: None, a ``jax.lax.Precision`` or its name.
      window: the default of the call's ``window``, a sliding window ``(left, right)``.
      logits_soft_cap: None or a float ``cap > 0``: the logits become
        ``cap * tanh(logits / cap)`` before the masks (see :func:`dot_attention`).
      score_mod: a score function (see :func:`dot_attention`); the module's
        :attr:`config` records it by its registered name.
      mask_mod: a mask function (see :func:`dot_attention`), recorded likewise.
      implementation: None (automatic), ``"xla"``, ``"chunked"``, ``"cudnn"``,
        ``"pallas_tpu"`` or ``"pallas_gpu"``; see :func:`dot_attention`.
      block_size: blocks of the chunked path (see :class:`BlockSizes`).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from flax_dotattn import DotAttention
      >>> layer = DotAttention(use_scale=True)
      >>> q, v = jnp.ones((2, 3, 4)), jnp.ones((2, 5, 4))    # [B, Tq, D], [B, Tv, D]
      >>> variables = layer.init(jax.random.key(0), q, v)
      >>> jax.tree.map(jnp.shape, variables)
      {'params': {'scale': ()}}
      >>> layer.apply(variables, q, v).shape
      (2, 3, 4)
    """

    use_scale: bool = False
    scale_init: float = 1.0
    score_mode: ScoreMode = "dot"
    dropout_rate: float = 0.0
    causal: bool = False
    deterministic: bool | None = None
    dtype: DTypeLike | None = None
    param_dtype: DTypeLike = "float32"
    precision: PrecisionLike = None
    window: Window = None
    logits_soft_cap: float | None = None
    score_mod: ScoreMod | None = None
    mask_mod: MaskMod | None = None
    implementation: Implementation | None = None
    block_size: BlockSizeLike = None

    @classmethod
    def from_config(cls, config: DotAttentionConfig, **kwargs: Any) -> DotAttention:
        """Builds the module from a :class:`DotAttentionConfig` (kwargs: e.g. ``name``)."""
        config = check_config(config, "DotAttention.from_config")
        return cls(**field_values(config), **kwargs)

    @property
    def config(self) -> DotAttentionConfig:
        """The module's hyper-parameters as a validated :class:`DotAttentionConfig`."""
        return DotAttentionConfig.of(self)

    @nn.compact
    def __call__(
        self,
        query: Array,
        value: Array,
        key: Array | None = None,
        masks: Masks = None,
        causal: bool | None = None,
        *,
        attention_mask: Array | None = None,
        bias: Array | None = None,
        segment_ids: tuple[Array, Array] | None = None,
        query_offset: int | Array | None = None,
        kv_length: int | Array | None = None,
        window: Window = None,
        deterministic: bool | None = None,
        return_attention_scores: bool = False,
    ) -> Array | tuple[Array, Array]:
        """Applies attention; call arguments override the module's fields.

        Args:
          query: ``[..., Tq, D]``.
          value: ``[..., Tv, Dv]``.
          key: ``[..., Tv, D]`` or None (use ``value``).
          masks: None or ``(query_mask [..., Tq], value_mask [..., Tv])``.
          causal: overrides the ``causal`` field when not None.
          attention_mask, bias, segment_ids, query_offset, kv_length: see
            :func:`dot_attention`.
          window: overrides the ``window`` field when not None.
          deterministic: overrides the ``deterministic`` field when not None. With
            ``dropout_rate > 0`` one of the two must be set.
          return_attention_scores: also return the weights ``[..., Tq, Tv]``.

        Returns:
          ``[..., Tq, Dv]``, or ``(output, weights)``; see :func:`dot_attention`.
        """
        arguments = dict(locals())  # the call's arguments, before any other local
        config = self.config  # validates the fields
        params = {
            name: self.param(
                name, nn.initializers.constant(config.initial_value(name)), (), config.param_dtype
            )
            for name in config.param_names
        }
        return module_call.module_attention(
            config,
            params,
            arguments,
            dropout_rng=lambda: self.make_rng("dropout"),
            where_deterministic="as a module field or a call argument",
        )
