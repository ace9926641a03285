"""Parity with the real Keras 3 ``keras.layers.Attention`` on its JAX backend."""

import dataclasses

import numpy as np
import pytest
from conftest import assert_close
from keras_reference import keras_attention

from flax_dotattn import dot_attention


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    tq: int = 3
    tv: int = 4
    d: int = 5
    dv: int = 5
    with_key: bool = False
    query_mask: bool = False
    value_mask: bool = False
    causal: bool = False
    use_scale: bool = False
    scale: float = 1.0
    score_mode: str = "dot"
    concat_score_weight: float = 1.0
    batch: tuple = (2,)


CASES = [
    Case("defaults"),
    Case("tq_ne_tv", tq=6, tv=2),
    Case("tq_tv_1", tq=1, tv=1),
    Case("d_ne_dv_with_key", d=3, dv=7, with_key=True),
    Case("key_given", with_key=True),
    Case("query_mask", query_mask=True),
    Case("value_mask", value_mask=True),
    Case("both_masks", query_mask=True, value_mask=True, with_key=True),
    Case("causal_square", tq=4, tv=4, causal=True),
    Case("causal_tq_lt_tv", tq=2, tv=5, causal=True),
    Case("causal_tq_gt_tv", tq=5, tv=2, causal=True),
    Case("causal_with_masks", tq=4, tv=4, causal=True, query_mask=True, value_mask=True),
    Case("use_scale_default_weight", use_scale=True),
    Case("use_scale_0.37", use_scale=True, scale=0.37),
    Case("use_scale_negative", use_scale=True, scale=-1.7, value_mask=True),
    Case("concat", score_mode="concat"),
    Case("concat_weight_2.5", score_mode="concat", concat_score_weight=2.5),
    Case(
        "concat_scale",
        score_mode="concat",
        use_scale=True,
        scale=0.6,
        concat_score_weight=-1.3,
        with_key=True,
    ),
    Case(
        "concat_masks_causal",
        score_mode="concat",
        use_scale=True,
        scale=1.4,
        query_mask=True,
        value_mask=True,
        causal=True,
        tq=4,
        tv=4,
    ),
    Case("batch_1", batch=(1,)),
]


def _make(case, rng, batch):
    q = rng.normal(size=batch + (case.tq, case.d)).astype(np.float32)
    v = rng.normal(size=batch + (case.tv, case.dv)).astype(np.float32)
    k = rng.normal(size=batch + (case.tv, case.d)).astype(np.float32) if case.with_key else None
    if case.score_mode == "concat" and not case.with_key:
        v = rng.normal(size=batch + (case.tv, case.d)).astype(np.float32)
    qm = rng.random(batch + (case.tq,)) > 0.3 if case.query_mask else None
    vm = rng.random(batch + (case.tv,)) > 0.3 if case.value_mask else None
    if vm is not None:
        vm[..., 0] = True  # keep at least one key; fully masked rows are tested elsewhere
    return q, v, k, qm, vm


def _params(case):
    params = {}
    if case.use_scale:
        params["scale"] = np.float32(case.scale)
    if case.score_mode == "concat":
        params["concat_score_weight"] = np.float32(case.concat_score_weight)
    return params


def _keras(case, q, v, k, qm, vm):
    return keras_attention(
        q,
        v,
        k,
        qm,
        vm,
        causal=case.causal,
        use_scale=case.use_scale,
        score_mode=case.score_mode,
        scale=case.scale,
        concat_score_weight=case.concat_score_weight,
    )


def _ours(case, q, v, k, qm, vm):
    masks = None if qm is None and vm is None else (qm, vm)
    return dot_attention(
        _params(case),
        q,
        v,
        k,
        masks,
        case.causal,
        score_mode=case.score_mode,
        return_attention_scores=True,
    )


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_keras_layer(case, rng):
    q, v, k, qm, vm = _make(case, rng, case.batch)
    expected_out, expected_w = _keras(case, q, v, k, qm, vm)
    out, w = _ours(case, q, v, k, qm, vm)
    assert out.shape == expected_out.shape and w.shape == expected_w.shape
    assert_close(out, expected_out)
    assert_close(w, expected_w)


ND_CASES = [
    Case("nd_batch_value_mask", batch=(2, 3), value_mask=True, query_mask=True),
    Case("nd_batch_causal_scale", batch=(3, 1, 2), causal=True, use_scale=True, scale=0.5),
    Case("nd_batch_concat", batch=(2, 2), score_mode="concat", value_mask=True),
]


@pytest.mark.parametrize("case", ND_CASES, ids=lambda c: c.id)
def test_nd_batch_dims_match_keras_on_flattened_inputs(case, rng):
    """Keras 3 mishandles value masks on N-D inputs, so compare on rank-3 flattening."""
    q, v, k, qm, vm = _make(case, rng, case.batch)
    flat = lambda x, n: None if x is None else x.reshape((-1,) + x.shape[len(case.batch) :])  # noqa: E731
    expected_out, expected_w = _keras(
        case, flat(q, 2), flat(v, 2), flat(k, 2), flat(qm, 1), flat(vm, 1)
    )
    out, w = _ours(case, q, v, k, qm, vm)
    assert out.shape == case.batch + (case.tq, v.shape[-1])
    assert w.shape == case.batch + (case.tq, case.tv)
    assert_close(out.reshape(expected_out.shape), expected_out)
    assert_close(w.reshape(expected_w.shape), expected_w)


def test_rank_2_inputs_match_keras_with_a_unit_batch(rng):
    q = rng.normal(size=(3, 4)).astype(np.float32)
    v = rng.normal(size=(5, 4)).astype(np.float32)
    vm = np.array([True, False, True, True, False])
    expected_out, expected_w = keras_attention(q[None], v[None], None, None, vm[None], causal=True)
    out, w = dot_attention(None, q, v, masks=(None, vm), causal=True, return_attention_scores=True)
    assert out.shape == (3, 4) and w.shape == (3, 5)
    assert_close(out, expected_out[0])
    assert_close(w, expected_w[0])


def test_numeric_masks_match_keras_bool_masks(rng):
    q = rng.normal(size=(2, 3, 4)).astype(np.float32)
    v = rng.normal(size=(2, 5, 4)).astype(np.float32)
    qm = np.array([[1, 0, 2], [0, 1, 1]], np.int32)
    vm = np.array([[1.0, 0.0, 0.5, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0, 1.0]], np.float32)
    expected_out, expected_w = keras_attention(q, v, None, qm != 0, vm != 0)
    out, w = dot_attention(None, q, v, masks=(qm, vm), return_attention_scores=True)
    assert_close(out, expected_out)
    assert_close(w, expected_w)


def test_fully_masked_rows_follow_keras_subtract_rule(rng):
    """Every key masked: Keras subtracts 1e9 and still normalises; so do we."""
    q = rng.normal(size=(2, 3, 4)).astype(np.float32)
    v = rng.normal(size=(2, 5, 4)).astype(np.float32)
    vm = np.array([[False] * 5, [True, False, True, False, False]])
    expected_out, expected_w = keras_attention(q, v, None, None, vm)
    out, w = dot_attention(None, q, v, masks=(None, vm), return_attention_scores=True)
    assert np.isfinite(np.asarray(out)).all()
    assert_close(out, expected_out)
    assert_close(w, expected_w)
    np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, rtol=1e-6)
