"""Ring (context-parallel) attention: queries, keys and values sharded along the sequence.

Each of the ``n`` devices of a mesh axis keeps its shard of the queries. The key/value
shards (with their value-mask shards) travel around the ring with ``lax.ppermute``: at
step ``s`` device ``r`` holds the shard of device ``r - s``, runs the chunked kernel on
(its queries, that shard) and merges the result into its running softmax statistics
(row max ``m``, normaliser ``l`` and weighted sum), exactly as the online softmax of one
device does across its key blocks. After ``n`` steps every query has seen every key.

Derivatives. The ring is a ``jax.custom_jvp``: its tangent is a second ring that rotates
the key/value tangents with their shards and, per (query shard, key shard) pair, runs the
kernel's tangent with the *final* row statistics. That tangent is linear in the input
tangents; it is wrapped in ``linear_map`` with a hand-written transpose, a third ring in
which the cotangents of each key/value shard ride along with the shard (one more rotation
brings them home). Reverse mode therefore never stacks per-step residuals: the forward,
the tangent and the backward pass each hold O(T / n) activations per device (the shards,
the output, ``(m, l)``, the visiting shard and its cotangents with their receive
buffers), plus the kernel's working set for one pair. ``linear_map`` differentiates its
residuals and batches (by vectorising the rings), so derivatives vmap (per-example
gradients, ``jacfwd``/``jacrev``) and second order works.

Layouts. ``"contiguous"``: device ``r`` holds positions ``[r T/n, (r+1) T/n)``. With a
causal mask that leaves device 0 with one shard pair of work and device ``n-1`` with
``n``. ``"zigzag"`` cuts the sequence into ``2n`` chunks and gives device ``r`` chunks
``r`` and ``2n-1-r``: one early and one late chunk, so each device does the same work.
Inputs and outputs stay in natural order; the reordering is two ``ppermute`` s each way
inside the ``shard_map``. A (query chunk, key chunk) pair whose keys all lie in the future
of its queries is skipped when that is provably exact (the kernel's own bound test, at
shard level, against the rows' running max), otherwise it is computed.

Shape glossary: ``...`` batch dims, ``Tq``/``Tv`` query/key lengths, ``D`` query/key
depth, ``Dv`` value depth, ``B`` the flattened batch, ``n`` the size of the mesh axis,
``C`` (``Cq``/``Cv``) a chunk's length: ``T / n`` (contiguous) or ``T / (2n)`` (zigzag).
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
from flax_dotattn._src.types import Array, BlockSizeLike, Masks, Params, PrecisionLike, ScoreMode

Layout = Literal["contiguous", "zigzag"]
LAYOUTS: tuple[str, ...] = ("contiguous", "zigzag")


class Ring(NamedTuple):
    """Static settings of one ring call (hashable)."""

    axis_name: Any
    size: int  # n, devices on the ring
    zigzag: bool  # two chunks per device (r and 2n-1-r) instead of one (r)
    cq: int  # query chunk length Cq
    cv: int  # key/value chunk length Cv
    pair: chunked.Static  # the kernel's settings for one (query chunk, key chunk) pair

    @property
    def chunks(self) -> int:
        """Chunks per device."""
        return 2 if self.zigzag else 1


class Shards(NamedTuple):
    """One device's operands, batch flattened to ``B``, its chunks stacked in front."""

    q: Array  # [chunks, B, Cq, D]
    k: Array  # [chunks, B, Cv, D]
    v: Array  # [chunks, B, Cv, Dv]
    value_mask: Array | None  # bool [chunks, B, Cv]
    scale: Array | None  # []
    concat_score_weight: Array | None  # []
    rng: Array | None  # dropout key


# -- bookkeeping ------------------------------------------------------------------------


def chunk_id(ring: Ring, device: Any, a: Any) -> Any:
    """Global index of the ``a``-th chunk that ``device`` holds (``a``, ``device`` may be
    traced): ``device`` (contiguous), or ``device`` then ``2n - 1 - device`` (zigzag)."""
    if not ring.zigzag:
        return device
    return jnp.where(a == 0, device, 2 * ring.size - 1 - device)


def _rotate(ring: Ring, tree: Any) -> Any:
    """Sends every leaf of ``tree`` one step along the ring (device r -> r + 1)."""
    perm = [(i, (i + 1) % ring.size) for i in range(ring.size)]
    return jax.tree.map(lambda x: lax.ppermute(x, ring.axis_name, perm), tree)


