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
import numpy as np
from jax.experimental import checkify

from flax_dotattn._src import mods, validation
from flax_dotattn._src.config.classes import MultiHeadDotAttentionConfig
from flax_dotattn._src.modules import call as module_call
from flax_dotattn._src.options import fail, to_lax_precision
from flax_dotattn._src.types import Array

#: ``transform(x [..., T, heads, Dk], positions [..., T]) -> [..., T, heads, Dk]``,
#: applied to the projected queries or keys (rotary embeddings, a per-side norm, say).
QueryKeyTransform = Callable[[Array, Array], Array]


class KVCache(NamedTuple):
    """A key/value cache in the layout the attention reads.

    Attributes:
      key: ``[..., Hkv, Tmax, Dk]``, the projected (and transformed) keys so far.
      value: ``[..., Hkv, Tmax, Dv]``, the projected values so far.
      cache_index: ``int32[]`` (one position for the whole batch) or ``int32[...]`` (one
        per sequence): the number of filled positions, where the next step writes.
      mask: ``bool [..., Tmax]``, the value mask of the cached positions (True: a key
        the queries may see), written beside the keys from the calls' value masks.
    """

    key: Array
    value: Array
    cache_index: Array
    mask: Array


def resolve_transforms(
    query_key_transform: QueryKeyTransform | None,
    query_transform: QueryKeyTransform | None,
    key_transform: QueryKeyTransform | None,
) -> tuple[QueryKeyTransform | None, QueryKeyTransform | None]:
    """``(query_transform, key_transform)``: ``query_key_transform`` is the shortcut for
    the same function on both sides; giving it with a different per-side one raises."""
    if query_key_transform is None:
        return query_transform, key_transform
    for name, side in (("query_transform", query_transform), ("key_transform", key_transform)):
        if side is not None and side is not query_key_transform:
            fail(
                f"query_key_transform is the shortcut for query_transform = key_transform; "
                f"give it or the per-side transforms, not both; received query_key_transform="
                f"{query_key_transform!r} and {name}={side!r}."
            )
    return query_key_transform, query_key_transform


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


def empty_cache(
    config: MultiHeadDotAttentionConfig,
    batch: tuple[int, ...],
    max_length: int,
    dtype: Any,
    *,
    per_sequence: bool = False,
) -> KVCache:
    """An empty :class:`KVCache` for ``max_length`` positions of the batch dims ``batch``
    (``per_sequence``: one ``cache_index`` per sequence, ``int32 [...]``)."""
    key_shape, value_shape = cache_shapes(config, batch, max_length)
    return KVCache(
        key=jnp.zeros(key_shape, dtype),
        value=jnp.zeros(value_shape, dtype),
        cache_index=jnp.zeros(batch if per_sequence else (), jnp.int32),
        mask=jnp.ones((*batch, max_length), bool),
    )


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


def _attention_axis(config: MultiHeadDotAttentionConfig, rank: int) -> int:
    """The input axis attended over, counted from the front, for rank-``rank`` inputs."""
    axes = config.attention_axes
    if axes is None:  # Keras's default: every axis between the batch axis and the features
        middle = tuple(range(1, rank - 1))
        if len(middle) != 1:
            fail(
                f"attention_axes=None (Keras's default) attends over the axes {middle} of "
                f"rank-{rank} inputs: attention over several axes has no equivalent here; "
                "set attention_axes to one axis (e.g. (-2,), the axis before the features)."
            )
        return middle[0]
    axis = axes[0] if axes[0] >= 0 else rank + axes[0]
    if not 1 <= axis <= rank - 2:
        fail(
            f"attention_axes={axes} names no axis between the batch axis and the features "
            f"of rank-{rank} inputs (Keras's numbers: 1..{rank - 2} or -{rank - 1}..-2)."
        )
    return axis


def _decode_value_mask(mask: Any, batch: tuple[int, ...], tn: int) -> Array:
    """The value mask of the ``Tn`` new positions, ``bool [..., Tn]``: it is written to
    the cache beside their keys, so it must not broadcast over the cache's slots."""
    if mask is None:
        return jnp.ones((*batch, tn), bool)
    shape = tuple(jnp.shape(mask))
    if not shape or shape[-1] != tn or len(shape) > len(batch) + 1:
        fail(
            f"decode=True: the value_mask of the {tn} new positions must be [..., {tn}] (it "
            f"is written to the cache beside their keys; a mask of every cached slot has no "
            f"meaning here); received shape {shape}."
        )
    return jnp.broadcast_to(jnp.asarray(mask).astype(bool), (*batch, tn))


