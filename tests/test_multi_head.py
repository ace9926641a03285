"""``MultiHeadDotAttention`` (Linen and NNX) and its config.

References: Keras 3's ``keras.layers.MultiHeadAttention`` (JAX backend) with the same
weights; ``jax.nn.dot_product_attention`` (its native grouped-query heads, and repeated
keys/values) on projections written out with NumPy; the module's own full-sequence causal
forward for the decoding cache.
"""

import dataclasses
import inspect
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from conftest import assert_close
from flax import nnx

from flax_dotattn import (
    MultiHeadDotAttention,
    MultiHeadDotAttentionConfig,
    load_config,
    multi_head_params_from_keras,
    multi_head_params_to_keras,
    save_config,
)
from flax_dotattn import nnx as fdnnx

keras = pytest.importorskip("keras")


def _normal(r, *shape):
    return np.asarray(r.normal(size=shape), np.float32)


def _keras_layer(query, value, **kwargs):
    layer = keras.layers.MultiHeadAttention(**kwargs)
    layer.build(np.shape(query), np.shape(value))
    return layer


def _keras_call(layer, query, value, **kwargs):
    # return_attention_scores=True takes Keras's explicit path (its fused path rejects
    # value_dim != key_dim). Keras adds its biases by implicit rank promotion.
    with jax.numpy_rank_promotion("allow"):
        return layer(query, value, return_attention_scores=True, **kwargs)


# -- Keras parity ------------------------------------------------------------------------


def _parity(r, keras_kwargs, call_kwargs, keras_call_kwargs, use_scale=False):
    q, v = _normal(r, 2, 5, 6), _normal(r, 2, 7, 4)
    layer = _keras_layer(q, v, **keras_kwargs)
    # Non-zero biases, so that a misplaced bias shows.
    layer.set_weights([w + 0.1 * _normal(r, *w.shape) for w in layer.get_weights()])
    expected, expected_w = _keras_call(layer, q, v, **keras_call_kwargs)
    cfg = dataclasses.replace(
        MultiHeadDotAttentionConfig.from_keras(layer.get_config()), use_scale=use_scale
    )
    params = multi_head_params_from_keras(layer.get_weights(), cfg)
    out, w = MultiHeadDotAttention.from_config(cfg).apply(
        {"params": params}, q, v, return_attention_scores=True, **call_kwargs
    )
    assert_close(out, expected)
    assert_close(w, expected_w)
    return cfg, params, layer


def test_keras_parity_with_masks_and_scores(rng):
    value_mask = rng.random((2, 7)) > 0.3
    value_mask[:, 0] = True
    attention_mask = rng.random((2, 5, 7)) > 0.2
    _parity(
        rng,
        dict(num_heads=3, key_dim=4, value_dim=5, output_shape=8),
        dict(masks=(None, value_mask), attention_mask=attention_mask),
        dict(value_mask=value_mask, attention_mask=attention_mask),
    )


def test_a_mask_function_that_hides_every_key_of_a_row_gives_kerass_zero_row(rng):
    """Keras MultiHeadAttention gives a query row that sees no key zero weights (its
    masked softmax): a ``mask_mod`` that hides every key of some rows equals Keras called
    with the same mask as a dense ``attention_mask``."""
    q, v = _normal(rng, 2, 5, 6), _normal(rng, 2, 7, 4)

    def mask_mod(q_pos, kv_pos):  # rows 3 and 4 see no key
        return (q_pos < 3) & (kv_pos != q_pos)

    dense = np.asarray(mask_mod(np.arange(5)[:, None], np.arange(7)[None, :]))
    layer = _keras_layer(q, v, num_heads=2, key_dim=4)
    layer.set_weights([w + 0.1 * _normal(rng, *w.shape) for w in layer.get_weights()])
    mask = np.broadcast_to(dense, (2, 5, 7))
    expected, expected_w = _keras_call(layer, q, v, attention_mask=mask)
    cfg = MultiHeadDotAttentionConfig.from_keras(layer.get_config())
    params = multi_head_params_from_keras(layer.get_weights(), cfg)
    module = MultiHeadDotAttention.from_config(dataclasses.replace(cfg, mask_mod=mask_mod))
    for implementation in ("xla", "chunked"):
        out = module.clone(implementation=implementation).apply({"params": params}, q, v)
        assert_close(out, expected)
    _, w = module.apply({"params": params}, q, v, return_attention_scores=True)
    assert_close(w, expected_w)


@pytest.mark.slow
@pytest.mark.parametrize(
    "keras_kwargs, call_kwargs, keras_call_kwargs, use_scale",
    [
        pytest.param({}, dict(causal=True), dict(use_causal_mask=True), False, id="causal"),
        pytest.param({}, dict(causal=True), dict(use_causal_mask=True), True, id="learned-scale"),
        pytest.param(dict(sliding_window=3), {}, {}, False, id="sliding-window"),
        pytest.param(dict(use_bias=False), {}, {}, False, id="no-bias"),
        pytest.param(
            {},
            dict(attention_mask=np.tril(np.ones((5, 7), bool))[None, None]),
            {},
            False,
            id="per-head-mask-layout",
        ),
    ],
)
def test_keras_parity_grid(rng, keras_kwargs, call_kwargs, keras_call_kwargs, use_scale):
    if "attention_mask" in call_kwargs:
        keras_call_kwargs = dict(attention_mask=call_kwargs["attention_mask"][:, 0])
    cfg, params, layer = _parity(
        rng,
        dict(num_heads=2, key_dim=4, **keras_kwargs),
        call_kwargs,
        keras_call_kwargs,
        use_scale,
    )
    # Export: the learned scale folds into the query kernel; Keras gives our numbers.
    back = _keras_layer(np.zeros((2, 5, 6)), np.zeros((2, 7, 4)), **layer.get_config())
    params = dict(params, scale=jnp.float32(0.3)) if use_scale else params
    back.set_weights(multi_head_params_to_keras({"params": params}, cfg))
    q, v = _normal(rng, 2, 5, 6), _normal(rng, 2, 7, 4)
    expected, _ = _keras_call(back, q, v, **keras_call_kwargs)
    out = MultiHeadDotAttention.from_config(cfg).apply({"params": params}, q, v, **call_kwargs)
    assert_close(out, expected)


