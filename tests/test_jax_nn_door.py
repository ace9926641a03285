"""``flax_dotattn.jax_nn.dot_product_attention`` against ``jax.nn.dot_product_attention``
itself: values and gradients (query, key, value, bias) for masks, bias, causal, windows,
lengths, grouped heads, rank-3 inputs and rows that see no key, on the materialised and
the chunked kernels; bfloat16; ``jit`` with traced lengths; a table of bad inputs.

Rows that see no key are where the two masking rules differ (jax.nn replaces a masked
logit, Keras's kernels subtract 1e9): a positive control shows that the plain Keras rule
would fail the gradient comparison there.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close

from flax_dotattn import dot_attention, jax_nn

B, T, S, N, K, H = 2, 7, 9, 4, 2, 8


def _inputs(shape_q=(B, T, N, H), shape_kv=(B, S, K, H), dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(2 * rng.normal(size=shape_q), dtype)
    k = jnp.asarray(2 * rng.normal(size=shape_kv), dtype)
    v = jnp.asarray(rng.normal(size=shape_kv), dtype)
    return q, k, v


_RNG = np.random.default_rng(1)
_MASK = jnp.asarray(_RNG.random((B, 1, T, S)) > 0.5).at[0, 0, 2].set(False)  # a dead row
_BIAS = jnp.asarray(_RNG.normal(size=(1, N, T, S)), jnp.float32)
_LENGTHS = jnp.array([0, 5], jnp.int32)  # sequence 0 has no key

CASES = {
    "scale_causal": {"scale": 0.3, "is_causal": True},
    "mask_with_dead_row": {"mask": _MASK},
    "bias_and_mask": {"bias": _BIAS, "mask": _MASK},
    "kv_lengths_with_zero": {"key_value_seq_lengths": _LENGTHS},
    "all_lengths_bias_mask": {
        "query_seq_lengths": jnp.array([5, 7], jnp.int32),
        "key_value_seq_lengths": _LENGTHS,
        "bias": _BIAS,
        "mask": _MASK,
    },
    "window_int_rank2_bias": {"local_window_size": 1, "bias": _BIAS[0, 0]},
    "window_causal": {"local_window_size": (2, 0), "is_causal": True},
    "window_right_only_lengths": {
        "local_window_size": (0, 2),
        "key_value_seq_lengths": jnp.array([3, 9], jnp.int32),
    },
}


def _loss(fn, kw, q, k, v, bias):
    kw = dict(kw, bias=bias) if "bias" in kw else kw
    out = fn(q, k, v, **kw)
    return jnp.sum(out * jnp.cos(out)), out  # a loss whose cotangent differs per entry


def _value_and_grads(fn, kw, q, k, v, bias):
    """The output and the gradients (query, key, value, bias) of a loss, in one jit."""
    grad = jax.grad(functools.partial(_loss, fn, kw), argnums=(0, 1, 2, 3), has_aux=True)
    grads, out = jax.jit(grad)(q, k, v, bias)
    return out, grads


def _compare(kw, implementation, q, k, v, dtype=jnp.float32, factor=1.0, reference=None):
    bias = kw.get("bias", jnp.zeros(()))
    ours = functools.partial(jax_nn.dot_product_attention, implementation=implementation)
    out, grads = _value_and_grads(ours, kw, q, k, v, bias)
    want, want_grads = reference or _value_and_grads(
        jax.nn.dot_product_attention, kw, q, k, v, bias
    )
    assert out.shape == want.shape and out.dtype == want.dtype
    assert_close(out, want, dtype, factor)
    for got, expected in zip(grads, want_grads, strict=True):
        assert got.shape == expected.shape
        assert_close(got, expected, dtype, 2 * factor)


@functools.cache
def _reference(case):
    kw = CASES[case]
    return _value_and_grads(jax.nn.dot_product_attention, kw, *_inputs(), kw.get("bias", 0.0))


#: Every case runs on the chunked kernel; those that exercise the masking rule's
#: correction (rows that see no key) on the materialised one too.
GRID = [(case, "chunked") for case in CASES] + [
    (case, "xla")
    for case in ("mask_with_dead_row", "kv_lengths_with_zero", "all_lengths_bias_mask")
]


@pytest.mark.parametrize(("case", "implementation"), GRID)
def test_values_and_gradients_equal_jax_nn(case, implementation):
    _compare(CASES[case], implementation, *_inputs(), reference=_reference(case))


@pytest.mark.parametrize("kv_heads", [4, 1], ids=["multi_head", "multi_query"])
def test_head_layouts_equal_jax_nn(kv_heads):
    kw = {"is_causal": True, "bias": _BIAS, "mask": _MASK}
    _compare(kw, None, *_inputs(shape_kv=(B, S, kv_heads, H)))


def test_rank3_inputs_equal_jax_nn():
    q, k, v = _inputs()
    kw = {"mask": _MASK[0], "bias": _BIAS[0], "local_window_size": (3, 1)}
    _compare(kw, "xla", q[0], k[0], v[0])


def test_rows_past_the_keys_equal_jax_nn():
    """T > S with a causal window: the last queries see no key (known from the shapes)."""
    q, k, v = _inputs(shape_q=(B, 12, N, H), shape_kv=(B, 4, K, H))
    _compare({"local_window_size": (2, 0), "is_causal": True}, "xla", q, k, v)


def test_bfloat16_equals_jax_nn_to_its_rounding():
    q, k, v = _inputs(dtype=jnp.bfloat16)
    kw = {"bias": _BIAS, "mask": _MASK, "key_value_seq_lengths": _LENGTHS}
    _compare(kw, "chunked", q, k, v, jnp.bfloat16, factor=2.0)


def _mask_hiding_query_0():
    return jnp.zeros((1, 1, T, S), bool).at[..., 1:, :].set(True)  # query 0 sees no key


@functools.partial(jax.jit, static_argnums=0)
def _output_and_query_gradient(fn, q, k, v):
    def loss(q):
        out = fn(q, k, v, mask=_mask_hiding_query_0())
        return jnp.sum(out * jnp.cos(out)), out

    dq, out = jax.grad(loss, has_aux=True)(q)
    return out, dq


def test_dead_rows_are_uniform_and_pass_no_gradient_to_the_query():
    q, k, v = _inputs()
    out, dq = _output_and_query_gradient(jax_nn.dot_product_attention, q, k, v)
    assert_close(out[:, 0], jnp.repeat(v.mean(axis=1), N // K, axis=1))
    assert np.all(np.asarray(dq[:, 0]) == 0) and np.any(np.asarray(dq[:, 1:]) != 0)


def _keras_rule(q, k, v, mask):
    """The same call under Keras's subtract rule: ``dot_attention`` on the same layout
    (``K = N`` heads), without the door's correction."""
    scale = {"scale": jnp.float32(1 / np.sqrt(H))}
    out = dot_attention(scale, *(jnp.swapaxes(x, 1, 2) for x in (q, v, k)), attention_mask=mask)
    return jnp.swapaxes(out, 1, 2)


