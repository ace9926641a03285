"""``logits_soft_cap``: ``cap * tanh(logits / cap)`` after the scale and the bias, before
the masks, against a dense reference written from that definition (values, ``jax.grad``
and ``jax.jvp``) on every path that takes it; the automatic choice passes over the GPU
kernels, the modules and configs carry it, and ``to_keras`` refuses it."""

import jax
import jax.numpy as jnp
import pytest
from conftest import assert_close
from flax import nnx

from flax_dotattn import (
    DotAttention,
    DotAttentionConfig,
    MultiHeadDotAttention,
    MultiHeadDotAttentionConfig,
    dot_attention,
    load_config,
    save_config,
    which_implementation,
)
from flax_dotattn import nnx as fdnnx
from flax_dotattn._src import dispatch
from flax_dotattn._src.validation import check_call


def reference(query, key, value, *, cap, scale=1.0, bias=None, keep=None):
    """Dense attention from the definition: ``s = scale * q.k + bias``, then
    ``cap * tanh(s / cap)``, then ``s - 1e9`` where ``keep`` is False, softmax, ``@ v``."""
    s = scale * jnp.einsum("...qd,...kd->...qk", query, key, precision="highest")
    if bias is not None:
        s = s + bias
    s = cap * jnp.tanh(s / cap)
    if keep is not None:
        s = jnp.where(keep, s, s - 1e9)
    return jnp.einsum("...qk,...kd->...qd", jax.nn.softmax(s, -1), value, precision="highest")


def _causal(tq, tv):
    return jnp.arange(tv)[None, :] <= jnp.arange(tq)[:, None]