# -- grouped-query heads against jax.nn --------------------------------------------------


def _numpy_projections(params, x, kv):
    proj = lambda x, p: np.einsum("btf,fhd->bthd", x, p["kernel"]) + p["bias"]  # noqa: E731
    return proj(x, params["query"]), proj(kv, params["key"]), proj(kv, params["value"])


@pytest.mark.slow
@pytest.mark.parametrize("kv_heads", [2, 1], ids=["gqa", "mqa"])
def test_grouped_heads_equal_jax_nn(rng, kv_heads):
    b, t, f, h, dk = 2, 6, 8, 4, 4
    x = _normal(rng, b, t, f)
    layer = MultiHeadDotAttention(num_heads=h, key_dim=dk, num_kv_heads=kv_heads, causal=True)
    params = layer.init(jax.random.key(0), x, x)["params"]
    params = jax.tree.map(lambda p: p + 0.1 * _normal(rng, *p.shape), params)
    out, weights = layer.apply({"params": params}, x, x, return_attention_scores=True)
    host = jax.tree.map(np.asarray, params)
    q, k, v = _numpy_projections(host, x, x)
    native = jax.nn.dot_product_attention(q, k, v, is_causal=True)  # [B, T, H, Dk]
    g = h // kv_heads
    repeat = lambda a: jnp.repeat(a, g, axis=2)  # noqa: E731
    repeated = jax.nn.dot_product_attention(q, repeat(k), repeat(v), is_causal=True)
    assert_close(native, repeated)
    expected = np.einsum("bthv,hvo->bto", native, host["out"]["kernel"]) + host["out"]["bias"]
    assert_close(out, expected)
    logits = np.einsum("bqhd,bkhd->bhqk", q, np.asarray(repeat(k))) / np.sqrt(dk)
    logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
    assert_close(weights, jax.nn.softmax(logits, axis=-1))


# -- decoding ----------------------------------------------------------------------------


def _decode_linen(layer, params, x, chunks):
    decoder = layer.clone(decode=True)
    cache = decoder.init(jax.random.key(0), x, x)["cache"]
    traces = []

    @jax.jit
    def step(cache, chunk):
        traces.append(chunk.shape)  # runs once per compile
        return decoder.apply({"params": params, "cache": cache}, chunk, chunk, mutable=["cache"])

    outputs, start = [], 0
    for n in chunks:
        out, variables = step(cache, x[:, start : start + n])
        cache, start = variables["cache"], start + n
        outputs.append(out)
    assert int(cache["cache_index"]) == start
    assert len(traces) == len(set(chunks))  # one compile per chunk length, not per position
    return jnp.concatenate(outputs, axis=1)


