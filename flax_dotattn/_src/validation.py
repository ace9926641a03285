"""Input validation for the attention functions.

Every check here is static (shapes, dtypes and Python values only), so it costs nothing
under ``jax.jit`` and fires at trace time. Each error names the argument and states the
expected and the received shape, dtype or value. The options are checked by the options
spec (:mod:`flax_dotattn._src.options`); :func:`check_call` checks everything an entry
point takes.

Shape checks use chex's assertions for their messages and are enforced again without
chex, so nothing broadcasts silently even when ``chex.disable_asserts()`` is in effect.
Shape glossary: see :mod:`flax_dotattn._src.masks`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from flax_dotattn._src.masks import Masking
from flax_dotattn._src.options import OPTIONS, AttentionOptions, fail
from flax_dotattn._src.types import PARAM_NAMES, Array


class AttentionInputs(NamedTuple):
    """Validated, normalised inputs shared by every implementation."""

    query: Array  # [..., Tq, D]
    key: Array  # [..., Tv, D]
    value: Array  # [..., Tv, Dv]
    query_mask: Array | None  # bool [..., Tq]
    masking: Masking  # value mask, full mask, segment ids
    bias: Array | None  # float, broadcastable to [..., Tq, Tv], same rank
    scale: Array | None  # []
    concat_score_weight: Array | None  # []
    query_offset: Array | None  # int32 [] or [...] (batch rank): position of query 0
    # (a NumPy array when given on the host)
    dtype: jnp.dtype  # dtype of the inputs (and of the outputs)
    compute_dtype: jnp.dtype  # float32 for float16/bfloat16 inputs


class CheckedCall(NamedTuple):
    """An entry point's arguments, checked: what the kernels are run with."""

    options: AttentionOptions
    inputs: AttentionInputs
    dropout_rng: Array | None  # the dropout key; None when dropout does not apply


def check_call(arguments: Mapping[str, Any]) -> CheckedCall:
    """Checks the arguments of an attention entry point, given by name.

    Every entry point (:func:`dot_attention`, :func:`which_implementation`,
    :func:`sequence_parallel_attention`, :func:`ring_attention` and the modules) passes
    its arguments here as a mapping of its parameter names (its ``locals()`` on entry, or
    a bound signature's ``arguments``): the options build an :class:`AttentionOptions`
    and the arrays are checked by :func:`check_inputs`. Names an entry point does not
    take (``ring_attention`` has no ``implementation``) are absent and take their
    defaults.
    """
    options = AttentionOptions.from_arguments(arguments)
    dropout_rng = options.dropout_key(arguments.get("dropout_rng"))
    inputs = check_inputs(
        arguments["params"],
        arguments["query"],
        arguments["value"],
        arguments.get("key"),
        arguments.get("masks"),
        options.score_mode,
        attention_mask=arguments.get("attention_mask"),
        bias=arguments.get("bias"),
        segment_ids=arguments.get("segment_ids"),
        query_offset=arguments.get("query_offset"),
        kv_length=arguments.get("kv_length"),
    )
    return CheckedCall(options, inputs, dropout_rng)


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _require(ok: bool, assertion: Callable[..., None], *args: Any, message: str) -> None:
    """Runs a chex assertion (ValueError, ``message``); enforces ``ok`` without chex too."""
    assertion(*args, exception_type=ValueError, custom_message=message)
    if not ok:
        fail(message)


def check_float_array(name: str, x: Any, layout: str) -> Array:
    """Converts ``x`` to a JAX array and checks it is a real floating array of rank >= 2."""
    if not _is_array(x):
        fail(f"{name} must be an array of shape {layout}; received a {type(x).__name__}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        fail(
            f"{name} must have a real floating dtype (float16, bfloat16, float32 or "
            f"float64); received dtype {x.dtype}."
        )
    x = jnp.asarray(x)
    if x.ndim < 2:
        fail(
            f"{name} must have rank >= 2 with shape {layout}; "
            f"received shape {tuple(x.shape)} (rank {x.ndim})."
        )
    return x


