"""No NaN/inf for finite inputs, in values and gradients, in every dtype and path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_dotattn import dot_attention

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
# The 16-bit cases of the big grid run in the full suite only (not in -m "not slow").
GRID_DTYPES = [jnp.float32] + [pytest.param(d, marks=pytest.mark.slow) for d in DTYPES[1:]]
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


@pytest.mark.parametrize(  # the xla half runs in the full suite only
    "implementation", [pytest.param("xla", marks=pytest.mark.slow), "chunked"]
)
@pytest.mark.parametrize("dtype", GRID_DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", CASES)
def test_values_and_gradients_are_finite(case, dtype, implementation):
    params, q, v, k, masks, causal = _case(case, dtype)

    def loss(params, q, v, k):
        out = dot_attention(params, q, v, k, masks, causal, implementation=implementation)
        assert out.dtype == dtype
        return jnp.sum(out.astype(jnp.float32) ** 2), out

    (value, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(
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


# -- non-finite inputs that the masks hide or that a bias writes --------------------------


def _left_padding_bias(t, n_pad, dtype=jnp.float32):
    """The additive-mask idiom: ``-inf`` on the first ``n_pad`` keys, 0 elsewhere."""
    return jnp.where(jnp.arange(t) < n_pad, -jnp.inf, 0.0).astype(dtype)[None, None, :]


@pytest.mark.parametrize(
    "dtype",
    [jnp.float32, pytest.param(jnp.float16, marks=pytest.mark.slow)],
    ids=lambda d: jnp.dtype(d).name,
)
@pytest.mark.parametrize("n_pad", [200, 300, 700])  # under one 256-key block, and past it
def test_a_minus_inf_bias_gives_the_materialised_numbers_on_the_chunked_path(n_pad, dtype):
    t = 1024
    q = jax.random.normal(jax.random.key(0), (1, t, 16)).astype(dtype)
    bias = _left_padding_bias(t, n_pad, dtype)

    def loss(impl, q, k):
        out = dot_attention(None, q, q if k is None else k, bias=bias, implementation=impl)
        return jnp.sum(out.astype(jnp.float32) ** 2), out

    step = jax.jit(jax.value_and_grad(loss, argnums=(1, 2), has_aux=True), static_argnums=0)
    results = {impl: step(impl, q, q) for impl in ("xla", "chunked")}
    (_, expected), expected_grads = results["xla"]
    (_, out), grads = results["chunked"]
    assert _finite(expected) and _finite(expected_grads)
    assert _finite(out) and _finite(grads)
    tol = 2e-3 if dtype == jnp.float16 else 2e-5
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(expected, np.float32), rtol=tol, atol=tol
    )
    for g, e in zip(grads, expected_grads, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=tol * 10, atol=tol * 10)


@pytest.mark.parametrize(
    "implementation", [*IMPLS, pytest.param(None, marks=pytest.mark.slow, id="automatic")]
)
@pytest.mark.parametrize("n_pad", [300, 512])  # a partial block of padding, and whole ones
def test_non_finite_keys_and_values_hidden_by_the_value_mask_never_reach_the_output(
    n_pad, implementation
):
    t = 1024
    r = np.random.default_rng(0)
    q, k, v = (jnp.asarray(r.normal(size=(2, t, 8)), jnp.float32) for _ in range(3))
    keep = jnp.arange(t) < t - n_pad  # [Tv]: the last n_pad keys are padding
    garbage = jnp.where(keep[None, :, None], 0.0, jnp.nan)  # [1, Tv, 1]: NaN in the padding
    masks = (None, keep)

    def loss(q, k, v):
        out = dot_attention(None, q, v, k, masks, implementation=implementation)
        return jnp.sum(out**2), out

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    (_, out), grads = step(q, k + garbage, v + garbage)
    (_, clean), clean_grads = step(q, k, v)
    np.testing.assert_allclose(out, clean, rtol=2e-5, atol=2e-5)
    for g, c in zip(grads, clean_grads, strict=True):
        assert np.isfinite(np.asarray(g)).all()
        np.testing.assert_allclose(g, c, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("implementation", IMPLS)
def test_a_row_whose_every_logit_is_minus_inf_is_nan_on_every_path(implementation):
    q = jax.random.normal(jax.random.key(1), (1, 40, 8))
    bias = jnp.zeros((40, 40)).at[3].set(-jnp.inf)  # row 3 has no softmax at all
    out = dot_attention(None, q, q, bias=bias, implementation=implementation, block_size=(8, 16))
    heads = q[:, :, None, :]  # jax.nn's [B, T, N, H]
    reference = jax.nn.dot_product_attention(heads, heads, heads, bias=bias[None, None], scale=1.0)
    reference = reference[:, :, 0, :]
    assert np.isnan(np.asarray(out[0, 3])).all() and np.isnan(np.asarray(reference[0, 3])).all()
    rows = np.arange(40) != 3
    np.testing.assert_allclose(out[0, rows], reference[0, rows], rtol=2e-5, atol=2e-5)


def test_rows_of_minus_inf_that_the_query_mask_zeroes_leave_gradients_finite_on_every_path():
    # The additive padding idiom: padded queries see only -inf logits, and the query
    # mask zeroes their rows. Every path gives finite gradients (0 for those rows).
    t = 12
    q = jax.random.normal(jax.random.key(2), (2, t, 8))
    real = jnp.arange(t) < 9  # [T]
    bias = jnp.where(real[:, None] & real[None, :], 0.0, -jnp.inf)  # [Tq, Tv]
    grads = {}
    for impl in IMPLS:

        def loss(q, k, v, impl=impl):
            out = dot_attention(
                None, q, v, k, (real, real), bias=bias, implementation=impl, block_size=(4, 4)
            )
            return jnp.sum(out**2)

        grads[impl] = jax.jit(jax.grad(loss, (0, 1, 2)))(q, q, q)
        assert _finite(grads[impl]), impl
    for g, e in zip(grads["chunked"], grads["xla"], strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)  # gradients of size ~1


@pytest.mark.parametrize("implementation", IMPLS)
@pytest.mark.parametrize("n_pad", [300, 512])
def test_non_finite_values_hidden_by_a_key_padding_mask_never_reach_the_output(
    n_pad, implementation
):
    t = 1024
    r = np.random.default_rng(1)
    q, k, v = (jnp.asarray(r.normal(size=(2, t, 8)), jnp.float32) for _ in range(3))
    keep = jnp.arange(t) < t - n_pad
    garbage = jnp.where(keep[None, :, None], 0.0, jnp.nan)
    padding = keep[None, None, :]  # [1, 1, Tv]: a key-padding attention_mask

    @jax.jit
    def run(k, v):
        return dot_attention(None, q, v, k, attention_mask=padding, implementation=implementation)

    np.testing.assert_allclose(run(k + garbage, v + garbage), run(k, v), rtol=2e-5, atol=2e-5)
