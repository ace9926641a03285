"""``implementation="pallas_tpu"`` (splash attention) in Pallas interpret mode on CPU:
values and gradients equal ``implementation="xla"``, and which calls it takes.

Interpret mode is slow, so the features are combined: each case is one jitted
value-and-gradient per path, called on several inputs of the same shapes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close

from flax_dotattn import dot_attention, which_implementation


def _normal(rng, shape, dtype):
    return jnp.asarray(rng.standard_normal(shape), dtype)


def _value_and_grads(implementation, **static):
    """Jitted ``(output, d(output . cotangent)/d(query, key, value, scale))``."""

    def loss(query, key, value, scale, cotangent, masks, segment_ids):
        out = dot_attention(
            {"scale": scale},
            query,
            value,
            key,
            masks,
            implementation=implementation,
            segment_ids=segment_ids,
            **static,
        )
        return jnp.sum(out.astype(jnp.float32) * cotangent), out

    grad = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
    return jax.jit(lambda *args: grad(*args)[::-1])


def _check(static, dtype, args, factor=1.0):
    kernel, reference = _value_and_grads("pallas_tpu", **static), _value_and_grads("xla", **static)
    for case in args:
        (out, grads), (want, want_grads) = kernel(*case), reference(*case)
        assert out.dtype == want.dtype == dtype
        assert_close(out, want, dtype, factor)
        for got, expected in zip(grads, want_grads, strict=True):
            scale = max(1.0, float(jnp.max(jnp.abs(expected.astype(jnp.float32)))))
            assert_close(got, expected, dtype, factor * scale)


def _inputs(rng, dtype, b, tq, tv, d):
    q, k, v = (_normal(rng, s, dtype) for s in ((b, tq, d), (b, tv, d), (b, tv, d)))
    cotangent = jnp.asarray(rng.standard_normal((b, tq, d)), jnp.float32)
    return q, k, v, jnp.float32(0.7), cotangent


@pytest.mark.slow
def test_causal_key_padding_and_rows_without_keys_float32(rng):
    """Scale, causal, key padding (a value mask); then a value mask that leaves row 0
    without keys, where Keras's subtract-1e9 rule runs on the fallback."""
    q, k, v, scale, ct = _inputs(rng, jnp.float32, 2, 128, 128, 32)
    padded = jnp.arange(128)[None, :] < jnp.array([[128], [77]])  # [B, Tv]
    first_hidden = jnp.broadcast_to(jnp.arange(128) > 0, (2, 128))  # row 0 sees no key
    _check(
        {"causal": True},
        jnp.float32,
        [(q, k, v, scale, ct, (None, m), None) for m in (padded, first_hidden)],
    )


@pytest.mark.slow
def test_window_segments_query_mask_and_padding_bfloat16(rng):
    """A window, packed segments, a query mask and lengths the kernel's 128-blocks do not
    divide (padded), in bfloat16."""
    q, k, v, _, ct = _inputs(rng, jnp.bfloat16, 2, 200, 200, 64)
    ids = jnp.asarray(np.repeat([[0] * 90 + [1] * 110], 2, 0), jnp.int32)
    query_mask = jnp.arange(200)[None, :] % 7 != 3
    # A power-of-two scale folds exactly into bfloat16 (see test_cudnn for the rounding).
    args = (q, k, v, jnp.float32(0.5), ct, (query_mask, None), (ids, ids))
    _check({"window": (24, 5)}, jnp.bfloat16, [args])


@pytest.mark.slow
def test_causal_window_offset_rectangular_float16(rng):
    """A causal sliding window with Tq != Tv and a query offset (decoding a prefill
    chunk), in float16, with a learned scale large enough to matter."""
    q, k, v, _, ct = _inputs(rng, jnp.float16, 1, 130, 260, 16)
    args = (q, k, v, jnp.float32(3.0), ct, None, None)
    _check({"causal": True, "window": (40, 0), "query_offset": 130}, jnp.float16, [args], 2.0)


