"""The GPU fast path: jax.nn.dot_product_attention with Keras semantics.

The mapping (scale folded into query and key, bias, masks, windows and lengths, the
fallback for rows that see no key) is checked everywhere through ``jax.nn``'s XLA
implementation; its ``cuda`` lowering is checked by export; the cuDNN kernel itself only
runs on a GPU (those tests skip elsewhere).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close

from flax_dotattn import dot_attention
from flax_dotattn._src import dispatch, runner, validation
from flax_dotattn._src.kernels import cudnn
from flax_dotattn._src.kernels.fused_inputs import fold_scale

ON_GPU = jax.default_backend() == "gpu"


def cpu_mapping(q, k, v, vm, scale, causal):
    """The GPU route on a value mask, with jax.nn's XLA kernel for cuDNN."""
    return mapped(scale, q, v, k, (None, vm), causal)


def _inputs(rng, dtype, batch=(2,), tq=16, tv=16, d=16):
    def arr(*shape):
        return jnp.asarray(rng.normal(size=shape) * 0.5, jnp.float32).astype(dtype)

    return arr(*batch, tq, d), arr(*batch, tv, d), arr(*batch, tv, d)


def test_fallback_keeps_gradients(rng):
    q, k, v = _inputs(rng, jnp.float32)
    vm = jnp.ones((2, 16), bool).at[1].set(False)

    def loss(fn, q):
        return jnp.sum(fn(q) ** 2)

    def fused(q):
        return cpu_mapping(q, k, v, vm, None, False)

    ref = lambda q: dot_attention(None, q, v, k, (None, vm), implementation="xla")  # noqa: E731
    np.testing.assert_allclose(
        jax.grad(lambda q: loss(fused, q))(q),
        jax.grad(lambda q: loss(ref, q))(q),
        rtol=1e-4,
        atol=1e-5,
    )


# -- folding the learned scale into the inputs -------------------------------------------


def test_folding_a_large_scale_into_float16_stays_finite(rng):
    q = jnp.asarray(100 + rng.normal(size=(2, 8, 8)), jnp.float16)
    k = jnp.asarray(rng.normal(size=(2, 8, 8)), jnp.float16)
    v = jnp.asarray(rng.normal(size=(2, 8, 8)), jnp.float16)
    scale = jnp.float32(1000.0)
    out = cpu_mapping(q, k, v, None, scale, False)
    assert out.dtype == jnp.float16 and bool(jnp.all(jnp.isfinite(out)))
    expected = dot_attention({"scale": scale}, q, v, k, implementation="xla")
    assert_close(out, expected, jnp.float16, factor=5)


def test_scale_that_cannot_be_folded_falls_back(rng):
    q = jnp.full((1, 4, 8), 60000.0, jnp.float16)
    k = jnp.full((1, 4, 8), 60000.0, jnp.float16)
    _, _, overflow = fold_scale(q, k, jnp.float32(1e6))
    assert bool(overflow)
    v = jnp.asarray(rng.normal(size=(1, 4, 8)), jnp.float16)
    out = cpu_mapping(q, k, v, None, jnp.float32(1e6), False)
    assert bool(jnp.all(jnp.isfinite(out)))


def fused_and_xla_errors(rng, magnitude=30.0, scale=1.37, n=8, t=64, d=64):
    """Max |error| of the fused mapping and of the xla path against float64 on the
    float16-rounded inputs (the figures the long-sequences guide's GPU section quotes)."""
    q, k, v = (
        jnp.asarray(rng.normal(size=(n, t, d)) * magnitude / np.sqrt(d), jnp.float16)
        for _ in range(3)
    )
    s = jnp.float32(scale)
    q64, k64, v64 = (np.asarray(x, np.float64) for x in (q, k, v))
    logits = np.einsum("bqd,bkd->bqk", q64, k64) * scale
    w = np.exp(logits - logits.max(-1, keepdims=True))
    ref = np.einsum("bqk,bkd->bqd", w / w.sum(-1, keepdims=True), v64)
    fused = np.asarray(cpu_mapping(q, k, v, None, s, False), np.float64)
    xla = np.asarray(dot_attention({"scale": s}, q, v, k, implementation="xla"), np.float64)
    return np.abs(fused - ref).max(), np.abs(xla - ref).max()


def test_folding_a_power_of_two_scale_is_exact(rng):
    # Powers of two shift exponents only: the mapping then has the xla path's error.
    fused_err, xla_err = fused_and_xla_errors(rng, magnitude=30.0, scale=0.125)
    assert fused_err <= 1.05 * xla_err, (fused_err, xla_err)


