"""The kernel's inputs: static settings, array operands and named tangents.

:func:`prepare` flattens the batch dims ``...`` to ``B`` and fixes the static settings
once; every pass of the kernel reads them from here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flax_dotattn._src import mods
from flax_dotattn._src.masks import Masking
from flax_dotattn._src.mods import Converted, MaskTables
from flax_dotattn._src.tuning import table as tuning
from flax_dotattn._src.types import Array
from flax_dotattn._src.validation import CheckedCall


class Static(NamedTuple):
    """Static (hashable) settings of one chunked call."""

    score_mode: str
    causal: bool
    window: tuple[int | None, int | None] | None
    dropout_rate: float
    batch: tuple[int, ...]  # the output's batch dims, query groups last (``B`` and ``G``)
    tq: int  # query rows: Tq * groups
    tv: int
    forward_blocks: tuple[int, int]  # (Bq, Bk), Bq in rows (a multiple of groups)
    backward_blocks: tuple[int, int]  # (Bq, Bk) of the derivative pass
    precision: Any
    groups: int = 1  # G: query batch entries that share one key/value entry
    logits_soft_cap: float | None = None  # cap * tanh(logits / cap) before the masks
    # score_mod / mask_mod as pure functions of explicit operands (ModOperands), per block
    # shape, with the call's batch order (``batch`` is in ``perm``'s order)
    score_mod: Converted | None = None
    mask_mod: Converted | None = None
    mask_tables: MaskTables | None = None  # mask_mod classified while tracing, per blocks
    perm: tuple[int, ...] = ()

    @property
    def has_mods(self) -> bool:
        """Whether a score or mask function is given."""
        return self.score_mod is not None or self.mask_mod is not None

    @property
    def derivative_blocks(self) -> tuple[int, int]:
        """The blocks of the tangent and transpose passes: the forward's under dropout,
        whose random pattern is drawn per forward block."""
        return self.forward_blocks if self.dropout_rate > 0.0 else self.backward_blocks


class ModOperands(NamedTuple):
    """What the score and mask functions read beyond the scores: absolute positions and
    the traced arrays they close over (hoisted, see :func:`~flax_dotattn._src.mods.convert`)."""

    query_start: Array  # int32 [] or at the call's batch rank (call order): query 0's position
    kv_start: Array  # int32 []: key 0's position
    score_consts: tuple[Array, ...]  # the score_mod's floating arrays (differentiable)
    score_other: tuple[Array, ...]  # its other arrays
    mask_consts: tuple[Array, ...]  # the mask_mod's arrays


class Operands(NamedTuple):
    """Array operands of one chunked call, batch flattened to ``B``.

    With query groups (``G > 1``: grouped-query attention) the key/value batch is ``B``
    and the ``G`` queries sharing an entry are interleaved into the rows: row
    ``r = t * G + g`` is query ``t`` of group ``g`` (``Tq`` rows per group, ``Tq * G`` in
    all), so that a block of ``Bq`` rows reads each shared key block once for all groups.
    """

    q: Array  # [B, Tq * G, D]
    k: Array  # [B, Tv, D]
    v: Array  # [B, Tv, Dv]
    # value mask [B, Tv], full mask [..., Tq, Tv], segment ids [B, Tq * G] / [B, Tv]
    masking: Masking
    bias: Array | None  # [..., Tq, Tv], broadcastable batch dims (static.batch's order)
    key_offset: Array  # int32 [] or [B]: position of key 0 relative to query 0
    scale: Array | None  # []
    concat_score_weight: Array | None  # []
    rng: Array | None  # dropout key
    mods: ModOperands | None = None  # with a score_mod or a mask_mod


class Tangents(NamedTuple):
    """Tangents (or cotangents) of the differentiable operands, None where zero.

    A pytree: None fields are empty subtrees, so only the present ones travel through
    ``linear_map`` and ``jax.linear_transpose``.
    """

    query: Array | None = None  # [B, Tq * G, D]
    key: Array | None = None  # [B, Tv, D]
    value: Array | None = None  # [B, Tv, Dv]
    bias: Array | None = None  # the bias's shape
    scale: Array | None = None  # []
    concat_weight: Array | None = None  # []
    mod_consts: Any = None  # tuple of the score_mod's floating arrays (a pytree)

    @property
    def moves_logits(self) -> bool:
        """Whether any of the logits' arguments (all but ``value``) has a tangent."""
        return any(t is not None for t in (self.query, self.key, self.bias, self.scale,
                                           self.concat_weight, self.mod_consts))  # fmt: skip

    def present(self) -> Tangents:
        """Which tangents are nonzero: True there, None elsewhere (hashable, and with the
        same None fields, so :attr:`moves_logits` reads it too)."""
        flags: list[Any] = [None if t is None else True for t in self]
        return Tangents(*flags)


