"""Regressions for the bugs an adversarial review found (issue 8), one section each.

Each test failed on 0.1.0. References are Keras's rule derived by hand, the materialised
path (itself checked against Keras 3 in test_keras_parity.py) and float64 recomputation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close
from jax.sharding import Mesh
from test_fused import cpu_mapping

from flax_dotattn import (
    DotAttention,
    DotAttentionConfig,
    attention_scores,
    dot_attention,
    sequence_parallel_attention,
)
from flax_dotattn import nnx as fdnnx
from flax_dotattn._src.fused import fold_scale

# -- 1. causal block skipping is exact for any logits ----------------------------------------


@pytest.mark.parametrize("block", [1, 2, 3, (1, 2), (4, 1)], ids=str)
def test_skipped_future_blocks_match_keras_for_huge_negative_logits(block):
    # Row 0 sees only key 0 (logit -3e9); Keras turns the masked future keys' logits 0
    # into 0 - 1e9, which beats -3e9, so row 0 averages the future values: (1+2+3)/3 = 2.
    q = jnp.ones((1, 4, 1))
    v = jnp.arange(4.0).reshape(1, 4, 1)
    k = jnp.array([[[-3e9], [0.0], [0.0], [0.0]]])
    expected = np.array([2.0, 1.0, 1.5, 2.0])
    xla = dot_attention(None, q, v, k, causal=True, implementation="xla")
    chunked = dot_attention(None, q, v, k, causal=True, implementation="chunked", block_size=block)
    np.testing.assert_allclose(np.ravel(xla), expected)
    np.testing.assert_allclose(np.ravel(chunked), expected)

    def loss(impl, v):
        out = dot_attention(None, q, v, k, causal=True, implementation=impl, block_size=block)
        return jnp.sum(out * jnp.arange(1.0, 5.0)[None, :, None])

    assert_close(jax.grad(lambda v: loss("chunked", v))(v), jax.grad(lambda v: loss("xla", v))(v))


@pytest.mark.parametrize("score_mode", ["dot", "concat"])
@pytest.mark.parametrize("block", [(2, 3), (3, 2), (5, 1)], ids=str)
def test_chunked_equals_xla_with_adversarial_logits(score_mode, block, rng):
    # Logits of every magnitude up to ~1e10, value masks with rows that see nothing.
    tq, tv = 9, 11
    q = jnp.asarray(rng.normal(size=(2, tq, 3)) * 10.0 ** rng.integers(-2, 5, (2, tq, 1)))
    k = jnp.asarray(rng.normal(size=(2, tv, 3)) * 10.0 ** rng.integers(-2, 5, (2, tv, 1)))
    v = jnp.asarray(rng.normal(size=(2, tv, 4)))
    vm = jnp.asarray(rng.random((2, tv)) > 0.4).at[1, :6].set(False)
    params = {"scale": jnp.float32(1.7)}
    if score_mode == "concat":
        params["concat_score_weight"] = jnp.float32(3e8)
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))

    def run(impl):
        return dot_attention(
            params, q, v, k, (None, vm), True, score_mode=score_mode, implementation=impl,
            block_size=block,
        )  # fmt: skip

    assert_close(run("chunked"), run("xla"))


# -- 2. the fused route cannot overflow when folding the learned scale ------------------


def test_folding_a_large_scale_into_float16_stays_finite(rng):
    q = jnp.asarray(100 + rng.normal(size=(2, 8, 8)), jnp.float16)
    k = jnp.asarray(rng.normal(size=(2, 8, 8)), jnp.float16)
    v = jnp.asarray(rng.normal(size=(2, 8, 8)), jnp.float16)
    scale = jnp.float32(1000.0)
    out = cpu_mapping(q, k, v, None, scale, False)
    assert out.dtype == jnp.float16 and bool(jnp.all(jnp.isfinite(out)))
    expected = dot_attention({"scale": scale}, q, v, k, implementation="xla")
    assert_close(out, expected, jnp.float16, factor=5)


def test_scale_that_cannot_be_folded_falls_back(rng):
    q = jnp.full((1, 4, 8), 60000.0, jnp.float16)
    k = jnp.full((1, 4, 8), 60000.0, jnp.float16)
    _, _, overflow = fold_scale(q, k, jnp.float32(1e6))
    assert bool(overflow)
    v = jnp.asarray(rng.normal(size=(1, 4, 8)), jnp.float16)
    out = cpu_mapping(q, k, v, None, jnp.float32(1e6), False)
    assert bool(jnp.all(jnp.isfinite(out)))


def fused_and_xla_errors(rng, magnitude=30.0, scale=1.37, n=8, t=64, d=64):
    """Max |error| of the fused mapping and of the xla path against float64 on the
    float16-rounded inputs (the figure README's GPU section quotes)."""
    q, k, v = (
        jnp.asarray(rng.normal(size=(n, t, d)) * magnitude / np.sqrt(d), jnp.float16)
        for _ in range(3)
    )
    s = jnp.float32(scale)
    q64, k64, v64 = (np.asarray(x, np.float64) for x in (q, k, v))
    logits = np.einsum("bqd,bkd->bqk", q64, k64) * scale
    w = np.exp(logits - logits.max(-1, keepdims=True))
    ref = np.einsum("bqk,bkd->bqd", w / w.sum(-1, keepdims=True), v64)
    fused = np.asarray(cpu_mapping(q, k, v, None, s, False), np.float64)
    xla = np.asarray(dot_attention({"scale": s}, q, v, k, implementation="xla"), np.float64)
    return np.abs(fused - ref).max(), np.abs(xla - ref).max()


def test_folding_a_power_of_two_scale_is_exact(rng):
    # Powers of two shift exponents only: the mapping then has the xla path's error.
    fused_err, xla_err = fused_and_xla_errors(rng, magnitude=30.0, scale=0.125)
    assert fused_err <= 1.05 * xla_err, (fused_err, xla_err)


def test_folding_a_general_scale_costs_one_float16_rounding(rng):
    # q * scale is rounded to float16 once; at moderate logits (std ~1.5) that costs
    # well under 3x the xla path's error (README's GPU section quotes the table).
    fused_err, xla_err = fused_and_xla_errors(rng, magnitude=3.0, scale=1.37)
    assert fused_err < 3 * xla_err, (fused_err, xla_err)


# -- 3. forward-mode autodiff works wherever reverse mode does ----------------------------


@pytest.mark.parametrize("implementation", [None, "chunked", "xla"])
def test_jvp_works_at_every_size(implementation, rng):
    q = jnp.asarray(rng.normal(size=(1, 2048, 8)) * 0.3, jnp.float32)
    t = jnp.asarray(rng.normal(size=(1, 2048, 8)), jnp.float32)

    def f(impl, q):
        return dot_attention(None, q, q, causal=True, implementation=impl)

    out, tangent = jax.jvp(lambda q: f(implementation, q), (q,), (t,))
    ref_out, ref_tangent = jax.jvp(lambda q: f("xla", q), (q,), (t,))
    assert_close(out, ref_out)
    assert_close(tangent, ref_tangent, factor=5)


@pytest.mark.parametrize("score_mode", ["dot", "concat"])
def test_jacfwd_equals_jacrev_for_every_input(score_mode, rng):
    vm = jnp.asarray([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0]], bool)

    def f(params, q, k, v):
        return dot_attention(
            params, q, v, k, (None, vm), True, score_mode=score_mode,
            implementation="chunked", block_size=(2, 2),
        )  # fmt: skip

    with jax.enable_x64(True):
        q, k, v = (jnp.asarray(rng.normal(size=(2, 5, 3)), jnp.float64) for _ in range(3))
        params = {"scale": jnp.float64(0.8)}
        if score_mode == "concat":
            params["concat_score_weight"] = jnp.float64(1.2)
        fwd = jax.jacfwd(f, argnums=(0, 1, 2, 3))(params, q, k, v)
        rev = jax.jacrev(f, argnums=(0, 1, 2, 3))(params, q, k, v)
    for a, b in zip(jax.tree.leaves(fwd), jax.tree.leaves(rev), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["grad", "jvp"])
