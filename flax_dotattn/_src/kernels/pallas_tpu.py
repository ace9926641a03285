"""``implementation="pallas_tpu"``: JAX's splash attention (a Pallas TPU kernel) with
Keras's rules.

Mapping a call onto ``jax.experimental.pallas.ops.tpu.splash_attention``:

* Logits are ``scale * (q @ k^T)`` with no ``1/sqrt(D)``: splash multiplies nothing, so
  the learned scale is folded into query and key without overflow
  (:func:`~flax_dotattn._src.kernels.fused_inputs.fold_scale`). float16 runs the kernel in float32
  (TPUs have no float16 matmul); float32 and bfloat16 run as given.
* ``causal`` and ``window`` become one static splash mask (``CausalMask`` or a
  ``LocalMask``, causal folded into its right side), with a concrete scalar
  ``query_offset`` as its offset: the kernel skips the blocks outside the band.
* The value mask (key padding, ``kv_length`` included) and ``segment_ids`` become splash
  segment ids: a hidden key gets an id that no query has.
* Lengths are padded up to a multiple of 128 (the kernel's lanes); padded keys get the
  hidden id, padded query rows are dropped. The padding costs at most 127 rows or keys.
* Every leading batch dim is flattened into one axis that ``jax.vmap`` maps the kernel
  over (Pallas adds it to the kernel's grid); each sequence is one splash "head", so the
  masks may differ per head.
* A row that sees no key: Keras subtracts 1e9 and still averages over every key; the
  kernel would not. When any row sees no key (checked on the masks, an O(Tq · Tv)
  comparison with no matmul, skipped when no row can), or the scale cannot be folded,
  the whole call runs the chunked path instead (a ``lax.cond``).
* ``logits_soft_cap`` is splash's ``attn_logits_soft_cap`` (it caps ``scale * q·k``
  before its masks, as Keras's order here does).
* The query mask zeroes output rows afterwards, as on every path.

Derivatives: a ``jax.custom_jvp`` whose tangent is a
:func:`~flax_dotattn._src.kernels.linear_map.linear_map` with the chunked kernel's forward-mode
tangent as the map and splash's own backward kernel as its transpose. So ``jax.grad`` runs
splash's backward, and ``jax.jvp``, ``jax.hessian`` and vmapped derivatives work through
the chunked kernel (slower, never failing).

On a backend other than TPU the kernel runs in Pallas interpret mode: the same kernel,
simulated with XLA operations. It is a testing mode and slow (a 2 x 512 x 128 call takes
seconds on a CPU).

Shape glossary: ``...`` batch dims, ``N`` their product, ``Tq``/``Tv`` query/key lengths,
``D`` query/key depth, ``Dv`` value depth.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Final, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from flax_dotattn._src.kernels import chunked
from flax_dotattn._src.kernels.fused_inputs import fold_scale
from flax_dotattn._src.kernels.linear_map import linear_map
from flax_dotattn._src.masks import Masking, keep_mask
from flax_dotattn._src.options import AttentionOptions
from flax_dotattn._src.tuning import table as tuning
from flax_dotattn._src.types import Array
from flax_dotattn._src.validation import AttentionInputs, CheckedCall

#: The kernel's name (``implementation=``, the tuning table's ``kernels`` key).
NAME: Final = "pallas_tpu"
#: The kernel's lane width: lengths are padded to a multiple of it.
LANES = 128
#: Below this many queries or keys the automatic choice on TPU keeps the CPU rule (the
#: kernel would pad a short sequence up to one 128-long block).
MIN_AUTOMATIC_LENGTH = LANES


def _static_offset(query_offset: Array | None) -> int | str:
    """The query offset as a Python int (0 when absent), or why it is not one: the
    kernel's masks take a static offset, so only one given on the host as one number
    (validation keeps it a NumPy array) maps onto them."""
    if query_offset is None:
        return 0
    if not isinstance(query_offset, np.ndarray):
        return "query_offset is a JAX array (the kernel's masks take a static offset)"
    if query_offset.ndim:
        return "query_offset differs per sequence (the kernel's masks take one offset)"
    return int(query_offset)


def ineligibility(inputs: AttentionInputs, options: AttentionOptions) -> str | None:
    """Why splash cannot run these inputs with Keras's numbers, or None when it can."""
    query, key, value = inputs.query, inputs.key, inputs.value
    features = {
        "bias": inputs.bias,
        "attention_mask": inputs.masking.attention_mask,
    }
    given = [name for name, x in features.items() if x is not None]
    offset = _static_offset(inputs.query_offset)
    reasons = [
        (options.score_mode != "dot", "score_mode is not 'dot'"),
        (options.dropout, "dropout is active"),
        (options.return_attention_scores, "the weights are requested"),
        (options.score_mod is not None, "score_mod given (splash takes no score function)"),
        (options.mask_mod is not None, "mask_mod given (not mapped onto splash's masks)"),
        (bool(given), f"{', '.join(given)} given (the kernel takes no dense mask or bias)"),
        (isinstance(offset, str), str(offset)),
        (_grouped_reason(inputs) is not None, str(_grouped_reason(inputs))),
        (inputs.dtype == jnp.float64, "dtype float64 (no float64 kernel on TPU)"),
        (
            inputs.masking.kv_segment_ids is not None
            and jnp.dtype(inputs.masking.kv_segment_ids.dtype).itemsize > 4,
            "segment ids wider than int32",
        ),
        (0 in query.shape or 0 in key.shape or 0 in value.shape, "an empty dimension"),
    ]
    for failed, reason in reasons:
        if failed:
            return reason
    if isinstance(offset, int):
        tq, tv, band = query.shape[-2], key.shape[-2], _band(options)
        if _empty_band(tq, tv, band, offset):
            return "causal/window leave a query row without keys (Keras's rule then differs)"
        if _empty_band(_pad_to(tq), _pad_to(tv), band, offset):
            return "a padded query row would see no key (the window lies beyond the keys)"
    return None


