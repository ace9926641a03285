"""``flax_dotattn.nnx.MultiHeadDotAttention``: the Flax NNX twin of the Linen module.

Same options, parameters (as ``nnx.Param``) and numbers as
:class:`flax_dotattn.MultiHeadDotAttention`; the constructor takes ``in_features`` (and
``in_kv_features``) as ``nnx.MultiHeadAttention`` does, and decoding uses
:meth:`MultiHeadDotAttention.init_cache`. Every number comes from
:func:`flax_dotattn._src.modules.multi_head.multi_head_attention`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flax_dotattn._src.config.classes import MultiHeadDotAttentionConfig
from flax_dotattn._src.config.multi_head_schema import HEAD_FIELDS, check_multi_head_config
from flax_dotattn._src.config.schema import field_values
from flax_dotattn._src.modules import multi_head
from flax_dotattn._src.modules.multi_head_linen import Initializer, default_kernel_init
from flax_dotattn._src.options import fail
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


class Projection(nnx.Module):
    """The kernel (and bias) of one projection; the maths is in ``multi_head``."""

    def __init__(
        self,
        shapes: dict[str, tuple[int, ...]],
        inits: dict[str, Initializer],
        dtype: Any,
        rngs: nnx.Rngs,
    ):
        self.kernel = nnx.Param(inits["kernel"](rngs.params(), shapes["kernel"], dtype))
        self.bias = (
            nnx.Param(inits["bias"](rngs.params(), shapes["bias"], dtype))
            if "bias" in shapes
            else nnx.data(None)
        )

    def params(self) -> dict[str, Array]:
        """``{"kernel": ..., "bias": ...}`` (no bias when the layer has none)."""
        out = {"kernel": self.kernel[...]}
        if self.bias is not None:
            out["bias"] = self.bias[...]
        return out


class MultiHeadDotAttention(nnx.Module):
    """Multi-head dot-product attention (Keras's ``MultiHeadAttention``) as an NNX module.

    The options are the fields of the Linen :class:`flax_dotattn.MultiHeadDotAttention`
    (its docstring says what each does, how it maps onto Keras's ``MultiHeadAttention``
    and which options have no Keras equivalent); they are checked on construction.
    ``model.train()`` / ``model.eval()`` flip ``deterministic``; ``.config`` reports the
    constructed value.

    Args:
      num_heads: ``H``.
      in_features: ``Din``, the query's features.
      key_dim: ``Dk`` (None: ``in_features // num_heads``, as ``nnx.MultiHeadAttention``).
      in_kv_features: the key's features, and the value's unless ``in_value_features``
        is given (None: ``in_features``).
      in_value_features: the value's features (None: ``in_kv_features``), for layers
        whose key and value features differ (Keras's ``MultiHeadAttention`` allows it).
      kernel_init, bias_init, query_key_transform, query_transform, key_transform, decode:
        as in the Linen module.
      rngs: an ``nnx.Rngs`` whose ``"params"`` stream initialises the kernels and whose
        ``"dropout"`` stream feeds dropout (forked only when ``dropout_rate > 0``).

    Decoding: :meth:`init_cache` allocates ``cached_key [..., Hkv, Tmax, Dk]``,
    ``cached_value [..., Hkv, Tmax, Dv]``, ``cache_index`` (one, or one per sequence)
    and ``cached_mask [..., Tmax]`` (``nnx.Cache``); each call with ``decode=True`` writes
    its ``Tn`` new positions at each sequence's ``cache_index`` and attends over the cache
    (one compiled step serves every position, chunked prefill and ragged batches; the
    Linen module's docstring gives the rules for masks, ``new_length`` and the checks).

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from flax_dotattn import nnx as fdnnx
      >>> layer = fdnnx.MultiHeadDotAttention(
      ...     4, 16, key_dim=8, num_kv_heads=2, causal=True, rngs=nnx.Rngs(0))
      >>> x = jnp.ones((2, 5, 16))                               # [B, T, Din]
      >>> layer(x, x).shape
      (2, 5, 16)
      >>> layer.init_cache((2, 32, 16))                          # [B, Tmax, Din]
      >>> layer(x[:, :3], x[:, :3], decode=True).shape           # prefill 3 positions
      (2, 3, 16)
      >>> int(layer.cache_index[...])
      3
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        key_dim: int | None = None,
        *,
        value_dim: int | None = None,
        output_shape: int | None = None,
        use_bias: bool = True,
        num_kv_heads: int | None = None,
        attention_axes: tuple[int, ...] | None = (-2,),
        in_kv_features: int | None = None,
        in_value_features: int | None = None,
        use_scale: bool = False,
        scale_init: float | None = None,
        query_scale: float | None = None,
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
        kernel_init: Initializer | None = None,
        bias_init: Initializer = jax.nn.initializers.zeros,
        query_key_transform: Callable[[Array, Array], Array] | None = None,
        query_transform: Callable[[Array, Array], Array] | None = None,
        key_transform: Callable[[Array, Array], Array] | None = None,
        decode: bool = False,
        rngs: nnx.Rngs,
    ):
        for name, n in (
            ("in_features", in_features),
            ("in_kv_features", in_kv_features),
            ("in_value_features", in_value_features),
        ):
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n <= 0):
                fail(f"{name} must be a positive int; received {name}={n!r}.")
        if key_dim is None:
            if isinstance(num_heads, int) and num_heads > 0 and in_features % num_heads:
                fail(
                    "key_dim=None takes in_features // num_heads, which needs num_heads to "
                    f"divide in_features; received in_features={in_features}, "
                    f"num_heads={num_heads}."
                )
            key_dim = in_features // num_heads if isinstance(num_heads, int) else num_heads
        if not isinstance(rngs, nnx.Rngs):
            fail(f"rngs must be an nnx.Rngs; received a {type(rngs).__name__}.")
        arguments = dict(locals())
        config = MultiHeadDotAttentionConfig(
            **{f.name: arguments[f.name] for f in dataclasses.fields(MultiHeadDotAttentionConfig)}
        )
        for name, value in field_values(config).items():
            setattr(self, name, value)
        self.in_features = in_features
        self.in_kv_features = in_features if in_kv_features is None else in_kv_features
        self.in_value_features = (
            self.in_kv_features if in_value_features is None else in_value_features
        )
        self.kernel_init = kernel_init
        self.bias_init = bias_init
        multi_head.resolve_transforms(query_key_transform, query_transform, key_transform)
        self.query_key_transform = query_key_transform
        self.query_transform = query_transform
        self.key_transform = key_transform
        self.decode = decode
        shapes = multi_head.param_shapes(
            config, in_features, self.in_kv_features, self.in_value_features
        )
        for name in ("query", "key", "value", "out"):
            inits = {"kernel": kernel_init or default_kernel_init(name), "bias": bias_init}
            setattr(self, name, Projection(shapes[name], inits, config.param_dtype, rngs))
        attention = config.attention
        for name in attention.param_names:
            setattr(
                self,
                name,
                nnx.Param(jnp.full((), attention.initial_value(name), config.param_dtype)),
            )
        self._configured_deterministic = config.deterministic
        self.rngs: nnx.Rngs | None
        # No dropout, no stream: forking would advance ``rngs`` and shift the
        # initialisation of every layer built after this one.
        self.rngs = nnx.data(None) if config.dropout_rate == 0.0 else rngs["dropout"].fork()
        self.cached_key: nnx.Cache | None = nnx.data(None)
        self.cached_value: nnx.Cache | None = nnx.data(None)
        self.cache_index: nnx.Cache | None = nnx.data(None)
        self.cached_mask: nnx.Cache | None = nnx.data(None)
        self.rolling_cache = False

    @classmethod
    def from_config(
        cls,
        config: MultiHeadDotAttentionConfig,
        in_features: int,
        *,
        rngs: nnx.Rngs,
        **kwargs: Any,
    ) -> MultiHeadDotAttention:
        """Builds the module from a :class:`MultiHeadDotAttentionConfig` (kwargs:
        ``in_kv_features``, ``in_value_features`` and the options outside the config)."""
        config = check_multi_head_config(config, "MultiHeadDotAttention.from_config")
        fields = field_values(config)
        heads = {name: fields.pop(name) for name in HEAD_FIELDS}
        return cls(
            heads.pop("num_heads"),
            in_features,
            heads.pop("key_dim"),
            **heads,
            **fields,
            rngs=rngs,
            **kwargs,
        )

    @property
    def config(self) -> MultiHeadDotAttentionConfig:
        """The hyper-parameters as a :class:`MultiHeadDotAttentionConfig`, as constructed
        (``deterministic`` is the constructor's, not the train/eval state)."""
        config = MultiHeadDotAttentionConfig.of(self)
        return dataclasses.replace(config, deterministic=self._configured_deterministic)

    def params(self) -> dict[str, Any]:
        """The parameters as the plain nested dict the Linen module's ``params`` holds."""
        out: dict[str, Any] = {
            name: getattr(self, name).params() for name in ("query", "key", "value", "out")
        }
        for name in self.config.attention.param_names:
            out[name] = getattr(self, name)[...]
        return out

    def init_cache(
        self,
        input_shape: tuple[int, ...],
        dtype: Any = jnp.float32,
        *,
        per_sequence: bool = False,
        rolling: bool = False,
    ) -> None:
        """Allocates an empty decoding cache for inputs of shape ``[..., Tmax, features]``
        (the batch dims and the longest sequence to decode), in ``dtype``;
        ``per_sequence``: one ``cache_index`` per sequence (``int32 [...]``), for a
        ragged batch; ``rolling``: ``Tmax`` is the number of slots of a rolling cache
        (the Linen module's ``rolling_cache``), for a causal sliding window."""
        config = MultiHeadDotAttentionConfig.of(self)
        input_shape = tuple(input_shape)
        if len(input_shape) < 2:
            fail(
                "init_cache expects input_shape [..., Tmax, features]; received "
                f"input_shape={input_shape}."
            )
        empty = multi_head.empty_cache(
            config, input_shape[:-2], input_shape[-2], dtype, per_sequence=per_sequence
        )
        self.cached_key = nnx.Cache(empty.key)
        self.cached_value = nnx.Cache(empty.value)
        self.cache_index = nnx.Cache(empty.cache_index)
        self.cached_mask = nnx.Cache(empty.mask)
        self.rolling_cache = rolling

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
        positions: Array | None = None,
        decode: bool | None = None,
        new_length: int | Array | None = None,
        rngs: nnx.Rngs | Array | None = None,
    ) -> Array | tuple[Array, Array]:
        """Applies multi-head attention; see :class:`flax_dotattn.MultiHeadDotAttention`
        for the arguments. ``rngs`` (an ``nnx.Rngs`` or a key) overrides the
        constructor's dropout stream."""
        arguments = dict(locals())
        del arguments["self"], arguments["rngs"]
        cache = None
        if self.decode if decode is None else decode:
            if (
                self.cached_key is None
                or self.cached_value is None
                or self.cache_index is None
                or self.cached_mask is None
            ):
                fail("decode=True needs a cache: call init_cache(input_shape) first.")
            cache = multi_head.KVCache(
                self.cached_key[...],
                self.cached_value[...],
                self.cache_index[...],
                self.cached_mask[...],
            )
        query_transform, key_transform = multi_head.resolve_transforms(
            self.query_key_transform, self.query_transform, self.key_transform
        )
        result, new_cache = multi_head.multi_head_attention(
            MultiHeadDotAttentionConfig.of(self),  # deterministic as train()/eval() left it
            self.params(),
            arguments,
            cache=cache,
            rolling=self.rolling_cache,
            query_transform=query_transform,
            key_transform=key_transform,
            dropout_rng=lambda: self._dropout_key(rngs),
            where_deterministic="constructor, call argument, or model.train()/model.eval()",
        )
        if new_cache is not None:
            assert self.cached_key is not None and self.cached_value is not None
            assert self.cache_index is not None and self.cached_mask is not None
            self.cached_key[...] = new_cache.key
            self.cached_value[...] = new_cache.value
            self.cache_index[...] = new_cache.cache_index
            self.cached_mask[...] = new_cache.mask
        return result

    def _dropout_key(self, rngs: nnx.Rngs | Array | None) -> Array:
        source = self.rngs if rngs is None else rngs
        if source is None:
            fail(
                "dropout is active but no rngs were given: pass rngs=nnx.Rngs(...) to the "
                "constructor or the call."
            )
        if isinstance(source, nnx.Rngs):
            return source["dropout"]()
        if isinstance(source, jax.Array):
            return source
        return source()
