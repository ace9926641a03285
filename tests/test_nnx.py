"""flax_dotattn.nnx.DotAttention: same params, numbers and dropout as Linen and the function."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flax_dotattn import DotAttention, DotAttentionConfig, dot_attention
from flax_dotattn import nnx as fdnnx


def _inputs(rng):
    q = jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, 5, 4)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 5, 4)), jnp.float32)
    masks = (jnp.array([[1, 1, 0], [1, 0, 1]], bool), jnp.ones((2, 5), bool).at[0, 2].set(False))
    return q, v, k, masks


@pytest.mark.parametrize(
    "fields",
    [
        dict(),
        dict(use_scale=True),
        dict(score_mode="concat"),
        dict(use_scale=True, score_mode="concat", causal=True),
    ],
    ids=["plain", "scale", "concat", "scale_concat_causal"],
)
def test_nnx_linen_and_function_agree(fields, rng):
    q, v, k, masks = _inputs(rng)
    model = fdnnx.DotAttention(**fields)
    names = model.config.param_names
    for i, name in enumerate(names):  # non-default values
        getattr(model, name)[...] = jnp.float32(0.6 + i)
    assert isinstance(model.params(), dict) and sorted(model.params()) == sorted(names)
    out = model(q, v, k, masks)
    linen_module, variables = fdnnx.to_linen(model)
    np.testing.assert_array_equal(out, linen_module.apply(variables, q, v, k, masks))
    ref = dot_attention(
        model.params(),
        q,
        v,
        k,
        masks,
        fields.get("causal", False),
        score_mode=fields.get("score_mode", "dot"),
    )
    np.testing.assert_array_equal(out, ref)
    back = fdnnx.from_linen(linen_module, variables)
    np.testing.assert_array_equal(back(q, v, k, masks), out)
    assert back.config == model.config


def test_params_are_nnx_params_initialised_to_one():
    model = fdnnx.DotAttention(use_scale=True, score_mode="concat")
    state = nnx.state(model, nnx.Param)
    leaves = {str(path[-1]): leaf for path, leaf in nnx.to_flat_state(state)}
    assert sorted(leaves) == ["concat_score_weight", "scale"]
    assert all(float(leaf[...]) == 1.0 for leaf in leaves.values())


def test_linen_variables_convert_to_nnx(rng):
    q, v, k, masks = _inputs(rng)
    linen = DotAttention(use_scale=True)
    variables = linen.init(jax.random.key(0), q, v, k, masks)
    variables = {"params": {"scale": jnp.float32(1.7)}}
    model = fdnnx.from_linen(linen, variables)
    np.testing.assert_array_equal(model(q, v, k, masks), linen.apply(variables, q, v, k, masks))
    with pytest.raises(ValueError, match=r"expected params \['scale'\]"):
        fdnnx.from_linen(linen, {"params": {}})


def test_dropout_through_rngs_train_and_eval(rng):
    q, v, k, _ = _inputs(rng)
    model = fdnnx.DotAttention(dropout_rate=0.5, rngs=nnx.Rngs(dropout=0))
    model.train()
    a, b = model(q, v, k), model(q, v, k)
    assert not np.allclose(a, b)  # the stream advances
    same = [
        fdnnx.DotAttention(dropout_rate=0.5, deterministic=False, rngs=nnx.Rngs(dropout=3))(q, v, k)
        for _ in range(2)
    ]
    np.testing.assert_array_equal(*same)
    model.eval()
    np.testing.assert_array_equal(model(q, v, k), dot_attention(None, q, v, k))
    key = jax.random.key(5)
    np.testing.assert_array_equal(
        model(q, v, k, deterministic=False, rngs=key),
        dot_attention(None, q, v, k, dropout_rate=0.5, dropout_rng=key, deterministic=False),
    )


def test_nnx_errors():
    with pytest.raises(ValueError, match="score_mode must be one of"):
        fdnnx.DotAttention(score_mode="additive")
    model = fdnnx.DotAttention(dropout_rate=0.5)
    with pytest.raises(ValueError, match="needs deterministic=True/False"):
        model(jnp.ones((2, 3)), jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="no rngs were given"):
        model(jnp.ones((2, 3)), jnp.ones((2, 3)), deterministic=False)


def test_nnx_jit_and_grad(rng):
    q, v, k, masks = _inputs(rng)
    model = fdnnx.DotAttention(use_scale=True)

    @nnx.jit
    def loss(model, q):
        return jnp.sum(model(q, v, k, masks) ** 2)

    grads = nnx.grad(loss)(model, q)
    assert float(grads.scale[...]) != 0.0
    assert model.config == DotAttentionConfig(use_scale=True)


def test_no_dropout_draws_nothing_from_the_rngs():
    rngs, fresh = nnx.Rngs(0), nnx.Rngs(0)
    fdnnx.DotAttention(use_scale=True, rngs=rngs)  # dropout_rate=0: no stream forked
    assert jnp.array_equal(jax.random.key_data(rngs.params()), jax.random.key_data(fresh.params()))
    with_dropout = nnx.Rngs(0)
    fdnnx.DotAttention(dropout_rate=0.1, rngs=with_dropout)  # forks the dropout stream
    assert not jnp.array_equal(
        jax.random.key_data(with_dropout.params()), jax.random.key_data(nnx.Rngs(0).params())
    )


def test_config_keeps_the_constructed_values_not_the_train_eval_state():
    layer = fdnnx.DotAttention(dropout_rate=0.1, rngs=nnx.Rngs(0))
    assert layer.config.deterministic is None
    layer.eval()
    q = jnp.ones((1, 3, 4))
    layer(q, q)  # eval: no dropout, no error
    assert layer.config.deterministic is None
    assert layer.config == fdnnx.DotAttention.from_config(layer.config).config
    layer.train()
    assert layer.config.deterministic is None