def _group_dims(inputs: AttentionInputs) -> tuple[int, ...]:
    """The batch dims where the query has several entries and key/value one (grouped-
    query attention: those queries share a key/value entry)."""
    batch, kv_batch = inputs.query.shape[:-2], inputs.key.shape[:-2]
    return tuple(a for a, (n, m) in enumerate(zip(batch, kv_batch, strict=True)) if n != m)


def _grouped_reason(inputs: AttentionInputs) -> str | None:
    """Why grouped key/value cannot take splash's MQA form (None when they can, or when
    nothing is grouped): its heads share one key/value and one set of segment ids."""
    if not _group_dims(inputs):
        return None
    masking, kv_batch = inputs.masking, inputs.key.shape[:-2]
    if masking.query_segment_ids is not None:
        return "segment ids with grouped key/value (splash's MQA heads share their ids)"
    if masking.value_mask is not None and masking.value_mask.shape[:-1] != kv_batch:
        return "a value mask that differs between queries sharing a key/value entry"
    return None


def _pad_to(n: int) -> int:
    return -(-n // LANES) * LANES


def _block(n: int) -> int:
    """The largest of 512, 256, 128 that divides ``n`` (a multiple of 128)."""
    return next(b for b in (512, 256, LANES) if n % b == 0)


def shipped_blocks(tq: int, tv: int) -> tuple[int, int, int, int]:
    """The blocks without a table: the largest of 512, 256, 128 that divides each padded
    length, forward and backward."""
    return (_block(tq), _block(tv)) * 2


def _kernel_dtype(dtype: Any) -> Any:
    """The dtype the kernel runs in: float32 for float16 inputs, else theirs."""
    return jnp.float32 if dtype == jnp.float16 else dtype


def call_blocks(inputs: AttentionInputs, options: AttentionOptions) -> tuple[int, int, int, int]:
    """:func:`kernel_blocks` for a call the kernel takes."""
    tq, tv = _pad_to(inputs.query.shape[-2]), _pad_to(inputs.key.shape[-2])
    depth = max(inputs.query.shape[-1], inputs.value.shape[-1])
    itemsize = np.dtype(_kernel_dtype(inputs.dtype)).itemsize
    return kernel_blocks(tq, tv, options.causal, depth, itemsize)


def blocks_are_tuned(inputs: AttentionInputs, options: AttentionOptions) -> bool:
    """Whether a call the kernel takes runs a table's blocks, not the rule's."""
    tq, tv = _pad_to(inputs.query.shape[-2]), _pad_to(inputs.key.shape[-2])
    return call_blocks(inputs, options) != shipped_blocks(tq, tv)


def kernel_blocks(
    tq: int, tv: int, causal: bool, depth: int, itemsize: int
) -> tuple[int, int, int, int]:
    """``(block_q, block_kv, block_q_backward, block_kv_backward)`` for padded lengths
    ``tq``, ``tv``, head size ``depth`` and operands of ``itemsize`` bytes: a table's
    (``python -m flax_dotattn.tune`` on a TPU, see :func:`tuning.kernel_blocks`), where
    its blocks are multiples of 128 that divide the lengths, else the largest of 512, 256,
    128 that divides each."""
    shipped = shipped_blocks(tq, tv)
    tuned = tuning.kernel_blocks(NAME, causal, tq, depth, itemsize)
    if tuned is None:
        return shipped
    forward, backward = tuned.get("forward"), tuned.get("backward")
    pairs = [p for p in (forward, backward) if isinstance(p, list | tuple) and len(p) == 2]
    if len(pairs) != 2:
        return shipped  # each must be a (block_q, block_kv) pair
    blocks = tuple(b for pair in pairs for b in pair)
    fits = all(
        isinstance(b, int) and b > 0 and b % LANES == 0 and n % b == 0
        for b, n in zip(blocks, (tq, tv, tq, tv), strict=True)
    )
    return blocks if fits else shipped


def _band(options: AttentionOptions) -> tuple[int | None, int | None]:
    """``(left, right)`` of the static mask; causal folds into ``right <= 0``."""
    left, right = options.window if options.window is not None else (None, None)
    if options.causal:
        right = 0 if right is None else min(right, 0)
    return left, right


def _empty_band(tq: int, tv: int, band: tuple[int | None, int | None], offset: int) -> bool:
    """Whether some row of ``Tq`` queries sees no key of ``Tv`` under the static band
    (query ``i`` at position ``i + offset``)."""
    left, right = band
    rows = np.arange(tq) + offset
    lo = np.zeros_like(rows) if left is None else np.maximum(rows - left, 0)
    hi = np.full_like(rows, tv - 1) if right is None else np.minimum(rows + right, tv - 1)
    return bool(np.any(lo > hi))


@dataclasses.dataclass(frozen=True)
class Static:
    """The kernel's static settings (hashable: a static argument of the derivatives)."""

    tq: int  # unpadded lengths
    tv: int
    left: int | None  # static band
    right: int | None
    offset: int
    segmented: bool  # whether segment ids are passed
    interpret: bool
    stats: bool  # also return each row's log-sum-exp (splash's saved residual)
    group: int  # query heads per key/value entry (splash's MQA form when > 1)
    options: AttentionOptions  # for the chunked reference (causal, window, precision)
    blocks: tuple[int, int, int, int]  # see kernel_blocks

    def kernel(self, save_residuals: bool) -> Any:
        """The splash kernel for one sequence (one head). Built in each trace: its mask
        tables become arrays of that trace (splash caches the numpy work).

        The forward pass is called with ``save_residuals=True`` (returning the
        log-sum-exp): that is the very call splash's backward makes to save its
        residuals, so a training step holds it twice and XLA's CSE can keep one.
        Splash's ``jax.vjp`` needs ``save_residuals=False``."""
        tq, tv = _pad_to(self.tq), _pad_to(self.tv)
        if self.left is None and self.right is None:
            mask: Any = splash.FullMask((tq, tv))
        elif self.left is None and self.right == 0:
            mask = splash.CausalMask((tq, tv), offset=self.offset)
        else:
            mask = splash.LocalMask((tq, tv), (self.left, self.right), offset=self.offset)
        bq, bkv, bq_bwd, bkv_bwd = self.blocks
        blocks = splash.BlockSizes(
            block_q=bq,
            block_kv=bkv,
            block_kv_compute=bkv,
            block_q_dkv=bq_bwd,
            block_kv_dkv=bkv_bwd,
            block_kv_dkv_compute=bkv_bwd,
            block_q_dq=bq_bwd,
            block_kv_dq=bkv_bwd,
        )
        make = splash.make_splash_mqa if self.group > 1 else splash.make_splash_mha
        return make(
            splash.MultiHeadMask([mask] * self.group),
            block_sizes=blocks,
            head_shards=1,
            q_seq_shards=1,
            save_residuals=save_residuals,
            attn_logits_soft_cap=self.options.logits_soft_cap,
            interpret=self.interpret,
        )


def _splash(
    static: Static,
    q: Array,
    k: Array,
    v: Array,
    q_ids: Array,
    kv_ids: Array,
    *,
    differentiable: bool = False,
) -> Any:
    """The kernel over ``N`` key/value entries: ``q [N, Tq, D]`` (``[N, G, Tq, D]`` when
    ``G = static.group > 1`` queries share each entry), ``k [N, Tv, D]``, ``v [N, Tv,
    Dv]``, ids ``[N, Tq]`` / ``[N, Tv]`` (hidden keys carry an id no query has) -> the
    output ``[N, (G,) Tq, Dv]`` in the kernel's dtype (and the log-sum-exp ``[N, (G,)
    Tq]`` with ``static.stats``). ``differentiable``: the call ``jax.vjp`` may
    differentiate (splash's own custom VJP; output only)."""
    pq, pv = _pad_to(static.tq) - static.tq, _pad_to(static.tv) - static.tv
    q = jnp.pad(q, ((0, 0),) * (q.ndim - 2) + ((0, pq), (0, 0)))
    k = jnp.pad(k, ((0, 0), (0, pv), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, pv), (0, 0)))
    kernel = static.kernel(save_residuals=not differentiable)
    grouped = static.group > 1

    def one(q, k, v, q_ids, kv_ids):  # one entry: its sequence(s) as the kernel's heads
        ids = None
        if static.segmented:
            hidden = jnp.min(q_ids) - 1  # no query of this sequence has it (see _ids)
            ids = splash.SegmentIds(
                jnp.pad(q_ids, (0, pq), constant_values=hidden),
                jnp.pad(kv_ids, (0, pv), constant_values=hidden),
            )
        heads = q if grouped else q[None]  # [G or 1, Tq', D]
        kv = (k, v) if grouped else (k[None], v[None])  # MQA: [Tv', D]; MHA: [1, Tv', D]
        if differentiable:
            out = kernel(heads, *kv, segment_ids=ids)
            return (out if grouped else out[0]), None
        out, (lse,) = kernel(heads, *kv, segment_ids=ids)
        return (out, lse) if grouped else (out[0], lse[0])

    out, lse = jax.vmap(one)(q, k, v, q_ids, kv_ids)  # [N, (G,) Tq', Dv], [N, (G,) Tq']
    if static.stats and not differentiable:
        return out[..., : static.tq, :], lse[..., : static.tq]
    return out[..., : static.tq, :]


