"""``flax_dotattn.nnx.DotAttention``: the Flax NNX twin of the Linen module.

Same constructor options, params (``nnx.Param`` scalars ``scale`` and
``concat_score_weight``, initialised to 1.0) and numbers as
:class:`flax_dotattn.DotAttention`; dropout draws from an ``nnx.Rngs`` ``"dropout"``
stream. ``model.train()`` / ``model.eval()`` flip ``deterministic`` as for
``nnx.Dropout``. Every number comes from :func:`flax_dotattn.dot_attention`.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flax_dotattn._src import module_call
from flax_dotattn._src.config import OPTIONS, DotAttentionConfig, document_options
from flax_dotattn._src.linen import DotAttention as LinenDotAttention
from flax_dotattn._src.types import Array, Masks


@document_options()
class DotAttention(nnx.Module):
    """Keras's ``Attention`` layer as a Flax NNX module.

    The keyword arguments are the options of :class:`flax_dotattn.DotAttentionConfig`
    (same names, defaults and checks), plus ``rngs``:

    Args:
      {options}
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

    def __init__(self, *, rngs: nnx.Rngs | None = None, **options: Any):
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ValueError(
                f"DotAttention got unknown options {unknown}; expected options from "
                f"{sorted(OPTIONS)} and rngs."
            )
        config = DotAttentionConfig(**options)  # validates
        for name, value in module_call.config_fields(config).items():
            setattr(self, name, value)
        for name in config.param_names:
            setattr(self, name, nnx.Param(jnp.ones((), config.param_dtype)))
        if rngs is None:
            self.rngs = nnx.data(None)
        elif isinstance(rngs, nnx.Rngs):
            self.rngs = rngs["dropout"].fork()
        else:
            raise ValueError(f"rngs must be None or an nnx.Rngs; received a {type(rngs).__name__}.")

    __init__.__signature__ = inspect.Signature(
        [
            inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
            *module_call.option_parameters(),
            inspect.Parameter("rngs", inspect.Parameter.KEYWORD_ONLY, default=None),
        ]
    )

    @classmethod
    def from_config(cls, config: DotAttentionConfig, *, rngs: nnx.Rngs | None = None):
        """Builds the module from a :class:`DotAttentionConfig`."""
        config = module_call.check_config(config, "DotAttention.from_config")
        return cls(**module_call.config_fields(config), rngs=rngs)

    @property
    def config(self) -> DotAttentionConfig:
        """The module's hyper-parameters as a :class:`DotAttentionConfig`."""
        return DotAttentionConfig.of(self)

    def params(self) -> dict[str, Array]:
        """The learned scalars as a plain dict, as :func:`dot_attention` takes them."""
        return {name: getattr(self, name)[...] for name in self.config.param_names}

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
        rngs: nnx.Rngs | Array | None = None,
    ) -> Array | tuple[Array, Array]:
        """Applies attention; see :class:`flax_dotattn.DotAttention` for the arguments.

        ``rngs`` (an ``nnx.Rngs`` or a key) overrides the constructor's dropout stream.
        """
        return module_call.module_attention(
            self.config,
            self.params(),
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
            dropout_rng=lambda: self._dropout_key(rngs),
            where_deterministic="constructor, call argument, or model.train()/model.eval()",
        )

    def _dropout_key(self, rngs: nnx.Rngs | Array | None) -> Array:
        source = self.rngs if rngs is None else rngs
        if source is None:
            raise ValueError(
                "dropout is active but no rngs were given: pass rngs=nnx.Rngs(...) to "
                "the constructor or the call."
            )
        if isinstance(source, nnx.Rngs):
            return source["dropout"]()
        if isinstance(source, jax.Array):
            return source
        return source()


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