def test_causal_query_offset_rectangular_values_and_forward_mode(rng):
    """Plain causal (no window) with a host ``query_offset`` and ``Tq != Tv`` (a prefill
    chunk after 128 cached keys): splash's causal mask takes the offset, and so does the
    chunked reference that ``jax.jvp`` goes through."""
    q, k, v, _, _ = _inputs(rng, jnp.float32, 1, 128, 256, 16)
    dq = _normal(rng, q.shape, jnp.float32)

    def jvp(implementation):
        def attention(query):
            return dot_attention(
                None, query, v, k, causal=True, query_offset=128, implementation=implementation
            )

        return jax.jit(lambda q, dq: jax.jvp(attention, (q,), (dq,)))

    (out, tangent), (want, want_tangent) = jvp("pallas_tpu")(q, dq), jvp("xla")(q, dq)
    assert_close(out, want)
    assert_close(tangent, want_tangent)


@pytest.mark.slow
def test_vmap_of_grouped_query_calls_takes_the_kernel(rng):
    """``jax.vmap`` of per-example calls takes the kernel, here in splash's MQA form (two
    query heads share one key/value head, with key padding), forward and backward."""
    q = _normal(rng, (3, 2, 128, 16), jnp.float32)  # [B, H, Tq, D]
    k, v = (_normal(rng, (3, 1, 128, 16), jnp.float32) for _ in range(2))  # [B, 1, Tv, D]
    value_mask = jnp.arange(128)[None, None, :] < jnp.array([128, 100, 60])[:, None, None]

    def one(implementation):
        def call(q, k, v, value_mask):  # one example: [H, Tq, D], [1, Tv, D], [1, Tv]
            params = {"scale": jnp.float32(0.5)}
            masks = (None, value_mask)
            return dot_attention(params, q, v, k, masks, causal=True, implementation=implementation)

        return jax.vmap(call)

    jaxpr = str(jax.make_jaxpr(one("pallas_tpu"))(q, k, v, value_mask))
    assert "pallas_call" in jaxpr and "splash_mqa" in jaxpr
    assert_close(
        jax.jit(one("pallas_tpu"))(q, k, v, value_mask), jax.jit(one("xla"))(q, k, v, value_mask)
    )

    # Reverse mode runs splash's own (MQA) backward kernels.
    def grad(implementation):
        f = one(implementation)
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v, value_mask) * q), (0, 1, 2)))

    for got, want in zip(grad("pallas_tpu")(q, k, v), grad("xla")(q, k, v), strict=True):
        assert_close(got, want)


@pytest.mark.slow
def test_forward_and_second_order_derivatives_fall_back_without_failing(rng):
    """Splash has no forward mode: ``jax.jvp`` and ``jax.hessian`` take the chunked
    kernel's derivatives and equal the xla path's."""
    q, k, v, _, _ = _inputs(rng, jnp.float32, 1, 128, 128, 8)

    def f(implementation):
        def attention(scale, query):
            return dot_attention({"scale": scale}, query, v, k, implementation=implementation)

        def both(scale):
            hessian = jax.hessian(lambda s: jnp.sum(attention(s, q) ** 2))(scale)
            tangent = jax.jvp(lambda x: attention(scale, x), (q,), (v,))[1]
            return hessian, tangent

        return both

    got, want = jax.jit(f("pallas_tpu"))(jnp.float32(0.5)), jax.jit(f("xla"))(jnp.float32(0.5))
    assert_close(got[0], want[0], factor=10)
    assert_close(got[1], want[1])


