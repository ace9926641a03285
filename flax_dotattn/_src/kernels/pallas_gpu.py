"""``implementation="pallas_gpu"``: JAX's Pallas GPU flash attention (Triton) with Keras
semantics, for what cuDNN cannot take (segment ids, float32).

The kernel is ``jax.experimental.pallas.ops.gpu.attention.mha`` (layout ``[B, T, H, D]``,
a static ``sm_scale``, top-left ``causal``, one ``segment_ids [B, T]`` array read for
both queries and keys, a fused backward through its ``custom_vjp``). The mapping:

* Keras's logits ``scale * (q @ k^T)``: the learned scale is folded into query and key
  (:func:`~flax_dotattn._src.kernels.fused_inputs.fold_scale`) and ``sm_scale=1.0`` is passed.
* One segment id per position serves both the query and the key at that position. Key
  ``j`` gets ``kv_segment_ids[j]`` (0 without segment ids) when no mask hides it, else a
  padding id below every shown id. Query ``i`` then sees exactly Keras's keys when
  ``query_segment_ids[i] == kv_segment_ids[i]`` and key ``i`` is shown, for every row the
  query mask keeps; such a row always sees at least its own key, so Keras's rule for rows
  without keys never applies. This holds for self-attention with the same padding on
  queries and keys (``masks=(m, m)``) and for packed rows (the same ids); it is checked
  at run time, and the chunked path runs where it fails (a ``lax.cond``; under
  ``jax.vmap`` both branches run).
* Lengths are padded to the kernel's blocks (a power of two up to 128, then a multiple
  of 128); padded keys take the padding id and padded query rows are dropped. ``Tq <= Tv``
  (queries are read against the ids of the first ``Tq`` keys).
* Key/value batch dims that broadcast against the query's (grouped heads) are broadcast
  explicitly: the kernel takes one batch and head layout for all three.
* float32 matmuls run at Triton's default precision (TF32 on Ampere and later, as XLA's
  default on GPU); ``precision="highest"`` falls back.

Not taken (the reason is in the plan): ``bias``, a pair ``attention_mask``, ``window``,
``query_offset``, dropout, ``score_mode="concat"``, returned weights, ``D != Dv``, head
sizes outside 16..256, float64, ``Tq > Tv``.

Derivatives: a ``jax.custom_jvp`` whose tangent is a
:func:`~flax_dotattn._src.kernels.linear_map.linear_map` with the chunked path's forward-mode
tangent as the map and the kernel's own backward as its transpose: ``jax.grad`` runs the
kernel's fused backward; ``jax.jvp``, ``jax.hessian`` and vmapped derivatives go through
the chunked path (slower, never failing).

**Interpret mode.** On any platform but ``cuda`` the same kernel runs in Pallas
interpret mode (``interpret=True``; the dispatcher chooses per platform at lowering):
a testing mode that runs the kernel's program one block at a time through XLA, exact but
slow (seconds for a few thousand positions). The tests use it on CPU.

Shape glossary: ``...`` batch dims, ``B`` their product, ``Tq``/``Tv`` query/key lengths,
``T`` the padded length, ``D`` depth.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Final, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from flax_dotattn._src.kernels.chunked import attention as blockwise_attention
from flax_dotattn._src.kernels.fused_inputs import dense_attention_mask, fold_scale, shown_keys
from flax_dotattn._src.kernels.linear_map import linear_map
from flax_dotattn._src.masks import Masking
from flax_dotattn._src.options import AttentionOptions
from flax_dotattn._src.tuning import table as tuning
from flax_dotattn._src.types import Array
from flax_dotattn._src.validation import AttentionInputs, CheckedCall

#: Head sizes the kernel takes (Triton's matmul tiles need 16 or more; shared memory
#: bounds it above).
MIN_HEAD_SIZE, MAX_HEAD_SIZE = 16, 256
#: The kernel's name (``implementation=``, the tuning table's ``kernels`` key).
NAME: Final = "pallas_gpu"
#: Forward and backward block lengths (the kernel's defaults) at long lengths.
FORWARD_BLOCK, BACKWARD_BLOCK = 128, 32


def ineligibility(inputs: AttentionInputs, options: AttentionOptions) -> str | None:
    """Why the Pallas GPU kernel cannot run this call with Keras's numbers, or None.
    Static properties only; the traced ones are :func:`attention`'s fallback."""
    batch, (tq, d) = inputs.query.shape[:-2], inputs.query.shape[-2:]
    tv, dv = inputs.value.shape[-2:]
    given = [
        name
        for name, x in (
            ("bias", inputs.bias),
            ("a pair attention_mask [..., Tq, Tv]", dense_attention_mask(inputs)),
            ("window", options.window),
            ("query_offset", inputs.query_offset),
        )
        if x is not None
    ]
    reasons = [
        (
            inputs.dtype not in (jnp.float16, jnp.bfloat16, jnp.float32),
            f"dtype {inputs.dtype} is not float16/bfloat16/float32",
        ),
        (options.score_mode != "dot", "score_mode is not 'dot'"),
        (options.dropout, "dropout is active"),
        (options.return_attention_scores, "the weights are requested"),
        (options.logits_soft_cap is not None, "logits_soft_cap given (the kernel has no soft-cap)"),
        (options.score_mod is not None, "score_mod given (the kernel takes no score function)"),
        (options.mask_mod is not None, "mask_mod given (the kernel takes no mask function)"),
        (bool(given), f"{', '.join(given)} given (the kernel masks by segment ids only)"),
        (
            d != dv or not MIN_HEAD_SIZE <= d <= MAX_HEAD_SIZE,
            f"head sizes D={d}, Dv={dv} (need D == Dv in {MIN_HEAD_SIZE}..{MAX_HEAD_SIZE})",
        ),
        (0 in (math.prod(batch), tq, tv), "a dimension is empty"),
        (
            tq > tv,
            f"Tq={tq} > Tv={tv} (queries read the segment ids of the first Tq keys)",
        ),
        (
            inputs.dtype == jnp.float32 and options.precision == "highest",
            "precision='highest' with float32 (the kernel's matmuls use TF32)",
        ),
    ]
    for failed, reason in reasons:
        if failed:
            return reason
    return None