def score_consts(ops: Operands) -> tuple[Array, ...]:
    """The score function's floating arrays (differentiable operands), or ``()``."""
    return () if ops.mods is None else ops.mods.score_consts


def clip_blocks(blocks: tuple[int, int], tq: int, tv: int) -> tuple[int, int]:
    """Blocks no longer than the sequences, and at least 1."""
    return max(1, min(blocks[0], tq)), max(1, min(blocks[1], tv))


def pair_blocks(static: Static, blocks: tuple[int, int]) -> tuple[int, int]:
    """Blocks of rows ``(Bq * G, Bk)`` as blocks of positions ``(Bq, Bk)``, those of the
    ``[..., Tq, Tv]`` arrays (a full mask, a bias)."""
    return blocks[0] // static.groups, blocks[1]


def query_positions(static: Static, first_row: Any, rows: int) -> Array:
    """Positions of the ``rows`` query rows from ``first_row`` (rows interleave groups)."""
    r = first_row + jnp.arange(rows)
    return r if static.groups == 1 else r // static.groups


def to_rows(x: Array, perm: tuple[int, ...], b: int, g: int) -> Array:
    """A ``[..., T, ...]`` array at the output's batch (``len(perm)`` dims) to rows
    ``[B, T * G, ...]``: batch dims permuted (groups last), groups interleaved."""
    nb = len(perm)
    x = jnp.transpose(x, perm + tuple(range(nb, x.ndim)))
    t, rest = x.shape[nb], x.shape[nb + 1 :]
    x = x.reshape((b, g, t) + rest)
    return jnp.swapaxes(x, 1, 2).reshape((b, t * g) + rest)


def from_rows(x: Array, perm: tuple[int, ...], batch: tuple[int, ...], g: int) -> Array:
    """The inverse of :func:`to_rows`: ``[B, T * G, ...]`` to ``[*batch, T, ...]``."""
    b, rest = x.shape[0], x.shape[2:]
    t = x.shape[1] // g
    x = jnp.swapaxes(x.reshape((b, t, g) + rest), 1, 2)
    x = x.reshape(tuple(batch[a] for a in perm) + (t,) + rest)
    inverse = tuple(int(a) for a in np.argsort(perm))
    return jnp.transpose(x, inverse + tuple(range(len(perm), x.ndim)))


class Grouping(NamedTuple):
    """How the output's batch maps onto the kernel's: ``perm`` puts the group dims (those
    where key/value have size 1 and the queries do not) last; ``b`` key/value entries,
    ``g`` query groups per entry."""

    perm: tuple[int, ...]
    b: int
    g: int


def _varies(x: Array | None, axes: tuple[int, ...]) -> bool:
    return x is not None and x.ndim > 0 and any(x.shape[a] != 1 for a in axes)


def group(call: CheckedCall) -> tuple[CheckedCall, Grouping]:
    """The call with key/value-side arrays arranged for :func:`prepare`, and its grouping.

    Key/value with size-1 batch dims the queries do not share (grouped-query attention)
    stay as they are: the kernel reads them once per group of rows. Data that differs
    between the queries sharing a key/value entry is handled without copying key/value
    where possible: a value mask becomes a ``[..., 1, Tv]`` full mask. A ``query_offset``
    or ``kv_segment_ids`` that differ within a group (rare) broadcast key and value to
    the query's batch instead (a copy).
    """
    inputs = call.inputs
    batch, kv_batch = inputs.query.shape[:-2], inputs.value.shape[:-2]
    axes = tuple(a for a, (n, m) in enumerate(zip(batch, kv_batch, strict=True)) if m == 1 != n)
    masking = inputs.masking
    if axes and (_varies(inputs.query_offset, axes) or _varies(masking.kv_segment_ids, axes)):
        inputs = inputs._replace(
            key=jnp.broadcast_to(inputs.key, batch + inputs.key.shape[-2:]),
            value=jnp.broadcast_to(inputs.value, batch + inputs.value.shape[-2:]),
            masking=masking._replace(
                value_mask=_to_batch(masking.value_mask, batch),
                kv_segment_ids=_to_batch(masking.kv_segment_ids, batch),
            ),
        )
        axes = ()
    elif masking.value_mask is not None and _varies(masking.value_mask, axes):
        value_mask = masking.value_mask[..., None, :]  # per query group: a full [..., 1, Tv]
        full = masking.attention_mask
        masking = masking._replace(
            value_mask=None,
            attention_mask=value_mask if full is None else full & value_mask,
        )
        inputs = inputs._replace(masking=masking)
    perm = tuple(a for a in range(len(batch)) if a not in axes) + axes
    g = math.prod(batch[a] for a in axes)
    b = math.prod(batch) // g if g else 0
    return call._replace(inputs=inputs), Grouping(perm, b, g)


