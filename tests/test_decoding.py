"""Decoding with a key/value cache: ``query_offset`` and ``kv_length``.

References: ``jax.nn.dot_product_attention`` (``scale=1.0``, Keras's logits) on the whole
sequence, and on a mask built by hand with NumPy from the rule "key ``j`` is visible to
query ``i`` iff ``j <= query_offset + i`` (causal), ``query_offset + i - left <= j``
(window) and ``j < kv_length``".
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close
from jax.sharding import Mesh

import flax_dotattn.nnx as fdnnx
from flax_dotattn import DotAttention, dot_attention, sequence_parallel_attention

PATHS = [
    pytest.param({"implementation": "xla"}, id="xla"),
    pytest.param({"implementation": "chunked", "block_size": (4, 8)}, id="chunked"),
    pytest.param({}, id="automatic", marks=pytest.mark.slow),  # = one of the two above
]


def _jax_nn(q, k, v, mask=None, is_causal=False):
    """``jax.nn.dot_product_attention`` on ``[B, T, D]`` inputs (one head), Keras's
    logits (``scale=1.0``); ``mask [B, Tq, Tv]``."""
    heads = lambda x: x[:, :, None, :]  # noqa: E731
    mask = None if mask is None else jnp.asarray(mask)[:, None]
    out = jax.nn.dot_product_attention(
        heads(q), heads(k), heads(v), mask=mask, is_causal=is_causal, scale=1.0
    )
    return out[:, :, 0, :]


def _hand_mask(offsets, lengths, tq, tv, window=None):
    """``[B, Tq, Tv]``: the decoding rule, with NumPy."""
    i = np.arange(tq)[None, :, None]
    j = np.arange(tv)[None, None, :]
    pos = np.asarray(offsets)[:, None, None] + i
    mask = (j <= pos) & (j < np.asarray(lengths)[:, None, None])
    if window is not None:
        mask &= j >= pos - window[0]
    return mask


def _normal(r, *shape):
    return jnp.asarray(r.normal(size=shape), jnp.float32)


@pytest.mark.parametrize("path", PATHS)
def test_each_cached_step_equals_the_full_sequence_row_with_one_compile(path):
    r = np.random.default_rng(0)
    b, t, d = 2, 24, 8
    q, k, v = (_normal(r, b, t, d) for _ in range(3))
    full = _jax_nn(q, k, v, is_causal=True)  # [B, T, D]

    @jax.jit
    def step(q_t, k_cache, v_cache, pos):
        return dot_attention(
            None, q_t, v_cache, k_cache, causal=True, query_offset=pos, kv_length=pos + 1,
            **path,
        )  # fmt: skip

    for pos in (0, 5, 13, 23):
        filled = (jnp.arange(t) <= pos)[None, :, None]  # past the filled length: garbage
        k_cache, v_cache = (jnp.where(filled, x, jnp.nan) for x in (k, v))
        out = step(q[:, pos : pos + 1], k_cache, v_cache, jnp.int32(pos))
        assert_close(out[:, 0], full[:, pos])
    assert step._cache_size() == 1  # traced positions: one program for every step


@pytest.mark.parametrize("path", PATHS)
def test_a_prefill_block_against_the_cache_matches_the_hand_built_mask(path):
    r = np.random.default_rng(1)
    b, tq, tv, d = 2, 7, 32, 8
    q, k, v = _normal(r, b, tq, d), _normal(r, b, tv, d), _normal(r, b, tv, d)
    offsets, lengths = [9, 9], [16, 16]  # 7 new queries at positions 9..15 of a 32-slot cache
    mask = _hand_mask(offsets, lengths, tq, tv)
    out = dot_attention(None, q, v, k, causal=True, query_offset=9, kv_length=16, **path)
    assert_close(out, _jax_nn(q, k, v, mask))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "window",
    [None, pytest.param((3, 0), marks=pytest.mark.slow)],
    ids=["causal", "window_3"],
)
def test_per_sequence_offsets_and_lengths_match_the_hand_built_mask(window, path):
    r = np.random.default_rng(2)
    b, tq, tv, d = 3, 5, 29, 6
    q, k, v = _normal(r, b, tq, d), _normal(r, b, tv, d), _normal(r, b, tv, d)
    offsets, lengths = np.array([0, 11, 20]), np.array([5, 17, 29])
    mask = _hand_mask(offsets, lengths, tq, tv, window)

    def ours(q, k, v):
        return dot_attention(
            None, q, v, k, causal=True, window=window, query_offset=jnp.asarray(offsets),
            kv_length=jnp.asarray(lengths), **path,
        )  # fmt: skip

    def theirs(q, k, v):
        return _jax_nn(q, k, v, mask)

    assert_close(jax.jit(ours)(q, k, v), theirs(q, k, v))
    loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a)))  # noqa: E731
    grads = jax.jit(jax.grad(loss(ours), (0, 1, 2)))(q, k, v)
    expected = jax.grad(loss(theirs), (0, 1, 2))(q, k, v)
    for g, e in zip(grads, expected, strict=True):
        assert_close(g, e, factor=5)


def test_offsets_broadcast_over_heads_and_match_one_call_per_sequence():
    r = np.random.default_rng(3)
    b, h, tq, tv, d = 2, 3, 4, 21, 5
    q, k, v = _normal(r, b, h, tq, d), _normal(r, b, h, tv, d), _normal(r, b, h, tv, d)
    offsets, lengths = jnp.array([[2], [12]]), jnp.array([[9], [21]])  # [B, 1]: per sequence
    for impl in ("xla", "chunked"):
        out = dot_attention(
            None, q, v, k, causal=True, query_offset=offsets, kv_length=lengths,
            implementation=impl, block_size=(2, 4) if impl == "chunked" else None,
        )  # fmt: skip
        for i in range(b):
            one = dot_attention(
                None, q[i], v[i], k[i], causal=True, query_offset=int(offsets[i, 0]),
                kv_length=int(lengths[i, 0]), implementation="xla",
            )  # fmt: skip
            assert_close(out[i], one)


@pytest.mark.slow
def test_vmap_over_per_example_offsets_equals_a_python_loop():
    r = np.random.default_rng(4)
    n, tq, tv, d = 3, 3, 40, 8
    q, k, v = _normal(r, n, tq, d), _normal(r, n, tv, d), _normal(r, n, tv, d)
    offsets = jnp.array([0, 17, 37])

    def one(q, k, v, offset):
        return dot_attention(
            None, q, v, k, causal=True, window=(6, 0), query_offset=offset,
            kv_length=offset + tq, implementation="chunked", block_size=(2, 8),
        )  # fmt: skip

    batched = jax.jit(jax.vmap(one))(q, k, v, offsets)
    for i in range(n):
        assert_close(batched[i], one(q[i], k[i], v[i], int(offsets[i])))
    per_example = jax.grad(lambda *a: jnp.sum(one(*a) ** 2), (0, 1, 2))
    grad = jax.jit(jax.vmap(per_example))(q, k, v, offsets)
    for i in range(n):
        expected = jax.jit(per_example)(q[i], k[i], v[i], offsets[i])
        for g, e in zip(grad, expected, strict=True):
            assert_close(g[i], e, factor=5)


@pytest.mark.slow
def test_sequence_parallel_takes_offsets_and_lengths():
    cpus = jax.devices("cpu")
    if len(cpus) < 4:
        pytest.skip("needs 4 (simulated) CPU devices")
    r = np.random.default_rng(5)
    b, tq, tv, d = 2, 6, 32, 8
    q, k, v = _normal(r, b, tq, d), _normal(r, b, tv, d), _normal(r, b, tv, d)
    kwargs = dict(causal=True, query_offset=jnp.array([3, 20]), kv_length=jnp.array([9, 26]))
    single = dot_attention(None, q, v, k, implementation="xla", **kwargs)
    mesh = Mesh(np.array(cpus[:4]), ("seq",))
    parallel = jax.jit(
        functools.partial(
            sequence_parallel_attention, mesh=mesh, axis_name="seq", block_size=(2, 4), **kwargs
        )
    )
    assert_close(parallel(None, q, v, k), single)


def test_the_modules_pass_offsets_and_lengths(rng):
    q, k, v = (jnp.asarray(rng.normal(size=(2, 3, 8)), jnp.float32) for _ in range(3))
    kv = jnp.concatenate([k, v], axis=1)  # [2, 6, 8]
    kwargs = dict(causal=True, query_offset=2, kv_length=5)
    expected = dot_attention(None, q, kv, **kwargs)
    linen = DotAttention()
    assert_close(linen.apply(linen.init(jax.random.key(0), q, kv), q, kv, **kwargs), expected)
    assert_close(fdnnx.DotAttention()(q, kv, **kwargs), expected)


def test_unset_offsets_keep_kerass_top_left_rule(rng):
    q = jnp.asarray(rng.normal(size=(2, 5, 4)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 9, 4)), jnp.float32)
    for impl in ("xla", "chunked"):
        plain = dot_attention(None, q, k, causal=True, implementation=impl)
        zero = dot_attention(
            None, q, k, causal=True, query_offset=0, kv_length=9, implementation=impl
        )
        np.testing.assert_array_equal(plain, zero)


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(query_offset=1.5), r"query_offset must be None, a Python int or an integer"),
        (dict(query_offset=True), r"query_offset must be None, a Python int or an integer"),
        (dict(kv_length=np.ones(3, np.float32)), r"kv_length must be None, a Python int"),
        (dict(query_offset=np.zeros(3, np.int32)), r"query_offset must broadcast to the batch"),
        (dict(kv_length=np.array([2**33, 1])), r"kv_length must fit int32 positions"),
        (dict(query_offset=2**40), r"query_offset must fit int32 positions"),
        (dict(query_offset=jnp.zeros(2, jnp.uint32)), r"query_offset must have an integer dtype"),
    ],
    ids=["float", "bool", "float_array", "bad_shape", "int64_beyond_int32", "huge_int", "uint32"],
)
def test_bad_offsets_and_lengths_raise_naming_the_argument(kwargs, pattern):
    q = jnp.ones((2, 3, 4))
    with pytest.raises(ValueError, match=pattern):
        dot_attention(None, q, q, causal=True, **kwargs)


@pytest.mark.parametrize(
    "seed", [0, *(pytest.param(s, marks=pytest.mark.slow) for s in range(1, 6))]
)
def test_chunked_equals_xla_with_random_offsets_lengths_and_blocks(seed):
    r = np.random.default_rng(100 + seed)
    b, tq, tv = 2, int(r.integers(1, 20)), int(r.integers(1, 60))
    q, k, v = _normal(r, b, tq, 4), _normal(r, b, tv, 4), _normal(r, b, tv, 3)
    offsets = jnp.asarray(r.integers(0, tv, size=b))  # query_offset >= 0
    lengths = jnp.asarray(r.integers(1, tv + 1, size=b))
    window = None if r.random() < 0.3 else (int(r.integers(0, 9)), int(r.integers(0, 4)))
    blocks = tuple(int(x) for x in r.integers(1, 12, size=2))
    per_sequence = bool(r.random() < 0.5)
    kwargs = dict(
        causal=bool(r.random() < 0.7),
        window=window,
        query_offset=offsets if per_sequence else int(offsets[0]),
        kv_length=lengths if per_sequence else int(lengths[0]),
    )

    @functools.partial(jax.jit, static_argnums=0)
    def run(impl, q, k, v):
        extra = {"block_size": blocks} if impl == "chunked" else {}
        return dot_attention(None, q, v, k, implementation=impl, **kwargs, **extra)

    assert_close(run("chunked", q, k, v), run("xla", q, k, v), factor=2)
    grad = lambda impl: jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(run(impl, *a))), (0, 1, 2)))  # noqa: E731
    for g, e in zip(grad("chunked")(q, k, v), grad("xla")(q, k, v), strict=True):
        assert_close(g, e, factor=5)


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(kv_length=0), r"kv_length must be in \[1, Tv\] = \[1, 6\]; received kv_length=0"),
        (dict(kv_length=7), r"kv_length must be in \[1, Tv\] = \[1, 6\]; received kv_length=7"),
        (
            dict(kv_length=np.array([3, 7])),
            r"kv_length must be in \[1, Tv\] = \[1, 6\]; received values in 3..7",
        ),
        (dict(query_offset=-1), r"query_offset must be >= 0; received query_offset=-1"),
        (
            dict(query_offset=np.array([0, -2], np.int32)),
            r"query_offset must be >= 0; received values in -2..0",
        ),
    ],
    ids=["length-zero", "length-beyond-tv", "lengths-array", "negative-offset", "offsets-array"],
)
def test_out_of_range_host_positions_raise_naming_the_argument(kwargs, pattern):
    q, kv = jnp.ones((2, 3, 4)), jnp.ones((2, 6, 4))
    with pytest.raises(ValueError, match=pattern):
        dot_attention(None, q, kv, causal=True, **kwargs)


@pytest.mark.parametrize(
    "offset, length, message",
    [
        (-1, 6, r"query_offset must be >= 0; received -1"),
        (0, 0, r"kv_length must be in \[1, 6\]; received 0"),
        (0, 7, r"kv_length must be in \[1, 6\]; received 7"),
        (2, 4, None),
    ],
    ids=["negative-offset", "length-zero", "length-beyond-tv", "in-range"],
)
def test_traced_positions_are_checked_under_checkify(offset, length, message):
    from jax.experimental import checkify

    q, kv = _normal(np.random.default_rng(3), 2, 3, 4), _normal(np.random.default_rng(4), 2, 6, 4)
    run = jax.jit(lambda o, n: dot_attention(None, q, kv, causal=True, query_offset=o, kv_length=n))
    plain = run(jnp.int32(offset), jnp.int32(length))  # without checkify: no check, no cost
    error, out = checkify.checkify(run, errors=checkify.user_checks)(
        jnp.int32(offset), jnp.int32(length)
    )
    np.testing.assert_array_equal(out, plain)
    if message is None:
        assert error.get() is None
    else:
        assert error.get() is not None and __import__("re").search(message, error.get())
