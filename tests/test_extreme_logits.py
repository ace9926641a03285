"""The chunked path keeps Keras's masking rule for logits of any magnitude.

Under Keras's rule a masked logit ``s`` becomes ``s - 1e9``, which can still beat a visible
logit below -1e9, so a hidden block may be skipped only when its weights are exactly zero.
References: Keras's rule derived by hand, and the materialised (xla) path, itself checked
against Keras 3 in test_keras_parity.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close

from flax_dotattn import dot_attention


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("score_mode", ["dot", "concat"])
@pytest.mark.parametrize("block", [(2, 3), (3, 2), (5, 1)], ids=str)
def test_chunked_equals_xla_for_logits_up_to_1e10(score_mode, block, rng):
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
