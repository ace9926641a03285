"""The function, the config and both modules accept, reject and read option values alike.

Each value is given to ``DotAttentionConfig``, ``dot_attention``, the Linen module and the
NNX module; all four must accept it or all four must raise a ValueError. Every spelling of
``precision`` gives the function's numbers in both modules.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_dotattn import DotAttention, DotAttentionConfig, dot_attention
from flax_dotattn import nnx as fdnnx


@pytest.mark.parametrize("precision", ["HIGHEST", "high", jax.lax.Precision.HIGHEST])
def test_linen_and_nnx_accept_every_precision_spelling(precision, rng):
    q = jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32)
    layer = DotAttention(precision=precision)
    variables = layer.init(jax.random.key(0), q, q)
    expected = dot_attention(None, q, q, precision=precision)
    np.testing.assert_array_equal(layer.apply(variables, q, q), expected)
    np.testing.assert_array_equal(fdnnx.DotAttention(precision=precision)(q, q), expected)


# (option, value, whether it is valid)
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
