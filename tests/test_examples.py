"""Smoke tests: each example runs end to end with a few steps and reports what it achieved."""

import importlib
import pathlib
import sys

import pytest

pytestmark = pytest.mark.slow  # the quick tier (-m "not slow") leaves this file out

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def example(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))

    def load(name):
        sys.modules.pop(name, None)
        return importlib.import_module(name)

    return load


def test_text_similarity_with_attention_learns(example, capsys):
    result = example("text_similarity").main(["--steps", "300", "--eval-examples", "500"])
    out = capsys.readouterr().out
    assert "held-out accuracy" in out and "without attention" in out
    # After 300 steps attention is already well above chance and above the baseline.
    assert result["attention"]["accuracy"] > 0.75
    assert result["attention"]["accuracy"] > result["baseline"]["accuracy"] + 0.1


def test_functional_recovers_the_teacher_scale(example, capsys):
    result = example("functional").main(["--steps", "150", "--layers", "2"])
    assert "learned scales" in capsys.readouterr().out
    assert result["layer0_scale_error"] < 0.3
    assert result["loss_reduction"] > 10


def test_from_keras_outputs_are_identical(example, capsys):
    result = example("from_keras").main([])
    assert "identical within float32 rounding: True" in capsys.readouterr().out
    assert result["max_abs_diff"] < 1e-5
    result = example("from_keras").main(["--score-mode", "dot", "--causal", "true"])
    assert result["max_abs_diff"] < 1e-5


def test_seq2seq_learns_reversal_with_an_anti_diagonal_alignment(example, tmp_path, capsys):
    result = example("seq2seq_alignment").main(
        ["--steps", "300", "--eval-examples", "200", "--out-dir", str(tmp_path)]
    )
    capsys.readouterr()
    assert result["accuracy"] > 0.8
    assert result["anti_diagonal"] > 0.5
    assert result["restored_same"]
    assert (tmp_path / "seq2seq.msgpack").exists() and (tmp_path / "seq2seq.yaml").exists()
    pytest.importorskip("matplotlib")  # the examples extra draws the heat map
    assert (tmp_path / "seq2seq_alignment.png").stat().st_size > 1000


def test_decode_lm_learns_to_copy_and_its_cache_gives_the_full_logits(example, capsys):
    result = example("decode_lm").main(["--steps", "60", "--eval-examples", "16"])
    out = capsys.readouterr().out
    assert "tokens/s with the cache" in out and "recomputing the prefix" in out
    assert result["logit_error"] < 1e-4  # the example asserts it too
    assert result["ragged_error"] < 1e-4  # each ragged sequence == decoding it alone
    assert "local layers on a rolling cache" in out
    assert result["accuracy"] > 0.9


def test_ring_training_learns_packed_documents_with_less_memory_per_device(example, capsys):
    result = example("ring_training").main(
        ["--length", "256", "--steps", "50", "--max-document", "32", "--documents", "8"]
    )
    assert "per-device temporaries" in capsys.readouterr().out
    assert result["accuracy"] > 0.9  # chance: 1/8
    assert result["memory"]["ring"] < result["memory"]["one device"]


def test_gemma2_style_lm_learns_to_copy_and_its_cache_gives_the_full_logits(example, capsys):
    result = example("gemma2_style").main(["--steps", "120", "--eval-examples", "16"])
    out = capsys.readouterr().out
    assert "attention == plain jnp" in out and "cached logits == full-sequence" in out
    assert result["attention_error"] < 1e-5 and result["logit_error"] < 1e-4  # asserted too
    assert result["accuracy"] > 0.9
