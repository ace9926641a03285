"""DotAttentionConfig: validation, dict/JSON/YAML round trips and Keras interop."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close
from keras_reference import keras

from flax_dotattn import (
    BlockSizes,
    DotAttention,
    DotAttentionConfig,
    dot_attention,
    load_config,
    params_from_keras,
    params_to_keras,
    save_config,
)

CONFIGS = {
    "default": DotAttentionConfig(),
    "scale_causal": DotAttentionConfig(use_scale=True, causal=True),
    "concat_dropout": DotAttentionConfig(
        score_mode="concat", dropout_rate=0.25, deterministic=False
    ),
    "chunked_blocks": DotAttentionConfig(implementation="chunked", block_size=(512, 128)),
    "int_block": DotAttentionConfig(implementation="xla", block_size=64),
    "mixed_bf16": DotAttentionConfig(
        dtype="bfloat16", param_dtype="float32", precision="highest", deterministic=True
    ),
}


@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_round_trip_dict_json_yaml_module(cfg, tmp_path):
    assert DotAttentionConfig.from_dict(cfg.to_dict()) == cfg
    assert DotAttentionConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for suffix in (".json", ".yaml", ".yml"):
        path = save_config(cfg, tmp_path / f"cfg{suffix}")
        assert load_config(path) == cfg
    assert DotAttention.from_config(cfg).config == cfg
    assert DotAttention.from_config(load_config(path)).config == cfg


def test_config_is_frozen_hashable_and_a_static_jit_argument():
    cfg = DotAttentionConfig(use_scale=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.use_scale = False  # type: ignore[misc]
    assert hash(cfg) == hash(DotAttentionConfig(use_scale=True))

    @jax.jit
    def f(x, cfg=cfg):
        return x * 2

    traced = jax.jit(
        lambda x, cfg: dot_attention({"scale": 1.0}, x, x, causal=cfg.causal), static_argnums=1
    )
    assert traced(jnp.ones((2, 3)), cfg).shape == (2, 3)


def test_block_sizes_are_normalised_and_serialise_as_dicts():
    cfg = DotAttentionConfig(block_size=[256, 64])
    assert cfg.block_size == BlockSizes(block_q=256, block_k=64) and hash(cfg)
    assert cfg.to_dict()["block_size"] == {
        "block_q": 256,
        "block_k": 64,
        "block_q_backward": None,
        "block_k_backward": None,
    }
    assert DotAttentionConfig.from_dict(cfg.to_dict()) == cfg
    assert DotAttentionConfig(block_size=32).block_size == BlockSizes(block_q=32, block_k=32)


def test_module_passes_implementation_and_block_size_through():
    cfg = DotAttentionConfig(implementation="chunked", block_size=(4, 4))
    layer = DotAttention.from_config(cfg)
    q = jnp.ones((2, 8, 3))
    jaxpr = str(jax.make_jaxpr(lambda q: layer.apply({}, q, q))(q))
    assert "custom_jvp_call" in jaxpr  # the chunked kernel
    assert layer.config == cfg


def test_config_is_keyword_only():
    with pytest.raises(TypeError):
        DotAttentionConfig(True)  # type: ignore[misc]


def test_normalises_dtypes_and_precision_to_names():
    cfg = DotAttentionConfig(
        dtype=jnp.bfloat16, param_dtype=np.float32, precision=jax.lax.Precision.HIGHEST
    )
    assert (cfg.dtype, cfg.param_dtype, cfg.precision) == ("bfloat16", "float32", "highest")


BAD_CONFIGS = [
    ("use_scale_int", dict(use_scale=1), r"use_scale must be a Python bool.*1"),
    ("score_mode", dict(score_mode="general"), r"score_mode must be one of.*'general'"),
    ("dropout_high", dict(dropout_rate=1.5), r"dropout_rate must be in \[0, 1\).*1.5"),
    ("dropout_str", dict(dropout_rate="0.1"), r"dropout_rate must be a Python float"),
    ("causal_str", dict(causal="true"), r"causal must be a Python bool"),
    ("deterministic_int", dict(deterministic=0), r"deterministic must be None or a Python bool"),
    ("dtype_int", dict(dtype="int32"), r"dtype must be None or one of.*'int32'"),
    ("dtype_garbage", dict(dtype="floaty"), r"dtype must be None or one of.*'floaty'"),
    ("param_dtype_none", dict(param_dtype=None), r"param_dtype must be one of"),
    ("precision", dict(precision="ultra"), r"precision must be None.*'ultra'"),
    ("implementation", dict(implementation="flash"), r"implementation must be one of.*'flash'"),
    ("block_size_zero", dict(block_size=0), r"block_size must be None, a positive int.*0"),
    ("block_size_triple", dict(block_size=(1, 2, 3)), r"block_size must be None"),
]


@pytest.mark.parametrize(
    "kwargs,pattern", [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS]
)
def test_invalid_fields_raise(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        DotAttentionConfig(**kwargs)


def test_from_dict_names_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown keys \['dropout', 'use_scal'\]"):
        DotAttentionConfig.from_dict({"use_scal": True, "dropout": 0.1})


@pytest.mark.parametrize(
    "name,text,pattern",
    [
        ("bad.json", "{not json", r"could not parse JSON config file"),
        ("bad.yaml", "use_scale: [unclosed", r"could not parse YAML config file"),
        ("list.yaml", "- 1\n- 2\n", r"must hold a mapping.*list"),
        ("unknown.yaml", "use_scale: true\nheads: 4\n", r"unknown keys \['heads'\]"),
        ("wrongtype.json", '{"use_scale": "yes"}', r"use_scale must be a Python bool"),
        ("cfg.toml", "use_scale = true", r"must end in one of"),
    ],
)
def test_load_config_rejects_bad_files(name, text, pattern, tmp_path):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=pattern):
        load_config(path)


def test_shipped_configs_load():
    """configs/<example>.yaml belong to examples/<example>.py (their ``attention:`` section
    is a DotAttentionConfig); every other file is a DotAttentionConfig itself."""
    import pathlib

    import yaml

    root = pathlib.Path(__file__).parents[1]
    configs = sorted((root / "configs").glob("*.yaml"))
    assert len(configs) >= 3
    for path in configs:
        if (root / "examples" / f"{path.stem}.py").exists():
            section = yaml.safe_load(path.read_text()).get("attention")
            if section is not None:
                DotAttentionConfig.from_dict(section)
        else:
            assert isinstance(load_config(path), DotAttentionConfig)


# -- Keras -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        DotAttentionConfig(),
        DotAttentionConfig(use_scale=True, score_mode="concat", dropout_rate=0.3),
        DotAttentionConfig(dtype="bfloat16", param_dtype="float32"),
        DotAttentionConfig(dtype="float16", param_dtype="float16"),
    ],
    ids=["default", "scale_concat_dropout", "mixed_bfloat16", "float16"],
)
def test_keras_config_round_trip_through_a_real_layer(cfg):
    layer = keras.layers.Attention.from_config(cfg.to_keras())
    back = DotAttentionConfig.from_keras(layer.get_config())
    expected_dtype = cfg.dtype or cfg.param_dtype
    assert back == dataclasses.replace(cfg, dtype=expected_dtype)
    assert DotAttentionConfig.from_keras(keras.layers.serialize(layer)) == back


def test_from_keras_reads_legacy_tf_keras_config_with_causal():
    legacy = {
        "name": "attention_1",
        "trainable": True,
        "dtype": "float32",
        "causal": True,
        "dropout": 0.1,
        "use_scale": True,
    }
    cfg = DotAttentionConfig.from_keras(legacy)
    assert cfg == DotAttentionConfig(
        use_scale=True, causal=True, dropout_rate=0.1, dtype="float32", param_dtype="float32"
    )
    assert DotAttentionConfig.from_keras(cfg.to_keras(legacy=True)) == cfg


def test_from_keras_reads_mixed_precision_policy_dict():
    cfg = DotAttentionConfig.from_keras(
        {"dtype": {"class_name": "Policy", "config": {"name": "mixed_float16"}}}
    )
    assert (cfg.dtype, cfg.param_dtype) == ("float16", "float32")


def test_from_keras_rejects_unknown_keys_and_other_layers():
    with pytest.raises(ValueError, match=r"unknown Keras config keys \['num_heads'\]"):
        DotAttentionConfig.from_keras({"num_heads": 2})
    with pytest.raises(ValueError, match=r"class_name='AdditiveAttention'"):
        DotAttentionConfig.from_keras({"class_name": "AdditiveAttention", "config": {}})


def test_to_keras_warns_that_causal_is_a_call_argument_in_keras_3():
    with pytest.warns(UserWarning, match="use_causal_mask=True"):
        out = DotAttentionConfig(causal=True).to_keras()
    assert "causal" not in out


def test_keras_weights_round_trip_against_a_real_layer(rng):
    q = rng.normal(size=(2, 3, 4)).astype(np.float32)
    v = rng.normal(size=(2, 5, 4)).astype(np.float32)
    layer = keras.layers.Attention(use_scale=True, score_mode="concat")
    layer.build([q.shape, v.shape])
    layer.set_weights([np.float32(0.4), np.float32(-2.0)])
    expected = np.asarray(layer([q, v], use_causal_mask=True))

    cfg = DotAttentionConfig.from_keras(layer.get_config())
    params = params_from_keras(layer.get_weights(), cfg)
    module = DotAttention.from_config(cfg)
    out = module.apply({"params": params}, q, v, causal=True)
    assert_close(out, expected)

    fresh = keras.layers.Attention.from_config(cfg.to_keras())
    fresh.build([q.shape, v.shape])
    fresh.set_weights(params_to_keras({"params": params}, cfg))
    assert_close(fresh([q, v], use_causal_mask=True), expected)


def test_params_from_keras_errors():
    cfg = DotAttentionConfig(use_scale=True)
    with pytest.raises(ValueError, match=r"expected 1 weights \['scale'\].*received 2"):
        params_from_keras([1.0, 2.0], cfg)
    with pytest.raises(ValueError, match=r"weight 'scale' must be a scalar.*\(2,\)"):
        params_from_keras([np.ones(2)], cfg)
    with pytest.raises(ValueError, match=r"expected params with keys \['scale'\]"):
        params_to_keras({}, cfg)
    with pytest.raises(ValueError, match=r"params_to_keras expects a DotAttentionConfig"):
        params_to_keras({}, {"use_scale": True})
