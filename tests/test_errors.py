"""Bad input raises a clear ValueError naming the argument, expected and received."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_dotattn import (
    DotAttention,
    DotAttentionConfig,
    attention_scores,
    dot_attention,
    make_causal_mask,
    params_from_keras,
    params_to_keras,
    save_config,
)

Q = jnp.ones((2, 3, 4))
V = jnp.ones((2, 5, 4))
K = jnp.ones((2, 5, 4))


def call(**overrides):
    kwargs = dict(params=None, query=Q, value=V, key=None, masks=None, causal=False)
    kwargs.update(overrides)
    return dot_attention(**kwargs)


BAD_INPUTS = [
    ("query_rank_1", dict(query=jnp.ones(4)), r"query must have rank >= 2.*\(4,\)"),
    ("value_rank_1", dict(value=jnp.ones(4)), r"value must have rank >= 2"),
    (
        "rank_mismatch",
        dict(value=jnp.ones((5, 4))),
        r"value must have the same rank as query.*\(5, 4\)",
    ),
    (
        "batch_mismatch",
        dict(value=jnp.ones((3, 5, 4))),
        r"value batch dims \(3,\) must broadcast against query's \(2,\).*\(3, 5, 4\)",
    ),
    ("key_batch_mismatch", dict(key=jnp.ones((1, 5, 4))), r"key batch dims"),
    (
        "depth_mismatch",
        dict(key=jnp.ones((2, 5, 3))),
        r"key depth must equal query depth D=4.*\(2, 5, 3\)",
    ),
    (
        "tv_mismatch",
        dict(key=jnp.ones((2, 6, 4))),
        r"key and value must have the same length Tv.*\(2, 6, 4\).*\(2, 5, 4\)",
    ),
    (
        "integer_query",
        dict(query=jnp.ones((2, 3, 4), jnp.int32)),
        r"query must have a real floating dtype.*int32",
    ),
    (
        "complex_value",
        dict(value=jnp.ones((2, 5, 4), jnp.complex64)),
        r"value must have a real floating dtype.*complex64",
    ),
    ("query_is_a_list", dict(query=[[1.0]]), r"query must be an array.*list"),
    (
        "masks_single_array",
        dict(masks=jnp.ones((2, 5), bool)),
        r"masks must be None or a pair.*array of shape \(2, 5\)",
    ),
    ("masks_triple", dict(masks=(None, None, None)), r"masks must be None or a pair.*length 3"),
    (
        "query_mask_shape",
        dict(masks=(jnp.ones((2, 4), bool), None)),
        r"query_mask must have a shape broadcastable to \[\.\.\., Tq\] = \(2, 3\).*\(2, 4\)",
    ),
    (
        "value_mask_shape",
        dict(masks=(None, jnp.ones((2, 3), bool))),
        r"value_mask must have a shape broadcastable to \[\.\.\., Tv\] = \(2, 5\).*\(2, 3\)",
    ),
    (
        "value_mask_rank",
        dict(masks=(None, jnp.ones((1, 2, 5), bool))),
        r"value_mask must have a shape broadcastable to \[\.\.\., Tv\] = \(2, 5\)",
    ),
    (
        "mask_string_dtype",
        dict(masks=(None, np.array([["a"] * 5] * 2))),
        r"value_mask must be bool, or numeric",
    ),
    ("mask_not_array", dict(masks=(None, "yes")), r"value_mask must be None or an array"),
    ("score_mode_typo", dict(score_mode="dott"), r"score_mode must be one of .*'dott'"),
    (
        "attention_mask_shape",
        dict(attention_mask=jnp.ones((3, 4), bool)),
        r"attention_mask must have a shape broadcastable to \[\.\.\., Tq, Tv\] = \(2, 3, 5\)"
        r".*\(3, 4\)",
    ),
    (
        "attention_mask_rank",
        dict(attention_mask=jnp.ones((1, 2, 3, 5), bool)),
        r"attention_mask must have a shape broadcastable.*rank at most 3",
    ),
    ("bias_integer", dict(bias=jnp.ones((3, 5), jnp.int32)), r"bias must have a real floating"),
    (
        "segment_ids_single_array",
        dict(segment_ids=jnp.zeros((2, 3), jnp.int32)),
        r"segment_ids must be None or a pair",
    ),
    (
        "segment_ids_triple",
        dict(segment_ids=(jnp.zeros(3, jnp.int32),) * 3),
        r"segment_ids must be None or a pair .*received tuple of length 3",
    ),
    (
        "kv_segment_ids_missing",
        dict(segment_ids=(jnp.zeros(3, jnp.int32), None)),
        r"kv_segment_ids must be an array broadcastable to \[\.\.\., Tv\] = \(2, 5\); "
        r"received NoneType",
    ),
    (
        "segment_ids_float",
        dict(segment_ids=(jnp.zeros(3), jnp.zeros(5, jnp.int32))),
        r"query_segment_ids must have an integer dtype",
    ),
    (
        "kv_segment_ids_shape",
        dict(segment_ids=(jnp.zeros(3, jnp.int32), jnp.zeros(4, jnp.int32))),
        r"kv_segment_ids must have a shape broadcastable to \[\.\.\., Tv\] = \(2, 5\)",
    ),
    ("window_negative", dict(window=(-1, 0)), r"window must be None or a pair \(left, right\)"),
    ("window_scalar", dict(window=3), r"window must be None or a pair"),
    ("unknown_param", dict(params={"scael": 1.0}), r"params has unknown keys \['scael'\]"),
    ("params_not_mapping", dict(params=[1.0]), r"params must be None or a mapping"),
    (
        "param_not_scalar",
        dict(params={"scale": jnp.ones(2)}),
        r"params\['scale'\] must be a scalar of shape \(\).*\(2,\)",
    ),
    (
        "concat_without_weight",
        dict(score_mode="concat"),
        r"score_mode='concat' needs params\['concat_score_weight'\]",
    ),
    (
        "concat_weight_in_dot_mode",
        dict(params={"concat_score_weight": 1.0}),
        r"only used with score_mode='concat'",
    ),
    (
        "dropout_without_rng",
        dict(dropout_rate=0.5, deterministic=False),
        r"dropout_rng is required",
    ),
    ("dropout_rate_one", dict(dropout_rate=1.0), r"dropout_rate must be in \[0, 1\).*1.0"),
    ("dropout_rate_negative", dict(dropout_rate=-0.1), r"dropout_rate must be in \[0, 1\)"),
    ("dropout_rate_string", dict(dropout_rate="0.1"), r"dropout_rate must be a Python float"),
    ("causal_not_bool", dict(causal="yes"), r"causal must be a Python bool.*'yes'"),
    ("causal_array", dict(causal=jnp.array(True)), r"causal must be a Python bool"),
    (
        "deterministic_string",
        dict(deterministic="yes"),
        r"deterministic must be None or a Python bool",
    ),
    (
        "dropout_without_deterministic",
        dict(dropout_rate=0.5),
        r"deterministic must be True or False when dropout_rate > 0.*deterministic=None",
    ),
    (
        "implementation_unknown",
        dict(implementation="flash"),
        r"implementation must be one of .*'flash'",
    ),
]


@pytest.mark.parametrize(
    "overrides,pattern", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_input_raises_value_error(overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        call(**overrides)


def test_errors_fire_at_trace_time_under_jit():
    with pytest.raises(ValueError, match="value_mask must have a shape"):
        jax.jit(lambda vm: call(masks=(None, vm)))(jnp.ones((2, 4), bool))


def test_make_causal_mask_rejects_bad_lengths():
    with pytest.raises(ValueError, match="tq must be a non-negative Python int"):
        make_causal_mask(-1, 2)
    with pytest.raises(ValueError, match="tv must be a non-negative Python int"):
        make_causal_mask(2, 2.0)


def test_module_with_dropout_needs_deterministic():
    layer = DotAttention(dropout_rate=0.5)
    with pytest.raises(ValueError, match="needs deterministic=True/False"):
        layer.init(jax.random.key(0), Q, V)


def test_module_with_bad_field_names_the_field():
    with pytest.raises(ValueError, match="score_mode must be one of"):
        DotAttention(score_mode="additive").init(jax.random.key(0), Q, V)


def _is_traceable(value):
    leaves = jax.tree.leaves(value)
    return bool(leaves) and all(isinstance(x, jax.Array) for x in leaves)


@pytest.mark.parametrize(
    "overrides,pattern", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_input_raises_at_trace_time_under_jit(overrides, pattern):
    traced = {k: v for k, v in overrides.items() if _is_traceable(v)}
    static = {k: v for k, v in overrides.items() if k not in traced}
    with pytest.raises(ValueError, match=pattern):
        jax.jit(lambda traced: call(**static, **traced))(traced)


# -- other entry points --------------------------------------------------------------------


def test_linen_module_errors_name_the_argument():
    layer = DotAttention(use_scale=True)
    with pytest.raises(
        ValueError, match=r"value_mask must have a shape broadcastable to \[\.\.\., Tv\]"
    ):
        layer.init(jax.random.key(0), Q, V, masks=(None, jnp.ones((2, 4), bool)))
    with pytest.raises(ValueError, match="query must have a real floating dtype"):
        layer.init(jax.random.key(0), Q.astype(jnp.int32), V)
    with pytest.raises(ValueError, match=r"DotAttention.from_config expects a DotAttentionConfig"):
        DotAttention.from_config({"use_scale": True})


def test_nnx_module_errors_name_the_argument():
    from flax_dotattn import nnx as fdnnx

    with pytest.raises(ValueError, match=r"rngs must be None or an nnx.Rngs"):
        fdnnx.DotAttention(rngs=0)
    with pytest.raises(ValueError, match="dropout_rate must be in"):
        fdnnx.DotAttention(dropout_rate=2.0)
    with pytest.raises(ValueError, match="key depth must equal query depth"):
        fdnnx.DotAttention()(Q, V, jnp.ones((2, 5, 3)))


@pytest.mark.parametrize(
    "argv,pattern",
    [
        (["--shapes", "8by512"], r"--shapes entries must look like BATCHxLENGTH.*'8by512'"),
        (["--shapes", "0x512"], r"--shapes entries must look like BATCHxLENGTH.*'0x512'"),
        (["--impls", "naive,flash"], r"--impls takes a comma-separated subset.*'naive,flash'"),
        (["--modes", "backward"], r"--modes takes a comma-separated subset.*'backward'"),
        (["--repeats", "0"], r"--repeats must be a positive int; received '0'"),
        (["--depth", "x"], r"--depth must be a positive int; received 'x'"),
    ],
    ids=[
        "shape_format",
        "shape_zero",
        "unknown_impl",
        "unknown_mode",
        "repeats_zero",
        "depth_not_int",
    ],
)
def test_bench_cli_rejects_bad_arguments(argv, pattern, capsys):
    from flax_dotattn import bench

    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    import re

    assert re.search(pattern, capsys.readouterr().err)


@pytest.mark.parametrize(
    "fn,pattern",
    [
        (
            lambda: DotAttentionConfig.from_keras(["use_scale"]),
            r"from_keras expects a Keras layer config dict; received a list",
        ),
        (
            lambda: DotAttentionConfig.from_keras({"dtype": {"config": {}}}),
            r"could not read the Keras dtype policy",
        ),
        (lambda: DotAttentionConfig.from_keras({"dtype": "int8"}), r"dtype must be one of"),
        (
            lambda: DotAttentionConfig.from_keras({"score_mode": "additive"}),
            r"score_mode must be one of",
        ),
        (
            lambda: params_from_keras(np.float32(1.0), DotAttentionConfig(use_scale=True)),
            r"weights must be a list of 1 scalar arrays",
        ),
        (
            lambda: params_to_keras({"scale": np.ones(3)}, DotAttentionConfig(use_scale=True)),
            r"params\['scale'\] must be a scalar of shape \(\); received shape \(3,\)",
        ),
        (
            lambda: DotAttentionConfig(dtype="bfloat16", param_dtype="float16").to_keras(),
            r"cannot express dtype='bfloat16' with param_dtype='float16'",
        ),
        (
            lambda: DotAttentionConfig.from_dict([("use_scale", True)]),
            r"from_dict expects a mapping",
        ),
        (
            lambda: save_config({"use_scale": True}, "x.yaml"),
            r"save_config expects a DotAttentionConfig",
        ),
    ],
    ids=[
        "keras_config_not_dict",
        "keras_dtype_unreadable",
        "keras_dtype_int",
        "keras_score_mode",
        "weights_not_list",
        "params_not_scalar",
        "unexportable_dtype",
        "from_dict_not_mapping",
        "save_not_config",
    ],
)
def test_config_and_interop_errors(fn, pattern):
    with pytest.raises(ValueError, match=pattern):
        fn()


SCORES_BAD = [
    ("score_mode_capitalised", dict(score_mode="Dot"), r"score_mode must be one of .*'Dot'"),
    ("score_mode_unknown", dict(score_mode="general"), r"score_mode must be one of"),
    ("concat_without_weight", dict(score_mode="concat"), r"needs params\['concat_score_weight'\]"),
    ("scale_not_scalar", dict(scale=jnp.ones(2)), r"params\['scale'\] must be a scalar"),
    ("scale_a_string", dict(scale="2"), r"params\['scale'\] must be a real scalar"),
    ("key_depth", dict(key=jnp.ones((2, 3))), r"key depth must equal query depth D=4"),
    ("precision_unknown", dict(precision="max"), r"precision must be None, a jax.lax.Precision"),
    ("compute_dtype_int", dict(compute_dtype="int32"), r"compute_dtype must be one of"),
]


@pytest.mark.parametrize(
    "kwargs,pattern", [c[1:] for c in SCORES_BAD], ids=[c[0] for c in SCORES_BAD]
)
def test_attention_scores_rejects_bad_arguments(kwargs, pattern):
    args = dict(query=jnp.ones((3, 4)), key=jnp.ones((5, 4)))
    args.update(kwargs)
    with pytest.raises(ValueError, match=pattern):
        attention_scores(**args)


def test_a_block_size_mapping_without_both_blocks_is_a_value_error():
    q = jnp.ones((1, 4, 2))
    with pytest.raises(ValueError, match=r"block_size as a mapping needs keys \['block_k'\]"):
        dot_attention(None, q, q, block_size={"block_q": 4})
