"""Score and mask functions (``score_mod``, ``mask_mod``): their checks, their registry of
names (so that a config can record one), calling them with absolute positions, and their
conversion into pure functions of explicit operands for the blockwise kernel.

``score_mod(scores, q_pos, kv_pos) -> scores``: ``scores [..., Bq, Bk]`` float (the call's
broadcast batch dims), ``q_pos`` int32 ``[Bq, 1]`` (``[..., Bq, 1]`` when ``query_offset``
differs per sequence), ``kv_pos`` int32 ``[1, Bk]``; it returns scores of the same shape.
``mask_mod(q_pos, kv_pos) -> bool`` broadcastable to ``[..., Bq, Bk]``. Positions are
absolute: query row ``i`` is at ``query_offset + i``, key ``j`` at ``j`` (plus the shard's
first key under sequence parallelism).

This module knows nothing of the kernels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import jax
import jax.numpy as jnp
import numpy as np

from flax_dotattn._src.types import MaskMod, ScoreMod

#: Registered functions by name (see :func:`register`), and their names by identity.
_REGISTRY: dict[str, Callable[..., Any]] = {}
_NAMES: dict[int, str] = {}


def _fail(message: str) -> NoReturn:
    raise ValueError(message)


def register(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """Registers ``fn`` under ``name``, so that a config holding it can be written to a
    dict, JSON or YAML (by that name) and read back (to the same function).

    Returns ``fn``. Raises a ValueError for a name taken by another function.
    """
    if not isinstance(name, str) or not name:
        _fail(f"register: name must be a non-empty str; received name={name!r}.")
    if not callable(fn):
        _fail(f"register: fn must be callable; received a {type(fn).__name__}.")
    if name in _REGISTRY and _REGISTRY[name] is not fn:
        _fail(f"register: the name {name!r} is already registered to another function.")
    _REGISTRY[name] = fn
    _NAMES[id(fn)] = name
    return fn


def registered_name(fn: Callable[..., Any]) -> str | None:
    """The name ``fn`` was registered under, or None."""
    name = _NAMES.get(id(fn))
    return name if name is not None and _REGISTRY.get(name) is fn else None


def check_function(name: str, value: Any) -> Callable[..., Any] | None:
    """None, a callable, or the name of a registered function (returned as the function)."""
    if value is None or callable(value):
        return value
    if isinstance(value, str):
        if value not in _REGISTRY:
            _fail(
                f"{name} given by name must be a registered function (see "
                f"flax_dotattn.mods.register); received {name}={value!r}, registered: "
                f"{sorted(_REGISTRY)}."
            )
        return _REGISTRY[value]
    _fail(
        f"{name} must be None, a function or a registered function's name; received "
        f"{name}={value!r} of type {type(value).__name__}."
    )


def to_name(name: str, fn: Callable[..., Any] | None) -> str | None:
    """How a config writes the function of option ``name``: its registered name, or a
    ValueError (a function cannot be serialised)."""
    if fn is None:
        return None
    registered = registered_name(fn)
    if registered is None:
        _fail(
            f"a config cannot serialise {name}={fn!r}: register it with "
            f"flax_dotattn.mods.register(name, fn) to write it by name, or set {name}=None."
        )
    return registered


# -- calling the functions, checked ------------------------------------------------------


def _not_vectorised(name: str, error: Exception) -> NoReturn:
    _fail(
        f"{name} must be vectorised: it receives position arrays (q_pos [..., Bq, 1], kv_pos "
        f"[1, Bk]) and must use array operations (jnp.where, not Python if/and/or); it "
        f"raised {type(error).__name__}: {error}"
    )


def call_score_mod(fn: ScoreMod, scores: Any, q_pos: Any, kv_pos: Any) -> Any:
    """``fn(scores, q_pos, kv_pos)``, checked: the same shape as ``scores``, floating."""
    try:
        out = fn(scores, q_pos, kv_pos)
    except (jax.errors.TracerBoolConversionError, jax.errors.ConcretizationTypeError) as e:
        return _not_vectorised("score_mod", e)
    except ValueError as e:
        if "truth value of an array" in str(e):
            return _not_vectorised("score_mod", e)
        raise
    shape = getattr(out, "shape", None)
    dtype = getattr(out, "dtype", None)
    if shape is None or tuple(shape) != tuple(scores.shape):
        got = "a " + type(out).__name__ if shape is None else "shape " + str(tuple(shape))
        _fail(
            f"score_mod must return scores of the shape it receives, {tuple(scores.shape)} "
            f"([..., Bq, Bk]); received {got}."
        )
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        _fail(f"score_mod must return floating scores; received dtype {dtype}.")
    return out.astype(scores.dtype)


def call_mask_mod(fn: MaskMod, q_pos: Any, kv_pos: Any, batch: Sequence[int]) -> Any:
    """``fn(q_pos, kv_pos)``, checked: bool, broadcastable to ``batch + [Bq, Bk]`` with
    both position axes (rank >= 2)."""
    try:
        out = fn(q_pos, kv_pos)
    except (jax.errors.TracerBoolConversionError, jax.errors.ConcretizationTypeError) as e:
        return _not_vectorised("mask_mod", e)
    except ValueError as e:
        if "truth value of an array" in str(e):
            return _not_vectorised("mask_mod", e)
        raise
    shape, dtype = getattr(out, "shape", None), getattr(out, "dtype", None)
    bq, bk = q_pos.shape[-2], kv_pos.shape[-1]
    target = tuple(batch) + (bq, bk)
    if shape is None or len(shape) < 2 or not _broadcastable(tuple(shape), target):
        got = "a " + type(out).__name__ if shape is None else "shape " + str(tuple(shape))
        _fail(
            f"mask_mod must return a bool array broadcastable to {target} ([..., Bq, Bk], "
            f"both position axes kept); received {got}."
        )
    if dtype != jnp.bool_:
        _fail(f"mask_mod must return bool; received dtype {dtype}.")
    return out


def _broadcastable(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    if len(shape) > len(target):
        return False
    return all(s in (1, t) for s, t in zip(shape[::-1], target[::-1], strict=False))


# -- pure functions of explicit operands, for the blockwise kernel -------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Converted:
    """A user function as pure functions of explicit operands, one per argument shape.

    ``fns[shapes](*args, *consts)`` evaluates the function's jaxpr at those argument
    shapes; ``consts`` are the traced arrays it closes over (hoisted out of it, so that
    they enter the kernel as operands: a closure over a traced array inside a custom
    derivative would leak it). Concrete closed-over arrays stay inside as constants.
    Hashed by identity (a static setting of the kernel).
    """

    fns: dict[tuple[Any, ...], Callable[..., Any]]
    n_consts: int
    floating: tuple[bool, ...] = ()  # which consts are floating (when split by the caller)

    def __call__(self, *args: Any, consts: Sequence[Any], other: Sequence[Any] = ()) -> Any:
        """The function at the shapes of ``args``; its hoisted arrays are ``consts`` (the
        floating ones when :attr:`floating` is set, ``other`` the rest, in order)."""
        if self.floating:
            floats, rest = iter(consts), iter(other)
            consts = [next(floats) if f else next(rest) for f in self.floating]
        key = tuple((tuple(jnp.shape(a)), jnp.dtype(a.dtype).name) for a in args)
        return self.fns[key](*args, *consts)


def convert(
    fn: Callable[..., Any], examples: Sequence[Sequence[Any]], check: Callable[..., Any]
) -> tuple[Converted, tuple[Any, ...]]:
    """``fn`` (checked by ``check(fn, *args)``) traced at each example's argument shapes
    (``jax.ShapeDtypeStruct`` lists), its closed-over traced arrays hoisted.

    Returns ``(converted, consts)``. Raises a ValueError when the function closes over
    different traced arrays at different shapes.
    """
    fns: dict[tuple[Any, ...], Callable[..., Any]] = {}
    consts: list[Any] | None = None
    for args in examples:
        key = tuple((tuple(a.shape), jnp.dtype(a.dtype).name) for a in args)
        if key in fns:
            continue
        closed = jax.make_jaxpr(lambda *a: check(fn, *a))(*args)
        hoisted = [c for c in closed.consts if isinstance(c, jax.core.Tracer)]
        if consts is None:
            consts = hoisted
        elif [id(c) for c in consts] != [id(c) for c in hoisted]:
            _fail(
                "a score_mod or mask_mod must close over the same traced arrays whatever "
                "the block shape it is called with."
            )
        fns[key] = _evaluator(closed)
    return Converted(fns, len(consts or ())), tuple(consts or ())


def _evaluator(closed: Any) -> Callable[..., Any]:
    """The closed jaxpr as a function of ``(*args, *hoisted)``."""
    traced = [isinstance(c, jax.core.Tracer) for c in closed.consts]
    n_args = len(closed.jaxpr.invars)

    def evaluate(*operands: Any) -> Any:
        args, hoisted = operands[:n_args], iter(operands[n_args:])
        consts = [next(hoisted) if t else c for c, t in zip(closed.consts, traced, strict=True)]
        (out,) = jax.core.eval_jaxpr(closed.jaxpr, consts, *args)
        return out

    return evaluate


def concrete_mask(
    fn: MaskMod, q_pos: np.ndarray, kv_pos: np.ndarray, batch: Sequence[int]
) -> np.ndarray | None:
    """``fn`` evaluated while tracing on concrete positions, as a NumPy bool array, or
    None when it reads traced arrays (then it is evaluated at run time)."""
    with jax.ensure_compile_time_eval():
        out = call_mask_mod(fn, jnp.asarray(q_pos), jnp.asarray(kv_pos), batch)
    if isinstance(out, jax.core.Tracer):
        return None
    return np.asarray(out)


# -- block sparsity from a mask_mod, while tracing -----------------------------------------

#: A block's state under a mask_mod: no pair visible, some, or every one.
EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class BlockMap:
    """Which blocks of one blocking a mask_mod leaves visible, known while tracing.

    ``states [nQ, nK]`` (:data:`EMPTY`, :data:`PARTIAL`, :data:`FULL`); ``first[i]`` and
    ``last[i]`` bound the non-empty key blocks of query block ``i`` (``first > last``
    when it has none); ``steps`` is the most key blocks any query block spans.
    """

    states: np.ndarray
    first: np.ndarray
    last: np.ndarray
    steps: int


@dataclasses.dataclass(frozen=True, eq=False)
class MaskTables:
    """:class:`BlockMap` per blocking ``(Bq, Bk)`` in positions (hashed by identity)."""

    maps: dict[tuple[int, int], BlockMap]


def classify(
    fn: MaskMod,
    query_start: np.ndarray,
    kv_start: int,
    tq: int,
    tv: int,
    blocks: tuple[int, int],
    batch: Sequence[int],
) -> BlockMap | None:
    """The :class:`BlockMap` of ``fn`` for blocks ``(Bq, Bk)`` (positions), evaluated on
    concrete positions one query block at a time (``[Bq, Tv]`` each), or None when ``fn``
    reads traced arrays. ``query_start``: int ``[]`` or at the batch's rank."""
    bq, bk = blocks
    n_q, n_k = -(-tq // bq), -(-tv // bk)
    kv_pos = (kv_start + np.arange(tv, dtype=np.int32))[None, :]
    states = np.zeros((n_q, n_k), np.int8)
    for i in range(n_q):
        rows = np.arange(i * bq, min((i + 1) * bq, tq), dtype=np.int32)
        q_pos = query_start[..., None] + rows.reshape((1,) * query_start.ndim + rows.shape)
        keep = concrete_mask(fn, q_pos[..., None].astype(np.int32), kv_pos, batch)
        if keep is None:
            return None
        keep = keep.reshape((-1,) + keep.shape[-1:])  # [*, Tv] (the rows and batch)
        keep = np.broadcast_to(keep, keep.shape[:-1] + (tv,))
        pad = n_k * bk - tv
        some = np.pad(keep.any(0), (0, pad)).reshape(n_k, bk).any(1)
        every = np.pad(keep.all(0), (0, pad), constant_values=True).reshape(n_k, bk).all(1)
        states[i] = np.where(every, FULL, np.where(some, PARTIAL, EMPTY))
    seen = states > EMPTY
    first = np.where(seen.any(1), seen.argmax(1), n_k).astype(np.int32)
    last = np.where(seen.any(1), n_k - 1 - seen[:, ::-1].argmax(1), -1).astype(np.int32)
    steps = int(max(1, (last - first + 1).max(initial=1)))
    return BlockMap(states, first, last, steps)
