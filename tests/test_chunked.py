"""The chunked path equals the materialised path, in values and gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close
from jax.test_util import check_grads

from flax_dotattn import dot_attention, which_implementation
from flax_dotattn._src import dispatch, validation

BLOCK = (8, 16)  # small blocks so a few dozen positions span several, with padding


def _inputs(rng, batch=(2,), tq=21, tv=37, d=6, dv=5, dtype=jnp.float32):
    def arr(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32).astype(dtype)

    q, k, v = arr(*batch, tq, d), arr(*batch, tv, d), arr(*batch, tv, dv)
    qm = jnp.asarray(rng.random((*batch, tq)) > 0.2)
    vm = jnp.asarray(rng.random((*batch, tv)) > 0.3)
    return q, k, v, qm, vm


def _params(score_mode, use_scale=True):
    params = {"scale": jnp.float32(0.7)} if use_scale else {}
    if score_mode == "concat":
        params["concat_score_weight"] = jnp.float32(-1.2)
    return params


def _both(params, q, v, k, masks, causal, score_mode, **kwargs):
    """xla's and chunked's outputs, each jitted (one compile, not one per operation)."""

    @functools.partial(jax.jit, static_argnums=0)
    def run(implementation, params, q, v, k, masks):
        blocks = {"block_size": BLOCK} if implementation == "chunked" else {}
        return dot_attention(
            params, q, v, k, masks, causal, score_mode=score_mode,
            implementation=implementation, **blocks, **kwargs,
        )  # fmt: skip

    return run("xla", params, q, v, k, masks), run("chunked", params, q, v, k, masks)


FEATURES = [
    dict(id="plain"),
    dict(id="causal", causal=True),
    dict(id="query_mask", masks="q"),
    dict(id="value_mask", masks="v"),
    dict(id="both_masks_causal", masks="qv", causal=True),
    dict(id="fully_masked_rows", masks="v_prefix", causal=True),
    dict(id="all_keys_masked", masks="v_none"),
    dict(id="no_scale", use_scale=False),
]


def _masks(kind, qm, vm):
    if kind is None:
        return None
    if kind == "v_prefix":  # rows before key 25 are fully masked under causal
        return (None, vm.at[..., :25].set(False))
    if kind == "v_none":
        return (qm, jnp.zeros_like(vm))
    return (qm if "q" in kind else None, vm if "v" in kind else None)


@pytest.mark.parametrize("score_mode", ["dot", pytest.param("concat", marks=pytest.mark.slow)])
@pytest.mark.parametrize("feature", FEATURES, ids=lambda f: f["id"])
def test_values_and_gradients_match_materialised(feature, score_mode, rng):
    q, k, v, qm, vm = _inputs(rng)
    masks = _masks(feature.get("masks"), qm, vm)
    causal = feature.get("causal", False)
    params = _params(score_mode, feature.get("use_scale", True))
    expected, out = _both(params, q, v, k, masks, causal, score_mode)
    assert out.shape == expected.shape
    assert_close(out, expected, factor=2)

    def loss(impl, params, q, k, v):
        kwargs = {"block_size": BLOCK} if impl == "chunked" else {}
        out = dot_attention(
            params, q, v, k, masks, causal, score_mode=score_mode, implementation=impl, **kwargs
        )
        return jnp.sum(out * jnp.cos(out))  # a loss with a non-trivial cotangent

    grad = jax.jit(jax.grad(loss, argnums=(1, 2, 3, 4)), static_argnums=0)
    g_ref, g = grad("xla", params, q, k, v), grad("chunked", params, q, k, v)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(b).max()))


@pytest.mark.slow
@pytest.mark.parametrize("tq,tv", [(1, 1), (1, 40), (40, 1), (16, 16), (33, 7), (8, 64)], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_any_lengths_and_blocks(tq, tv, causal, rng):
    q, k, v, _, vm = _inputs(rng, tq=tq, tv=tv)
    expected, out = _both(None, q, v, k, (None, vm), causal, "dot")
    assert_close(out, expected, factor=2)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
def test_low_precision_matches_and_keeps_dtype(dtype, rng):
    q, k, v, qm, vm = _inputs(rng, dtype=dtype)
    masks = (qm, vm.at[0].set(False))
    expected, out = _both(_params("dot"), q, v, k, masks, True, "dot")
    assert out.dtype == dtype
    assert np.isfinite(np.asarray(out, np.float32)).all()
    assert_close(out, expected, dtype)
    grads = jax.grad(
        lambda q: (
            dot_attention(None, q, v, k, masks, True, implementation="chunked", block_size=BLOCK)
            .astype(jnp.float32)
            .sum()
        )
    )(q)
    assert grads.dtype == dtype and np.isfinite(np.asarray(grads, np.float32)).all()


def test_nd_batch_dims_and_rank_2_under_vmap(rng):
    q, k, v, qm, vm = _inputs(rng, batch=(2, 3))
    expected, out = _both(None, q, v, k, (qm, vm), True, "dot")
    assert out.shape == (2, 3, 21, 5)
    assert_close(out, expected, factor=2)
    per_example = jax.vmap(
        jax.vmap(
            lambda q, k, v, qm, vm: dot_attention(
                None, q, v, k, (qm, vm), True, implementation="chunked", block_size=BLOCK
            )
        )
    )(q, k, v, qm, vm)
    assert_close(per_example, expected, factor=2)


def test_check_grads_through_the_custom_jvp(rng):
    q, k, v, qm, vm = _inputs(rng, batch=(1,), tq=9, tv=11, d=3, dv=2)

    def f(q, k, v, scale, weight):
        return dot_attention(
            {"scale": scale, "concat_score_weight": weight},
            q,
            v,
            k,
            (qm, vm),
            True,
            score_mode="concat",
            implementation="chunked",
            block_size=(4, 4),
        )

    check_grads(
        f,
        (q * 0.5, k * 0.5, v, jnp.float32(0.9), jnp.float32(1.1)),
        order=1,
        modes=("rev",),
        atol=2e-2,
        rtol=2e-2,
        eps=1e-2,
    )


def test_causality_through_gradients(rng):
    q, k, v, _, _ = _inputs(rng, batch=(), tq=20, tv=20)
    for i in (0, 7, 19):
        g = jax.grad(
            lambda k, i=i: dot_attention(
                None, q, v, k, causal=True, implementation="chunked", block_size=BLOCK
            )[i].sum()
        )(k)
        assert np.all(np.asarray(g)[i + 1 :] == 0.0)
        # (Row 0 sees key 0 alone: weight 1 whatever the key, so no gradient there.)
        assert i == 0 or np.any(np.asarray(g)[: i + 1] != 0.0)


# -- dropout ------------------------------------------------------------------------------


def _dropout_run(rate, seed, shape=(4, 64, 96)):
    q = jnp.zeros(shape[:-1] + (4,))  # zero logits: uniform weights 1/Tv
    k = jnp.ones(shape[:-2] + (shape[-1], 4))
    v = jnp.eye(shape[-1])[None].repeat(shape[0], 0)  # output column j = weight of key j
    return dot_attention(
        None,
        q,
        v,
        k,
        dropout_rate=rate,
        dropout_rng=jax.random.key(seed),
        deterministic=False,
        implementation="chunked",
        block_size=(16, 32),
    )


@pytest.mark.parametrize("rate", [0.2, 0.6])
def test_dropout_statistics_and_reproducibility(rate):
    w = np.asarray(_dropout_run(rate, 0))
    assert abs(np.mean(w == 0.0) - rate) < 0.015
    np.testing.assert_allclose(w[w != 0.0], 1.0 / 96 / (1.0 - rate), rtol=1e-5)
    assert abs(w.sum(-1).mean() - 1.0) < 0.02
    np.testing.assert_array_equal(w, _dropout_run(rate, 0))
    assert np.any(w != np.asarray(_dropout_run(rate, 1)))


def test_dropout_gradients_are_consistent(rng):
    q, k, v, _, vm = _inputs(rng, batch=(1,), tq=9, tv=11, d=3, dv=2)
    f = lambda q, k, v: dot_attention(  # noqa: E731
        None,
        q,
        v,
        k,
        (None, vm),
        True,
        dropout_rate=0.3,
        dropout_rng=jax.random.key(4),
        deterministic=False,
        implementation="chunked",
        block_size=(4, 4),
    )
    check_grads(f, (q, k, v), order=1, modes=("rev",), atol=2e-2, rtol=2e-2, eps=1e-2)


# -- dispatch ----------------------------------------------------------------------------


def test_chunked_cannot_return_weights():
    q = jnp.ones((4, 3))
    with pytest.raises(
        ValueError,
        match=r"'chunked' cannot run these inputs: the weights are requested \(it never forms",
    ):
        dot_attention(None, q, q, implementation="chunked", return_attention_scores=True)


def _uses_chunked(*shapes, **kwargs):
    """Whether the call lowered for this (CPU) host runs the chunked kernel's block loop
    (the jaxpr also holds the other platforms' branches; lowering keeps this one's)."""
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    lowered = jax.jit(lambda q, v: dot_attention(None, q, v, **kwargs)).lower(*args)
    return "stablehlo.while" in lowered.as_text()


def test_automatic_dispatch_by_size_and_features():
    small, big = (8, 128, 64), (1, 4096, 64)
    assert not _uses_chunked(small, small)
    assert _uses_chunked(big, big)
    assert not _uses_chunked(big, big, return_attention_scores=True)  # falls back to xla
    assert _uses_chunked(small, small, implementation="chunked")
    inputs = validation.check_inputs(
        None, jnp.ones((2048, 8)), jnp.ones((2048, 8)), None, None, "dot"
    )
    assert dispatch.materialised_bytes(inputs, "dot") == 2048 * 2048 * 4  # per sequence
    assert _uses_chunked((64, 512, 8), (64, 512, 8)) == _uses_chunked((512, 8), (512, 8))


def test_the_shipped_crossover_lies_between_724_and_725_and_the_reason_tells_them_apart():
    # 2 MiB of float32 scores: 724 * 724 * 4 bytes is just under it, 725 * 725 * 4 over.
    plans = {t: which_implementation(None, jnp.ones((t, 8)), jnp.ones((t, 8))) for t in (724, 725)}
    assert [p.implementation for p in plans.values()] == ["xla", "chunked"]
    assert plans[724].reason.endswith("1.99957 MiB < 2 MiB"), plans[724].reason
    assert plans[725].reason.endswith("2.01 MiB >= 2 MiB"), plans[725].reason


def test_block_size_is_validated():
    q = jnp.ones((4, 3))
    for bad in (0, -1, 2.5, (4,), (4, 0), True):
        with pytest.raises(ValueError, match="block_size must be None, a positive"):
            dot_attention(None, q, q, implementation="chunked", block_size=bad)


def test_vmapped_and_batched_calls_take_the_same_path_at_the_same_cost(rng):
    # The dispatcher reads one sequence's size, and the chunked kernel takes a vmapped
    # axis into its batch, so vmap of a per-example call compiles to what the batched
    # call compiles to (the report: 835 vs 304 MiB).
    q, k, v = (jnp.asarray(rng.normal(size=(2, 768, 16)) * 0.3, jnp.float32) for _ in range(3))
    vm = jnp.asarray(rng.random((2, 768)) > 0.1)
    plans = []

    def loss(q, k, v, vm):
        plans.append(which_implementation(None, q, v, k, (None, vm), causal=True))
        return jnp.sum(dot_attention(None, q, v, k, (None, vm), causal=True) ** 2)

    batched = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    per_example = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1, 2))))
    for a, b in zip(batched(q, k, v, vm), per_example(q, k, v, vm), strict=True):
        assert_close(b, a)
    assert [p.implementation for p in plans] == ["chunked", "chunked"]

    def temp_bytes(f):
        return f.lower(q, k, v, vm).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(per_example) <= 1.1 * temp_bytes(batched)


@pytest.mark.slow
def test_vmap_over_dropout_keys_and_scales_matches_a_python_loop(rng):
    # Per-element keys or scalars cannot join the kernel's batch: the fallback (JAX's own
    # vectorisation) must still give each element's own result and derivatives.
    q = jnp.asarray(rng.normal(size=(2, 24, 4)), jnp.float32)
    keys = jax.random.split(jax.random.key(0), 2)
    scales = jnp.asarray([0.5, 2.0], jnp.float32)

    def f(key, scale, q):
        out = dot_attention(
            {"scale": scale}, q, q, causal=True, dropout_rate=0.3, deterministic=False,
            dropout_rng=key, implementation="chunked", block_size=(8, 8),
        )  # fmt: skip
        return jnp.sum(out**2)

    grad = jax.jit(jax.grad(f, argnums=(1, 2)))
    mapped = jax.jit(jax.vmap(grad))(keys, scales, q)
    looped = [grad(keys[i], scales[i], q[i]) for i in range(2)]
    for got, want in zip(mapped, zip(*looped, strict=True), strict=True):
        assert_close(got, jnp.stack(want))