def test_which_implementation_per_platform():
    q = jnp.ones((2, 4, 256, 64), jnp.bfloat16)
    seg = jnp.zeros((2, 1, 256), jnp.int32)
    tpu = which_implementation(None, q, q, causal=True, segment_ids=(seg, seg), platform="tpu")
    assert tpu.implementation == "pallas_tpu"
    assert "splash" in tpu.reason
    cpu = which_implementation(None, q, q, causal=True, segment_ids=(seg, seg), platform="cpu")
    assert cpu.implementation == "xla"
    assert which_implementation(None, q, q, causal=True) == cpu  # the current backend
    ineligible = {
        "bias": {"bias": jnp.zeros((256, 256))},
        "dropout": {"dropout_rate": 0.1, "deterministic": False, "dropout_rng": jax.random.key(0)},
        "score_mode": {"score_mode": "concat", "params": {"concat_score_weight": 1.0}},
        "weights are requested": {"return_attention_scores": True},
        "attention_mask": {"attention_mask": jnp.ones((256, 256), bool)},
        "shorter than one kernel block": {"query": q[..., :64, :]},
        "segment ids with grouped key/value": {"value": q[:, :1], "segment_ids": (seg, seg)},
    }
    for reason, change in ineligible.items():
        arguments = {"params": None, "query": q, "value": q, **change}
        plan = which_implementation(**arguments, platform="tpu")
        assert plan.implementation in ("xla", "chunked") and reason in plan.reason, plan
        assert plan.reason.startswith("pallas_tpu: ")
    gpu = which_implementation(None, q, q, causal=True, platform="gpu")
    assert gpu.implementation == "pallas_gpu" and gpu.reason.startswith("cudnn: ")
    with pytest.raises(ValueError, match=r"platform must be None or one of .*platform='npu'"):
        which_implementation(None, q, q, platform="npu")
    with pytest.raises(ValueError, match="'pallas_tpu' cannot run these inputs: bias"):
        dot_attention(None, q, q, bias=jnp.zeros((256, 256)), implementation="pallas_tpu")
    with pytest.raises(ValueError, match="'pallas_gpu' cannot run these inputs: bias"):
        dot_attention(None, q, q, bias=jnp.zeros((256, 256)), implementation="pallas_gpu")


@pytest.mark.slow
def test_sequence_parallel_shards_on_the_kernel(rng, monkeypatch):
    """Key shards on splash (forced on CPU, interpret mode): values and gradients equal
    one device's xla path, with packed segments and key padding that leave rows without
    keys in one shard, whose log-sum-exp then carries no weight in the merge."""
    from jax.sharding import Mesh

    from flax_dotattn import sequence_parallel_attention
    from flax_dotattn._src import dispatch
    from flax_dotattn._src.kernels import pallas_tpu

    planned, shard, traced = dispatch.sequence_parallel_plans, pallas_tpu.splash_shard, []

    def tpu_everywhere(*args):
        return dict.fromkeys(dispatch.PLATFORMS, planned(*args)["tpu"])

    def splash_shard(*args, **kwargs):
        traced.append(kwargs)
        return shard(*args, **kwargs)

    monkeypatch.setattr(dispatch, "sequence_parallel_plans", tpu_everywhere)
    monkeypatch.setattr(pallas_tpu, "splash_shard", splash_shard)
    mesh = Mesh(np.array(jax.devices()[:2]), ("seq",))
    q, k, v, scale, ct = _inputs(rng, jnp.float32, 2, 128, 256, 16)
    q_ids = jnp.asarray(np.repeat([[0] * 60 + [1] * 68], 2, 0), jnp.int32)
    kv_ids = jnp.asarray(np.repeat([[0] * 100 + [1] * 156], 2, 0), jnp.int32)
    masks = (None, jnp.arange(256)[None, :] < jnp.array([[256], [150]]))

    def loss(attention):
        def f(q, k, v, scale):
            out = attention({"scale": scale}, q, v, k, masks, segment_ids=(q_ids, kv_ids))
            return jnp.sum(out * ct)

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))

    def sharded(*args, **kwargs):
        return sequence_parallel_attention(*args, mesh=mesh, axis_name="seq", **kwargs)

    def xla(*args, **kwargs):
        return dot_attention(*args, implementation="xla", **kwargs)

    got, want = loss(sharded)(q, k, v, scale), loss(xla)(q, k, v, scale)
    assert any(call["interpret"] for call in traced)  # the CPU branch ran the kernel
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert_close(a, b, factor=max(1.0, float(jnp.max(jnp.abs(b)))))