def _check_decode_pair(name: str, x: Any, tn: int, tmax: int) -> None:
    """A pairwise mask or bias in decode mode covers the cache: ``[..., Tn, Tmax]``."""
    if x is None:
        return
    shape = tuple(jnp.shape(x))
    if len(shape) < 2 or shape[-1] != tmax or shape[-2] not in (1, tn):
        fail(
            f"decode=True: {name} must cover the cache's slots, [..., Tn, Tmax] = "
            f"[..., {tn}, {tmax}] (a mask of the new positions alone would broadcast over "
            f"the cache); received shape {shape}."
        )


def _slots(index: Array, tn: int, rolling: int | None) -> Array:
    """The slots of positions ``index + arange(Tn)``: themselves in a linear cache, modulo
    the cache's size in a rolling one."""
    slots = index + jnp.arange(tn, dtype=jnp.int32)
    return slots if rolling is None else slots % rolling


def _write(
    cache: Array, new: Array, index: Array, batch_rank: int, rolling: int | None = None
) -> Array:
    """``cache [..., Hkv, Tmax, D]`` with ``new [..., Hkv, Tn, D]`` at slots
    ``index + arange(Tn)`` (``index`` ``[]`` or ``[...]`` per sequence; modulo
    ``rolling`` in a rolling cache); slots past ``Tmax`` are dropped (they are checked
    before)."""
    tn = new.shape[-2]
    new = new.astype(cache.dtype)
    if index.ndim == 0:
        return cache.at[..., _slots(index, tn, rolling), :].set(new, mode="drop")
    batch = cache.shape[:batch_rank]
    flat = lambda x: x.reshape(-1, *x.shape[batch_rank:])  # noqa: E731

    def one(c: Array, n: Array, i: Array) -> Array:  # [Hkv, Tmax, D], [Hkv, Tn, D], []
        return c.at[:, _slots(i, tn, rolling), :].set(n, mode="drop")

    written = jax.vmap(one)(flat(cache), flat(new), jnp.broadcast_to(index, batch).reshape(-1))
    return written.reshape(cache.shape)


def _write_mask(mask: Array, new: Array, index: Array, rolling: int | None = None) -> Array:
    """``mask [..., Tmax]`` with ``new [..., Tn]`` at slots ``index + arange(Tn)``."""
    tn = new.shape[-1]
    if index.ndim == 0:
        return mask.at[..., _slots(index, tn, rolling)].set(new, mode="drop")
    batch = mask.shape[:-1]

    def one(m: Array, n: Array, i: Array) -> Array:
        return m.at[_slots(i, tn, rolling)].set(n, mode="drop")

    flat_index = jnp.broadcast_to(index, batch).reshape(-1)
    written = jax.vmap(one)(mask.reshape(-1, mask.shape[-1]), new.reshape(-1, tn), flat_index)
    return written.reshape(mask.shape)


def _rolling_window(config: MultiHeadDotAttentionConfig, arguments: Mapping[str, Any]) -> int:
    """The left window ``w`` of a layer whose cache rolls (``causal`` with ``window=(w,
    ...)``, as the call resolves them)."""
    causal = config.causal if arguments.get("causal") is None else arguments["causal"]
    window = config.window if arguments.get("window") is None else arguments["window"]
    left = None if window is None else window[0]
    if not causal or left is None or left >= 2**30:
        fail(
            "a rolling cache keeps the last slots only, so it needs causal=True and a "
            f"bounded left window (window=(w, 0)); received causal={causal}, window={window}."
        )
    return int(left)


def _rolling_mask(
    index: Array, end: Array, mask: Array, tn: int, left: int, batch: tuple[int, ...]
) -> Array:
    """``bool [..., Tn, S]``: which slots of a rolling cache of ``S`` slots the new
    queries (positions ``index + arange(Tn)``) see, once the positions below ``end`` are
    written: slot ``s`` holds the latest position ``p = s (mod S)`` below ``end``; it is
    seen when ``q - left <= p <= q``, ``p >= 0`` and ``mask`` (the value mask) keeps it."""
    size = mask.shape[-1]
    lead = (1,) * len(batch)
    held = _held_positions(end, size, batch)  # [..., S] positions
    queries = jnp.broadcast_to(index, batch)[..., None] + jnp.arange(tn, dtype=jnp.int32).reshape(
        lead + (tn,)
    )  # [..., Tn]
    p, q = held[..., None, :], queries[..., :, None]  # [..., 1, S], [..., Tn, 1]
    return (p <= q) & (p >= q - left) & (p >= 0) & mask[..., None, :]  # [..., Tn, S]


