"""The repository's promises: README's commands match CI, the examples run, and
tests/README.md maps every test file."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _ci_test_command():
    lines = [
        line
        for line in (ROOT / ".ci/run").read_text().splitlines()
        if "pytest" in line and not line.lstrip().startswith("#")
    ]
    assert len(lines) == 1, lines
    return lines[0].strip()


def test_readme_test_command_is_the_ci_command():
    readme = (ROOT / "README.md").read_text()
    quick_start = re.search(r"## Quick start.*?```bash\n(.*?)```", readme, re.S).group(1)
    commands = [c for c in quick_start.splitlines() if c.strip()]
    assert len(commands) == 2, commands
    assert commands[1] == _ci_test_command()
    assert "examples/text_similarity.py" in commands[0]


def test_quickstart_example_runs():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples/quickstart.py")],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    assert "module output == dot_attention output: True" in result.stdout
    assert "[[2.462 3.462]" in result.stdout


def test_readme_python_blocks_run(monkeypatch):
    """README's Python blocks run in order in one namespace (on 8 simulated CPU devices).

    The block that ports ``keras_layer`` needs a trained Keras layer, which
    examples/from_keras.py and tests/test_config.py cover, so it is left out here.
    """
    monkeypatch.chdir(ROOT)
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    runnable = [b for b in blocks if "keras_layer" not in b]
    assert len(runnable) >= 5
    namespace: dict = {}
    for block in runnable:
        exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["out"].shape == (8, 10, 64)


def test_tests_readme_lists_every_test_file():
    """tests/README.md has a row for each Python file of tests/, and no row for a file that
    does not exist."""
    readme = (ROOT / "tests/README.md").read_text()
    rows = [line.split("|")[1] for line in readme.splitlines() if line.startswith("| `")]
    listed = {name for cell in rows for name in re.findall(r"`([\w.]+\.py)`", cell)}
    present = {path.name for path in (ROOT / "tests").glob("*.py")}
    assert sorted(present - listed) == [], "missing from tests/README.md"
    assert sorted(listed - present) == [], "listed in tests/README.md but absent"