class Blocks(NamedTuple):
    """The padded length and the kernel's block lengths for one call."""

    length: int  # T: Tv padded
    forward: int  # block_q = block_k
    backward: int  # the four backward blocks


def shipped_blocks(tv: int) -> Blocks:
    """The blocks without a table (see :func:`blocks_for`)."""
    if tv <= FORWARD_BLOCK:
        length = max(16, 1 << (tv - 1).bit_length())
    else:
        length = -(-tv // FORWARD_BLOCK) * FORWARD_BLOCK
    return Blocks(length, min(FORWARD_BLOCK, length), min(BACKWARD_BLOCK, length))


def blocks_for(tv: int, causal: bool, depth: int, itemsize: int) -> Blocks:
    """Blocks for ``Tv`` keys: a power of two (at least 16) up to 128 positions, else
    ``Tv`` rounded up to a multiple of 128 (Triton's blocks are powers of two). The
    blocks are a tuning table's (``python -m flax_dotattn.tune`` on a GPU, for this
    ``causal``, head size ``depth`` and ``itemsize``, see :func:`tuning.kernel_blocks`)
    where they are powers of two from 16 that divide the padded length, else 128 forward
    and 32 backward (at most the length).

    Examples:
      >>> blocks_for(40, False, 64, 2), blocks_for(300, False, 64, 2)
      (Blocks(length=64, forward=64, backward=32), Blocks(length=384, forward=128, backward=32))
    """
    shipped = shipped_blocks(tv)
    length = shipped.length
    tuned = tuning.kernel_blocks(NAME, causal, length, depth, itemsize)
    if tuned is None:
        return shipped
    forward, backward = tuned.get("forward"), tuned.get("backward")
    fits = all(
        isinstance(b, int) and b >= 16 and b & (b - 1) == 0 and length % b == 0
        for b in (forward, backward)
    )
    return Blocks(length, forward, backward) if fits else shipped  # type: ignore[arg-type]


def call_blocks(inputs: AttentionInputs, options: AttentionOptions) -> Blocks:
    """:func:`blocks_for` a call the kernel takes."""
    depth = max(inputs.query.shape[-1], inputs.value.shape[-1])
    return blocks_for(inputs.key.shape[-2], options.causal, depth, inputs.dtype.itemsize)


class KernelOperands(NamedTuple):
    """What :func:`attention` passes to the kernel, and when it gives Keras's numbers."""

    query: Array  # [B, T, D], scale folded in
    key: Array  # [B, T, D], scale folded in
    value: Array  # [B, T, D]
    segment_ids: Array | None  # int [B, T]; None when nothing masks
    exact: Array | None  # traced bool; None when always


def _pad(x: Array, length: int) -> Array:
    """``[B, t, ...]`` zero-padded to ``[B, length, ...]``."""
    return jnp.pad(x, [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def map_operands(inputs: AttentionInputs, length: int) -> KernelOperands:
    """The kernel's operands for an eligible call, padded to ``length`` positions."""
    batch, (tq, d), tv = inputs.query.shape[:-2], inputs.query.shape[-2:], inputs.key.shape[-2]
    dtype = inputs.dtype
    key = jnp.broadcast_to(inputs.key.astype(dtype), batch + (tv, d))
    value = jnp.broadcast_to(inputs.value.astype(dtype), batch + (tv, d))
    query, key, overflow = fold_scale(inputs.query.astype(dtype), key, inputs.scale)
    checks = [] if inputs.scale is None else [~overflow]

    def positions(x: Array) -> Array:  # [..., t, D] -> [B, length, D]
        return _pad(x.reshape((-1,) + x.shape[-2:]), length)

    shown = shown_keys(inputs)
    q_ids, kv_ids = inputs.masking.query_segment_ids, inputs.masking.kv_segment_ids
    segment_ids = None
    hides = shown is not None or q_ids is not None  # may a kept row lose its own key?
    if hides or length > tv:
        shown = jnp.ones(batch + (tv,), bool) if shown is None else shown
        shown = _pad(shown.reshape(-1, tv), length)  # [B, T], padding hidden
        if kv_ids is None:
            kv_ids = jnp.zeros((shown.shape[0], length), jnp.int32)
            pad_id = jnp.full((), -1, jnp.int32)
        else:
            kv_ids = jnp.broadcast_to(kv_ids, batch + (tv,)).reshape(-1, tv)
            kv_ids = _pad(kv_ids, length)  # [B, T]
            info = jnp.iinfo(kv_ids.dtype)
            lowest = jnp.min(jnp.where(shown, kv_ids, info.max))
            checks.append(lowest > info.min)  # room for a padding id below it
            pad_id = lowest - 1
        segment_ids = jnp.where(shown, kv_ids, pad_id)  # [B, T]
        kept = jnp.ones((shown.shape[0], tq), bool)  # rows whose output counts
        if inputs.query_mask is not None:
            kept = jnp.broadcast_to(inputs.query_mask, batch + (tq,)).reshape(-1, tq)
        own = shown[:, :tq]  # [B, Tq]: each kept row must see its own key ...
        if q_ids is not None:  # ... under its own segment id
            own = own & (q_ids.reshape(-1, tq) == kv_ids[:, :tq])
        if hides:
            checks.append(jnp.all(~kept | own))
    exact = None
    for check in checks:
        exact = check if exact is None else exact & check
    return KernelOperands(positions(query), positions(key), positions(value), segment_ids, exact)


@dataclasses.dataclass(frozen=True)
class Static:
    """The kernel's static settings (hashable: part of the compiled code's key)."""

    causal: bool
    blocks: Blocks
    interpret: bool


def _mha(static: Static, q: Array, k: Array, v: Array, ids: Array | None) -> Array:
    """``mha`` on ``[B, T, D]`` operands (one head): ``[B, T, D]``."""
    from jax.experimental.pallas.ops.gpu import attention as pallas_attention

    blocks = static.blocks
    sizes = pallas_attention.BlockSizes(
        block_q=blocks.forward,
        block_k=blocks.forward,
        block_q_dkv=blocks.backward,
        block_kv_dkv=blocks.backward,
        block_q_dq=blocks.backward,
        block_kv_dq=blocks.backward,
    )
    out = pallas_attention.mha(
        q[:, :, None],
        k[:, :, None],
        v[:, :, None],
        ids,
        sm_scale=1.0,
        causal=static.causal,
        block_sizes=sizes,
        interpret=static.interpret,
    )  # [B, T, 1, D]
    return out[:, :, 0]


def _reference(static: Static, q: Array, k: Array, v: Array, ids: Array | None) -> Array:
    """The kernel's function on the chunked path: every row of the padded operands sees
    its own key, so Keras's masking rule and the kernel's agree. Forward-mode derivatives
    (and those of the kernel's backward) are taken through it."""
    dtype = jnp.dtype(q.dtype)
    inputs = AttentionInputs(
        query=q,
        key=k,
        value=v,
        query_mask=None,
        masking=Masking(query_segment_ids=ids, kv_segment_ids=ids),
        bias=None,
        scale=None,
        concat_score_weight=None,
        query_offset=None,
        dtype=dtype,
        compute_dtype=jnp.dtype(jnp.float32),
    )
    call = CheckedCall(AttentionOptions(causal=static.causal), inputs, None)
    return blockwise_attention(call).astype(dtype)


@dataclasses.dataclass(frozen=True)
class _Tangent:
    """The tangent map in ``(dq, dk, dv)``: the chunked path's JVP."""

    static: Static

    def __call__(self, residuals: tuple, linear: tuple) -> Array:
        q, k, v, ids = residuals
        return jax.jvp(lambda q, k, v: _reference(self.static, q, k, v, ids), (q, k, v), linear)[1]


@dataclasses.dataclass(frozen=True)
class _Transpose:
    """Its transpose: the kernel's own backward (output cotangent -> ``(dq, dk, dv)``)."""

    static: Static

    def __call__(self, residuals: tuple, ct: Array) -> tuple:
        return _backward(self.static, *residuals, ct)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _backward(static: Static, q: Array, k: Array, v: Array, ids: Array | None, ct: Array):
    """The kernel's backward pass; its own derivatives go through the chunked path."""
    _, pullback = jax.vjp(lambda q, k, v: _mha(static, q, k, v, ids), q, k, v)
    return pullback(ct.astype(q.dtype))


@_backward.defjvp
def _backward_jvp(static: Static, primals: tuple, tangents: tuple):
    q, k, v, ids, ct = primals
    dq, dk, dv, _, dct = tangents

    def via_reference(q, k, v, ct):
        _, pullback = jax.vjp(lambda q, k, v: _reference(static, q, k, v, ids), q, k, v)
        return pullback(ct.astype(q.dtype))

    _, d_out = jax.jvp(via_reference, (q, k, v, ct), (dq, dk, dv, dct))
    return _backward(static, *primals), d_out


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _attend(static: Static, q: Array, k: Array, v: Array, ids: Array | None) -> Array:
    """The kernel's output ``[B, T, D]``, differentiable in both modes: ``jax.grad`` runs
    the kernel's backward, ``jax.jvp`` (and so ``jax.hessian``) the chunked path's."""
    return _mha(static, q, k, v, ids)


@_attend.defjvp
def _attend_jvp(static: Static, primals: tuple, tangents: tuple):
    q, k, v = primals[:3]
    dq, dk, dv = (
        jnp.zeros_like(x) if isinstance(t, jax.custom_derivatives.SymbolicZero) else t
        for x, t in zip((q, k, v), tangents[:3], strict=True)
    )
    d_out = linear_map(_Tangent(static), _Transpose(static), primals, (dq, dk, dv))
    return _attend(static, *primals), d_out


def attention(call: CheckedCall, *, interpret: bool) -> Array:
    """Keras attention through the Pallas GPU kernel, before the query mask.

    Where the kernel would give other numbers than Keras (see the module docstring), the
    chunked path runs instead.

    Args:
      call: a checked call that :func:`ineligibility` accepts.
      interpret: False: the Triton kernel (lowers for ``cuda`` only); True: Pallas
        interpret mode (any platform; slow, for tests). The dispatcher passes False for
        the ``cuda`` branch of ``jax.lax.platform_dependent`` and True elsewhere.

    Returns:
      ``[..., Tq, Dv]`` in the inputs' dtype.
    """
    inputs = call.inputs
    batch, tq, dv = inputs.query.shape[:-2], inputs.query.shape[-2], inputs.value.shape[-1]
    blocks = call_blocks(inputs, call.options)
    operands = map_operands(inputs, blocks.length)
    static = Static(causal=call.options.causal, blocks=blocks, interpret=interpret)

    def fused() -> Array:
        args = operands.query, operands.key, operands.value, operands.segment_ids
        out = _attend(static, *args)  # [B, T, Dv]
        return out[:, :tq].reshape(batch + (tq, dv)).astype(inputs.dtype)

    def keras() -> Array:
        return blockwise_attention(call).astype(inputs.dtype)

    if operands.exact is None:
        return fused()
    return lax.cond(operands.exact, fused, keras)
