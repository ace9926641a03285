"""Broadcasting masks, full masks, additive bias, packed sequences and sliding windows.

The reference is written here from the definition, independent of the library: the dense
``[..., Tq, Tv]`` keep-mask built by hand with NumPy, then a plain einsum-softmax-einsum
with Keras's rule (masked logits get 1e9 subtracted, masked queries give zero rows).
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh

from flax_dotattn import (
    DotAttention,
    DotAttentionConfig,
    dot_attention,
    sequence_parallel_attention,
)
from flax_dotattn import nnx as fdnnx
from flax_dotattn._src import validation
from flax_dotattn._src.kernels import chunked
from flax_dotattn._src.kernels.chunked import kernel, skipping


def dense_keep(batch, tq, tv, *, value_mask=None, attention_mask=None, segments=None,
               causal=False, window=None):  # fmt: skip
    """The [..., Tq, Tv] bool keep-mask, by hand."""
    keep = np.ones(batch + (tq, tv), bool)
    i, j = np.arange(tq)[:, None], np.arange(tv)[None, :]
    if causal:
        keep &= j <= i
    if window is not None:
        left, right = window
        if left is not None:
            keep &= j >= i - left
        if right is not None:
            keep &= j <= i + right
    if value_mask is not None:
        keep &= np.broadcast_to(np.asarray(value_mask), batch + (tv,))[..., None, :]
    if attention_mask is not None:
        keep &= np.broadcast_to(np.asarray(attention_mask) != 0, batch + (tq, tv))
    if segments is not None:
        qs = np.broadcast_to(np.asarray(segments[0]), batch + (tq,))
        ks = np.broadcast_to(np.asarray(segments[1]), batch + (tv,))
        keep &= qs[..., :, None] == ks[..., None, :]
    return keep


def reference(q, k, v, keep, *, bias=None, query_mask=None, scale=None, weight=None):
    """Keras's rule on a dense keep-mask: plain jnp, differentiable."""
    if weight is None:
        s = jnp.einsum("...qd,...kd->...qk", q, k, precision="highest")
        s = s if scale is None else s * scale
    else:
        pre = q[..., :, None, :] + k[..., None, :, :]
        s = weight * jnp.sum(jnp.tanh(pre if scale is None else scale * pre), -1)
    if bias is not None:
        s = s + jnp.broadcast_to(bias, s.shape)
    s = jnp.where(keep, s, s - 1e9)
    w = jax.nn.softmax(s, axis=-1)
    out = jnp.einsum("...qk,...kd->...qd", w, v, precision="highest")
    if query_mask is not None:
        out = jnp.where(np.broadcast_to(query_mask, out.shape[:-1])[..., None], out, 0)
    return out


BATCH, TQ, TV = (2, 3), 13, 11


def _case(rng, name):
    """Inputs ``[2, 3, T, D]`` (B=2, H=3) and one combination of features."""
    q = jnp.asarray(rng.normal(size=BATCH + (TQ, 5)), jnp.float32)
    k = jnp.asarray(rng.normal(size=BATCH + (TV, 5)), jnp.float32)
    v = jnp.asarray(rng.normal(size=BATCH + (TV, 4)), jnp.float32)
    kw, ref = {}, {}
    if "value_mask_shared" in name:  # [Tv], shared by the batch
        kw["masks"] = (None, jnp.asarray(rng.random(TV) > 0.3))
        ref["value_mask"] = kw["masks"][1]
    if "value_mask_heads" in name:  # [B, 1, Tv] for [B, H, T, D]
        vm = jnp.asarray(rng.random((2, 1, TV)) > 0.3).at[1, 0, :].set(False)
        qm = jnp.asarray(rng.random((2, 1, TQ)) > 0.2)
        kw["masks"] = (qm, vm)
        ref["value_mask"], ref["query_mask"] = vm, qm
    if "full_mask" in name:  # [Tq, Tv], broadcast over batch and heads
        am = jnp.asarray(rng.random((TQ, TV)) > 0.4).at[2].set(False)
        kw["attention_mask"] = am
        ref["attention_mask"] = am
    if "head_mask" in name:  # numeric [B, 1, Tq, Tv]
        am = jnp.asarray(rng.random((2, 1, TQ, TV)) > 0.5, jnp.int32)
        kw["attention_mask"] = am
        ref["attention_mask"] = am
    # Full masks and biases broadcast along Tq or Tv (size-1 trailing dims).
    if "row_mask" in name:  # numeric [B, 1, Tq, 1]: whole query rows masked
        kw["attention_mask"] = jnp.asarray(rng.random((2, 1, TQ, 1)) > 0.3, jnp.float32)
        ref["attention_mask"] = kw["attention_mask"]
    if "key_padding" in name:  # bool [B, 1, 1, Tv]
        kw["attention_mask"] = jnp.asarray(rng.random((2, 1, 1, TV)) > 0.3)
        ref["attention_mask"] = kw["attention_mask"]
    if "key_bias" in name:  # [1, 3, 1, Tv]: per head and key
        kw["bias"] = jnp.asarray(rng.normal(size=(1, 3, 1, TV)), jnp.float32)
        ref["bias"] = kw["bias"]
    elif "row_bias" in name:  # [Tq, 1]: per query row (moves nothing but masked rows)
        kw["bias"] = jnp.asarray(rng.normal(size=(TQ, 1)), jnp.float32)
        ref["bias"] = kw["bias"]
    elif "bias" in name:  # [1, 3, Tq, Tv]: per head, ALiBi-like
        slopes = jnp.asarray([0.5, 0.25, 0.125])[:, None, None]
        dist = jnp.arange(TV)[None, :] - jnp.arange(TQ)[:, None]  # [Tq, Tv]
        kw["bias"] = (-slopes * jnp.abs(dist)[None])[None].astype(jnp.float32)
        ref["bias"] = kw["bias"]
    if "segments" in name:
        qs = jnp.asarray(np.repeat([0, 1, 2], [5, 4, 4]))[None, None]  # [1, 1, Tq]
        ks = jnp.asarray(np.repeat([0, 1, 2], [4, 4, 3]))  # [Tv]
        kw["segment_ids"] = (qs, ks)
        ref["segments"] = (qs, ks)
    if "window" in name:
        kw["window"] = (3, 1)
        ref["window"] = (3, 1)
    if "causal" in name:
        kw["causal"] = True
        ref["causal"] = True
    return q, k, v, kw, ref


