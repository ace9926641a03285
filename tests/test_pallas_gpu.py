"""The Pallas GPU kernel (``jax.experimental.pallas.ops.gpu.attention.mha``) with Keras's
rules, run in Pallas interpret mode on CPU and checked against ``implementation="xla"``;
its lowering for ``cuda`` (exported from this CPU host) holds the Triton kernel.

Interpret mode is slow: shapes are tiny and each test compiles once.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close

from flax_dotattn import dot_attention, which_implementation
from flax_dotattn._src import dispatch, validation
from flax_dotattn._src.kernels import pallas_gpu
from flax_dotattn._src.kernels.fused_inputs import fold_scale

TRITON_CALL = "__gpu$xla.gpu.triton"


def pallas(params, query, value, key=None, masks=None, causal=False, **kwargs):
    """``dot_attention`` with ``implementation="pallas_gpu"`` (interpret mode on CPU)."""
    kwargs["implementation"] = "pallas_gpu"
    return dot_attention(params, query, value, key, masks, causal, **kwargs)


def xla(params, query, value, key=None, masks=None, causal=False, **kwargs):
    return dot_attention(params, query, value, key, masks, causal, implementation="xla", **kwargs)


def _qkv(rng, dtype, shape):
    return tuple(jnp.asarray(rng.normal(size=shape) * 0.5, dtype) for _ in range(3))


def test_causal_float32_matches_xla(rng):
    q, k, v = _qkv(rng, jnp.float32, (2, 16, 16))
    out = jax.jit(lambda q, k, v: pallas(None, q, v, k, causal=True))(q, k, v)
    assert_close(out, xla(None, q, v, k, causal=True))


def _packed_case(rng, dtype, t=24):
    """Scale, causal, two packed sequences per row, key padding equal to the query mask
    (row 0 padded after 20, so its last queries are dropped and see padding only), and a
    length (24) the kernel's blocks (32) pad."""
    q, k, v = _qkv(rng, dtype, (2, t, 16))
    lengths = jnp.array([[20], [t]])
    mask = jnp.arange(t)[None] < lengths  # [2, T]
    ids = jnp.asarray(np.repeat([[0] * 15 + [1] * (t - 15)], 2, 0), jnp.int32)
    kwargs = dict(masks=(mask, mask), causal=True, segment_ids=(ids, ids))
    return q, k, v, kwargs


@pytest.mark.slow
def test_values_and_gradients_equal_xla_in_float32(rng):
    q, k, v, kwargs = _packed_case(rng, jnp.float32)

    def loss(fn):
        def f(q, k, v, scale):
            out = fn({"scale": scale}, q, v, k, **kwargs)
            return jnp.sum(out * jnp.cos(out)), out

        return jax.grad(f, argnums=(0, 1, 2, 3), has_aux=True)

    scale = jnp.float32(0.7)
    ours, out = jax.jit(loss(pallas))(q, k, v, scale)
    ref, expected = jax.jit(loss(xla))(q, k, v, scale)
    assert_close(out, expected)
    for name, a, b in zip(("query", "key", "value", "scale"), ours, ref, strict=True):
        assert_close(a, b, factor=4), name


def test_segment_ids_without_causal_at_a_length_the_blocks_pad(rng):
    """Non-causal packed segments at T = 40 (padded to 64): the padded keys take an id
    below every segment's, so no row sees them (causal masking would hide them anyway)."""
    q, k, v = _qkv(rng, jnp.float32, (1, 40, 16))
    ids = jnp.asarray([[3] * 17 + [5] * 23], jnp.int32)  # the lowest id is not 0
    params = {"scale": jnp.float32(0.7)}
    out = jax.jit(lambda q, k, v: pallas(params, q, v, k, segment_ids=(ids, ids)))(q, k, v)
    assert_close(out, xla(params, q, v, k, segment_ids=(ids, ids)))