def _to_batch(x: Array | None, batch: tuple[int, ...]) -> Array | None:
    """A ``[..., T]`` array broadcast to ``batch + (T,)``."""
    return None if x is None else jnp.broadcast_to(x, batch + x.shape[-1:])


def _key_offset(key_offset: int | Array, query_offset: Array | None, kv_rows) -> Array:
    """Where key 0 sits relative to query 0: ``key_offset - query_offset``, int32 ``[]``,
    or ``[B]`` when the query offset differs per sequence (it is shared by the query
    groups; ``kv_rows`` flattens a key/value-side array to ``[B, ...]``)."""
    offset = jnp.asarray(key_offset, jnp.int32)
    if query_offset is None:
        return offset
    if query_offset.ndim:
        query_offset = kv_rows(query_offset[..., None])[:, 0]  # [B]
    return offset - query_offset


def prepare(call: CheckedCall, key_offset: int | Array = 0) -> tuple[Static, Operands]:
    """The kernel's static settings and operands for a checked call: the batch flattened
    to ``B`` (query groups interleaved into the rows), the arrays cast to the compute
    dtype. ``key_offset`` is the global position of the first key (for a shard of a
    longer sequence; may be traced); the call's ``query_offset`` (the position of query
    0) is taken from it."""
    static, ops, _ = prepare_grouped(call, key_offset)
    return static, ops


def prepare_grouped(
    call: CheckedCall, key_offset: int | Array = 0
) -> tuple[Static, Operands, Grouping]:
    """:func:`prepare`, and how to map the rows back to the output's batch
    (:func:`from_rows`)."""
    call, grouping = group(call)
    options, inputs = call.options, call.inputs
    query, value = inputs.query, inputs.value
    batch = query.shape[:-2]
    tq, tv = query.shape[-2], value.shape[-2]
    perm, b, g = grouping
    blocks = options.block_size or tuning.default_blocks(inputs, options)

    def rows(blocks: tuple[int, int]) -> tuple[int, int]:
        bq, bk = clip_blocks(blocks, tq, tv)
        return bq * g, bk

    static = Static(
        score_mode=options.score_mode,
        causal=options.causal,
        window=options.window,
        dropout_rate=options.applied_dropout_rate,
        batch=tuple(batch[a] for a in perm),
        tq=tq * g,
        tv=tv,
        forward_blocks=rows(blocks.forward),
        backward_blocks=rows(blocks.backward),
        precision=options.lax_precision,
        groups=g,
        logits_soft_cap=options.logits_soft_cap,
    )
    cdt = jnp.dtype(inputs.compute_dtype)
    nb = len(batch)

    def permuted(x: Array | None) -> Array | None:
        """Batch dims of an array at the batch's rank in ``perm``'s order."""
        return None if x is None else jnp.transpose(x, perm + tuple(range(nb, x.ndim)))

    def kv_rows(x: Array) -> Array:
        """A key/value-side array ``[..., T, ...]`` (size 1 along the groups) as
        ``[B, T, ...]``: no data moves."""
        x = jnp.broadcast_to(x, tuple(value.shape[:-2]) + x.shape[nb:])
        x = jnp.transpose(x, perm + tuple(range(nb, x.ndim)))
        return x.reshape((b,) + x.shape[nb:])

    def maybe_kv_rows(x: Array | None) -> Array | None:
        return None if x is None else kv_rows(x)

    def cast(x: Array | None) -> Array | None:
        return None if x is None else x.astype(cdt)

    masking = inputs.masking
    q_seg = masking.query_segment_ids
    ops = Operands(
        q=to_rows(query.astype(cdt), perm, b, g),
        k=kv_rows(inputs.key.astype(cdt)),
        v=kv_rows(value.astype(cdt)),
        masking=Masking(
            value_mask=maybe_kv_rows(masking.value_mask),
            attention_mask=permuted(masking.attention_mask),
            query_segment_ids=None if q_seg is None else to_rows(q_seg, perm, b, g),
            kv_segment_ids=maybe_kv_rows(masking.kv_segment_ids),
        ),
        bias=permuted(cast(inputs.bias)),
        key_offset=_key_offset(key_offset, inputs.query_offset, kv_rows),
        scale=cast(inputs.scale),
        concat_score_weight=cast(inputs.concat_score_weight),
        rng=call.dropout_rng if static.dropout_rate > 0.0 else None,
    )
    if options.score_mod is not None or options.mask_mod is not None:
        static, mod_ops = _prepare_mods(call, static, perm, key_offset)
        ops = ops._replace(mods=mod_ops)
    return static, ops, grouping