CASES = [
    "value_mask_shared",
    "value_mask_heads",
    "full_mask",
    "head_mask",
    "bias",
    "segments",
    "window",
    "window_causal",
    "full_mask_bias_causal",
    "segments_window_value_mask_heads_bias",
    "head_mask_segments_causal_value_mask_shared",
    "key_bias_row_mask_causal",
    "key_padding_row_bias_window",
]


def _expected(q, k, v, ref, scale=None, weight=None):
    query_mask = ref.pop("query_mask", None)
    bias = ref.pop("bias", None)
    keep = dense_keep(BATCH, TQ, TV, **ref)
    return reference(q, k, v, keep, bias=bias, query_mask=query_mask, scale=scale, weight=weight)


# Every case in dot mode; concat mode (same masking code, another score function) on the
# combinations, to keep the suite's compile time down.
#: One feature each; the combinations after them cover every one of these.
SINGLE = set(CASES[:7])
SCORE_CASES = (
    [(name, "dot") for name in CASES]
    + [(name, "concat") for name in CASES if name.count("_") >= 2 and "value_mask" in name]
    + [("bias", "concat")]
)


@pytest.mark.parametrize("implementation", [pytest.param("xla", marks=pytest.mark.slow), "chunked"])
@pytest.mark.parametrize(
    "name,score_mode",
    [  # the quick tier (-m "not slow") runs the dot-mode combinations, which cover the
        # single features; the single features and the concat cases run in the full suite
        pytest.param(
            n, m, id=f"{n}-{m}", marks=[pytest.mark.slow] if m == "concat" or n in SINGLE else []
        )
        for n, m in SCORE_CASES
    ],
)
def test_values_and_gradients_match_the_dense_reference(name, implementation, score_mode, rng):
    q, k, v, kw, ref = _case(rng, name)
    params = {"scale": jnp.float32(0.7)}
    weight = None
    if score_mode == "concat":
        params["concat_score_weight"] = weight = jnp.float32(1.3)
    extra = {"block_size": (4, 3)} if implementation == "chunked" else {}

    def ours(q, k, v, bias):
        args = dict(kw, bias=bias) if bias is not None else kw
        return dot_attention(
            params, q, v, k, score_mode=score_mode, implementation=implementation,
            **extra, **args,
        )  # fmt: skip

    def theirs(q, k, v, bias):
        r = dict(ref, bias=bias) if bias is not None else dict(ref)
        return _expected(q, k, v, r, scale=params["scale"], weight=weight)

    bias = kw.get("bias")
    assert_close(jax.jit(ours)(q, k, v, bias), theirs(q, k, v, bias), factor=5)
    argnums = (0, 1, 2, 3) if bias is not None else (0, 1, 2)

    def loss(fn):
        return lambda *a: jnp.sum(jnp.sin(fn(*a)))

    got = jax.jit(jax.grad(loss(ours), argnums))(q, k, v, bias)
    want = jax.grad(loss(theirs), argnums)(q, k, v, bias)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        assert_close(g, w, factor=10)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