def test_a_learned_scale_runs_the_kernel_unless_it_cannot_be_folded(rng):
    """The run-time predicate for the kernel's numbers is that the learned scale folds
    into query and key (``fold_scale`` reports no overflow): true for an ordinary scale,
    false for one that overflows float16 even when balanced between them (then the
    chunked path runs). Both give equal numbers where both are finite, so only the
    predicate shows which runs."""
    q, k, v = _qkv(rng, jnp.float16, (1, 16, 16))

    def exact_and_overflow(scale):
        arguments = dict(params={"scale": jnp.float32(scale)}, query=q, value=v, key=k)
        inputs = validation.check_call(arguments).inputs
        operands = pallas_gpu.map_operands(inputs, pallas_gpu.shipped_blocks(16).length)
        assert operands.exact is not None  # a learned scale is checked at run time
        return bool(operands.exact), bool(fold_scale(q, k, inputs.scale)[2])

    assert exact_and_overflow(0.7) == (True, False)
    assert exact_and_overflow(1e12) == (False, True)  # |q * scale| / 2**20 ~ 1e6 > 65504


@pytest.mark.slow
def test_float16_and_bfloat16_values_equal_xla(rng):
    cases = {dtype: _packed_case(rng, dtype) for dtype in (jnp.bfloat16, jnp.float16)}

    @jax.jit
    def both(scale):
        return {
            jnp.dtype(d).name: pallas({"scale": scale}, q, v, k, **kw)
            for d, (q, k, v, kw) in cases.items()
        }

    outs = both(jnp.float32(0.7))
    for dtype, (q, k, v, kw) in cases.items():
        out = outs[jnp.dtype(dtype).name]
        assert out.dtype == dtype
        assert_close(out, xla({"scale": jnp.float32(0.7)}, q, v, k, **kw), dtype, factor=2)


@pytest.mark.slow
def test_rows_the_kernel_cannot_take_give_kerass_numbers(rng):
    # Key padding without the matching query mask (query 20.. keeps its row but not its
    # key), a row that sees no key at all, and ids that differ between queries and keys:
    # each falls back to the chunked path at run time, with Keras's numbers.
    q, k, v = _qkv(rng, jnp.float32, (3, 24, 16))
    value_mask = (jnp.arange(24)[None] < jnp.array([[20], [0], [24]])).at[2, 5].set(False)
    ids = jnp.zeros((3, 24), jnp.int32)

    @jax.jit
    def cases(q, k, v):
        return (
            pallas(None, q, v, k, (None, value_mask)),
            pallas(None, q, v, k, causal=True, segment_ids=(ids, ids.at[0, 3].set(1))),
        )

    padded, packed = cases(q, k, v)
    assert_close(padded, xla(None, q, v, k, (None, value_mask)))
    assert_close(packed, xla(None, q, v, k, causal=True, segment_ids=(ids, ids.at[0, 3].set(1))))


@pytest.mark.slow
def test_vmap_of_per_example_calls_with_grouped_heads_and_short_queries(rng):
    q = jnp.asarray(rng.normal(size=(3, 2, 12, 16)) * 0.5, jnp.float32)  # 2 query heads
    k, v = _qkv(rng, jnp.float32, (3, 1, 24, 16))[:2]  # ... share 1 key/value head
    mask = jnp.arange(24)[None, None] < jnp.array([[[24]], [[17]], [[9]]])  # [3, 1, 24]
    ids = jnp.zeros((3, 1, 24), jnp.int32).at[:, :, 6:].set(1)  # two packed sequences

    def one(q, k, v, m, ids):  # Tq = 12 < Tv = 24: queries against the first 12 keys' ids
        masks, segments = (m[:, :12], m), (ids[:, :12], ids)
        return pallas(None, q, v, k, masks, causal=True, segment_ids=segments)

    out = jax.jit(jax.vmap(one))(q, k, v, mask, ids)
    segments = (ids[..., :12], ids)
    expected = xla(None, q, v, k, (mask[..., :12], mask), causal=True, segment_ids=segments)
    assert_close(out, expected)