def test_chunked_derivatives_take_linear_memory(mode):
    # XLA's own accounting of the compiled program's temporaries (independent of machine
    # load): doubling T must at most double them (a [T, T] matrix would quadruple), and at
    # T = 16384 they stay far below one [T, T] float32 matrix (1 GiB).
    def temp_bytes(t):
        q = jax.ShapeDtypeStruct((1, t, 64), jnp.float32)

        def f(q):
            return dot_attention(None, q, q, causal=True)

        def g(q):
            if mode == "grad":
                return jax.grad(lambda q: jnp.sum(f(q)))(q)
            return jax.jvp(f, (q,), (q,))[1]

        return jax.jit(g).lower(q).compile().memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(8192), temp_bytes(16384)
    assert large < 2.2 * small, (small, large)
    assert large < 128 * 2**20, large


# -- 4. empty dimensions ------------------------------------------------------------------

EMPTY_SHAPES = {
    "no_batch": ((0, 3, 4), (0, 5, 4), (0, 5, 6)),
    "no_queries": ((2, 0, 4), (2, 5, 4), (2, 5, 6)),
    "no_keys": ((2, 3, 4), (2, 0, 4), (2, 0, 6)),
    "no_depth": ((2, 3, 0), (2, 5, 0), (2, 5, 6)),
    "no_value_depth": ((2, 3, 4), (2, 5, 4), (2, 5, 0)),
}


