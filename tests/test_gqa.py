"""Grouped-query and multi-query attention: key/value batch dims that broadcast against
the query's (``[B, Hkv, G, Tq, D]`` with ``[B, Hkv, 1, Tv, D]``; ``[B, H, Tq, D]`` with
``[B, 1, Tv, D]``).

The reference is ``jax.nn.dot_product_attention`` (``scale=1.0``) on key/value repeated
to the query's batch, with a mask built here by hand from the definitions (causal and
window from global positions, value mask, segment ids). Every row keeps a visible key,
so Keras's subtract-1e9 rule and ``jax.nn``'s ``-inf`` agree. Gradients with respect to
key/value have the key/value shapes and equal the repeated reference's summed over the
groups (JAX sums them through the ``broadcast_to``).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh

from flax_dotattn import dot_attention, ring_attention, sequence_parallel_attention


def _normal(rng, *shape):
    return jnp.asarray(rng.normal(size=shape), jnp.float32)


def _reference(q, k, v, keep=None, bias=None):
    """``jax.nn.dot_product_attention`` on key/value repeated to the query's batch.

    ``keep`` (bool) and ``bias`` broadcast to ``[..., Tq, Tv]``."""
    batch = jnp.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    tq, tv = q.shape[-2], k.shape[-2]
    q = jnp.broadcast_to(q, batch + q.shape[-2:])
    k = jnp.broadcast_to(k, batch + k.shape[-2:])  # the repeat the library avoids
    v = jnp.broadcast_to(v, batch + v.shape[-2:])
    n = int(np.prod(batch))

    def flat(x):  # [..., T, D] -> [n, T, 1, D] (jax.nn's [B, T, N, H])
        return x.reshape((n,) + x.shape[-2:])[:, :, None, :]

    def pairs(x):  # [..., Tq, Tv] broadcastable -> [n, 1, Tq, Tv]
        return None if x is None else jnp.broadcast_to(x, batch + (tq, tv)).reshape(n, 1, tq, tv)

    out = jax.nn.dot_product_attention(
        flat(q), flat(k), flat(v), bias=pairs(bias), mask=pairs(keep), scale=1.0
    )
    return out[:, :, 0, :].reshape(batch + (tq, v.shape[-1]))


def _keep(tq, tv, *, causal=False, window=None, offset=None, value_mask=None, segments=None):
    """The visible (query, key) pairs, from the definitions, broadcastable to
    ``[..., Tq, Tv]``. ``offset``: query 0's position, ``[...]`` (NumPy)."""
    qpos = np.arange(tq)[:, None]
    if offset is not None:
        qpos = np.asarray(offset)[..., None, None] + qpos
    kpos = np.arange(tv)[None, :]
    keep = np.ones_like(qpos + kpos, bool)
    if causal:
        keep = keep & (kpos <= qpos)
    if window is not None:
        keep = keep & (kpos >= qpos - window[0]) & (kpos <= qpos + window[1])
    if value_mask is not None:
        keep = keep & np.asarray(value_mask)[..., None, :]
    if segments is not None:
        q_seg, kv_seg = (np.asarray(s) for s in segments)
        keep = keep & (q_seg[..., :, None] == kv_seg[..., None, :])
    return jnp.asarray(keep)


def _check(fn, ref, q, k, v, factor=1.0):
    """Values and gradients (wrt query, key, value) of ``fn`` equal ``ref``'s; the
    key/value gradients have the key/value shapes. One jitted program per side."""

    def run(f):
        out = jax.eval_shape(f, q, k, v)
        cot = _normal(np.random.default_rng(1), *out.shape)

        @jax.jit
        def both(q, k, v):
            out, pull = jax.vjp(f, q, k, v)
            return out, pull(cot)

        return both(q, k, v)

    (out, got), (want_out, want) = run(fn), run(ref)
    assert_close(out, want_out, factor=factor)
    for g, w, x in zip(got, want, (q, k, v), strict=True):
        assert g.shape == x.shape
        assert_close(g, w, factor=10 * factor)


