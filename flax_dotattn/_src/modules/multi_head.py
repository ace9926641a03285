"""The one call path of the multi-head modules: project, attend once, project back.

Shape glossary: ``...`` batch dims, ``Tq``/``Tv`` query and key/value lengths, ``Din``
the query's features (``Dkin``, ``Dvin`` the key's and value's), ``H`` query heads,
``Hkv`` key/value heads, ``G = H // Hkv`` query heads per key/value head, ``Dk`` and
``Dv`` the head depths, ``Dout`` the output features.

The heads live in batch dims. Queries are projected to ``[..., Tq, H, Dk]`` and moved to
``[..., H, Tq, Dk]``; with ``G > 1`` (grouped-query attention) to ``[..., Hkv, G, Tq,
Dk]`` against keys and values ``[..., Hkv, 1, Tv, D]``, which :func:`dot_attention`
broadcasts, so keys and values are never repeated. One call of
:func:`module_call.module_attention` (what :class:`DotAttention` runs) computes every
head; the output projection sums the heads back to ``[..., Tq, Dout]``.

Decoding keeps the projected keys and values in a :class:`KVCache` in the layout the call
reads (``[..., Hkv, Tmax, D]``): each step writes its ``Tn`` new positions at
``cache_index`` and attends with ``query_offset=cache_index`` and
``kv_length=cache_index + Tn``, both traced, so one compiled step serves every position
and chunked prefill.

The Linen and NNX modules own the parameters and the cache and call
:func:`multi_head_attention`; this module imports neither flax nor keras.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from flax_dotattn._src.config.classes import MultiHeadDotAttentionConfig
from flax_dotattn._src.modules import call as module_call
from flax_dotattn._src.options import fail, to_lax_precision
from flax_dotattn._src.types import Array

#: ``transform(x [..., T, heads, Dk], positions [..., T]) -> [..., T, heads, Dk]``,
#: applied to the projected queries and keys (rotary embeddings, say).
QueryKeyTransform = Callable[[Array, Array], Array]


class KVCache(NamedTuple):
    """A key/value cache in the layout the attention reads.

    Attributes:
      key: ``[..., Hkv, Tmax, Dk]``, the projected (and transformed) keys so far.
      value: ``[..., Hkv, Tmax, Dv]``, the projected values so far.
      cache_index: ``int32[]``, the number of filled positions (where the next step writes).
    """

    key: Array
    value: Array
    cache_index: Array


def param_shapes(
    config: MultiHeadDotAttentionConfig,
    query_features: int,
    key_features: int,
    value_features: int,
) -> dict[str, dict[str, tuple[int, ...]]]:
    """The projections' kernel and bias shapes (Keras's ``EinsumDense`` layouts):
    ``query`` ``[Din, H, Dk]``, ``key`` ``[Dkin, Hkv, Dk]``, ``value`` ``[Dvin, Hkv, Dv]``
    and ``out`` ``[H, Dv, Dout]``, with biases ``[H, Dk]``, ``[Hkv, Dk]``, ``[Hkv, Dv]``,
    ``[Dout]`` when ``use_bias``."""
    h, hkv, dk, dv = config.num_heads, config.kv_heads, config.key_dim, config.value_depth
    dout = query_features if config.output_shape is None else config.output_shape
    kernels = {
        "query": ((query_features, h, dk), (h, dk)),
        "key": ((key_features, hkv, dk), (hkv, dk)),
        "value": ((value_features, hkv, dv), (hkv, dv)),
        "out": ((h, dv, dout), (dout,)),
    }
    return {
        name: {"kernel": kernel, **({"bias": bias} if config.use_bias else {})}
        for name, (kernel, bias) in kernels.items()
    }


def cache_shapes(
    config: MultiHeadDotAttentionConfig, batch: tuple[int, ...], max_length: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of ``KVCache.key`` and ``KVCache.value`` for ``max_length`` positions."""
    hkv = config.kv_heads
    return (*batch, hkv, max_length, config.key_dim), (*batch, hkv, max_length, config.value_depth)


def _features(name: str, x: Any) -> Array:
    if not isinstance(x, jax.Array | jnp.ndarray) and not hasattr(x, "shape"):
        fail(f"{name} must be an array [..., T, features]; received a {type(x).__name__}.")
    x = jnp.asarray(x)
    if x.ndim < 2 or not jnp.issubdtype(x.dtype, jnp.floating):
        fail(
            f"{name} must be a floating array of rank >= 2 ([..., T, features]); received "
            f"shape {tuple(x.shape)} and dtype {x.dtype}."
        )
    return x


