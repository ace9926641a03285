"""Ring (context-parallel) attention: queries, keys and values sharded along the sequence.

Each of the ``n`` devices of a mesh axis keeps its shard of the queries. The key/value
shards (with their value-mask and segment-id shards) travel around the ring with
``lax.ppermute``: at step ``s`` device ``r`` holds the shard of device ``r - s``, runs the
chunked kernel on (its queries, that shard) and merges the result into its running softmax
statistics (row max ``m``, normaliser ``l`` and weighted sum), exactly as the online
softmax of one device does across its key blocks. After ``n`` steps every query has seen
every key. Whatever is tied to a (query, key) pair, a full ``attention_mask`` or a
``bias``, is split along the queries only: each device holds the rows of its queries for
every key (all it will ever need, so it never travels) and reads the columns of the
visiting chunk.

Derivatives. The ring is a ``jax.custom_jvp``: its tangent is a second ring that rotates
the key/value tangents with their shards and, per (query shard, key shard) pair, runs the
kernel's tangent with the *final* row statistics. That tangent is linear in the input
tangents; it is wrapped in ``linear_map`` with a hand-written transpose, a third ring in
which the cotangents of each key/value shard ride along with the shard (rotations at the
end bring them home). Reverse mode therefore never stacks per-step residuals: the
forward, the tangent and the backward pass each hold O(T / n) activations per device (the
shards, the output, ``(m, l)``, the visiting shard and its cotangents with their receive
buffers), plus the kernel's working set for one pair, plus the device's rows of a full
mask or bias and of the bias's cotangent. ``linear_map`` differentiates its residuals and
batches (by vectorising the rings), so derivatives vmap (per-example gradients,
``jacfwd``/``jacrev``) and second order works.

Skipping. A (query chunk, key chunk) pair in which no query can see a key, by causality,
``window``, positions (``query_offset``), a value mask (``kv_length``), disjoint segment id
ranges or a full mask, is not computed when that is provably exact: its masked logits (at
most ``bound - 1e9``, the kernel's bound) are so far below every row's max that their
softmax weights are exactly 0 (rows that see no key average over every key, Keras's rule,
and keep every pair). Every device first gathers a few numbers per key chunk (whether it
has an unmasked key, its segment id range) and works out which ring steps hold a visible
pair on some device; when the steps after the last such step can all be skipped (the same
exact test against the rows' maxima, one ``pmax``), the ring stops there instead of
sending the shards further: a causal window of ``w <= T / n`` costs two steps, not ``n``.

Layouts. ``"contiguous"``: device ``r`` holds positions ``[r T/n, (r+1) T/n)``. With a
causal mask that leaves device 0 with one shard pair of work and device ``n-1`` with
``n``. ``"zigzag"`` cuts the sequence into ``2n`` chunks and gives device ``r`` chunks
``r`` and ``2n-1-r``: one early and one late chunk, so each device does the same work.
Inputs and outputs stay in natural order; the reordering is two ``ppermute`` s each way
inside the ``shard_map``. With a causal window contiguous chunks are balanced already
(every device sees about ``w`` keys per query) and let the ring stop early, whereas
zig-zag chunks need their neighbours on both sides (steps 1 and ``n - 1``).

Grouped-query attention. Key/value batch dims of size 1 where the query's are larger are
shared, not repeated: the kernel's rows interleave the query groups (``Static.groups``),
so each visiting key/value shard is read once for all the queries of its group.

Shape glossary: ``...`` batch dims, ``Tq``/``Tv`` query/key lengths, ``D`` query/key
depth, ``Dv`` value depth, ``B`` the flattened key/value batch, ``G`` query groups per
key/value entry, ``n`` the size of the mesh axis, ``C`` (``Cq``/``Cv``) a chunk's length:
``T / n`` (contiguous) or ``T / (2n)`` (zigzag).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.sharding import Mesh, PartitionSpec

from flax_dotattn._src import validation
from flax_dotattn._src.blocks import BlockSizes
from flax_dotattn._src.kernels import chunked
from flax_dotattn._src.kernels.linear_map import linear_map
from flax_dotattn._src.masks import MASK_PENALTY, Masking
from flax_dotattn._src.parallel.key_sharded import check_mesh_axis
from flax_dotattn._src.scores import soft_cap
from flax_dotattn._src.types import (
    Array,
    BlockSizeLike,
    Masks,
    Params,
    PrecisionLike,
    ScoreMode,
    Window,
)

Layout = Literal["contiguous", "zigzag"]
LAYOUTS: tuple[str, ...] = ("contiguous", "zigzag")


class Ring(NamedTuple):
    """Static settings of one ring call (hashable)."""

    axis_name: Any
    size: int  # n, devices on the ring
    zigzag: bool  # two chunks per device (r and 2n-1-r) instead of one (r)
    cq: int  # query chunk length Cq (positions)
    cv: int  # key/value chunk length Cv
    pair: chunked.Static  # the kernel's settings for one (query chunk, key chunk) pair
    perm: tuple[int, ...]  # the batch dims in the rows' order (query groups last)

    @property
    def chunks(self) -> int:
        """Chunks per device."""
        return 2 if self.zigzag else 1

    @property
    def parts(self) -> int:
        """Chunks of the whole sequence."""
        return self.size * self.chunks


class Shards(NamedTuple):
    """One device's operands in the kernel's rows (batch flattened to ``B``, query groups
    interleaved into the rows), its chunks stacked in front."""

    q: Array  # [chunks, B, Cq * G, D]
    k: Array  # [chunks, B, Cv, D]
    v: Array  # [chunks, B, Cv, Dv]
    value_mask: Array | None  # bool [chunks, B, Cv]
    q_segments: Array | None  # int [chunks, B, Cq * G]
    kv_segments: Array | None  # int [chunks, B, Cv]
    # This device's query rows (its chunks in order) against every key, batch dims in
    # ``Ring.perm``'s order; a size-1 (broadcast) axis stays size 1.
    attention_mask: Array | None  # bool [..., chunks * Cq | 1, Tv | 1]
    bias: Array | None  # [..., chunks * Cq | 1, Tv | 1]
    offset: Array  # int32 [] or [B]: -query_offset, where key 0 sits relative to query 0
    scale: Array | None  # []
    concat_score_weight: Array | None  # []
    rng: Array | None  # dropout key


class Visiting(NamedTuple):
    """What travels around the ring: a device's key/value chunks and their key-side masks."""

    k: Array  # [chunks, B, Cv, D]
    v: Array  # [chunks, B, Cv, Dv]
    value_mask: Array | None  # [chunks, B, Cv]
    kv_segments: Array | None  # [chunks, B, Cv]