def _reference(static: Static, q: Array, k: Array, v: Array, q_ids: Array, kv_ids: Array) -> Any:
    """The same attention on the chunked path (Keras's numbers; equal to the kernel's on
    every row that sees a key): the forward-mode derivatives are taken through it."""
    segmented = static.segmented
    if static.group > 1:  # q [N, G, Tq, D] against k, v [N, 1, Tv, D]; ids per entry
        k, v, q_ids, kv_ids = k[:, None], v[:, None], q_ids[:, None], kv_ids[:, None]
        q_ids = jnp.broadcast_to(q_ids, q.shape[:-1])
    inputs = AttentionInputs(
        query=q,
        key=k,
        value=v,
        query_mask=None,
        masking=Masking(None, None, q_ids if segmented else None, kv_ids if segmented else None),
        bias=None,
        scale=None,
        concat_score_weight=None,
        query_offset=jnp.int32(static.offset) if static.offset else None,
        dtype=jnp.dtype(q.dtype),
        compute_dtype=jnp.dtype(jnp.float32) if q.dtype != jnp.float64 else q.dtype,
    )
    call = CheckedCall(static.options, inputs, None)
    if not static.stats:
        return chunked.attention(call).astype(q.dtype)
    out, (m, log_l) = chunked.attention(call, with_stats=True)
    return out.astype(q.dtype), m + log_l  # the log-sum-exp's tangent is log_l's