def _project(name: str, params: Mapping[str, Array], x: Array, precision: Any) -> Array:
    """``[..., T, F] @ [F, heads, D] (+ [heads, D]) -> [..., T, heads, D]``."""
    kernel = params["kernel"]
    if x.shape[-1] != kernel.shape[0]:
        fail(
            f"{name} has {x.shape[-1]} features but its projection kernel expects "
            f"{kernel.shape[0]} (kernel shape {tuple(kernel.shape)}); received {name} shape "
            f"{tuple(x.shape)}."
        )
    y = jnp.einsum("...tf,fhd->...thd", x, kernel, precision=precision)  # [..., T, heads, D]
    return _add_bias(y, params.get("bias"))


def _add_bias(y: Array, bias: Array | None) -> Array:
    """``y + bias`` with the bias's missing leading dims made explicit."""
    if bias is None:
        return y
    return y + bias.reshape((1,) * (y.ndim - bias.ndim) + bias.shape)


def _head_axes(x: Any, n: int, at: int) -> Any:
    """``x`` with ``n`` size-1 axes inserted at ``at`` (counted from the end); None and
    Python ints pass through."""
    if x is None or isinstance(x, int):
        return x
    x = jnp.asarray(x)
    if x.ndim == 0:
        return x
    position = x.ndim + at + 1 if at < 0 else at
    return jnp.expand_dims(x, tuple(range(position, position + n)))


def _pair_mask(name: str, x: Any, batch_rank: int, config: MultiHeadDotAttentionConfig) -> Any:
    """An ``attention_mask`` or ``bias``: ``[..., Tq, Tv]`` (Keras: every head alike) gains
    the head axes; ``[..., H or 1, Tq, Tv]`` (Flax: per head) has its head axis split
    into ``[Hkv, G]`` under grouped-query attention."""
    if x is None:
        return None
    x = jnp.asarray(x)
    n = 1 if config.groups == 1 else 2
    if x.ndim <= batch_rank + 2:
        return _head_axes(x, n, -3)
    if x.ndim == batch_rank + 3:
        heads = x.shape[-3]
        if heads not in (1, config.num_heads):
            fail(
                f"{name} with a head axis must be [..., H or 1, Tq, Tv] with "
                f"H={config.num_heads}; received shape {tuple(x.shape)}."
            )
        if n == 1:
            return x
        split = (config.kv_heads, config.groups) if heads > 1 else (1, 1)
        return x.reshape(*x.shape[:-3], *split, *x.shape[-2:])
    fail(
        f"{name} must be [..., Tq, Tv] or [..., H, Tq, Tv] for inputs with {batch_rank} batch "
        f"dims; received shape {tuple(x.shape)}."
    )


