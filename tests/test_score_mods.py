"""``score_mod`` and ``mask_mod`` against dense references written from their definitions:
values, gradients (into the arrays the functions close over) and ``jvp`` on xla and
chunked, under ``jit`` and ``vmap``; block maps of mask functions; global positions under
sequence parallelism; modules and configs; bad functions; and the recipes of
:mod:`flax_dotattn.mods` equal to the built-ins they restate (a seeded property that
fails when a position is broken on purpose)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close
from jax.sharding import Mesh

from flax_dotattn import (
    DotAttention,
    DotAttentionConfig,
    dot_attention,
    mods,
    sequence_parallel_attention,
    which_implementation,
)
from flax_dotattn._src.mods import EMPTY, FULL, PARTIAL, classify


def dense(query, key, value, *, bias=None, keep=None):
    """Attention from the definition: logits plus a dense bias, 1e9 subtracted where
    ``keep`` is False, softmax, weighted sum."""
    s = jnp.einsum("...qd,...kd->...qk", query, key, precision="highest")
    if bias is not None:
        s = s + bias
    if keep is not None:
        s = jnp.where(keep, s, s - 1e9)
    return jnp.einsum("...qk,...kd->...qd", jax.nn.softmax(s, -1), value, precision="highest")


def _normal(rng, shape, scale=1.0):
    return jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)


def _alibi_bias(slopes, tq, tv, offset=0):
    """ALiBi's dense bias ``-slope * (i - j)`` with query ``i`` at ``offset + i``."""
    distance = (offset + jnp.arange(tq))[:, None] - jnp.arange(tv)[None, :]
    return -slopes * distance.reshape((1,) * (slopes.ndim - 2) + distance.shape)


def _causal(tq, tv, offset=0):
    return jnp.arange(tv)[None, :] <= (offset + jnp.arange(tq))[:, None]


@pytest.mark.parametrize(
    "implementation, block_size",
    [pytest.param("xla", None, marks=pytest.mark.slow), ("chunked", (4, 3))],
    ids=["xla", "chunked"],
)
def test_alibi_equals_its_dense_bias_in_values_gradients_and_jvp(rng, implementation, block_size):
    """Grouped-query heads ``[B, Hkv, G, T, D]``, slopes per head ``[Hkv, G, 1, 1]``, a
    query offset; gradients reach the slopes."""
    q = _normal(rng, (2, 2, 2, 7, 4))
    kv = _normal(rng, (2, 2, 1, 10, 4))
    slopes = jnp.asarray(rng.uniform(0.1, 1.0, (2, 2, 1, 1)), jnp.float32)
    keep = _causal(7, 10, offset=3)

    def ours(slopes, q, kv):
        return dot_attention(
            None, q, kv, causal=True, query_offset=3, score_mod=mods.alibi(slopes),
            implementation=implementation, block_size=block_size, precision="highest",
        )  # fmt: skip

    def theirs(slopes, q, kv):
        return dense(q, kv, kv, bias=_alibi_bias(slopes, 7, 10, offset=3)[None], keep=keep)

    args = (slopes, q, kv)
    assert_close(ours(*args), theirs(*args))
    cot = _normal(rng, (2, 2, 2, 7, 4))
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(ours(*a) * cot), argnums=(0, 1, 2)))(*args)
    wants = jax.grad(lambda *a: jnp.sum(theirs(*a) * cot), argnums=(0, 1, 2))(*args)
    for got, want in zip(grads, wants, strict=True):
        assert_close(got, want, factor=4)
    tangents = tuple(_normal(rng, x.shape) for x in args)
    assert_close(jax.jvp(ours, args, tangents)[1], jax.jvp(theirs, args, tangents)[1], factor=4)


