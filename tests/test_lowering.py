"""One traced call lowers per platform: exported for TPU from this CPU host, the automatic
choice holds splash attention's TPU kernel (``tpu_custom_call``) where it is eligible, and
not otherwise; lowered for CPU it never does. Shapes only (``jax.ShapeDtypeStruct``): no
data, nothing runs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from flax_dotattn import DotAttention, dot_attention, sequence_parallel_attention

S = jax.ShapeDtypeStruct
#: A training shape: [B, H, T, D] bfloat16, segment ids [B, 1, T].
QUERY = S((4, 8, 2048, 128), jnp.bfloat16)
IDS = S((4, 1, 2048), jnp.int32)
TPU_KERNEL = "tpu_custom_call"


def _module_text(fn, *args, platform="tpu"):
    return jax.export.export(jax.jit(fn), platforms=[platform])(*args).mlir_module()


def _causal_window_segments(query, key, value, ids, scale):
    return dot_attention(
        {"scale": scale}, query, value, key, causal=True, window=(256, 0), segment_ids=(ids, ids)
    )


@pytest.mark.slow
def test_forward_and_gradient_export_for_tpu_hold_the_kernel():
    scale = S((), jnp.float32)

    def loss(query, key, value, ids, scale):
        return _causal_window_segments(query, key, value, ids, scale).astype(jnp.float32).sum()

    forward = _module_text(_causal_window_segments, QUERY, QUERY, QUERY, IDS, scale)
    assert forward.count(TPU_KERNEL) == 1
    gradient = _module_text(jax.grad(loss, argnums=(0, 1, 2, 4)), QUERY, QUERY, QUERY, IDS, scale)
    assert gradient.count(TPU_KERNEL) >= 2  # splash's forward and its backward kernels
    # The same traced function lowered for CPU holds no TPU kernel.
    cpu = _module_text(_causal_window_segments, QUERY, QUERY, QUERY, IDS, scale, platform="cpu")
    assert TPU_KERNEL not in cpu


def test_an_ineligible_call_exports_without_the_kernel():
    bias = S((1, 8, 2048, 2048), jnp.bfloat16)
    text = _module_text(lambda q, b: dot_attention(None, q, q, causal=True, bias=b), QUERY, bias)
    assert TPU_KERNEL not in text


@pytest.mark.slow
def test_the_linen_module_and_sequence_parallel_follow_the_choice():
    layer = DotAttention(use_scale=True)
    query = S((2, 1024, 128), jnp.bfloat16)
    ones = jnp.ones((1, 128, 128), query.dtype)
    params = layer.init(jax.random.key(0), ones, ones, causal=True)

    def module(params, query):
        return layer.apply(params, query, query, causal=True)

    assert TPU_KERNEL in _module_text(module, params, query)

    mesh = Mesh(np.array(jax.devices()[:2]), ("seq",))
    value_mask = S((2, 2048), jnp.bool_)

    def sharded(query, value, value_mask):
        return sequence_parallel_attention(
            None, query, value, masks=(None, value_mask), mesh=mesh, axis_name="seq"
        )

    value = S((2, 2048, 128), jnp.bfloat16)
    assert TPU_KERNEL in _module_text(sharded, query, value, value_mask)
    # causal shards keep the chunked kernel (see the multi-device guide)
    text = _module_text(
        lambda q, v: sequence_parallel_attention(
            None, q, v, causal=True, mesh=mesh, axis_name="seq"
        ),
        query,
        value,
    )
    assert TPU_KERNEL not in text
