"""``jax.nn``'s and Flax's masking rule, run on :func:`dot_attention`'s kernels.

``jax.nn.dot_product_attention`` and Flax *replace* a masked logit by a large negative
constant (``jnp.where(mask, logits, big_neg)``); Keras, and so every kernel here,
*subtracts* 1e9. On a row that sees at least one key the two agree exactly: either way a
masked key's weight is ``exp(-huge) = 0`` in float32, whatever its logit was (for logits
below about 1e8 in size). They differ on a row that sees no key:

* replaced, every logit of the row is the same constant, so the row is the uniform mean
  of all ``S`` values, and its query, keys and bias get no gradient from it (the constant
  does not depend on them);
* subtracted, the logits keep their differences (rounded to multiples of 64 in float32),
  so the row is near uniform, and the gradient flows through them.

:func:`attend` gives the replace rule's values and gradients on top of the subtract rule:

* without dropout it writes the mean of the values into such rows after the kernel (the
  kernel's own rows are dropped, so they get no gradient; the values get ``1/S`` of the
  row's);
* with dropout it zeroes such rows' queries (and bias) before the kernel, so their logits
  are all ``0 - 1e9``: the kernel then makes the uniform row and drops its weights with
  the same pattern as every other row. A bias is then broadcast to the shape of the rows
  that see a key where it was smaller.

Which rows see a key is known from the shapes alone for ``causal`` and ``window`` (no work
when every row does), from ``kv_length`` per sequence, and from a dense mask by one
reduction over the keys.

Shape glossary: ``...`` batch dims (the grouped query's, see :mod:`.layout`), ``Tq``/``Tv``
query/key lengths, ``D`` depth, ``Dv`` value depth. This module imports neither flax nor
keras.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flax_dotattn._src.attention import dot_attention
from flax_dotattn._src.types import Array, BlockSizeLike, Implementation, PrecisionLike, Window


class Dropout(NamedTuple):
    """Dropout on the attention weights, as Flax draws it."""

    rate: float  # in (0, 1)
    rng: Array  # PRNG key
    broadcast: bool  # one [Tq, Tv] pattern for every batch entry and head


def _visible_span(tq: int, tv: int, causal: bool, window: Window) -> tuple[np.ndarray, np.ndarray]:
    """``(lo, hi)``, each ``[Tq]``: the keys ``lo <= j <= hi`` that ``causal`` and
    ``window`` show query ``i`` (top-left positions)."""
    rows = np.arange(tq)
    lo, hi = np.zeros(tq, np.int64), np.full(tq, tv - 1, np.int64)
    if causal:
        hi = np.minimum(hi, rows)
    if window is not None and window[0] is not None:
        lo = np.maximum(lo, rows - window[0])
    if window is not None and window[1] is not None:
        hi = np.minimum(hi, rows + window[1])
    return lo, hi


def rows_seeing_a_key(
    tq: int,
    tv: int,
    *,
    batch_ndim: int,
    causal: bool,
    window: Window,
    kv_length: Array | None,
    mask: Array | None,
) -> Array | None:
    """Whether each query row sees at least one key under every mask ANDed.

    Args:
      tq, tv: the query and key lengths.
      batch_ndim: the rank of the batch dims ``...``.
      causal, window: as :func:`dot_attention`'s (top-left positions).
      kv_length: None or ``int [...]`` (batch rank, dims 1 or full): keys at or beyond
        it are hidden.
      mask: None or a mask ``[..., Tq, Tv]`` (full rank, dims 1 or full; nonzero keeps).

    Returns:
      None when every row sees a key whatever the arrays hold (known from the shapes), else
      a bool array broadcastable to ``[..., Tq]`` at that rank.
    """
    if tv == 0:  # no keys: the kernels' output is already jax.nn's (zeros)
        return None
    lo, hi = _visible_span(tq, tv, causal, window)
    at_rank = (1,) * batch_ndim
    if mask is None:
        if kv_length is None:
            seen = lo <= hi
            return None if seen.all() else jnp.asarray(seen).reshape(at_rank + (tq,))
        filled = jnp.minimum(hi.reshape(at_rank + (tq,)), kv_length[..., None] - 1)  # [..., Tq]
        return jnp.asarray(lo).reshape(at_rank + (tq,)) <= filled
    keys = np.arange(tv)
    span = (lo[:, None] <= keys) & (keys <= hi[:, None])  # [Tq, Tv]
    keep = mask.astype(bool) & span.reshape(at_rank + span.shape)  # [..., Tq, Tv]
    if kv_length is not None:
        keep = keep & (keys.reshape(at_rank + (tv,)) < kv_length[..., None])[..., None, :]
    return jnp.any(keep, axis=-1)  # [..., Tq]


def attend(
    params: dict[str, Array] | None,
    query: Array,
    key: Array,
    value: Array,
    *,
    bias: Array | None,
    mask: Array | None,
    causal: bool,
    window: Window,
    query_mask: Array | None,
    kv_length: Array | None,
    dropout: Dropout | None,
    implementation: Implementation | None,
    precision: PrecisionLike,
    block_size: BlockSizeLike,
    logits_soft_cap: float | None = None,
) -> Array:
    """:func:`dot_attention` with the replace rule's values and gradients on rows that see
    no key (see the module docstring).

    Args:
      params: :func:`dot_attention`'s ``params`` (the logits' scale, or None).
      query: ``[..., Tq, D]``.
      key: ``[..., Tv, D]``, batch dims 1 or the query's.
      value: ``[..., Tv, Dv]``, batch dims as the key's.
      bias: None or ``[..., Tq, Tv]``, full rank, each dim 1 or full.
      mask: None or a mask like ``bias`` (nonzero keeps).
      causal, window: as :func:`dot_attention`'s.
      query_mask: None or bool ``[..., Tq]`` (full rank, dims 1 or full): rows it hides
        output zeros and take no gradient.
      kv_length: None or ``int [...]`` (the batch rank): keys at or beyond it are hidden.
      dropout: None, or the dropout to apply.
      implementation, precision, block_size, logits_soft_cap: as :func:`dot_attention`'s.

    Returns:
      ``[..., Tq, Dv]`` in the inputs' dtype.
    """
    tq, tv = query.shape[-2], key.shape[-2]
    seen = rows_seeing_a_key(
        tq,
        tv,
        batch_ndim=query.ndim - 2,
        causal=causal,
        window=window,
        kv_length=kv_length,
        mask=mask,
    )

    def run(query: Array, bias: Array | None) -> Array:
        def call(q, k, v, b, m, qm, kl, rng):
            return dot_attention(
                params,
                q,
                v,
                k,
                None if qm is None else (qm, None),
                causal,
                attention_mask=m,
                bias=b,
                kv_length=kl,
                window=window,
                dropout_rate=0.0 if dropout is None else dropout.rate,
                dropout_rng=rng,
                deterministic=None if dropout is None else False,
                precision=precision,
                implementation=implementation,
                block_size=block_size,
                logits_soft_cap=logits_soft_cap,
            )

        arrays = (query, key, value, bias, mask, query_mask, kv_length)
        if dropout is None or not dropout.broadcast:
            return call(*arrays, None if dropout is None else dropout.rng)
        return _per_sequence_and_head(call, query.shape[:-2], arrays, dropout.rng)

    if seen is None:
        return run(query, bias)
    if dropout is None:
        output = run(query, bias)
        dead = ~seen if query_mask is None else ~seen & query_mask
        compute = jnp.promote_types(output.dtype, jnp.float32)
        mean = jnp.mean(value, axis=-2, keepdims=True, dtype=compute)  # [..., 1, Dv]
        return jnp.where(dead[..., None], mean.astype(output.dtype), output)  # [..., Tq, Dv]
    query = jnp.where(seen[..., None], query, jnp.zeros((), query.dtype))  # [..., Tq, D]
    if bias is not None:
        bias = jnp.where(seen[..., None], bias, jnp.zeros((), bias.dtype))  # [..., Tq, Tv]
    return run(query, bias)


def _per_sequence_and_head(
    call: Callable[..., Array],
    batch: tuple[int, ...],
    arrays: Sequence[Array | None],
    rng: Any,
) -> Array:
    """``call(*arrays, rng)`` mapped over the batch dims ``batch`` with one key for every
    entry, so each draws the same dropout pattern: Flax's ``broadcast_dropout``.

    Each array (or None) has ``len(batch)`` leading dims, each 1 or the batch's. A size-1
    dim is shared, not mapped; the key is mapped (the same key for every entry), so no
    kernel folds the entries into one draw.
    """
    if not batch:
        return call(*arrays, rng)
    n, rest = batch[0], batch[1:]
    mapped = [x is not None and x.shape[0] == n for x in arrays]
    sliced = [x if m or x is None else x[0] for x, m in zip(arrays, mapped, strict=True)]

    def inner(*args: Any) -> Array:
        return _per_sequence_and_head(call, rest, args[:-1], args[-1])

    keys = jnp.broadcast_to(rng, (n, *jnp.shape(rng)))
    axes = [0 if m else None for m in mapped]
    return jax.vmap(inner, in_axes=(*axes, 0))(*sliced, keys)
