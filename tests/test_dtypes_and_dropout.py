"""Low-precision inputs and dropout on the attention weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close

from flax_dotattn import dot_attention

LOW = [jnp.float16, jnp.bfloat16]


@pytest.mark.parametrize("dtype", LOW, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("score_mode", ["dot", "concat"])
def test_low_precision_keeps_dtype_and_matches_float32(dtype, score_mode, rng):
    q = rng.normal(size=(2, 5, 8)).astype(np.float32)
    v = rng.normal(size=(2, 6, 8)).astype(np.float32)
    params = {"concat_score_weight": jnp.float32(1.0)} if score_mode == "concat" else None
    # Round the inputs to the low dtype first, so only the computation differs.
    ql, vl = jnp.asarray(q, dtype), jnp.asarray(v, dtype)
    out, w = dot_attention(params, ql, vl, score_mode=score_mode, return_attention_scores=True)
    assert out.dtype == dtype and w.dtype == dtype
    ref, ref_w = dot_attention(
        params,
        ql.astype(jnp.float32),
        vl.astype(jnp.float32),
        score_mode=score_mode,
        return_attention_scores=True,
    )
    assert_close(out, ref.astype(dtype), dtype)
    assert_close(w, ref_w.astype(dtype), dtype)


@pytest.mark.parametrize("dtype", [*LOW, jnp.float32], ids=lambda d: jnp.dtype(d).name)
def test_fully_masked_rows_and_large_logits_stay_finite(dtype):
    # Logits of magnitude ~6e4 overflow float16 arithmetic; Keras gives NaN here.
    q = jnp.full((1, 3, 4), 120.0, dtype)
    v = jnp.full((1, 5, 4), 120.0, dtype)
    masks = (jnp.array([[True, False, True]]), jnp.zeros((1, 5), bool))
    out, w = dot_attention(
        {"scale": jnp.float32(1.0)}, q, v, masks=masks, causal=True, return_attention_scores=True
    )
    assert np.isfinite(np.asarray(out, np.float32)).all()
    assert np.isfinite(np.asarray(w, np.float32)).all()
    grads = jax.grad(
        lambda q, v: dot_attention(None, q, v, masks=masks).astype(jnp.float32).sum(),
        argnums=(0, 1),
    )(q, v)
    for g in grads:
        assert np.isfinite(np.asarray(g, np.float32)).all()


def test_float64_inputs_compute_in_float64():
    with jax.enable_x64(True):
        q = jnp.ones((2, 3), jnp.float64)
        out = dot_attention(None, q, q)
        assert out.dtype == jnp.float64


def _dropout_setup(rate, seed=0, shape=(8, 64, 64)):
    q = jnp.zeros(shape[:-1] + (4,))  # zero logits: uniform weights 1/Tv
    k = jnp.ones(shape[:-2] + (shape[-1], 4))
    v = jnp.ones(shape[:-2] + (shape[-1], 2))
    return dot_attention(
        None,
        q,
        v,
        k,
        dropout_rate=rate,
        dropout_rng=jax.random.key(seed),
        deterministic=False,
        return_attention_scores=True,
    )


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_dropout_statistics(rate):
    out, w = _dropout_setup(rate)
    w = np.asarray(w)
    tv = w.shape[-1]
    dropped = np.mean(w == 0.0)
    assert abs(dropped - rate) < 0.01  # 32768 draws: std ~0.003
    kept = w[w != 0.0]
    np.testing.assert_allclose(kept, 1.0 / tv / (1.0 - rate), rtol=1e-5)
    # Inverted dropout keeps the expectation: rows of the dropped weights average to 1.
    assert abs(w.sum(-1).mean() - 1.0) < 0.02
    # The output uses the returned (post-dropout) weights.
    assert_close(out[..., 0], w.sum(-1))


def test_dropout_same_rng_same_result_and_different_rng_differs():
    a = _dropout_setup(0.3, seed=1)[1]
    b = _dropout_setup(0.3, seed=1)[1]
    c = _dropout_setup(0.3, seed=2)[1]
    np.testing.assert_array_equal(a, b)
    assert np.any(np.asarray(a) != np.asarray(c))


def test_deterministic_disables_dropout():
    q = jnp.ones((3, 4))
    det = dot_attention(
        None, q, q, dropout_rate=0.5, dropout_rng=jax.random.key(0), deterministic=True
    )
    assert_close(det, dot_attention(None, q, q))


def test_dropout_under_jit_with_traced_rng():
    q = jnp.ones((3, 4))
    f = jax.jit(
        lambda r: dot_attention(None, q, q, dropout_rate=0.5, dropout_rng=r, deterministic=False)
    )
    np.testing.assert_array_equal(f(jax.random.key(3)), f(jax.random.key(3)))
