"""Moving code must not move numbers: a fixed grid of public calls (every path, the masks,
grouped queries, decoding, sequence-parallel and ring attention, the modules) gives the
outputs recorded before the house was rebuilt into subpackages, bitwise.

The recording, ``fixtures/refactor_identity.npz``, was written by this file at the commit
before the move (``FLAX_DOTATTN_WRITE_IDENTITY=1 python -m pytest -n 0
tests/test_refactor_identity.py``), with the JAX version it ran; under another JAX
version XLA may round differently, and the grid is then compared to float32 rounding.
"""

import importlib.metadata
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from flax_dotattn import (
    DotAttention,
    MultiHeadDotAttention,
    dot_attention,
    ring_attention,
    sequence_parallel_attention,
)

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "refactor_identity.npz"
VERSIONS = {"jax": jax.__version__, "jaxlib": importlib.metadata.version("jaxlib")}


def _inputs(b=2, h=2, tq=40, tv=48, d=16, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(7), 3)
    q = jax.random.normal(keys[0], (b, h, tq, d), dtype)
    k = jax.random.normal(keys[1], (b, h, tv, d), dtype)
    v = jax.random.normal(keys[2], (b, h, tv, d), dtype)
    return q, k, v


def _value_and_grad(fn, *args):
    out, grads = jax.value_and_grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), argnums=(0, 1, 2))(*args)
    return [out, *grads]


def _attention_grid() -> dict[str, list[jax.Array]]:
    q, k, v = _inputs()
    ids_q = jnp.repeat(jnp.arange(4), 10)[None, None]  # [1, 1, 40]
    ids_k = jnp.repeat(jnp.arange(4), 12)[None, None]  # [1, 1, 48]
    vmask = jnp.arange(48)[None, None] < jnp.array([30, 48])[:, None, None]  # [2, 1, 48]
    qmask = jnp.arange(40)[None, None] < 37
    bias = jnp.linspace(-1.0, 1.0, 40 * 48).reshape(40, 48)
    pair = (jnp.arange(40)[:, None] + jnp.arange(48)[None]) % 5 != 0
    cases = {  # each feature once, several per compiled call
        "scale_plain": dict(params={"scale": jnp.float32(0.37)}),
        "causal_window_masks": dict(causal=True, window=(7, 0), masks=(qmask, vmask)),
        "segments_bias_pair": dict(segment_ids=(ids_q, ids_k), bias=bias, attention_mask=pair),
        "decode": dict(causal=True, query_offset=jnp.array([8, 3]), kv_length=jnp.array([48, 43])),
    }
    grid = {}
    for path in ("xla", "chunked"):  # (the automatic choice is xla at these sizes)
        implementation = path
        blocks = {"block_size": (16, 8)} if path == "chunked" else {}
        for name, case in cases.items():
            kwargs = dict(case)
            params = kwargs.pop("params", None)
            if name == "decode":  # one offset and length per sequence: [B, 1]
                kwargs["query_offset"] = kwargs["query_offset"][:, None]
                kwargs["kv_length"] = kwargs["kv_length"][:, None]

            options = {"implementation": implementation, **blocks, **kwargs}

            def fn(q, k, v, params=params, options=options):
                return dot_attention(params, q, v, k, **options)

            grid[f"{path}/{name}"] = _value_and_grad(jax.jit(fn), q, k, v)
    # grouped queries: key/value with one head broadcast over the query's two
    gqa = lambda q, k, v: dot_attention(None, q, v, k, causal=True, block_size=8)  # noqa: E731
    grid["chunked/gqa"] = _value_and_grad(jax.jit(gqa), q, k[:, :1], v[:, :1])
    concat = lambda q, k, v: dot_attention(  # noqa: E731
        {"concat_score_weight": jnp.float32(0.8)}, q, v, k, score_mode="concat", block_size=8
    )
    grid["chunked/concat"] = _value_and_grad(jax.jit(concat), q[..., :12, :], k, v)
    dropped = lambda q, k, v: dot_attention(  # noqa: E731
        None, q, v, k, dropout_rate=0.3, deterministic=False, dropout_rng=jax.random.key(3)
    )
    grid["xla/dropout"] = _value_and_grad(jax.jit(dropped), q, k, v)
    jvp = jax.jvp(
        lambda q: dot_attention(None, q, v, k, causal=True, implementation="chunked"),
        (q,),
        (v[..., :40, :],),
    )
    grid["chunked/jvp"] = list(jvp)
    return grid