def test_gqa_and_mqa_equal_repeated_key_value(rng):
    """Quick tier: GQA (5-D), chunked with odd blocks and causal, values and gradients."""
    q, k, v = _normal(rng, 2, 2, 3, 5, 4), _normal(rng, 2, 2, 1, 7, 4), _normal(rng, 2, 2, 1, 7, 4)
    keep = _keep(5, 7, causal=True)
    _check(
        functools.partial(_gqa, causal=True, implementation="chunked", block_size=(2, 3)),
        lambda q, k, v: _reference(q, k, v, keep),
        q, k, v,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("implementation", [None, "chunked"])
def test_mqa_equals_repeated_key_value(implementation, rng):
    """Multi-query attention: ``[B, H, Tq, D]`` with ``[B, 1, Tv, D]``; also one key/value
    shared by the whole batch (``[1, 1, Tv, D]``) and a query shared by key/value
    entries (``[1, H, Tq, D]`` with ``[B, H, Tv, D]``, the query broadcast). Automatic
    dispatch (xla at these sizes) and chunked."""
    fn = jax.jit(functools.partial(_gqa, implementation=implementation, block_size=(2, 4)))
    q, k, v = _normal(rng, 2, 4, 5, 4), _normal(rng, 2, 1, 6, 4), _normal(rng, 2, 1, 6, 4)
    _check(fn, _reference, q, k, v)
    _check(fn, _reference, q, k[:1], v[:1])
    _check(fn, _reference, q[:1], jnp.tile(k, (1, 4, 1, 1)), jnp.tile(v, (1, 4, 1, 1)))


def _gqa(q, k, v, **kwargs):
    return dot_attention(None, q, v, k, **kwargs)


B, HKV, G, TQ, TV, D, DV = 2, 2, 3, 5, 7, 4, 4  # jax.nn needs Dv == D


def _feature_cases(rng):
    """(name, keyword arguments, hand-built keep mask, bias), the masks broadcast like
    the key/value (``[B, Hkv, 1, ...]``) or per query group (``[..., G, ...]``); every
    row keeps a visible key."""
    value_mask = rng.random((B, HKV, 1, TV)) > 0.4
    value_mask[..., [0, 3]] = True  # a key of each segment below kv_length
    q_seg = np.array([0, 0, 1, 1, 1]).reshape(1, 1, 1, TQ)
    kv_seg = np.array([0, 0, 0, 1, 1, 1, 1]).reshape(1, 1, 1, TV)
    kv_length = np.array([7, 5]).reshape(B, 1, 1)
    group_mask = rng.random((B, 1, G, TV)) > 0.4
    group_mask[..., [0, 6]] = True  # visible in every window below
    offset = np.array([2, 0]).reshape(B, 1, 1)
    group_seg = np.broadcast_to(rng.integers(0, 2, (1, HKV, G, TV)), (B, HKV, G, TV)).copy()
    group_seg[..., 0] = 0  # key 0 is in every query's segment (0) and causal window
    group_offset = np.array([0, 2, 1]).reshape(1, 1, G)
    bias = _normal(rng, 1, HKV, G, TQ, TV)
    return [
        (
            "value mask, segment ids, bias, kv_length shared by the groups",
            dict(masks=(None, jnp.asarray(value_mask)), bias=bias, kv_length=kv_length,
                 segment_ids=(jnp.asarray(q_seg), jnp.asarray(kv_seg))),
            _keep(TQ, TV, value_mask=value_mask & (np.arange(TV) < kv_length[..., None]),
                  segments=(q_seg, kv_seg)),
            bias,
        ),
        (
            "causal window, query_offset per sequence, value mask per group",
            dict(causal=True, window=(6, 0), query_offset=jnp.asarray(offset),
                 masks=(None, jnp.asarray(group_mask))),
            _keep(TQ, TV, causal=True, window=(6, 0), offset=offset, value_mask=group_mask),
            None,
        ),
        (
            "kv segment ids and query_offset per group (key/value broadcast)",
            dict(causal=True, query_offset=jnp.asarray(group_offset),
                 segment_ids=(jnp.zeros((TQ,), jnp.int32), jnp.asarray(group_seg))),
            _keep(TQ, TV, causal=True, offset=group_offset,
                  segments=(np.zeros((TQ,), int), group_seg)),
            None,
        ),
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    "implementation, block_size",
    [("xla", None), ("chunked", (2, 3)), ("chunked", (4, 16))],
)
def test_features_broadcast_like_key_value(implementation, block_size, rng):
    """Masks, bias, segment ids, query_offset and kv_length, on every path: values and
    gradients equal the repeated reference (jitted: one compile per case; the second
    chunked block size runs the first case only)."""
    q, k = _normal(rng, B, HKV, G, TQ, D), _normal(rng, B, HKV, 1, TV, D)
    v = _normal(rng, B, HKV, 1, TV, DV)
    cases = _feature_cases(rng)
    for name, kwargs, keep, bias in cases[:1] if block_size == (4, 16) else cases:
        fn = jax.jit(functools.partial(_gqa, implementation=implementation,
                                       block_size=block_size, **kwargs))  # fmt: skip
        assert keep is None or bool(jnp.all(jnp.any(keep, -1))), name  # a key per row
        ref = functools.partial(_reference, keep=keep, bias=bias)
        try:
            _check(fn, ref, q, k, v)
        except AssertionError as error:
            raise AssertionError(f"case {name}") from error


@pytest.mark.slow
def test_vmap_and_traced_offset_equal_reference(rng):
    """``jax.vmap`` over a leading axis (key/value mapped too, and shared), and a traced
    ``query_offset`` under ``jit``, on the chunked path."""
    q, k, v = _normal(rng, 3, 2, 4, 5, 4), _normal(rng, 3, 2, 1, 6, 4), _normal(rng, 3, 2, 1, 6, 4)
    fn = functools.partial(_gqa, causal=True, implementation="chunked", block_size=(2, 2))
    keep = _keep(5, 6, causal=True)
    ref = functools.partial(_reference, keep=keep)
    _check(jax.vmap(fn), ref, q, k, v)
    shared = jax.jit(jax.vmap(fn, in_axes=(0, None, None)))  # key/value not mapped
    assert_close(shared(q, k[0], v[0]), _reference(q, k[:1], v[:1], keep))
    step = jax.jit(lambda q, k, v, offset: fn(q, k, v, query_offset=offset))
    for offset in (0, 1):
        keep = _keep(5, 6, causal=True, offset=np.int32(offset))
        assert_close(step(q, k, v, jnp.int32(offset)), _reference(q, k, v, keep))


@pytest.mark.slow
@pytest.mark.skipif(len(jax.devices("cpu")) < 8, reason="needs 8 (simulated) CPU devices")
def test_sequence_parallel_gqa_equals_reference(rng):
    """Keys/values sharded along Tv over 8 devices, key/value with size-1 head dims."""
    q, k, v = (
        _normal(rng, 2, 2, 2, 5, 4),
        _normal(rng, 2, 2, 1, 16, 4),
        _normal(rng, 2, 2, 1, 16, 4),
    )
    value_mask = np.asarray(rng.random((2, 2, 1, 16)) > 0.3)
    value_mask[..., 0] = True
    mesh = Mesh(np.array(jax.devices("cpu")[:8]), ("seq",))
    fn = jax.jit(lambda q, k, v: sequence_parallel_attention(
        None, q, v, k, (None, jnp.asarray(value_mask)), True, mesh=mesh, axis_name="seq",
        block_size=(2, 2)))  # fmt: skip
    keep = _keep(5, 16, causal=True, value_mask=value_mask)
    _check(fn, functools.partial(_reference, keep=keep), q, k, v)


def _shapes(jaxpr) -> set:
    """Every shape of every value in ``jaxpr`` and its sub-jaxprs."""
    found = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            for var in eqn.outvars:
                found.add(tuple(getattr(var.aval, "shape", ())))
            for param in eqn.params.values():
                for sub in param if isinstance(param, (list, tuple)) else (param,):
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        walk(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        walk(sub)

    walk(jaxpr.jaxpr)
    return found


def test_chunked_never_repeats_key_value(rng):
    """No value in the forward+backward jaxpr of the chunked or the xla path is key or
    value repeated over the groups: no array with their last dim is as large as G times
    key/value (the query side is smaller: Tq < Tv). Positive controls: the detector finds
    the repeat of ``jnp.repeat``, and the chunked kernel's own broadcast of key/value
    when ``kv_segment_ids`` differ within a group."""
    b, hkv, g, tq, tv, d, dv = 2, 3, 8, 5, 11, 7, 6
    q, k, v = _normal(rng, b, hkv, g, tq, d), _normal(rng, b, hkv, 1, tv, d), _normal(
        rng, b, hkv, 1, tv, dv)  # fmt: skip

    def repeated(fn):
        grad = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) ** 2), (0, 1, 2))
        shapes = _shapes(jax.make_jaxpr(grad)(q, k, v))
        return any(
            len(s) >= 2 and s[-1] in (d, dv) and np.prod(s) >= g * b * hkv * tv * s[-1]
            for s in shapes
        )

    for implementation in ("chunked", "xla"):
        fn = functools.partial(_gqa, causal=True, implementation=implementation, block_size=4)
        assert not repeated(fn), implementation
    assert repeated(lambda q, k, v: fn(q, jnp.repeat(k, g, 2), jnp.repeat(v, g, 2)))
    per_group = jnp.zeros((1, 1, g, tv), jnp.int32).at[:, :, 1, 0].set(1)
    ids = (jnp.zeros((tq,), jnp.int32), per_group)
    assert repeated(functools.partial(_gqa, implementation="chunked", segment_ids=ids))