@pytest.mark.slow
def test_vmap_over_the_closed_over_array_and_per_example_gradients(rng):
    q, kv = _normal(rng, (2, 9, 4)), _normal(rng, (2, 11, 4))
    slopes = jnp.asarray(rng.uniform(0.1, 1.0, (3, 1, 1, 1)), jnp.float32)  # 3 mapped

    def loss(slope, implementation):
        out = dot_attention(None, q, kv, causal=True, score_mod=mods.alibi(slope),
                            implementation=implementation, block_size=(4, 3))  # fmt: skip
        return jnp.sum(jnp.sin(out))

    for fn in (loss, jax.grad(loss)):
        got = jax.jit(jax.vmap(lambda s, fn=fn: fn(s, "chunked")))(slopes)
        want = jax.vmap(lambda s, fn=fn: fn(s, "xla"))(slopes)
        assert_close(got, want, factor=4)


@pytest.mark.slow
def test_t5_buckets_learn_their_table_on_the_chunked_path(rng):
    q, kv = _normal(rng, (1, 2, 12, 4)), _normal(rng, (1, 2, 12, 4))
    table = _normal(rng, (2, 8))
    rel = jnp.arange(12)[None, :] - jnp.arange(12)[:, None]  # kv - q
    bucket = mods.relative_position_bucket(rel, num_buckets=8, max_distance=16)

    def ours(table):
        mod = mods.t5_bias(table, max_distance=16)
        return dot_attention(None, q, kv, score_mod=mod, implementation="chunked",
                             block_size=(5, 4))  # fmt: skip

    def theirs(table):
        return dense(q, kv, kv, bias=table[:, bucket][None])

    assert_close(ours(table), theirs(table))
    grads = [jax.grad(lambda t, f=f: f(t).sum())(table) for f in (ours, theirs)]
    assert_close(*grads, factor=4)


@pytest.mark.parametrize("traced", [False, True], ids=["while-tracing", "run-time"])
def test_prefix_lm_mask_equals_its_dense_mask(rng, traced):
    """A per-example prefix ``[B, 1, 1]``; concrete, it is classified while tracing, traced
    (an argument of the jitted function), at run time."""
    q, kv = _normal(rng, (2, 11, 4)), _normal(rng, (2, 11, 4))
    prefix = np.array([3, 7]).reshape(2, 1, 1)
    i = np.arange(11)
    keep = (i[None, None, :] < prefix) | (i[None, :] <= i[:, None])[None]
    want = dense(q, kv, kv, keep=keep)

    def run(prefix):
        return dot_attention(None, q, kv, mask_mod=mods.prefix_lm(prefix),
                             implementation="chunked", block_size=(3, 4))  # fmt: skip

    got = jax.jit(run)(jnp.asarray(prefix)) if traced else run(prefix)
    assert_close(got, want)
    assert_close(dot_attention(None, q, kv, mask_mod=mods.prefix_lm(prefix)), want)


def test_block_maps_classify_every_block_and_skip_traced_functions():
    table = classify(mods.prefix_lm(2), np.zeros((), np.int32), 0, 8, 8, (4, 2), ())
    assert table is not None
    # Query rows 0-3 see keys 0-3 (prefix 2, then causal); rows 4-7 see keys 0-7.
    np.testing.assert_array_equal(
        table.states, [[FULL, PARTIAL, EMPTY, EMPTY], [FULL, FULL, PARTIAL, PARTIAL]]
    )
    assert table.first.tolist() == [0, 0] and table.last.tolist() == [1, 3]
    assert table.steps == 4

    seen = []

    @jax.jit
    def traced(n):  # a prefix that is traced: left to run time
        seen.append(classify(mods.prefix_lm(n), np.zeros((), np.int32), 0, 8, 8, (4, 2), ()))
        return n

    traced(2)
    assert seen == [None]


@pytest.mark.slow
def test_sequence_parallel_shards_see_global_positions(rng):
    q, kv = _normal(rng, (2, 8, 4)), _normal(rng, (2, 16, 4))
    mesh = Mesh(np.array(jax.devices()[:4]), ("seq",))
    slope = jnp.float32(0.3)
    prefix = mods.prefix_lm(5)
    keep = (jnp.arange(16)[None, :] < 5) | _causal(8, 16)

    def ours(slope):
        return sequence_parallel_attention(
            None, q, kv, score_mod=mods.alibi(slope, causal=False), mask_mod=prefix,
            mesh=mesh, axis_name="seq", block_size=(4, 3),
        )  # fmt: skip

    def theirs(slope):
        bias = -slope * jnp.abs(jnp.arange(8)[:, None] - jnp.arange(16)[None, :])
        return dense(q, kv, kv, bias=bias[None], keep=keep)

    assert_close(jax.jit(ours)(slope), theirs(slope))
    grads = [jax.jit(jax.grad(lambda s, f=f: f(s).sum()))(slope) for f in (ours, theirs)]
    assert_close(*grads, factor=4)