class Sight(NamedTuple):
    """What a device knows, before any step, of which pairs may hold a visible (query,
    key) pair: a summary of every key chunk (gathered over the ring) and of its own query
    chunks. No derivative flows through it."""

    kv_any: Array | None  # bool [n, chunks, B]: the chunk has a key its value mask shows
    kv_range: Array | None  # int [n, chunks, 2, B]: min and max segment id of the chunk
    q_range: Array | None  # int [chunks, 2, B]: those of this device's query chunks
    mask_any: Array | None  # bool [chunks, parts]: the full mask shows some pair
    q_bound: Array  # [chunks, B, Cq * G]: |logit| <= q_bound * k_bound (before the bias)
    k_bound: Array  # []: the largest k_bound over every key
    bias_max: Array  # []: the largest bias entry (0 without one)
    steps: Array  # int32 []: ring steps up to the last one some device sees a pair in


class Work(NamedTuple):
    """What one device computed in one forward pass (for tests and benchmarks)."""

    steps: Array  # int32 []: ring steps run (key/value shards received, plus 1)
    pairs: Array  # int32 []: (query chunk, key chunk) pairs run through the kernel
    blocks: Array  # int32 []: kernel blocks of those pairs that hold a visible pair
    derivative_steps: Array  # int32 []: steps the tangent and transpose rings run


# -- bookkeeping ------------------------------------------------------------------------


def chunk_id(ring: Ring, device: Any, a: Any) -> Any:
    """Global index of the ``a``-th chunk that ``device`` holds (``a``, ``device`` may be
    traced): ``device`` (contiguous), or ``device`` then ``2n - 1 - device`` (zigzag)."""
    if not ring.zigzag:
        return device
    return jnp.where(a == 0, device, 2 * ring.size - 1 - device)


def _rotate(ring: Ring, tree: Any, shift: int = 1) -> Any:
    """Sends every leaf of ``tree`` ``shift`` (+1 or -1) steps along the ring."""
    perm = [(i, (i + shift) % ring.size) for i in range(ring.size)]
    return jax.tree.map(lambda x: lax.ppermute(x, ring.axis_name, perm), tree)


def _pair_slice(ring: Ring, x: Array | None, a: Any, k_id: Any) -> Array | None:
    """The block of a device's pair array (full mask, bias or their (co)tangents ``[...,
    chunks * Cq | 1, Tv | 1]``) for its query chunk ``a`` and the global key chunk
    ``k_id``: ``[..., Cq | 1, Cv | 1]`` (a size-1 axis stays)."""
    if x is None:
        return None
    starts = [jnp.int32(0)] * x.ndim
    sizes = list(x.shape)
    if x.shape[-2] != 1:
        starts[-2], sizes[-2] = jnp.asarray(a * ring.cq, jnp.int32), ring.cq
    if x.shape[-1] != 1:
        starts[-1], sizes[-1] = jnp.asarray(k_id * ring.cv, jnp.int32), ring.cv
    return lax.dynamic_slice(x, starts, sizes)


def _pair_set(ring: Ring, x: Array | None, a: Any, k_id: Any, y: Array | None) -> Array | None:
    """Writes ``y`` into the block :func:`_pair_slice` reads (in place)."""
    if x is None or y is None:
        return x
    starts = [jnp.int32(0)] * x.ndim
    if x.shape[-2] != 1:
        starts[-2] = jnp.asarray(a * ring.cq, jnp.int32)
    if x.shape[-1] != 1:
        starts[-1] = jnp.asarray(k_id * ring.cv, jnp.int32)
    return lax.dynamic_update_slice(x, y, starts)


def _pair(ring: Ring, shards: Shards, visiting: Visiting, a, b, q_id, k_id) -> chunked.Operands:
    """The kernel's operands for query chunk ``a`` (global index ``q_id``) against the
    visiting key chunk ``b`` (``k_id``): masks compare global positions through
    ``key_offset``; dropout draws from the rng folded with both global indices."""
    rng = shards.rng
    if rng is not None:
        rng = jax.random.fold_in(jax.random.fold_in(rng, q_id), k_id)

    def pick(x: Array | None, i: Any) -> Array | None:
        return None if x is None else x[i]

    return chunked.Operands(
        q=shards.q[a],
        k=visiting.k[b],
        v=visiting.v[b],
        masking=Masking(
            value_mask=pick(visiting.value_mask, b),
            attention_mask=_pair_slice(ring, shards.attention_mask, a, k_id),
            query_segment_ids=pick(shards.q_segments, a),
            kv_segment_ids=pick(visiting.kv_segments, b),
        ),
        bias=_pair_slice(ring, shards.bias, a, k_id),
        key_offset=shards.offset + jnp.asarray(k_id * ring.cv - q_id * ring.cq, jnp.int32),
        scale=shards.scale,
        concat_score_weight=shards.concat_score_weight,
        rng=rng,
    )


# -- what can be seen -------------------------------------------------------------------


def _positions_visible(ring: Ring, offset: Array) -> Array:
    """Whether causal/window let some query of a pair see some key of it, given where its
    first key sits relative to its first query (``offset``, any shape, traced)."""
    left, right = ring.pair.window or (None, None)
    if ring.pair.causal:
        right = 0 if right is None else min(right, 0)
    # Query q in [0, Cq) sees keys q - left .. q + right; keys are offset .. offset + Cv - 1.
    visible = jnp.ones(jnp.shape(offset), bool)
    if right is not None:
        visible &= offset <= ring.cq - 1 + right
    if left is not None:
        visible &= offset + ring.cv - 1 >= -left
    return visible


def _range(x: Array) -> Array:
    """``[chunks, B, C]`` ids -> ``[chunks, 2, B]``: their min and max per chunk."""
    return jnp.stack([x.min(-1), x.max(-1)], axis=1)