def _held_positions(end: Array, size: int, batch: tuple[int, ...]) -> Array:
    """``int32 [..., S]``: the position each slot of a rolling cache of ``S`` slots holds
    once the positions below ``end`` are written (negative: none yet)."""
    slots = jnp.arange(size, dtype=jnp.int32).reshape((1,) * len(batch) + (size,))
    end = jnp.broadcast_to(end, batch)[..., None]  # [..., 1]
    return slots + size * jnp.floor_divide(end - 1 - slots, size)


def _at_cache_positions(
    config: MultiHeadDotAttentionConfig, index: Array, end: Array, size: int, heads: int
) -> dict[str, Any]:
    """The layer's ``score_mod`` and ``mask_mod`` for a call over a rolling cache of
    ``size`` slots: the kernel passes them row and slot numbers (the chunk's rows are its
    queries, the cache's slots its keys), and they take the absolute positions: query row
    ``i`` is at ``index + i`` and a slot holds the latest position below ``end`` that it
    is written at. One ``index`` for the batch keeps the positions ``[Bq, 1]`` and
    ``[1, Bk]``; one per sequence gives both the batch dims and the head axes."""
    if index.ndim == 0:
        held = _held_positions(end, size, ())  # [S]

        def positions(q_pos: Array, kv_pos: Array) -> tuple[Array, Array]:
            return index + q_pos, jnp.take(held, kv_pos, axis=-1)  # [Bq, 1], [1, Bk]

    else:
        batch = tuple(index.shape)
        lead = (1,) * heads + (1, 1)  # the head axes, then [Bq, Bk]
        base = index.reshape(batch + lead)  # [..., (1,) 1, 1]
        slots = _held_positions(end, size, batch)  # [..., S]
        slots = slots.reshape(batch + (1,) * heads + (size,))  # [..., (1,) S]

        def positions(q_pos: Array, kv_pos: Array) -> tuple[Array, Array]:
            q_pos = q_pos.reshape((1,) * (base.ndim - q_pos.ndim) + q_pos.shape)
            return base + q_pos, jnp.take(slots, kv_pos, axis=-1)  # [..., (1,) Bq|1, 1|Bk]

    score_mod = mods.check_function("score_mod", config.score_mod)
    mask_mod = mods.check_function("mask_mod", config.mask_mod)
    wrapped: dict[str, Any] = {}
    if score_mod is not None:
        wrapped["score_mod"] = lambda s, q_pos, kv_pos: score_mod(s, *positions(q_pos, kv_pos))
    if mask_mod is not None:
        wrapped["mask_mod"] = lambda q_pos, kv_pos: mask_mod(*positions(q_pos, kv_pos))
    return wrapped


def _check_room(index: Array, count: Array, tmax: int) -> None:
    """Writing ``count`` new positions at ``index`` must stay within the ``Tmax`` slots:
    a ValueError when the values are known (eager calls), else a check that
    ``jax.experimental.checkify`` reports (nothing without checkify)."""
    end = index + count
    message = "decode=True: cache_index {i} + {n} new positions > the cache's " + f"{tmax} slots"
    if not isinstance(end, jax.core.Tracer):
        ends = np.asarray(end)
        if ends.size and ends.max() > tmax:
            row = np.unravel_index(int(np.argmax(ends)), ends.shape)
            i = int(np.broadcast_to(np.asarray(index), ends.shape)[row])
            fail(
                message.format(i=i, n=int(ends[row]) - i)
                + " (writing past the end would overwrite nothing and lose the positions;"
                " size the cache for the longest sequence)."
            )
        return
    worst = jnp.argmax(jnp.ravel(end))
    checkify.debug_check(
        jnp.max(end) <= tmax,
        message,
        i=jnp.ravel(jnp.broadcast_to(index, end.shape))[worst],
        n=jnp.ravel(jnp.broadcast_to(count, end.shape))[worst],
    )


