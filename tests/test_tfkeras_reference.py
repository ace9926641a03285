"""Parity with the real tf.keras 2.x ``Attention`` layer, through recorded outputs.

``fixtures/tfkeras_2_reference.json`` was written by ``fixtures/make_tfkeras_reference.py``
with TensorFlow 2.15 (not needed to run this test): its layer configs and weights are read
with ``from_keras`` / ``params_from_keras`` and the outputs and weights must match.
"""

import json
import pathlib

import numpy as np
import pytest
from conftest import assert_close

from flax_dotattn import DotAttention, DotAttentionConfig, params_from_keras

REFERENCE = json.loads(
    (pathlib.Path(__file__).parent / "fixtures" / "tfkeras_2_reference.json").read_text()
)


def _id(case):
    cfg = case["config"]
    return (
        f"{cfg['score_mode']}-scale{cfg['use_scale']}-causal{case['causal']}-"
        f"masks{case['vm'] is not None}"
    )


@pytest.mark.parametrize("case", REFERENCE["cases"], ids=_id)
def test_matches_recorded_tf_keras_2_outputs(case):
    cfg = DotAttentionConfig.from_keras(case["config"])
    params = params_from_keras([np.float32(w) for w in case["weights"]], cfg)
    masks = None if case["vm"] is None else (np.array(case["qm"]), np.array(case["vm"]))
    out, weights = DotAttention.from_config(cfg).apply(
        {"params": params},
        np.array(case["q"], np.float32),
        np.array(case["v"], np.float32),
        np.array(case["k"], np.float32),
        masks,
        causal=case["causal"],
        return_attention_scores=True,
    )
    assert_close(out, case["out"])
    assert_close(weights, case["scores"])


def test_reads_a_tf_keras_2_config():
    cfg = DotAttentionConfig.from_keras(REFERENCE["legacy_causal_config"])
    assert cfg.score_mode == "dot" and cfg.dtype == "float32"
    assert REFERENCE["tensorflow_version"].startswith("2.")