def test_keras_rule_alone_would_fail_the_gradient_comparison():
    """Positive control: Keras's rule has jax.nn's values but not its query gradient."""
    q, k, v = _inputs(shape_kv=(B, S, N, H))
    want, want_dq = _output_and_query_gradient(jax.nn.dot_product_attention, q, k, v)
    out, dq = _output_and_query_gradient(jax_nn.dot_product_attention, q, k, v)
    assert_close(out, want)
    assert_close(dq, want_dq)
    out, dq = _output_and_query_gradient(_keras_rule, q, k, v)
    assert_close(out, want, factor=10.0)
    assert not np.allclose(dq, want_dq, atol=1e-3)


def test_jit_with_traced_lengths_compiles_once():
    q, k, v = _inputs()
    f = jax.jit(
        lambda ql, kl: jax_nn.dot_product_attention(
            q, k, v, query_seq_lengths=ql, key_value_seq_lengths=kl, is_causal=True
        )
    )
    for ql, kl in [([3, 7], [0, 9]), ([7, 1], [4, 2])]:
        ql, kl = jnp.array(ql, jnp.int32), jnp.array(kl, jnp.int32)
        want = jax.nn.dot_product_attention(
            q, k, v, query_seq_lengths=ql, key_value_seq_lengths=kl, is_causal=True
        )
        assert_close(f(ql, kl), want)
    assert f._cache_size() == 1


