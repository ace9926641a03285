"""Hand-derived golden values and the semantic rules of the Keras layer."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close

from flax_dotattn import attention_scores, dot_attention, make_causal_mask

E = math.e


def test_keras_2x2_golden_values():
    # Scores [[0, 1], [1, 0]] -> weights [1, e] / (1 + e) and its mirror.
    query = jnp.array([[[1.0, 0.0], [0.0, 1.0]]])
    key = jnp.array([[[0.0, 1.0], [1.0, 0.0]]])
    value = jnp.array([[[1.0, 2.0], [3.0, 4.0]]])
    out, w = dot_attention(None, query, value, key, return_attention_scores=True)
    a, b = 1 / (1 + E), E / (1 + E)
    assert_close(w, [[[a, b], [b, a]]])
    assert_close(out, [[[a * 1 + b * 3, a * 2 + b * 4], [b * 1 + a * 3, b * 2 + a * 4]]])
    np.testing.assert_allclose(out, [[[2.462, 3.462], [1.538, 2.538]]], atol=5e-4)


def test_no_inverse_sqrt_depth_factor():
    # With D = 4 a 1/sqrt(D) factor would halve the logits; Keras has none.
    q = jnp.ones((1, 4))
    k = jnp.array([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    _, w = dot_attention(None, q, k, return_attention_scores=True)
    assert_close(w, [[E**4 / (1 + E**4), 1 / (1 + E**4)]])


def test_scale_multiplies_the_logits():
    q, k = jnp.ones((1, 1)), jnp.array([[1.0], [0.0]])
    _, w = dot_attention({"scale": 3.0}, q, k, return_attention_scores=True)
    assert_close(w, [[E**3 / (1 + E**3), 1 / (1 + E**3)]])


def test_concat_scores_golden():
    # scores = w * sum(tanh(s * (q + k))), scale inside the tanh.
    q = jnp.array([[0.5, -0.25]])
    k = jnp.array([[1.0, 0.0], [0.0, 2.0]])
    s, cw = 0.7, -1.5
    scores = attention_scores(
        q, k, score_mode="concat", scale=jnp.float32(s), concat_score_weight=jnp.float32(cw)
    )
    expected = [
        [
            cw * (math.tanh(s * 1.5) + math.tanh(s * -0.25)),
            cw * (math.tanh(s * 0.5) + math.tanh(s * 1.75)),
        ]
    ]
    assert_close(scores, expected)


def test_attention_scores_takes_python_scalars():
    q = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(attention_scores(q, q, scale=2.0), [[2.0, 0.0], [0.0, 2.0]])
    concat = attention_scores(q, q, score_mode="concat", scale=0.5, concat_score_weight=2.0)
    expected = 2.0 * np.tanh(0.5 * (np.asarray(q)[:, None] + np.asarray(q)[None])).sum(-1)
    np.testing.assert_allclose(concat, expected, rtol=1e-6)


def test_value_mask_subtracts_1e9_not_replaces():
    # Two masked keys with logits 0 and 64: after subtracting 1e9 (float32 spacing is 64
    # there) their order survives; a replacement by -1e9 would make them equal.
    q = jnp.ones((1, 1))
    k = jnp.array([[0.0], [64.0]])
    v = jnp.array([[1.0], [2.0]])
    _, w = dot_attention(
        None, q, v, k, masks=(None, jnp.array([False, False])), return_attention_scores=True
    )
    expected = jax.nn.softmax(jnp.array([0.0 - 1e9, 64.0 - 1e9], jnp.float32))
    assert_close(w, expected[None])
    assert float(w[0, 1]) > 0.99


def test_masked_query_rows_are_zero_in_output_but_not_in_weights():
    q = jnp.ones((2, 3))
    v = jnp.arange(12.0).reshape(4, 3)
    out, w = dot_attention(
        None, q, v, masks=(jnp.array([True, False]), None), return_attention_scores=True
    )
    assert np.all(np.asarray(out[1]) == 0.0)
    assert np.any(np.asarray(out[0]) != 0.0)
    assert_close(w[1], w[0])
    assert_close(w.sum(-1), [1.0, 1.0])


def test_causal_mask_is_top_left_aligned():
    np.testing.assert_array_equal(make_causal_mask(2, 4), [[1, 0, 0, 0], [1, 1, 0, 0]])
    np.testing.assert_array_equal(make_causal_mask(3, 2), [[1, 0], [1, 1], [1, 1]])
    _, w = dot_attention(
        None, jnp.ones((2, 3)), jnp.ones((4, 3)), causal=True, return_attention_scores=True
    )
    assert_close(w, [[1, 0, 0, 0], [0.5, 0.5, 0, 0]])


@pytest.mark.parametrize("tq,tv", [(4, 4), (3, 6), (6, 3)])
def test_causality_through_gradients(tq, tv, rng):
    q = jnp.asarray(rng.normal(size=(tq, 5)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(tv, 5)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(tv, 2)), jnp.float32)
    for i in range(tq):
        grad_k, grad_v = jax.grad(
            lambda k, v, i=i: dot_attention(None, q, v, k, causal=True)[i].sum(),
            argnums=(0, 1),
        )(k, v)
        future = np.arange(tv) > i
        assert np.all(np.asarray(grad_k)[future] == 0.0)
        assert np.all(np.asarray(grad_v)[future] == 0.0)
        assert np.any(np.asarray(grad_v)[~future] != 0.0)


def test_key_defaults_to_value(rng):
    q = rng.normal(size=(2, 3, 4)).astype(np.float32)
    v = rng.normal(size=(2, 5, 4)).astype(np.float32)
    assert_close(dot_attention(None, q, v), dot_attention(None, q, v, v))


def test_matches_jax_nn_dot_product_attention_with_unit_scale(rng):
    q = rng.normal(size=(2, 7, 8)).astype(np.float32)
    k = rng.normal(size=(2, 9, 8)).astype(np.float32)
    v = rng.normal(size=(2, 9, 8)).astype(np.float32)
    vm = rng.random((2, 9)) > 0.3
    vm[:, 0] = True
    expected = jax.nn.dot_product_attention(
        q[:, :, None],
        k[:, :, None],
        v[:, :, None],
        scale=1.0,
        mask=jnp.asarray(vm)[:, None, None, :],
    )[:, :, 0]
    assert_close(dot_attention(None, q, v, k, masks=(None, vm)), expected)