def test_non_broadcastable_batch_dims_raise():
    q = jnp.ones((2, 4, 5, 3))
    with pytest.raises(ValueError, match=r"value batch dims \(2, 3\) must broadcast against "
                       r"query's \(2, 4\).*\(2, 3, 6, 3\)"):  # fmt: skip
        dot_attention(None, q, jnp.ones((2, 3, 6, 3)))
    with pytest.raises(ValueError, match=r"key batch dims must equal value's \(2, 1\)"):
        dot_attention(None, q, jnp.ones((2, 1, 6, 3)), jnp.ones((2, 4, 6, 3)))
    with pytest.raises(ValueError, match=r"value_mask must have a shape broadcastable to "
                       r"\[..., Tv\] = \(2, 4, 6\).*\(3, 6\)"):  # fmt: skip
        dot_attention(None, q, jnp.ones((2, 1, 6, 3)), masks=(None, jnp.ones((3, 6), bool)))
    mesh = Mesh(np.array(jax.devices("cpu")[:1]), ("seq",))
    with pytest.raises(ValueError, match=r"value batch dims \(2, 3\) must broadcast"):
        ring_attention(None, q, jnp.ones((2, 3, 6, 3)), mesh=mesh, axis_name="seq")


def test_ring_attention_shares_key_value_among_query_groups():
    # tests/test_ring.py checks every argument on several devices; here, one device.
    mesh = Mesh(np.array(jax.devices("cpu")[:1]), ("seq",))
    q = jnp.arange(2 * 4 * 5 * 3, dtype=jnp.float32).reshape(2, 4, 5, 3) / 100
    kv = jnp.sin(jnp.arange(2 * 1 * 6 * 3, dtype=jnp.float32)).reshape(2, 1, 6, 3)
    out = ring_attention(None, q, kv, mesh=mesh, axis_name="seq", causal=True, layout="contiguous")
    np.testing.assert_allclose(out, dot_attention(None, q, kv, causal=True), atol=1e-6)


