"""``flax_dotattn.nnx.DotAttention``: the Flax NNX twin of the Linen module.

Same constructor options, params (``nnx.Param`` scalars ``scale`` and
``concat_score_weight``, initialised to 1.0) and numbers as
:class:`flax_dotattn.DotAttention`; dropout draws from an ``nnx.Rngs`` ``"dropout"``
stream. ``model.train()`` / ``model.eval()`` flip ``deterministic`` as for
``nnx.Dropout``. Every number comes from :func:`flax_dotattn.dot_attention`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flax_dotattn._src.config.classes import DotAttentionConfig
from flax_dotattn._src.config.schema import check_config, field_values
from flax_dotattn._src.modules import call as module_call
from flax_dotattn._src.modules.linen import DotAttention as LinenDotAttention
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


class DotAttention(nnx.Module):
    """Keras's ``Attention`` layer as a Flax NNX module.

    The keyword arguments ``use_scale``, ``scale_init``, ``score_mode``, ``dropout_rate``,
    ``causal``, ``deterministic``, ``dtype``, ``param_dtype``, ``precision``, ``window``,
    ``logits_soft_cap``, ``score_mod``, ``mask_mod``, ``implementation`` and
    ``block_size`` are the fields of the Linen :class:`flax_dotattn.DotAttention`: the
    options of
    :class:`flax_dotattn.DotAttentionConfig`, with the same names, defaults, checks and
    meaning. They are checked on construction and kept as attributes by their canonical
    values (dtypes and precision by name, ``block_size`` as a
    :class:`flax_dotattn.BlockSizes`).

    Args:
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
        scale_init: float = 1.0,
        score_mode: ScoreMode = "dot",
        dropout_rate: float = 0.0,
        causal: bool = False,
        deterministic: bool | None = None,
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike = "float32",
        precision: PrecisionLike = None,
        window: Window = None,
        logits_soft_cap: float | None = None,
        score_mod: ScoreMod | None = None,
        mask_mod: MaskMod | None = None,
        implementation: Implementation | None = None,
        block_size: BlockSizeLike = None,
        rngs: nnx.Rngs | None = None,
    ):
        # The config checks the arguments and holds them by their canonical values (it
        # reads them from a mapping: its fields' types are those canonical values).
        config = DotAttentionConfig.from_dict(
            dict(
                use_scale=use_scale,
                scale_init=scale_init,
                score_mode=score_mode,
                dropout_rate=dropout_rate,
                causal=causal,
                deterministic=deterministic,
                dtype=dtype,
                param_dtype=param_dtype,
                precision=precision,
                window=window,
                logits_soft_cap=logits_soft_cap,
                score_mod=score_mod,
                mask_mod=mask_mod,
                implementation=implementation,
                block_size=block_size,
            )
        )
        self.use_scale = config.use_scale
        self.scale_init = config.scale_init
        self.score_mode = config.score_mode
        self.dropout_rate = config.dropout_rate
        self.causal = config.causal
        self.deterministic = config.deterministic
        self.dtype = config.dtype
        self.param_dtype = config.param_dtype
        self.precision = config.precision
        self.window = config.window
        self.logits_soft_cap = config.logits_soft_cap
        self.score_mod = config.score_mod
        self.mask_mod = config.mask_mod
        self.implementation = config.implementation
        self.block_size = config.block_size
        for name in config.param_names:
            value = jnp.full((), config.initial_value(name), config.param_dtype)
            setattr(self, name, nnx.Param(value))
        # Train/eval state (model.train() / model.eval() flip ``deterministic``) is kept
        # apart from the configured value, which is what ``.config`` reports.
        self._configured_deterministic = config.deterministic
        self.rngs: nnx.Rngs | None
        if rngs is not None and not isinstance(rngs, nnx.Rngs):
            raise ValueError(f"rngs must be None or an nnx.Rngs; received a {type(rngs).__name__}.")
        if rngs is None or config.dropout_rate == 0.0:
            # No dropout, no stream: forking would advance ``rngs`` and shift the
            # initialisation of every layer built after this one.
            self.rngs = nnx.data(None)
        else:
            self.rngs = rngs["dropout"].fork()

    @classmethod
    def from_config(cls, config: DotAttentionConfig, *, rngs: nnx.Rngs | None = None):
        """Builds the module from a :class:`DotAttentionConfig`."""
        config = check_config(config, "DotAttention.from_config")
        return cls(**field_values(config), rngs=rngs)

    @property
    def config(self) -> DotAttentionConfig:
        """The module's hyper-parameters as a :class:`DotAttentionConfig`: as constructed,
        without the train/eval state that ``model.train()`` / ``model.eval()`` set
        (``deterministic`` is the constructor's)."""
        config = DotAttentionConfig.of(self)
        return dataclasses.replace(config, deterministic=self._configured_deterministic)

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
        query_offset: int | Array | None = None,
        kv_length: int | Array | None = None,
        window: Window = None,
        deterministic: bool | None = None,
        return_attention_scores: bool = False,
        rngs: nnx.Rngs | Array | None = None,
    ) -> Array | tuple[Array, Array]:
        """Applies attention; see :class:`flax_dotattn.DotAttention` for the arguments.

        ``rngs`` (an ``nnx.Rngs`` or a key) overrides the constructor's dropout stream.
        """
        return module_call.module_attention(
            DotAttentionConfig.of(self),  # deterministic as train()/eval() left it
            self.params(),
            locals(),
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