def test_fused_kernels_pass_the_functions_over_and_say_why():
    q = jnp.ones((1, 2048, 128), jnp.bfloat16)
    plan = which_implementation(None, q, q, score_mod=mods.soft_cap(5.0), platform="tpu")
    assert plan.implementation == "chunked"
    assert "pallas_tpu: score_mod given" in plan.reason
    plan = which_implementation(None, q, q, mask_mod=mods.causal(), platform="cuda")
    assert "pallas_gpu: mask_mod given" in plan.reason
    with pytest.raises(ValueError, match=r"pallas_tpu.*mask_mod"):
        which_implementation(None, q, q, mask_mod=mods.causal(), implementation="pallas_tpu")


BAD_FUNCTIONS = {
    "score_mod-shape": (
        {"score_mod": lambda s, qp, kp: s.sum(-1)}, "must return scores of the shape"),
    "score_mod-dtype": ({"score_mod": lambda s, qp, kp: s > 0}, "must return floating scores"),
    "score_mod-python-if": (
        {"score_mod": lambda s, qp, kp: s if qp > kp else -s}, "score_mod must be vectorised"),
    "mask_mod-not-bool": ({"mask_mod": lambda qp, kp: qp - kp}, "mask_mod must return bool"),
    "mask_mod-scalar": ({"mask_mod": lambda qp, kp: True}, "broadcastable to"),
    "mask_mod-python-and": (
        {"mask_mod": lambda qp, kp: (kp <= qp) and (kp >= 0)}, "mask_mod must be vectorised"),
    "not-callable": ({"score_mod": 3}, "score_mod must be None, a function"),
    "unknown-name": ({"mask_mod": "no-such-mod"}, "registered function"),
}  # fmt: skip


@pytest.mark.parametrize("implementation", ["xla", "chunked"])
@pytest.mark.parametrize("case", list(BAD_FUNCTIONS), ids=list(BAD_FUNCTIONS))
def test_bad_functions_get_a_clear_error_while_tracing(case, implementation):
    kwargs, message = BAD_FUNCTIONS[case]
    q = jnp.ones((2, 5, 4))
    with pytest.raises(ValueError, match=message):
        jax.jit(lambda q: dot_attention(None, q, q, implementation=implementation, **kwargs))(q)


def test_modules_take_functions_and_configs_record_them_by_registered_name(rng):
    q = _normal(rng, (2, 6, 4))
    slopes = mods.alibi_slopes(1)[:, None, None]
    alibi = mods.register("test-alibi-1", mods.alibi(slopes))
    layer = DotAttention(score_mod=alibi, mask_mod=mods.sliding_window(2, 0))
    got = layer.apply(layer.init(jax.random.key(0), q, q), q, q)
    want = dot_attention(None, q, q, score_mod=alibi, window=(2, 0), causal=True)
    assert_close(got, want)
    with pytest.raises(ValueError, match="cannot serialise mask_mod"):
        layer.config.to_dict()
    config = DotAttentionConfig(score_mod=alibi)
    assert config.to_dict()["score_mod"] == "test-alibi-1"
    assert DotAttentionConfig.from_dict(config.to_dict()) == config
    assert DotAttentionConfig(score_mod="test-alibi-1").score_mod is alibi
    with pytest.raises(ValueError, match="Keras's attention layers take no score_mod"):
        config.to_keras()
    with pytest.raises(ValueError, match="already registered"):
        mods.register("test-alibi-1", mods.alibi(slopes))


# -- one source of truth: the built-ins written as functions ------------------------------


