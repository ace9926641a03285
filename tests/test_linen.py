"""DotAttention (Linen) owns the params and delegates every number to dot_attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close

from flax_dotattn import DotAttention, DotAttentionConfig, dot_attention
from flax_dotattn import nnx as fdnnx


def _inputs(rng):
    q = jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, 5, 4)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 5, 4)), jnp.float32)
    masks = (jnp.array([[1, 1, 0], [1, 0, 1]], bool), jnp.ones((2, 5), bool).at[0, 2].set(False))
    return q, v, k, masks


@pytest.mark.parametrize(
    "fields,expected_params",
    [
        (dict(), {}),
        (dict(use_scale=True), {"scale": ()}),
        (dict(score_mode="concat"), {"concat_score_weight": ()}),
        (dict(use_scale=True, score_mode="concat"), {"scale": (), "concat_score_weight": ()}),
    ],
    ids=["none", "scale", "concat", "scale_concat"],
)
def test_params_match_keras_weights(fields, expected_params, rng):
    q, v, k, _ = _inputs(rng)
    variables = DotAttention(**fields).init(jax.random.key(0), q, v, k)
    params = variables.get("params", {})
    assert jax.tree.map(jnp.shape, dict(params)) == expected_params
    for leaf in jax.tree.leaves(params):
        assert leaf.dtype == jnp.float32 and float(leaf) == 1.0


@pytest.mark.parametrize("score_mode", ["dot", "concat"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_module_output_equals_function_output(score_mode, causal, rng):
    q, v, k, masks = _inputs(rng)
    layer = DotAttention(use_scale=True, score_mode=score_mode, causal=causal)
    variables = layer.init(jax.random.key(0), q, v, k, masks)
    params = {name: jnp.float32(0.5 + i) for i, name in enumerate(variables["params"])}
    out, w = layer.apply({"params": params}, q, v, k, masks, return_attention_scores=True)
    ref_out, ref_w = dot_attention(
        params, q, v, k, masks, causal, score_mode=score_mode, return_attention_scores=True
    )
    np.testing.assert_array_equal(out, ref_out)
    np.testing.assert_array_equal(w, ref_w)


def test_call_arguments_override_fields(rng):
    q, v, k, _ = _inputs(rng)
    layer = DotAttention(causal=True, dropout_rate=0.5, deterministic=True)
    variables = layer.init(jax.random.key(0), q, v, k)
    assert_close(
        layer.apply(variables, q, v, k, causal=False), dot_attention(None, q, v, k, causal=False)
    )
    dropped = layer.apply(
        variables, q, v, k, deterministic=False, rngs={"dropout": jax.random.key(1)}
    )
    assert dropped.shape == (2, 3, 4)
    assert not np.allclose(dropped, layer.apply(variables, q, v, k))


def test_dropout_uses_the_dropout_rng_stream(rng):
    q, v, k, _ = _inputs(rng)
    layer = DotAttention(dropout_rate=0.5, deterministic=False)
    variables = layer.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, q, v, k)
    a = layer.apply(variables, q, v, k, rngs={"dropout": jax.random.key(7)})
    b = layer.apply(variables, q, v, k, rngs={"dropout": jax.random.key(7)})
    c = layer.apply(variables, q, v, k, rngs={"dropout": jax.random.key(8)})
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_dtype_casts_inputs_and_param_dtype_sets_params(rng):
    q, v, k, _ = _inputs(rng)
    layer = DotAttention(use_scale=True, dtype=jnp.bfloat16, param_dtype=jnp.float16)
    variables = layer.init(jax.random.key(0), q, v, k)
    assert variables["params"]["scale"].dtype == jnp.float16
    assert layer.apply(variables, q, v, k).dtype == jnp.bfloat16


def test_from_config_and_config_round_trip():
    cfg = DotAttentionConfig(
        use_scale=True,
        score_mode="concat",
        dropout_rate=0.1,
        causal=True,
        deterministic=False,
        dtype="bfloat16",
        precision="high",
    )
    layer = DotAttention.from_config(cfg, name="attn")
    assert layer.name == "attn" and layer.config == cfg


def test_module_inside_a_jitted_train_step(rng):
    import optax

    q, v, k, masks = _inputs(rng)
    layer = DotAttention(use_scale=True)
    params = layer.init(jax.random.key(0), q, v, k, masks)["params"]
    opt = optax.sgd(0.1)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(
            lambda p: jnp.sum(layer.apply({"params": p}, q, v, k, masks) ** 2)
        )(params)
        updates, state = opt.update(grads, state)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(3):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert np.isfinite(losses).all() and float(params["scale"]) != 1.0


@pytest.mark.parametrize("scale_init", [1.0, 0.125])
def test_scale_init_sets_the_learned_scale_and_round_trips(scale_init):
    q = jnp.ones((2, 3, 64))
    layer = DotAttention(use_scale=True, scale_init=scale_init)
    variables = layer.init(jax.random.key(0), q, q)
    assert float(variables["params"]["scale"]) == scale_init
    nnx_layer = fdnnx.DotAttention(use_scale=True, scale_init=scale_init)
    assert float(nnx_layer.scale[...]) == scale_init
    expected = dot_attention({"scale": jnp.float32(scale_init)}, q, q)
    np.testing.assert_allclose(layer.apply(variables, q, q), expected)
    config = layer.config
    assert config.scale_init == scale_init
    assert DotAttentionConfig.from_dict(config.to_dict()) == config
    assert nnx_layer.config == config


def test_scale_init_must_be_a_finite_float():
    with pytest.raises(ValueError, match="scale_init must be finite"):
        DotAttentionConfig(scale_init=float("nan"))
    with pytest.raises(ValueError, match="scale_init must be a finite Python float"):
        DotAttentionConfig(scale_init="0.1")


def test_a_scale_init_keras_cannot_carry_warns_on_export():
    with pytest.warns(UserWarning, match="scale_init=0.125 is not exported"):
        DotAttentionConfig(use_scale=True, scale_init=0.125).to_keras()