def test_low_precision_chunked_matches_the_reference(dtype, rng):
    q, k, v, kw, ref = _case(rng, "segments_window_value_mask_heads_bias")
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    out = dot_attention(None, q, v, k, implementation="chunked", block_size=(5, 2), **kw)
    expected = _expected(*(x.astype(jnp.float32) for x in (q, k, v)), ref)
    assert out.dtype == dtype
    assert_close(out, expected, dtype, factor=2)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    ["full_mask_bias_causal", "segments_window_value_mask_heads_bias", "key_bias_row_mask_causal"],
)
def test_sequence_parallel_takes_every_mask_with_global_positions(name, rng):
    q, k, v, kw, _ = _case(rng, name)
    tv = 12  # divisible by the 4 devices: pad keys by one (masked out by the value mask)
    pad = [(0, 0), (0, 0), (0, tv - TV), (0, 0)]
    k, v = jnp.pad(k, pad), jnp.pad(v, pad)
    mesh = Mesh(np.array(jax.devices()[:4]), ("seq",))

    def widen(x, axis_len, fill):
        if x.shape[-1] != TV:
            return x
        widths = [(0, 0)] * (x.ndim - 1) + [(0, axis_len - TV)]
        return jnp.pad(x, widths, constant_values=fill)

    masks = kw.get("masks", (None, None))
    vm = jnp.ones(tv, bool).at[TV:].set(False)
    if masks[1] is not None:
        wide = widen(masks[1], tv, False)
        vm = wide & jnp.broadcast_to(vm, wide.shape)
    kw2 = dict(kw, masks=(masks[0], vm))
    for key_, fill in (("attention_mask", 0), ("bias", 0.0)):
        if key_ in kw2:
            kw2[key_] = widen(kw2[key_], tv, fill)
    if "segment_ids" in kw2:
        kw2["segment_ids"] = (kw2["segment_ids"][0], widen(kw2["segment_ids"][1], tv, 99))
    out = jax.jit(
        lambda q, k, v: sequence_parallel_attention(
            None, q, v, k, mesh=mesh, axis_name="seq", block_size=(4, 2), **kw2
        )
    )(q, k, v)
    expected = dot_attention(None, q, v, k, implementation="xla", **kw2)
    assert_close(out, expected, factor=5)


def test_modules_pass_the_new_arguments(rng):
    q, k, v, kw, _ = _case(rng, "full_mask_bias_causal")
    masks = {key_: kw[key_] for key_ in ("attention_mask", "bias")}
    expected = dot_attention(None, q, v, k, causal=True, window=(2, 0), **masks)
    layer = DotAttention(window=(2, 0))
    variables = layer.init(jax.random.key(0), q, v, k)
    assert_close(layer.apply(variables, q, v, k, causal=True, **masks), expected)
    assert_close(fdnnx.DotAttention(causal=True)(q, v, k, window=(2, 0), **masks), expected)


# -- properties ---------------------------------------------------------------------------


@pytest.mark.slow
@settings(deadline=None)
@given(
    cuts=st.sets(st.integers(1, 11), max_size=4),
    block=st.sampled_from([(2, 3), (5, 4)]),
    causal=st.booleans(),
)
def test_a_packed_row_equals_its_sequences_run_one_by_one(cuts, block, causal):
    # One row of 12 tokens cut into sequences at ``cuts`` (a fixed shape, so the packed
    # call compiles once per block size and causal flag).
    t = 12
    rng = np.random.default_rng(len(cuts))
    q, k, v = (jnp.asarray(rng.normal(size=(t, 3)), jnp.float32) for _ in range(3))
    starts = [0, *sorted(cuts), t]
    ids = jnp.asarray(np.repeat(np.arange(len(starts) - 1), np.diff(starts)))
    # Positions are global, so causal + segments = causal inside each sequence.
    packed = _packed(q, k, v, ids, causal=causal, block=block)
    for a, b in itertools.pairwise(starts):
        alone = dot_attention(None, q[a:b], v[a:b], k[a:b], causal=causal, implementation="xla")
        assert_close(packed[a:b], alone)


@functools.partial(jax.jit, static_argnames=("causal", "block"))
def _packed(q, k, v, ids, *, causal, block):
    return dot_attention(
        None, q, v, k, causal=causal, segment_ids=(ids, ids), implementation="chunked",
        block_size=block,
    )  # fmt: skip