def test_folding_a_general_scale_costs_one_float16_rounding(rng):
    # q * scale is rounded to float16 once; at moderate logits (std ~1.5) that costs
    # well under 3x the xla path's error (the long-sequences guide quotes the table).
    fused_err, xla_err = fused_and_xla_errors(rng, magnitude=3.0, scale=1.37)
    assert fused_err < 3 * xla_err, (fused_err, xla_err)


@pytest.mark.skipif(ON_GPU, reason="checks the CPU error")
def test_explicit_cudnn_off_gpu_is_a_clear_error():
    q = jnp.ones((2, 16, 16), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"implementation='cudnn' cannot run.*not 'gpu'"):
        dot_attention(None, q, q, implementation="cudnn")


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_cudnn_matches_materialised_on_gpu(dtype, causal, rng):
    q, k, v = _inputs(rng, dtype, batch=(4,), tq=256, tv=256, d=64)
    # Key padding as a prefix, so that cuDNN (not the fallback) computes every row.
    vm = jnp.arange(256)[None] < jnp.array([[256], [200], [77], [1]])
    params = {"scale": jnp.float32(0.125)}

    def run(impl, q):
        return dot_attention(params, q, v, k, (None, vm), causal, implementation=impl)

    assert "cudnn" in jax.jit(lambda q: run(None, q)).lower(q).as_text().lower()
    assert_close(run("cudnn", q), run("xla", q), dtype, factor=2)
    grads = [
        jax.grad(lambda q, i=i: run(i, q).astype(jnp.float32).sum())(q) for i in ("cudnn", "xla")
    ]
    assert np.isfinite(np.asarray(grads[0], np.float32)).all()
    assert_close(grads[0], grads[1], dtype, factor=4)


# -- the mapping of a checked call: bias, masks, windows, lengths -------------------------


def mapped(scale, query, value, key=None, masks=None, causal=False, **kwargs):
    """``dot_attention`` through the cuDNN route's mapping, run by jax.nn's XLA kernel
    (the query mask applied after, as the dispatcher does)."""
    arguments = dict(locals(), params=None if scale is None else {"scale": scale}, **kwargs)
    del arguments["kwargs"], arguments["scale"]
    call = validation.check_call(arguments)
    # The mapping is dtype-blind; float32 runs it here with tight tolerances.
    eligible = call.inputs._replace(dtype=jnp.dtype(jnp.bfloat16))
    reason = dispatch.ineligibility("cudnn", eligible, call.options)
    assert reason is None, reason
    return validation.finish(
        runner.run_fused(cudnn.attention, call, jax_nn_implementation="xla"), call.inputs
    )


def _mapping_cases(t=16):
    lengths = jnp.array([[12], [t]])
    prefix = jnp.arange(t)[None] < lengths  # [2, T]
    pairs = jnp.asarray(np.random.default_rng(1).random((2, t, t)) > 0.3)
    bias = jnp.asarray(np.random.default_rng(2).normal(size=(1, t, t)), jnp.float32)
    return {
        "value_mask_prefix": dict(masks=(None, prefix)),
        "value_mask_not_prefix": dict(masks=(None, prefix.at[0, 3].set(False))),
        "query_and_value_masks_causal_window": dict(
            masks=(prefix, prefix), causal=True, window=(3, 2)
        ),
        "window_right_0": dict(masks=(None, prefix), window=(4, 0)),
        "bias_and_pair_mask": dict(bias=bias, attention_mask=pairs, masks=(prefix, None)),
        "key_padding_attention_mask": dict(attention_mask=prefix[:, None, :]),
        "kv_length_causal": dict(kv_length=jnp.array([5, t]), causal=True),
        "row_without_keys": dict(masks=(None, prefix.at[1].set(False))),
        "padded_rows_without_keys_dropped": dict(masks=(prefix, prefix), window=(2, 0)),
    }


@pytest.mark.slow
def test_mapping_values_equal_xla(rng):
    q, k, v = _inputs(rng, jnp.float32)
    cases = _mapping_cases()

    def outputs(fn):
        return jax.jit(lambda q, k, v: {n: fn(0.8, q, v, k, **kw) for n, kw in cases.items()})

    outs, expected = outputs(mapped)(q, k, v), outputs(xla_path)(q, k, v)
    for name in cases:
        assert_close(outs[name], expected[name]), name


