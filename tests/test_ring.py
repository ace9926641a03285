"""Ring attention on 8 simulated CPU devices (``tests/conftest.py`` sets the XLA flag).

Values and gradients (query, key, value, scale, concat weight) equal the single-device
materialised path for both score modes, both layouts, causal with ``Tq != Tv``, masks with
fully masked rows, on 2, 4 and 8 devices and on a ("data", "seq") mesh; forward mode too.
Every other argument of ``dot_attention`` (segment ids, window, offsets, ``kv_length``, a
full mask, a bias, grouped-query key/value) gives the same values and derivatives on 2, 4
and 8 devices in both layouts. Causal work is balanced by the zig-zag layout; pairs and
ring steps nothing sees are skipped (counted, not timed); per-device memory of
forward+backward is a fraction of one device's.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flax_dotattn import dot_attention, ring_attention
from flax_dotattn._src.parallel.ring import blocks_per_device, ring_work

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
    bias = jnp.asarray(rng.normal(size=(1, 8, 12)), jnp.float32)  # shared by the batch
    ids = jnp.asarray([0] * 5 + [1] * 7)  # two packed documents
    extra = dict(window=(6, None), bias=bias, segment_ids=(ids[:8], ids))
    ring = functools.partial(ring_attention, mesh=mesh, axis_name="seq", block_size=(2, 2), **extra)
    one = functools.partial(dot_attention, implementation="xla", **extra)

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


# -- every argument of dot_attention ----------------------------------------------------


def _everything(rng, tq, tv):
    """Grouped-query inputs ``[B=2, Hkv=2, G=2, T, D]`` (key/value ``[2, 2, 1, T, D]``) with
    packed documents (sorted segment ids), a query offset per sequence, ``kv_length``, a
    full mask and a bias per head."""

    def arr(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    q, k, v = arr(2, 2, 2, tq, 4), arr(2, 2, 1, tv, 4), arr(2, 2, 1, tv, 3)
    kv_ids = np.sort(rng.integers(0, 4, size=(2, 1, 1, tv)), axis=-1)
    q_ids = kv_ids[..., :tq] if tq <= tv else np.sort(rng.integers(0, 4, size=(2, 1, 1, tq)))
    keywords = dict(
        segment_ids=(jnp.asarray(q_ids), jnp.asarray(kv_ids)),
        window=(5, 2),
        query_offset=jnp.asarray([[[1]], [[3]]]),  # [2, 1, 1]
        kv_length=jnp.asarray([[[tv - 3]], [[tv]]]),
        attention_mask=jnp.asarray(rng.random((2, 1, 1, tq, tv)) > 0.1),
    )
    masks = (jnp.asarray(rng.random((2, 2, 2, tq)) > 0.2), None)
    return (q, k, v, arr(1, 2, 1, tq, tv)), masks, keywords


EVERYTHING = {
    # id: (devices, layout, causal, Tq, Tv)
    "2dev-zigzag-causal": (2, "zigzag", True, 32, 32),
    "4dev-contiguous-causal-Tq<Tv": (4, "contiguous", True, 16, 32),
    "8dev-zigzag-full": (8, "zigzag", False, 32, 32),
}


@pytest.mark.parametrize("case", list(EVERYTHING))
def test_every_argument_matches_single_device(case, rng):
    n, layout, causal, tq, tv = EVERYTHING[case]
    mesh = Mesh(np.array(CPUS[:n]), ("seq",))
    (q, k, v, bias), masks, keywords = _everything(rng, tq, tv)
    params = {"scale": jnp.float32(0.7)}

    def value_and_grads(attention):
        def loss(params, q, k, v, bias):
            out = attention(params, q, v, k, masks, causal, bias=bias, **keywords)
            return jnp.sum(jnp.sin(out)), out

        grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)
        return jax.jit(grads)(params, q, k, v, bias)

    ring = functools.partial(
        ring_attention, mesh=mesh, axis_name="seq", layout=layout, block_size=(2, 4)
    )
    (_, out), grads = value_and_grads(ring)
    (_, expected), expected_grads = value_and_grads(
        functools.partial(dot_attention, implementation="xla")
    )
    assert_close(out, expected, factor=2)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(b).max()))


@pytest.mark.parametrize("bias_shape", [(1, 1, 1, 16, 1), (2, 1, 1, 1, 32)], ids=["Tq", "Tv"])
def test_broadcast_full_mask_and_bias_match_single_device(bias_shape, rng):
    # A key-padding mask [..., 1, Tv] and a bias broadcast along one axis: a size-1 axis
    # is not split (the bias's cotangent sums over the devices that share it).
    mesh = Mesh(np.array(CPUS[:4]), ("seq",))
    (q, k, v, _), _, _ = _everything(rng, 16, 32)
    mask = jnp.asarray(rng.random((2, 1, 1, 1, 32)) > 0.3)
    bias = jnp.asarray(rng.normal(size=bias_shape), jnp.float32)

    def value_and_grads(attention):
        def loss(q, k, v, bias):
            out = attention(None, q, v, k, causal=True, attention_mask=mask, bias=bias)
            return jnp.sum(jnp.sin(out)), out

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, bias)

    ring = functools.partial(ring_attention, mesh=mesh, axis_name="seq", block_size=(2, 4))
    (_, out), grads = value_and_grads(ring)
    (_, expected), expected_grads = value_and_grads(
        functools.partial(dot_attention, implementation="xla")
    )
    assert_close(out, expected, factor=2)
    for a, b in zip(grads, expected_grads, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(b).max()))


def test_key_side_masks_that_differ_within_a_query_group_match_single_device(rng):
    # A value mask per query head [B, Hkv, G, Tv] (and kv_length per head): the ring
    # broadcasts key/value to the query heads (a copy) and gives one device's numbers.
    mesh = Mesh(np.array(CPUS[:2]), ("seq",))
    (q, k, v, _), _, _ = _everything(rng, 16, 16)
    masks = (None, jnp.asarray(rng.random((2, 2, 2, 16)) > 0.3))
    kv_length = jnp.asarray([[[16, 12]], [[9, 16]]])  # [2, 1, 2]: per query head

    def value_and_grads(attention):
        def loss(q, k, v):
            return jnp.sum(jnp.sin(attention(None, q, v, k, masks, True, kv_length=kv_length)))

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)

    ring = functools.partial(ring_attention, mesh=mesh, axis_name="seq", block_size=(2, 2))
    got, want = (
        value_and_grads(f) for f in (ring, functools.partial(dot_attention, implementation="xla"))
    )
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(b).max()))


def test_forward_mode_with_every_argument_matches_single_device(rng):
    mesh = Mesh(np.array(CPUS[:4]), ("seq",))
    (q, k, v, bias), masks, keywords = _everything(rng, 16, 16)
    params = {"scale": jnp.float32(0.7)}
    primals = (params, q, k, v, bias)
    tangents = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), primals)

    def run(attention):
        def f(params, q, k, v, bias):
            return attention(params, q, v, k, masks, True, bias=bias, **keywords)

        return jax.jit(lambda: jax.jvp(f, primals, tangents))()

    ring = functools.partial(ring_attention, mesh=mesh, axis_name="seq", block_size=(2, 2))
    got = run(ring)
    want = run(functools.partial(dot_attention, implementation="xla"))
    assert_close(got[0], want[0], factor=2)
    assert_close(got[1], want[1], factor=4)


def _ppermuted_shapes(jaxpr) -> list[tuple[int, ...]]:
    """Shapes of every operand ``ppermute`` sends, in a jaxpr and its sub-jaxprs."""
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "ppermute":
            shapes += [tuple(x.aval.shape) for x in eqn.invars]
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    shapes += _ppermuted_shapes(inner)
    return shapes


def test_grouped_query_key_value_shards_travel_once_per_group(rng):
    # Query [2, 2, 4, T, D] against key/value [2, 2, 1, T, D]: the ring sends key/value
    # chunks of B = 4 sequences, never of the 16 query sequences.
    mesh = Mesh(np.array(CPUS[:4]), ("seq",))
    q = jnp.ones((2, 2, 4, 32, 8))
    kv = jnp.ones((2, 2, 1, 32, 8))
    f = functools.partial(ring_attention, mesh=mesh, axis_name="seq", layout="contiguous")
    jaxpr = jax.make_jaxpr(lambda q, k: f(None, q, k, k))(q, kv).jaxpr
    sent = {s for s in _ppermuted_shapes(jaxpr) if len(s) == 4}  # [chunks, B, Cv, D]
    assert sent == {(1, 4, 8, 8)}, sent


# -- skipping what nothing sees (counted) -----------------------------------------------


def _work(n, t, **kwargs):
    mesh = Mesh(np.array(CPUS[:n]), ("seq",))
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.normal(size=(1, t, 4)), jnp.float32) for _ in range(3))
    kwargs.setdefault("block_size", 4)
    return ring_work(None, q, v, k, mesh=mesh, axis_name="seq", **kwargs)


def test_a_causal_window_within_a_chunk_runs_two_ring_steps():
    # 8 devices, T = 128: chunks of 16 keys; a window of 16 sees its own and the previous
    # chunk only. The default layout for it is contiguous.
    work = _work(8, 128, causal=True, window=(16, 0))
    np.testing.assert_array_equal(work["steps"], [2] * 8)
    np.testing.assert_array_equal(work["derivative_steps"], [2] * 8)
    np.testing.assert_array_equal(work["pairs"], [1] + [2] * 7)
    # Balanced: every device but the first computes the same blocks.
    assert work["blocks"].max() <= 1.15 * work["blocks"].mean()
    # Without the window: all 8 steps.
    np.testing.assert_array_equal(_work(8, 128, causal=True)["steps"], [8] * 8)


def test_causal_windows_stay_balanced():
    # A window of 32 over 128 positions: the first 32 queries see fewer keys, so no layout
    # of equal chunks does better than the busiest device computing full windows only.
    # Both layouts reach that; the default for it (contiguous) also stops after 2 steps.
    zigzag = _work(4, 128, causal=True, window=(32, 0), layout="zigzag")
    default = _work(4, 128, causal=True, window=(32, 0))
    assert zigzag["blocks"].max() == default["blocks"].max()
    assert zigzag["blocks"].sum() == default["blocks"].sum()
    assert default["blocks"].max() <= 1.25 * default["blocks"].mean()  # 1/(1 - w/2T)
    np.testing.assert_array_equal(default["steps"], [2] * 4)
    np.testing.assert_array_equal(zigzag["steps"], [4] * 4)  # needs both neighbours


def test_packed_documents_skip_chunks_of_other_documents():
    # Documents of 16 tokens on chunks of 16 (4 devices, T = 64): each chunk sees itself.
    ids = jnp.repeat(jnp.arange(4), 16)[None]
    work = _work(4, 64, segment_ids=(ids, ids))
    np.testing.assert_array_equal(work["steps"], [1] * 4)
    np.testing.assert_array_equal(work["pairs"], [1] * 4)
    # Unsorted ids: every chunk holds every document, so every pair is computed.
    shuffled = jnp.asarray(np.random.default_rng(0).permutation(np.asarray(ids[0])))[None]
    work = _work(4, 64, segment_ids=(shuffled, shuffled))
    np.testing.assert_array_equal(work["pairs"], [4] * 4)


def test_rows_that_see_no_key_keep_every_step():
    # Query 40's window holds only masked keys: Keras's rule makes it average over every
    # key, so the ring may not stop early, and the numbers stay one device's.
    mesh = Mesh(np.array(CPUS[:8]), ("seq",))
    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.normal(size=(1, 64, 4)), jnp.float32) for _ in range(3))
    vm = jnp.ones((1, 64), bool).at[0, 38:41].set(False)
    kwargs = dict(causal=True, window=(2, 0), masks=(None, vm), block_size=4)
    work = ring_work(None, q, v, k, mesh=mesh, axis_name="seq", **kwargs)
    np.testing.assert_array_equal(work["steps"], [8] * 8)
    out = ring_attention(None, q, v, k, mesh=mesh, axis_name="seq", **kwargs)
    assert_close(out, dot_attention(None, q, v, k, implementation="xla", **kwargs), factor=2)


@pytest.mark.parametrize(
    "name", ["return_attention_scores", "implementation", "score_mod", "mask_mod"]
)
def test_arguments_it_does_not_take_raise(name):
    mesh = Mesh(np.array(CPUS[:2]), ("seq",))
    q = jnp.ones((1, 4, 2))
    with pytest.raises(TypeError, match=f"unexpected keyword argument '{name}'"):
        ring_attention(None, q, q, mesh=mesh, axis_name="seq", **{name: True})


@pytest.mark.parametrize("layout", ["zigzag"])
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