def _kernel_grid() -> dict[str, list[jax.Array]]:
    """The Pallas kernels in interpret mode (small: they are slow there)."""
    q, k, v = _inputs(b=1, h=2, tq=128, tv=128, d=16)
    ids = jnp.repeat(jnp.arange(2), 64)[None, None]
    grid = {}
    for kernel in ("pallas_tpu", "pallas_gpu"):

        def fn(q, k, v, kernel=kernel):
            return dot_attention(
                {"scale": jnp.float32(0.5)},
                q,
                v,
                k,
                causal=True,
                segment_ids=(ids, ids),
                implementation=kernel,
            )

        grid[f"{kernel}/causal_segments"] = _value_and_grad(jax.jit(fn), q, k, v)
    return grid


def _parallel_grid() -> dict[str, list[jax.Array]]:
    q, k, v = _inputs(b=1, h=2, tq=64, tv=64, d=16)
    mesh = Mesh(np.array(jax.devices("cpu")[:4]), ("seq",))
    grid = {}
    for name, fn in (
        ("sequence_parallel", sequence_parallel_attention),
        ("ring", ring_attention),
    ):

        def run(q, k, v, fn=fn):
            return fn(None, q, v, k, causal=True, mesh=mesh, axis_name="seq")

        grid[f"parallel/{name}"] = _value_and_grad(jax.jit(run), q, k, v)
    return grid


def _module_grid() -> dict[str, list[jax.Array]]:
    x = jax.random.normal(jax.random.key(5), (2, 9, 8))
    grid = {}
    layer = DotAttention(use_scale=True, causal=True)
    params = layer.init(jax.random.key(1), x, x)
    grid["linen/dot_attention"] = [layer.apply(params, x, x)]
    mha = MultiHeadDotAttention(num_heads=2, key_dim=4, num_kv_heads=1, causal=True)
    params = mha.init(jax.random.key(1), x, x)["params"]
    grid["linen/multi_head"] = [mha.apply({"params": params}, x, x)]
    decoder = mha.clone(decode=True)
    cache = decoder.init(jax.random.key(0), x, x)["cache"]

    @jax.jit
    def step(cache, chunk):
        return decoder.apply({"params": params, "cache": cache}, chunk, chunk, mutable=["cache"])

    outputs, start = [], 0
    for n in (4, 1, 4):
        out, variables = step(cache, x[:, start : start + n])
        cache, start = variables["cache"], start + n
        outputs.append(out)
    grid["linen/multi_head_decode"] = [jnp.concatenate(outputs, axis=1)]
    return grid


GRIDS = {
    "attention": _attention_grid,
    # The Pallas kernels (interpreted) are recorded too (``_kernel_grid``); each is compared
    # with the xla path in its own tests, so the suite does not rerun them here.
    "parallel": _parallel_grid,
    "modules": _module_grid,
}


def _flat(grid: dict[str, list[jax.Array]]) -> dict[str, np.ndarray]:
    return {f"{name}#{i}": np.asarray(x) for name, xs in grid.items() for i, x in enumerate(xs)}


@pytest.mark.skipif(not os.environ.get("FLAX_DOTATTN_WRITE_IDENTITY"), reason="writes the record")
def test_write_the_record():  # pragma: no cover - run once, at the commit before a move
    arrays = {}
    for grid in (*GRIDS.values(), _kernel_grid):
        arrays.update(_flat(grid()))
    np.savez_compressed(FIXTURE, versions=np.array(json.dumps(VERSIONS)), **arrays)


@pytest.mark.slow
@pytest.mark.parametrize("part", list(GRIDS))
def test_outputs_equal_the_record_bitwise(part):
    record = np.load(FIXTURE)
    recorded_versions = json.loads(str(record["versions"]))
    got = _flat(GRIDS[part]())
    assert got, part
    for name, actual in got.items():
        expected = record[name]
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
        if recorded_versions == VERSIONS:
            assert np.array_equal(actual, expected, equal_nan=True), (
                name,
                float(np.max(np.abs(actual - expected))),
            )
        else:  # another XLA may round differently: float32 rounding, a few ulps
            np.testing.assert_allclose(actual, expected, rtol=2e-5, atol=2e-6, err_msg=name)