def _prepare_mods(
    call: CheckedCall, static: Static, perm: tuple[int, ...], key_offset: int | Array
) -> tuple[Static, ModOperands]:
    """The score and mask functions as pure functions of explicit operands (their traced
    arrays hoisted), checked at every block shape the passes use, and the mask function's
    block map where it can be evaluated while tracing (positions and constants only)."""
    options, inputs = call.options, call.inputs
    batch = inputs.query.shape[:-2]  # the call's (output's) batch, in its own order
    cdt = jnp.dtype(inputs.compute_dtype)
    offset = inputs.query_offset
    query_start = jnp.zeros((), jnp.int32) if offset is None else jnp.asarray(offset, jnp.int32)
    kv_start = jnp.asarray(key_offset, jnp.int32)
    positions = sorted(
        {pair_blocks(static, static.forward_blocks), pair_blocks(static, static.backward_blocks)}
    )

    def sds(shape: tuple[int, ...], dtype: Any) -> Any:
        return jax.ShapeDtypeStruct(shape, dtype)

    def q_pos(bq: int) -> Any:
        return sds(query_start.shape + (bq, 1), jnp.int32)

    score, score_consts, score_other = None, (), ()
    if options.score_mod is not None:
        examples: list[tuple[Any, ...]] = [
            (sds(batch + (bq, bk), cdt), q_pos(bq), sds((1, bk), jnp.int32)) for bq, bk in positions
        ]
        score, consts = mods.convert(options.score_mod, examples, mods.call_score_mod)
        floating = tuple(jnp.issubdtype(c.dtype, jnp.inexact) for c in consts)
        score = dataclasses.replace(score, floating=floating)
        score_consts = tuple(c for c, f in zip(consts, floating, strict=True) if f)
        score_other = tuple(c for c, f in zip(consts, floating, strict=True) if not f)
    mask, mask_consts, tables = None, (), None
    if options.mask_mod is not None:
        examples = [(q_pos(bq), sds((1, bk), jnp.int32)) for bq, bk in positions]

        def check(fn: Any, q: Any, k: Any) -> Any:
            return mods.call_mask_mod(fn, q, k, batch)

        mask, mask_consts = mods.convert(options.mask_mod, examples, check)
        concrete = (offset is None or isinstance(offset, np.ndarray)) and not isinstance(
            key_offset, jax.core.Tracer
        )
        if concrete:
            start = np.zeros((), np.int32) if offset is None else np.asarray(offset, np.int32)
            maps = {
                blocks: mods.classify(
                    options.mask_mod, start, int(key_offset), inputs.query.shape[-2],
                    static.tv, blocks, batch,
                )
                for blocks in positions
            }  # fmt: skip
            if all(m is not None for m in maps.values()):
                tables = mods.MaskTables(maps)  # type: ignore[arg-type]
    static = static._replace(score_mod=score, mask_mod=mask, mask_tables=tables, perm=perm)
    return static, ModOperands(query_start, kv_start, score_consts, score_other, mask_consts)
