"""``flax_dotattn.flax_attention_fn`` as the ``attention_fn`` of Flax's own multi-head
modules, against the same modules with Flax's default: ``nn.MultiHeadDotProductAttention``
and ``nnx.MultiHeadAttention`` (grouped heads, ``is_causal``) with the same parameters give
the same outputs and gradients, with padding masks whose padded rows see no key, with
dropout (the same bits as Flax's on the materialised kernel, broadcast or not; on the
chunked kernel the broadcast pattern holds), through the decode cache; the function
against ``flax.linen.dot_product_attention`` (two batch dims, bias, numeric mask, value
depth != query depth, dtypes); arguments it cannot honour raise; O(T) memory through the
Linen module at T = 8192; the benchmark's Flax scenario times equal computations.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close
from flax import linen as nn
from flax import nnx

from flax_dotattn import flax_attention_fn
from flax_dotattn.bench.entries import SCENARIO_ENTRIES, build_scenario

B, T, F, HEADS = 2, 9, 16, 4


def _x(seed=0, shape=(B, T, F)):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _padding_mask():
    """``[B, 1, T, T]`` float32 from Flax's helper; sequence 0 has 3 tokens, so its padded
    query rows see no key."""
    tokens = np.ones((B, T), bool)
    tokens[0, 3:] = False
    tokens[1, 5] = False
    return nn.make_attention_mask(jnp.asarray(tokens), jnp.asarray(tokens))


def _tree_close(actual, expected, factor=1.0):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert a.shape == e.shape and a.dtype == e.dtype
        assert_close(a, e, a.dtype, factor)


def _linen_pair(implementation=None, **fields):
    ours = functools.partial(flax_attention_fn, implementation=implementation)
    return (
        nn.MultiHeadDotProductAttention(num_heads=HEADS, attention_fn=ours, **fields),
        nn.MultiHeadDotProductAttention(num_heads=HEADS, **fields),
    )


def _linen_value_and_grad(module, params, x, **call):
    def loss(params, x):
        out = module.apply(params, x, **call)
        return jnp.sum(out * jnp.cos(out)), out

    return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(params, x)


@pytest.mark.parametrize(
    ("implementation", "broadcast_dropout", "deterministic"),
    [
        ("chunked", True, True),
        ("xla", True, False),
        ("xla", False, False),
    ],
    ids=["chunked-no_dropout", "xla-broadcast_dropout", "xla-dropout"],
)
def test_linen_module_equals_flax_default(implementation, broadcast_dropout, deterministic):
    """Same params, same outputs and gradients (params and input), padded rows included;
    with dropout on the materialised kernel, Flax's own bits."""
    ours, theirs = _linen_pair(
        implementation, dropout_rate=0.3, broadcast_dropout=broadcast_dropout
    )
    x = _x()
    params = theirs.init(jax.random.key(0), x, deterministic=True)
    call = dict(mask=_padding_mask(), deterministic=deterministic)
    call["rngs"] = {"dropout": jax.random.key(5)}
    (grads, out) = _linen_value_and_grad(ours, params, x, **call)
    (want_grads, want) = _linen_value_and_grad(theirs, params, x, **call)
    assert_close(out, want)
    _tree_close(grads, want_grads)


@pytest.mark.parametrize("broadcast", [True, False])
def test_chunked_dropout_is_broadcast_over_batch_and_heads_as_asked(broadcast):
    """Uniform weights on one-hot values show the kept weights: one ``[T, S]`` pattern for
    every batch entry and head with ``broadcast_dropout``, a pattern per row without it."""
    t, s = 6, 8
    q = jnp.zeros((B, t, HEADS, s))
    v = jnp.broadcast_to(jnp.eye(s)[None, :, None, :], (B, s, HEADS, s))
    attend = functools.partial(
        flax_attention_fn, dropout_rate=0.5, broadcast_dropout=broadcast, implementation="chunked"
    )
    out = jax.jit(attend)(q, q[:, :1].repeat(s, 1), v, dropout_rng=jax.random.key(1))
    kept = np.asarray(jnp.swapaxes(out, 1, 2) * s * 0.5)  # [B, N, T, S], 0 or 1
    assert set(np.unique(kept)) == {0.0, 1.0}
    assert np.all(kept == kept[:1, :1]) == broadcast


def _nnx_pair(**kw):
    def make(attention_fn):
        return nnx.MultiHeadAttention(
            num_heads=HEADS, in_features=F, num_kv_heads=2, attention_fn=attention_fn,
            decode=False, rngs=nnx.Rngs(0, dropout=3), **kw,
        )  # fmt: skip

    return make(flax_attention_fn), make(nnx.dot_product_attention)