def _draw(seed):
    """One random call: odd lengths, blocks, an offset, grouped-query heads or not, and
    the built-in arguments with the functions that restate them."""
    r = np.random.default_rng(seed)
    tq, tv = int(r.integers(3, 20)), int(r.integers(3, 24))
    offset = int(r.integers(0, 6))
    grouped = bool(r.integers(2))
    batch, kv_batch = ((2, 2), (2, 1)) if grouped else ((2,), (2,))
    q = jnp.asarray(r.standard_normal(batch + (tq, 4)), jnp.float32)
    kv = jnp.asarray(r.standard_normal(kv_batch + (tv, 4)), jnp.float32)
    block = (int(r.integers(1, 8)), int(r.integers(1, 8)))
    left = int(r.integers(0, 6))
    ids = jnp.asarray(np.sort(r.integers(0, 3, (2,) + (1,) * (len(batch) - 1) + (tv,))), jnp.int32)
    bias = jnp.asarray(r.standard_normal((1,) * len(batch) + (tq, tv)), jnp.float32)
    return q, kv, offset, block, left, ids, bias


def _restated(q, kv, offset, block, left, ids, bias, shift=0):
    """Pairs (built-ins, functions) for one draw; ``shift`` breaks the functions'
    positions on purpose."""

    def positions(fn):
        return lambda *a: fn(*a[:-2], a[-2] + shift, a[-1])

    def add_bias(s, q_pos, kv_pos):
        rows = jnp.clip(q_pos[:, 0] - offset, 0, bias.shape[-2] - 1)
        cols = jnp.clip(kv_pos[0], 0, bias.shape[-1] - 1)
        return s + jnp.take(jnp.take(bias, rows, axis=-2), cols, axis=-1)

    # the queries' ids at their absolute positions (clipped at the keys' end, as the mod reads)
    q_ids = jnp.take(ids, jnp.clip(offset + jnp.arange(q.shape[-2]), 0, ids.shape[-1] - 1), -1)
    cases = [
        ({"causal": True}, {"mask_mod": positions(mods.causal())}),
        ({"window": (left, 1)}, {"mask_mod": positions(mods.sliding_window(left, 1))}),
        ({"bias": bias}, {"score_mod": positions(add_bias)}),
    ]
    cases.append(({"segment_ids": (q_ids, ids)}, {"mask_mod": positions(mods.document(ids))}))
    return cases


@pytest.mark.parametrize("seed", [0] + [pytest.param(s, marks=pytest.mark.slow) for s in (1, 2)])
def test_builtins_written_as_functions_give_the_same_numbers(seed):
    q, kv, offset, block, *_ = draw = _draw(seed)
    for builtin, restated in _restated(*draw):
        common = dict(query_offset=offset, implementation="chunked", block_size=block)
        want = _jitted(q, kv, **builtin, **common)
        assert_close(_jitted(q, kv, **restated, **common), want, factor=2)
        assert_close(_jitted(q, kv, **restated, query_offset=offset), want, factor=2)


def _jitted(q, kv, **kwargs):
    """``dot_attention(None, q, kv, **kwargs)`` under ``jax.jit`` (the keywords closed
    over): an eager call dispatches every primitive of the kernel on its own."""
    return jax.jit(lambda q, kv: dot_attention(None, q, kv, **kwargs))(q, kv)


def test_a_function_off_by_one_position_differs():
    """The property above is not vacuous: one position off changes every case."""
    for seed in range(1):
        q, kv, offset, block, *_ = draw = _draw(seed)
        for builtin, restated in _restated(*draw, shift=1):
            common = dict(query_offset=offset, implementation="chunked", block_size=block)
            want = _jitted(q, kv, **builtin, **common)
            got = _jitted(q, kv, **restated, **common)
            assert float(jnp.max(jnp.abs(got - want))) > 1e-3, builtin.keys()


