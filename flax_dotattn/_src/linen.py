"""``DotAttention``: a thin Flax Linen module over :func:`dot_attention`.

The module owns the learned scalars and the dropout rng; every number comes from
:func:`flax_dotattn.dot_attention`. Shape glossary: see :mod:`flax_dotattn._src.masks`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from flax_dotattn._src import module_call
from flax_dotattn._src.config import DotAttentionConfig, document_options
from flax_dotattn._src.types import Array, Masks


@document_options()
class DotAttention(nn.Module):
    """Keras's ``Attention`` layer as a Flax Linen module.

    Params (both initialised to 1.0, as in Keras): ``scale: f32[]`` when ``use_scale``
    and ``concat_score_weight: f32[]`` when ``score_mode="concat"``. Dropout draws from
    the ``"dropout"`` rng stream. The fields are the options of
    :class:`DotAttentionConfig` (same names, defaults and checks):

    Attributes:
      {options}

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

    # One field per DotAttentionConfig option: the schema is declared there, once.
    __annotations__ = module_call.option_annotations()
    locals().update(module_call.option_defaults())

    @classmethod
    def from_config(cls, config: DotAttentionConfig, **kwargs: Any) -> DotAttention:
        """Builds the module from a :class:`DotAttentionConfig` (kwargs: e.g. ``name``)."""
        config = module_call.check_config(config, "DotAttention.from_config")
        return cls(**module_call.config_fields(config), **kwargs)

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
        window: tuple[int | None, int | None] | None = None,
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
          attention_mask, bias, segment_ids: see :func:`dot_attention`.
          window: overrides the ``window`` field when not None.
          deterministic: overrides the ``deterministic`` field when not None. With
            ``dropout_rate > 0`` one of the two must be set.
          return_attention_scores: also return the weights ``[..., Tq, Tv]``.

        Returns:
          ``[..., Tq, Dv]``, or ``(output, weights)``; see :func:`dot_attention`.
        """
        config = self.config  # validates the fields
        params = {
            name: self.param(name, nn.initializers.ones_init(), (), config.param_dtype)
            for name in config.param_names
        }
        return module_call.module_attention(
            config,
            params,
            query,
            value,
            key,
            masks,
            causal,
            deterministic=deterministic,
            return_attention_scores=return_attention_scores,
            attention_mask=attention_mask,
            bias=bias,
            segment_ids=segment_ids,
            window=window,
            dropout_rng=lambda: self.make_rng("dropout"),
            where_deterministic="as a module field or a call argument",
        )