@nnx.jit(static_argnames="call")
def _nnx_value_and_grad(module, x, call):
    def loss(module, x):
        out = module(x, **dict(call))
        return jnp.sum(out * jnp.cos(out)), out

    return nnx.grad(loss, argnums=(0, 1), has_aux=True)(module, x)


@pytest.mark.parametrize(
    "call",
    [
        (("is_causal", True), ("deterministic", True)),
        (("deterministic", False),),
    ],
    ids=["grouped_heads_causal", "grouped_heads_dropout"],
)
def test_nnx_module_equals_flax_default(call):
    """Grouped heads (``num_kv_heads``), ``is_causal``, and dropout with Flax's bits."""
    ours, theirs = _nnx_pair(dropout_rate=0.25, broadcast_dropout=False)
    x = _x(1)
    (grads, out) = _nnx_value_and_grad(ours, x, call)
    (want_grads, want) = _nnx_value_and_grad(theirs, x, call)
    assert_close(out, want)
    _tree_close(nnx.state(grads), nnx.state(want_grads))


def test_linen_decode_cache_works_unchanged():
    """Flax's own cache (``decode=True``): each step equals Flax's step and the full causal
    forward's row."""
    ours, theirs = _linen_pair(decode=True)
    x = _x(2, (B, 4, F))
    params = theirs.init(jax.random.key(0), x)
    cache = theirs.init(jax.random.key(0), x)["cache"]
    full = nn.MultiHeadDotProductAttention(num_heads=HEADS, attention_fn=flax_attention_fn)
    causal = full.apply(params, x, mask=nn.make_causal_mask(x[..., 0]))
    step = jax.jit(
        lambda m, cache, x: m.apply({**params, "cache": cache}, x, mutable=["cache"]),
        static_argnums=0,
    )
    ours_cache, theirs_cache = cache, cache
    for t in range(x.shape[1]):
        out, ours_cache = step(ours, ours_cache, x[:, t : t + 1])
        want, theirs_cache = step(theirs, theirs_cache, x[:, t : t + 1])
        ours_cache, theirs_cache = ours_cache["cache"], theirs_cache["cache"]
        assert_close(out, want)
        assert_close(out[:, 0], causal[:, t])


def test_nnx_decode_cache_works_unchanged():
    ours, theirs = _nnx_pair()
    x = _x(3, (B, 4, F))
    step = nnx.jit(lambda module, x: module(x, decode=True))
    for module in (ours, theirs):
        module.init_cache(x.shape)
    for t in range(x.shape[1]):
        assert_close(step(ours, x[:, t : t + 1]), step(theirs, x[:, t : t + 1]))


def _qkv(shape_q, shape_k, dv, dtype=jnp.float32):
    rng = np.random.default_rng(4)
    q = jnp.asarray(rng.normal(size=shape_q), dtype)
    k = jnp.asarray(rng.normal(size=shape_k), dtype)
    v = jnp.asarray(rng.normal(size=shape_k[:-1] + (dv,)), dtype)
    return q, k, v


def test_function_equals_flax_function_with_two_batch_dims_bias_and_numeric_mask():
    q, k, v = _qkv((2, 3, 5, 4, 8), (2, 3, 7, 4, 8), dv=6)
    rng = np.random.default_rng(5)
    bias = jnp.asarray(rng.normal(size=(1, 1, 4, 5, 7)), jnp.float32)
    mask = jnp.asarray(rng.random((2, 3, 1, 5, 7)) > 0.4, jnp.float32).at[0, 0, 0, 1].set(0)

    def value_and_grads(fn):
        def loss(q, k, v, bias):
            out = fn(q, k, v, bias=bias, mask=mask)
            return jnp.sum(out * jnp.cos(out)), out

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, bias)

    grads, out = value_and_grads(functools.partial(flax_attention_fn, implementation="chunked"))
    want_grads, want = value_and_grads(nn.dot_product_attention)
    assert out.shape == (2, 3, 5, 4, 6)
    assert_close(out, want)
    _tree_close(grads, want_grads)


