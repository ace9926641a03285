"""No NaN/inf for finite inputs, in values and gradients, in every dtype and path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_dotattn import dot_attention

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
IMPLS = ["xla", "chunked"]


def _finite(tree):
    return all(np.isfinite(np.asarray(x, np.float32)).all() for x in jax.tree.leaves(tree))


def _case(name, dtype):
    """Returns ``(params, q, v, k, masks, causal)`` for a named hard case."""
    rng = np.random.default_rng(0)

    def arr(*shape, scale=1.0):
        return jnp.asarray(rng.normal(size=shape) * scale, jnp.float32).astype(dtype)

    q, v, k = arr(2, 6, 4), arr(2, 9, 3), arr(2, 9, 4)
    vm = jnp.asarray(rng.random((2, 9)) > 0.3).at[:, 0].set(True)
    qm = jnp.ones((2, 6), bool)
    params = {"scale": jnp.float32(1.0)}
    if name == "fully_masked_rows":
        return params, q, v, k, (qm, vm.at[1].set(False)), False
    if name == "causal_rows_without_keys":
        return params, q, v, k, (qm, vm.at[:, :4].set(False)), True
    if name == "fully_masked_queries":
        return params, q, v, k, (jnp.zeros((2, 6), bool), vm), True
    if name == "logits_1e4":  # |q . k| ~ 1e4: overflows float16 arithmetic, not ours
        return params, arr(2, 6, 1, scale=100.0), v, arr(2, 9, 1, scale=100.0), None, False
    if name == "large_scale":
        return {"scale": jnp.float32(1e4)}, q, v, k, (None, vm), True
    if name == "tq_1":
        return params, q[:, :1], v, k, (qm[:, :1], vm), True
    if name == "tv_1":
        return params, q, v[:, :1], k[:, :1], (qm, vm[:, :1]), True
    if name == "long_rows":
        n = 8192
        return params, arr(1, 4, 4), arr(1, n, 2), arr(1, n, 4), None, False
    raise ValueError(name)


CASES = [
    "fully_masked_rows",
    "causal_rows_without_keys",
    "fully_masked_queries",
    "logits_1e4",
    "large_scale",
    "tq_1",
    "tv_1",
    "long_rows",
]


@pytest.mark.parametrize("implementation", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", CASES)
def test_values_and_gradients_are_finite(case, dtype, implementation):
    params, q, v, k, masks, causal = _case(case, dtype)

    def loss(params, q, v, k):
        out = dot_attention(params, q, v, k, masks, causal, implementation=implementation)
        assert out.dtype == dtype
        return jnp.sum(out.astype(jnp.float32) ** 2), out

    (value, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(
        params, q, v, k
    )
    assert _finite(out) and _finite(value)
    assert _finite(grads)
    if case == "fully_masked_queries":
        assert np.all(np.asarray(out, np.float32) == 0.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_weights_are_finite_and_normalised_in_hard_cases(dtype):
    for case in ("fully_masked_rows", "logits_1e4", "large_scale", "tv_1"):
        params, q, v, k, masks, causal = _case(case, dtype)
        _, w = dot_attention(params, q, v, k, masks, causal, return_attention_scores=True)
        w = np.asarray(w, np.float32)
        assert np.isfinite(w).all()
        np.testing.assert_allclose(w.sum(-1), 1.0, atol=2e-2 if dtype != jnp.float32 else 1e-5)
