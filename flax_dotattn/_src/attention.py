"""The pure dot-product (Luong-style) attention function with Keras 3 semantics.

Shape glossary: ``...`` any number of leading batch dims (including none), ``Tq`` query
length, ``Tv`` key/value length, ``D`` query/key depth, ``Dv`` value depth.

This module imports neither flax nor keras.
"""

from __future__ import annotations

import inspect
from typing import Literal, TypedDict, Unpack, overload

from flax_dotattn._src import dispatch, runner, validation
from flax_dotattn._src.types import (
    Array,
    BlockSizeLike,
    Implementation,
    MaskMod,
    Masks,
    Params,
    PrecisionLike,
    ScoreMod,
    ScoreMode,
    Window,
)

__all__ = ["Masks", "Params", "dot_attention", "which_implementation"]


class DotAttentionKeywords(TypedDict, total=False):
    """The keyword-only arguments of :func:`dot_attention` but ``return_attention_scores``
    (typed once for its overloads, which differ in that argument alone)."""

    attention_mask: Array | None
    bias: Array | None
    segment_ids: tuple[Array, Array] | None
    query_offset: int | Array | None
    kv_length: int | Array | None
    window: Window
    logits_soft_cap: float | None
    score_mod: ScoreMod | None
    mask_mod: MaskMod | None
    score_mode: ScoreMode
    dropout_rate: float
    dropout_rng: Array | None
    deterministic: bool | None
    precision: PrecisionLike
    implementation: Implementation | None
    block_size: BlockSizeLike


class AllKeywords(DotAttentionKeywords, total=False):
    """Every keyword-only argument of :func:`dot_attention` (:func:`which_implementation`)."""

    return_attention_scores: bool


@overload
def dot_attention(
    params: Params,
    query: Array,
    value: Array,
    key: Array | None = None,
    masks: Masks = None,
    causal: bool = False,
    *,
    return_attention_scores: Literal[False] = False,
    **keywords: Unpack[DotAttentionKeywords],
) -> Array: ...


@overload
def dot_attention(
    params: Params,
    query: Array,
    value: Array,
    key: Array | None = None,
    masks: Masks = None,
    causal: bool = False,
    *,
    return_attention_scores: Literal[True],
    **keywords: Unpack[DotAttentionKeywords],
) -> tuple[Array, Array]: ...


@overload
def dot_attention(
    params: Params,
    query: Array,
    value: Array,
    key: Array | None = None,
    masks: Masks = None,
    causal: bool = False,
    *,
    return_attention_scores: bool,
    **keywords: Unpack[DotAttentionKeywords],
) -> Array | tuple[Array, Array]: ...


