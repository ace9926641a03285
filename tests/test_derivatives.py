"""Forward-mode derivatives on every path, ``jacfwd == jacrev``, and linear memory.

``jax.jvp`` and ``jax.jacfwd`` work wherever ``jax.grad`` does, automatic dispatch
included, and the chunked path's derivatives (reverse and forward mode) take memory linear
in ``T``. Second-order derivatives and ``check_grads`` are in test_transformations.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close

from flax_dotattn import dot_attention


@pytest.mark.parametrize("implementation", [None, "chunked", "xla"])
def test_jvp_equals_the_xla_path_on_every_path(implementation, rng):
    # T = 2048: large enough for automatic dispatch (None) to choose the chunked path.
    q = jnp.asarray(rng.normal(size=(1, 2048, 8)) * 0.3, jnp.float32)
    t = jnp.asarray(rng.normal(size=(1, 2048, 8)), jnp.float32)

    def f(impl, q):
        return dot_attention(None, q, q, causal=True, implementation=impl)

    jvp = jax.jit(lambda impl, q, t: jax.jvp(lambda q: f(impl, q), (q,), (t,)), static_argnums=0)
    out, tangent = jvp(implementation, q, t)
    ref_out, ref_tangent = jvp("xla", q, t)
    assert_close(out, ref_out)
    assert_close(tangent, ref_tangent, factor=5)


@pytest.mark.slow
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
        fwd = jax.jit(jax.jacfwd(f, argnums=(0, 1, 2, 3)))(params, q, k, v)
        rev = jax.jit(jax.jacrev(f, argnums=(0, 1, 2, 3)))(params, q, k, v)
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
