"""The capability table: one declaration of what each kernel takes, read by the
dispatcher, the plans' reasons and the accelerators guide."""

import dataclasses
import pathlib
import types

import jax
import jax.numpy as jnp
import pytest

from flax_dotattn import which_implementation
from flax_dotattn._src import dispatch, validation
from flax_dotattn._src.kernels import capabilities

GUIDE = pathlib.Path(__file__).parents[1] / "docs" / "guides" / "accelerators.md"
Q = jnp.ones((2, 4, 256, 64), jnp.bfloat16)
SEG = jnp.zeros((2, 1, 256), jnp.int32)


def test_the_guide_holds_the_generated_table():
    text = GUIDE.read_text()
    start = text.index("<!-- capability-table:start -->\n") + len(
        "<!-- capability-table:start -->\n"
    )
    end = text.index("<!-- capability-table:end -->")
    assert text[start:end] == capabilities.markdown_table(), (
        "regenerate with: python -m flax_dotattn._src.kernels.capabilities"
    )


def _call(**kwargs):
    arguments = dict(params=None, query=Q, value=Q, dropout_rng=jax.random.key(0))
    return validation.check_call({**arguments, **kwargs})


CALLS = {  # one call per feature, using it alone (beyond causal and the dtype)
    "concat": dict(score_mode="concat", params={"concat_score_weight": 1.0}),
    "dropout": dict(dropout_rate=0.1, deterministic=False),
    "weights": dict(return_attention_scores=True),
    "bias": dict(bias=jnp.zeros((256, 256))),
    "attention_mask": dict(attention_mask=jnp.ones((256, 256), bool)),
    "key_padding_mask": dict(attention_mask=jnp.ones((2, 1, 1, 256), bool)),
    "window": dict(window=(8, 0)),
    "query_offset": dict(query_offset=3),
    "traced_query_offset": dict(query_offset=jnp.int32(3)),
    "segment_ids": dict(segment_ids=(SEG, SEG)),
    "logits_soft_cap": dict(logits_soft_cap=30.0),
    "score_mod": dict(score_mod=lambda s, q, k: s - 0.1 * (q - k)),
    "mask_mod": dict(mask_mod=lambda q, k: q >= k),
    "causal": dict(causal=True),
    "value_mask": dict(masks=(None, jnp.ones((2, 1, 256), bool))),
    "query_mask": dict(masks=(jnp.ones((2, 1, 256), bool), None)),
    "learned_scale": dict(params={"scale": jnp.float32(0.5)}),
    "grouped": dict(value=Q[:, :1]),
    "empty": dict(query=Q[..., :0, :]),
}


def test_each_feature_is_recognised_in_a_call_that_uses_it():
    assert set(CALLS) == {f.name for f in capabilities.FEATURES}
    for name, kwargs in CALLS.items():
        call = _call(**kwargs)
        used = {f.name for f in capabilities.call_features(call.inputs, call.options)}
        assert name in used, (name, used)
        # nothing but what the call asks for (a traced offset is also an offset)
        assert used <= {name, "query_offset"}, (name, used)


@pytest.mark.parametrize("kernel", ["pallas_tpu", "cudnn", "pallas_gpu"])
def test_a_refused_feature_is_named_in_the_reason_and_a_taken_one_is_not(kernel):
    row = capabilities.TABLE[kernel]
    for feature in capabilities.FEATURES:
        call = _call(**CALLS[feature.name])
        reason = row.missing(call.inputs, call.options)
        if feature.name in row.takes:
            assert reason is None, (kernel, feature.name, reason)
        else:
            label = feature.label if feature.name != "traced_query_offset" else "query_offset"
            assert reason is not None and label in reason, (kernel, feature.name, reason)


def test_the_table_drives_the_dispatcher(monkeypatch):
    """Adding a feature to a kernel's row is what makes the dispatcher choose it."""
    bias = dict(bias=jnp.zeros((256, 256)))
    before = which_implementation(None, Q, Q, causal=True, **bias, platform="tpu")
    assert before.implementation != "pallas_tpu"
    assert before.reason.startswith("pallas_tpu: bias given")
    row = capabilities.TABLE["pallas_tpu"]
    widened = dataclasses.replace(row, takes={**row.takes, "bias": "a test row"})
    table = types.MappingProxyType({**capabilities.TABLE, "pallas_tpu": widened})
    monkeypatch.setattr(capabilities, "TABLE", table)
    after = which_implementation(None, Q, Q, causal=True, **bias, platform="tpu")
    assert after.implementation == "pallas_tpu", after
    call = _call(causal=True, **bias)
    assert dispatch.ineligibility("pallas_tpu", call.inputs, call.options) is None


def test_a_reason_names_every_given_argument_refused_alike():
    call = _call(bias=jnp.zeros((256, 256)), window=(3, 3), query_offset=2)
    reason = capabilities.TABLE["pallas_gpu"].missing(call.inputs, call.options)
    assert reason == "bias, window, query_offset given (the kernel masks by segment ids only)"
    call = _call(masks=(None, jnp.ones((2, 1, 256), bool)))
    with jax.enable_x64():
        wide = _call(query=Q.astype(jnp.float64), value=Q.astype(jnp.float64))
        assert capabilities.TABLE["pallas_tpu"].missing(wide.inputs, wide.options) == (
            "dtype float64 (no float64 kernel on TPU)"
        )
        assert capabilities.TABLE["cudnn"].missing(wide.inputs, wide.options) == (
            "dtype float64 is not float16/bfloat16"
        )


def test_a_row_naming_an_unknown_feature_is_refused():
    with pytest.raises(ValueError, match="unknown feature 'soft_cap'"):
        capabilities.Capabilities(name="k", platform=None, dtypes={}, takes={"soft_cap": ""})