@dataclasses.dataclass(frozen=True)
class _Tangent:
    """The tangent map: the chunked path's JVP in ``(dq, dk, dv)``."""

    static: Static

    def __call__(self, residuals: tuple, linear: tuple) -> Array:
        q, k, v, q_ids, kv_ids = residuals
        ref = functools.partial(_reference, self.static, q_ids=q_ids, kv_ids=kv_ids)
        return jax.jvp(lambda q, k, v: ref(q, k, v), (q, k, v), linear)[1]


@dataclasses.dataclass(frozen=True)
class _Transpose:
    """Its transpose: splash's own backward kernel (the cotangent of the output ->
    ``(dq, dk, dv)``). With the log-sum-exp ``lse`` as a second output, its cotangent
    ``g`` adds ``g * (P @ k)`` to ``dq`` (splash with the keys as values) and
    ``P^T @ (g * q)`` to ``dk`` (the value slot of splash's backward, keys as values)."""

    static: Static

    def __call__(self, residuals: tuple, ct: Any) -> tuple:
        q, k, _, q_ids, kv_ids = residuals
        if not self.static.stats:
            return _backward(self.static, *residuals, ct)
        plain = dataclasses.replace(self.static, stats=False)
        ct_out, ct_lse = ct
        dq, dk, dv = _backward(plain, *residuals, ct_out)
        g = ct_lse[..., None]  # [N, Tq, 1]
        dq_lse = g * _attend(plain, q, k, k, q_ids, kv_ids).astype(g.dtype)
        dk_lse = _backward(plain, q, k, k, q_ids, kv_ids, g * q.astype(g.dtype))[2]
        return (dq + dq_lse).astype(q.dtype), (dk + dk_lse).astype(k.dtype), dv


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _backward(static: Static, q, k, v, q_ids, kv_ids, ct) -> tuple:
    """Splash's backward pass (``static.stats`` False); its own derivatives go through
    the chunked path."""

    def forward(q: Array, k: Array, v: Array) -> Array:
        return _splash(static, q, k, v, q_ids, kv_ids, differentiable=True)

    _, pullback = jax.vjp(forward, q, k, v)
    return pullback(ct.astype(q.dtype))