def _steps(ring: Ring, shards: Shards, pair_step: Callable, extra: Any, carry: Any,
           travelling: Callable = lambda c: c) -> Any:  # fmt: skip
    """Runs ``carry = pair_step(a, b, ops, extra_b, carry)`` for every ring step and every
    pair of (query chunk ``a``, visiting key chunk ``b``): ``ops`` are the pair's kernel
    operands, ``extra_b`` chunk ``b`` of each leaf of ``extra`` (stacked like the keys,
    e.g. their tangents), which travels with the keys and values.

    ``travelling(carry)`` is the part of ``carry`` that rotates along with them (e.g. the
    visiting shard's cotangents). ``n - 1`` rotations: the last step sends nothing. The
    pairs of one step run in a loop, so the kernel is traced twice per ring, not per pair.
    """
    me = lax.axis_index(ring.axis_name)

    def step(index, visiting, carry):
        k, v, vm, extra = visiting
        local = shards._replace(k=k, v=v, value_mask=vm)
        source = (me - index) % ring.size  # whose key/value chunks are visiting

        def pair(p, carry):
            a, b = divmod(p, ring.chunks)
            ops = _pair(ring, local, chunk_id(ring, me, a), chunk_id(ring, source, b), a, b)
            return pair_step(a, b, ops, jax.tree.map(lambda x: x[b], extra), carry)

        if ring.chunks == 1:
            return pair(0, carry)
        return lax.fori_loop(0, ring.chunks**2, pair, carry)

    def body(index, state):
        visiting, carry = state
        carry = step(index, visiting, carry)
        return _rotate(ring, visiting), travelling(carry)

    visiting = (shards.k, shards.v, shards.value_mask, extra)
    visiting, carry = lax.fori_loop(0, ring.size - 1, body, (visiting, carry))
    return step(ring.size - 1, visiting, carry)


def _pair(ring: Ring, shards: Shards, q_id, k_id, a, b) -> chunked.Operands:
    """The kernel's operands for query chunk ``a`` (global index ``q_id``) against the
    visiting key chunk ``b`` (``k_id``): causal compares global positions through
    ``key_offset``; dropout draws from the rng folded with both global indices."""
    rng = shards.rng
    if rng is not None:
        rng = jax.random.fold_in(jax.random.fold_in(rng, q_id), k_id)
    return chunked.Operands(
        q=shards.q[a],
        k=shards.k[b],
        v=shards.v[b],
        masking=Masking(value_mask=None if shards.value_mask is None else shards.value_mask[b]),
        bias=None,
        key_offset=jnp.asarray(k_id * ring.cv - q_id * ring.cq, jnp.int32),
        scale=shards.scale,
        concat_score_weight=shards.concat_score_weight,
        rng=rng,
    )


def _maybe(ring: Ring, ops: chunked.Operands, row_max: Array, compute: Callable, carry: Any):
    """``compute(carry)``, or ``carry`` when the pair provably cannot contribute.

    Causal only: a pair is skipped when all its keys lie in the future of all its queries
    *and* their masked logits (at most ``bound - 1e9``, the kernel's bound) are so far
    below every row's max so far (``row_max [B, Cq]``) that their softmax weights are
    exactly 0. Rows that see no key (Keras: they average over every key) keep the pair.
    """
    if not ring.pair.causal:
        return compute(carry)
    all_future = ops.key_offset > ring.cq - 1
    q_bound, k_bound = chunked.logit_bounds(ring.pair, ops)  # [B, Cq], [B, Cv]
    top = q_bound * k_bound.max(-1)[:, None] - MASK_PENALTY  # [B, Cq]
    skip = jnp.logical_and(all_future, jnp.all(chunked.negligible(top, row_max)))
    return lax.cond(skip, lambda c: c, compute, carry)