@pytest.mark.parametrize(
    "kwargs,reason",
    [
        (dict(bias=jnp.zeros((16, 16))), "bias"),
        (dict(window=(2, 2)), "window"),
        (dict(attention_mask=jnp.ones((16, 16), bool)), "pair attention_mask"),
        (dict(dtype=jnp.float64), "dtype float64"),
        (dict(d=8), "head sizes"),
        (dict(dv=32), "head sizes"),
        (dict(tq=20), "Tq=20 > Tv=16"),
        (dict(precision="highest"), "precision='highest'"),
        (dict(score_mode="concat"), "score_mode"),
        (dict(return_attention_scores=True), "weights"),
        (dict(dropout_rate=0.1, deterministic=False), "dropout"),
        (dict(query_offset=3), "query_offset"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_ineligible_calls_name_the_reason(kwargs, reason):
    kwargs = dict(kwargs)
    dtype = kwargs.pop("dtype", jnp.float32)
    tq, d, dv = kwargs.pop("tq", 16), kwargs.pop("d", 16), kwargs.pop("dv", 16)
    with jax.enable_x64(dtype == jnp.float64):
        q = jnp.zeros((tq, d), dtype)
        k, v = jnp.zeros((16, d), dtype), jnp.zeros((16, dv), dtype)
        params = {"concat_score_weight": 1.0} if kwargs.get("score_mode") == "concat" else None
        arguments = dict(params=params, query=q, value=v, key=k, dropout_rng=jax.random.key(0))
        call = validation.check_call(dict(arguments, **kwargs))
        assert reason in dispatch.ineligibility("pallas_gpu", call.inputs, call.options)


@pytest.mark.slow
def test_export_for_cuda_holds_the_triton_kernel_forward_and_gradient():
    # The automatic choice for cuda on a CPU host (no cuDNN to trace): float32 with
    # segment ids goes to the Pallas GPU kernel, lowered to Triton.
    shape = jax.ShapeDtypeStruct((2, 4, 256, 64), jnp.float32)  # [B, H, T, D]
    ids = jax.ShapeDtypeStruct((2, 4, 256), jnp.int32)

    def forward(q, k, v, ids):
        return dot_attention(None, q, v, k, causal=True, segment_ids=(ids, ids))

    def gradient(q, k, v, ids):
        return jax.grad(lambda q: forward(q, k, v, ids).astype(jnp.float32).sum())(q)

    checks = [jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
    for fn in (forward, gradient):
        exported = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)
        exported = exported(shape, shape, shape, ids)
        targets = set(re.findall(r"custom_call @([\w$.]+)", exported.mlir_module()))
        assert TRITON_CALL in targets, targets
    cpu = jax.jit(forward).lower(shape, shape, shape, ids).as_text()
    assert "triton" not in cpu  # lowered for this CPU: the interpret-mode branch only


@pytest.mark.parametrize(
    "kwargs,implementation,reason",
    [
        (dict(dtype=jnp.float32), "pallas_gpu", "cudnn: the backend is 'cpu'"),
        (dict(bias=jnp.zeros((1, 1, 2048))), "chunked", "pallas_gpu: bias given"),
        (dict(t=64), "xla", "pallas_gpu: Tv=64: shorter than one kernel block"),
        # the kernel pads the queries to the keys' length: 16 queries would cost 2048
        (dict(dtype=jnp.float32, tq=16), "xla", "pallas_gpu: Tq=16: the kernel would pad"),
        (dict(dtype=jnp.float32, tq=1100), "pallas_gpu", "the Pallas GPU kernel takes"),
    ],
    ids=["float32", "bias", "short", "short_queries", "half_the_keys"],
)
def test_the_cuda_plan_names_the_kernel_and_why(kwargs, implementation, reason):
    kwargs = dict(kwargs)
    dtype, t = kwargs.pop("dtype", jnp.bfloat16), kwargs.pop("t", 2048)
    q = jnp.zeros((2, kwargs.pop("tq", t), 64), dtype)
    v = jnp.zeros((2, t, 64), dtype)
    plan = which_implementation(None, q, v, causal=True, platform="cuda", **kwargs)
    assert plan.implementation == implementation and reason in plan.reason, plan


@pytest.mark.slow
def test_forward_mode_and_second_order_equal_xla(rng):
    # jax.jvp and jax.hessian go through the chunked path's tangent (the kernel's
    # custom_jvp), jax.grad inside the hessian through the kernel's backward.
    q, k, v = _qkv(rng, jnp.float32, (1, 16, 16))

    def derivatives(fn):
        def both(s, dq):  # s scales the query: no learned scale, so no runtime check
            def attend(s, q):
                return fn(None, q * s, v, k, causal=True)

            tangent = jax.jvp(lambda q: attend(s, q), (q,), (dq,))[1]
            return tangent, jax.hessian(lambda s: jnp.sum(jnp.sin(attend(s, q))))(s)

        return jax.jit(both)

    args = (jnp.float32(0.7), jnp.asarray(rng.normal(size=q.shape), jnp.float32))
    for a, b in zip(derivatives(pallas)(*args), derivatives(xla)(*args), strict=True):
        assert_close(a, b, factor=4)