@pytest.mark.slow
@settings(max_examples=6)
@given(
    hkv=st.integers(1, 2),
    g=st.integers(2, 5),
    tq=st.integers(1, 9),
    extra=st.integers(0, 4),
    bq=st.integers(1, 6),
    bk=st.integers(1, 6),
    causal=st.booleans(),
    window=st.tuples(st.integers(0, 4), st.none() | st.integers(0, 3)),
    seed=st.integers(0, 2**16),
)
def test_property_chunked_gqa_equals_repeated_reference(
    hkv, g, tq, extra, bq, bk, causal, window, seed
):
    """Random group sizes, odd lengths, block sizes, causal and windows: the chunked path
    equals the repeated reference (values: the derivative passes share the forward's
    block and position arithmetic, and the tests above check their gradients). Tv >= Tq
    with a window of left >= 0 and right >= 0 keeps every query's own key visible."""
    tv = tq + extra
    rng = np.random.default_rng(seed)
    q, k, v = _normal(rng, 2, hkv, g, tq, 3), _normal(rng, 2, hkv, 1, tv, 3), _normal(
        rng, 2, hkv, 1, tv, 3)  # fmt: skip
    right = tv if window[1] is None else window[1]
    ref_keep = _keep(tq, tv, causal=causal, window=(window[0], right))
    fn = functools.partial(_gqa, causal=causal, window=window, implementation="chunked",
                           block_size=(bq, bk))  # fmt: skip
    assert_close(jax.jit(fn)(q, k, v), jax.jit(_reference)(q, k, v, ref_keep))


@pytest.mark.slow
def test_modules_pass_grouped_key_value_through(rng):
    """The Linen and NNX ``DotAttention`` take GQA inputs as the function does."""
    from flax import nnx

    from flax_dotattn import DotAttention
    from flax_dotattn import nnx as fdnnx

    q, k, v = _normal(rng, 2, 2, 3, 5, 4), _normal(rng, 2, 2, 1, 6, 4), _normal(rng, 2, 2, 1, 6, 4)
    want = _reference(q, k, v, _keep(5, 6, causal=True))
    layer = DotAttention(causal=True)
    variables = layer.init(jax.random.key(0), q, v, k)
    assert_close(jax.jit(layer.apply)(variables, q, v, k), want)
    module = fdnnx.DotAttention(causal=True, rngs=nnx.Rngs(0))
    assert_close(nnx.jit(lambda m, q, v, k: m(q, v, k))(module, q, v, k), want)