def dot_attention(
    params: Params,
    query: Array,
    value: Array,
    key: Array | None = None,
    masks: Masks = None,
    causal: bool = False,
    *,
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
    return_attention_scores: bool = False,
    precision: PrecisionLike = None,
    implementation: Implementation | None = None,
    block_size: BlockSizeLike = None,
) -> Array | tuple[Array, Array]:
    """Keras's dot-product (Luong-style) attention as a pure function.

    Computes, exactly as Keras 3's ``keras.layers.Attention``::

        scores  = query @ key^T               # "dot"; times params["scale"] if given
        scores  = w * sum(tanh(s * (q + k)))  # "concat"; w = concat_score_weight
        scores  = scores + bias                       # if given
        scores  = cap * tanh(scores / cap)            # if logits_soft_cap=cap
        scores  = score_mod(scores, q_pos, kv_pos)    # if given
        scores  = where(mask, scores, scores - 1e9)   # every mask (and mask_mod) ANDed
        weights = softmax(scores, axis=-1)            # then dropout if training
        output  = weights @ value                     # rows of masked queries -> 0

    There is no ``1/sqrt(D)`` factor: the learned ``scale`` plays that role.

    *Fully masked rows.* Masked logits have 1e9 *subtracted* (Keras's rule), so a query
    whose keys are all masked still gets a finite distribution: the softmax of its
    shifted logits, ``softmax(scores - 1e9)``. In float32 that subtraction rounds the
    logits to multiples of 64, so such rows are (near) uniform over the keys, not NaN.

    *Low precision.* For float16/bfloat16 inputs the logits, softmax and weighted sum
    run in float32 and the results are cast back, so no NaN/inf appears for finite
    inputs (Keras overflows to NaN on fully masked float16 rows).

    Args:
      params: None or a mapping with optional scalar leaves ``"scale"`` (Keras's
        ``use_scale`` weight) and ``"concat_score_weight"`` (required when
        ``score_mode="concat"``). Any other key raises ``ValueError``.
      query: ``[..., Tq, D]``, a real floating array.
      value: ``[..., Tv, Dv]``, same rank as ``query``; its batch dims broadcast against
        the query's by NumPy's rules (each equal, or 1 on one side) and the output's batch
        ``...`` is the broadcast shape. Query ``[B, Hkv, G, Tq, D]`` with key/value
        ``[B, Hkv, 1, Tv, D]`` is grouped-query attention, ``[B, H, Tq, D]`` with
        ``[B, 1, Tv, D]`` multi-query attention: as with key/value repeated to the
        query's batch, without the copies; their gradients keep their shapes (summed
        over the groups). ``ring_attention`` takes equal batch dims only.
      key: ``[..., Tv, D]`` with the batch dims of ``value``, or None, in which case
        ``value`` is used (as in Keras).
      masks: None or a pair ``(query_mask, value_mask)``; each is None or an array
        that broadcasts (NumPy rules) to ``[..., Tq]`` / ``[..., Tv]`` (e.g. ``[Tv]`` for
        the whole batch, ``[B, 1, Tv]`` for inputs ``[B, H, T, D]``), bool or numeric
        (nonzero keeps). Masked queries get zero output rows; masked values get no
        weight. Keys and values that no query can see (hidden by the value mask,
        ``kv_length`` or a key-padding ``attention_mask [..., 1, Tv]``) read as 0 where
        they are not finite, on every path, so garbage in padding never reaches an output
        or a gradient. Masks that hide (query, key) pairs rather than keys (``causal``,
        ``window``, segment ids, a full mask) do not clean them: keep such entries finite.
      causal: Python bool (static). Query ``i`` attends to keys ``j <= i``, top-left
        aligned when ``Tq != Tv`` (see :func:`make_causal_mask`).
      attention_mask: None or a bool/numeric mask broadcastable to ``[..., Tq, Tv]``
        (nonzero keeps), for arbitrary patterns; the chunked path reads it block by
        block and skips blocks it hides.
      bias: None or a float array broadcastable to ``[..., Tq, Tv]``, added to the
        logits after ``scale`` / ``concat_score_weight`` and before the masks
        (relative positions, ALiBi). Differentiable; its gradient is summed over the
        broadcast dims. ``-inf`` entries are allowed (the additive way to mask); a row
        whose every logit is ``-inf`` has no softmax and outputs NaN (as ``jax.nn`` does)
        through a constant, so zeroing it with the query mask leaves gradients finite.
      segment_ids: None or ``(query_segment_ids, kv_segment_ids)``, integer arrays
        broadcastable to ``[..., Tq]`` / ``[..., Tv]``, for packed sequences: a query
        attends only to keys of its own segment. The chunked path skips blocks whose
        segments cannot meet.
      query_offset: None (Keras's top-left rule: query ``i`` sits at position ``i``), a
        Python int or an integer array broadcastable to the batch dims ``...``: the
        position of query 0 among the keys, for decoding with a KV cache. ``causal``
        then shows key ``j`` to query ``i`` iff ``j <= query_offset + i``, and ``window``
        is measured from ``query_offset + i``. May be traced: one compiled step serves
        every position. Must be ``>= 0``.
      kv_length: None, a Python int or an integer array broadcastable to the batch dims:
        the filled length of a key/value cache, in ``[1, Tv]``. Keys at or beyond it are
        masked (ANDed with the value mask; their non-finite entries read as 0), and the
        chunked path skips their blocks. May be traced. Out-of-range values given on the
        host raise a ValueError; traced ones are reported when the caller runs under
        ``jax.experimental.checkify.checkify(f, errors=checkify.user_checks)`` (without
        checkify the check adds nothing), and otherwise give unspecified finite rows.
      window: None or a sliding window ``(left, right)``: query ``i`` sees keys
        ``i - left <= j <= i + right`` (global positions, top-left aligned like
        ``causal``; a None side, or one of 2**30 or more, is unbounded). With
        ``causal=True``, ``(w, 0)`` is a causal sliding window. The chunked path
        computes only the blocks inside the band.
      logits_soft_cap: None or a finite float ``cap > 0``: the logits become
        ``cap * tanh(logits / cap)`` (Gemma 2's soft-capping), after ``scale`` /
        ``concat_score_weight`` and ``bias`` (as tokamax caps ``scale * q·k + bias``) and
        before the masks, so masked logits are ``capped - 1e9``. Exact in values and in
        both derivative modes on ``"xla"`` and ``"chunked"``; ``"pallas_tpu"`` takes it
        natively; ``"cudnn"`` and ``"pallas_gpu"`` cannot (the automatic choice passes
        them over, saying why).
      score_mod: None or ``score_mod(scores, q_pos, kv_pos) -> scores``, a function that
        changes the logits after the soft-cap and before the masks (ALiBi, relative
        positions; see :mod:`flax_dotattn.mods`). ``scores`` is ``[..., Bq, Bk]`` in the
        compute dtype with the call's batch dims, ``q_pos`` int32 ``[Bq, 1]``
        (``[..., Bq, 1]`` when ``query_offset`` differs per sequence), ``kv_pos`` int32
        ``[1, Bk]``: absolute positions (query ``i`` at ``query_offset + i``). It must be
        vectorised and return the shape it receives. ``"xla"`` calls it once on every
        pair, ``"chunked"`` once per block in O(T) memory; gradients (``grad``, ``jvp``,
        under ``jit`` and ``vmap``) reach the arrays it closes over. The chunked path
        skips hidden blocks taking its outputs to lie within ``±1e8``. The fused kernels
        do not take it (the automatic choice passes them over).
      mask_mod: None or ``mask_mod(q_pos, kv_pos) -> bool`` broadcastable to
        ``[..., Bq, Bk]``, ANDed with every other mask (hidden pairs get 1e9 subtracted).
        The chunked path computes no block it hides: a function of positions and
        constants is classified into a block map while tracing; one that reads traced
        arrays is evaluated per block at run time.
      score_mode: ``"dot"`` (``query @ key^T``) or ``"concat"``
        (``sum(tanh(query + key))``), Keras's ``score_mode``.
      dropout_rate: dropout on the attention weights, a Python float in ``[0, 1)``
        (Keras's ``dropout``).
      dropout_rng: PRNG key; required when dropout is active.
      deterministic: True disables dropout (as at inference), False applies it; it must
        be given whenever ``dropout_rate > 0``.
      return_attention_scores: also return the (post-dropout) attention weights.
      precision: matmul precision: None, a ``jax.lax.Precision`` or its name
        (``"default"``, ``"high"``, ``"highest"``, any case).
      implementation: None (choose automatically by shape, dtype, backend and
        features), ``"xla"`` (materialise the ``[..., Tq, Tv]`` scores) or
        ``"chunked"`` (online softmax over blocks: O(T · block) memory in forward,
        backward and forward-mode derivatives; cannot return the weights, and its dropout
        pattern differs from the materialised path's, with the same statistics), or
        ``"cudnn"`` (GPU only: ``jax.nn.dot_product_attention``'s fused kernel, for
        float16/bfloat16, ``"dot"`` scores, ``D == Dv`` a multiple of 8 up to 128, bias,
        masks, key padding as lengths, causal and left windows with ``Tq == Tv``; no
        segment ids, dropout or returned weights), or ``"pallas_tpu"`` (JAX's splash
        attention: ``"dot"`` scores, causal, window, key padding, segment ids and a
        host-int ``query_offset``; no bias, dense mask, dropout or returned weights;
        Pallas interpret mode off TPU, a slow testing mode), or ``"pallas_gpu"`` (JAX's
        Pallas GPU flash attention, Triton: ``"dot"`` scores, float32/bfloat16/float16,
        causal, key padding and segment ids equal on queries and keys, ``Tq <= Tv``; no
        bias, dense mask, window, dropout or returned weights; Pallas interpret mode off
        ``cuda``). The automatic choice is made per platform when the call is lowered
        (see :func:`which_implementation`): ``"pallas_tpu"`` on TPU, ``"cudnn"`` then
        ``"pallas_gpu"`` on GPU when eligible, else ``"chunked"`` from 2 MiB of
        float32 scores per sequence (from ``Tq = Tv = 725``; 16 MiB of ``[Tq, Tv, D]`` in
        concat mode), else ``"xla"``: one sequence's size, never the batch's, so a call
        under ``jax.vmap`` chooses what the batched call chooses. Every path supports
        ``jax.grad``, ``jax.vmap`` and empty dimensions, and every path but ``"cudnn"``
        (``jax.nn``'s cuDNN attention has no forward mode) ``jax.jvp``/``jax.jacfwd``.
      block_size: the chunked path's blocks: None (the measured default per score mode
        and mask), an int, a pair ``(Bq, Bk)`` or a :class:`BlockSizes`.

    Returns:
      ``output [..., Tq, Dv]`` in the inputs' dtype, or ``(output, weights)`` with
      ``weights [..., Tq, Tv]`` when ``return_attention_scores`` is True. The weights
      are not zeroed for masked queries (as in Keras).

    Raises:
      ValueError: on bad shapes, dtypes, masks, params keys, ``score_mode``,
        ``implementation``, dropout settings, or a non-bool ``causal``.

    Examples:
      Keras's own 2x2 example; the weights are ``[1, e] / (1 + e)``:

      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> from flax_dotattn import dot_attention
      >>> query = jnp.array([[1.0, 0.0], [0.0, 1.0]])   # [Tq=2, D=2]
      >>> key = jnp.array([[0.0, 1.0], [1.0, 0.0]])     # [Tv=2, D=2]
      >>> value = jnp.array([[1.0, 2.0], [3.0, 4.0]])   # [Tv=2, Dv=2]
      >>> out, w = dot_attention(None, query, value, key, return_attention_scores=True)
      >>> print(np.asarray(w).round(3))
      [[0.269 0.731]
       [0.731 0.269]]
      >>> print(np.asarray(out).round(3))
      [[2.462 3.462]
       [1.538 2.538]]

      Causal attention with a learned scale and a padding mask on the keys:

      >>> params = {"scale": jnp.float32(2.0)}
      >>> masks = (None, jnp.array([True, False]))
      >>> print(dot_attention(params, query, value, key, masks, causal=True))
      [[1. 2.]
       [1. 2.]]

      Grouped-query attention: 2 query heads share each of 2 key/value heads.

      >>> q = jnp.ones((1, 2, 2, 3, 4))   # [B, Hkv, G, Tq, D]
      >>> kv = jnp.ones((1, 2, 1, 5, 4))  # [B, Hkv, 1, Tv, D]
      >>> dot_attention(None, q, kv, causal=True).shape
      (1, 2, 2, 3, 4)
    """
    return attend(validation.check_call(locals()))