@pytest.mark.parametrize("name", EMPTY_SHAPES)
@pytest.mark.parametrize("path", ["chunked", "sequence_parallel"])
def test_empty_dimensions_give_what_xla_gives(name, path, rng):
    q_shape, k_shape, v_shape = EMPTY_SHAPES[name]
    q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in (q_shape, k_shape, v_shape))
    masks = (jnp.ones(q_shape[:-1], bool), jnp.ones(k_shape[:-1], bool))
    mesh = Mesh(np.array(jax.devices()[:1]), ("seq",))

    def run(impl, q, k, v):
        if impl == "sequence_parallel":
            return sequence_parallel_attention(
                None, q, v, k, masks, True, mesh=mesh, axis_name="seq"
            )
        return dot_attention(None, q, v, k, masks, True, implementation=impl)

    expected = run("xla", q, k, v)
    out = run(path, q, k, v)
    assert out.shape == expected.shape
    assert_close(out, expected)
    # Jitted: one compile instead of one per primitive of the derivative.
    grads, ref = (
        jax.jit(jax.grad(lambda *a, p=p: jnp.sum(run(p, *a)), argnums=(0, 1, 2)))(q, k, v)
        for p in (path, "xla")
    )
    for g, r in zip(grads, ref, strict=True):
        assert g.shape == r.shape
        assert_close(g, r)


# -- 5. the Linen module normalises precision like the config ------------------------------


@pytest.mark.parametrize("precision", ["HIGHEST", "high", jax.lax.Precision.HIGHEST])
def test_linen_and_nnx_accept_every_precision_spelling(precision, rng):
    q = jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32)
    layer = DotAttention(precision=precision)
    variables = layer.init(jax.random.key(0), q, q)
    expected = dot_attention(None, q, q, precision=precision)
    np.testing.assert_array_equal(layer.apply(variables, q, q), expected)
    np.testing.assert_array_equal(fdnnx.DotAttention(precision=precision)(q, q), expected)


# -- 6. every public entry point validates its arguments ----------------------------------

