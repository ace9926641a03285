"""The kernel's inputs: static settings, array operands and named tangents.

:func:`prepare` flattens the batch dims ``...`` to ``B`` and fixes the static settings
once; every pass of the kernel reads them from here.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax.numpy as jnp

from flax_dotattn._src import tuning
from flax_dotattn._src.masks import Masking
from flax_dotattn._src.types import Array
from flax_dotattn._src.validation import CheckedCall


class Static(NamedTuple):
    """Static (hashable) settings of one chunked call."""

    score_mode: str
    causal: bool
    window: tuple[int | None, int | None] | None
    dropout_rate: float
    batch: tuple[int, ...]  # the batch dims ``...`` that ``B`` flattens
    tq: int
    tv: int
    forward_blocks: tuple[int, int]  # (Bq, Bk)
    backward_blocks: tuple[int, int]  # (Bq, Bk) of the derivative pass
    precision: Any

    @property
    def derivative_blocks(self) -> tuple[int, int]:
        """The blocks of the tangent and transpose passes: the forward's under dropout,
        whose random pattern is drawn per forward block."""
        return self.forward_blocks if self.dropout_rate > 0.0 else self.backward_blocks


class Operands(NamedTuple):
    """Array operands of one chunked call, batch flattened to ``B``."""

    q: Array  # [B, Tq, D]
    k: Array  # [B, Tv, D]
    v: Array  # [B, Tv, Dv]
    masking: Masking  # value mask [B, Tv], full mask [..., Tq, Tv], segment ids [B, T]
    bias: Array | None  # [..., Tq, Tv], broadcastable batch dims
    key_offset: Array  # int32 [] or [B]: position of key 0 relative to query 0
    scale: Array | None  # []
    concat_score_weight: Array | None  # []
    rng: Array | None  # dropout key


class Tangents(NamedTuple):
    """Tangents (or cotangents) of the differentiable operands, None where zero.

    A pytree: None fields are empty subtrees, so only the present ones travel through
    ``linear_map`` and ``jax.linear_transpose``.
    """

    query: Array | None = None  # [B, Tq, D]
    key: Array | None = None  # [B, Tv, D]
    value: Array | None = None  # [B, Tv, Dv]
    bias: Array | None = None  # the bias's shape
    scale: Array | None = None  # []
    concat_weight: Array | None = None  # []

    @property
    def moves_logits(self) -> bool:
        """Whether any of the logits' arguments (all but ``value``) has a tangent."""
        return any(t is not None for t in (self.query, self.key, self.bias, self.scale,
                                           self.concat_weight))  # fmt: skip

    def present(self) -> Tangents:
        """Which tangents are nonzero: True there, None elsewhere (hashable, and with the
        same None fields, so :attr:`moves_logits` reads it too)."""
        flags: list[Any] = [None if t is None else True for t in self]
        return Tangents(*flags)


def clip_blocks(blocks: tuple[int, int], tq: int, tv: int) -> tuple[int, int]:
    """Blocks no longer than the sequences, and at least 1."""
    return max(1, min(blocks[0], tq)), max(1, min(blocks[1], tv))


def _key_offset(key_offset: int | Array, query_offset: Array | None, batch) -> Array:
    """Where key 0 sits relative to query 0: ``key_offset - query_offset``, int32 ``[]``,
    or ``[B]`` when the query offset differs per sequence."""
    offset = jnp.asarray(key_offset, jnp.int32)
    if query_offset is None:
        return offset
    if query_offset.ndim:
        query_offset = jnp.broadcast_to(query_offset, batch).reshape(-1)  # [B]
    return offset - query_offset


def prepare(call: CheckedCall, key_offset: int | Array = 0) -> tuple[Static, Operands]:
    """The kernel's static settings and operands for a checked call: the batch flattened
    to ``B``, the arrays cast to the compute dtype. ``key_offset`` is the global position
    of the first key (for a shard of a longer sequence; may be traced); the call's
    ``query_offset`` (the position of query 0) is taken from it."""
    options, inputs = call.options, call.inputs
    query, value = inputs.query, inputs.value
    batch = query.shape[:-2]
    tq, d = query.shape[-2:]
    tv, dv = value.shape[-2:]
    b = math.prod(batch)
    blocks = options.block_size or tuning.default_blocks(inputs, options)
    static = Static(
        score_mode=options.score_mode,
        causal=options.causal,
        window=options.window,
        dropout_rate=options.applied_dropout_rate,
        batch=tuple(batch),
        tq=tq,
        tv=tv,
        forward_blocks=clip_blocks(blocks.forward, tq, tv),
        backward_blocks=clip_blocks(blocks.backward, tq, tv),
        precision=options.lax_precision,
    )
    cdt = jnp.dtype(inputs.compute_dtype)

    def flat(x: Array | None, t: int) -> Array | None:
        return None if x is None else x.reshape(b, t)

    def cast(x: Array | None) -> Array | None:
        return None if x is None else x.astype(cdt)

    masking = inputs.masking
    ops = Operands(
        q=query.astype(cdt).reshape(b, tq, d),
        k=inputs.key.astype(cdt).reshape(b, tv, d),
        v=value.astype(cdt).reshape(b, tv, dv),
        masking=Masking(
            value_mask=flat(masking.value_mask, tv),
            attention_mask=masking.attention_mask,
            query_segment_ids=flat(masking.query_segment_ids, tq),
            kv_segment_ids=flat(masking.kv_segment_ids, tv),
        ),
        bias=cast(inputs.bias),
        key_offset=_key_offset(key_offset, inputs.query_offset, batch),
        scale=cast(inputs.scale),
        concat_score_weight=cast(inputs.concat_score_weight),
        rng=call.dropout_rng if static.dropout_rate > 0.0 else None,
    )
    return static, ops
