"""Property tests with hypothesis: random shapes, masks, modes, dtypes and params.

The number of examples comes from the hypothesis profile: ``ci`` (the default: bounded,
derandomised) or ``dev`` (more examples), e.g.
``HYPOTHESIS_PROFILE=dev pytest tests/test_properties.py``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, tolerance
from hypothesis import given
from hypothesis import strategies as st
from keras_reference import keras_attention

from flax_dotattn import dot_attention

pytestmark = pytest.mark.slow  # the quick tier (-m "not slow") leaves this file out


@st.composite
def problems(draw, dtypes=(jnp.float32, jnp.bfloat16, jnp.float16), causal=None):
    batch = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    tq, tv = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    d, dv = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    score_mode = draw(st.sampled_from(["dot", "concat"]))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)

    def arr(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32).astype(dtype)

    params = {}
    if draw(st.booleans()):
        params["scale"] = jnp.float32(draw(st.floats(-3, 3, allow_nan=False, width=32)))
    if score_mode == "concat":
        params["concat_score_weight"] = jnp.float32(draw(st.floats(-3, 3, width=32)))
    qm = jnp.asarray(rng.random(batch + (tq,)) > 0.3) if draw(st.booleans()) else None
    vm = jnp.asarray(rng.random(batch + (tv,)) > 0.3) if draw(st.booleans()) else None
    return dict(
        params=params,
        query=arr(*batch, tq, d),
        value=arr(*batch, tv, dv),
        key=arr(*batch, tv, d),
        masks=(qm, vm),
        causal=draw(st.booleans()) if causal is None else causal,
        score_mode=score_mode,
    )


def _run(problem, **kwargs):
    """Runs the problem jitted (one compile per example instead of one per operation)."""
    static = tuple(sorted({"score_mode": problem["score_mode"], **kwargs}.items()))
    arrays = (problem["params"], problem["query"], problem["value"], problem["key"])
    return _jitted(static, problem["causal"], *arrays, problem["masks"])


@functools.partial(jax.jit, static_argnums=(0, 1))
def _jitted(static, causal, params, query, value, key, masks):
    return dot_attention(params, query, value, key, masks, causal, **dict(static))


@given(problems())
def test_weights_rows_sum_to_one(problem):
    _, w = _run(problem, return_attention_scores=True)
    atol = tolerance(w.dtype)  # the weights are rounded to the input dtype
    w = np.asarray(w, np.float32)
    assert np.isfinite(w).all()
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=atol)


@given(problems())
def test_masked_queries_have_exactly_zero_output(problem):
    out = np.asarray(_run(problem), np.float32)
    assert np.isfinite(out).all()
    qm = problem["masks"][0]
    if qm is not None:
        assert np.all(out[~np.asarray(qm)] == 0.0)


@given(problems(causal=False), st.randoms(use_true_random=False))
def test_permuting_keys_values_and_value_mask_together_changes_nothing(problem, random):
    tv = problem["value"].shape[-2]
    perm = np.array(random.sample(range(tv), tv))
    qm, vm = problem["masks"]
    permuted = dict(
        problem,
        value=problem["value"][..., perm, :],
        key=problem["key"][..., perm, :],
        masks=(qm, None if vm is None else vm[..., perm]),
    )
    dtype = problem["query"].dtype
    assert_close(_run(permuted), _run(problem), dtype, factor=4)


@given(problems(dtypes=(jnp.float32,), causal=True))
def test_causal_outputs_do_not_depend_on_future_keys(problem):
    tq, tv = problem["query"].shape[-2], problem["key"].shape[-2]
    i = tq - 1 if tq <= tv else tv - 1  # a row with future keys when tq < tv
    if i + 1 >= tv:
        return  # no future keys for any row
    grad_k, grad_v = jax.grad(
        lambda k, v: _run(dict(problem, key=k, value=v))[..., i, :].sum(), argnums=(0, 1)
    )(problem["key"], problem["value"])
    assert np.all(np.asarray(grad_k)[..., i + 1 :, :] == 0.0)
    assert np.all(np.asarray(grad_v)[..., i + 1 :, :] == 0.0)


@given(problems())
def test_chunked_matches_materialised(problem):
    dtype = problem["query"].dtype
    assert_close(
        _run(problem, implementation="chunked", block_size=(2, 3)),
        _run(problem, implementation="xla"),
        dtype,
        factor=4,
    )


@given(problems(dtypes=(jnp.float32,)))
def test_matches_keras_3(problem):
    qm, vm = problem["masks"]
    shape = problem["query"].shape
    batch = shape[:-2]

    def flat(x, tail):
        return None if x is None else np.asarray(x).reshape((-1,) + x.shape[len(batch) :])

    out, w = _run(problem, return_attention_scores=True)
    ref_out, ref_w = keras_attention(
        flat(problem["query"], 2),
        flat(problem["value"], 2),
        flat(problem["key"], 2),
        flat(qm, 1),
        flat(vm, 1),
        causal=problem["causal"],
        use_scale="scale" in problem["params"],
        score_mode=problem["score_mode"],
        scale=problem["params"].get("scale"),
        concat_score_weight=problem["params"].get("concat_score_weight"),
    )
    assert_close(np.asarray(out).reshape(ref_out.shape), ref_out, factor=5)
    assert_close(np.asarray(w).reshape(ref_w.shape), ref_w, factor=5)