def multi_head_attention(
    config: MultiHeadDotAttentionConfig,
    params: Mapping[str, Any],
    arguments: Mapping[str, Any],
    *,
    cache: KVCache | None = None,
    rolling: bool = False,
    query_transform: QueryKeyTransform | None = None,
    key_transform: QueryKeyTransform | None = None,
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
        ``deterministic`` as :class:`DotAttention` takes them, ``positions``
        (``[..., Tq]`` for the transforms) and ``new_length`` (decoding: the valid new
        positions per sequence).
      cache: decode with this cache (the keys and values come from it after the new ones
        are written); None: attend over ``key``/``value`` as given.
      rolling: the cache rolls: its ``S`` slots hold the last ``S`` positions, written at
        ``position % S`` (a causal sliding window ``(w, ...)`` with ``S >= w + Tn``); the
        attention reads the slots through a ``[..., Tn, S]`` mask of their positions.
      query_transform, key_transform: applied to the projected queries / keys with their
        positions.
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
    axis = _attention_axis(config, query.ndim)
    moved = axis != query.ndim - 2
    if moved:  # Keras's attention_axes: attend over ``axis``, the others are batch dims
        if cache is not None:
            fail(
                f"decode=True attends over the axis before the features; received "
                f"attention_axes={config.attention_axes} on rank-{query.ndim} inputs."
            )
        if not query.ndim == key.ndim == value.ndim:
            fail(
                f"attention_axes={config.attention_axes} needs query, key and value of one "
                f"rank; received ranks {query.ndim}, {key.ndim}, {value.ndim}."
            )
        query, key, value = (jnp.moveaxis(x, axis, -2) for x in (query, key, value))
    compute = config.dtype or jnp.result_type(query, key, value, config.param_dtype)
    precision = to_lax_precision(config.precision)
    cast = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, compute), tree)  # noqa: E731
    weights = {name: cast(params[name]) for name in ("query", "key", "value", "out")}
    query, key, value = (x.astype(compute) for x in (query, key, value))

    q = _project("query", weights["query"], query, precision)  # [..., Tq, H, Dk]
    k = _project("key", weights["key"], key, precision)  # [..., Tv, Hkv, Dk]
    v = _project("value", weights["value"], value, precision)  # [..., Tv, Hkv, Dv]
    tq, tv = q.shape[-3], k.shape[-3]
    batch_rank = query.ndim - 2
    if cache is not None and tv != tq:
        fail(
            "decode=True takes the same Tn new positions for query, key and value (they are "
            f"written to the cache at cache_index); received Tq={tq} and Tv={tv}."
        )
    if cache is None and arguments.get("new_length") is not None:
        fail("new_length counts the valid new positions of decode=True; received it without.")
    index = None if cache is None else jnp.asarray(cache.cache_index, jnp.int32)
    if query_transform is not None or key_transform is not None:
        positions = arguments.get("positions")
        if positions is None:
            arange = jnp.arange(tq, dtype=jnp.int32)  # [Tq]
            if index is None:
                positions = arange
            else:  # [(...,) Tq]
                positions = index[..., None] + arange.reshape((1,) * index.ndim + (tq,))
        if key_transform is not None and tq != tv:  # positions [..., Tq] for keys of Tv
            fail(
                "a key transform takes the queries' positions, so the keys need their length "
                "(self-attention, or decode=True); received "
                f"Tq={tq}, Tv={tv}."
            )
        if query_transform is not None:
            q = query_transform(q, positions)
        if key_transform is not None:
            k = key_transform(k, positions)
    if not config.use_scale:  # Keras's fixed query scaling, or the configured factor
        q = q * jnp.asarray(config.query_factor, compute)
    k, v = jnp.swapaxes(k, -3, -2), jnp.swapaxes(v, -3, -2)  # [..., Hkv, Tv, D]

    call = dict(arguments)
    call.pop("new_length", None)
    call.pop("positions", None)
    new_cache = None
    if cache is not None:
        assert index is not None
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
        count = arguments.get("new_length")
        if count is None:
            count = jnp.int32(tq)
        else:
            count = validation.check_position("new_length", count, batch, low=0, high=tq)
            count = jnp.asarray(count, jnp.int32)
            if count.ndim and index.ndim == 0:
                fail(
                    "new_length per sequence needs a cache_index per sequence (Linen: "
                    "per_sequence_cache=True; NNX: init_cache(..., per_sequence=True)); "
                    f"received new_length of shape {tuple(count.shape)} with one cache_index."
                )
        if index.ndim:
            index = jnp.broadcast_to(index, batch)
        left = _rolling_window(config, arguments) if rolling else 0
        if rolling and tq > tmax - left:
            fail(
                f"a rolling cache of {tmax} slots with window ({left}, 0) takes at most "
                f"{tmax} - {left} = {tmax - left} new positions per call (the keys of the "
                f"chunk's first query must stay); received Tn={tq}: prefill in chunks of at "
                "most that, or give the cache more slots."
            )
        if not rolling:
            _check_room(index, count, tmax)
        masks = call.get("masks")
        if masks is not None and (not isinstance(masks, (tuple, list)) or len(masks) != 2):
            fail(f"masks must be None or a pair (query_mask, value_mask); received {masks!r}.")
        query_mask, value_mask = (None, None) if masks is None else masks
        new_valid = _decode_value_mask(value_mask, batch, tq)  # [..., Tn]
        if count.ndim or arguments.get("new_length") is not None:  # padding past each count
            arange = jnp.arange(tq, dtype=jnp.int32)
            filled = arange.reshape((1,) * count.ndim + (tq,)) < count[..., None]
            new_valid = new_valid & filled
        for name in ("attention_mask", "bias"):
            _check_decode_pair(name, call.get(name), tq, tmax)
        ids = call.get("segment_ids")
        if ids is not None:
            if not isinstance(ids, (tuple, list)) or len(ids) != 2:
                fail(f"segment_ids must be None or a pair (query_ids, kv_ids); received {ids!r}.")
            kv_shape = tuple(jnp.shape(ids[1]))
            if not kv_shape or kv_shape[-1] != tmax:
                fail(
                    "decode=True: segment_ids must be (query ids [..., Tn], kv ids [..., Tmax] "
                    f"= [..., {tmax}]) over the cache's slots; received kv ids shape {kv_shape}."
                )
        size = tmax if rolling else None
        k = _write(cache.key, k, index, batch_rank, size)
        v = _write(cache.value, v, index, batch_rank, size)
        mask = _write_mask(cache.mask, new_valid, index, size)
        new_cache = KVCache(k, v, index + count, mask)
        if rolling:  # the slots' positions give causal, window and validity
            seen = _rolling_mask(index, index + count, mask, tq, left, batch)  # [..., Tn, S]
            given = call.get("attention_mask")
            if given is not None:
                given = jnp.asarray(given).astype(bool)
                seen = seen & given.reshape((1,) * (seen.ndim - given.ndim) + given.shape)
            call["attention_mask"], call["masks"] = seen, (query_mask, None)
            call["causal"], call["window"] = False, (None, None)
            head_axes = 1 if config.groups == 1 else 2
            call.update(_at_cache_positions(config, index, index + count, tmax, head_axes))
        else:
            call["masks"] = (query_mask, mask)  # the cached keys' value mask [..., Tmax]
            # A sequence with nothing cached yet and no valid new position (an idle row
            # of a server's batch) reads slot 0, hidden by the mask: it sees no key.
            call["query_offset"], call["kv_length"] = index, jnp.maximum(index + count, 1)

    q = jnp.swapaxes(q, -3, -2)  # [..., H, Tq, Dk]
    n = 1 if config.groups == 1 else 2
    if n == 2:  # grouped-query: query head h = kv head h // G, group h % G
        q = q.reshape(*q.shape[:-3], config.kv_heads, config.groups, *q.shape[-2:])
        k, v = k[..., None, :, :], v[..., None, :, :]  # [..., Hkv, 1, Tv, D]
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
        zero_rows_without_keys=True,  # Keras MultiHeadAttention's masked softmax
    )
    heads, attention_weights = result if isinstance(result, tuple) else (result, None)
    heads = heads.reshape(*heads.shape[: -2 - n], config.num_heads, *heads.shape[-2:])
    out = jnp.einsum(
        "...hqv,hvo->...qo", heads, weights["out"]["kernel"], precision=precision
    )  # [..., Tq, Dout]
    out = _add_bias(out, weights["out"].get("bias"))
    if moved:
        out = jnp.moveaxis(out, -2, axis)
    if attention_weights is None:
        return out, new_cache
    attention_weights = attention_weights.reshape(
        *attention_weights.shape[: -2 - n], config.num_heads, *attention_weights.shape[-2:]
    )  # [..., H, Tq, Tv]
    return (out, attention_weights), new_cache
