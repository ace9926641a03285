"""Same numbers eager, under jit and vmap; gradients; no retracing."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close
from jax.test_util import check_grads

from flax_dotattn import dot_attention


def _inputs(rng, batch=(3,), tq=4, tv=5, d=6, dv=3):
    q = jnp.asarray(rng.normal(size=batch + (tq, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=batch + (tv, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=batch + (tv, dv)), jnp.float32)
    qm = jnp.asarray(rng.random(batch + (tq,)) > 0.3)
    vm = jnp.asarray(rng.random(batch + (tv,)) > 0.3).at[..., 0].set(True)
    return q, k, v, qm, vm


@pytest.mark.parametrize("score_mode", ["dot", "concat"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_eager_jit_and_vmap_agree(score_mode, causal, rng):
    q, k, v, qm, vm = _inputs(rng, d=3)
    params = {"scale": jnp.float32(0.8)}
    if score_mode == "concat":
        params["concat_score_weight"] = jnp.float32(1.3)
    fn = functools.partial(dot_attention, causal=causal, score_mode=score_mode)
    eager = fn(params, q, v, k, (qm, vm))
    jitted = jax.jit(fn)(params, q, v, k, (qm, vm))
    vmapped = jax.vmap(fn, in_axes=(None, 0, 0, 0, 0))(params, q, v, k, (qm, vm))
    assert_close(jitted, eager)
    assert_close(vmapped, eager)


def test_vmap_with_shared_key_value(rng):
    q, k, v, _, _ = _inputs(rng, batch=(4,))
    shared_k, shared_v = k[0], v[0]
    out = jax.vmap(lambda q: dot_attention(None, q, shared_v, shared_k))(q)
    expected = dot_attention(
        None, q, jnp.broadcast_to(shared_v, v.shape), jnp.broadcast_to(shared_k, k.shape)
    )
    assert_close(out, expected)


@pytest.mark.slow
@pytest.mark.parametrize("score_mode", ["dot", "concat"])
def test_check_grads_query_key_value_and_params(score_mode, rng):
    q, k, v, qm, vm = _inputs(rng, batch=(2,), tq=3, tv=4, d=3, dv=2)
    q, k, v = q * 0.5, k * 0.5, v

    def f(q, k, v, scale, weight):
        params = {"scale": scale}
        if score_mode == "concat":
            params["concat_score_weight"] = weight
        return dot_attention(params, q, v, k, (qm, vm), causal=True, score_mode=score_mode)

    check_grads(
        f,
        (q, k, v, jnp.float32(0.9), jnp.float32(1.1)),
        order=1,
        modes=("rev",),
        atol=2e-2,
        rtol=2e-2,
        eps=1e-2,
    )


def test_scale_gradient_matches_finite_difference(rng):
    q, k, v, _, vm = _inputs(rng)
    loss = lambda s: dot_attention({"scale": s}, q, v, k, (None, vm)).sum()  # noqa: E731
    grad = jax.grad(loss)(jnp.float32(0.7))
    eps = 1e-3
    fd = (loss(jnp.float32(0.7 + eps)) - loss(jnp.float32(0.7 - eps))) / (2 * eps)
    np.testing.assert_allclose(grad, fd, rtol=5e-3)


def test_one_trace_per_static_configuration(rng):
    q, k, v, qm, vm = _inputs(rng)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(q, k, v, qm, vm):
        return dot_attention(None, q, v, k, (qm, vm), causal=True)

    for i in range(3):
        f(q + i, k, v, qm, vm)


def test_shape_errors_fire_under_jit(rng):
    q, k, v, _, _ = _inputs(rng)
    with pytest.raises(ValueError, match="key depth"):
        jax.jit(lambda q, v, k: dot_attention(None, q, v, k))(q, v, k[..., :2])


@pytest.mark.parametrize("implementation", ["xla", "chunked"])
def test_no_host_transfers_inside_the_function(implementation, rng):
    q, k, v, qm, vm = _inputs(rng)
    args = jax.device_put((q, k, v, qm, vm, jax.random.key(0)))

    def attend(q, k, v, qm, vm, rng):
        return dot_attention(
            {"scale": jnp.float32(1.0)},
            q,
            v,
            k,
            (qm, vm),
            True,
            dropout_rate=0.2,
            dropout_rng=rng,
            deterministic=False,
            implementation=implementation,
        )

    fn = jax.jit(attend)
    fn(*args)  # compile outside the guard
    grad = jax.jit(jax.grad(lambda *a: attend(*a).sum()))
    grad(*args)
    with jax.transfer_guard("disallow"):
        fn(*args).block_until_ready()
        grad(*args).block_until_ready()


@pytest.mark.slow
@pytest.mark.parametrize("implementation", ["xla", "chunked"])
def test_second_order_gradients_in_float64(implementation, rng):
    with jax.enable_x64(True):
        q = jnp.asarray(rng.normal(size=(2, 5, 3)) * 0.5, jnp.float64)
        k = jnp.asarray(rng.normal(size=(2, 6, 3)) * 0.5, jnp.float64)
        v = jnp.asarray(rng.normal(size=(2, 6, 2)), jnp.float64)
        vm = jnp.asarray(rng.random((2, 6)) > 0.3).at[:, 0].set(True)

        def f(q, k, v, scale):
            return dot_attention(
                {"scale": scale},
                q,
                v,
                k,
                (None, vm),
                True,
                implementation=implementation,
                block_size=(2, 4),
            )

        assert f(q, k, v, jnp.float64(0.9)).dtype == jnp.float64
        check_grads(
            jax.jit(f), (q, k, v, jnp.float64(0.9)), order=2, modes=("rev",), atol=1e-6, rtol=1e-6
        )


def test_vmap_in_axes_mixing_batched_queries_and_shared_keys(rng):
    q, k, v, _, vm = _inputs(rng, batch=(4,))
    params = {"scale": jnp.float32(0.5)}
    fn = jax.vmap(
        lambda p, q, v, k, vm: dot_attention(p, q, v, k, (None, vm)),
        in_axes=(None, 0, None, None, None),
    )
    out = fn(params, q, v[0], k[0], vm[0])
    expected = jnp.stack([dot_attention(params, q[i], v[0], k[0], (None, vm[0])) for i in range(4)])
    assert_close(out, expected)


@pytest.mark.slow
@pytest.mark.parametrize("implementation", ["xla", "chunked"])
def test_scan_over_layers_with_checkpoint_matches_a_python_loop(implementation, rng):
    x = jnp.asarray(rng.normal(size=(2, 6, 4)) * 0.5, jnp.float32)
    scales = jnp.array([0.5, 1.0, 1.5], jnp.float32)

    def layer(x, scale):
        return x + dot_attention(
            {"scale": scale}, x, x, causal=True, implementation=implementation, block_size=(4, 4)
        )

    def scanned(scales, x):
        body = jax.checkpoint(lambda x, s: (layer(x, s), None))
        return jax.lax.scan(body, x, scales)[0].sum()

    def looped(scales, x):
        for i in range(scales.shape[0]):
            x = layer(x, scales[i])
        return x.sum()

    assert_close(jax.jit(scanned)(scales, x), looped(scales, x), factor=5)
    g_scan = jax.grad(scanned, argnums=(0, 1))(scales, x)
    g_loop = jax.grad(looped, argnums=(0, 1))(scales, x)
    for a, b in zip(g_scan, g_loop, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("implementation", ["xla", "chunked"])
def test_one_trace_per_static_configuration_for_each_path(implementation, rng):
    chex.clear_trace_counter()  # the counter is per function name, across parameters
    q, k, v, qm, vm = _inputs(rng)

    @functools.partial(jax.jit, static_argnames="causal")
    @chex.assert_max_traces(n=2)  # one per value of causal
    def f(q, k, v, qm, vm, causal):
        return dot_attention(None, q, v, k, (qm, vm), causal, implementation=implementation)

    for i in range(3):
        for causal in (False, True):
            f(q + i, k, v, qm, vm, causal=causal)
