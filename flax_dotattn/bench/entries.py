"""What one benchmark entry times: a jitted function of ``q, k, v`` and those inputs.

An entry is an implementation (:data:`IMPLS`) in a mode (:data:`MODES`: the forward pass,
or forward+backward as the gradients of ``sum(out**2)``) at a shape ``[B, T, D]``, float32;
or one of the masking scenarios (:data:`SCENARIO_ENTRIES`). Entries travel as plain dicts
(:func:`build_entry`), so that the memory probe can rebuild one in a fresh process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from flax_dotattn import dot_attention, flax_attention_fn, mods
from flax_dotattn.bench import baselines, device

IMPLS = ("naive", "default", "xla", "chunked", "jax_nn", "keras", "torch_sdpa")
SCENARIOS = (
    "window",
    "packing",
    "gqa",
    "decode",
    "flax",
    "serving",
    "alibi",
    "softcap",
    "mask_mods",
)
MODES = ("fwd", "fwd_bwd")
#: The sequence length at which the scenarios are timed.
SCENARIO_LENGTH = 16384
#: The entries of each scenario; the first is the one the others are compared with.
SCENARIO_ENTRIES = {
    "window": ("causal_full", "causal_window_256"),
    "packing": ("packed_segment_ids", "packed_full_mask_xla", "packed_as_batch"),
    "gqa": ("gqa_repeated_kv", "gqa_shared_kv", "mqa_shared_kv"),
    "decode": ("decode_recompute", "decode_cached"),
    "flax": ("flax_default", "flax_attention_fn"),
    "alibi": ("causal_chunked", "causal_alibi_score_mod"),
    "softcap": ("full_chunked", "full_soft_cap"),
    "mask_mods": (
        "causal_builtin", "causal_mask_mod", "prefix_lm_mask_mod", "documents_segment_ids",
        "documents_mask_mod",
    ),
}  # fmt: skip
#: Scenarios timed at another length than :data:`SCENARIO_LENGTH`.
SCENARIO_LENGTHS = {"gqa": 2048, "flax": 8192, "softcap": 4096, "mask_mods": 4096}
#: The entries whose peak memory a scenario measures (a fresh process each).
MEMORY_ENTRIES = {
    "gqa": SCENARIO_ENTRIES["gqa"],
    "flax": SCENARIO_ENTRIES["flax"],
    "alibi": ("causal_alibi_score_mod", "causal_alibi_dense_bias"),
}
#: Grouped-query attention: batch, query heads and key/value heads (8 groups of 4).
GQA_BATCH, GQA_HEADS, GQA_KV_HEADS = 4, 32, 4
#: Cache lengths at which one decoding step is timed (the decode scenario).
DECODE_LENGTHS = (1024, 2048, 4096, 8192, 16384)
#: Heads (as the batch dim) of the decode scenario's step.
DECODE_HEADS = 4
#: Heads of the Flax module of the flax scenario (its features: heads x D).
FLAX_HEADS = 8
#: Lengths at which the window's peak memory is measured (it should grow linearly).
WINDOW_MEMORY_LENGTHS = (4096, 8192, 16384)


def _inputs(b: int, t: int, d: int):
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (b, t, d), jnp.float32) * 0.1
    k = jax.random.normal(kk, (b, t, d), jnp.float32) * 0.1
    v = jax.random.normal(kv, (b, t, d), jnp.float32)
    return q, k, v


def _jitted(attend: Callable, mode: str) -> Callable:
    if mode == "fwd":
        return jax.jit(attend)
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v) ** 2), argnums=(0, 1, 2)))


def _ours(causal: bool, implementation: Any) -> baselines.Attend:
    def attend(q, k, v):
        return dot_attention(None, q, v, k, causal=causal, implementation=implementation)

    return attend


def _attend(impl: str, t: int, causal: bool) -> baselines.Attend:
    if impl == "naive":
        return baselines.naive(t, causal)
    if impl in ("default", "xla", "chunked"):
        return _ours(causal, None if impl == "default" else impl)
    if impl == "jax_nn":
        return baselines.jax_nn(causal)
    if impl == "keras":
        return baselines.keras_attention(causal)
    raise ValueError(f"impl must be one of {IMPLS}; received {impl!r}.")


def build(
    impl: str, mode: str, b: int, t: int, d: int, causal: bool = False, check: bool = True
) -> tuple[Callable, tuple]:
    """Returns a jitted function (a torch one for ``torch_sdpa``) and its inputs for one
    benchmark entry.

    ``torch_sdpa`` is checked against :func:`flax_dotattn.dot_attention` first, unless
    ``check`` is False (the memory probe must not run it before measuring).
    """
    q, k, v = _inputs(b, t, d)
    if impl != "torch_sdpa":
        return _jitted(_attend(impl, t, causal), mode), (q, k, v)
    run, args = baselines.torch_sdpa(mode, q, k, v, causal)
    if check:
        ours = _jitted(_ours(causal, None), mode)(q, k, v)
        baselines.assert_torch_matches(ours, run(*args), mode)
    return run, args


def build_scenario(name: str, t: int = SCENARIO_LENGTH, d: int = 64) -> tuple[Callable, tuple]:
    """One forward+backward entry of ``--scenarios``, by name:

    * ``causal_full``: full causal attention, automatic dispatch;
    * ``causal_window_256``: causal sliding window ``(256, 0)``;
    * ``packed_segment_ids``: 8 sequences packed into one row with ``segment_ids``;
    * ``packed_full_mask_xla``: the same row with a block-diagonal ``attention_mask``
      ``[T, T]`` on the xla path (what a user would build by hand);
    * ``packed_as_batch``: the 8 sequences as a batch of 8;
    * ``gqa_shared_kv``: grouped-query attention, query ``[B, Hkv, G, T, D]`` with
      key/value ``[B, Hkv, 1, T, D]`` (:data:`GQA_BATCH`, ...: 32 query heads, 4
      key/value heads), automatic dispatch;
    * ``gqa_repeated_kv``: the same with key/value repeated to ``[B, Hkv, G, T, D]`` inside
      the function (``jnp.repeat``, as without broadcasting);
    * ``mqa_shared_kv``: multi-query attention, one key/value head for the 32 query heads;
    * ``decode_cached``, ``decode_recompute``: one decoding step at cache length ``t``,
      forward only (see :func:`_decode_step`);
    * ``flax_default``, ``flax_attention_fn``: Flax's ``nn.MultiHeadDotProductAttention``
      (see :func:`_flax_module`) with its default ``attention_fn`` or with
      :func:`flax_dotattn.flax_attention_fn`.
    * ``causal_chunked``: causal attention on the chunked path; ``causal_alibi_score_mod``:
      the same with ALiBi (slope 1/16) as a ``score_mod``; ``causal_alibi_dense_bias``:
      ALiBi as a dense ``bias [T, T]`` (what it costs without a score function);
    * ``full_chunked``: full attention on the chunked path; ``full_soft_cap``: the same
      with ``logits_soft_cap=50``;
    * ``causal_builtin`` / ``causal_mask_mod``: ``causal=True`` and the same as a
      ``mask_mod``; ``prefix_lm_mask_mod``: a prefix-LM mask (prefix ``T / 4``);
      ``documents_segment_ids`` / ``documents_mask_mod``: 8 packed documents as
      ``segment_ids`` and as a ``mask_mod`` (chunked path for all).
    """
    if name.startswith(("gqa_", "mqa_")):
        return _gqa_scenario(name, t, d)
    if name.startswith("decode_"):
        return _decode_step(name, t, d)
    if name.startswith("flax_"):
        return _flax_module(name, t, d)
    if name in _MOD_SCENARIOS:
        return _mod_scenario(name, t, d)
    q, k, v = _inputs(1, t, d)
    segments = jnp.repeat(jnp.arange(8), t // 8)  # [T]
    table: dict[str, dict[str, Any]] = {
        "causal_full": dict(causal=True),
        "causal_window_256": dict(causal=True, window=(256, 0)),
        "packed_segment_ids": dict(segment_ids=(segments, segments)),
        "packed_full_mask_xla": dict(
            attention_mask=segments[:, None] == segments[None, :], implementation="xla"
        ),
        "packed_as_batch": dict(),
    }
    options = table[name]
    if name == "packed_as_batch":
        q, k, v = (x.reshape(8, t // 8, d) for x in (q, k, v))
    return _jitted(lambda q, k, v: dot_attention(None, q, v, k, **options), "fwd_bwd"), (q, k, v)


_MOD_SCENARIOS = (
    "causal_chunked", "causal_alibi_score_mod", "causal_alibi_dense_bias", "full_chunked",
    "full_soft_cap", "causal_builtin", "causal_mask_mod", "prefix_lm_mask_mod",
    "documents_segment_ids", "documents_mask_mod",
)  # fmt: skip


def _mod_scenario(name: str, t: int, d: int) -> tuple[Callable, tuple]:
    """The score/mask function entries of :func:`build_scenario`, forward+backward."""
    q, k, v = _inputs(1, t, d)
    slope = 1.0 / 16
    segments = jnp.repeat(jnp.arange(8), t // 8)  # [T]
    chunked: dict[str, Any] = dict(implementation="chunked")
    table: dict[str, dict[str, Any]] = {
        "causal_chunked": dict(causal=True, **chunked),
        "causal_alibi_score_mod": dict(causal=True, score_mod=mods.alibi(slope), **chunked),
        "full_chunked": dict(**chunked),
        "full_soft_cap": dict(logits_soft_cap=50.0, **chunked),
        "causal_builtin": dict(causal=True, **chunked),
        "causal_mask_mod": dict(mask_mod=mods.causal(), **chunked),
        "prefix_lm_mask_mod": dict(mask_mod=mods.prefix_lm(t // 4), **chunked),
        "documents_segment_ids": dict(segment_ids=(segments, segments), **chunked),
        "documents_mask_mod": dict(mask_mod=mods.document(segments), **chunked),
    }
    if name == "causal_alibi_dense_bias":
        i = jnp.arange(t)

        def with_bias(q, k, v):  # the [T, T] bias is formed inside, as a user would
            bias = -slope * (i[:, None] - i[None, :]).astype(q.dtype)[None]
            return dot_attention(None, q, v, k, causal=True, bias=bias, **chunked)

        return _jitted(with_bias, "fwd_bwd"), (q, k, v)
    options = table[name]
    return _jitted(lambda q, k, v: dot_attention(None, q, v, k, **options), "fwd_bwd"), (q, k, v)


def _gqa_scenario(name: str, t: int, d: int) -> tuple[Callable, tuple]:
    kv_heads = 1 if name.startswith("mqa_") else GQA_KV_HEADS
    groups = GQA_HEADS // kv_heads
    q, k, v = _inputs(GQA_BATCH * GQA_HEADS, t, d)
    q = q.reshape(GQA_BATCH, kv_heads, groups, t, d)  # [B, Hkv, G, T, D]
    k, v = (x[: GQA_BATCH * kv_heads].reshape(GQA_BATCH, kv_heads, 1, t, d)
            for x in (k, v))  # fmt: skip
    repeat = name == "gqa_repeated_kv"

    def attend(q, k, v):
        if repeat:
            k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
        return dot_attention(None, q, v, k, causal=True)

    return _jitted(attend, "fwd_bwd"), (q, k, v)


def _decode_step(name: str, t: int, d: int) -> tuple[Callable, tuple]:
    """One greedy decoding step's attention, :data:`DECODE_HEADS` heads of depth ``d``,
    the new token at position ``t - 1``:

    * ``decode_cached``: its one query against the filled cache ``[H, t, D]``, with
      ``query_offset = t - 1`` and ``kv_length = t`` (traced, as a decoding loop passes
      them);
    * ``decode_recompute``: causal attention over the whole prefix ``[H, t, D]`` (what a
      model without a cache computes at every step), of which the last row is kept.
    """
    q, k, v = _inputs(DECODE_HEADS, t, d)
    position = jnp.asarray(t - 1, jnp.int32)
    if name == "decode_cached":

        def cached(q, k, v, position):
            return dot_attention(
                None, q, v, k, causal=True, query_offset=position, kv_length=position + 1
            )

        return jax.jit(cached), (q[:, -1:], k, v, position)

    def recompute(q, k, v):
        return dot_attention(None, q, v, k, causal=True)[:, -1:]

    return jax.jit(recompute), (q, k, v)


def _flax_module(name: str, t: int, d: int) -> tuple[Callable, tuple]:
    """Forward+backward (the gradients of ``sum(out**2)`` with respect to the parameters and
    the input) of Flax's ``nn.MultiHeadDotProductAttention``, :data:`FLAX_HEADS` heads of
    depth ``d``, self-attention on ``x [1, t, heads * d]``, with Flax's default
    ``attention_fn`` (``flax_default``) or :func:`flax_dotattn.flax_attention_fn`."""
    fn = nn.dot_product_attention if name == "flax_default" else flax_attention_fn
    module = nn.MultiHeadDotProductAttention(num_heads=FLAX_HEADS, attention_fn=fn)
    x = jax.random.normal(jax.random.key(0), (1, t, FLAX_HEADS * d), jnp.float32)
    params = module.init(jax.random.key(1), x[:, :1])

    def loss(params, x):
        out: jax.Array = module.apply(params, x)  # type: ignore[assignment]
        return jnp.sum(out**2)

    return jax.jit(jax.grad(loss, argnums=(0, 1))), (params, x)


def build_entry(spec: dict[str, Any]) -> tuple[Callable, tuple]:
    """:func:`build`, :func:`build_scenario` or :func:`flax_dotattn.bench.device.build`
    from a spec: ``{"scenario": name, "t": T}``, ``{"device": impl, ...}`` or ``{"impl",
    "mode", "b", "t", "d", "causal"}``."""
    if "device" in spec:
        return device.build(spec)
    if "scenario" in spec:
        return build_scenario(spec["scenario"], spec["t"], spec.get("d", 64))
    return build(
        spec["impl"],
        spec["mode"],
        spec["b"],
        spec["t"],
        spec["d"],
        spec.get("causal", False),
        spec.get("check", True),
    )


def flops(mode: str, b: int, t: int, d: int, causal: bool = False) -> float:
    """Model FLOPs: 2 matmuls forward, 4 more backward (recomputation not counted); half
    of them under ``causal``."""
    per_matmul = 2.0 * b * t * t * d * (0.5 if causal else 1.0)
    return per_matmul * (2 if mode == "fwd" else 6)