def _inputs(rng, batch=(2,), tq=13, tv=11, d=6, dv=5, spread=3.0):
    q = jnp.asarray(rng.standard_normal(batch + (tq, d)) * spread, jnp.float32)
    k = jnp.asarray(rng.standard_normal(batch + (tv, d)) * spread, jnp.float32)
    v = jnp.asarray(rng.standard_normal(batch + (tv, dv)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(batch + (tq, tv)), jnp.float32)
    return q, k, v, bias


@pytest.mark.parametrize(
    "implementation, block_size",
    [pytest.param("xla", None, marks=pytest.mark.slow), ("chunked", (4, 3))],
    ids=["xla", "chunked-4x3"],
)
def test_values_gradients_and_jvp_equal_the_dense_reference(rng, implementation, block_size):
    q, k, v, bias = _inputs(rng)
    cap, scale = 4.0, 0.8
    keep = _causal(q.shape[-2], k.shape[-2])

    def ours(q, k, v, bias):
        return dot_attention(
            {"scale": jnp.float32(scale)}, q, v, k, causal=True, bias=bias,
            logits_soft_cap=cap, implementation=implementation, block_size=block_size,
            precision="highest",
        )  # fmt: skip

    def theirs(q, k, v, bias):
        return reference(q, k, v, cap=cap, scale=scale, bias=bias, keep=keep)

    args = (q, k, v, bias)
    assert_close(ours(*args), theirs(*args))
    cot = jnp.asarray(rng.standard_normal((2, 13, 5)), jnp.float32)
    grads = jax.grad(lambda *a: jnp.sum(ours(*a) * cot), argnums=(0, 1, 2, 3))(*args)
    wants = jax.grad(lambda *a: jnp.sum(theirs(*a) * cot), argnums=(0, 1, 2, 3))(*args)
    for got, want in zip(grads, wants, strict=True):
        assert_close(got, want, factor=4)
    tangents = tuple(jnp.asarray(rng.standard_normal(x.shape), jnp.float32) for x in args)
    _, got = jax.jit(lambda p, t: jax.jvp(ours, p, t))(args, tangents)
    _, want = jax.jvp(theirs, args, tangents)
    assert_close(got, want, factor=4)


def test_the_cap_applies_to_scaled_logits_plus_bias(rng):
    """The bias goes inside the tanh (as tokamax caps ``scale * q.k + bias``)."""
    q, k, v, bias = _inputs(rng)
    bias = 5 * bias
    got = dot_attention({"scale": jnp.float32(0.5)}, q, v, k, bias=bias, logits_soft_cap=2.0)
    assert_close(got, reference(q, k, v, cap=2.0, scale=0.5, bias=bias))
    s = 2.0 * jnp.tanh(0.5 * jnp.einsum("...qd,...kd->...qk", q, k) / 2.0) + bias
    outside = jax.nn.softmax(s, -1) @ v  # the bias added after the cap differs
    assert float(jnp.max(jnp.abs(got - outside))) > 1e-2


def test_a_large_cap_changes_nothing_and_a_small_one_flattens_the_weights(rng):
    q, k, v, _ = _inputs(rng)
    plain = dot_attention(None, q, v, k)
    assert_close(dot_attention(None, q, v, k, logits_soft_cap=1e6), plain, factor=10)
    flat = dot_attention(None, q, v, k, logits_soft_cap=1e-6)  # logits ~ 0: uniform weights
    assert_close(flat, jnp.broadcast_to(v.mean(-2, keepdims=True), flat.shape), factor=10)


@pytest.mark.parametrize("block_size", [(3, 2), (16, 16)])
def test_block_skipping_stays_exact_when_the_cap_raises_the_logit_bound(rng, block_size):
    """A bias of -1e9 puts every uncapped logit near -1e9, but capped they are near
    ``-cap``: a row that sees no key (Keras averages it over every key) must still visit
    every block, so the skipping bound is taken after the cap."""
    q, k, v, _ = _inputs(rng, tq=9, tv=10)
    bias = jnp.full((2, 9, 10), -1e9, jnp.float32)
    value_mask = jnp.array([[False] * 10, [True] * 4 + [False] * 6])
    kwargs = dict(bias=bias, logits_soft_cap=3.0, causal=True, precision="highest")
    got = dot_attention(None, q, v, k, (None, value_mask), implementation="chunked",
                        block_size=block_size, **kwargs)  # fmt: skip
    want = dot_attention(None, q, v, k, (None, value_mask), implementation="xla", **kwargs)
    assert_close(got, want)
    assert_close(got[0], jnp.broadcast_to(v[0].mean(0), (9, 5)), factor=10)


def test_grouped_query_heads_and_a_query_offset(rng):
    q = jnp.asarray(rng.standard_normal((1, 2, 3, 7, 4)) * 3, jnp.float32)  # [B, Hkv, G, T, D]
    kv = jnp.asarray(rng.standard_normal((1, 2, 1, 12, 4)) * 3, jnp.float32)
    keep = jnp.arange(12)[None, :] <= jnp.arange(7)[:, None] + 5
    want = reference(q, kv, kv, cap=2.5, keep=keep)
    for implementation in ("xla", "chunked"):
        got = dot_attention(None, q, kv, causal=True, query_offset=5, logits_soft_cap=2.5,
                            implementation=implementation, block_size=(4, 5))  # fmt: skip
        assert_close(got, want)


@pytest.mark.slow
def test_splash_takes_the_cap_natively_in_interpret_mode(rng):
    q, k, v, _ = _inputs(rng, batch=(1,), tq=128, tv=128, d=8, dv=8)
    cap = 2.0

    def loss(implementation, q, k, v):
        out = dot_attention({"scale": jnp.float32(0.7)}, q, v, k, causal=True,
                            logits_soft_cap=cap, implementation=implementation)  # fmt: skip
        return jnp.sum(out * jnp.cos(out)), out

    for_kernel = jax.jit(jax.grad(lambda *a: loss("pallas_tpu", *a), (0, 1, 2), has_aux=True))
    for_xla = jax.jit(jax.grad(lambda *a: loss("xla", *a), (0, 1, 2), has_aux=True))
    (grads, out), (want_grads, want) = for_kernel(q, k, v), for_xla(q, k, v)
    assert_close(out, want, factor=10)
    for got, expected in zip(grads, want_grads, strict=True):
        assert_close(got, expected, factor=20)


def test_the_gpu_kernels_refuse_it_and_the_plan_says_why():
    q = jnp.ones((2, 256, 64), jnp.bfloat16)
    call = check_call({"params": None, "query": q, "value": q, "logits_soft_cap": 30.0})
    assert "logits_soft_cap" in dispatch.ineligibility("cudnn", call.inputs, call.options)
    assert "logits_soft_cap" in dispatch.ineligibility("pallas_gpu", call.inputs, call.options)
    assert dispatch.ineligibility("pallas_tpu", call.inputs, call.options) is None
    plan = which_implementation(None, q, q, logits_soft_cap=30.0, platform="cuda")
    assert plan.implementation in ("xla", "chunked")
    assert "pallas_gpu: logits_soft_cap given" in plan.reason
    with pytest.raises(ValueError, match=r"pallas_gpu.*logits_soft_cap"):
        which_implementation(None, q, q, logits_soft_cap=30.0, implementation="pallas_gpu")


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan"), "50", True])
def test_bad_caps_are_rejected_naming_the_argument(bad):
    q = jnp.ones((1, 3, 4))
    with pytest.raises(ValueError, match="logits_soft_cap must be None or a finite"):
        dot_attention(None, q, q, logits_soft_cap=bad)
    with pytest.raises(ValueError, match="logits_soft_cap"):
        DotAttentionConfig(logits_soft_cap=bad)


def test_modules_pass_it_to_the_function(rng):
    q, k, v, _ = _inputs(rng)
    want = dot_attention(None, q, v, k, logits_soft_cap=2.0, causal=True)
    linen = DotAttention(logits_soft_cap=2.0, causal=True)
    assert_close(linen.apply(linen.init(jax.random.key(0), q, v, k), q, v, k), want)
    assert_close(fdnnx.DotAttention(logits_soft_cap=2.0, causal=True)(q, v, k), want)
    assert linen.config.logits_soft_cap == 2.0


def test_multi_head_modules_cap_the_pre_scaled_logits(rng):
    x = jnp.asarray(rng.standard_normal((2, 6, 8)), jnp.float32)
    layer = MultiHeadDotAttention(num_heads=2, key_dim=4, logits_soft_cap=1.5, causal=True)
    variables = layer.init(jax.random.key(0), x, x)
    got = layer.apply(variables, x, x)
    p = variables["params"]
    q = jnp.einsum("btd,dhk->bhtk", x, p["query"]["kernel"]) + p["query"]["bias"][None, :, None, :]
    k = jnp.einsum("btd,dhk->bhtk", x, p["key"]["kernel"]) + p["key"]["bias"][None, :, None, :]
    v = jnp.einsum("btd,dhk->bhtk", x, p["value"]["kernel"]) + p["value"]["bias"][None, :, None, :]
    heads = reference(q / 2.0, k, v, cap=1.5, keep=_causal(6, 6))  # 1 / sqrt(key_dim)
    want = jnp.einsum("bhtk,hkd->btd", heads, p["out"]["kernel"]) + p["out"]["bias"][None, None, :]
    assert_close(got, want, factor=4)
    nnx_layer = fdnnx.MultiHeadDotAttention(2, 8, 4, logits_soft_cap=1.5, rngs=nnx.Rngs(0))
    assert nnx_layer.config.logits_soft_cap == 1.5


@pytest.mark.parametrize("fmt", ["dict", "json", "yaml"])
def test_configs_round_trip_it(tmp_path, fmt):
    for config in (
        DotAttentionConfig(logits_soft_cap=50.0),
        MultiHeadDotAttentionConfig(num_heads=2, key_dim=4, logits_soft_cap=30.0),
    ):
        if fmt == "dict":
            assert type(config).from_dict(config.to_dict()) == config
        else:
            assert load_config(save_config(config, tmp_path / f"c.{fmt}")) == config


def test_to_keras_refuses_it():
    with pytest.raises(ValueError, match="to_keras: Keras's attention layers have no soft-cap"):
        DotAttentionConfig(logits_soft_cap=50.0).to_keras()
    config = MultiHeadDotAttentionConfig(num_heads=2, key_dim=4, logits_soft_cap=50.0)
    with pytest.raises(ValueError, match=r"logits_soft_cap=50\.0"):
        config.to_keras()