@pytest.mark.slow
@settings(deadline=None)
@given(t=st.sampled_from([1, 9]), causal=st.booleans(), impl=st.sampled_from(["xla", "chunked"]))
def test_a_window_as_wide_as_the_sequence_changes_nothing(t, causal, impl):
    rng = np.random.default_rng(t)
    q, v = (jnp.asarray(rng.normal(size=(2, t, 3)), jnp.float32) for _ in range(2))
    wide = dot_attention(None, q, v, causal=causal, window=(t, t), implementation=impl)
    assert_close(wide, dot_attention(None, q, v, causal=causal, implementation=impl))


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_a_window_side_beyond_int32_positions_is_unbounded(impl):
    # 2**31 - 1 would overflow int32 positions (i + right); such sides mean "no limit".
    rng = np.random.default_rng(0)
    q, v = (jnp.asarray(rng.normal(size=(2, 9, 3)), jnp.float32) for _ in range(2))
    got = dot_attention(None, q, v, window=(2, 2**31 - 1), implementation=impl, block_size=4)
    assert_close(got, dot_attention(None, q, v, window=(2, None), implementation="xla"))
    assert DotAttentionConfig(window=(2**40, 1)).window == (None, 1)


@settings(deadline=None)
@given(shape=st.sampled_from([(11,), (1, 11), (2, 1, 11), (1, 3, 11)]), seed=st.integers(0, 99))
def test_broadcast_masks_equal_their_explicit_broadcast(shape, seed):
    rng = np.random.default_rng(seed)
    q, v = (jnp.asarray(rng.normal(size=(2, 3, 11, 4)), jnp.float32) for _ in range(2))
    vm = jnp.asarray(rng.random(shape) > 0.4)
    am = jnp.asarray(rng.random(shape[:-1] + (11, 11)) > 0.4)
    explicit = (None, jnp.broadcast_to(vm, (2, 3, 11)))
    for impl in ("xla", "chunked"):
        got = dot_attention(None, q, v, masks=(None, vm), attention_mask=am, implementation=impl)
        want = dot_attention(
            None, q, v, masks=explicit, attention_mask=jnp.broadcast_to(am, (2, 3, 11, 11)),
            implementation="xla",
        )  # fmt: skip
        assert_close(got, want)


# -- cost ----------------------------------------------------------------------------------


def test_eager_chunked_calls_reuse_the_compiled_kernel():
    q = jnp.ones((1, 64, 8))
    dot_attention(None, q, q, implementation="chunked", block_size=16)
    before = kernel.attend_jit._cache_size()
    for _ in range(3):
        dot_attention(None, q + 1.0, q, implementation="chunked", block_size=16)
    assert kernel.attend_jit._cache_size() <= before + 1


def test_a_sliding_window_computes_only_the_band():
    # T = 16384 with a (256, 0) causal window: the compiled program's temporaries stay
    # linear in T, and the chunked sweep visits O(T * window) blocks (checked via the band).
    x = jnp.ones((1, 16384, 8))
    call = validation.check_call(dict(params=None, query=x, value=x, causal=True, window=(256, 0)))
    static, _ = chunked.prepare(call)
    block_q, block_k = static.forward_blocks
    _, _, n_steps = skipping.band(static, static.forward_blocks, 0, 3, 16384 // block_k)
    assert n_steps * block_k <= block_q + 256 + 2 * block_k


@pytest.mark.parametrize("impl", ["xla", "chunked"])
@pytest.mark.parametrize(
    "q_ids,kv_ids",
    [
        (np.array([4294967295], np.uint32), np.array([-1], np.int32)),
        (np.array([2**33], np.int64), np.array([0], np.int64)),
        (np.array([0], np.int64), np.array([2**33], np.int64)),
    ],
    ids=["uint32_max_vs_int32_minus_1", "int64_2_pow_33_vs_0", "0_vs_int64_2_pow_33"],
)
def test_segment_ids_that_only_a_wrap_would_equate_raise(q_ids, kv_ids, impl):
    q = jnp.ones((1, 1, 4))
    with pytest.raises(ValueError, match="segment_ids"):
        dot_attention(None, q, q, segment_ids=(q_ids, kv_ids), implementation=impl)


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_segment_ids_of_mixed_integer_types_compare_by_value(impl, rng):
    q = jnp.asarray(rng.normal(size=(1, 5, 4)), jnp.float32)
    ids = np.array([0, 0, 1, 1, 300])
    expected = dot_attention(None, q, q, segment_ids=(ids, ids), implementation="xla")
    for q_ids, kv_ids in [
        (ids.astype(np.int64), ids.astype(np.int16)),
        (ids.astype(np.uint16), ids.astype(np.int32)),
        (jnp.asarray(ids, jnp.uint32), jnp.asarray(ids, jnp.uint16)),
    ]:
        out = dot_attention(None, q, q, segment_ids=(q_ids, kv_ids), implementation=impl)
        np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
