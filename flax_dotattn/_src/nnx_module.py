"""``flax_dotattn.nnx.DotAttention``: the Flax NNX twin of the Linen module.

Same constructor options, params (``nnx.Param`` scalars ``scale`` and
``concat_score_weight``, initialised to 1.0) and numbers as
:class:`flax_dotattn.DotAttention`; dropout draws from an ``nnx.Rngs`` ``"dropout"``
stream. ``model.train()`` / ``model.eval()`` flip ``deterministic`` as for
``nnx.Dropout``. Every number comes from :func:`flax_dotattn.dot_attention`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flax_dotattn._src.attention import Masks, dot_attention
from flax_dotattn._src.call_args import cast_inputs, resolve_call
from flax_dotattn._src.config import DotAttentionConfig
from flax_dotattn._src.linen import DotAttention as LinenDotAttention


class DotAttention(nnx.Module):
    """Keras's ``Attention`` layer as a Flax NNX module.

    Args:
      use_scale: learn a scalar ``scale`` for the logits.
      score_mode: ``"dot"`` or ``"concat"``.
      dropout_rate: dropout on the attention weights, in ``[0, 1)``.
      causal: default for the call's ``causal``.
      deterministic: default for the call's ``deterministic`` (``train()`` sets False,
        ``eval()`` True).
      dtype: computation dtype; inputs are cast to it (None: follow the inputs).
      param_dtype: dtype of the learned scalars.
      precision: matmul precision.
      implementation: None (automatic), ``"xla"``, ``"chunked"`` or ``"cudnn"``.
      block_size: blocks of the chunked path (None: the measured default).
      rngs: an ``nnx.Rngs`` whose ``"dropout"`` stream feeds dropout (optional when no
        dropout is used, or when ``rngs`` is passed at call time).

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from flax_dotattn import nnx as fdnnx
      >>> layer = fdnnx.DotAttention(use_scale=True, dropout_rate=0.1, rngs=nnx.Rngs(0))
      >>> q, v = jnp.ones((2, 3, 4)), jnp.ones((2, 5, 4))    # [B, Tq, D], [B, Tv, D]
      >>> layer.eval()
      >>> layer(q, v).shape
      (2, 3, 4)
      >>> float(layer.scale[...])
      1.0
    """

    def __init__(
        self,
        *,
        use_scale: bool = False,
        score_mode: str = "dot",
        dropout_rate: float = 0.0,
        causal: bool = False,
        deterministic: bool | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        implementation: str | None = None,
        block_size: int | tuple[int, int] | None = None,
        rngs: nnx.Rngs | None = None,
    ):
        config = DotAttentionConfig(
            use_scale=use_scale,
            score_mode=score_mode,
            dropout_rate=dropout_rate,
            causal=causal,
            deterministic=deterministic,
            dtype=dtype,
            param_dtype=param_dtype,
            precision=precision,
            implementation=implementation,
            block_size=block_size,
        )  # validates
        self.use_scale = config.use_scale
        self.score_mode = config.score_mode
        self.dropout_rate = config.dropout_rate
        self.causal = config.causal
        self.deterministic = config.deterministic
        self.dtype = config.dtype
        self.param_dtype = config.param_dtype
        self.precision = config.precision
        self.implementation = config.implementation
        self.block_size = config.block_size
        if config.use_scale:
            self.scale = nnx.Param(jnp.ones((), config.param_dtype))
        if config.score_mode == "concat":
            self.concat_score_weight = nnx.Param(jnp.ones((), config.param_dtype))
        if rngs is None:
            self.rngs = nnx.data(None)
        elif isinstance(rngs, nnx.Rngs):
            self.rngs = rngs["dropout"].fork()
        else:
            raise ValueError(f"rngs must be None or an nnx.Rngs; received a {type(rngs).__name__}.")

    @classmethod
    def from_config(cls, config: DotAttentionConfig, *, rngs: nnx.Rngs | None = None):
        """Builds the module from a :class:`DotAttentionConfig`."""
        if not isinstance(config, DotAttentionConfig):
            raise ValueError(
                "DotAttention.from_config expects a DotAttentionConfig; "
                f"received a {type(config).__name__}."
            )
        return cls(**{f: getattr(config, f) for f in config.to_dict()}, rngs=rngs)

    @property
    def config(self) -> DotAttentionConfig:
        """The module's hyper-parameters as a :class:`DotAttentionConfig`."""
        return DotAttentionConfig.of(self)

    def params(self) -> dict[str, jax.Array]:
        """The learned scalars as a plain dict, as :func:`dot_attention` takes them."""
        names = self.config.param_names
        return {name: getattr(self, name)[...] for name in names}

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
        rngs: nnx.Rngs | jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Applies attention; see :class:`flax_dotattn.DotAttention` for the arguments.

        ``rngs`` (an ``nnx.Rngs`` or a key) overrides the constructor's dropout stream.
        """
        config = self.config
        causal, deterministic = resolve_call(
            config,
            causal,
            deterministic,
            "constructor, call argument, or model.train()/model.eval()",
        )
        use_dropout = not deterministic and config.dropout_rate > 0.0
        dropout_rng = None
        if use_dropout:
            source = self.rngs if rngs is None else rngs
            if source is None:
                raise ValueError(
                    "dropout is active but no rngs were given: pass rngs=nnx.Rngs(...) to "
                    "the constructor or the call."
                )
            if isinstance(source, nnx.Rngs):
                dropout_rng = source["dropout"]()
            elif isinstance(source, jax.Array):
                dropout_rng = source
            else:
                dropout_rng = source()
        query, value, key = cast_inputs(config.dtype, query, value, key)
        return dot_attention(
            self.params(),
            query,
            value,
            key,
            masks,
            causal,
            score_mode=config.score_mode,
            dropout_rate=config.dropout_rate,
            dropout_rng=dropout_rng,
            deterministic=deterministic,
            return_attention_scores=return_attention_scores,
            precision=config.precision,
            implementation=config.implementation,
            block_size=config.block_size,
        )


def from_linen(
    module: LinenDotAttention, variables: Mapping[str, Any], *, rngs: nnx.Rngs | None = None
) -> DotAttention:
    """Builds an NNX :class:`DotAttention` from a Linen module and its variables.

    Args:
      module: the Linen :class:`flax_dotattn.DotAttention`.
      variables: its variables, ``{"params": {...}}`` (or the params dict itself).
      rngs: the dropout stream of the new module.

    Returns:
      An NNX module with the same config and parameter values.
    """
    params = variables.get("params", variables)
    model = DotAttention.from_config(module.config, rngs=rngs)
    expected = set(model.config.param_names)
    if set(params) != expected:
        raise ValueError(
            f"from_linen: expected params {sorted(expected)} for {module.config}; "
            f"received {sorted(params)}."
        )
    for name in expected:
        getattr(model, name)[...] = jnp.asarray(params[name], model.param_dtype)
    return model


def to_linen(model: DotAttention) -> tuple[LinenDotAttention, dict[str, Any]]:
    """Returns the Linen module and ``{"params": {...}}`` equivalent to ``model``."""
    return LinenDotAttention.from_config(model.config), {"params": model.params()}
