"""A randomized property: the chunked path equals the materialised path.

Block bands, skipping and offsets are index arithmetic, whose off-by-one errors hide from
fixed sizes. Each case draws odd lengths, block sizes that do not divide them (``Bq !=
Bk``), a window, ``causal``, segment ids, masks and a bias (full or broadcast), and checks
values and gradients (query, key, value, bias) against ``implementation="xla"``.

The cases are drawn from fixed seeds, so a failure names its seed and reproduces. With
``FLAX_DOTATTN_EQUIVALENCE_CASES=N`` more are drawn (``N`` seeds).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close

from flax_dotattn import dot_attention

_CASES = int(os.environ.get("FLAX_DOTATTN_EQUIVALENCE_CASES", "18"))
_QUICK = 7  # the first seeds run in the quick tier; the rest are marked slow


def _draw(seed: int) -> dict:
    """One random configuration, every size and option drawn from ``seed``."""
    r = np.random.default_rng(seed)
    tq, tv = (int(x) for x in r.integers(1, 101, size=2))
    if r.random() < 0.5:
        tv = tq  # self-attention lengths are the common case for causal and windows
    # Mostly small blocks, so that a band spans several of them, misaligned.
    blocks = tuple(int(x) for x in r.integers(1, 17 if r.random() < 0.75 else 40, size=2))

    def side():  # mostly narrower than a block, so that bands cross block boundaries
        u = r.random()
        return None if u < 0.1 else int(r.integers(0, 12 if u < 0.8 else max(tv, 2)))

    window = None if r.random() < 0.15 else (side(), side())
    return dict(
        seed=seed,
        tq=tq,
        tv=tv,
        blocks=blocks,
        window=window,
        causal=bool(r.random() < 0.5),
        segments=bool(r.random() < 0.4),
        value_mask=bool(r.random() < 0.3),
        attention_mask=["none", "none", "full", "key_padding"][int(r.integers(0, 4))],
        bias=["none", "full", "per_key", "per_query"][int(r.integers(0, 4))],
    )


def _case_id(seed: int) -> str:
    c = _draw(seed)
    bits = [f"seed{seed}", f"{c['tq']}x{c['tv']}", "blocks{}x{}".format(*c["blocks"])]
    if c["window"] is not None:
        bits.append("window{}-{}".format(*c["window"]))
    bits += [name for name in ("causal", "segments", "value_mask") if c[name]]
    bits += [f"{k}-{c[k]}" for k in ("attention_mask", "bias") if c[k] != "none"]
    return "_".join(bits)


def _arrays(c: dict):
    r = np.random.default_rng(1000 + c["seed"])
    b, tq, tv, d, dv = 2, c["tq"], c["tv"], 5, 3

    def normal(*shape):
        return jnp.asarray(r.normal(size=shape), jnp.float32)

    q, k, v = normal(b, tq, d), normal(b, tv, d), normal(b, tv, dv)
    bias = {
        "none": None,
        "full": normal(b, tq, tv),
        "per_key": normal(1, 1, tv),  # broadcast along Tq and the batch
        "per_query": normal(b, tq, 1),  # broadcast along Tv
    }[c["bias"]]
    kwargs = {}
    if c["attention_mask"] == "full":
        kwargs["attention_mask"] = jnp.asarray(r.random((b, tq, tv)) < 0.8)
    elif c["attention_mask"] == "key_padding":
        kwargs["attention_mask"] = jnp.asarray(r.random((b, 1, tv)) < 0.8)
    if c["segments"]:  # sorted ids: packed sequences, a few segments per row
        q_ids = np.sort(r.integers(0, 3, size=(b, tq)), axis=-1)
        kv_ids = np.sort(r.integers(0, 3, size=(b, tv)), axis=-1)
        kwargs["segment_ids"] = (jnp.asarray(q_ids), jnp.asarray(kv_ids))
    if c["value_mask"]:
        kwargs["masks"] = (None, jnp.asarray(r.random((b, tv)) < 0.7))
    return (q, k, v, bias), kwargs


def _loss(implementation: str, c: dict, kwargs: dict):
    extra = {"block_size": c["blocks"]} if implementation == "chunked" else {}

    def loss(q, k, v, bias):
        out = dot_attention(
            {"scale": jnp.float32(0.8)}, q, v, k, causal=c["causal"], window=c["window"],
            bias=bias, implementation=implementation, **kwargs, **extra,
        )  # fmt: skip
        return jnp.sum(out * jnp.cos(out)), out

    return loss


def _check(seed: int) -> None:
    c = _draw(seed)
    arrays, kwargs = _arrays(c)
    argnums = (0, 1, 2) if arrays[3] is None else (0, 1, 2, 3)
    results = {}
    for impl in ("xla", "chunked"):
        grad = jax.jit(jax.value_and_grad(_loss(impl, c, kwargs), argnums, has_aux=True))
        results[impl] = grad(*arrays)
    (_, expected), expected_grads = results["xla"]
    (_, out), grads = results["chunked"]
    assert_close(out, expected, factor=2)
    for name, g, e in zip(("query", "key", "value", "bias"), grads, expected_grads, strict=False):
        assert g.shape == e.shape, name
        assert_close(g, e, factor=5)


@pytest.mark.parametrize("seed", range(_QUICK), ids=_case_id)
def test_chunked_equals_materialised_on_random_configurations(seed):
    _check(seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(_QUICK, _CASES), ids=_case_id)
def test_chunked_equals_materialised_on_more_random_configurations(seed):
    _check(seed)
