"""A Flax ``attention_fn``: ``flax.linen.dot_product_attention``'s API and numbers on this
library's kernels, for ``nn.MultiHeadDotProductAttention(attention_fn=...)`` and
``nnx.MultiHeadAttention(attention_fn=...)``.

Shape glossary (Flax's): ``batch...`` any batch dims, ``T`` query length, ``S`` key/value
length, ``N`` query heads, ``K`` key/value heads (dividing ``N``), ``H`` query/key depth,
``Hv`` value depth.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
from flax.linen import dtypes as linen_dtypes

from flax_dotattn._src.doors import replace_rule
from flax_dotattn._src.doors.layout import Heads
from flax_dotattn._src.options import check_bool, fail
from flax_dotattn._src.types import Array, BlockSizeLike, Implementation, PrecisionLike


def _refuse(name: str, value: Any, why: str) -> None:
    """Raises the ValueError for an argument this function cannot honour, when given."""
    if value is not None:
        fail(
            f"flax_attention_fn cannot honour {name}: {why}; received {name} of type "
            f"{type(value).__name__}."
        )


def flax_attention_fn(
    query: Array,
    key: Array,
    value: Array,
    bias: Array | None = None,
    mask: Array | None = None,
    broadcast_dropout: bool = True,
    dropout_rng: Array | None = None,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    dtype: Any = None,
    precision: PrecisionLike = None,
    module: Any = None,
    force_fp32_for_softmax: bool = False,
    einsum_dot_general: Callable[..., Array] | None = None,
    qk_attn_weights_einsum: Callable[..., Array] | None = None,
    attn_weights_value_einsum: Callable[..., Array] | None = None,
    promote_dtype: Callable[..., Any] | None = None,
    is_causal: bool = False,
    *,
    implementation: Implementation | None = None,
    block_size: BlockSizeLike = None,
) -> Array:
    """Flax's ``dot_product_attention``, run on this library's kernels: an ``attention_fn``.

    Pass it to Flax's multi-head modules; they keep their parameters, decode cache and
    dropout stream, and the attention runs here (O(T) memory on long sequences)::

        nn.MultiHeadDotProductAttention(num_heads=8, attention_fn=flax_attention_fn)
        nnx.MultiHeadAttention(8, 512, attention_fn=flax_attention_fn, rngs=rngs)

    Computes, as ``flax.linen.dot_product_attention``::

        logits  = (query / sqrt(H)) @ key^T + bias       # per head
        logits  = where(mask, logits, finfo.min)         # and is_causal
        weights = dropout(softmax(logits))
        output  = weights @ value

    *Masking, as Flax:* a masked logit is *replaced*, so a row that sees no key is the
    uniform mean of all ``S`` values (with dropout, of the kept ones, scaled) and gives no
    gradient to its query, the keys or the bias.

    *Dropout, as Flax:* applied when ``deterministic`` is False and ``dropout_rate > 0``,
    keeping each weight with probability ``1 - dropout_rate`` and scaling it by
    ``1 / (1 - dropout_rate)``; with ``broadcast_dropout`` one ``[T, S]`` pattern serves
    every batch entry and head. The pattern is drawn from ``dropout_rng``: on
    ``implementation="xla"`` it is Flax's own (the same bits), on the chunked path one of
    the same law drawn per block.

    The softmax runs in float32 for float16/bfloat16 inputs (what
    ``force_fp32_for_softmax=True`` asks for; with False Flax rounds it to the inputs'
    dtype, so 16-bit results agree to that rounding). ``force_fp32_for_softmax=True``
    returns float32 for 16-bit inputs, as Flax does.

    Args:
      query: ``[batch..., T, N, H]``.
      key: ``[batch..., S, K, H]``, ``K`` dividing ``N`` (grouped-query heads, as NNX
        takes them; Linen's modules give ``K = N``).
      value: ``[batch..., S, K, Hv]``.
      bias: None or an array broadcastable (NumPy rules) to ``[batch..., N, T, S]``,
        added to the logits before the mask. Differentiable.
      mask: None or an array like ``bias``: nonzero (True) keeps a logit.
      broadcast_dropout: Python bool: one dropout pattern for all batch dims and heads.
      dropout_rng: PRNG key; required when dropout applies.
      dropout_rate: Python float in ``[0, 1)``.
      deterministic: Python bool: True disables dropout.
      dtype: the computation's dtype; None promotes ``query``, ``key`` and ``value``
        (Flax's ``promote_dtype``).
      precision: None, a ``jax.lax.Precision`` or its name.
      module: must be None: sowing the weights (``sow_weights=True``) would need them
        materialised.
      force_fp32_for_softmax: Python bool (see above).
      einsum_dot_general, qk_attn_weights_einsum, attn_weights_value_einsum: must be
        None: the kernels run their own products.
      promote_dtype: NNX's dtype promotion ``fn((query, key, value), dtype=dtype)``;
        None is Linen's.
      is_causal: Python bool: query ``t`` sees keys ``s <= t`` (NNX passes it).
      implementation: None (the automatic choice) or one of :func:`dot_attention`'s
        kernels, e.g. ``functools.partial(flax_attention_fn, implementation="chunked")``.
      block_size: the chunked path's blocks, as :func:`dot_attention`'s.

    Returns:
      ``[batch..., T, N, Hv]`` in the computation's dtype.

    Raises:
      ValueError: for shapes Flax rejects, an argument it cannot honour (``module``, the
        custom einsums), dropout without ``dropout_rng``, and whatever
        :func:`dot_attention` rejects (e.g. dropout on a kernel without it); each message
        names the argument.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import flax.linen as nn
      >>> from flax_dotattn import flax_attention_fn
      >>> x = jax.random.normal(jax.random.key(0), (2, 16, 32))          # [B, T, features]
      >>> ours = nn.MultiHeadDotProductAttention(num_heads=4, attention_fn=flax_attention_fn)
      >>> theirs = nn.MultiHeadDotProductAttention(num_heads=4)
      >>> params = theirs.init(jax.random.key(1), x)                     # the same params
      >>> out = ours.apply(params, x)
      >>> out.shape, bool(jnp.allclose(out, theirs.apply(params, x), atol=1e-5))
      ((2, 16, 32), True)
    """
    sowing = "it sows the attention weights (sow_weights=True), which are never materialised"
    _refuse("module", module, sowing)
    for name, fn in (
        ("einsum_dot_general", einsum_dot_general),
        ("qk_attn_weights_einsum", qk_attn_weights_einsum),
        ("attn_weights_value_einsum", attn_weights_value_einsum),
    ):
        _refuse(name, fn, "the kernels run their own products")
    broadcast = check_bool("broadcast_dropout", broadcast_dropout)
    causal = check_bool("is_causal", is_causal)
    fp32_softmax = check_bool("force_fp32_for_softmax", force_fp32_for_softmax)
    if promote_dtype is None:
        query, key, value = linen_dtypes.promote_dtype(query, key, value, dtype=dtype)
    else:
        query, key, value = promote_dtype((query, key, value), dtype=dtype)
    dtype = query.dtype
    if not (query.ndim == key.ndim == value.ndim >= 3):
        fail(
            "query, key and value must have the same rank (at least 3: [batch..., T, N, H]);"
            f" received shapes {query.shape}, {key.shape} and {value.shape}."
        )
    if not query.shape[:-3] == key.shape[:-3] == value.shape[:-3]:
        fail(
            "query, key and value batch dims must match; received shapes "
            f"{query.shape}, {key.shape} and {value.shape}."
        )
    if key.shape[-3:-1] != value.shape[-3:-1] or key.shape[-1] != query.shape[-1]:
        fail(
            "key and value must have the same length S and heads K, and key the query's "
            f"depth H; received query {query.shape}, key {key.shape}, value {value.shape}."
        )
    *batch, T, N, depth = query.shape
    S, K = key.shape[-3], key.shape[-2]
    if K == 0 or N % K:
        fail(
            f"the query heads N={N} must be a multiple of the key/value heads K={K}; "
            f"received query shape {query.shape} and key shape {key.shape}."
        )
    heads = Heads(batch_ndim=len(batch), query_heads=N, kv_heads=K)
    if bias is not None:
        bias = jnp.asarray(bias)
        if not jnp.issubdtype(bias.dtype, jnp.floating):
            bias = bias.astype(jnp.promote_types(dtype, jnp.float32))
        bias = heads.pairs("bias", bias, T, S, tuple(batch))
    if mask is not None:
        mask = heads.pairs("mask", jnp.asarray(mask), T, S, tuple(batch))
    dropout = None
    if not deterministic and dropout_rate > 0.0:
        if dropout_rng is None:
            fail(
                "dropout_rng is required when deterministic=False and dropout_rate > 0; "
                f"received dropout_rng=None with dropout_rate={dropout_rate}."
            )
        dropout = replace_rule.Dropout(dropout_rate, dropout_rng, broadcast)
    query = query / jnp.sqrt(depth).astype(dtype)  # Flax scales the query
    output = replace_rule.attend(
        None,
        heads.query(query),
        heads.key_value(key),
        heads.key_value(value),
        bias=bias,
        mask=mask,
        causal=causal,
        window=None,
        query_mask=None,
        kv_length=None,
        dropout=dropout,
        implementation=implementation,
        precision=precision,
        block_size=block_size,
    )
    output = heads.output(output)  # [batch..., T, N, Hv]
    if fp32_softmax and jnp.finfo(dtype).bits < 32:  # Flax's float32 weights @ values
        output = output.astype(jnp.float32)
    return output
