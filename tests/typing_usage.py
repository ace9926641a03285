"""Typed usage of the public API, checked by mypy (tests/test_typing.py) and also run.

Each ``assert_type`` states the type a type checker must infer; at run time it returns
its argument unchanged, so :func:`use_the_api` runs as plain code too.
"""

from __future__ import annotations

from typing import assert_type

import jax
import jax.numpy as jnp
from flax import nnx

from flax_dotattn import (
    BlockSizes,
    DotAttention,
    DotAttentionConfig,
    dot_attention,
    which_implementation,
)
from flax_dotattn import nnx as fdnnx
from flax_dotattn._src.dispatch import Plan


def use_the_api(flag: bool) -> None:
    """Calls each entry point with typed arguments; mypy checks the inferred types."""
    q = jnp.ones((2, 3, 4))
    v = jnp.ones((2, 5, 4))

    # dot_attention: the return type follows return_attention_scores.
    assert_type(dot_attention(None, q, v), jax.Array)
    assert_type(dot_attention(None, q, v, causal=True, window=(2, 0)), jax.Array)
    assert_type(dot_attention(None, q, v, return_attention_scores=False), jax.Array)
    out, weights = assert_type(
        dot_attention(None, q, v, return_attention_scores=True), tuple[jax.Array, jax.Array]
    )
    assert_type(weights, jax.Array)
    assert out.shape == (2, 3, 4) and weights.shape == (2, 3, 5)
    assert_type(
        dot_attention(None, q, v, return_attention_scores=flag),
        jax.Array | tuple[jax.Array, jax.Array],
    )
    assert_type(
        dot_attention(
            {"scale": jnp.float32(2.0)},
            q,
            v,
            v,
            (None, jnp.ones((2, 5), bool)),
            score_mode="dot",
            precision=jax.lax.Precision.HIGHEST,
            implementation="chunked",
            block_size=(16, 8),
        ),
        jax.Array,
    )
    assert_type(which_implementation(None, q, v, return_attention_scores=True), Plan)

    # The Linen module's fields, as declared in its class body.
    layer = DotAttention(use_scale=True, score_mode="concat", dropout_rate=0.1, causal=True)
    assert_type(layer.use_scale, bool)
    assert_type(layer.causal, bool)
    assert_type(layer.dropout_rate, float)
    assert_type(layer.deterministic, bool | None)
    assert_type(layer.window, tuple[int | None, int | None] | None)
    assert_type(layer.config, DotAttentionConfig)
    blocks = BlockSizes(block_q=8, block_k=8)
    DotAttention(dtype=jnp.bfloat16, precision="highest", block_size=blocks)
    variables = layer.init(jax.random.key(0), q, v, deterministic=True)
    layer.apply(variables, q, v, deterministic=True)

    # The NNX module: explicit keyword arguments, attributes by their canonical values.
    model = fdnnx.DotAttention(use_scale=True, window=(4, 0), rngs=nnx.Rngs(0))
    assert_type(model.use_scale, bool)
    assert_type(model.window, tuple[int | None, int | None] | None)
    assert_type(model.block_size, BlockSizes | None)
    model(q, v)

    # The config: canonical field types.
    config = DotAttentionConfig(use_scale=True, dtype="bfloat16")
    assert_type(config.param_names, tuple[str, ...])
    assert_type(DotAttention.from_config(config), DotAttention)
