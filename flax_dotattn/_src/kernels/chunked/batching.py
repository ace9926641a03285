"""Under ``jax.vmap``, the mapped axis joins the kernel's batch.

Vectorised op by op, the data-dependent skipping tests would turn into selects that run
every block; folded into ``B`` (one kernel over ``n * B`` rows) they stay tests. Where the
mapped axis cannot join (per-element scalars or dropout keys), ``jax.vmap`` takes over.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, overload

import jax

from flax_dotattn._src.kernels.chunked.forward import forward
from flax_dotattn._src.kernels.chunked.operands import Operands, Static, Tangents
from flax_dotattn._src.kernels.chunked.tangent import Residuals, tangent
from flax_dotattn._src.kernels.chunked.transpose import transpose
from flax_dotattn._src.masks import Masking
from flax_dotattn._src.types import Array


def _foldable(batched: Any) -> bool:
    """Whether a vmapped axis can join the batch: the scalars and the key must be shared."""
    shared = (batched.scale, batched.concat_score_weight, batched.rng)
    return not any(jax.tree.leaves(shared))


@overload
def fold_rows(x: Array, batched: Any, n: int) -> Array: ...
@overload
def fold_rows(x: None, batched: Any, n: int) -> None: ...
def fold_rows(x: Array | None, batched: Any, n: int) -> Array | None:
    """``[n, B, ...]`` (or ``[B, ...]`` shared by the n) -> ``[n * B, ...]``."""
    if x is None:
        return None
    x = x if batched else jax.numpy.broadcast_to(x, (n,) + x.shape)
    return x.reshape((n * x.shape[1],) + x.shape[2:])


def unfold_rows(x: Array | None, n: int) -> Array | None:
    """``[n * B, ...]`` -> ``[n, B, ...]``."""
    return None if x is None else x.reshape((n, x.shape[0] // n) + x.shape[1:])


def _fold_pairs(static: Static, x: Array | None, batched: Any) -> Array | None:
    """A broadcastable ``[..., Tq, Tv]`` array for the batch ``(n,) + static.batch``."""
    if x is None or not batched:
        return x  # broadcasts along the new leading batch dim by itself
    lacking = len(static.batch) + 2 - (x.ndim - 1)
    return x.reshape(x.shape[:1] + (1,) * lacking + x.shape[1:])


def _fold_offset(key_offset: Array, batched: Any, n: int, b: int) -> Array:
    """The key offset for ``n * b`` rows: a shared scalar stays one, else one per row."""
    if not batched and key_offset.ndim == 0:
        return key_offset
    x = key_offset if batched else jax.numpy.broadcast_to(key_offset, (n,) + key_offset.shape)
    x = x[:, None] if x.ndim == 1 else x  # [n, 1] or [n, B]
    return jax.numpy.broadcast_to(x, (n, b)).reshape(n * b)


def _fold_operands(static: Static, ops: Operands, batched: Any, n: int) -> Operands:
    """``ops`` with the mapped axis folded into the batch; ``batched`` has the tree of
    ``ops`` with bools (whether each leaf is mapped)."""
    rows = functools.partial(fold_rows, n=n)
    masking, masking_b = ops.masking, batched.masking
    b = ops.q.shape[1] if batched.q else ops.q.shape[0]  # rows per mapped element
    return ops._replace(
        key_offset=_fold_offset(ops.key_offset, batched.key_offset, n, b),
        q=rows(ops.q, batched.q),
        k=rows(ops.k, batched.k),
        v=rows(ops.v, batched.v),
        masking=Masking(
            value_mask=rows(masking.value_mask, masking_b.value_mask),
            attention_mask=_fold_pairs(static, masking.attention_mask, masking_b.attention_mask),
            query_segment_ids=rows(masking.query_segment_ids, masking_b.query_segment_ids),
            kv_segment_ids=rows(masking.kv_segment_ids, masking_b.kv_segment_ids),
        ),
        bias=_fold_pairs(static, ops.bias, batched.bias),
    )


def fold(static: Static, res: Residuals, batched: Any, n: int, bias_moves: bool):
    """``(static, residuals)`` for the batch ``(n,) + static.batch``, or None when the
    mapped axis cannot join it. ``bias_moves``: the bias has a per-element (co)tangent,
    so it is made per element too."""
    ops, ops_b = res.ops, batched.ops
    if static.has_mods or not _foldable(ops_b):
        # The score and mask functions see the call's batch: jax.vmap maps them instead.
        return None
    if bias_moves and ops.bias is not None and not ops_b.bias:
        ops = ops._replace(bias=jax.numpy.broadcast_to(ops.bias, (n,) + ops.bias.shape))
        ops_b = ops_b._replace(bias=True)
    folded = static._replace(batch=(n,) + static.batch)
    rows = functools.partial(fold_rows, n=n)
    stats = (rows(x, b) for x, b in zip(res[1:], batched[1:], strict=True))
    return folded, Residuals._make((_fold_operands(static, ops, ops_b, n), *stats))


@dataclasses.dataclass(frozen=True)
class TangentMap:
    """:func:`.tangent.tangent` as a hashable map ``(residuals, tangents) -> (d_out, c)``
    for ``linear_map``."""

    static: Static

    def __call__(self, res: Residuals, tangents: Tangents):
        return tangent(self.static, res, tangents)

    def fold(self, n: int, res: Residuals, batched: Any, tangents: Tangents):
        """The map for a vmapped axis of size ``n`` joined to the batch (``linear_map``'s
        batching protocol; the tangents are mapped along axis 0)."""
        if tangents.scale is not None or tangents.concat_weight is not None:
            return None  # per-element tangents of the scalars: leave it to jax.vmap
        got = fold(self.static, res, batched, n, tangents.bias is not None)
        if got is None:
            return None
        static, res = got
        rows = functools.partial(fold_rows, batched=True, n=n)
        tangents = Tangents(
            rows(tangents.query), rows(tangents.key), rows(tangents.value),
            _fold_pairs(self.static, tangents.bias, True),
        )  # fmt: skip

        def unfold(outputs):
            return tuple(unfold_rows(x, n) for x in outputs)

        transpose_map = TransposeMap(static, tangents.present())
        return TangentMap(static), transpose_map, res, tangents, unfold


@dataclasses.dataclass(frozen=True)
class TransposeMap:
    """:func:`.transpose.transpose` as a hashable map ``(residuals, (ct_out, ct_c)) ->
    Tangents`` for ``linear_map``."""

    static: Static
    present: Tangents  # True where the tangent is nonzero, else None

    def __call__(self, res: Residuals, cts):
        return transpose(self.static, res, self.present, *cts)

    def fold(self, n: int, res: Residuals, batched: Any, cts):
        """As :meth:`TangentMap.fold`, for the transpose."""
        if self.present.scale is not None or self.present.concat_weight is not None:
            return None  # per-element cotangents of the scalars: leave it to jax.vmap
        bias = res.ops.bias
        bias_shape = None if bias is None else bias.shape[1:] if batched.ops.bias else bias.shape
        got = fold(self.static, res, batched, n, self.present.bias is not None)
        if got is None:
            return None
        static, res = got
        cts = tuple(fold_rows(x, True, n) for x in cts)

        def unfold(out: Tangents) -> Tangents:
            bias = None
            if out.bias is not None and bias_shape is not None:
                bias = out.bias.reshape((n,) + bias_shape)
            return Tangents(
                unfold_rows(out.query, n), unfold_rows(out.key, n), unfold_rows(out.value, n),
                bias,
            )  # fmt: skip

        return TransposeMap(static, self.present), TangentMap(static), res, cts, unfold


@functools.cache
def batching_forward(static: Static):
    """:func:`.forward.forward` for ``static``, which under ``jax.vmap`` takes the mapped
    axis into its batch instead of being vectorised op by op.

    Only ever evaluated, never differentiated: the kernel's JVP rule does that.
    """

    @jax.custom_batching.custom_vmap
    def run(ops: Operands):
        return forward(static, ops)

    @run.def_vmap
    def _(n, in_batched, ops):
        (batched,) = in_batched
        res = Residuals._make((ops, None, None, None))
        res_b = Residuals._make((batched, None, None, None))
        got = fold(static, res, res_b, n, False)
        out: Any
        if got is None:  # per-element scalars or dropout keys
            axes = jax.tree.map(lambda b: 0 if b else None, batched)
            out = jax.vmap(functools.partial(forward, static), in_axes=(axes,))(ops)
        else:
            folded, res = got
            out = tuple(unfold_rows(x, n) for x in batching_forward(folded)(res.ops))
        return out, (True, True, True)

    return run
