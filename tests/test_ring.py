"""Ring attention on 8 simulated CPU devices (``tests/conftest.py`` sets the XLA flag).

Values and gradients (query, key, value, scale, concat weight) equal the single-device
materialised path for both score modes, both layouts, causal with ``Tq != Tv``, masks with
fully masked rows, on 2, 4 and 8 devices and on a ("data", "seq") mesh; forward mode too.
Causal work is balanced by the zig-zag layout; per-device memory of forward+backward is a
fraction of one device's.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flax_dotattn import dot_attention, ring_attention
from flax_dotattn._src.parallel.ring import blocks_per_device

CPUS = jax.devices("cpu")
pytestmark = [
    pytest.mark.skipif(len(CPUS) < 8, reason="needs 8 (simulated) CPU devices"),
    pytest.mark.slow,
]


def _inputs(rng, batch, tq, tv, d=4, dv=3):
    def arr(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    q, k, v = arr(batch, tq, d), arr(batch, tv, d), arr(batch, tv, dv)
    qm = jnp.asarray(rng.random((batch, tq)) > 0.2)
    # Row 1 masks its first keys: its first queries see no key and (Keras) average over
    # every key, future ones included, so no fully-future shard may be skipped for them.
    vm = jnp.asarray(rng.random((batch, tv)) > 0.3).at[1, : tv // 2 + 1].set(False)
    return q, k, v, (qm, vm)


def _params(score_mode):
    params = {"scale": jnp.float32(0.7)}
    if score_mode == "concat":
        params["concat_score_weight"] = jnp.float32(1.2)
    return params


def _value_and_grads(attention):
    def loss(params, q, k, v, masks):
        out = attention(params, q, v, k, masks)
        return jnp.sum(jnp.sin(out)), out

    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)


CASES = {
    # id: (score_mode, causal, layout, mesh shape, Tq, Tv)
    "dot-causal-zigzag-8dev-Tq<Tv": ("dot", True, "zigzag", (8,), 32, 48),
    "concat-causal-zigzag-2dev": ("concat", True, None, (2,), 16, 16),
    "concat-full-contiguous-8dev-Tq<Tv": ("concat", False, None, (8,), 8, 16),
    "dot-causal-contiguous-data2xseq4-Tq>Tv": ("dot", True, "contiguous", (2, 4), 24, 16),
}


@pytest.mark.parametrize("case", list(CASES))
def test_values_and_gradients_match_single_device(case, rng):
    score_mode, causal, layout, shape, tq, tv = CASES[case]
    mesh = Mesh(np.array(CPUS[: np.prod(shape)]).reshape(shape), ("data", "seq")[-len(shape) :])
    q, k, v, masks = _inputs(rng, 4, tq, tv)
    params = _params(score_mode)
    ring = functools.partial(
        ring_attention,
        causal=causal,
        mesh=mesh,
        axis_name="seq",
        score_mode=score_mode,
        block_size=(2, 4),
        layout=layout,
    )
    one = functools.partial(
        dot_attention, causal=causal, score_mode=score_mode, implementation="xla"
    )
    args = (q, k, v, masks)
    if "data" in mesh.shape:  # batch on "data", sequence on "seq"
        seq = NamedSharding(mesh, PartitionSpec("data", "seq"))
        args = jax.device_put(args, seq)
    (_, out), grads = jax.jit(_value_and_grads(ring))(params, *args)
    (_, expected), expected_grads = jax.jit(_value_and_grads(one))(params, q, k, v, masks)
    if "data" in mesh.shape:
        assert out.sharding.spec[:2] == ("data", "seq")
    assert_close(out, expected, factor=2)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(b).max()))


def test_forward_mode_matches_single_device(rng):
    mesh = Mesh(np.array(CPUS[:2]), ("seq",))
    q, k, v, masks = _inputs(rng, 2, 8, 12)
    params = {"scale": jnp.float32(0.7)}
    tangents = tuple(jnp.asarray(rng.normal(size=x.shape), jnp.float32) for x in (q, k, v))
    d_params = {"scale": jnp.float32(0.3)}

    def run(attention):
        f = lambda p, q, k, v: attention(p, q, v, k, masks, True)  # noqa: E731
        return jax.jvp(f, (params, q, k, v), (d_params, *tangents))[1]

    ring = functools.partial(ring_attention, mesh=mesh, axis_name="seq", block_size=(2, 2))
    one = functools.partial(dot_attention, implementation="xla")
    assert_close(jax.jit(lambda: run(ring))(), run(one), factor=2)


def _ring_and_one(rng):
    mesh = Mesh(np.array(CPUS[:2]), ("seq",))
    q, k, v, masks = _inputs(rng, 2, 8, 12)
    params = {"scale": jnp.float32(0.7)}
    ring = functools.partial(ring_attention, mesh=mesh, axis_name="seq", block_size=(2, 2))
    one = functools.partial(dot_attention, implementation="xla")

    def loss(attention, q, k, v, masks):
        return jnp.sum(jnp.sin(attention(params, q, v, k, masks, True)))

    return (ring, one), loss, (q, k, v, masks)


@pytest.mark.parametrize("derivative", ["second_order", "vmap_of_grad"])
def test_second_order_and_vmapped_gradients_match_single_device(derivative, rng):
    attentions, loss, (q, k, v, masks) = _ring_and_one(rng)

    def second_order(attention):  # the gradient of a function of the gradient
        grad = jax.grad(functools.partial(loss, attention), argnums=1)  # through the keys
        return jax.grad(lambda q: jnp.sum(grad(q, k, v, masks) ** 2))(q)

    def vmap_of_grad(attention):  # per-example gradients
        def one_example(q, k, v, qm, vm):
            args = (x[None] for x in (q, k, v))
            return jax.grad(functools.partial(loss, attention))(*args, (qm[None], vm[None]))

        return jax.vmap(one_example)(q, k, v, *masks)

    check = {"second_order": second_order, "vmap_of_grad": vmap_of_grad}[derivative]
    got, want = (jax.jit(functools.partial(check, f))() for f in attentions)
    assert_close(got, want, factor=4)


def test_zigzag_balances_causal_work(rng):
    mesh = Mesh(np.array(CPUS[:4]), ("seq",))
    q, k, v, _ = _inputs(rng, 1, 64, 64)
    work = {
        layout: blocks_per_device(
            None, q, v, k, causal=True, mesh=mesh, axis_name="seq", block_size=4, layout=layout
        )
        for layout in ("contiguous", "zigzag")
    }
    # 16-long shards of 4x4 blocks: device r computes r full shard pairs (16 blocks each)
    # and its diagonal pair (10 blocks).
    np.testing.assert_array_equal(work["contiguous"], [10, 26, 42, 58])
    np.testing.assert_array_equal(work["zigzag"], [34, 34, 34, 34])
    assert work["contiguous"].sum() == work["zigzag"].sum()


def test_fully_masked_queries_average_over_every_key():
    # No key visible anywhere: Keras averages every query over all keys, the future ones
    # included, so the ring must not skip fully-future shards.
    mesh = Mesh(np.array(CPUS[:4]), ("seq",))
    q = jnp.ones((1, 16, 2))
    v = jnp.arange(16.0).reshape(1, 16, 1)
    masks = (None, jnp.zeros((1, 16), bool))
    out = ring_attention(None, q, v, q, masks, causal=True, mesh=mesh, axis_name="seq")
    np.testing.assert_allclose(out, jnp.full((1, 16, 1), 7.5), rtol=1e-6)


def test_dropout_is_seeded_and_keeps_the_expectation():
    mesh = Mesh(np.array(CPUS[:4]), ("seq",))
    q = jnp.zeros((4, 32, 4))  # uniform weights 1/Tv
    k = jnp.ones((4, 64, 4))
    v = jnp.ones((4, 64, 1))
    run = jax.jit(
        lambda rng: ring_attention(
            None, q, v, k, mesh=mesh, axis_name="seq", dropout_rate=0.25, deterministic=False,
            dropout_rng=rng,
        )
    )  # fmt: skip
    out = np.asarray(run(jax.random.key(0)))
    # Each output = sum of kept weights / (1 - rate): mean 1 over many rows.
    assert abs(out.mean() - 1.0) < 0.02 and out.std() > 0.01
    np.testing.assert_array_equal(out, run(jax.random.key(0)))
    assert not np.array_equal(out, run(jax.random.key(1)))


def test_dropout_derivatives_are_consistent(rng):
    # One device draws another pattern, so check the ring against itself: the JVP against
    # central differences of the (fixed-key) forward, and reverse mode as its transpose.
    mesh = Mesh(np.array(CPUS[:2]), ("seq",))
    q, k, v, _ = _inputs(rng, 2, 8, 8)
    t_q, t_k, t_v = (jnp.asarray(rng.normal(size=x.shape), jnp.float32) for x in (q, k, v))
    ct = jnp.asarray(rng.normal(size=v.shape), jnp.float32)

    def f(q, k, v):
        return ring_attention(
            {"scale": jnp.float32(0.7)}, q, v, k, None, False, mesh=mesh, axis_name="seq",
            block_size=2, dropout_rate=0.3, deterministic=False, dropout_rng=jax.random.key(3),
        )  # fmt: skip

    @jax.jit
    def derivatives(q, k, v):
        _, jvp = jax.linearize(f, q, k, v)  # the tangent ring
        return jvp(t_q, t_k, t_v), jax.linear_transpose(jvp, q, k, v)(ct)  # its transpose

    d_out, cts = derivatives(q, k, v)
    eps = 1e-2
    step = jax.jit(lambda s: f(q + s * t_q, k + s * t_k, v + s * t_v))
    np.testing.assert_allclose(d_out, (step(eps) - step(-eps)) / (2 * eps), atol=3e-3)
    lhs = sum(jnp.vdot(c, t) for c, t in zip(cts, (t_q, t_k, t_v), strict=True))
    np.testing.assert_allclose(lhs, jnp.vdot(ct, d_out), rtol=1e-4)


def test_memory_per_device_depends_on_the_local_length_only():
    # Forward+backward temp bytes per device (compiled memory analysis), no execution.
    def temp_bytes(attention, length, devices=None):
        x = jax.ShapeDtypeStruct((1, length, 64), jnp.float32)
        if devices:
            mesh = Mesh(np.array(CPUS[:devices]), ("seq",))
            sharding = NamedSharding(mesh, PartitionSpec(None, "seq"))
            x = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
            attention = functools.partial(attention, mesh=mesh, axis_name="seq")
        attention = functools.partial(attention, block_size=(128, 128))
        loss = lambda q, k, v: jnp.sum(attention(None, q, v, k, causal=True))  # noqa: E731
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        return grad.lower(x, x, x).compile().memory_analysis().temp_size_in_bytes

    one = functools.partial(dot_attention, implementation="chunked")
    on_8 = temp_bytes(ring_attention, 8192, devices=8)
    # Stacking a residual per ring step would hold all T keys on every device: twice the
    # length on twice the devices would then need about twice the memory per device.
    assert on_8 < 1.2 * temp_bytes(ring_attention, 4096, devices=4)
    assert on_8 < temp_bytes(one, 8192) / 2


def test_empty_sequence_gives_zeros():
    mesh = Mesh(np.array(CPUS[:2]), ("seq",))
    q, k, v = jnp.ones((2, 0, 3)), jnp.ones((2, 4, 3)), jnp.ones((2, 4, 5))
    out = ring_attention(None, q, v, k, mesh=mesh, axis_name="seq")
    assert out.shape == (2, 0, 5)


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(axis_name="model"), r"axis_name must be one of the mesh axes \('seq',\)"),
        (dict(mesh="seq"), r"mesh must be a jax.sharding.Mesh"),
        (dict(query=jnp.ones((2, 6, 4))), r"query length Tq=6 must be divisible by 4"),
        (dict(value=jnp.ones((2, 30, 4))), r"value length Tv=30 must be divisible by 4"),
        (
            dict(causal=True, value=jnp.ones((2, 36, 4))),
            r"Tv=36 must be divisible by 8 \(2 x the size 4 of mesh axis 'seq', layout='zigzag'",
        ),
        (dict(layout="striped"), r"layout must be None or one of \('contiguous', 'zigzag'\)"),
        (dict(causal=1), r"causal must be a Python bool"),
        (dict(masks=(None, jnp.ones((2, 31), bool))), r"value_mask must have a shape"),
        (dict(dropout_rate=0.1), r"deterministic must be True or False"),
        (dict(score_mode="general"), r"score_mode must be one of"),
        (dict(block_size=0), r"block_size|BlockSizes"),
    ],
    ids=[
        "unknown_axis",
        "mesh_not_a_mesh",
        "tq_not_divisible",
        "tv_not_divisible",
        "zigzag_needs_2n",
        "unknown_layout",
        "causal_not_bool",
        "bad_mask",
        "dropout_without_deterministic",
        "bad_score_mode",
        "bad_block_size",
    ],
)
def test_errors_name_the_argument(kwargs, pattern):
    args = dict(
        params=None,
        query=jnp.ones((2, 8, 4)),
        value=jnp.ones((2, 32, 4)),
        mesh=Mesh(np.array(CPUS[:4]), ("seq",)),
        axis_name="seq",
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=pattern):
        ring_attention(**args)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_logits_soft_cap_matches_single_device(layout, rng):
    """A cap small enough to bend every logit: values, gradients (including the learned
    scale's) and forward mode equal one device's, with causal, a window and packed ids."""
    q, k, v, (qm, vm) = _inputs(rng, 2, 32, 32)
    ids = jnp.asarray(np.repeat(np.arange(4), 8)[None].repeat(2, 0))
    options = dict(causal=True, window=(9, 0), segment_ids=(ids, ids), logits_soft_cap=0.8)
    mesh = Mesh(np.array(CPUS[:4]), ("seq",))
    ring = functools.partial(ring_attention, mesh=mesh, axis_name="seq", layout=layout)

    def one(params, q, v, k, masks):
        return dot_attention(params, q, v, k, masks, implementation="xla", **options)

    def sharded(params, q, v, k, masks):
        return ring(params, q, v, k, masks, **options)

    args = (_params("dot"), q, k, v, (qm, vm))
    (got, got_out), got_grads = jax.jit(_value_and_grads(sharded))(*args)
    (want, want_out), want_grads = jax.jit(_value_and_grads(one))(*args)
    assert_close(got_out, want_out)
    assert_close(got, want)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        assert_close(g, w)
    tangents = (q * 0.3, k * 0.2, v * 0.1)
    got_t = jax.jvp(lambda q, k, v: sharded(None, q, v, k, (qm, vm)), (q, k, v), tangents)[1]
    want_t = jax.jvp(lambda q, k, v: one(None, q, v, k, (qm, vm)), (q, k, v), tangents)[1]
    assert_close(got_t, want_t)