@pytest.mark.slow
def test_mapping_gradients_equal_xla(rng):
    q, k, v = _inputs(rng, jnp.float32)
    cases = _mapping_cases()
    cases = {n: cases[n] for n in ("query_and_value_masks_causal_window", "bias_and_pair_mask")}
    bias = cases["bias_and_pair_mask"].pop("bias")

    def gradients(fn):
        def loss(q, k, v, scale, bias):
            outs = [
                fn(scale, q, v, k, bias=bias if "bias" in n else None, **kw)
                for n, kw in cases.items()
            ]
            return sum(jnp.sum(o * jnp.cos(o)) for o in outs)

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))

    args = (q, k, v, jnp.float32(0.8), bias)
    for a, b in zip(gradients(mapped)(*args), gradients(xla_path)(*args), strict=True):
        assert_close(a, b, factor=4)


@pytest.mark.slow
def test_mapping_in_16_bits_equals_xla(rng):
    cases = _mapping_cases()
    names = ["value_mask_prefix", "query_and_value_masks_causal_window", "bias_and_pair_mask"]
    inputs = {jnp.dtype(d).name: _inputs(rng, d) for d in (jnp.bfloat16, jnp.float16)}

    def outputs(fn):
        return jax.jit(
            lambda inputs: {
                (d, n): fn(0.8, q, v, k, **cases[n])
                for d, (q, k, v) in inputs.items()
                for n in names
            }
        )

    outs, expected = outputs(mapped)(inputs), outputs(xla_path)(inputs)
    for (dtype, name), out in outs.items():
        assert out.dtype == dtype
        assert_close(out, expected[dtype, name], jnp.dtype(dtype), factor=2), name


def xla_path(scale, query, value, key=None, masks=None, causal=False, **kwargs):
    return dot_attention(
        {"scale": scale}, query, value, key, masks, causal, implementation="xla", **kwargs
    )


@pytest.mark.parametrize(
    "kwargs,reason",
    [
        (dict(dtype=jnp.float32), "dtype float32"),
        (dict(segment_ids=(jnp.zeros(16, int), jnp.zeros(16, int))), "segment_ids"),
        (dict(query_offset=2), "query_offset"),
        (dict(window=(2, 1)), "window=(2, 1)"),
        (dict(tq=8, causal=True), "Tq=8 != Tv=16"),
        (dict(tq=15, bias=jnp.zeros((15, 16))), "odd length"),
        (dict(d=12), "head sizes"),
        (dict(score_mode="concat"), "score_mode"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_ineligible_calls_name_the_reason(kwargs, reason):
    kwargs = dict(kwargs)
    dtype, tq, d = kwargs.pop("dtype", jnp.bfloat16), kwargs.pop("tq", 16), kwargs.pop("d", 16)
    q, kv = jnp.zeros((tq, d), dtype), jnp.zeros((16, d), dtype)
    params = {"concat_score_weight": 1.0} if kwargs.get("score_mode") == "concat" else None
    call = validation.check_call(dict(params=params, query=q, value=kv, **kwargs))
    assert reason in dispatch.ineligibility("cudnn", call.inputs, call.options)
    q, kv = jnp.zeros((16, 16), jnp.bfloat16), jnp.zeros((16, 16), jnp.bfloat16)
    ok = validation.check_call(dict(params=None, query=q, value=kv, causal=True))
    assert dispatch.ineligibility("cudnn", ok.inputs, ok.options) is None


@pytest.mark.slow
def test_export_for_cuda_holds_the_cudnn_call(monkeypatch):
    # jax.nn asks the local cuDNN for its version while tracing; a CPU host has none, so
    # the test states one (9.10). The lowering is JAX's own: it checks the shapes of the
    # mapped bias, mask and lengths as it would on a GPU.
    from jax._src.cudnn import fused_attention_stablehlo

    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 91000)
    shape = jax.ShapeDtypeStruct((2, 4, 256, 64), jnp.bfloat16)  # [B, H, T, D]
    pad = jax.ShapeDtypeStruct((2, 1, 256), jnp.bool_)
    bias = jax.ShapeDtypeStruct((4, 256, 256), jnp.float32)

    def forward(q, k, v, pad, bias):
        calls = [
            validation.check_call(dict(params=None, query=q, value=v, key=k, **kw))
            for kw in (
                dict(masks=(pad, pad), causal=True, window=(64, 0)),
                dict(bias=bias, attention_mask=pad[..., None, :]),
            )
        ]
        return sum(runner.run_fused(cudnn.attention, c).astype(jnp.float32).sum() for c in calls)

    names = {"__cudnn$fmhaSoftmax", "__cudnn$fmhaScaleBiasSoftmax"}
    names |= {n + "Backward" for n in names}
    checks = [jax.export.DisabledSafetyCheck.custom_call(n) for n in names]
    for fn in (forward, jax.grad(forward)):
        exported = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)
        text = exported(shape, shape, shape, pad, bias).mlir_module()
        targets = set(re.findall(r"custom_call @([\w$.]+)", text))
        assert targets and targets <= names, targets
