"""Sequence parallelism: keys and values sharded along ``Tv`` across a mesh axis.

Each device holds all queries and one contiguous shard of the keys/values. It runs the
chunked kernel on its shard, returning its output and softmax statistics (row max ``m``
and log-normaliser ``log_l``), and the shards are merged exactly::

    w_s = exp(m_s - M + log_l_s),  M = max_s m_s
    out = sum_s w_s * out_s / sum_s w_s

which is the softmax over all keys (Keras's masking rule and fully masked rows
included). Gradients flow through the kernel's custom JVP (transposed by hand in
reverse mode) and ``shard_map``.

Shape glossary: ``...`` batch dims, ``Tq``/``Tv`` query/key lengths, ``D`` query/key depth,
``Dv`` value depth, ``n`` the size of the mesh axis.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from flax_dotattn._src import dispatch, validation
from flax_dotattn._src.kernels import chunked, pallas_tpu
from flax_dotattn._src.types import (
    Array,
    BlockSizeLike,
    MaskMod,
    Masks,
    Params,
    PrecisionLike,
    ScoreMod,
    ScoreMode,
    Window,
)


def check_mesh_axis(mesh: Any, axis_name: Any) -> int:
    """Checks that ``mesh`` is a ``Mesh`` with an axis ``axis_name``; returns its size."""
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh; received a {type(mesh).__name__}.")
    if axis_name not in mesh.shape:
        raise ValueError(
            f"axis_name must be one of the mesh axes {tuple(mesh.shape)}; "
            f"received axis_name={axis_name!r}."
        )
    return mesh.shape[axis_name]


def sequence_parallel_attention(
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
    score_mod: ScoreMod | None = None,
    mask_mod: MaskMod | None = None,
    score_mode: ScoreMode = "dot",
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    deterministic: bool | None = None,
    precision: PrecisionLike = None,
    block_size: BlockSizeLike = None,
) -> Array:
    """:func:`dot_attention` with keys/values sharded along ``Tv`` over ``axis_name``.

    Same semantics and arguments as :func:`dot_attention` (the weights cannot be
    returned). Queries, the query mask and the output are replicated over the axis; key,
    value and the value mask are split into ``n`` contiguous shards of ``Tv / n``.
    Dropout draws an independent pattern per shard (``fold_in(rng, shard)``).

    Args:
      params: see :func:`dot_attention`.
      query: ``[..., Tq, D]``.
      value: ``[..., Tv, Dv]``; ``Tv`` must be divisible by ``n``. Batch dims broadcast
        against the query's as in :func:`dot_attention` (grouped-query attention: each
        shard reads its shared key/value blocks once per group of query rows).
      key: ``[..., Tv, D]`` or None.
      masks: None or ``(query_mask [..., Tq], value_mask [..., Tv])``.
      causal: Python bool; the mask compares global positions.
      attention_mask, bias, segment_ids, query_offset, kv_length, window: see
        :func:`dot_attention` (global positions; a full mask or bias is split along ``Tv``
        unless broadcast there).
      logits_soft_cap, score_mod, mask_mod: see :func:`dot_attention` (each shard's
        functions see global positions).
      mesh: the device mesh.
      axis_name: the mesh axis to shard ``Tv`` over.
      score_mode, dropout_rate, dropout_rng, deterministic, precision, block_size: see
        :func:`dot_attention`.

    Returns:
      ``[..., Tq, Dv]``, replicated over ``axis_name``.

    Raises:
      ValueError: for everything :func:`dot_attention` rejects, an unknown
        ``axis_name``, or ``Tv`` not divisible by the axis size.

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from jax.sharding import Mesh
      >>> from flax_dotattn import dot_attention, sequence_parallel_attention
      >>> mesh = Mesh(np.array(jax.devices()[:1]), ("seq",))
      >>> q, v = jnp.ones((2, 3, 4)), jnp.arange(40.0).reshape(2, 5, 4) / 40
      >>> out = sequence_parallel_attention(None, q, v, causal=True, mesh=mesh,
      ...                                   axis_name="seq")
      >>> bool(jnp.allclose(out, dot_attention(None, q, v, causal=True), atol=1e-6))
      True
    """
    call = validation.check_call(locals())
    inputs = call.inputs
    n = check_mesh_axis(mesh, axis_name)
    tv = inputs.key.shape[-2]
    if tv % n:
        raise ValueError(
            f"value length Tv={tv} must be divisible by the size {n} of mesh axis "
            f"{axis_name!r}; received value shape {tuple(inputs.value.shape)}."
        )
    shard_len = tv // n
    empty = validation.empty_output(inputs)
    if empty is not None:  # nothing to attend over: zeros, as one device
        return empty
    nb = inputs.query.ndim - 2
    replicated = PartitionSpec()
    seq = PartitionSpec(*([None] * nb), axis_name, None)  # [..., Tv, D]
    seq_mask = PartitionSpec(*([None] * nb), axis_name)  # [..., Tv]

    def pair_spec(x: Array | None) -> PartitionSpec | None:  # [..., Tq, Tv] or broadcast
        if x is None:
            return None
        return PartitionSpec(*([None] * (x.ndim - 1)), axis_name if x.shape[-1] == tv else None)

    masking = inputs.masking
    # A Masking of PartitionSpecs, in the field order of Masking (a pytree prefix of it).
    masking_specs = type(masking)._make(
        (
            None if masking.value_mask is None else seq_mask,
            pair_spec(masking.attention_mask),
            None if masking.query_segment_ids is None else replicated,
            None if masking.kv_segment_ids is None else seq_mask,
        )
    )

    plans = dispatch.sequence_parallel_plans(inputs, call.options, shard_len)
    splash_somewhere = any(p.implementation == "pallas_tpu" for p in plans.values())
    # Keras's rule for a row that sees no key at all needs the chunked path on every shard.
    no_key = pallas_tpu.some_row_sees_no_key(inputs, call.options) if splash_somewhere else False

    def shard(q, k, v, masking, bias, scale, cw, rng, no_key):
        index = lax.axis_index(axis_name)
        if rng is not None:
            rng = jax.random.fold_in(rng, index)
        local = inputs._replace(
            query=q, key=k, value=v, masking=masking, bias=bias, scale=scale, concat_score_weight=cw
        )
        local_call = validation.CheckedCall(call.options, local, rng)

        def blockwise() -> tuple[Array, Array, Array]:
            out, (m, log_l) = chunked.attention(
                local_call, key_offset=index * shard_len, with_stats=True
            )  # [..., Tq, Dv], [..., Tq], [..., Tq]
            return out.astype(inputs.compute_dtype), m, log_l

        def kernel(platform: str) -> Callable[[], tuple[Array, Array, Array]]:
            def run() -> tuple[Array, Array, Array]:
                out, lse, overflow = pallas_tpu.splash_shard(
                    local_call, interpret=platform != "tpu", reference=chunked.attention
                )
                m = lax.stop_gradient(lse)
                splash = (out, m, lse - m)  # log_l carries the derivative, as chunked's
                return lax.cond(no_key | overflow, blockwise, lambda: splash)

            return run

        if not splash_somewhere:
            out, m, log_l = blockwise()
        else:
            branches = {
                p: kernel(p) if plan.implementation == "pallas_tpu" else blockwise
                for p, plan in plans.items()
            }
            out, m, log_l = lax.platform_dependent(**branches, default=blockwise)
        m = lax.stop_gradient(m)
        top = lax.pmax(m, axis_name)  # [..., Tq]
        top = jnp.where(top > -jnp.inf, top, jnp.zeros((), top.dtype))  # a row of -inf only
        w = jnp.exp(m - top + log_l)  # [..., Tq]; 0 for a shard a -inf bias hides
        total = lax.psum(w, axis_name)[..., None]  # [..., Tq, 1]
        part = jnp.where(w[..., None] > 0, w[..., None] * out, jnp.zeros((), out.dtype))
        merged = lax.psum(part, axis_name) / jnp.where(total > 0, total, 1)  # [..., Tq, Dv]
        # A row whose every logit is -inf is NaN through a constant (a zero derivative).
        return jnp.where(total > 0, merged, jnp.full((), jnp.nan, merged.dtype))

    in_specs = (
        replicated,
        seq,
        seq,
        masking_specs,
        pair_spec(inputs.bias),
        replicated,
        replicated,
        replicated,
        replicated,
    )
    output = jax.shard_map(
        shard, mesh=mesh, in_specs=in_specs, out_specs=replicated, check_vma=False
    )(
        inputs.query,
        inputs.key,
        inputs.value,
        masking,
        inputs.bias,
        inputs.scale,
        inputs.concat_score_weight,
        call.dropout_rng,
        jnp.asarray(no_key),
    )
    return validation.finish(output, inputs)
