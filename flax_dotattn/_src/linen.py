"""``DotAttention``: a thin Flax Linen module over :func:`dot_attention`.

The module owns the learned scalars and the dropout rng; every number comes from
:func:`flax_dotattn.dot_attention`. Shape glossary: see :mod:`flax_dotattn._src.masks`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_dotattn._src.attention import Masks, dot_attention
from flax_dotattn._src.call_args import cast_inputs, resolve_call
from flax_dotattn._src.config import DotAttentionConfig


class DotAttention(nn.Module):
    """Keras's ``Attention`` layer as a Flax Linen module.

    Params (both initialised to 1.0, as in Keras): ``scale: f32[]`` when ``use_scale``
    and ``concat_score_weight: f32[]`` when ``score_mode="concat"``. Dropout draws from
    the ``"dropout"`` rng stream.

    Attributes:
      use_scale: learn a scalar that multiplies the logits (inside the tanh in concat
        mode).
      score_mode: ``"dot"`` or ``"concat"``.
      dropout_rate: dropout on the attention weights, in ``[0, 1)``.
      causal: default for the call's ``causal`` argument.
      deterministic: default for the call's ``deterministic`` argument.
      dtype: computation dtype; inputs are cast to it (None: follow the inputs).
      param_dtype: dtype of the learned scalars.
      precision: matmul precision.
      implementation: None (automatic), ``"xla"``, ``"chunked"`` or ``"cudnn"``.
      block_size: blocks of the chunked path (None: the measured default).

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
    score_mode: str = "dot"
    dropout_rate: float = 0.0
    causal: bool = False
    deterministic: bool | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    implementation: str | None = None
    block_size: int | tuple[int, int] | None = None

    @classmethod
    def from_config(cls, config: DotAttentionConfig, **kwargs: Any) -> DotAttention:
        """Builds the module from a :class:`DotAttentionConfig` (kwargs: e.g. ``name``)."""
        if not isinstance(config, DotAttentionConfig):
            raise ValueError(
                "DotAttention.from_config expects a DotAttentionConfig; "
                f"received a {type(config).__name__}."
            )
        fields = {f: getattr(config, f) for f in config.to_dict()}
        fields["dtype"] = None if config.dtype is None else jnp.dtype(config.dtype)
        fields["param_dtype"] = jnp.dtype(config.param_dtype)
        return cls(**fields, **kwargs)

    @property
    def config(self) -> DotAttentionConfig:
        """The module's hyper-parameters as a validated :class:`DotAttentionConfig`."""
        return DotAttentionConfig.of(self)

    @nn.compact
    def __call__(
        self,
        query: jax.Array,
        value: jax.Array,
        key: jax.Array | None = None,
        masks: Masks = None,
        causal: bool | None = None,
        *,
        deterministic: bool | None = None,
        return_attention_scores: bool = False,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Applies attention; call arguments override the module's fields.

        Args:
          query: ``[..., Tq, D]``.
          value: ``[..., Tv, Dv]``.
          key: ``[..., Tv, D]`` or None (use ``value``).
          masks: None or ``(query_mask [..., Tq], value_mask [..., Tv])``.
          causal: overrides the ``causal`` field when not None.
          deterministic: overrides the ``deterministic`` field when not None. With
            ``dropout_rate > 0`` one of the two must be set.
          return_attention_scores: also return the weights ``[..., Tq, Tv]``.

        Returns:
          ``[..., Tq, Dv]``, or ``(output, weights)``; see :func:`dot_attention`.
        """
        config = self.config  # validates the fields
        causal, deterministic = resolve_call(
            config, causal, deterministic, "as a module field or a call argument"
        )

        params = {}
        if config.use_scale:
            params["scale"] = self.param(
                "scale", nn.initializers.ones_init(), (), config.param_dtype
            )
        if config.score_mode == "concat":
            params["concat_score_weight"] = self.param(
                "concat_score_weight", nn.initializers.ones_init(), (), config.param_dtype
            )
        query, value, key = cast_inputs(config.dtype, query, value, key)
        use_dropout = not deterministic and config.dropout_rate > 0.0
        return dot_attention(
            params,
            query,
            value,
            key,
            masks,
            causal,
            score_mode=config.score_mode,
            dropout_rate=config.dropout_rate,
            dropout_rng=self.make_rng("dropout") if use_dropout else None,
            deterministic=deterministic,
            return_attention_scores=return_attention_scores,
            precision=self.precision,
            implementation=config.implementation,
            block_size=config.block_size,
        )