@_backward.defjvp
def _backward_jvp(static: Static, primals, tangents):
    q, k, v, q_ids, kv_ids, ct = primals
    dq, dk, dv, _, _, dct = tangents

    def via_reference(q, k, v, ct):
        _, pullback = jax.vjp(lambda q, k, v: _reference(static, q, k, v, q_ids, kv_ids), q, k, v)
        return pullback(ct.astype(q.dtype))

    out = _backward(static, *primals)
    _, d_out = jax.jvp(via_reference, (q, k, v, ct), (dq, dk, dv, dct))
    return out, d_out


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _attend(static: Static, q, k, v, q_ids, kv_ids) -> Any:
    """Splash's output ``[N, Tq, Dv]`` (and the log-sum-exp ``[N, Tq]`` with
    ``static.stats``), differentiable in both modes."""
    return _splash(static, q, k, v, q_ids, kv_ids)


@_attend.defjvp
def _attend_jvp(static: Static, primals, tangents):
    q, k, v = primals[:3]
    dq, dk, dv = (
        jnp.zeros_like(x) if isinstance(t, jax.custom_derivatives.SymbolicZero) else t
        for x, t in zip((q, k, v), tangents[:3], strict=True)
    )
    out = _attend(static, *primals)
    d_out = linear_map(_Tangent(static), _Transpose(static), primals, (dq, dk, dv))
    return out, d_out


