"""``jax.nn.dot_product_attention``'s API and numbers on this library's kernels.

Shape glossary (``jax.nn``'s): ``B`` batch, ``T`` query length, ``S`` key/value length,
``N`` query heads, ``K`` key/value heads (dividing ``N``), ``H`` head depth.

This module imports neither flax nor keras.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from flax_dotattn._src.doors import replace_rule
from flax_dotattn._src.doors.layout import Heads
from flax_dotattn._src.options import check_bool, check_window, fail
from flax_dotattn._src.types import Array, Implementation


def _ensure_4d(name: str, x: Any) -> Array:
    """``x`` with leading dims of size 1 up to rank 4, as ``jax.nn`` reads it."""
    x = jnp.asarray(x)
    if x.ndim > 4:
        fail(f"{name} must have rank 4 or less; received shape {tuple(x.shape)}.")
    return x.reshape((1,) * (4 - x.ndim) + x.shape)


def _check_lengths(name: str, x: Any, batch: int) -> Array | None:
    """``None`` or an int32 ``[B]`` array of lengths, as ``jax.nn`` requires."""
    if x is None:
        return None
    x = jnp.asarray(x)
    if x.dtype != jnp.int32 or x.shape != (batch,):
        fail(
            f"{name} must be an int32 array of shape (B,) = ({batch},); received shape "
            f"{tuple(x.shape)} and dtype {x.dtype}."
        )
    return x


def _check_window(value: Any) -> tuple[int | None, int | None] | None:
    """``local_window_size``: None, an int ``w`` (read as ``(w, w)``) or a pair."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        value = (value, value)
    return check_window("local_window_size", value)


def dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    bias: Array | None = None,
    mask: Array | None = None,
    *,
    scale: float | Array | None = None,
    is_causal: bool = False,
    query_seq_lengths: Array | None = None,
    key_value_seq_lengths: Array | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    implementation: Implementation | None = None,
    return_residual: bool = False,
    logits_soft_cap: float | None = None,
) -> Array:
    r"""``jax.nn.dot_product_attention``, run on this library's kernels.

    Takes ``jax.nn.dot_product_attention``'s arguments and gives its numbers, so code
    written for it changes one import::

        from flax_dotattn.jax_nn import dot_product_attention

    For each head, with ``Q, K, V`` the head's query, keys and values::

        softmax(scale * Q @ K^T + bias, masked) @ V      # scale = 1/sqrt(H) by default

    With ``logits_soft_cap=c`` the logits ``scale * Q @ K^T + bias`` become
    ``c * tanh(logits / c)`` before the masks (tokamax's ``logits_soft_cap``; Gemma 2's
    attention soft-capping).

    *Masking, as jax.nn:* ``mask``, ``is_causal``, ``local_window_size`` and the lengths
    are ANDed; a masked logit is *replaced* by a large negative constant. A row that sees
    no key is therefore the uniform mean of all ``S`` values, and gives no gradient to its
    query, the keys or the bias (``jax.nn``'s gradients, exactly). Query rows at or
    beyond ``query_seq_lengths`` output zeros.

    *Grouped heads:* key/value heads ``K`` dividing the query heads ``N``: query head
    ``n`` reads key/value head ``n // (N // K)`` (multi-query attention when ``K = 1``),
    without repeating the keys and values.

    What differs from ``jax.nn`` (each documented in the guide "Using these kernels from
    jax.nn or Flax code"): float16/bfloat16 calls keep the softmax weights in float32 for
    the weighted sum (``jax.nn`` rounds them to the inputs' dtype first), so they agree to
    that rounding; float64 runs in float64 (``jax.nn`` takes its softmax in float32); keys
    and values past ``key_value_seq_lengths`` read as 0 where they are not finite (in
    ``jax.nn`` a NaN there reaches the output); a row whose every visible logit is ``-inf``
    (from ``bias``) outputs NaN (``jax.nn`` spreads it over the hidden keys);
    ``return_residual=True`` and negative window sides are refused.

    Args:
      query: ``[B, T, N, H]``, or ``[T, N, H]`` (the batch left out); float.
      key: ``[B, S, K, H]`` (or ``[S, K, H]``), the query's dtype, ``K`` dividing ``N``.
      value: the key's shape and dtype.
      bias: None or an array broadcastable (NumPy rules, at most rank 4) to
        ``[B, N, T, S]`` (``[N, T, S]`` for rank-3 inputs), added to the scaled logits
        before the masks; its head dim is 1 or ``N``. Differentiable.
      mask: None or a bool array like ``bias``: True keeps a logit.
      scale: the logits' factor; None is ``1 / sqrt(H)``.
      is_causal: Python bool: query ``t`` sees keys ``s <= t`` (top-left when
        ``T != S``).
      query_seq_lengths: None or ``int32 [B]``: query rows at or beyond it output zeros.
      key_value_seq_lengths: None or ``int32 [B]``: keys at or beyond it are masked.
      local_window_size: None, an int ``w`` (as ``(w, w)``) or a pair ``(left, right)``
        of non-negative ints: query ``t`` sees keys ``t - left <= s <= t + right``.
      implementation: None (choose by platform, shape and features, as
        :func:`flax_dotattn.which_implementation` says), ``"xla"`` (materialise the
        ``[B, N, T, S]`` logits, like ``jax.nn``'s own ``"xla"``), ``"chunked"``
        (O(T) memory), ``"cudnn"`` (``jax.nn``'s cuDNN kernel), ``"pallas_tpu"``
        (splash attention) or ``"pallas_gpu"`` (Triton); see
        :func:`flax_dotattn.dot_attention` for what each kernel takes.
      return_residual: must be False: the kernels do not return the logsumexp.
      logits_soft_cap: None or a positive float ``c``: the logits (bias included) become
        ``c * tanh(logits / c)`` before the masks, as tokamax's argument of that name.

    Returns:
      The attention output with the query's shape and dtype.

    Raises:
      ValueError: on shapes, dtypes, lengths, windows or options ``jax.nn`` rejects, and
        on ``return_residual=True``; each message names the argument.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from flax_dotattn import jax_nn
      >>> q = jax.random.normal(jax.random.key(0), (2, 16, 8, 32))  # [B, T, N, H]
      >>> kv = jax.random.normal(jax.random.key(1), (2, 16, 2, 32))  # [B, S, K, H]
      >>> out = jax_nn.dot_product_attention(q, kv, kv, is_causal=True)
      >>> ref = jax.nn.dot_product_attention(q, kv, kv, is_causal=True)
      >>> out.shape, bool(jnp.allclose(out, ref, atol=1e-5))
      ((2, 16, 8, 32), True)
    """
    if check_bool("return_residual", return_residual):
        fail(
            "return_residual=True is not supported: the kernels do not return the "
            "logsumexp; received return_residual=True."
        )
    causal = check_bool("is_causal", is_causal)
    window = _check_window(local_window_size)
    output_shape = jnp.shape(query)
    query, key, value = (
        _ensure_4d(n, x) for n, x in (("query", query), ("key", key), ("value", value))
    )
    B, S, K, H = key.shape
    if value.shape != key.shape or value.dtype != key.dtype:
        fail(
            f"value must have the key's shape {key.shape} and dtype {key.dtype}; received "
            f"shape {value.shape} and dtype {value.dtype}."
        )
    if query.shape[0] != B or query.shape[-1] != H or query.dtype != key.dtype:
        fail(
            f"query must have shape [B, T, N, H] with B={B} and H={H} (the key's) and the "
            f"key's dtype {key.dtype}; received shape {query.shape} and dtype {query.dtype}."
        )
    _, T, N, _ = query.shape
    if K == 0 or N % K:
        fail(
            f"the query heads N={N} must be a multiple of the key/value heads K={K}; "
            f"received query shape {query.shape} and key shape {key.shape}."
        )
    heads = Heads(batch_ndim=1, query_heads=N, kv_heads=K)
    if bias is not None:
        bias = _ensure_4d("bias", bias)
        if not jnp.issubdtype(bias.dtype, jnp.floating):  # jax.nn adds it in float32
            bias = bias.astype(jnp.promote_types(query.dtype, jnp.float32))
        bias = heads.pairs("bias", bias, T, S, (B,))
    if mask is not None:
        mask = _ensure_4d("mask", mask)
        if mask.dtype != jnp.bool_:
            fail(f"mask must be a bool array; received dtype {mask.dtype}.")
        mask = heads.pairs("mask", mask, T, S, (B,))
    q_lengths = _check_lengths("query_seq_lengths", query_seq_lengths, B)
    kv_lengths = _check_lengths("key_value_seq_lengths", key_value_seq_lengths, B)
    query_mask = None
    if q_lengths is not None:
        query_mask = heads.per_query(jnp.arange(T)[None, :] < q_lengths[:, None])  # [B, T]
    scale = 1.0 / np.sqrt(H) if scale is None else scale
    output = replace_rule.attend(
        {"scale": jnp.asarray(scale, jnp.promote_types(query.dtype, jnp.float32))},
        heads.query(query),
        heads.key_value(key),
        heads.key_value(value),
        bias=bias,
        mask=mask,
        causal=causal,
        window=window,
        query_mask=query_mask,
        kv_length=None if kv_lengths is None else heads.per_sequence(kv_lengths),
        dropout=None,
        implementation=implementation,
        precision=None,
        block_size=None,
        logits_soft_cap=logits_soft_cap,
    )
    return heads.output(output).reshape(output_shape)