def _blocks_computed(ring: Ring, key_offset: Array) -> Array:
    """Kernel blocks of one pair that hold a visible (query, key) pair: those the kernel
    computes when every row sees a key (its bound test skips the others)."""
    static = ring.pair
    block_q, block_k = static.forward_blocks
    n_q, n_k = -(-static.tq // block_q), -(-static.tv // block_k)
    if not static.causal:
        return jnp.int32(n_q * n_k)
    i = jnp.arange(n_q)[:, None]
    j = jnp.arange(n_k)[None, :]
    return jnp.sum(key_offset + j * block_k <= (i + 1) * block_q - 1, dtype=jnp.int32)


# -- forward ----------------------------------------------------------------------------


def _merge(stats, out, m, norm):
    """Merges a pair's ``out [B, Cq, Dv]``, ``m, l [B, Cq]`` into the running ``(m, l,
    acc)`` (``acc`` the unnormalised weighted sum), as the sharded merge does."""
    m_run, l_run, acc = stats
    top = jnp.maximum(m_run, m)  # [B, Cq]
    alpha, beta = jnp.exp(m_run - top), jnp.exp(m - top)
    acc = acc * alpha[..., None] + out * (norm * beta)[..., None]  # [B, Cq, Dv]
    return top, l_run * alpha + norm * beta, acc


def _ring_forward(ring: Ring, shards: Shards) -> tuple[tuple[Array, Array, Array], Array]:
    """``(out [chunks, B, Cq, Dv], m, l [chunks, B, Cq])`` and the kernel blocks this
    device computed (int32 [])."""
    dtype, dv = shards.q.dtype, shards.v.shape[-1]
    rows = shards.q.shape[:-1]  # [chunks, B, Cq]
    init = (
        jnp.full(rows, -jnp.inf, dtype),  # running max m
        jnp.zeros(rows, dtype),  # running normaliser l
        jnp.zeros((*rows, dv), dtype),  # running weighted sum
    )

    def pair_step(a, b, ops, _, carry):
        stats, work = carry
        row = tuple(x[a] for x in stats)

        def compute(state):
            row, work = state
            out, m, norm = chunked.forward(ring.pair, ops)
            return _merge(row, out, m, norm), work + _blocks_computed(ring, ops.key_offset)

        row, work = _maybe(ring, ops, row[0], compute, (row, work))
        return tuple(x.at[a].set(y) for x, y in zip(stats, row, strict=True)), work

    (m, norm, acc), work = _steps(ring, shards, pair_step, (), (init, jnp.int32(0)))
    return (acc / norm[..., None], m, norm), work


# -- derivatives ------------------------------------------------------------------------
# The tangent is linear in the named tangents (query, key, value and the scalars; the ring
# takes no bias); fields that are None are zero and do not travel. Every pair uses the
# *final* ``(out, m, l)`` of its rows, so the pairs' ``A - c * out`` (see the kernel's
# tangent) add up to the row's ``sum(A) - sum(c) * out``: the exact JVP.


def _tangent_ring(ring: Ring, residuals, t: chunked.Tangents) -> Array:
    """The JVP of the ring's output ``[chunks, B, Cq, Dv]``; k/v tangents travel along."""
    shards, (out, m, norm) = residuals

    def pair_step(a, b, ops, visiting, d_out):
        key, value = visiting
        query = None if t.query is None else t.query[a]
        tangents = t._replace(query=query, key=key, value=value)
        pair = chunked.Residuals(ops, out[a], m[a], norm[a])

        def compute(acc):
            return acc + chunked.tangent(ring.pair, pair, tangents)[0]

        return d_out.at[a].set(_maybe(ring, ops, m[a], compute, d_out[a]))

    return _steps(ring, shards, pair_step, (t.key, t.value), jnp.zeros_like(out))


def _pick(x: Array | None, i: Any) -> Array | None:
    return None if x is None else x[i]


def _put(x: Array | None, i: Any, y: Array | None) -> Array | None:
    return None if x is None else x.at[i].set(y)


def _tangent_ring_transpose(
    ring: Ring, present: chunked.Tangents, residuals, ct: Array
) -> chunked.Tangents:
    """The transpose of :func:`_tangent_ring` (reverse mode): a third ring.

    The cotangents of each key/value shard ride along with the shard and reach their owner
    by one more rotation at the end; those of the queries and of the scalars accumulate in
    place (``shard_map`` sums the scalars' partial cotangents over the axis).
    """
    shards, (out, m, norm) = residuals

    def zeros(x, p):
        return None if p is None else jnp.zeros_like(x)

    stays = chunked.Tangents(
        query=zeros(shards.q, present.query),
        scale=zeros(shards.scale, present.scale),
        concat_weight=zeros(shards.concat_score_weight, present.concat_weight),
    )
    travels = chunked.Tangents(
        key=zeros(shards.k, present.key), value=zeros(shards.v, present.value)
    )

    def pair_step(a, b, ops, _, carry):
        stays, travels = carry
        acc = stays._replace(
            query=_pick(stays.query, a), key=_pick(travels.key, b), value=_pick(travels.value, b)
        )
        operands = chunked.Tangents(ops.q, ops.k, ops.v, None, ops.scale, ops.concat_score_weight)
        primals = chunked.Tangents(
            *(None if p is None else x for x, p in zip(operands, present, strict=True))
        )
        pair = chunked.Residuals(ops, out[a], m[a], norm[a])

        def compute(acc):
            (cts,) = jax.linear_transpose(
                lambda t: chunked.tangent(ring.pair, pair, t)[0], primals
            )(ct[a])
            return jax.tree.map(jnp.add, acc, cts)

        new = _maybe(ring, ops, m[a], compute, acc)
        stays = new._replace(query=_put(stays.query, a, new.query), key=None, value=None)
        travels = travels._replace(
            key=_put(travels.key, b, new.key), value=_put(travels.value, b, new.value)
        )
        return stays, travels

    def travelling(carry):
        stays, travels = carry
        return stays, _rotate(ring, travels)

    # The last rotation brings the key/value cotangents home.
    stays, travels = travelling(_steps(ring, shards, pair_step, (), (stays, travels), travelling))
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
    """This device's output ``[chunks, B, Cq, Dv]``."""
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


def _to_zigzag(ring: Ring, x: Array) -> Array:
    """``[B, 2C, ...]`` natural chunks ``(2r, 2r+1)`` -> zigzag chunks ``(r, 2n-1-r)``.

    An even device receives its first chunk from the even-chunk permutation, an odd one
    from the odd-chunk permutation; the other permutation brings the second chunk.
    """
    evens, odds = _zigzag_perms(ring.size)
    first, second = jnp.split(x, 2, axis=1)
    from_even = lax.ppermute(first, ring.axis_name, evens)
    from_odd = lax.ppermute(second, ring.axis_name, odds)
    odd = lax.axis_index(ring.axis_name) % 2 == 1
    return jnp.concatenate(
        [jnp.where(odd, from_odd, from_even), jnp.where(odd, from_even, from_odd)], axis=1
    )


def _from_zigzag(ring: Ring, x: Array) -> Array:
    """The inverse of :func:`_to_zigzag`."""
    evens, odds = _zigzag_perms(ring.size)
    invert = lambda perm: [(dst, src) for src, dst in perm]  # noqa: E731
    first, second = jnp.split(x, 2, axis=1)
    odd = lax.axis_index(ring.axis_name) % 2 == 1
    to_even = lax.ppermute(jnp.where(odd, second, first), ring.axis_name, invert(evens))
    to_odd = lax.ppermute(jnp.where(odd, first, second), ring.axis_name, invert(odds))
    return jnp.concatenate([to_even, to_odd], axis=1)


# -- entry point ------------------------------------------------------------------------


def _check_layout(layout: Any, causal: bool) -> str:
    if layout is None:
        return "zigzag" if causal else "contiguous"
    if not any(layout is c or (type(layout) is str and layout == c) for c in LAYOUTS):
        raise ValueError(f"layout must be None or one of {LAYOUTS!r}; received layout={layout!r}.")
    return layout


class _Plan(NamedTuple):
    inputs: validation.AttentionInputs
    ring: Ring
    dropout_rng: Array | None


def _plan(call: validation.CheckedCall, mesh: Any, axis_name: Any, layout: Any) -> _Plan:
    """Checks the ring's own arguments and fixes its settings for a checked call."""
    options, inputs = call.options, call.inputs
    block_sizes = options.block_size or BlockSizes.default(options.score_mode)
    n = check_mesh_axis(mesh, axis_name)
    layout = _check_layout(layout, options.causal)
    parts = 2 * n if layout == "zigzag" else n
    if inputs.key.shape[:-2] != inputs.query.shape[:-2]:
        raise ValueError(
            "ring_attention needs key/value batch dims equal to the query's (it does not "
            "broadcast them: grouped-query attention runs in dot_attention and "
            "sequence_parallel_attention); received query shape "
            f"{tuple(inputs.query.shape)} and key shape {tuple(inputs.key.shape)}."
        )
    for name, x in (("query", inputs.query), ("value", inputs.value)):
        length = x.shape[-2]
        if length % parts:
            raise ValueError(
                f"{name} length {'Tq' if name == 'query' else 'Tv'}={length} must be "
                f"divisible by {parts} ({'2 x ' if layout == 'zigzag' else ''}the size {n} "
                f"of mesh axis {axis_name!r}, layout={layout!r}); received {name} shape "
                f"{tuple(x.shape)}."
            )
    cq, cv = inputs.query.shape[-2] // parts, inputs.value.shape[-2] // parts
    pair = chunked.Static(
        score_mode=options.score_mode,
        causal=options.causal,
        window=None,
        dropout_rate=options.applied_dropout_rate,
        batch=(),  # used only to broadcast a full mask or bias, which the ring has none of
        tq=cq,
        tv=cv,
        forward_blocks=chunked.clip_blocks(block_sizes.forward, cq, cv),
        backward_blocks=chunked.clip_blocks(block_sizes.backward, cq, cv),
        precision=options.lax_precision,
    )
    ring = Ring(axis_name, n, layout == "zigzag", cq, cv, pair)
    return _Plan(inputs, ring, call.dropout_rng)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _sharded(ring: Ring, mesh: Any, compute_dtype: Any, work: bool, *arrays: Any):
    """The ring on every device of the axis, the sequence sharded: the output
    ``[..., Tq, Dv]`` (sharded like the query), or with ``work`` the kernel blocks each
    device computes ``int [n]``. Jitted so that eager calls compile once."""
    nb = arrays[0].ndim - 2
    seq = PartitionSpec(*([None] * nb), ring.axis_name, None)  # [..., T, D]
    seq_mask = PartitionSpec(*([None] * nb), ring.axis_name)  # [..., T]

    def local(q, k, v, vm, scale, cw, rng):
        batch = q.shape[:-2]
        b = math.prod(batch)
        q, k, v = (x.reshape((b, *x.shape[-2:])) for x in (q, k, v))
        vm = None if vm is None else vm.reshape((b, vm.shape[-1]))
        if ring.zigzag:
            q, k, v = (_to_zigzag(ring, x) for x in (q, k, v))
            vm = None if vm is None else _to_zigzag(ring, vm)
        q, k, v = (_stack(ring, x).astype(compute_dtype) for x in (q, k, v))
        shards = Shards(
            q=q,  # [chunks, B, Cq, D]
            k=k,  # [chunks, B, Cv, D]
            v=v,  # [chunks, B, Cv, Dv]
            value_mask=None if vm is None else _stack(ring, vm),  # [chunks, B, Cv]
            scale=None if scale is None else scale.astype(compute_dtype),
            concat_score_weight=None if cw is None else cw.astype(compute_dtype),
            rng=rng,
        )
        if work:
            return _ring_forward(ring, shards)[1][None]  # [1]
        out = _unstack(_ring(ring, shards))  # [B, chunks * Cq, Dv]
        if ring.zigzag:
            out = _from_zigzag(ring, out)
        return out.reshape((*batch, *out.shape[1:]))  # [..., Tq / n, Dv]

    in_specs = (seq, seq, seq, None if arrays[3] is None else seq_mask) + (PartitionSpec(),) * 3
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=in_specs,
        out_specs=PartitionSpec(ring.axis_name) if work else seq,
        axis_names=frozenset({ring.axis_name}),
        check_vma=False,
    )(*arrays)