def multi_head_attention(
    config: MultiHeadDotAttentionConfig,
    params: Mapping[str, Any],
    arguments: Mapping[str, Any],
    *,
    cache: KVCache | None = None,
    transform: QueryKeyTransform | None = None,
    dropout_rng: Callable[[], Array],
    where_deterministic: str,
) -> tuple[Array | tuple[Array, Array], KVCache | None]:
    """Runs the multi-head attention of a module whose fields are ``config``.

    Args:
      config: the module's validated fields.
      params: ``{"query", "key", "value", "out": {"kernel", "bias"?}}`` (shapes in
        :func:`param_shapes`) and the learned scalars ``scale`` / ``concat_score_weight``.
      arguments: the module call's arguments by name: ``query [..., Tq, Din]``,
        ``value [..., Tv, Dvin]``, ``key [..., Tv, Dkin]`` or None, ``masks``,
        ``attention_mask``, ``bias``, ``segment_ids``, ``query_offset``, ``kv_length``,
        ``return_attention_scores`` and the overrides ``causal``, ``window``,
        ``deterministic`` as :class:`DotAttention` takes them, and ``positions``
        (``[..., Tq]`` for ``transform``).
      cache: decode with this cache (the keys and values come from it after the new ones
        are written); None: attend over ``key``/``value`` as given.
      transform: applied to the projected queries and keys with their positions.
      dropout_rng: returns the dropout key; called only when dropout is active.
      where_deterministic: where the user can set ``deterministic`` (for the error).

    Returns:
      ``(result, new_cache)``: ``result`` is ``[..., Tq, Dout]``, or with
      ``return_attention_scores`` ``(output, weights [..., H, Tq, Tv])``; ``new_cache``
      is None without a cache.
    """
    query = _features("query", arguments["query"])
    value = _features("value", arguments["value"])
    key = value if arguments["key"] is None else _features("key", arguments["key"])
    compute = config.dtype or jnp.result_type(query, key, value, config.param_dtype)
    precision = to_lax_precision(config.precision)
    cast = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, compute), tree)  # noqa: E731
    weights = {name: cast(params[name]) for name in ("query", "key", "value", "out")}
    query, key, value = (x.astype(compute) for x in (query, key, value))

    q = _project("query", weights["query"], query, precision)  # [..., Tq, H, Dk]
    k = _project("key", weights["key"], key, precision)  # [..., Tv, Hkv, Dk]
    v = _project("value", weights["value"], value, precision)  # [..., Tv, Hkv, Dv]
    tq, tv = q.shape[-3], k.shape[-3]
    if cache is not None and tv != tq:
        fail(
            "decode=True takes the same Tn new positions for query, key and value (they are "
            f"written to the cache at cache_index); received Tq={tq} and Tv={tv}."
        )
    start = jnp.zeros((), jnp.int32) if cache is None else cache.cache_index
    if transform is not None:
        if tq != tv:  # positions [..., Tq] would be given to keys of another length
            fail(
                "a query/key transform applies the same positions to the queries and the "
                "keys, so they need one length (self-attention, or decode=True); received "
                f"Tq={tq}, Tv={tv}."
            )
        positions = arguments.get("positions")
        if positions is None:
            positions = start + jnp.arange(tq, dtype=jnp.int32)  # [Tq]
        q, k = transform(q, positions), transform(k, positions)
    if not config.use_scale:
        q = q * jnp.asarray(config.key_dim**-0.5, compute)  # Keras's fixed query scaling
    k, v = jnp.swapaxes(k, -3, -2), jnp.swapaxes(v, -3, -2)  # [..., Hkv, Tv, D]

    call = dict(arguments)
    new_cache = None
    if cache is not None:
        for name in ("query_offset", "kv_length"):
            if call[name] is not None:
                fail(f"{name} is set by the cache in decode mode; received {name}={call[name]!r}.")
        batch, tmax = tuple(cache.key.shape[:-3]), cache.key.shape[-2]
        if tuple(k.shape[:-3]) != batch or tv > tmax:
            fail(
                f"decode=True needs inputs with the cache's batch dims {batch} and at most "
                f"its {tmax} positions; received batch dims {tuple(k.shape[:-3])} and Tn={tv} "
                "(size the cache for this batch: init_cache, or init in Linen)."
            )
        index = jnp.asarray(cache.cache_index, jnp.int32)
        at = (0,) * (k.ndim - 2)
        k = jax.lax.dynamic_update_slice(cache.key, k.astype(cache.key.dtype), (*at, index, 0))
        v = jax.lax.dynamic_update_slice(cache.value, v.astype(cache.value.dtype), (*at, index, 0))
        new_cache = KVCache(k, v, index + tq)
        call["query_offset"], call["kv_length"] = index, index + tq

    q = jnp.swapaxes(q, -3, -2)  # [..., H, Tq, Dk]
    n = 1 if config.groups == 1 else 2
    if n == 2:  # grouped-query: query head h = kv head h // G, group h % G
        q = q.reshape(*q.shape[:-3], config.kv_heads, config.groups, *q.shape[-2:])
        k, v = k[..., None, :, :], v[..., None, :, :]  # [..., Hkv, 1, Tv, D]
    batch_rank = query.ndim - 2
    masks = call.get("masks")
    if masks is not None:
        if not isinstance(masks, (tuple, list)) or len(masks) != 2:
            fail(f"masks must be None or a pair (query_mask, value_mask); received {masks!r}.")
        call["masks"] = tuple(_head_axes(m, n, -2) for m in masks)
    if call.get("segment_ids") is not None:
        ids = call["segment_ids"]
        if not isinstance(ids, (tuple, list)) or len(ids) != 2:
            fail(f"segment_ids must be None or a pair (query_ids, kv_ids); received {ids!r}.")
        call["segment_ids"] = tuple(_head_axes(x, n, -2) for x in ids)
    for name in ("attention_mask", "bias"):
        call[name] = _pair_mask(name, call.get(name), batch_rank, config)
    for name in ("query_offset", "kv_length"):
        call[name] = _head_axes(call[name], n, -1)
    call.update(query=q, key=k, value=v)
    scalars = {name: params[name] for name in config.attention.param_names}
    result = module_call.module_attention(
        config.attention,
        scalars,
        call,
        dropout_rng=dropout_rng,
        where_deterministic=where_deterministic,
    )
    heads, attention_weights = result if isinstance(result, tuple) else (result, None)
    heads = heads.reshape(*heads.shape[: -2 - n], config.num_heads, *heads.shape[-2:])
    out = jnp.einsum(
        "...hqv,hvo->...qo", heads, weights["out"]["kernel"], precision=precision
    )  # [..., Tq, Dout]
    out = _add_bias(out, weights["out"].get("bias"))
    if attention_weights is None:
        return out, new_cache
    attention_weights = attention_weights.reshape(
        *attention_weights.shape[: -2 - n], config.num_heads, *attention_weights.shape[-2:]
    )  # [..., H, Tq, Tv]
    return (out, attention_weights), new_cache