def _broadcastable(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Whether ``shape`` broadcasts to ``target`` by NumPy's rules (no rank beyond it)."""
    if len(shape) > len(target):
        return False
    return all(s in (1, t) for s, t in zip(shape[::-1], target[::-1], strict=False))


def _is_pair(x: Any) -> bool:
    """Whether ``x`` is a tuple or list of two (an array is not a pair of rows)."""
    return not _is_array(x) and isinstance(x, Sequence) and len(x) == 2


def _describe(x: Any) -> str:
    """What was received, for an error message: an array's shape, a sequence's length."""
    if _is_array(x):
        return f"an array of shape {tuple(jnp.shape(x))}"
    length = f" of length {len(x)}" if isinstance(x, Sequence) else ""
    return f"{type(x).__name__}{length}"


def _check_array(
    name: str, x: Any, expected: tuple[int, ...], layout: str, kind: str, optional: bool = True
) -> Array:
    """Checks an array that broadcasts to ``expected``; returns it as an array.

    ``kind``: ``"mask"`` (bool or numeric), ``"float"`` or ``"int"``. ``optional``: whether
    the message says None is also allowed.
    """
    wanted = {
        "mask": "be bool, or numeric where nonzero means keep",
        "float": "have a real floating dtype",
        "int": "have an integer dtype",
    }[kind]
    if not _is_array(x):
        fail(
            f"{name} must be {'None or ' if optional else ''}an array broadcastable to "
            f"{layout} = {expected}; received {_describe(x)}."
        )
    dtype = x.dtype
    ok = {
        "mask": dtype == jnp.bool_
        or jnp.issubdtype(dtype, jnp.integer)
        or jnp.issubdtype(dtype, jnp.floating),
        "float": jnp.issubdtype(dtype, jnp.floating),
        "int": jnp.issubdtype(dtype, jnp.integer) and dtype != jnp.bool_,
    }[kind]
    if not ok:
        fail(f"{name} must {wanted}; received dtype {dtype}.")
    x = jnp.asarray(x)
    message = (
        f"{name} must have a shape broadcastable to {layout} = {expected} (NumPy rules, "
        f"rank at most {len(expected)}); received shape {tuple(x.shape)}"
    )
    # chex has no broadcastability assertion; the explicit check gives the message.
    if not _broadcastable(tuple(x.shape), tuple(expected)):
        fail(message)
    return x


def _check_mask(name: str, mask: Any, expected: tuple[int, ...], layout: str) -> Array:
    """A ``[..., T]`` mask broadcast to ``expected`` as bool."""
    mask = _check_array(name, mask, expected, layout, "mask")
    mask = mask if mask.dtype == jnp.bool_ else mask != 0
    return jnp.broadcast_to(mask, expected)


def _full_rank(x: Array, ndim: int) -> Array:
    """Prepends size-1 dims up to ``ndim`` (no data is broadcast)."""
    return x.reshape((1,) * (ndim - x.ndim) + x.shape)


_SEGMENT_NAMES = ("query_segment_ids", "kv_segment_ids")


def _exact_ids(name: str, ids: Any) -> Any:
    """Host (NumPy) ids whose values JAX's integer type would wrap raise a ValueError
    (with 64-bit types off, int64 2**33 would become 0); others pass unchanged."""
    if not isinstance(ids, (np.ndarray, np.generic)) or not np.issubdtype(ids.dtype, np.integer):
        return ids
    target = jax.dtypes.canonicalize_dtype(ids.dtype)
    if target == ids.dtype or ids.size == 0:
        return ids
    info = np.iinfo(target)
    low, high = int(ids.min()), int(ids.max())
    if low < info.min or high > info.max:
        fail(
            f"segment_ids: {name} must fit JAX's {target} ({info.min}..{info.max}) so that "
            f"ids compare exactly; received {ids.dtype} ids in {low}..{high}."
        )
    return ids.astype(target)


def _common_id_dtype(q_ids: Array, kv_ids: Array, received: Any) -> tuple[Array, Array]:
    """Both id arrays in one integer dtype that holds every value of each exactly, or a
    ValueError (e.g. uint32 against int32: JAX's 32-bit comparison would equate
    4294967295 and -1)."""
    common = jax.dtypes.canonicalize_dtype(jnp.promote_types(q_ids.dtype, kv_ids.dtype))
    exact = jnp.issubdtype(common, jnp.integer) and all(
        np.can_cast(x.dtype, common, "safe") for x in (q_ids, kv_ids)
    )
    if not exact:
        fail(
            "segment_ids: query_segment_ids and kv_segment_ids must have integer dtypes "
            f"that one {jax.dtypes.canonicalize_dtype(jnp.int64)} or narrower type holds "
            f"exactly, so that ids compare by value; received {received[0]} and "
            f"{received[1]} (cast both to one signed type)."
        )
    return q_ids.astype(common), kv_ids.astype(common)


def check_pair_masks(
    attention_mask: Any, bias: Any, segment_ids: Any, query_shape, value_shape
) -> tuple[Array | None, Array | None, Array | None, Array | None]:
    """Validates the full mask, the bias and the segment ids.

    Returns ``(attention_mask, bias, query_segment_ids, kv_segment_ids)``: the mask (bool)
    and bias at the scores' rank with their own broadcastable batch dims, the segment ids
    broadcast to ``[..., Tq]`` / at the rank of ``[..., Tv]`` (size-1 dims kept).
    """
    batch, tq, tv = tuple(query_shape[:-2]), query_shape[-2], value_shape[-2]
    pair = batch + (tq, tv)
    if attention_mask is not None:
        attention_mask = _check_array(
            "attention_mask", attention_mask, pair, "[..., Tq, Tv]", "mask"
        )
        if attention_mask.dtype != jnp.bool_:
            attention_mask = attention_mask != 0
        attention_mask = _full_rank(attention_mask, len(pair))
    if bias is not None:
        bias = _full_rank(_check_array("bias", bias, pair, "[..., Tq, Tv]", "float"), len(pair))
    q_seg = kv_seg = None
    if segment_ids is not None:
        if not _is_pair(segment_ids):
            fail(
                "segment_ids must be None or a pair (query_segment_ids, kv_segment_ids) of "
                f"integer arrays; received {_describe(segment_ids)}."
            )
        q_seg, kv_seg = (_exact_ids(n, x) for n, x in zip(_SEGMENT_NAMES, segment_ids, strict=True))
        q_seg = _check_array("query_segment_ids", q_seg, batch + (tq,), "[..., Tq]", "int", False)
        kv_seg = _check_array("kv_segment_ids", kv_seg, batch + (tv,), "[..., Tv]", "int", False)
        received = tuple(getattr(x, "dtype", type(x).__name__) for x in segment_ids)
        q_seg, kv_seg = _common_id_dtype(q_seg, kv_seg, received)
        q_seg = jnp.broadcast_to(q_seg, batch + (tq,))
        kv_seg = _full_rank(kv_seg, len(batch) + 1)
    return attention_mask, bias, q_seg, kv_seg


def check_masks(
    masks: Any, query_shape: tuple[int, ...], value_shape: tuple[int, ...]
) -> tuple[Array | None, Array | None]:
    """Validates ``masks = (query_mask, value_mask)`` and returns them as bool arrays:
    the query mask broadcast to ``query_shape[:-1]``, the value mask at the rank of
    ``value_shape`` (``[..., Tv]``, the output's batch dims) with its own size-1 dims."""
    if masks is None:
        return None, None
    if not _is_pair(masks):
        fail(
            "masks must be None or a pair (query_mask, value_mask), each None or an "
            f"array; received {_describe(masks)}."
        )
    query_mask, value_mask = masks
    if query_mask is not None:
        query_mask = _check_mask("query_mask", query_mask, query_shape[:-1], "[..., Tq]")
    if value_mask is not None:
        value_mask = _check_array("value_mask", value_mask, value_shape, "[..., Tv]", "mask")
        value_mask = value_mask if value_mask.dtype == jnp.bool_ else value_mask != 0
        value_mask = _full_rank(value_mask, len(value_shape))
    return query_mask, value_mask


def params_of(**scalars: Any) -> dict[str, Any]:
    """A params mapping of the given scalars that are not None."""
    return {name: x for name, x in scalars.items() if x is not None}


def check_params(params: Any, score_mode: str) -> tuple[Array | None, Array | None]:
    """Validates the params mapping and returns ``(scale, concat_score_weight)``."""
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        fail(
            "params must be None or a mapping with optional keys "
            f"{PARAM_NAMES!r}; received a {type(params).__name__}."
        )
    unknown = sorted(str(k) for k in params if k not in PARAM_NAMES)
    if unknown:
        fail(f"params has unknown keys {unknown}; expected only keys from {PARAM_NAMES!r}.")
    leaves: dict[str, Array | None] = dict.fromkeys(PARAM_NAMES)
    for name in PARAM_NAMES:
        if name not in params:
            continue
        leaf = params[name]
        if not _is_array(leaf) and (isinstance(leaf, bool) or not isinstance(leaf, (int, float))):
            fail(
                f"params[{name!r}] must be a real scalar (an array of shape () or a Python "
                f"number); received a {type(leaf).__name__}."
            )
        leaf = jnp.asarray(leaf)
        if leaf.shape != ():
            fail(
                f"params[{name!r}] must be a scalar of shape (); "
                f"received shape {tuple(leaf.shape)}."
            )
        if not jnp.issubdtype(leaf.dtype, jnp.floating) and not (
            jnp.issubdtype(leaf.dtype, jnp.integer) and leaf.dtype != jnp.bool_
        ):
            fail(f"params[{name!r}] must be a real number; received dtype {leaf.dtype}.")
        leaves[name] = leaf
    if score_mode == "concat" and leaves["concat_score_weight"] is None:
        fail(
            "score_mode='concat' needs params['concat_score_weight'] (a scalar; Keras "
            "initialises it to 1.0); received params without it."
        )
    if score_mode == "dot" and leaves["concat_score_weight"] is not None:
        fail(
            "params['concat_score_weight'] is only used with score_mode='concat'; "
            "received it with score_mode='dot'."
        )
    return leaves["scale"], leaves["concat_score_weight"]


def check_batch_dims(
    query: Array, key: Array, value: Array, value_name: str = "value"
) -> tuple[Array, Array, Array, tuple[int, ...]]:
    """Checks the batch dims ``...`` of query against key/value; returns
    ``(query, key, value, batch)``.

    Key and value must have equal batch dims; against the query they broadcast by
    NumPy's rules at equal rank (each dim equal, or 1 on one side). ``batch`` is the
    broadcast shape, the output's. Key and value keep their own (possibly size-1) dims:
    they are never repeated (query ``[B, Hkv, G, Tq, D]`` with key/value
    ``[B, Hkv, 1, Tv, D]`` is grouped-query attention). The query is broadcast to
    ``batch`` when key/value have more entries along a dim (one query for many).
    """
    if key is not value and tuple(key.shape[:-2]) != tuple(value.shape[:-2]):
        fail(
            f"key batch dims must equal {value_name}'s {tuple(value.shape[:-2])} (key and "
            f"{value_name} are not broadcast against each other); received key shape "
            f"{tuple(key.shape)} and {value_name} shape {tuple(value.shape)}."
        )
    q_batch = tuple(query.shape[:-2])
    for name, x in ((value_name, value), ("key", key)):
        if x.ndim != query.ndim:
            fail(
                f"{name} must have the same rank as query ({query.ndim}: batch dims "
                f"{q_batch}); received {name} shape {tuple(x.shape)} and query shape "
                f"{tuple(query.shape)}."
            )
    kv_batch = tuple(value.shape[:-2])
    if not all(a == b or 1 in (a, b) for a, b in zip(q_batch, kv_batch, strict=True)):
        fail(
            f"{value_name} batch dims {kv_batch} must broadcast against query's {q_batch} "
            f"(NumPy rules at equal rank: each dim equal, or 1 on one side, e.g. query "
            f"[B, H, Tq, D] with [B, 1, Tv, D]); received {value_name} shape "
            f"{tuple(value.shape)} and query shape {tuple(query.shape)}."
        )
    batch = tuple(
        max(a, b) if 0 not in (a, b) else 0 for a, b in zip(q_batch, kv_batch, strict=True)
    )
    if batch != q_batch:  # key/value have more entries: the query is shared, broadcast it
        query = jnp.broadcast_to(query, batch + tuple(query.shape[-2:]))
    return query, key, value, batch


def kv_side(x: Array, kv_batch: tuple[int, ...], length: int) -> Array:
    """A ``[..., T]`` array (batch rank as the inputs') broadcast to ``[..., length]``
    with its own batch dims broadcast with the key/value batch ``kv_batch``: per
    key/value entry where it does not vary between the queries that share an entry, per
    query batch entry where it does."""
    lead = np.broadcast_shapes(tuple(x.shape[:-1]), kv_batch)
    return jnp.broadcast_to(x, lead + (length,))


def to_kv_batch(x: Array, kv_batch: tuple[int, ...]) -> Array:
    """``x [..., T]`` reduced with ``any`` over the batch dims where the key/value batch
    ``kv_batch`` has size 1 (shared by query groups) and ``x`` does not: ``[kv..., T]``."""
    dims = tuple(a for a, n in enumerate(kv_batch) if n == 1 and x.shape[a] != 1)
    x = jnp.any(x, axis=dims, keepdims=True) if dims else x
    return jnp.broadcast_to(x, kv_batch + x.shape[-1:])


def check_inputs(
    params: Any,
    query: Any,
    value: Any,
    key: Any,
    masks: Any,
    score_mode: Any,
    *,
    attention_mask: Any = None,
    bias: Any = None,
    segment_ids: Any = None,
    query_offset: Any = None,
    kv_length: Any = None,
    value_name: str = "value",
) -> AttentionInputs:
    """Validates the array arguments of :func:`dot_attention` and normalises them.

    ``value_name`` is the name errors use for ``value`` (``"key"`` when the caller has
    keys only, as :func:`attention_scores`).
    """
    score_mode = OPTIONS["score_mode"].check("score_mode", score_mode)
    query = check_float_array("query", query, "[..., Tq, D]")
    value = check_float_array(value_name, value, "[..., Tv, Dv]")
    key = value if key is None else check_float_array("key", key, "[..., Tv, D]")

    query, key, value, batch = check_batch_dims(query, key, value, value_name)
    _require(
        key.shape[-2] == value.shape[-2],
        chex.assert_axis_dimension,
        key,
        -2,
        value.shape[-2],
        message=(
            f"key and value must have the same length Tv; received key shape "
            f"{tuple(key.shape)} and value shape {tuple(value.shape)}"
        ),
    )
    _require(
        key.shape[-1] == query.shape[-1],
        chex.assert_axis_dimension,
        key,
        -1,
        query.shape[-1],
        message=(
            f"key depth must equal query depth D={query.shape[-1]}; received key shape "
            f"{tuple(key.shape)} and query shape {tuple(query.shape)}"
        ),
    )

    kv_batch = tuple(value.shape[:-2])
    tv = value.shape[-2]
    query_mask, value_mask = check_masks(masks, query.shape, batch + (tv,))
    attention_mask, bias, q_seg, kv_seg = check_pair_masks(
        attention_mask, bias, segment_ids, query.shape, value.shape
    )
    # Key-side arrays stay per key/value entry unless they differ between the queries
    # that share one (then per query batch entry): see kv_side.
    value_mask = None if value_mask is None else kv_side(value_mask, kv_batch, tv)
    kv_seg = None if kv_seg is None else kv_side(kv_seg, kv_batch, tv)
    scale, concat_score_weight = check_params(params, score_mode)
    query_offset = check_position("query_offset", query_offset, batch, low=0)
    kv_length = check_position("kv_length", kv_length, batch, low=1, high=tv)
    if kv_length is not None:  # cache slots at or beyond the filled length are masked
        slots = jnp.arange(value.shape[-2])
        filled = slots.reshape((1,) * kv_length.ndim + slots.shape) < kv_length[..., None]
        filled = kv_side(filled, kv_batch, tv)
        value_mask = filled if value_mask is None else value_mask & filled
    shown = value_mask  # keys some query may see: the value mask and any key-padding mask
    if attention_mask is not None and attention_mask.shape[-2] == 1:  # [..., 1, Tv]
        keys = attention_mask[..., 0, :]
        shown = keys if shown is None else shown & keys
    if shown is not None:  # a key is hidden when every query sharing it hides it
        key, value = hide_non_finite(key, value, to_kv_batch(shown, kv_batch))

    dtype = jnp.dtype(jnp.result_type(query, key, value))
    compute_dtype = jnp.dtype(jnp.float32) if jnp.finfo(dtype).bits < 32 else dtype
    return AttentionInputs(
        query=query,
        key=key,
        value=value,
        query_mask=query_mask,
        masking=Masking(value_mask, attention_mask, q_seg, kv_seg),
        bias=bias,
        scale=scale,
        concat_score_weight=concat_score_weight,
        query_offset=query_offset,
        dtype=dtype,
        compute_dtype=compute_dtype,
    )


def check_position(
    name: str, x: Any, batch: tuple[int, ...], *, low: int | None = None, high: int | None = None
) -> Array | None:
    """A position or length per sequence: None, a Python int or an integer array that
    broadcasts to the batch dims ``batch`` (NumPy rules). Returns int32, ``[]`` for a
    scalar, else at the batch's rank (size-1 dims kept); values beyond int32 raise.

    ``low``/``high`` bound the values (inclusive): a value given on the host outside them
    raises a ValueError; a traced one is checked by :func:`check_range` when the caller
    runs under ``jax.experimental.checkify`` (and costs nothing otherwise)."""
    if x is None:
        return None
    if isinstance(x, (bool, np.bool_)) or not (
        isinstance(x, int) or (_is_array(x) and jnp.issubdtype(x.dtype, jnp.integer))
    ):
        fail(
            f"{name} must be None, a Python int or an integer array broadcastable to the "
            f"batch dims {batch}; received {_describe(x)}"
            + (f" of dtype {getattr(x, 'dtype', None)}." if _is_array(x) else ".")
        )
    host = np.asarray(x) if isinstance(x, (int, np.ndarray, np.generic)) else None
    if host is not None and host.size and (host.min() < -(2**31) or host.max() >= 2**31):
        fail(f"{name} must fit int32 positions; received values in {host.min()}..{host.max()}.")
    if host is None and not np.can_cast(x.dtype, np.int32, "safe"):
        fail(
            f"{name} must have an integer dtype that int32 holds (positions are int32; "
            f"a traced {x.dtype} could wrap); received dtype {x.dtype}: cast it to int32."
        )
    if not _broadcastable(tuple(jnp.shape(x)), batch):
        fail(
            f"{name} must broadcast to the batch dims {batch} (NumPy rules); received "
            f"shape {tuple(jnp.shape(x))}."
        )
    rule = _range_rule(low, high)
    if host is not None and host.size and rule is not None:
        lo, hi = int(host.min()), int(host.max())
        if (low is not None and lo < low) or (high is not None and hi > high):
            received = f"{name}={lo}" if host.ndim == 0 else f"values in {lo}..{hi}"
            fail(f"{name} must be {rule}; received {received}.")
    # A value given on the host stays a NumPy array, so that kernels whose masks take a
    # static position (splash's offset) can read it under jit.
    x = host.astype(np.int32) if host is not None else jnp.asarray(x).astype(jnp.int32)
    if host is None and rule is not None:
        check_range(name, x, low, high)
    return x if x.ndim == 0 else x.reshape((1,) * (len(batch) - x.ndim) + x.shape)


def _range_rule(low: int | None, high: int | None) -> str | None:
    if low is not None and high is not None:
        return f"in [{low}, {high}]" if low != 1 else f"in [1, Tv] = [1, {high}]"
    if low is not None:
        return f">= {low}"
    if high is not None:
        return f"<= {high}"
    return None


def check_range(name: str, x: Array, low: int | None, high: int | None) -> None:
    """The checked mode for traced positions: under ``checkify.checkify(f,
    errors=checkify.user_checks)`` a value of ``x`` outside ``[low, high]`` is reported
    as ``"{name} must be ...; received v"``; without checkify this adds nothing to the
    program (``checkify.debug_check``)."""
    x = jnp.asarray(x)
    if x.size == 0:
        return
    lo, hi = jnp.min(x), jnp.max(x)
    if low is not None and high is not None:
        ok = (lo >= low) & (hi <= high)
        shown = jnp.where(lo < low, lo, hi)
        checkify.debug_check(ok, f"{name} must be in [{low}, {high}]; received {{v}}", v=shown)
    elif low is not None:
        checkify.debug_check(lo >= low, f"{name} must be >= {low}; received {{v}}", v=lo)
    elif high is not None:
        checkify.debug_check(hi <= high, f"{name} must be <= {high}; received {{v}}", v=hi)


def hide_non_finite(key: Array, value: Array, value_mask: Array) -> tuple[Array, Array]:
    """Reads non-finite entries of the keys and values that ``value_mask [..., Tv]``
    hides from every query as 0 (the value mask, ``kv_length`` and a key-padding
    ``attention_mask [..., 1, Tv]``), so that garbage in the padding never reaches an
    output or a gradient, on any path.

    Finite entries are untouched, so every number, Keras's rows that see no key included,
    stays as it was; the cost is one elementwise pass over ``[..., Tv, D]`` and
    ``[..., Tv, Dv]``.
    """
    shown = value_mask[..., None]  # [..., Tv, 1]

    def clean(x: Array) -> Array:
        return jnp.where(shown | jnp.isfinite(x), x, jnp.zeros((), x.dtype))

    value_out = clean(value)
    return value_out if key is value else clean(key), value_out


def empty_output(inputs: AttentionInputs) -> Array | None:
    """The output when there is nothing to attend over (an empty batch, ``Tq``, ``Tv`` or
    ``Dv``): zeros ``[..., Tq, Dv]`` in the inputs' dtype; None when no dimension is empty.
    """
    batch, tq, tv = inputs.query.shape[:-2], inputs.query.shape[-2], inputs.key.shape[-2]
    dv = inputs.value.shape[-1]
    if 0 not in (math.prod(batch), tq, tv, dv):
        return None
    return finish(jnp.zeros((*batch, tq, dv), inputs.compute_dtype), inputs)


def finish(output: Array, inputs: AttentionInputs) -> Array:
    """The common epilogue: zero the rows of masked queries, cast to the inputs' dtype."""
    if inputs.query_mask is not None:
        output = jnp.where(inputs.query_mask[..., None], output, 0)  # [..., Tq, Dv]
    return output.astype(inputs.dtype)