def test_recipes_equal_the_builtins_they_restate(rng):
    q, kv = _normal(rng, (1, 3, 9, 4), 3.0), _normal(rng, (1, 3, 9, 4), 3.0)
    capped = dot_attention(None, q, kv, logits_soft_cap=2.0, causal=True)
    assert_close(dot_attention(None, q, kv, score_mod=mods.soft_cap(2.0), causal=True), capped)
    slopes = mods.alibi_slopes(3)[:, None, None]
    i = np.arange(9)
    bias = -slopes * np.abs(i[:, None] - i[None, :])
    got = dot_attention(None, q, kv, score_mod=mods.alibi(slopes, causal=False))
    assert_close(got, dot_attention(None, q, kv, bias=bias[None]))
    assert mods.alibi_slopes(6).shape == (6,)


def test_blocks_a_mask_function_hides_are_never_computed(rng):
    """A block-causal mask aligned with the kernel's blocks, and a score function that is
    NaN on every hidden block: one computed hidden block would make the output NaN."""
    q, kv = _normal(rng, (2, 12, 4)), _normal(rng, (2, 12, 4))

    def mask_mod(q_pos, kv_pos):
        return kv_pos // 4 <= q_pos // 4

    def score_mod(s, q_pos, kv_pos):
        return jnp.where(kv_pos // 4 <= q_pos // 4, s, jnp.nan)

    def ours(q, kv):
        return dot_attention(None, q, kv, score_mod=score_mod, mask_mod=mask_mod,
                             implementation="chunked", block_size=(4, 4))  # fmt: skip

    i = jnp.arange(12)
    want = dense(q, kv, kv, keep=(i[None, :] // 4 <= i[:, None] // 4)[None])
    assert_close(ours(q, kv), want)
    grads = jax.grad(lambda q, kv: jnp.sum(ours(q, kv) ** 2), argnums=(0, 1))(q, kv)
    wants = jax.grad(lambda q, kv: jnp.sum(dense(q, kv, kv, keep=(
        i[None, :] // 4 <= i[:, None] // 4)[None]) ** 2), argnums=(0, 1))(q, kv)  # fmt: skip
    for got, expected in zip(grads, wants, strict=True):
        assert_close(got, expected, factor=4)


def test_a_row_that_sees_no_key_still_averages_every_key_with_a_score_function(rng):
    """Keras's rule with a score function: a row whose keys are all masked takes the
    softmax of every (modded) logit minus 1e9, on the chunked path as on xla."""
    q, kv = _normal(rng, (2, 9, 4)), _normal(rng, (2, 10, 4))
    value_mask = jnp.array([[False] * 10, [True] * 3 + [False] * 7])
    kwargs = dict(score_mod=mods.alibi(0.5, causal=False), causal=True, precision="highest")
    got = dot_attention(None, q, kv, None, (None, value_mask), implementation="chunked",
                        block_size=(2, 3), **kwargs)  # fmt: skip
    want = dot_attention(None, q, kv, None, (None, value_mask), implementation="xla", **kwargs)
    assert_close(got, want)


def test_multi_head_modules_take_the_functions(rng):
    from flax import nnx

    from flax_dotattn import MultiHeadDotAttention
    from flax_dotattn import nnx as fdnnx

    x = _normal(rng, (2, 7, 8))
    layer = MultiHeadDotAttention(num_heads=4, key_dim=4, num_kv_heads=2, causal=True)
    variables = layer.init(jax.random.key(0), x, x)
    want = layer.apply(variables, x, x)
    as_mod = MultiHeadDotAttention(num_heads=4, key_dim=4, num_kv_heads=2, mask_mod=mods.causal())
    assert_close(as_mod.apply(variables, x, x), want)
    zero = MultiHeadDotAttention(num_heads=4, key_dim=4, num_kv_heads=2, causal=True,
                                 score_mod=mods.alibi(jnp.zeros((2, 2, 1, 1))))  # fmt: skip
    assert_close(zero.apply(variables, x, x), want)  # [Hkv, G, 1, 1] slopes of 0
    module = fdnnx.MultiHeadDotAttention(4, 8, 4, mask_mod=mods.causal(), rngs=nnx.Rngs(0))
    assert module.config.mask_mod is not None