@pytest.mark.parametrize("fp32_softmax", [False, True])
def test_bfloat16_dtype_and_numbers_follow_flax(fp32_softmax):
    q, k, v = _qkv((B, T, HEADS, 8), (B, T, HEADS, 8), dv=8, dtype=jnp.bfloat16)
    kw = dict(force_fp32_for_softmax=fp32_softmax)
    ours = functools.partial(flax_attention_fn, implementation="chunked", **kw)
    out = jax.jit(ours)(q, k, v, mask=_padding_mask())
    want = jax.jit(functools.partial(nn.dot_product_attention, **kw))(q, k, v, mask=_padding_mask())
    assert out.dtype == want.dtype == (jnp.float32 if fp32_softmax else jnp.bfloat16)
    assert_close(out, want, jnp.bfloat16, factor=2.0)


def test_dtype_promotes_like_flax():
    q, k, v = _qkv((B, T, HEADS, 8), (B, T, HEADS, 8), dv=8)
    out = flax_attention_fn(q.astype(jnp.bfloat16), k, v)
    assert out.dtype == nn.dot_product_attention(q.astype(jnp.bfloat16), k, v).dtype
    assert flax_attention_fn(q, k, v, dtype=jnp.bfloat16).dtype == jnp.bfloat16


_Q, _K = jnp.ones((B, T, HEADS, 8)), jnp.ones((B, T, HEADS, 8))

BAD = {
    "module": ({"module": object()}, "cannot honour module"),
    "einsum_dot_general": ({"einsum_dot_general": jax.lax.dot_general}, "einsum_dot_general"),
    "qk_einsum": ({"qk_attn_weights_einsum": jnp.einsum}, "qk_attn_weights_einsum"),
    "value_einsum": ({"attn_weights_value_einsum": jnp.einsum}, "attn_weights_value_einsum"),
    "dropout_without_rng": (
        {"dropout_rate": 0.1, "deterministic": False},
        "dropout_rng is required",
    ),
    "broadcast_dropout": ({"broadcast_dropout": 1}, "broadcast_dropout must be a Python bool"),
    "mask_shape": ({"mask": jnp.ones((B, 1, T, 3))}, "mask must broadcast"),
    "dropout_on_a_kernel_without_it": (
        {
            "dropout_rate": 0.1,
            "deterministic": False,
            "dropout_rng": jax.random.key(0),
            "implementation": "pallas_tpu",
        },
        "dropout",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_arguments_raise_naming_them(case):
    kw, pattern = BAD[case]
    with pytest.raises(ValueError, match=pattern):
        flax_attention_fn(_Q, _K, _K, **kw)


@pytest.mark.parametrize(
    ("query", "key", "pattern"),
    [
        (_Q[..., :3, :], _K, "query heads N=3 must be a multiple"),
        (_Q[0], _K, "same rank"),
        (_Q, _K[..., :4], "key the query's depth"),
        (_Q[:1], _K, "batch dims must match"),
    ],
    ids=["heads", "rank", "depth", "batch"],
)
def test_bad_shapes_raise(query, key, pattern):
    with pytest.raises(ValueError, match=pattern):
        flax_attention_fn(query, key, key)


def test_sowing_weights_through_the_module_is_refused():
    ours, _ = _linen_pair()
    x = _x()
    params = ours.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="sow_weights=True"):
        ours.apply(params, x, sow_weights=True, mutable=["intermediates"])


def test_linen_module_memory_is_linear_in_t_at_8192():
    """Forward + backward of ``nn.MultiHeadDotProductAttention`` at 1 x 8192 (8 heads of
    64): compiled temporaries (XLA's own accounting) with this attention_fn against Flax's
    default, which holds the [8, 8192, 8192] weights."""
    x = jax.ShapeDtypeStruct((1, 8192, 512), jnp.float32)

    def temp_bytes(attention_fn):
        module = nn.MultiHeadDotProductAttention(num_heads=8, attention_fn=attention_fn)
        params = jax.eval_shape(module.init, jax.random.key(0), x)

        def loss(params, x):
            return jnp.sum(module.apply(params, x) ** 2)

        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    ours, default = temp_bytes(flax_attention_fn), temp_bytes(nn.dot_product_attention)
    one_head_of_scores = 8192 * 8192 * 4
    assert default > 8 * one_head_of_scores  # Flax's weights, all heads at once
    assert ours < one_head_of_scores, ours  # the projections and their gradients
    assert 30 * ours < default, (ours, default)


def test_benchmark_flax_scenario_entries_compute_the_same_gradients():
    """``python -m flax_dotattn.bench --scenarios flax`` times two equal computations."""
    (default, args), (ours, same_args) = (
        build_scenario(name, t=64) for name in SCENARIO_ENTRIES["flax"]
    )
    _tree_close(ours(*same_args), default(*args))
