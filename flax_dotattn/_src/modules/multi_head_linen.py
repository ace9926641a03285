"""``MultiHeadDotAttention``: the Linen multi-head module over :func:`dot_attention`.

The module owns the projections' kernels and biases, the learned scalars, the dropout rng
and the decoding cache; every number comes from
:func:`flax_dotattn._src.modules.multi_head.multi_head_attention`. Shape glossary: see
:mod:`flax_dotattn._src.modules.multi_head`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_dotattn._src.config.classes import MultiHeadDotAttentionConfig
from flax_dotattn._src.config.multi_head_schema import check_multi_head_config
from flax_dotattn._src.config.schema import field_values
from flax_dotattn._src.modules import multi_head
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

Initializer = Callable[..., Array]


def default_kernel_init(name: str) -> Initializer:
    """Keras's ``glorot_uniform``, with the fans of the projection ``name``: the input
    features in, the heads and depth out (``[Din, H, Dk]``); for ``out`` the heads and
    depth in (``[H, Dv, Dout]``)."""
    if name == "out":
        return jax.nn.initializers.glorot_uniform(in_axis=(0, 1), out_axis=2)
    return jax.nn.initializers.glorot_uniform(in_axis=0, out_axis=(1, 2))


class _Projection(nn.Module):
    """The kernel (and bias) of one projection; the maths is in ``multi_head``."""

    shapes: dict[str, tuple[int, ...]]
    kernel_init: Initializer
    bias_init: Initializer
    param_dtype: Any

    @nn.compact
    def __call__(self) -> dict[str, Array]:
        inits = {"kernel": self.kernel_init, "bias": self.bias_init}
        return {
            name: self.param(name, inits[name], shape, self.param_dtype)
            for name, shape in self.shapes.items()
        }


class MultiHeadDotAttention(nn.Module):
    """Multi-head dot-product attention (Keras's ``MultiHeadAttention``) as a Linen module.

    Projects the query to ``[..., Tq, H, Dk]`` and the key and value to
    ``[..., Tv, Hkv, Dk]`` / ``[..., Tv, Hkv, Dv]``, runs :func:`dot_attention` once with
    the heads as batch dims (grouped-query attention without copying keys or values),
    and projects the heads back to ``[..., Tq, Dout]``.

    Params (Keras's ``EinsumDense`` layouts, Flax's names): ``query``, ``key``,
    ``value`` and ``out``, each ``{"kernel", "bias"}`` with kernels ``[Din, H, Dk]``,
    ``[Dkin, Hkv, Dk]``, ``[Dvin, Hkv, Dv]``, ``[H, Dv, Dout]`` and biases ``[H, Dk]``,
    ``[Hkv, Dk]``, ``[Hkv, Dv]``, ``[Dout]``; plus ``scale`` (when ``use_scale``) and
    ``concat_score_weight`` (concat mode). Dropout draws from the ``"dropout"`` stream.

    Keras ``MultiHeadAttention`` parity: with ``use_scale=False`` the projected queries
    are multiplied by ``1 / sqrt(key_dim)`` (or ``query_scale``), exactly as Keras does,
    so Keras's weights (:func:`multi_head_params_from_keras`) give Keras's numbers for
    value masks, ``attention_mask``, ``causal`` (``use_causal_mask``), ``sliding_window``
    (``window``), ``attention_axes`` (one axis) and the returned scores. With
    ``use_scale=True`` the learned ``scale`` multiplies the logits instead, starting at
    ``scale_init`` (None: ``1 / sqrt(key_dim)``, Keras's logits). A query row that sees
    no key (every key masked, or a masked query) gets zero weights and a zero output
    before the output projection, so the output is the projection's bias: the rule of
    Keras's masked softmax, the path that returns the scores (and runs with dropout or
    inputs of rank other than 3). Keras's other path (``ops.dot_product_attention``,
    taken without ``return_attention_scores``, without dropout, on rank-3 inputs) spreads
    such a row evenly over every key instead; the rows that see a key agree on both.
    No Keras equivalent exists for ``score_mode="concat"``, ``num_kv_heads``, one-sided
    windows, ``segment_ids``, ``bias``, ``query_offset``/``kv_length``, decoding, the
    learned scale and a ``query_scale`` other than ``1 / sqrt(key_dim)``; and Keras's
    attention over several axes and ``use_gate`` have none here.

    Decoding (``decode=True``, Flax's convention): the first call, at ``init``, creates
    the ``"cache"`` collection (``cached_key [..., Hkv, Tmax, Dk]``, ``cached_value [...,
    Hkv, Tmax, Dv]``, ``cache_index`` (``int32[]``, or ``int32[...]`` one per sequence
    with ``per_sequence_cache=True``) and ``cached_mask bool [..., Tmax]``) sized by the
    key/value length ``Tmax`` given, and computes ordinary attention. Later calls with
    ``mutable=["cache"]`` take ``Tn >= 1`` new positions (query, key and value
    ``[..., Tn, ...]``), write them at each sequence's ``cache_index`` and attend over the
    cache with ``query_offset=cache_index`` and ``kv_length=cache_index + new_length``
    (traced: one compiled step serves every position, chunked prefill and a batch of
    sequences at different positions). With ``causal=True`` the logits equal the full
    sequence's. A value mask given in decode mode is the mask of the ``Tn`` new positions
    (``[..., Tn]``), kept in ``cached_mask`` beside their keys; an ``attention_mask``,
    ``bias`` or kv ``segment_ids`` must cover the cache's slots (``[..., Tn, Tmax]``,
    ``[..., Tmax]``), and shapes that would broadcast over the cache raise. Writing past
    ``Tmax`` raises when ``cache_index`` is known (eager calls), and is reported by
    ``jax.experimental.checkify`` (``errors=checkify.user_checks``) under ``jit``.

    The fields ``num_heads`` to ``block_size`` are those of
    :class:`MultiHeadDotAttentionConfig` (same names, defaults and checks); eight more are
    not part of the config:

    Attributes:
      kernel_init: initializer of the four kernels (None: Keras's ``glorot_uniform``
        with each kernel's fans).
      bias_init: initializer of the biases (Keras's zeros).
      query_key_transform: None or ``f(x [..., T, heads, Dk], positions [..., T])``
        applied to the projected queries and keys (rotary embeddings); positions default
        to ``cache_index + arange(Tn)`` when decoding, else ``arange(Tq)``. The shortcut
        for ``query_transform = key_transform = f``.
      query_transform: the same, for the queries only (Gemma 3 normalises queries and
        keys with their own weights, then applies RoPE); giving ``query_key_transform``
        with a different per-side one raises.
      key_transform: the same, for the keys only.
      decode: the default of the call's ``decode``.
      per_sequence_cache: the cache holds one ``cache_index`` per sequence (a ragged
        batch: prompts of different lengths, sequences that finish at different steps).
      rolling_cache: for a causal sliding window ``window=(w, 0)``: the cache holds
        ``S`` slots (the key/value length given at ``init``, ``S >= w + 1``) and writes
        position ``p`` at slot ``p % S``, so it takes O(window) memory instead of O(T);
        a call takes at most ``S - w`` new positions, and the numbers equal the linear
        cache's. The attention reads the slots through a ``[..., Tn, S]`` mask built from
        their positions (the slots hold only the window: there are no blocks to skip);
        ``score_mod`` and ``mask_mod`` still take absolute positions (a slot's is the
        position it holds), with the batch dims when the cache is per sequence.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from flax_dotattn import MultiHeadDotAttention
      >>> layer = MultiHeadDotAttention(num_heads=4, key_dim=8, num_kv_heads=2, causal=True)
      >>> x = jnp.ones((2, 5, 16))                               # [B, T, Din]
      >>> variables = layer.init(jax.random.key(0), x, x)
      >>> jax.tree.map(jnp.shape, variables["params"]["key"])     # 2 key/value heads
      {'bias': (2, 8), 'kernel': (16, 2, 8)}
      >>> layer.apply(variables, x, x).shape
      (2, 5, 16)
    """

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
    dtype: DTypeLike | None = None
    param_dtype: DTypeLike = "float32"
    precision: PrecisionLike = None
    window: Window = None
    logits_soft_cap: float | None = None
    score_mod: ScoreMod | None = None
    mask_mod: MaskMod | None = None
    implementation: Implementation | None = None
    block_size: BlockSizeLike = None
    kernel_init: Initializer | None = None
    bias_init: Initializer = jax.nn.initializers.zeros
    query_key_transform: Callable[[Array, Array], Array] | None = None
    query_transform: Callable[[Array, Array], Array] | None = None
    key_transform: Callable[[Array, Array], Array] | None = None
    decode: bool = False
    per_sequence_cache: bool = False
    rolling_cache: bool = False

    @classmethod
    def from_config(
        cls, config: MultiHeadDotAttentionConfig, **kwargs: Any
    ) -> MultiHeadDotAttention:
        """Builds the module from a :class:`MultiHeadDotAttentionConfig` (kwargs: the
        fields outside the config, e.g. ``kernel_init``, ``decode``, ``name``)."""
        config = check_multi_head_config(config, "MultiHeadDotAttention.from_config")
        return cls(**field_values(config), **kwargs)

    @property
    def config(self) -> MultiHeadDotAttentionConfig:
        """The hyper-parameters as a validated :class:`MultiHeadDotAttentionConfig` (the
        initializers, the transform and ``decode`` are not part of it)."""
        return MultiHeadDotAttentionConfig.of(self)

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
        positions: Array | None = None,
        decode: bool | None = None,
        new_length: int | Array | None = None,
    ) -> Array | tuple[Array, Array]:
        """Applies multi-head attention; call arguments override the module's fields.

        Args:
          query: ``[..., Tq, Din]``.
          value: ``[..., Tv, Dvin]``.
          key: ``[..., Tv, Dkin]`` or None (use ``value``).
          masks: None or ``(query_mask [..., Tq], value_mask [..., Tv])``, shared by
            every head (a masked query's row is zero before the output projection).
          causal: overrides the ``causal`` field when not None.
          attention_mask, bias: broadcastable to ``[..., Tq, Tv]`` (Keras's layout: every
            head alike) or, with one more dim, to ``[..., H, Tq, Tv]`` (Flax's: per head).
          segment_ids, query_offset, kv_length: as :func:`dot_attention` takes them over
            the batch dims ``...`` (offsets and lengths are set by the cache when
            decoding).
          window: overrides the ``window`` field when not None.
          deterministic: overrides the ``deterministic`` field when not None.
          return_attention_scores: also return the weights ``[..., H, Tq, Tv]``.
          positions: ``[..., Tq]`` integer positions for the transforms (default:
            ``cache_index + arange(Tn)`` when decoding, per sequence with a per-sequence
            cache, else ``arange(Tq)``).
          decode: overrides the ``decode`` field when not None.
          new_length: decoding only: how many of the ``Tn`` new positions are valid, an
            int or one per sequence (``[...]``, with ``per_sequence_cache``); each
            sequence's ``cache_index`` advances by its count, and the positions past it
            are padding (written, hidden, and overwritten by the next call). None: all
            ``Tn``.

        Returns:
          ``[..., Tq, Dout]``, or ``(output, weights [..., H, Tq, Tv])``.
        """
        arguments = dict(locals())
        del arguments["self"]
        config = self.config  # validates the fields
        value_in = value if key is None else key
        shapes = multi_head.param_shapes(
            config, jnp.shape(query)[-1], jnp.shape(value_in)[-1], jnp.shape(value)[-1]
        )
        params: dict[str, Any] = {
            name: _Projection(
                shapes[name],
                self.kernel_init or default_kernel_init(name),
                self.bias_init,
                config.param_dtype,
                name=name,
            )()
            for name in ("query", "key", "value", "out")
        }
        attention = config.attention
        for name in attention.param_names:
            init = nn.initializers.constant(attention.initial_value(name))
            params[name] = self.param(name, init, (), config.param_dtype)
        cache = None
        if self.decode if decode is None else decode:
            cache = self._cache(config, query, value)
        query_transform, key_transform = multi_head.resolve_transforms(
            self.query_key_transform, self.query_transform, self.key_transform
        )
        result, new_cache = multi_head.multi_head_attention(
            config,
            params,
            arguments,
            cache=cache,
            rolling=self.rolling_cache,
            query_transform=query_transform,
            key_transform=key_transform,
            dropout_rng=lambda: self.make_rng("dropout"),
            where_deterministic="as a module field or a call argument",
        )
        if new_cache is not None:
            self.put_variable("cache", "cached_key", new_cache.key)
            self.put_variable("cache", "cached_value", new_cache.value)
            self.put_variable("cache", "cache_index", new_cache.cache_index)
            self.put_variable("cache", "cached_mask", new_cache.mask)
        return result

    def _cache(
        self, config: MultiHeadDotAttentionConfig, query: Array, value: Array
    ) -> multi_head.KVCache | None:
        """The cache to decode with; None on the call that creates it (at ``init``)."""
        initialized = self.has_variable("cache", "cached_key")
        dtype = config.dtype or jnp.result_type(query, value, config.param_dtype)
        empty = multi_head.empty_cache(
            config,
            tuple(jnp.shape(value)[:-2]),
            jnp.shape(value)[-2],
            dtype,
            per_sequence=self.per_sequence_cache,
        )
        cached = {
            name: self.variable("cache", name, lambda x=x: x)
            for name, x in (
                ("cached_key", empty.key),
                ("cached_value", empty.value),
                ("cache_index", empty.cache_index),
                ("cached_mask", empty.mask),
            )
        }
        if not initialized:
            return None
        return multi_head.KVCache(
            cached["cached_key"].value,
            cached["cached_value"].value,
            cached["cache_index"].value,
            cached["cached_mask"].value,
        )