def _ids(inputs: AttentionInputs) -> tuple[Array, Array, bool]:
    """Splash segment ids ``[N, Tq]`` / ``[N, Tv]`` (int32, ``N`` key/value entries) and
    whether any are needed: the call's segment ids (or 0) with every key the value mask
    hides given ``min(q ids) - 1``, an id no query of its sequence has (int32 ids wrap
    there only for the smallest int32, which no packing uses)."""
    tq, tv = inputs.query.shape[-2], inputs.key.shape[-2]
    masking, kv_batch = inputs.masking, inputs.key.shape[:-2]
    n = math.prod(kv_batch)
    segmented = (
        masking.query_segment_ids is not None or masking.value_mask is not None or _pad_to(tv) != tv
    )
    if masking.query_segment_ids is None:
        q_ids = jnp.zeros((n, tq), jnp.int32)
        kv_ids = jnp.zeros((n, tv), jnp.int32)
    else:  # not grouped (see _grouped_reason): one query sequence per key/value entry
        q_ids = jnp.broadcast_to(masking.query_segment_ids, inputs.query.shape[:-1])
        assert masking.kv_segment_ids is not None  # given together
        kv_ids = jnp.broadcast_to(masking.kv_segment_ids, inputs.key.shape[:-1])
        q_ids = q_ids.reshape(n, tq).astype(jnp.int32)
        kv_ids = kv_ids.reshape(n, tv).astype(jnp.int32)
    if masking.value_mask is not None:
        shown = jnp.broadcast_to(masking.value_mask, inputs.key.shape[:-1]).reshape(n, tv)
        hidden = jnp.min(q_ids, axis=-1, keepdims=True) - 1
        kv_ids = jnp.where(shown, kv_ids, hidden)
    return q_ids, kv_ids, segmented


def some_row_sees_no_key(inputs: AttentionInputs, options: AttentionOptions) -> Array | bool:
    """Whether some query row sees no key (then Keras's numbers differ from the
    kernel's), for a call :func:`ineligibility` accepts: False when only causal/window
    mask (the band was checked statically), else a traced bool, from one comparison per
    (query, key) pair that XLA fuses into the reduction (no ``[Tq, Tv]`` array, no
    matmul)."""
    masking = inputs.masking
    if masking.value_mask is None and masking.query_segment_ids is None:
        return False
    offset = _static_offset(inputs.query_offset)
    assert isinstance(offset, int)
    batch, tq, tv = inputs.query.shape[:-2], inputs.query.shape[-2], inputs.key.shape[-2]
    n = math.prod(batch)

    def flat(x: Array | None, length: int) -> Array | None:  # [..., T] -> [N, T]
        return None if x is None else jnp.broadcast_to(x, batch + (length,)).reshape(n, length)

    keep = keep_mask(
        jnp.arange(tq) + offset,
        jnp.arange(tv),
        Masking(
            flat(masking.value_mask, tv),
            None,
            flat(masking.query_segment_ids, tq),
            flat(masking.kv_segment_ids, tv),
        ),
        causal=options.causal,
        window=options.window,
        batch_ndim=1,
    )  # [N, Tq, Tv]
    assert keep is not None
    return ~jnp.all(jnp.any(keep, axis=-1))


def _grouped(x: Array, groups: tuple[int, ...], n: int) -> Array:
    """``x [..., T, C]`` with the group dims moved last among the batch dims and the rest
    flattened: ``[N, T, C]``, or ``[N, G, T, C]`` when there are groups."""
    if not groups:
        return x.reshape(n, *x.shape[-2:])
    lead = x.ndim - 2
    order = [a for a in range(lead) if a not in groups] + list(groups)
    x = x.transpose(*order, lead, lead + 1)
    return x.reshape(n, -1, *x.shape[-2:])


def _ungrouped(x: Array, groups: tuple[int, ...], batch: tuple[int, ...]) -> Array:
    """The inverse of :func:`_grouped`: ``[N, (G,) T, C]`` -> ``[*batch, T, C]``."""
    if not groups:
        return x.reshape(*batch, *x.shape[-2:])
    lead = len(batch)
    order = [a for a in range(lead) if a not in groups] + list(groups)
    x = x.reshape(*(batch[a] for a in order), *x.shape[-2:])
    return x.transpose(*(order.index(a) for a in range(lead)), lead, lead + 1)


class _Prepared(NamedTuple):
    """A call laid out for the kernel: ``N`` sequences, scale folded, ids merged."""

    static: Static
    operands: tuple[Array, Array, Array]  # q [N, (G,) Tq, D], k [N, Tv, D], v [N, Tv, Dv]
    q_ids: Array  # int32 [N, Tq]
    kv_ids: Array  # int32 [N, Tv]
    overflow: Array  # bool []: the scale could not be folded