@pytest.mark.parametrize(
    "options",
    [
        pytest.param(dict(implementation="xla"), id="xla", marks=pytest.mark.slow),
        pytest.param(
            dict(implementation="chunked", block_size=(2, 4), window=(3, 0)),
            id="chunked-window",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_linen_decode_equals_the_full_causal_forward(rng, options):
    x = _normal(rng, 2, 9, 8)
    layer = MultiHeadDotAttention(num_heads=2, key_dim=4, causal=True, **options)
    params = layer.init(jax.random.key(1), x, x)["params"]
    full = layer.apply({"params": params}, x, x)
    # One token per step (one compile), then a prefill of 3 and a chunk of 2.
    assert_close(_decode_linen(layer, params, x, [1, 1, 1, 1]), full[:, :4])
    assert_close(_decode_linen(layer, params, x, [3, 2, 2, 2]), full)


def _rope(x, positions):
    """Rotary embeddings on ``x [B, T, heads, D]`` at ``positions [T]``."""
    half = x.shape[-1] // 2
    freq = 1.0 / 10000 ** (jnp.arange(half) / half)
    angle = positions[:, None] * freq[None, :]  # [T, D/2]
    cos, sin = jnp.cos(angle)[None, :, None, :], jnp.sin(angle)[None, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


@pytest.mark.slow
@pytest.mark.parametrize(
    "kv_heads",
    [pytest.param(None, id="mha"), pytest.param(2, id="gqa")],
)
def test_nnx_decode_equals_the_full_forward_and_linen(rng, kv_heads):
    x = _normal(rng, 2, 7, 8)
    model = fdnnx.MultiHeadDotAttention(
        4,
        8,
        key_dim=4,
        num_kv_heads=kv_heads,
        causal=True,
        use_scale=True,
        query_key_transform=_rope,
        rngs=nnx.Rngs(0),
    )
    full = model(x, x)
    linen = MultiHeadDotAttention.from_config(model.config, query_key_transform=_rope)
    assert_close(linen.apply({"params": model.params()}, x, x), full)
    model.init_cache(x.shape)
    step = nnx.jit(lambda m, chunk: m(chunk, chunk, decode=True))
    outputs = [step(model, x[:, a:b]) for a, b in ((0, 3), (3, 4), (4, 5), (5, 7))]
    assert_close(jnp.concatenate(outputs, axis=1), full)
    assert int(model.cache_index[...]) == 7


# -- config ------------------------------------------------------------------------------


@pytest.mark.slow
def test_config_round_trips_through_dict_files_modules_and_keras(tmp_path):
    cfg = MultiHeadDotAttentionConfig(
        num_heads=4,
        key_dim=8,
        value_dim=6,
        output_shape=12,
        num_kv_heads=2,
        use_scale=True,
        scale_init=0.2,
        causal=True,
        window=(16, 0),
        precision="high",
        block_size=(32, 64),
    )
    assert MultiHeadDotAttentionConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert MultiHeadDotAttentionConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    for suffix in (".json", ".yaml"):
        assert load_config(save_config(cfg, tmp_path / f"mh{suffix}")) == cfg
    assert MultiHeadDotAttention.from_config(cfg).config == cfg
    model = fdnnx.MultiHeadDotAttention.from_config(cfg, 16, rngs=nnx.Rngs(0))
    model.eval()
    assert model.config == cfg and hash(cfg) == hash(model.config)
    assert cfg.attention.scale_init == 0.2 and cfg.groups == 2
    keras_cfg = MultiHeadDotAttentionConfig(num_heads=2, key_dim=4, window=(2, 2))
    layer = keras.layers.MultiHeadAttention.from_config(keras_cfg.to_keras())
    assert layer.get_config()["sliding_window"] == 3
    assert MultiHeadDotAttentionConfig.from_keras(layer.get_config()) == dataclasses.replace(
        keras_cfg, dtype="float32", value_dim=4
    )


def test_no_dropout_stream_is_forked_without_dropout():
    rngs = nnx.Rngs(0)
    fdnnx.MultiHeadDotAttention(2, 8, key_dim=4, rngs=rngs)
    after_layer = rngs.params()
    fresh = nnx.Rngs(0)
    for _ in range(8):  # the layer drew its 8 kernels and biases, nothing else
        fresh.params()
    assert jnp.array_equal(jax.random.key_data(after_layer), jax.random.key_data(fresh.params()))


# -- errors ------------------------------------------------------------------------------


def _with_cache(layer):
    layer.init_cache((1, 6, 8))
    return layer


@pytest.mark.parametrize(
    "build, pattern",
    [
        (
            lambda: MultiHeadDotAttentionConfig(num_heads=4, key_dim=8, num_kv_heads=3),
            r"num_kv_heads must divide num_heads.*num_heads=4, num_kv_heads=3",
        ),
        (
            lambda: MultiHeadDotAttentionConfig(num_heads=0, key_dim=8),
            r"num_heads must be a positive int; received num_heads=0",
        ),
        (
            lambda: MultiHeadDotAttentionConfig(num_heads=2, key_dim=8.0),
            r"key_dim must be a positive Python int; received key_dim=8.0 of type float",
        ),
        (
            lambda: MultiHeadDotAttentionConfig(num_heads=2, key_dim=8, scale_init="a"),
            r"scale_init must be a finite Python float",
        ),
        (
            lambda: MultiHeadDotAttentionConfig(num_heads=2, key_dim=8, window=(1, 2, 3)),
            r"window must be None or a pair",
        ),
        (lambda: MultiHeadDotAttentionConfig.from_dict({"key_dim": 8}), r"needs \['num_heads'\]"),
        (
            lambda: MultiHeadDotAttentionConfig(num_heads=4, key_dim=8, num_kv_heads=2).to_keras(),
            r"no grouped-query attention; received num_kv_heads=2 with num_heads=4",
        ),
        (
            lambda: MultiHeadDotAttentionConfig.from_keras(
                {"num_heads": 2, "key_dim": 4, "attention_axes": [1, 2]}
            ),
            r"attention_axes=\[1, 2\]",
        ),
        (
            lambda: fdnnx.MultiHeadDotAttention(3, 8, rngs=nnx.Rngs(0)),
            r"needs num_heads to divide in_features; received in_features=8, num_heads=3",
        ),
        (
            lambda: fdnnx.MultiHeadDotAttention(2, 8, rngs=nnx.Rngs(0))(
                jnp.ones((1, 2, 8)), jnp.ones((1, 2, 8)), decode=True
            ),
            r"decode=True needs a cache: call init_cache",
        ),
        (
            lambda: _with_cache(fdnnx.MultiHeadDotAttention(2, 8, rngs=nnx.Rngs(0)))(
                jnp.ones((1, 1, 8)), jnp.ones((1, 3, 8)), decode=True
            ),
            r"decode=True takes the same Tn new positions.*Tq=1 and Tv=3",
        ),
        (
            lambda: _with_cache(fdnnx.MultiHeadDotAttention(2, 8, rngs=nnx.Rngs(0)))(
                jnp.ones((2, 1, 8)), jnp.ones((2, 1, 8)), decode=True
            ),
            r"cache's batch dims \(1,\) and at most its 6 positions; received batch dims "
            r"\(2,\) and Tn=1",
        ),
        (
            lambda: fdnnx.MultiHeadDotAttention(
                2, 8, query_key_transform=lambda x, positions: x, rngs=nnx.Rngs(0)
            )(jnp.ones((1, 1, 8)), jnp.ones((1, 4, 8)), positions=jnp.array([[3]])),
            r"a key transform takes the queries' positions.*Tq=1, Tv=4",
        ),
        (
            lambda: fdnnx.MultiHeadDotAttention(2, 8, rngs=nnx.Rngs(0))(
                jnp.ones((1, 2, 6)), jnp.ones((1, 2, 8))
            ),
            r"query has 6 features but its projection kernel expects 8.*shape \(1, 2, 6\)",
        ),
        (
            lambda: fdnnx.MultiHeadDotAttention(2, 8, rngs=nnx.Rngs(0))(
                jnp.ones((1, 2, 8)), jnp.ones((1, 3, 8)), attention_mask=jnp.ones((1, 3, 2, 3))
            ),
            r"attention_mask with a head axis must be \[..., H or 1, Tq, Tv\] with H=2; "
            r"received shape \(1, 3, 2, 3\)",
        ),
        (
            lambda: multi_head_params_from_keras(
                [np.zeros((4, 2, 4))] * 3, MultiHeadDotAttentionConfig(num_heads=2, key_dim=4)
            ),
            r"expected 8 weights.*received 3",
        ),
    ],
)
def test_bad_inputs_raise_value_errors_naming_them(build, pattern):
    with pytest.raises(ValueError, match=pattern):
        build()


def test_both_modules_declare_the_config_fields_with_its_defaults():
    fields = {f.name: f for f in dataclasses.fields(MultiHeadDotAttentionConfig)}
    linen = {f.name: f for f in dataclasses.fields(MultiHeadDotAttention)}
    nnx_parameters = inspect.signature(fdnnx.MultiHeadDotAttention.__init__).parameters
    for name, field in fields.items():
        assert linen[name].default == field.default, name
        if name not in ("num_heads", "key_dim"):  # NNX: key_dim=None is in_features // H
            assert nnx_parameters[name].default == field.default, name


# -- rows that see no key (Keras's two paths) ---------------------------------------------


def _uniform_rows(layer, query, value, key=None):
    """Keras's fused path on a row that sees no key: every value weighted alike, by hand
    with NumPy from the layer's weights."""
    w = layer.get_weights()
    key = value if key is None else key
    v = np.einsum("btf,fhd->bthd", value, w[4]) + w[5]  # [B, Tv, H, Dv]
    heads = np.broadcast_to(
        v.mean(axis=1, keepdims=True), (query.shape[0], query.shape[1], *v.shape[2:])
    )
    return np.einsum("bqhd,hdo->bqo", heads, w[6]) + w[7]


@pytest.mark.parametrize("case", ["attention-mask-row", "window-on-padding"])
def test_keras_parity_on_rows_that_see_no_key(rng, case):
    q, v = _normal(rng, 2, 5, 6), _normal(rng, 2, 5, 4)
    if case == "attention-mask-row":
        keras_kwargs, hidden = dict(num_heads=2, key_dim=3), 1
        attention_mask = np.ones((2, 5, 5), bool)
        attention_mask[:, hidden] = False
        call, keras_call = dict(attention_mask=attention_mask), dict(attention_mask=attention_mask)
    else:  # query 4's window (|i - j| < 2: keys 3 and 4) falls on padding
        keras_kwargs, hidden = dict(num_heads=2, key_dim=3, sliding_window=2), 4
        value_mask = np.array([[1, 1, 1, 0, 0]] * 2, bool)
        call, keras_call = dict(masks=(None, value_mask)), dict(value_mask=value_mask)
    layer = _keras_layer(q, v, **keras_kwargs)
    layer.set_weights([w + 0.1 * _normal(rng, *w.shape) for w in layer.get_weights()])
    # Keras's masked softmax (the path that returns weights): zero weights, the output
    # projection's bias as the output.
    expected, expected_w = _keras_call(layer, q, v, **keras_call)
    np.testing.assert_array_equal(np.asarray(expected_w)[:, :, hidden], 0.0)
    assert_close(np.asarray(expected)[:, hidden], np.broadcast_to(layer.get_weights()[7], (2, 6)))
    cfg = MultiHeadDotAttentionConfig.from_keras(layer.get_config())
    params = multi_head_params_from_keras(layer.get_weights(), cfg)
    out, w = MultiHeadDotAttention.from_config(cfg).apply(
        {"params": params}, q, v, return_attention_scores=True, **call
    )
    assert_close(out, expected)
    assert_close(w, expected_w)
    model = fdnnx.MultiHeadDotAttention.from_config(cfg, 6, in_kv_features=4, rngs=nnx.Rngs(0))
    _load_nnx(model, params)
    assert_close(model(q, v, **call), expected)
    # Keras's fused path (no weights returned, no dropout, rank-3 inputs) spreads such a
    # row over every key instead (jax.nn.dot_product_attention's rule); the other rows
    # agree.
    with jax.numpy_rank_promotion("allow"):
        fused = np.asarray(layer(q, v, **keras_call))
    seen = [i for i in range(5) if i != hidden]
    assert_close(fused[:, seen], np.asarray(out)[:, seen])
    assert_close(fused[:, hidden], _uniform_rows(layer, q, v)[:, hidden])
    assert np.abs(fused[:, hidden] - np.asarray(out)[:, hidden]).max() > 0.05


def _load_nnx(model, params):
    for name in ("query", "key", "value", "out"):
        projection = getattr(model, name)
        projection.kernel[...] = params[name]["kernel"]
        if "bias" in params[name]:
            projection.bias[...] = params[name]["bias"]


# -- attention_axes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "axes",
    [(1,), (-2,), *(pytest.param(a, marks=pytest.mark.slow) for a in [(2,), (-3,)])],
    ids=lambda a: f"axes{a}",
)
def test_keras_parity_with_a_single_attention_axis_on_rank_4_inputs(rng, axes):
    q, v = _normal(rng, 2, 3, 5, 6), _normal(rng, 2, 3, 5, 4)  # [B, A, T, F]
    layer = _keras_layer(q, v, num_heads=2, key_dim=3, attention_axes=axes)
    layer.set_weights([w + 0.1 * _normal(rng, *w.shape) for w in layer.get_weights()])
    expected, expected_w = _keras_call(layer, q, v)
    cfg = MultiHeadDotAttentionConfig.from_keras(layer.get_config())
    params = multi_head_params_from_keras(layer.get_weights(), cfg)
    out, w = MultiHeadDotAttention.from_config(cfg).apply(
        {"params": params}, q, v, return_attention_scores=True
    )
    assert_close(out, expected)
    assert w.shape == expected_w.shape
    assert_close(w, expected_w)
    if axes in ((2,), (-2,)):  # the sequence axis before the features: the default layout
        default = MultiHeadDotAttention.from_config(
            dataclasses.replace(cfg, attention_axes=(-2,))
        ).apply({"params": params}, q, v)
        assert_close(default, out)


def test_an_unbuilt_keras_config_attends_over_every_middle_axis_or_refuses(rng):
    unbuilt = keras.layers.MultiHeadAttention(num_heads=2, key_dim=3).get_config()
    assert unbuilt["attention_axes"] is None
    cfg = MultiHeadDotAttentionConfig.from_keras(unbuilt)
    assert cfg.attention_axes is None
    layer = MultiHeadDotAttention.from_config(cfg)
    q3 = _normal(rng, 2, 5, 6)
    params = layer.init(jax.random.key(0), q3, q3)["params"]
    q4 = _normal(rng, 2, 3, 5, 6)
    with pytest.raises(ValueError, match=r"attention_axes=None.*axes \(1, 2\).*several axes"):
        layer.apply({"params": params}, q4, q4)
    keras_layer = _keras_layer(q3, q3, **unbuilt)
    keras_layer.set_weights(multi_head_params_to_keras({"params": params}, cfg))
    assert_close(layer.apply({"params": params}, q3, q3), _keras_call(keras_layer, q3, q3)[0])


# -- NNX: separate key and value features -------------------------------------------------


def test_nnx_loads_a_keras_layer_whose_key_and_value_features_differ(rng):
    q, v, k = _normal(rng, 2, 5, 6), _normal(rng, 2, 7, 5), _normal(rng, 2, 7, 4)
    layer = keras.layers.MultiHeadAttention(num_heads=2, key_dim=3, value_dim=2)
    layer.build(q.shape, v.shape, k.shape)
    layer.set_weights([w + 0.1 * _normal(rng, *w.shape) for w in layer.get_weights()])
    with jax.numpy_rank_promotion("allow"):
        expected = layer(q, v, k, return_attention_scores=True)[0]
    cfg = MultiHeadDotAttentionConfig.from_keras(layer.get_config())
    params = multi_head_params_from_keras(layer.get_weights(), cfg)
    model = fdnnx.MultiHeadDotAttention.from_config(
        cfg, 6, in_kv_features=4, in_value_features=5, rngs=nnx.Rngs(0)
    )
    assert model.key.kernel.shape == (4, 2, 3) and model.value.kernel.shape == (5, 2, 2)
    _load_nnx(model, params)
    assert_close(model(q, v, k), expected)
    linen = MultiHeadDotAttention.from_config(cfg).apply({"params": params}, q, v, k)
    assert_close(linen, expected)


# -- decoding: masks of the new positions, writing past the cache --------------------------


@pytest.mark.parametrize("module", ["linen", pytest.param("nnx", marks=pytest.mark.slow)])
def test_a_value_mask_of_the_new_positions_masks_only_them(rng, module):
    x = _normal(rng, 2, 6, 8)
    value_mask = np.ones((2, 6), bool)
    value_mask[0, 2] = False  # one padded token in sequence 0's history
    value_mask[1, 4] = False
    layer = MultiHeadDotAttention(num_heads=2, key_dim=4, causal=True)
    params = layer.init(jax.random.key(1), x, x)["params"]
    full = layer.apply({"params": params}, x, x, masks=(None, value_mask))
    if module == "linen":
        decoder = layer.clone(decode=True)
        cache = decoder.init(jax.random.key(0), x, x)["cache"]
        step = jax.jit(
            lambda cache, x_t, m_t: decoder.apply(
                {"params": params, "cache": cache}, x_t, x_t, masks=(None, m_t), mutable=["cache"]
            )
        )
        outputs = []
        for t in range(6):
            out, variables = step(cache, x[:, t : t + 1], value_mask[:, t : t + 1])
            cache = variables["cache"]
            outputs.append(out)
    else:
        model = fdnnx.MultiHeadDotAttention(2, 8, key_dim=4, causal=True, rngs=nnx.Rngs(0))
        _load_nnx(model, params)
        model.init_cache(x.shape)
        outputs = [
            model(x[:, a:b], x[:, a:b], masks=(None, value_mask[:, a:b]), decode=True)
            for a, b in ((0, 3), (3, 4), (4, 6))
        ]
    assert_close(jnp.concatenate(outputs, axis=1), full)


def test_decode_masks_that_would_broadcast_over_the_cache_are_refused(rng):
    model = _with_cache(fdnnx.MultiHeadDotAttention(2, 8, rngs=nnx.Rngs(0)))
    x = jnp.ones((1, 2, 8))
    with pytest.raises(
        ValueError, match=r"value_mask of the 2 new positions.*\[..., 2\].*\(1, 1\)"
    ):
        model(x, x, masks=(None, jnp.ones((1, 1), bool)), decode=True)
    with pytest.raises(
        ValueError, match=r"attention_mask.*\[..., Tn, Tmax\] = \[..., 2, 6\].*\(1, 2, 2\)"
    ):
        model(x, x, attention_mask=jnp.ones((1, 2, 2), bool), decode=True)
    with pytest.raises(
        ValueError, match=r"segment_ids.*kv ids \[..., Tmax\] = \[..., 6\].*\(1, 1\)"
    ):
        model(x, x, segment_ids=(jnp.zeros((1, 2), int), jnp.zeros((1, 1), int)), decode=True)


def test_writing_past_the_cache_raises_and_is_caught_under_checkify(rng):
    from jax.experimental import checkify

    model = fdnnx.MultiHeadDotAttention(2, 8, key_dim=4, causal=True, rngs=nnx.Rngs(0))
    model.init_cache((1, 4, 8))
    x = _normal(rng, 1, 5, 8)
    model(x[:, :3], x[:, :3], decode=True)
    with pytest.raises(ValueError, match=r"cache_index 3 \+ 2 new positions > the cache's 4"):
        model(x[:, 3:5], x[:, 3:5], decode=True)
    layer = MultiHeadDotAttention(num_heads=2, key_dim=4, causal=True, decode=True)
    variables = layer.init(jax.random.key(0), x[:, :4], x[:, :4])
    cache = dict(variables["cache"], cache_index=jnp.int32(3))

    @jax.jit
    def step(cache, chunk):
        return layer.apply({**variables, "cache": cache}, chunk, chunk, mutable=["cache"])

    error, _ = checkify.checkify(step, errors=checkify.user_checks)(cache, x[:, 3:5])
    assert error.get() is not None and "the cache's 4" in error.get()
    error, _ = checkify.checkify(step, errors=checkify.user_checks)(cache, x[:, 3:4])
    assert error.get() is None


# -- query_scale ---------------------------------------------------------------------------


def test_query_scale_is_the_fixed_query_factor_in_both_modules(rng):
    x, kv = _normal(rng, 2, 5, 8), _normal(rng, 2, 6, 8)
    layer = MultiHeadDotAttention(num_heads=2, key_dim=4, query_scale=0.3)
    params = layer.init(jax.random.key(0), x, kv)["params"]
    params = jax.tree.map(lambda p: p + 0.1 * _normal(rng, *p.shape), params)
    host = jax.tree.map(np.asarray, params)
    proj = lambda x, p: np.einsum("btf,fhd->bthd", x, p["kernel"]) + p["bias"]  # noqa: E731
    q, k, v = proj(x, host["query"]), proj(kv, host["key"]), proj(kv, host["value"])
    heads = jax.nn.dot_product_attention(q, k, v, scale=0.3)  # [B, Tq, H, Dv]
    expected = np.einsum("bthv,hvo->bto", heads, host["out"]["kernel"]) + host["out"]["bias"]
    assert_close(layer.apply({"params": params}, x, kv), expected)
    model = fdnnx.MultiHeadDotAttention(2, 8, key_dim=4, query_scale=0.3, rngs=nnx.Rngs(0))
    _load_nnx(model, params)
    assert_close(model(x, kv), expected)
    cfg = layer.config
    assert cfg.query_scale == 0.3 and cfg.query_factor == 0.3
    assert MultiHeadDotAttentionConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert (
        MultiHeadDotAttentionConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg
    )
    assert model.config.query_scale == 0.3
    with pytest.raises(ValueError, match=r"to_keras: .*1 / sqrt\(key_dim\) = 0.5.*query_scale=0.3"):
        cfg.to_keras()
    with pytest.raises(ValueError, match=r"to_keras: .*query_scale=0.3"):
        multi_head_params_to_keras({"params": params}, cfg)
    keras_factor = dataclasses.replace(cfg, query_scale=0.5)  # Keras's own: exported
    assert keras_factor.to_keras()["key_dim"] == 4
    with pytest.raises(ValueError, match=r"query_scale=0.3 with use_scale=True"):
        dataclasses.replace(cfg, use_scale=True)


# -- query and key transforms --------------------------------------------------------------


def _rope_rows(x, positions):
    """Rotary embeddings on ``x [..., T, heads, D]`` at ``positions [T]`` or ``[..., T]``."""
    half = x.shape[-1] // 2
    freq = 1.0 / 10000 ** (jnp.arange(half) / half)
    positions = positions[..., :, None, None]  # [(...,) T, 1, 1]
    angle = positions * freq.reshape((1,) * (positions.ndim - 1) + (half,))  # [(...,) T, 1, D/2]
    angle = angle.reshape((1,) * (x.ndim - angle.ndim) + angle.shape)
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def _norm(weight):
    def f(x, positions):
        del positions
        scale = weight.reshape((1,) * (x.ndim - 1) + weight.shape)
        return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale

    return f


def test_query_and_key_transforms_apply_to_their_side_only(rng):
    x = _normal(rng, 2, 6, 8)
    w_q, w_k = jnp.asarray(_normal(rng, 4) + 1.0), jnp.asarray(_normal(rng, 4) + 1.0)
    q_side = lambda x, p: _rope_rows(_norm(w_q)(x, p), p)  # noqa: E731
    k_side = lambda x, p: _rope_rows(_norm(w_k)(x, p), p)  # noqa: E731
    layer = MultiHeadDotAttention(
        num_heads=2, key_dim=4, causal=True, query_transform=q_side, key_transform=k_side
    )
    params = layer.init(jax.random.key(0), x, x)["params"]
    out = layer.apply({"params": params}, x, x)
    host = jax.tree.map(np.asarray, params)
    q, k, v = _numpy_projections(host, x, x)
    positions = jnp.arange(6)
    heads = jax.nn.dot_product_attention(
        q_side(jnp.asarray(q), positions), k_side(jnp.asarray(k), positions), v, is_causal=True
    )
    expected = np.einsum("bthv,hvo->bto", heads, host["out"]["kernel"]) + host["out"]["bias"]
    assert_close(out, expected)
    # Decoding with the per-side transforms equals the full forward (NNX).
    model = fdnnx.MultiHeadDotAttention(
        2, 8, key_dim=4, causal=True, query_transform=q_side, key_transform=k_side,
        rngs=nnx.Rngs(0),
    )  # fmt: skip
    _load_nnx(model, params)
    model.init_cache(x.shape)
    steps = [model(x[:, a:b], x[:, a:b], decode=True) for a, b in ((0, 4), (4, 5), (5, 6))]
    assert_close(jnp.concatenate(steps, axis=1), expected)
    # The shortcut is both sides.
    both = MultiHeadDotAttention(num_heads=2, key_dim=4, causal=True, query_key_transform=q_side)
    same = both.clone(query_key_transform=None, query_transform=q_side, key_transform=q_side)
    assert_close(both.apply({"params": params}, x, x), same.apply({"params": params}, x, x))
    same_twice = both.clone(query_transform=q_side)  # consistent: accepted
    assert_close(same_twice.apply({"params": params}, x, x), both.apply({"params": params}, x, x))
    with pytest.raises(ValueError, match=r"query_key_transform is the shortcut.*key_transform="):
        both.clone(key_transform=k_side).apply({"params": params}, x, x)
    with pytest.raises(ValueError, match=r"query_key_transform is the shortcut.*query_transform="):
        fdnnx.MultiHeadDotAttention(
            2, 8, query_key_transform=q_side, query_transform=k_side, rngs=nnx.Rngs(0)
        )


# -- a ragged batch: one cache_index per sequence ---------------------------------------------


@pytest.mark.parametrize("module", [pytest.param("linen", marks=pytest.mark.slow), "nnx"])
def test_a_ragged_batch_decodes_each_sequence_as_alone_and_as_the_full_forward(rng, module):
    lengths, steps, tmax = np.array([5, 2, 3]), 3, 10
    x = _normal(rng, 3, tmax, 8)
    layer = MultiHeadDotAttention(
        num_heads=4, key_dim=4, num_kv_heads=2, causal=True, query_key_transform=_rope_rows
    )
    params = layer.init(jax.random.key(0), x, x)["params"]
    prompt = np.zeros((3, 5, 8), np.float32)  # prompts padded to the longest
    for i, n in enumerate(lengths):
        prompt[i, :n] = x[i, :n]

    def tokens(t):  # each sequence's token t after its prompt: [3, 1, 8]
        return jnp.stack([x[i, n + t] for i, n in enumerate(lengths)])[:, None]

    if module == "linen":
        decoder = layer.clone(decode=True, per_sequence_cache=True)
        cache = decoder.init(jax.random.key(0), x, x)["cache"]
        assert cache["cache_index"].shape == (3,)

        @jax.jit
        def step(cache, chunk, new_length):
            return decoder.apply(
                {"params": params, "cache": cache}, chunk, chunk, new_length=new_length,
                mutable=["cache"],
            )  # fmt: skip

        first, variables = step(cache, prompt, jnp.asarray(lengths, jnp.int32))
        outs = [first]
        for t in range(steps):
            out, variables = step(variables["cache"], tokens(t), jnp.ones(3, jnp.int32))
            outs.append(out)
        assert step._cache_size() == 2  # one program for the prefill, one for the steps
        index = variables["cache"]["cache_index"]
    else:
        model = fdnnx.MultiHeadDotAttention(
            4, 8, key_dim=4, num_kv_heads=2, causal=True, query_key_transform=_rope_rows,
            rngs=nnx.Rngs(0),
        )  # fmt: skip
        _load_nnx(model, params)
        model.init_cache(x.shape, per_sequence=True)
        step = nnx.jit(lambda m, chunk, n: m(chunk, chunk, new_length=n, decode=True))
        outs = [step(model, prompt, jnp.asarray(lengths, jnp.int32))]
        outs += [step(model, tokens(t), jnp.ones(3, jnp.int32)) for t in range(steps)]
        index = model.cache_index[...]
    np.testing.assert_array_equal(index, lengths + steps)
    single = layer.clone(decode=True)

    @jax.jit
    def single_step(cache, token):
        out, variables = single.apply(
            {"params": params, "cache": cache}, token, token, mutable=["cache"]
        )
        return out, variables["cache"]

    for i, n in enumerate(lengths):
        decoded = jnp.concatenate([outs[0][i, :n], *(o[i] for o in outs[1:])])  # [n + steps, F]
        alone = x[i : i + 1, : n + steps]
        assert_close(decoded, layer.apply({"params": params}, alone, alone)[0])
        cache = single.init(jax.random.key(0), x[i : i + 1], x[i : i + 1])["cache"]
        outs_alone = []  # this sequence alone, one cache_index, one token per step
        for t in range(n + steps):
            out, cache = single_step(cache, alone[:, t : t + 1])
            outs_alone.append(out[0])
        assert_close(decoded, jnp.concatenate(outs_alone))


# -- a rolling cache for windowed layers -----------------------------------------------------


def test_a_rolling_cache_of_the_window_equals_the_linear_cache_linen(rng):
    w, t = 3, 11
    x = _normal(rng, 2, t, 8)
    layer = MultiHeadDotAttention(
        num_heads=2, key_dim=4, causal=True, window=(w, 0), query_key_transform=_rope_rows
    )
    params = layer.init(jax.random.key(0), x, x)["params"]
    full = layer.apply({"params": params}, x, x)
    decoder = layer.clone(decode=True, rolling_cache=True)
    cache = decoder.init(jax.random.key(0), x[:, : w + 1], x[:, : w + 1])["cache"]  # w + 1 slots
    assert cache["cached_key"].shape == (2, 2, w + 1, 4)
    step = jax.jit(
        lambda cache, x_t: decoder.apply(
            {"params": params, "cache": cache}, x_t, x_t, mutable=["cache"]
        )
    )
    outs = []
    for i in range(t):
        out, variables = step(cache, x[:, i : i + 1])
        cache = variables["cache"]
        outs.append(out)
    assert step._cache_size() == 1
    assert_close(jnp.concatenate(outs, axis=1), full)
    with pytest.raises(ValueError, match=r"rolling cache of 4 slots with window \(3, 0\) takes "
                       r"at most 4 - 3 = 1 new positions.*Tn=2"):  # fmt: skip
        step(cache, x[:, :2])
    plain = layer.clone(decode=True, rolling_cache=True, window=None)
    with pytest.raises(ValueError, match=r"rolling cache .* needs causal=True and a bounded"):
        plain.apply({"params": params, "cache": cache}, x[:, :1], x[:, :1], mutable=["cache"])


def _dense_multi_head(params, x, *, window, score_mod=None, mask_mod=None):
    """Causal windowed multi-head attention written from the definition (projections,
    ``q / sqrt(Dk)``, then the score function at absolute positions, the masks and the
    softmax), for one batch of full sequences."""
    p = params
    q, k, v = (
        jnp.einsum("btf,fhd->bhtd", x, p[n]["kernel"]) + p[n]["bias"][None, :, None, :]
        for n in ("query", "key", "value")
    )
    q = q * q.shape[-1] ** -0.5
    k, v = (jnp.repeat(a, q.shape[1] // a.shape[1], axis=1) for a in (k, v))  # GQA
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k)
    pos = jnp.arange(x.shape[1])
    q_pos, kv_pos = pos[:, None], pos[None, :]
    if score_mod is not None:
        scores = score_mod(scores, q_pos, kv_pos)
    seen = (kv_pos <= q_pos) & (kv_pos >= q_pos - window)
    if mask_mod is not None:
        seen = seen & mask_mod(q_pos, kv_pos)
    weights = jax.nn.softmax(jnp.where(seen, scores, scores - 1e9), axis=-1)
    heads = weights @ v
    return jnp.einsum("bhtv,hvo->bto", heads, p["out"]["kernel"]) + p["out"]["bias"][None, None]


@pytest.mark.parametrize(("mod", "per_sequence"), [("score_mod", False), ("mask_mod", True)])
def test_a_rolling_cache_gives_score_and_mask_functions_absolute_positions(rng, mod, per_sequence):
    """The rolling cache's slots are not positions: once it wraps around, slot ``s``
    holds position ``s + S * k``. A score function (ALiBi-like) or a mask function still
    sees each key's absolute position (with one cache_index, or one per sequence with
    grouped heads), so every decoded row equals the dense definition."""
    w, t = 3, 9
    x = _normal(rng, 2, t, 8)
    slopes = jnp.asarray([0.5, 0.25])[:, None, None]  # per head [H, 1, 1]

    def alibi(s, q_pos, kv_pos):  # explicit ranks (the suite raises on rank promotion)
        distance = (q_pos - kv_pos).astype(s.dtype)
        lift = lambda a: a.reshape((1,) * (s.ndim - a.ndim) + a.shape)  # noqa: E731
        return s - lift(slopes) * lift(distance)

    functions = {
        "score_mod": alibi,
        "mask_mod": lambda q_pos, kv_pos: q_pos - kv_pos != 1,  # hides the previous key
    }
    layer = MultiHeadDotAttention(
        num_heads=2, key_dim=4, num_kv_heads=1 if per_sequence else 2, causal=True,
        window=(w, 0), **{mod: functions[mod]},
    )  # fmt: skip
    params = layer.init(jax.random.key(0), x, x)["params"]
    want = _dense_multi_head(params, x, window=w, **{mod: functions[mod]})
    decoder = layer.clone(decode=True, rolling_cache=True, per_sequence_cache=per_sequence)
    cache = decoder.init(jax.random.key(0), x[:, : w + 1], x[:, : w + 1])["cache"]
    step = jax.jit(
        lambda cache, x_t: decoder.apply(
            {"params": params, "cache": cache}, x_t, x_t, mutable=["cache"]
        )
    )
    outs = []
    for i in range(t):
        out, variables = step(cache, x[:, i : i + 1])
        cache = variables["cache"]
        outs.append(out)
    assert_close(jnp.concatenate(outs, axis=1), want)


def test_a_rolling_cache_decodes_a_ragged_batch_in_chunks_nnx(rng):
    w, t = 2, 9
    lengths = np.array([3, 1])
    x = _normal(rng, 2, t, 8)
    model = fdnnx.MultiHeadDotAttention(
        2, 8, key_dim=4, num_kv_heads=1, causal=True, window=(w, 0), rngs=nnx.Rngs(0)
    )
    model.init_cache((2, w + 3, 8), per_sequence=True, rolling=True)  # chunks of <= 3
    prompt = np.zeros((2, 3, 8), np.float32)
    for i, n in enumerate(lengths):
        prompt[i, :n] = x[i, :n]
    step = nnx.jit(lambda m, chunk, n: m(chunk, chunk, new_length=n, decode=True))
    outs = [step(model, prompt, jnp.asarray(lengths, jnp.int32))]
    position = lengths.copy()
    for n_new in (2, 3, 1):  # chunks of 2, 3 and 1 new tokens per sequence
        chunk = jnp.stack([x[i, p : p + n_new] for i, p in enumerate(position)])
        outs.append(step(model, chunk, jnp.full(2, n_new, jnp.int32)))
        position += n_new
    for i, n in enumerate(lengths):
        decoded = jnp.concatenate([outs[0][i, :n], *(o[i] for o in outs[1:])])
        alone = x[i : i + 1, : position[i]]
        assert_close(decoded, model(alone, alone)[0])


@pytest.mark.parametrize(
    "seed", [1, 2, *(pytest.param(s, marks=pytest.mark.slow) for s in (0, 3, 4, 5))]
)
def test_the_row_check_equals_the_dense_mask_reduction(seed, monkeypatch):
    """Which rows see a key, from bands and prefix sums (or blocks of pairs), equals
    ``any`` over the dense mask the xla path builds."""
    from flax_dotattn._src import masks as masks_lib
    from flax_dotattn._src.modules import call as module_call
    from flax_dotattn._src.validation import check_call

    monkeypatch.setattr(module_call, "ROWS_BLOCK", 3)  # several blocks of pairs
    r = np.random.default_rng(seed)
    b, h, tq, tv = 2, 3, int(r.integers(1, 9)), int(r.integers(1, 12))
    q, kv = jnp.ones((b, h, tq, 4)), jnp.ones((b, h, tv, 4))
    window = None if r.random() < 0.3 else (int(r.integers(0, 4)), int(r.integers(0, 3)))
    arguments = dict(
        params=None, query=q, value=kv, causal=bool(r.random() < 0.6), window=window,
        masks=(r.random((b, 1, tq)) > 0.2, r.random((b, 1, tv)) > 0.4),
        query_offset=r.integers(0, 5, (b, 1)).astype(np.int32),
        kv_length=r.integers(1, tv + 1, (b, 1)).astype(np.int32),
    )  # fmt: skip
    if seed % 3 == 1:
        arguments["attention_mask"] = r.random((b, 1, 1, tv)) > 0.3  # key padding
    if seed % 3 == 2:
        arguments["attention_mask"] = r.random((b, h, tq, tv)) > 0.5
        arguments["segment_ids"] = (r.integers(0, 2, (b, 1, tq)), r.integers(0, 2, (b, 1, tv)))
    checked = check_call(arguments)
    seen = module_call.rows_with_keys(checked)
    inputs = checked.inputs
    positions = inputs.query_offset[..., None] + np.arange(tq)
    keep = masks_lib.keep_mask(
        jnp.asarray(positions), jnp.arange(tv), inputs.masking, causal=arguments["causal"],
        window=window, batch_ndim=2,
    )  # fmt: skip
    expected = np.broadcast_to(np.any(keep, -1) & inputs.query_mask, (b, h, tq))
    np.testing.assert_array_equal(np.broadcast_to(seen, (b, h, tq)), expected)