#: Read once at import: documentation tools may later replace ``__signature__``.
_SIGNATURE = inspect.signature(dot_attention)


def which_implementation(
    params: Params,
    query: Array,
    value: Array,
    key: Array | None = None,
    masks: Masks = None,
    causal: bool = False,
    *,
    platform: str | None = None,
    **keywords: Unpack[AllKeywords],
) -> dispatch.Plan:
    """Which implementation :func:`dot_attention` would run for these arguments on a
    platform, and why.

    Takes exactly :func:`dot_attention`'s arguments (arrays, not shapes) and checks them
    the same way; nothing is computed. The choice is made per platform when the call is
    lowered, so a call exported for TPU from a CPU host runs what ``platform="tpu"`` says.

    Args:
      params, query, value, key, masks, causal: see :func:`dot_attention`.
      platform: the platform to plan for: None (the current backend), ``"cpu"``,
        ``"tpu"``, ``"cuda"`` (or ``"gpu"``) or ``"rocm"``.
      **keywords: :func:`dot_attention`'s keyword-only arguments.

    Returns:
      A ``Plan`` named tuple: ``implementation`` (``"xla"``, ``"chunked"``, ``"cudnn"``,
      ``"pallas_tpu"`` or ``"pallas_gpu"``) and a human-readable ``reason`` (on an
      accelerator, why its kernel does not take the call when it does not).

    Raises:
      TypeError: for a keyword :func:`dot_attention` does not take.
      ValueError: for everything :func:`dot_attention` rejects, and an unknown
        ``platform``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax_dotattn import which_implementation
      >>> which_implementation(None, jnp.ones((8, 128, 64)), jnp.ones((8, 128, 64))).implementation
      'xla'
      >>> plan = which_implementation(None, jnp.ones((1, 4096, 64)), jnp.ones((1, 4096, 64)))
      >>> plan.implementation, plan.reason
      ('chunked', "one sequence's materialised scores would take 64 MiB >= 2 MiB")
      >>> q = jnp.ones((2, 1024, 128), jnp.bfloat16)
      >>> which_implementation(None, q, q, causal=True, platform="tpu").implementation
      'pallas_tpu'
    """
    bound = _SIGNATURE.bind(params, query, value, key, masks, causal, **keywords)
    call = validation.check_call(bound.arguments)
    return dispatch.plan(call.inputs, call.options, dispatch.check_platform(platform))


def attend(call: validation.CheckedCall) -> Array | tuple[Array, Array]:
    """:func:`dot_attention` on checked arguments: plan, run, mask the queries, cast."""
    output, weights = runner.run_per_platform(call)
    output = validation.finish(output, call.inputs)  # [..., Tq, Dv]
    if weights is None or not call.options.return_attention_scores:
        return output
    return output, weights.astype(call.inputs.dtype)  # [..., Tq, Tv]
