"""Sharding on 8 simulated CPU devices (``tests/conftest.py`` sets the XLA flag).

(a) Batch-sharded inputs under ``jit`` with ``NamedSharding`` give the same numbers.
(b) ``sequence_parallel_attention`` shards keys/values along Tv and merges exactly:
    values and gradients equal the single-device result, masks and causal included.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flax_dotattn import dot_attention, sequence_parallel_attention

CPUS = jax.devices("cpu")
pytestmark = pytest.mark.skipif(len(CPUS) < 8, reason="needs 8 (simulated) CPU devices")


def _inputs(rng, batch=8, tq=24, tv=32, d=6, dv=5):
    def arr(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    q, k, v = arr(batch, tq, d), arr(batch, tv, d), arr(batch, tv, dv)
    qm = jnp.asarray(rng.random((batch, tq)) > 0.2)
    vm = jnp.asarray(rng.random((batch, tv)) > 0.3).at[1, :20].set(False)
    return q, k, v, qm, vm


def _params(score_mode):
    params = {"scale": jnp.float32(0.7)}
    if score_mode == "concat":
        params["concat_score_weight"] = jnp.float32(1.2)
    return params


@pytest.mark.slow
@pytest.mark.parametrize("implementation", ["xla", "chunked"])
def test_batch_sharded_jit_matches_single_device(implementation, rng):
    q, k, v, qm, vm = _inputs(rng)
    mesh = Mesh(np.array(CPUS[:8]), ("batch",))
    row = NamedSharding(mesh, PartitionSpec("batch"))
    sharded = jax.device_put((q, k, v, qm, vm), row)
    assert len(sharded[0].sharding.device_set) == 8

    def loss(params, q, k, v, qm, vm):
        out = dot_attention(
            params, q, v, k, (qm, vm), True, implementation=implementation, block_size=(8, 8)
        )
        return jnp.sum(out**2), out

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))
    (l_sharded, out_sharded), g_sharded = fn(_params("dot"), *sharded)
    (l_single, out_single), g_single = fn(_params("dot"), q, k, v, qm, vm)
    assert out_sharded.sharding.spec[0] == "batch"
    assert_close(out_sharded, out_single)
    assert_close(l_sharded, l_single)
    for a, b in zip(jax.tree.leaves(g_sharded), jax.tree.leaves(g_single), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("score_mode", ["dot", "concat"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shards", [2, 8])
def test_sequence_parallel_matches_single_device(score_mode, causal, shards, rng):
    q, k, v, qm, vm = _inputs(rng)
    mesh = Mesh(np.array(CPUS[:shards]), ("seq",))
    params = _params(score_mode)

    def single(params, q, k, v):
        return dot_attention(params, q, v, k, (qm, vm), causal, score_mode=score_mode)

    def parallel(params, q, k, v):
        return sequence_parallel_attention(
            params,
            q,
            v,
            k,
            (qm, vm),
            causal,
            score_mode=score_mode,
            mesh=mesh,
            axis_name="seq",
            block_size=(8, 4),
        )

    assert_close(jax.jit(parallel)(params, q, k, v), single(params, q, k, v), factor=2)
    grad = functools.partial(jax.grad, argnums=(0, 1, 2, 3))
    g_par = jax.jit(grad(lambda *a: jnp.sum(jnp.sin(parallel(*a)))))(params, q, k, v)
    g_one = grad(lambda *a: jnp.sum(jnp.sin(single(*a))))(params, q, k, v)
    for a, b in zip(jax.tree.leaves(g_par), jax.tree.leaves(g_one), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(b).max()))


def test_sequence_parallel_dropout_statistics():
    mesh = Mesh(np.array(CPUS[:4]), ("seq",))
    q = jnp.zeros((4, 32, 4))  # uniform weights 1/Tv
    k = jnp.ones((4, 64, 4))
    v = jnp.ones((4, 64, 1))
    run = jax.jit(
        lambda rng: sequence_parallel_attention(
            None, q, v, k, mesh=mesh, axis_name="seq", dropout_rate=0.25, deterministic=False,
            dropout_rng=rng,
        )
    )  # fmt: skip
    out = np.asarray(run(jax.random.key(0)))
    # Each output = sum of kept weights / (1 - rate): mean 1 over many rows.
    assert abs(out.mean() - 1.0) < 0.02 and out.std() > 0.01
    np.testing.assert_array_equal(out, run(jax.random.key(0)))


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(axis_name="model"), r"axis_name must be one of the mesh axes \('seq',\)"),
        (dict(value=jnp.ones((2, 30, 4))), r"Tv=30 must be divisible by the size 4"),
        (dict(mesh="seq"), r"mesh must be a jax.sharding.Mesh"),
        (dict(masks=(None, jnp.ones((2, 31), bool))), r"value_mask must have a shape"),
    ],
    ids=["unknown_axis", "tv_not_divisible", "mesh_not_a_mesh", "bad_mask"],
)
def test_sequence_parallel_errors(kwargs, pattern):
    args = dict(
        params=None,
        query=jnp.ones((2, 3, 4)),
        value=jnp.ones((2, 32, 4)),
        mesh=Mesh(np.array(CPUS[:4]), ("seq",)),
        axis_name="seq",
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=pattern):
        sequence_parallel_attention(**args)


@pytest.mark.slow
def test_sequence_parallel_takes_a_minus_inf_bias_that_hides_a_whole_shard(rng):
    q, k, v, _, _ = _inputs(rng)
    mesh = Mesh(np.array(CPUS[:4]), ("seq",))
    bias = jnp.where(jnp.arange(32) < 12, -jnp.inf, 0.0)[None, None, :]  # shard 0 and part of 1

    def single(q, k, v):
        return dot_attention(None, q, v, k, bias=bias, implementation="xla")

    def parallel(q, k, v):
        return sequence_parallel_attention(
            None, q, v, k, bias=bias, mesh=mesh, axis_name="seq", block_size=(8, 4)
        )

    out = jax.jit(parallel)(q, k, v)
    assert np.isfinite(np.asarray(out)).all()
    assert_close(out, single(q, k, v), factor=2)
    g_par = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(parallel(*a))), (0, 1, 2)))(q, k, v)
    g_one = jax.grad(lambda *a: jnp.sum(jnp.sin(single(*a))), (0, 1, 2))(q, k, v)
    for a, b in zip(g_par, g_one, strict=True):
        assert np.isfinite(np.asarray(a)).all()
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_sequence_parallel_rows_of_minus_inf_zeroed_by_the_query_mask_keep_gradients_finite(rng):
    q, k, v, _, _ = _inputs(rng)
    mesh = Mesh(np.array(CPUS[:4]), ("seq",))
    real_q, real_k = jnp.arange(24) < 20, jnp.arange(32) < 28
    bias = jnp.where(real_q[:, None] & real_k[None, :], 0.0, -jnp.inf)  # [Tq, Tv]

    def loss(q, k, v):
        out = sequence_parallel_attention(
            None, q, v, k, (real_q, real_k), bias=bias, mesh=mesh, axis_name="seq",
            block_size=(8, 4),
        )  # fmt: skip
        return jnp.sum(out**2)

    grads = jax.jit(jax.grad(loss, (0, 1, 2)))(q, k, v)
    for g in grads:
        assert np.isfinite(np.asarray(g)).all()