def _run(plan: _Plan, mesh: Any, work: bool = False) -> Array:
    inputs = plan.inputs
    arrays = (inputs.query, inputs.key, inputs.value, inputs.masking.value_mask, inputs.scale,
              inputs.concat_score_weight, plan.dropout_rng)  # fmt: skip
    return _sharded(plan.ring, mesh, inputs.compute_dtype, work, *arrays)


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
    score_mode: ScoreMode = "dot",
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    deterministic: bool | None = None,
    precision: PrecisionLike = None,
    block_size: BlockSizeLike = None,
    layout: Layout | None = None,
) -> Array:
    """:func:`dot_attention` with queries, keys and values sharded along the sequence.

    Same semantics as :func:`dot_attention` and its arguments up to ``causal``, plus
    ``score_mode``, dropout, ``precision`` and ``block_size`` (the weights cannot be
    returned). ``attention_mask``, ``bias``, ``segment_ids``, ``window``, ``query_offset``,
    ``kv_length``, ``logits_soft_cap``, ``score_mod`` and ``mask_mod`` are not taken here;
    :func:`sequence_parallel_attention` takes them all. The sequence axes (``Tq`` of the
    query, ``Tv`` of key, value and their masks) are split over the ``n`` devices of
    mesh axis ``axis_name``; every device keeps its queries while the key/value shards
    circulate around the ring, so each device holds O(T / n) activations in the forward pass
    and in both derivative modes. Inputs and output are global arrays in natural order
    (sharded or not); other mesh axes (e.g. ``"data"`` over the batch) are left to the
    compiler, so batch sharding composes.

    Layouts: ``"contiguous"`` gives device ``r`` the ``r``-th of ``n`` slices; ``"zigzag"``
    cuts the sequence into ``2n`` chunks and gives device ``r`` chunks ``r`` and
    ``2n-1-r``, which balances causal work (reordered inside, invisible outside). Key
    chunks entirely in the future of a query chunk are skipped when that is exact.
    Dropout draws an independent pattern per (query chunk, key chunk) pair, so it differs
    from one device's pattern (same statistics).

    Derivatives: ``jax.grad``/``jax.vjp`` (the backward pass is a ring too: key/value
    cotangents travel with their shard), ``jax.jvp``, ``jax.vmap`` of either
    (``jacfwd``, ``jacrev``, per-example gradients) and second order. A vmapped
    derivative vectorises the rings op by op, so putting the mapped axis into the batch
    dims ``...`` is cheaper.

    Args:
      params: see :func:`dot_attention`.
      query: ``[..., Tq, D]``; ``Tq`` divisible by ``n`` (contiguous) or ``2n`` (zigzag).
      value: ``[..., Tv, Dv]``; ``Tv`` divisible likewise. ``Tq != Tv`` is allowed, also
        with ``causal`` (top-left aligned, as :func:`dot_attention`).
      key: ``[..., Tv, D]`` or None.
      masks: None or ``(query_mask [..., Tq], value_mask [..., Tv])``.
      causal: Python bool; the mask compares global positions.
      mesh: the ``jax.sharding.Mesh`` (with every process's devices when running across
        processes).
      axis_name: the mesh axis that carries the ring.
      score_mode, dropout_rate, dropout_rng, deterministic, precision, block_size: see
        :func:`dot_attention`; ``block_size`` sets the kernel's blocks inside each chunk.
      layout: None (``"zigzag"`` when causal, else ``"contiguous"``), ``"contiguous"`` or
        ``"zigzag"``.

    Returns:
      ``[..., Tq, Dv]``, sharded like the query along ``Tq``.

    Raises:
      ValueError: for everything :func:`dot_attention` rejects, an unknown ``axis_name``
        or ``layout``, or lengths not divisible as above.

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from jax.sharding import Mesh
      >>> from flax_dotattn import dot_attention, ring_attention
      >>> mesh = Mesh(np.array(jax.devices()[:1]), ("seq",))
      >>> q, v = jnp.ones((2, 4, 3)), jnp.arange(48.0).reshape(2, 8, 3) / 48
      >>> out = ring_attention(None, q, v, causal=True, mesh=mesh, axis_name="seq")
      >>> bool(jnp.allclose(out, dot_attention(None, q, v, causal=True), atol=1e-6))
      True
    """
    plan = _plan(validation.check_call(locals()), mesh, axis_name, layout)
    empty = validation.empty_output(plan.inputs)
    if empty is not None:  # nothing to attend over: zeros, as one device
        return empty
    return validation.finish(_run(plan, mesh), plan.inputs)


#: Read once at import: documentation tools may later replace ``__signature__``.
_SIGNATURE = inspect.signature(ring_attention)


def blocks_per_device(*args: Any, **kwargs: Any) -> np.ndarray:
    """Kernel blocks each device computes in one forward pass of :func:`ring_attention`
    (same arguments): ``int [n]``, for benchmarks.

    Measured where the ring decides: pairs it skips are not counted. Inside a computed
    pair, the blocks holding a visible (query, key) pair are counted: those the kernel
    computes when every row sees a key (its bound test skips the others).
    """
    bound = _SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    arguments = bound.arguments
    call = validation.check_call(arguments)
    plan = _plan(call, arguments["mesh"], arguments["axis_name"], arguments["layout"])
    return np.asarray(_run(plan, arguments["mesh"], work=True))
