"""Packaging tells the truth: declared dependencies match the imports, license and version agree.

All checks read files only (no network, no build). Building the wheel and the sdist, ``twine
check`` and the minimum versions are proved by ``.ci/floors``.
"""

from __future__ import annotations

import ast
import hashlib
import pathlib
import re
import sys
import tomllib

import flax_dotattn

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]

# Import names that differ from their distribution's name.
DISTRIBUTION_OF = {"yaml": "pyyaml"}

# md5 of the verbatim Apache License 2.0 text (apache.org's LICENSE-2.0.txt), the checksum that
# license scanners and distributions use for it.
APACHE_2_MD5 = "3b83ef96387f14655fc854ddc3c6bd57"


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _floors(requirements: list[str]) -> dict[str, str]:
    """``{"name": "X"}`` for ``name>=X`` requirements; anything else fails."""
    floors = {}
    for requirement in requirements:
        match = re.fullmatch(r"([A-Za-z0-9._-]+)(\[[^\]]*\])?\s*>=\s*([^,;\s]+)", requirement)
        assert match, f"{requirement!r} is not a plain `name>=floor` (.ci/floors pins those)"
        floors[_normalise(match.group(1))] = match.group(3)
    return floors


RUNTIME = set(_floors(PROJECT["dependencies"]))
EXTRAS = {name: set(_floors(reqs)) for name, reqs in PROJECT["optional-dependencies"].items()}


def _is_import_error_guard(node: ast.Try) -> bool:
    names = set()
    for handler in node.handlers:
        caught = handler.type
        for item in caught.elts if isinstance(caught, ast.Tuple) else [caught]:
            if isinstance(item, ast.Name):
                names.add(item.id)
    return bool(names & {"ImportError", "ModuleNotFoundError"})


def _imports(path: pathlib.Path) -> list[tuple[str, bool]]:
    """``(top-level module, optional)`` for each absolute import of ``path``.

    An import is optional when it runs only on demand (inside a function) or is guarded by
    ``except ImportError``; the others run whenever the file is imported.
    """
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, optional: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend((alias.name.split(".")[0], optional) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.append((node.module.split(".")[0], optional))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            optional = True
        if isinstance(node, ast.Try) and _is_import_error_guard(node):
            for child in node.body:
                visit(child, True)
            for child in [*node.handlers, *node.orelse, *node.finalbody]:
                visit(child, optional)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, optional)

    visit(ast.parse(path.read_text(), str(path)), False)
    return found


def _third_party(paths, local: set[str]) -> dict[str, dict[str, bool]]:
    """``{distribution: {"file:module": optional}}`` of the imports outside stdlib and ``local``."""
    found: dict[str, dict[str, bool]] = {}
    for path in paths:
        for module, optional in _imports(path):
            if module in sys.stdlib_module_names or module in local:
                continue
            where = f"{path.relative_to(ROOT)}:{module}"
            found.setdefault(_normalise(DISTRIBUTION_OF.get(module, module)), {})[where] = optional
    return found


def _undeclared(found: dict[str, dict[str, bool]], required: set[str], optional: set[str]):
    return sorted(
        where
        for dist, places in found.items()
        for where, is_optional in places.items()
        if dist not in required and not (is_optional and dist in optional)
    )


def test_every_requirement_is_a_floor():
    assert RUNTIME and all(EXTRAS.values())  # _floors asserts the form


def test_library_imports_exactly_the_runtime_dependencies():
    """What runs on ``import flax_dotattn`` needs only ``dependencies``; a lazy or guarded import
    (the benchmark's keras and torch) may come from an extra; and nothing unused is required:
    every runtime dependency is imported, on import or on demand (PyYAML, when a YAML config
    file is read or written)."""
    any_extra = set().union(*EXTRAS.values())
    found = _third_party(sorted((ROOT / "flax_dotattn").rglob("*.py")), {"flax_dotattn"})
    undeclared = _undeclared(found, RUNTIME, any_extra)
    assert not undeclared, f"imports of undeclared packages: {undeclared}"
    always_imported = {d for d, places in found.items() if not all(places.values())}
    assert always_imported <= RUNTIME, "what runs on import must be a runtime dependency"
    unused = RUNTIME - set(found)
    assert not unused, f"runtime dependencies the library never imports: {unused}"


def test_examples_import_only_declared_packages():
    """Examples may use the library's dependencies and the ``examples`` extra; a guarded import
    (``from_keras.py``'s keras, with its install hint) may come from another extra."""
    examples = sorted((ROOT / "examples").glob("*.py"))
    local = {"flax_dotattn"} | {path.stem for path in examples}
    found = _third_party(examples, local)
    allowed = RUNTIME | EXTRAS["examples"]
    undeclared = _undeclared(found, allowed, set().union(*EXTRAS.values()))
    assert not undeclared, f"imports of undeclared packages: {undeclared}"
    assert set(found) >= EXTRAS["examples"], "the examples extra lists a package none imports"


def test_tests_import_only_declared_packages():
    tests = sorted((ROOT / "tests").rglob("*.py"))
    local = {"flax_dotattn", "conftest", "keras_reference"} | {path.stem for path in tests}
    found = _third_party(tests, local)
    # Fixture generators run by hand with TensorFlow are not tests.
    found = {
        dist: {w: o for w, o in places.items() if not w.startswith("tests/fixtures/")}
        for dist, places in found.items()
    }
    found = {dist: places for dist, places in found.items() if places}
    allowed = RUNTIME | EXTRAS["test"] | EXTRAS["examples"]  # README installs [test,examples]
    undeclared = _undeclared(found, allowed, set())
    assert not undeclared, f"imports of undeclared packages: {undeclared}"


def test_license_file_is_the_declared_license():
    assert PROJECT["license"] == "Apache-2.0"
    assert PROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_bytes()
    assert text.split()[:4] == [b"Apache", b"License", b"Version", b"2.0,"]
    assert hashlib.md5(text, usedforsecurity=False).hexdigest() == APACHE_2_MD5
    # PEP 639: a license expression excludes license classifiers.
    assert not any(c.startswith("License ::") for c in PROJECT.get("classifiers", []))


def test_declared_version_is_the_package_version():
    if "version" in PROJECT:
        declared = PROJECT["version"]
    else:  # hatch reads it from a file
        assert "version" in PROJECT.get("dynamic", [])
        source = (ROOT / PYPROJECT["tool"]["hatch"]["version"]["path"]).read_text()
        declared = re.search(r"^__version__\s*=\s*[\"']([^\"']+)[\"']", source, re.M).group(1)
    assert declared == flax_dotattn.__version__


def test_changelog_newest_release_is_the_package_version():
    """The newest dated section of CHANGELOG.md is ``__version__``; "Unreleased" sits above."""
    changelog = (ROOT / "CHANGELOG.md").read_text()
    headings = re.findall(r"^## (.+)$", changelog, re.M)
    assert headings[0] == "[Unreleased]", headings[:2]
    released = [h for h in headings if re.fullmatch(r"\[[^\]]+\] - \d{4}-\d{2}-\d{2}", h)]
    assert released, headings
    assert released[0].startswith(f"[{flax_dotattn.__version__}] - "), released[0]


def test_python_floor_matches_the_lint_target():
    floor = re.fullmatch(r">=\s*3\.(\d+)", PROJECT["requires-python"]).group(1)
    assert PYPROJECT["tool"]["ruff"]["target-version"] == f"py3{floor}"
    assert sys.version_info >= (3, int(floor))
