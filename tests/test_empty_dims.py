"""Empty dimensions (no batch, queries, keys, depth or value depth) give what xla gives.

The chunked and sequence-parallel paths return the xla path's output and gradients, with
the same shapes, when any dimension of the inputs is zero.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close
from jax.sharding import Mesh

from flax_dotattn import dot_attention, sequence_parallel_attention

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

    @functools.partial(jax.jit, static_argnums=0)
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