def _prepare(call: CheckedCall, *, interpret: bool, stats: bool) -> _Prepared:
    inputs, options = call.inputs, call.options
    tq, tv = inputs.query.shape[-2], inputs.key.shape[-2]
    n, d, dv = math.prod(inputs.key.shape[:-2]), inputs.query.shape[-1], inputs.value.shape[-1]
    offset = _static_offset(inputs.query_offset)
    assert isinstance(offset, int)
    left, right = _band(options)
    q_ids, kv_ids, segmented = _ids(inputs)
    kernel_dtype = _kernel_dtype(inputs.dtype)
    query = _grouped(inputs.query.astype(kernel_dtype), _group_dims(inputs), n)
    key = inputs.key.astype(kernel_dtype).reshape(n, tv, d)
    value = inputs.value.astype(kernel_dtype).reshape(n, tv, dv)
    query, key, overflow = fold_scale(query, key, inputs.scale)
    static = Static(
        tq=tq,
        tv=tv,
        left=left,
        right=right,
        offset=offset,
        segmented=segmented,
        interpret=interpret,
        stats=stats,
        group=math.prod(inputs.query.shape[:-2]) // max(n, 1),
        options=dataclasses.replace(options, implementation="chunked"),
        blocks=call_blocks(inputs, options),
    )
    return _Prepared(static, (query, key, value), q_ids, kv_ids, overflow)


def splash_attention(call: CheckedCall, *, interpret: bool) -> Array:
    """Keras attention through splash attention, before the query mask.

    Args:
      call: a checked call :func:`ineligibility` accepts: ``query [..., Tq, D]``, ``key
        [..., Tv, D]``, ``value [..., Tv, Dv]`` and their masks.
      interpret: run the kernel in Pallas interpret mode (any backend; slow).

    Returns:
      ``[..., Tq, Dv]`` in the compute dtype (float32 for 16-bit inputs).
    """
    inputs = call.inputs
    groups, batch = _group_dims(inputs), inputs.query.shape[:-2]
    prepared = _prepare(call, interpret=interpret, stats=False)

    def kernel(query, key, value):
        ids = prepared.q_ids, prepared.kv_ids
        out = _attend(prepared.static, query, key, value, *ids)  # [N, (G,) Tq, Dv]
        return _ungrouped(out.astype(inputs.compute_dtype), groups, batch)

    def keras(query, key, value):
        return chunked.attention(call).astype(inputs.compute_dtype)

    no_key = some_row_sees_no_key(inputs, call.options)
    if no_key is False and inputs.scale is None:
        return kernel(*prepared.operands)
    return lax.cond(no_key | prepared.overflow, keras, kernel, *prepared.operands)


def shard_ineligibility(inputs: AttentionInputs, options: AttentionOptions) -> str | None:
    """Why one key shard of :func:`sequence_parallel_attention` cannot run on splash."""
    if options.causal or options.window is not None:
        return (
            "causal/window on a key shard: rows may see none of the shard's keys, which "
            "the kernel's backward pass cannot take"
        )
    return ineligibility(inputs, options)


def splash_shard(call: CheckedCall, *, interpret: bool) -> tuple[Array, Array, Array]:
    """One key shard of sequence-parallel attention on splash (a call
    :func:`shard_ineligibility` accepts; the caller checks that every row sees a key
    somewhere, with :func:`some_row_sees_no_key` on the whole call).

    Returns:
      ``(output [..., Tq, Dv], lse [..., Tq], overflow [])``: the output in the compute
      dtype, each row's log-sum-exp over this shard's keys (about ``-2.4e38`` for a row
      that sees none of them), and whether the scale could not be folded (then the
      caller must run the chunked path).
    """
    inputs = call.inputs
    groups, batch = _group_dims(inputs), inputs.query.shape[:-2]
    prepared = _prepare(call, interpret=interpret, stats=True)
    ids = prepared.q_ids, prepared.kv_ids
    out, lse = _attend(prepared.static, *prepared.operands, *ids)  # [N, (G,) Tq, (Dv)]
    out = _ungrouped(out.astype(inputs.compute_dtype), groups, batch)
    return out, _ungrouped(lse[..., None], groups, batch)[..., 0], prepared.overflow