_Q, _KV = jnp.ones((B, T, N, H)), jnp.ones((B, S, K, H))

BAD = {
    "rank_5_query": ((jnp.ones((1,) + _Q.shape), _KV, _KV), {}, "query must have rank 4"),
    "value_shape": ((_Q, _KV, _KV[..., :4]), {}, "value must have the key's shape"),
    "query_dtype": ((_Q.astype(jnp.bfloat16), _KV, _KV), {}, "query must have .* dtype float32"),
    "query_depth": ((_Q[..., :4], _KV, _KV), {}, r"query must have shape \[B, T, N, H\]"),
    "heads": ((_Q[..., :3, :], _KV, _KV), {}, "query heads N=3 must be a multiple"),
    "mask_dtype": ((_Q, _KV, _KV), {"mask": jnp.ones((T, S))}, "mask must be a bool array"),
    "mask_shape": ((_Q, _KV, _KV), {"mask": jnp.ones((T, 2), bool)}, "mask must broadcast"),
    "bias_kv_heads": ((_Q, _KV, _KV), {"bias": jnp.ones((1, K, T, S))}, "bias must broadcast"),
    "lengths_dtype": (
        (_Q, _KV, _KV),
        {"key_value_seq_lengths": jnp.array([1, 2], jnp.int16)},
        "key_value_seq_lengths must be an int32 array",
    ),
    "lengths_shape": (
        (_Q, _KV, _KV),
        {"query_seq_lengths": jnp.array([1], jnp.int32)},
        r"query_seq_lengths must be an int32 array of shape \(B,\)",
    ),
    "negative_window": ((_Q, _KV, _KV), {"local_window_size": (-1, 2)}, "local_window_size"),
    "causal_not_bool": ((_Q, _KV, _KV), {"is_causal": 1}, "is_causal must be a Python bool"),
    "residual": ((_Q, _KV, _KV), {"return_residual": True}, "return_residual=True"),
    "implementation": ((_Q, _KV, _KV), {"implementation": "flash"}, "implementation must be"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_raise_naming_the_argument(case):
    args, kw, pattern = BAD[case]
    with pytest.raises(ValueError, match=pattern):
        jax_nn.dot_product_attention(*args, **kw)


def _soft_capped_reference(q, k, v, bias, *, mask, cap):
    """jax.nn's attention with tokamax's ``logits_soft_cap``, written from the
    definitions: heads repeated, ``cap * tanh((q.k / sqrt(H) + bias) / cap)``, masked
    logits replaced, softmax."""
    k, v = (jnp.repeat(x, N // K, axis=2) for x in (k, v))
    logits = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H) + bias
    logits = cap * jnp.tanh(logits / cap)
    logits = jnp.where(mask, logits, -0.7 * float(jnp.finfo(jnp.float32).max))
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, axis=-1), v)


@pytest.mark.parametrize("implementation", ["xla", "chunked"])
def test_logits_soft_cap_caps_the_biased_logits_before_the_masks(implementation):
    q, k, v = _inputs()
    cap = 1.5  # small enough to bend most logits

    def reference(q, k, v, bias, mask=_MASK):
        return _soft_capped_reference(q, k, v, bias, mask=mask, cap=cap)

    kw = {"bias": _BIAS, "mask": _MASK, "logits_soft_cap": cap}
    want = _value_and_grads(
        lambda q, k, v, bias, mask, logits_soft_cap: reference(q, k, v, bias), kw, q, k, v, _BIAS
    )
    _compare(kw, implementation, q, k, v, reference=want)
    uncapped = jax_nn.dot_product_attention(q, k, v, _BIAS, _MASK, implementation=implementation)
    assert float(jnp.max(jnp.abs(uncapped - want[0]))) > 0.05  # the cap matters here
