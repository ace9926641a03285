"""Type checking: mypy passes on the package and on tests/typing_usage.py.

``pyproject.toml`` configures mypy (``[tool.mypy]``: the files and the strictness). The usage
file states, with ``typing.assert_type``, what a user's type checker infers: ``dot_attention``
returns ``Array`` without and ``tuple[Array, Array]`` with ``return_attention_scores=True``,
and the modules' fields have their declared types.
"""

import pathlib
import subprocess
import sys

import typing_usage

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _mypy(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mypy", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_mypy_passes_on_the_package_and_the_usage_file(tmp_path):
    result = _mypy()  # the files of [tool.mypy]
    assert result.returncode == 0, result.stdout + result.stderr
    assert "flax_dotattn" in (ROOT / "pyproject.toml").read_text().split("[tool.mypy]")[1]

    # The checker really reads the types: a wrong claim about the return type fails.
    wrong = tmp_path / "wrong_usage.py"
    wrong.write_text(
        "from typing import assert_type\n"
        "import jax, jax.numpy as jnp\n"
        "from flax_dotattn import dot_attention\n"
        "q = jnp.ones((2, 3))\n"
        "assert_type(dot_attention(None, q, q, return_attention_scores=True), jax.Array)\n"
    )
    result = _mypy(str(wrong))
    assert result.returncode == 1, result.stdout + result.stderr
    assert 'Expression is of type "tuple[Array, Array]", not "Array"' in result.stdout


def test_typed_usage_runs():
    typing_usage.use_the_api(flag=True)