SCORES_BAD = [
    ("score_mode_capitalised", dict(score_mode="Dot"), r"score_mode must be one of .*'Dot'"),
    ("score_mode_unknown", dict(score_mode="general"), r"score_mode must be one of"),
    ("concat_without_weight", dict(score_mode="concat"), r"needs params\['concat_score_weight'\]"),
    ("scale_not_scalar", dict(scale=jnp.ones(2)), r"params\['scale'\] must be a scalar"),
    ("scale_a_string", dict(scale="2"), r"params\['scale'\] must be a real scalar"),
    ("key_depth", dict(key=jnp.ones((2, 3))), r"key depth must equal query depth D=4"),
    ("precision_unknown", dict(precision="max"), r"precision must be None, a jax.lax.Precision"),
    ("compute_dtype_int", dict(compute_dtype="int32"), r"compute_dtype must be one of"),
]


@pytest.mark.parametrize(
    "kwargs,pattern", [c[1:] for c in SCORES_BAD], ids=[c[0] for c in SCORES_BAD]
)
def test_attention_scores_rejects_bad_arguments(kwargs, pattern):
    args = dict(query=jnp.ones((3, 4)), key=jnp.ones((5, 4)))
    args.update(kwargs)
    with pytest.raises(ValueError, match=pattern):
        attention_scores(**args)


def test_attention_scores_takes_python_scalars():
    q = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(attention_scores(q, q, scale=2.0), [[2.0, 0.0], [0.0, 2.0]])
    concat = attention_scores(q, q, score_mode="concat", scale=0.5, concat_score_weight=2.0)
    expected = 2.0 * np.tanh(0.5 * (np.asarray(q)[:, None] + np.asarray(q)[None])).sum(-1)
    np.testing.assert_allclose(concat, expected, rtol=1e-6)


# The function, the config and both modules accept and reject exactly the same values.
OPTION_VALUES = [
    ("dropout_rate", np.float32(0.1), True),
    ("dropout_rate", np.int64(0), True),
    ("dropout_rate", 1.0, False),
    ("dropout_rate", True, False),
    ("dropout_rate", "0.1", False),
    ("score_mode", "concat", True),
    ("score_mode", "Dot", False),
    ("score_mode", np.str_("dot"), False),
    ("precision", "HIGH", True),
    ("precision", jax.lax.Precision.DEFAULT, True),
    ("precision", "fast", False),
    ("implementation", "chunked", True),
    ("implementation", "XLA", False),
    ("block_size", (8, 4), True),
    ("block_size", [8, 4], True),
    ("block_size", np.int32(16), True),
    ("block_size", {"block_q": 8, "block_k": 4, "block_q_backward": 4}, True),
    ("block_size", 0, False),
    ("block_size", (8, 4, 2), False),
    ("causal", np.bool_(True), True),
    ("causal", 1, False),
    ("deterministic", True, True),
    ("deterministic", "yes", False),
]


def _accepts(fn) -> bool:
    try:
        fn()
    except ValueError:
        return False
    return True


@pytest.mark.parametrize(
    "name,value,valid", OPTION_VALUES, ids=[f"{n}={v!r}" for n, v, _ in OPTION_VALUES]
)
def test_config_function_and_modules_agree_on_every_value(name, value, valid):
    q = jnp.ones((2, 3, 4))
    params = {"concat_score_weight": 1.0} if value == "concat" else None
    kwargs = {name: value}
    if name == "dropout_rate":
        kwargs["deterministic"] = True

    def function():
        if name == "causal":
            return dot_attention(params, q, q, None, None, value)
        return dot_attention(params, q, q, **kwargs)

    def linen():
        layer = DotAttention(**kwargs)
        return layer.init(jax.random.key(0), q, q)

    results = {
        "config": _accepts(lambda: DotAttentionConfig(**kwargs)),
        "function": _accepts(function),
        "linen": _accepts(linen),
        "nnx": _accepts(lambda: fdnnx.DotAttention(**kwargs)(q, q)),
    }
    assert results == dict.fromkeys(results, valid)