def _sight(ring: Ring, shards: Shards) -> Sight:
    """Gathers the summaries of every key chunk and finds the last step that holds a
    visible pair on some device (one ``all_gather`` of a few numbers per chunk, one
    ``pmax``)."""
    shards = jax.tree.map(lax.stop_gradient, shards)

    def gather(x: Array) -> Array:
        return lax.all_gather(x, ring.axis_name)  # [n, ...]

    kv_any = None if shards.value_mask is None else gather(jnp.any(shards.value_mask, -1))
    kv_range = q_range = None
    if shards.q_segments is not None:
        assert shards.kv_segments is not None, "segment ids come in pairs"
        kv_range, q_range = gather(_range(shards.kv_segments)), _range(shards.q_segments)
    mask_any = None
    if shards.attention_mask is not None:
        m = shards.attention_mask
        rows = ring.chunks if m.shape[-2] != 1 else 1
        cols = ring.parts if m.shape[-1] != 1 else 1
        m = m.reshape(m.shape[:-2] + (rows, m.shape[-2] // rows, cols, m.shape[-1] // cols))
        m = jnp.any(m, axis=tuple(range(m.ndim - 4)) + (m.ndim - 3, m.ndim - 1))  # [rows, cols]
        mask_any = jnp.broadcast_to(m, (ring.chunks, ring.parts))
    chunks, rows = shards.q.shape[:2]
    ops = chunked.Operands(
        q=shards.q.reshape((chunks * rows, *shards.q.shape[2:])),
        k=shards.k.reshape((chunks * rows, *shards.k.shape[2:])),
        v=shards.v,
        masking=Masking(),
        bias=None,
        key_offset=jnp.int32(0),
        scale=shards.scale,
        concat_score_weight=shards.concat_score_weight,
        rng=None,
    )
    q_bound, k_bound = chunked.logit_bounds(ring.pair, ops)  # [chunks * B, Cq * G], ...
    q_bound = q_bound.reshape(shards.q.shape[:-1])
    k_bound = lax.pmax(k_bound.max(), ring.axis_name)
    dtype = shards.q.dtype
    bias_max = jnp.zeros((), dtype)
    if shards.bias is not None:
        bias_max = lax.pmax(shards.bias.max().astype(dtype), ring.axis_name)
    sight = Sight(kv_any, kv_range, q_range, mask_any, q_bound, k_bound, bias_max, jnp.int32(0))
    # Every step s, every pair (a, b): the key chunk visits from device me - s.
    me: Any = lax.axis_index(ring.axis_name)
    s = jnp.arange(ring.size)[:, None, None]  # [n, 1, 1]
    a = jnp.arange(ring.chunks)[None, :, None]  # [1, chunks, 1]
    b = jnp.arange(ring.chunks)[None, None, :]  # [1, 1, chunks]
    source = (me - s) % ring.size
    seen = _visible(ring, shards, sight, a, b, chunk_id(ring, me, a), source,
                    chunk_id(ring, source, b))  # fmt: skip
    seen = jnp.any(seen, axis=(1, 2))  # [n]
    last = jnp.max(jnp.where(seen, jnp.arange(ring.size), 0))
    return sight._replace(steps=lax.pmax(last, ring.axis_name).astype(jnp.int32) + 1)


def _visible(ring: Ring, shards: Shards, sight: Sight, a, b, q_id, source, k_id) -> Array:
    """Whether query chunk ``a`` (global ``q_id``) may see a key of chunk ``b`` of device
    ``source`` (global ``k_id``): False only when positions, the value mask, segment ids or
    the full mask hide every pair. Arguments broadcast; the result has their shape."""
    offset = jnp.asarray(k_id * ring.cv - q_id * ring.cq)[..., None]  # [..., 1]
    base = shards.offset
    offset = offset + base.reshape((1,) * (offset.ndim - base.ndim) + base.shape)  # [..., B|1]
    seen = _positions_visible(ring, offset)
    if sight.kv_any is not None:
        seen &= sight.kv_any[source, b]  # [..., B]
    if sight.kv_range is not None and sight.q_range is not None:
        q, kv = sight.q_range[a], sight.kv_range[source, b]  # [..., 2, B]
        seen &= jnp.maximum(q[..., 0, :], kv[..., 0, :]) <= jnp.minimum(q[..., 1, :], kv[..., 1, :])
    seen = jnp.any(seen, axis=-1)
    if sight.mask_any is not None:
        seen &= sight.mask_any[a, k_id]
    return seen


def _negligible(ring: Ring, sight: Sight, a: Any, k_bound: Array, row_max: Array) -> Array:
    """Whether masked logits of query chunk ``a``'s rows against keys bounded by
    ``k_bound`` get softmax weight exactly 0 next to ``row_max [B, Cq * G]``, in every
    row."""
    # The soft-cap is increasing, so it caps the bound of the logits (bias included) too.
    logits = soft_cap(sight.q_bound[a] * k_bound + sight.bias_max, ring.pair.logits_soft_cap)
    top = logits - MASK_PENALTY  # [B, Cq * G]
    return jnp.all(chunked.negligible(top, row_max))


def _maybe(ring, sight, ops, a, visible, row_max, compute: Callable, carry):
    """``compute(carry)``, or ``carry`` when the pair provably cannot contribute: no
    query sees a key of it and its masked logits get weight exactly 0 in every row
    (``row_max [B, Cq * G]``, the rows' max so far)."""
    _, k_bound = chunked.logit_bounds(ring.pair, ops)  # [B, Cv]
    k_bound = lax.stop_gradient(k_bound).max(-1)[:, None]  # [B, 1]
    skip = ~visible & _negligible(ring, sight, a, k_bound, lax.stop_gradient(row_max))
    return lax.cond(skip, lambda c: c, compute, carry)


def _rest_needed(ring: Ring, sight: Sight, row_max: Array) -> Array:
    """Whether some device still needs the steps after ``sight.steps`` (which hold no
    visible pair anywhere): some row's max ``row_max [chunks, B, Cq * G]`` is not far
    enough above the masked logits of every key. The same on every device."""
    ok = jnp.all(
        jnp.stack(
            [_negligible(ring, sight, a, sight.k_bound, row_max[a]) for a in range(ring.chunks)]
        )
    )
    return lax.pmax((~ok).astype(jnp.int32), ring.axis_name) > 0


def _steps(ring: Ring, shards: Shards, sight: Sight, pair_step: Callable, extra: Any,
           carry: Any, bounds: Callable, travelling: Callable = lambda c, _: c) -> Any:  # fmt: skip
    """Runs ``carry = pair_step(p, ops, extra_b, carry)`` for the ring's first steps and
    every pair of (query chunk ``a``, visiting key chunk ``b``): ``p`` the :class:`Pair`,
    ``ops`` the pair's kernel operands, ``extra_b`` chunk ``b`` of each leaf of ``extra``
    (stacked like the keys, e.g. their tangents), which travels with the keys and values.

    The steps run are ``0 .. sight.steps - 1``, then the rest when ``bounds(carry)``
    (traced, the same on every device), read after step ``sight.steps - 1``, says so.
    ``travelling(carry, shift)`` rotates the part of ``carry`` that travels along with
    the keys (e.g. the visiting shard's cotangents). Each step sends its shard on while it
    computes (the rotation does not wait for it, so the two overlap), unless no step
    follows, so none is wasted. The loop has the static length ``n`` (so that reverse
    mode can differentiate it: second order), each step under a ``lax.cond`` that every
    device takes alike. Returns ``(carry, steps run)``: after ``steps - 1`` rotations.
    """
    me = lax.axis_index(ring.axis_name)

    def step(index, visiting, carry):
        visiting, extra = visiting
        source = (me - index) % ring.size  # whose key/value chunks are visiting

        def pair(p, carry):
            a, b = divmod(p, ring.chunks)
            q_id, k_id = chunk_id(ring, me, a), chunk_id(ring, source, b)
            ops = _pair(ring, shards, visiting, a, b, q_id, k_id)
            visible = _visible(ring, shards, sight, a, b, q_id, source, k_id)
            info = Pair(a, b, q_id, k_id, visible)
            return pair_step(info, ops, jax.tree.map(lambda x: x[b], extra), carry)

        if ring.chunks == 1:
            return pair(0, carry)
        return lax.fori_loop(0, ring.chunks**2, pair, carry)

    def rotate(visiting, carry, when):
        """The next shard (and what travels with it) when ``when``; no data otherwise."""
        visiting = lax.cond(when, lambda x: _rotate(ring, x), lambda x: x, visiting)
        return visiting, lax.cond(when, lambda c: travelling(c, 1), lambda c: c, carry)

    def body(index, state):
        visiting, carry, rest = state
        # After the visible steps: whether the others are needed (one pmax, once); if so,
        # the shard the last visible step did not send goes on now.
        boundary = index == sight.steps
        rest = lax.cond(boundary, lambda: bounds(carry), lambda: rest)
        visiting, carry = rotate(visiting, carry, boundary & rest)

        def run(state):
            visiting, carry = state
            carry = step(index, visiting, carry)
            # Sent while the step computes (it reads the shard, it does not change it).
            more = (index + 1 < sight.steps) | (rest & (index + 1 < ring.size))
            return rotate(visiting, carry, more)

        visiting, carry = lax.cond(
            (index < sight.steps) | rest, run, lambda s: s, (visiting, carry)
        )
        return visiting, carry, rest

    visiting = (Visiting(shards.k, shards.v, shards.value_mask, shards.kv_segments), extra)
    _, carry, rest = lax.fori_loop(0, ring.size, body, (visiting, carry, jnp.asarray(False)))
    return carry, jnp.where(rest, ring.size, sight.steps)


class Pair(NamedTuple):
    """Where a pair sits: local chunks ``a`` (queries) and ``b`` (visiting keys), their
    global indices, and whether a query may see a key of it."""

    a: Any
    b: Any
    q_id: Any
    k_id: Any
    visible: Any


def _blocks_computed(ring: Ring, key_offset: Array) -> Array:
    """Kernel blocks of one pair that hold a visible (query, key) pair by positions:
    those the kernel computes when every row sees a key (its bound test skips the
    others)."""
    static = ring.pair
    block_q, block_k = static.forward_blocks
    block_q //= static.groups  # positions
    n_q, n_k = -(-ring.cq // block_q), -(-static.tv // block_k)
    i = jnp.arange(n_q)[:, None]
    j = jnp.arange(n_k)[None, :]
    offset = j * block_k - i * block_q  # [nQ, nK]
    lo, hi = jnp.min(key_offset), jnp.max(key_offset)
    sub = ring._replace(cq=block_q, cv=block_k)
    seen = _positions_visible(sub, offset + lo) | _positions_visible(sub, offset + hi)
    return jnp.sum(seen, dtype=jnp.int32)


# -- forward ----------------------------------------------------------------------------


def _merge(stats, out, m, norm):
    """Merges a pair's ``out [B, Cq * G, Dv]``, ``m, l [B, Cq * G]`` into the running
    ``(m, l, acc)`` (``acc`` the unnormalised weighted sum), as the sharded merge does."""
    m_run, l_run, acc = stats
    top = jnp.maximum(m_run, m)  # [B, Cq * G]
    alpha, beta = jnp.exp(m_run - top), jnp.exp(m - top)
    acc = acc * alpha[..., None] + out * (norm * beta)[..., None]  # [B, Cq * G, Dv]
    return top, l_run * alpha + norm * beta, acc


def _ring_forward(ring: Ring, shards: Shards) -> tuple[tuple[Array, Array, Array], Work]:
    """``(out [chunks, B, Cq * G, Dv], m, l [chunks, B, Cq * G])`` and this device's
    :class:`Work`."""
    dtype, dv = shards.q.dtype, shards.v.shape[-1]
    rows = shards.q.shape[:-1]  # [chunks, B, Cq * G]
    init = (
        jnp.full(rows, -jnp.inf, dtype),  # running max m
        jnp.zeros(rows, dtype),  # running normaliser l
        jnp.zeros((*rows, dv), dtype),  # running weighted sum
    )
    sight = _sight(ring, shards)

    def pair_step(p: Pair, ops, _, carry):
        stats, pairs, blocks = carry
        row = tuple(x[p.a] for x in stats)

        def compute(state):
            row, pairs, blocks = state
            out, m, norm = chunked.forward(ring.pair, ops)
            blocks = blocks + _blocks_computed(ring, ops.key_offset)
            return _merge(row, out, m, norm), pairs + 1, blocks

        row, pairs, blocks = _maybe(
            ring, sight, ops, p.a, p.visible, row[0], compute, (row, pairs, blocks)
        )
        return tuple(x.at[p.a].set(y) for x, y in zip(stats, row, strict=True)), pairs, blocks

    def rest(carry):
        (m, _, _), _, _ = carry
        return _rest_needed(ring, sight, m)

    carry = (init, jnp.int32(0), jnp.int32(0))
    ((m, norm, acc), pairs, blocks), steps = _steps(ring, shards, sight, pair_step, (), carry,
                                                    rest)  # fmt: skip
    out = acc / jnp.where(norm > 0, norm, jnp.ones((), dtype))[..., None]
    work = Work(steps, pairs, blocks, _derivative_steps(ring, sight, m))
    return (out, m, norm), work


def _derivative_steps(ring: Ring, sight: Sight, m: Array) -> Array:
    """Steps the tangent and transpose rings run, from the rows' final maxima ``m``."""
    return jnp.where(_rest_needed(ring, sight, m), ring.size, sight.steps)


# -- derivatives ------------------------------------------------------------------------
# The tangent is linear in the named tangents (query, key, value, bias and the scalars);
# fields that are None are zero and do not travel. Every pair uses the *final*
# ``(out, m, l)`` of its rows, so the pairs' ``A - c * out`` (see the kernel's tangent)
# add up to the row's ``sum(A) - sum(c) * out``: the exact JVP. A pair skipped there
# (exact zero weights with the final maxima) contributes exactly 0.


def _tangent_ring(ring: Ring, residuals, t: chunked.Tangents) -> Array:
    """The JVP of the ring's output ``[chunks, B, Cq * G, Dv]``; k/v tangents travel
    along."""
    shards, (out, m, norm) = residuals
    sight = _sight(ring, shards)

    def pair_step(p: Pair, ops, visiting, d_out):
        key, value = visiting
        tangents = t._replace(
            query=_pick(t.query, p.a), key=key, value=value,
            bias=_pair_slice(ring, t.bias, p.a, p.k_id),
        )  # fmt: skip
        pair = chunked.Residuals(ops, out[p.a], m[p.a], norm[p.a])

        def compute(acc):
            return acc + chunked.tangent(ring.pair, pair, tangents)[0]

        return d_out.at[p.a].set(_maybe(ring, sight, ops, p.a, p.visible, m[p.a], compute,
                                        d_out[p.a]))  # fmt: skip

    need = _rest_needed(ring, sight, m)
    d_out, _ = _steps(ring, shards, sight, pair_step, (t.key, t.value), jnp.zeros_like(out),
                      lambda _: need)  # fmt: skip
    return d_out


def _pick(x: Array | None, i: Any) -> Array | None:
    return None if x is None else x[i]


def _put(x: Array | None, i: Any, y: Array | None) -> Array | None:
    return None if x is None else x.at[i].set(y)


def _tangent_ring_transpose(
    ring: Ring, present: chunked.Tangents, residuals, ct: Array
) -> chunked.Tangents:
    """The transpose of :func:`_tangent_ring` (reverse mode): a third ring.

    The cotangents of each key/value shard ride along with the shard and reach their owner
    by rotations at the end (forward or back, whichever is shorter); those of the queries,
    the bias and the scalars accumulate in place (``shard_map`` sums the partial
    cotangents of replicated operands over the axis).
    """
    shards, (out, m, norm) = residuals
    sight = _sight(ring, shards)

    def zeros(x, p):
        return None if p is None else jnp.zeros_like(x)

    stays = chunked.Tangents(
        query=zeros(shards.q, present.query),
        bias=zeros(shards.bias, present.bias),
        scale=zeros(shards.scale, present.scale),
        concat_weight=zeros(shards.concat_score_weight, present.concat_weight),
    )
    travels = chunked.Tangents(
        key=zeros(shards.k, present.key), value=zeros(shards.v, present.value)
    )

    def pair_step(p: Pair, ops, _, carry):
        stays, travels = carry
        acc = stays._replace(
            query=_pick(stays.query, p.a),
            key=_pick(travels.key, p.b),
            value=_pick(travels.value, p.b),
            bias=_pair_slice(ring, stays.bias, p.a, p.k_id),
        )
        operands = chunked.Tangents(ops.q, ops.k, ops.v, ops.bias, ops.scale,
                                    ops.concat_score_weight)  # fmt: skip
        primals = chunked.Tangents(
            *(None if p is None else x for x, p in zip(operands, present, strict=True))
        )
        pair = chunked.Residuals(ops, out[p.a], m[p.a], norm[p.a])

        def compute(acc):
            (cts,) = jax.linear_transpose(
                lambda t: chunked.tangent(ring.pair, pair, t)[0], primals
            )(ct[p.a])
            return jax.tree.map(jnp.add, acc, cts)

        new = _maybe(ring, sight, ops, p.a, p.visible, m[p.a], compute, acc)
        bias = _pair_set(ring, stays.bias, p.a, p.k_id, new.bias)  # the block back
        stays = new._replace(query=_put(stays.query, p.a, new.query), key=None, value=None,
                             bias=bias)  # fmt: skip
        travels = travels._replace(
            key=_put(travels.key, p.b, new.key), value=_put(travels.value, p.b, new.value)
        )
        return stays, travels

    def travelling(carry, shift):
        stays, travels = carry
        return stays, _rotate(ring, travels, shift)

    need = _rest_needed(ring, sight, m)
    (stays, travels), steps = _steps(ring, shards, sight, pair_step, (), (stays, travels),
                                     lambda _: need, travelling)  # fmt: skip
    # After steps - 1 rotations the cotangents on device r are those of r - (steps - 1):
    # bring them home, forward or back, whichever is shorter.
    back = steps - 1
    forward = (ring.size - back) % ring.size
    shift, count = jnp.where(forward <= back, 1, -1), jnp.minimum(forward, back)

    def home(i, travels):
        def rotate(travels):
            return lax.cond(shift > 0, lambda t: _rotate(ring, t, 1),
                            lambda t: _rotate(ring, t, -1), travels)  # fmt: skip

        return lax.cond(i < count, rotate, lambda t: t, travels)

    travels = lax.fori_loop(0, ring.size // 2, home, travels)
    return stays._replace(key=travels.key, value=travels.value)


@dataclasses.dataclass(frozen=True)
class _TangentRing:
    """:func:`_tangent_ring` as a hashable map for :func:`linear_map`."""

    ring: Ring

    def __call__(self, residuals, tangents: chunked.Tangents) -> Array:
        return _tangent_ring(self.ring, residuals, tangents)


@dataclasses.dataclass(frozen=True)
class _TransposeRing:
    """:func:`_tangent_ring_transpose` as a hashable map for :func:`linear_map`."""

    ring: Ring
    present: chunked.Tangents  # True where the tangent is nonzero, else None

    def __call__(self, residuals, ct: Array) -> chunked.Tangents:
        return _tangent_ring_transpose(self.ring, self.present, residuals, ct)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _ring(ring: Ring, shards: Shards) -> Array:
    """This device's output ``[chunks, B, Cq * G, Dv]``."""
    return _ring_forward(ring, shards)[0][0]


@functools.partial(_ring.defjvp, symbolic_zeros=True)
def _ring_jvp(ring: Ring, primals, tangents):
    (shards,), (t_shards,) = primals, tangents
    results, _ = _ring_forward(ring, shards)
    out = results[0]

    def given(t):
        return None if isinstance(t, SymbolicZero) else t

    t = chunked.Tangents(
        query=given(t_shards.q),
        key=given(t_shards.k),
        value=given(t_shards.v),
        bias=None if shards.bias is None else given(t_shards.bias),
        scale=given(t_shards.scale),
        concat_weight=given(t_shards.concat_score_weight),
    )
    if all(x is None for x in t):
        return out, jnp.zeros_like(out)
    d_out = linear_map(_TangentRing(ring), _TransposeRing(ring, t.present()), (shards, results), t)
    return out, d_out


# -- layouts ----------------------------------------------------------------------------


def _zigzag_perms(n: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Where the natural chunks ``2r`` and ``2r + 1`` of device ``r`` go: chunk ``c`` to
    device ``c`` if ``c < n`` else ``2n - 1 - c``."""
    dest = lambda c: c if c < n else 2 * n - 1 - c  # noqa: E731
    return [(r, dest(2 * r)) for r in range(n)], [(r, dest(2 * r + 1)) for r in range(n)]


def _stack(ring: Ring, x: Array) -> Array:
    """``[B, chunks * C, ...]`` -> ``[chunks, B, C, ...]``."""
    x = x.reshape((x.shape[0], ring.chunks, x.shape[1] // ring.chunks, *x.shape[2:]))
    return jnp.moveaxis(x, 1, 0)


def _unstack(x: Array) -> Array:
    """``[chunks, B, C, ...]`` -> ``[B, chunks * C, ...]``."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape((x.shape[0], -1, *x.shape[3:]))


def _to_zigzag(ring: Ring, x: Array, axis: int) -> Array:
    """Natural chunks ``(2r, 2r+1)`` along ``axis`` -> zigzag chunks ``(r, 2n-1-r)``.

    An even device receives its first chunk from the even-chunk permutation, an odd one
    from the odd-chunk permutation; the other permutation brings the second chunk.
    """
    evens, odds = _zigzag_perms(ring.size)
    first, second = jnp.split(x, 2, axis=axis)
    from_even = lax.ppermute(first, ring.axis_name, evens)
    from_odd = lax.ppermute(second, ring.axis_name, odds)
    odd = lax.axis_index(ring.axis_name) % 2 == 1
    return jnp.concatenate(
        [jnp.where(odd, from_odd, from_even), jnp.where(odd, from_even, from_odd)], axis=axis
    )


def _from_zigzag(ring: Ring, x: Array, axis: int) -> Array:
    """The inverse of :func:`_to_zigzag`."""
    evens, odds = _zigzag_perms(ring.size)
    invert = lambda perm: [(dst, src) for src, dst in perm]  # noqa: E731
    first, second = jnp.split(x, 2, axis=axis)
    odd = lax.axis_index(ring.axis_name) % 2 == 1
    to_even = lax.ppermute(jnp.where(odd, second, first), ring.axis_name, invert(evens))
    to_odd = lax.ppermute(jnp.where(odd, first, second), ring.axis_name, invert(odds))
    return jnp.concatenate([to_even, to_odd], axis=axis)


def _from_rows(x: Array, perm: tuple[int, ...], batch: tuple[int, ...], g: int) -> Array:
    """The kernel's rows ``[B, T * G, ...]`` (batch dims in ``perm``'s order, query groups
    interleaved) -> ``[*batch, T, ...]``."""
    b, rest = x.shape[0], x.shape[2:]
    t = x.shape[1] // g
    x = jnp.swapaxes(x.reshape((b, t, g) + rest), 1, 2)
    x = x.reshape(tuple(batch[a] for a in perm) + (t,) + rest)
    inverse = tuple(int(a) for a in np.argsort(perm))
    return jnp.transpose(x, inverse + tuple(range(len(perm), x.ndim)))


# -- entry point ------------------------------------------------------------------------


def _check_layout(layout: Any, causal: bool, window: Window, tv: int) -> str:
    if layout is None:
        # A causal window of at most Tv / 4 keeps contiguous chunks balanced (every device
        # sees about ``left`` keys per query; max/mean work <= 1.14) and lets the ring stop
        # after ceil(left / C) + 1 steps; zig-zag chunks would need both neighbours.
        narrow = window is not None and window[0] is not None and 4 * window[0] <= tv
        return "zigzag" if causal and not narrow else "contiguous"
    if not any(layout is c or (type(layout) is str and layout == c) for c in LAYOUTS):
        raise ValueError(f"layout must be None or one of {LAYOUTS!r}; received layout={layout!r}.")
    return layout


def _divisor_at_most(length: int, block: int) -> int:
    """The largest divisor of ``length`` that is at most ``block``."""
    return max(d for d in range(1, block + 1) if length % d == 0)


class _Plan(NamedTuple):
    call: validation.CheckedCall  # with block sizes set, key/value shared or broadcast
    ring: Ring


def _varies(x: Array | None, axes: tuple[int, ...]) -> bool:
    """Whether ``x`` (batch rank as the inputs') differs along any of the batch ``axes``."""
    return x is not None and x.ndim > 0 and any(x.shape[a] != 1 for a in axes)


def _share_key_value(call: validation.CheckedCall) -> tuple[validation.CheckedCall, tuple]:
    """The call with key/value batch dims the queries share (grouped-query attention) kept
    at size 1, and those dims (the query groups). When key-side data differs between the
    queries sharing an entry (a value mask, ``kv_length``, ``kv_segment_ids`` or a
    ``query_offset`` per query head: rare), key and value are broadcast to the query's
    batch instead (a copy) and there are no groups."""
    inputs = call.inputs
    batch, kv_batch = inputs.query.shape[:-2], inputs.value.shape[:-2]
    axes = tuple(a for a, (n, m) in enumerate(zip(batch, kv_batch, strict=True)) if m == 1 != n)
    masking = inputs.masking
    key_side = (masking.value_mask, masking.kv_segment_ids, inputs.query_offset)
    if not axes or not any(_varies(x, axes) for x in key_side):
        return call, axes

    def full(x: Array | None) -> Array | None:
        return None if x is None else jnp.broadcast_to(x, batch + x.shape[-1:])

    inputs = inputs._replace(
        key=jnp.broadcast_to(inputs.key, batch + inputs.key.shape[-2:]),
        value=jnp.broadcast_to(inputs.value, batch + inputs.value.shape[-2:]),
        masking=masking._replace(
            value_mask=full(masking.value_mask), kv_segment_ids=full(masking.kv_segment_ids)
        ),
    )
    return call._replace(inputs=inputs), ()


def _plan(call: validation.CheckedCall, mesh: Any, axis_name: Any, layout: Any) -> _Plan:
    """Checks the ring's own arguments and fixes its settings for a checked call."""
    options = call.options
    block_sizes = options.block_size or BlockSizes.default(options.score_mode)
    call = call._replace(options=dataclasses.replace(options, block_size=block_sizes))
    n = check_mesh_axis(mesh, axis_name)
    inputs = call.inputs
    layout = _check_layout(layout, options.causal, options.window, inputs.value.shape[-2])
    parts = 2 * n if layout == "zigzag" else n
    for name, x in (("query", inputs.query), ("value", inputs.value)):
        length = x.shape[-2]
        if length % parts:
            raise ValueError(
                f"{name} length {'Tq' if name == 'query' else 'Tv'}={length} must be "
                f"divisible by {parts} ({'2 x ' if layout == 'zigzag' else ''}the size {n} "
                f"of mesh axis {axis_name!r}, layout={layout!r}); received {name} shape "
                f"{tuple(x.shape)}."
            )
    call, axes = _share_key_value(call)
    batch = call.inputs.query.shape[:-2]
    perm = tuple(a for a in range(len(batch)) if a not in axes) + axes
    g = math.prod(batch[a] for a in axes)
    cq, cv = inputs.query.shape[-2] // parts, inputs.value.shape[-2] // parts

    def rows(blocks: tuple[int, int]) -> tuple[int, int]:
        # Blocks that divide the chunks: second order differentiates the kernel's forward
        # pass as plain code (the ring's residuals), which gives NaN with padded key
        # blocks next to a bias and segment ids; whole blocks have no padding.
        bq, bk = chunked.clip_blocks(blocks, cq, cv)
        return _divisor_at_most(cq, bq) * g, _divisor_at_most(cv, bk)

    pair = chunked.Static(
        score_mode=options.score_mode,
        causal=options.causal,
        window=options.window,
        logits_soft_cap=options.logits_soft_cap,
        dropout_rate=options.applied_dropout_rate,
        batch=tuple(batch[a] for a in perm),
        tq=cq * g,
        tv=cv,
        forward_blocks=rows(block_sizes.forward),
        backward_blocks=rows(block_sizes.backward),
        precision=options.lax_precision,
        groups=g,
    )
    return _Plan(call, Ring(axis_name, n, layout == "zigzag", cq, cv, pair, perm))


class _StaticCall(NamedTuple):
    """The static part of a checked call (hashable): what :func:`_sharded` needs of it."""

    options: Any  # AttentionOptions, block sizes set
    dtype: Any
    compute_dtype: Any


class _Arrays(NamedTuple):
    """The global arrays a ring call reads (None where absent)."""

    query: Array  # [..., Tq, D]
    key: Array  # [..., Tv, D]
    value: Array  # [..., Tv, Dv]
    value_mask: Array | None  # [..., Tv]
    query_segment_ids: Array | None  # [..., Tq]
    kv_segment_ids: Array | None  # [..., Tv]
    attention_mask: Array | None  # [..., Tq | 1, Tv | 1]
    bias: Array | None  # [..., Tq | 1, Tv | 1]
    query_offset: Array | None  # [] or [...]
    scale: Array | None  # []
    concat_score_weight: Array | None  # []
    rng: Array | None


def _specs(ring: Ring, arrays: _Arrays) -> _Arrays:
    """How each array is split over the ring's axis: along its sequence axis (the
    queries' rows of a full mask or bias), the rest replicated."""
    axis = ring.axis_name

    def along(x: Array | None, dim: int) -> PartitionSpec | None:
        if x is None:
            return None
        spec = [None] * x.ndim
        if x.shape[dim] != 1:
            spec[dim] = axis
        return PartitionSpec(*spec)

    def replicated(x: Array | None) -> PartitionSpec | None:
        return None if x is None else PartitionSpec()

    sequence_axis = {"query": -2, "key": -2, "value": -2, "value_mask": -1,
                     "query_segment_ids": -1, "kv_segment_ids": -1, "attention_mask": -2,
                     "bias": -2}  # fmt: skip
    return _Arrays._make(
        along(x, sequence_axis[name]) if name in sequence_axis else replicated(x)
        for name, x in zip(_Arrays._fields, arrays, strict=True)
    )


def _shards(ring: Ring, call: _StaticCall, local: _Arrays) -> Shards:
    """This device's :class:`Shards` from its slices of the arrays (natural order)."""
    if ring.zigzag:

        def zigzag(x: Any, dim: int) -> Any:
            return x if x is None or x.shape[dim] == 1 else _to_zigzag(ring, x, dim)

        local = local._replace(
            query=zigzag(local.query, -2),
            key=zigzag(local.key, -2),
            value=zigzag(local.value, -2),
            value_mask=zigzag(local.value_mask, -1),
            query_segment_ids=zigzag(local.query_segment_ids, -1),
            kv_segment_ids=zigzag(local.kv_segment_ids, -1),
            attention_mask=zigzag(local.attention_mask, -2),
            bias=zigzag(local.bias, -2),
        )
    inputs = validation.AttentionInputs(
        query=local.query,
        key=local.key,
        value=local.value,
        query_mask=None,
        masking=Masking(
            local.value_mask, local.attention_mask, local.query_segment_ids, local.kv_segment_ids
        ),
        bias=local.bias,
        scale=local.scale,
        concat_score_weight=local.concat_score_weight,
        query_offset=local.query_offset,
        dtype=call.dtype,
        compute_dtype=call.compute_dtype,
    )
    static, ops = chunked.prepare(validation.CheckedCall(call.options, inputs, local.rng))
    assert static.groups == ring.pair.groups, (static.groups, ring.pair.groups)

    def stack(x: Any) -> Any:
        return None if x is None else _stack(ring, x)

    masking = ops.masking
    return Shards(
        q=stack(ops.q),
        k=stack(ops.k),
        v=stack(ops.v),
        value_mask=stack(masking.value_mask),
        q_segments=stack(masking.query_segment_ids),
        kv_segments=stack(masking.kv_segment_ids),
        attention_mask=masking.attention_mask,
        bias=ops.bias,
        offset=ops.key_offset,
        scale=ops.scale,
        concat_score_weight=ops.concat_score_weight,
        rng=ops.rng,
    )


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _sharded(ring: Ring, mesh: Any, call: _StaticCall, work: bool, arrays: _Arrays):
    """The ring on every device of the axis, the sequence sharded: the output
    ``[..., Tq, Dv]`` (sharded like the query), or with ``work`` each device's
    :class:`Work` ``int [n, 4]``. Jitted so that eager calls compile once; ``call`` holds
    the static settings only (its arrays are replaced by ``arrays``)."""
    nb = arrays.query.ndim - 2

    def local(local: _Arrays):
        batch = local.query.shape[:-2]
        shards = _shards(ring, call, local)
        if work:
            return jnp.stack(_ring_forward(ring, shards)[1])[None]  # [1, 4]
        out = _unstack(_ring(ring, shards))  # [B, chunks * Cq * G, Dv]
        out = _from_rows(out, ring.perm, batch, ring.pair.groups)  # [..., chunks * Cq, Dv]
        return _from_zigzag(ring, out, -2) if ring.zigzag else out  # [..., Tq / n, Dv]

    seq = PartitionSpec(*([None] * nb), ring.axis_name, None)  # [..., T, D]
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(_specs(ring, arrays),),
        out_specs=PartitionSpec(ring.axis_name) if work else seq,
        axis_names=frozenset({ring.axis_name}),
        check_vma=False,
    )(arrays)


def _run(plan: _Plan, mesh: Any, work: bool = False) -> Array:
    call, inputs = plan.call, plan.call.inputs
    masking = inputs.masking
    offset = inputs.query_offset
    arrays = _Arrays(
        query=inputs.query,
        key=inputs.key,
        value=inputs.value,
        value_mask=masking.value_mask,
        query_segment_ids=masking.query_segment_ids,
        kv_segment_ids=masking.kv_segment_ids,
        attention_mask=masking.attention_mask,
        bias=inputs.bias,
        query_offset=None if offset is None else jnp.asarray(offset),
        scale=inputs.scale,
        concat_score_weight=inputs.concat_score_weight,
        rng=call.dropout_rng,
    )
    static = _StaticCall(call.options, inputs.dtype, inputs.compute_dtype)
    return _sharded(plan.ring, mesh, static, work, arrays)


def ring_attention(
    params: Params,
    query: Array,
    value: Array,
    key: Array | None = None,
    masks: Masks = None,
    causal: bool = False,
    *,
    mesh: Mesh,
    axis_name: str,
    attention_mask: Array | None = None,
    bias: Array | None = None,
    segment_ids: tuple[Array, Array] | None = None,
    query_offset: int | Array | None = None,
    kv_length: int | Array | None = None,
    window: Window = None,
    logits_soft_cap: float | None = None,
    score_mode: ScoreMode = "dot",
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    deterministic: bool | None = None,
    precision: PrecisionLike = None,
    block_size: BlockSizeLike = None,
    layout: Layout | None = None,
) -> Array:
    """:func:`dot_attention` with queries, keys and values sharded along the sequence.

    Same semantics and arguments as :func:`dot_attention`, with global positions, except
    ``return_attention_scores`` (the ``[..., Tq, Tv]`` weights are what the ring never
    forms), ``implementation`` (every step runs the chunked kernel), and ``score_mod`` and
    ``mask_mod``, not taken yet (their closed-over arrays would have to travel with the
    key shards; :func:`sequence_parallel_attention` takes them). The sequence axes
    (``Tq`` of the query, its mask and segment ids; ``Tv`` of key, value and theirs) are
    split over the ``n`` devices of mesh axis ``axis_name``; every device keeps its
    queries while the key/value shards circulate around the ring, so each device holds
    O(T / n) activations in the forward pass and in both derivative modes. A full
    ``attention_mask`` or ``bias`` ``[..., Tq, Tv]`` is split along ``Tq`` only: each
    device holds its queries' rows, which are all it needs, and nothing of it travels.
    Inputs and output are global arrays in natural order (sharded or not); other mesh
    axes (e.g. ``"data"`` over the batch) are left to the compiler, so batch sharding
    composes. Grouped-query attention (key/value batch dims of size 1 against the
    query's) shares each key/value shard among its query group, without repeating it.

    Layouts: ``"contiguous"`` gives device ``r`` the ``r``-th of ``n`` slices; ``"zigzag"``
    cuts the sequence into ``2n`` chunks and gives device ``r`` chunks ``r`` and
    ``2n-1-r``, which balances causal work (reordered inside, invisible outside). A
    (query chunk, key chunk) pair that no query can see (causality, ``window``, offsets,
    value mask, segment id ranges, full mask) is skipped when that is exact, and the
    ring stops early when every later step would be skipped: a causal window of
    ``w <= T / n`` runs two ring steps (contiguous layout, the default for a causal
    window of at most ``Tv / 4``). Dropout draws an independent pattern per (query
    chunk, key chunk) pair, so it differs from one device's pattern (same statistics).

    Derivatives: ``jax.grad``/``jax.vjp`` (the backward pass is a ring too: key/value
    cotangents travel with their shard), ``jax.jvp``, ``jax.vmap`` of either
    (``jacfwd``, ``jacrev``, per-example gradients) and second order, with respect to
    query, key, value, bias and the params. A vmapped derivative vectorises the rings
    op by op, so putting the mapped axis into the batch dims ``...`` is cheaper.

    Args:
      params: see :func:`dot_attention`.
      query: ``[..., Tq, D]``; ``Tq`` divisible by ``n`` (contiguous) or ``2n`` (zigzag).
      value: ``[..., Tv, Dv]``; ``Tv`` divisible likewise. ``Tq != Tv`` is allowed, also
        with ``causal`` (top-left aligned, as :func:`dot_attention`). Batch dims
        broadcast against the query's as in :func:`dot_attention`.
      key: ``[..., Tv, D]`` or None.
      masks: None or ``(query_mask [..., Tq], value_mask [..., Tv])``.
      causal: Python bool; the mask compares global positions.
      mesh: the ``jax.sharding.Mesh`` (with every process's devices when running across
        processes).
      axis_name: the mesh axis that carries the ring.
      attention_mask, bias, segment_ids, query_offset, kv_length, window: see
        :func:`dot_attention` (global positions).
      logits_soft_cap: see :func:`dot_attention` (each step caps its logits; a skipped
        step's bound holds for capped logits too, which are never larger).
      score_mode, dropout_rate, dropout_rng, deterministic, precision, block_size: see
        :func:`dot_attention`; ``block_size`` sets the kernel's blocks inside each chunk.
      layout: None (``"zigzag"`` when causal, unless a window of at most ``Tv / 4``
        keys to the left makes ``"contiguous"`` both balanced and shorter; else
        ``"contiguous"``), ``"contiguous"`` or ``"zigzag"``.

    Returns:
      ``[..., Tq, Dv]``, sharded like the query along ``Tq``.

    Raises:
      ValueError: for everything :func:`dot_attention` rejects, an unknown ``axis_name``
        or ``layout``, or lengths not divisible as above.
      TypeError: for an argument it does not take (``return_attention_scores``,
        ``implementation``, or any other name).

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from jax.sharding import Mesh
      >>> from flax_dotattn import dot_attention, ring_attention
      >>> mesh = Mesh(np.array(jax.devices()[:1]), ("seq",))
      >>> q, v = jnp.ones((2, 4, 3)), jnp.arange(48.0).reshape(2, 8, 3) / 48
      >>> ids = (jnp.array([[0, 0, 1, 1]] * 2), jnp.array([[0, 0, 0, 0, 1, 1, 1, 1]] * 2))
      >>> out = ring_attention(None, q, v, causal=True, segment_ids=ids, mesh=mesh,
      ...                      axis_name="seq")
      >>> want = dot_attention(None, q, v, causal=True, segment_ids=ids)
      >>> bool(jnp.allclose(out, want, atol=1e-6))
      True
    """
    plan = _plan(validation.check_call(locals()), mesh, axis_name, layout)
    empty = validation.empty_output(plan.call.inputs)
    if empty is not None:  # nothing to attend over: zeros, as one device
        return empty
    return validation.finish(_run(plan, mesh), plan.call.inputs)


#: Read once at import: documentation tools may later replace ``__signature__``.
_SIGNATURE = inspect.signature(ring_attention)


def ring_work(*args: Any, **kwargs: Any) -> dict[str, np.ndarray]:
    """What each device computes in :func:`ring_attention` (same arguments), counted where
    the ring decides, for tests and benchmarks: ``int [n]`` arrays

    * ``steps``: ring steps of the forward pass (key/value shards received, plus one);
    * ``pairs``: (query chunk, key chunk) pairs run through the kernel;
    * ``blocks``: kernel blocks of those pairs that hold a visible (query, key) pair by
      position (causal, window): those the kernel computes when every row sees a key;
    * ``derivative_steps``: steps of the tangent and transpose rings (reverse and
      forward mode).
    """
    bound = _SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    arguments = bound.arguments
    call = validation.check_call(arguments)
    plan = _plan(call, arguments["mesh"], arguments["axis_name"], arguments["layout"])
    counts = np.asarray(_run(plan, arguments["mesh"], work=True))  # [n, 4]
    return {name: counts[:, i] for i, name in enumerate(Work._fields)}


def blocks_per_device(*args: Any, **kwargs: Any) -> np.ndarray:
    """Kernel blocks each device computes in one forward pass of :func:`ring_attention`
    (same arguments): ``int [n]``, for benchmarks (see :func:`ring_work`)."""
    return ring_work(*args, **kwargs)["blocks"]
