"""The public API: every name in ``__all__`` imports and is documented."""

import ast
import importlib
import pathlib

import pytest

import flax_dotattn


@pytest.mark.parametrize("name", flax_dotattn.__all__)
def test_every_public_name_imports_and_has_a_docstring(name):
    obj = getattr(importlib.import_module("flax_dotattn"), name)
    assert obj.__doc__ and obj.__doc__.strip()


def test_version_is_set():
    assert isinstance(flax_dotattn.__version__, str) and flax_dotattn.__version__


def _imported_roots(path):
    tree = ast.parse(path.read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


SRC = pathlib.Path(flax_dotattn.__file__).parent / "_src"


@pytest.mark.parametrize(
    "module",
    [
        "attention",
        "masks",
        "validation",
        "options",
        "config/schema",
        "config/classes",
        "config/files",
        "config/keras",
        "modules/multi_head",
        "config/multi_head_schema",
        "config/multi_head_keras",
    ],
)
def test_pure_layers_import_neither_flax_nor_keras(module):
    assert not _imported_roots(SRC / f"{module}.py") & {"flax", "keras"}


PACKAGE = pathlib.Path(flax_dotattn.__file__).parent
BENCH = PACKAGE / "bench"


def _library_files():
    """The package's modules but the benchmark's, which sits on top of the library."""
    return [path for path in sorted(PACKAGE.rglob("*.py")) if BENCH not in path.parents]


def _module_level_roots(path):
    """The top-level packages a file imports when it is imported (outside any function)."""
    roots = set()

    def visit(node):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            return
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return roots


def test_yaml_is_imported_only_to_read_or_write_yaml():
    for path in pathlib.Path(flax_dotattn.__file__).parent.rglob("*.py"):
        assert "yaml" not in _module_level_roots(path), path
    assert "yaml" in _imported_roots(SRC / "config" / "files.py")


def test_library_never_imports_keras():
    # The benchmark times Keras's layer when it is installed; nothing else may import it.
    for path in _library_files():
        assert "keras" not in _imported_roots(path), path


def _imported_modules(source, module):
    """The absolute names ``source`` imports, with each ``from X import name`` also as
    ``X.name`` and relative imports resolved; ``module`` is the file's dotted path
    (``pkg.__init__`` for a package), so its package is all but the last part."""
    package = module.split(".")[:-1]
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            base = ".".join(base + ([node.module] if node.module else []))
            names |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return names


def test_imported_modules_resolves_relative_imports():
    source = "from . import bench\nfrom ..bench.cli import main\nimport flax_dotattn.bench"
    assert _imported_modules(source, "flax_dotattn._src.x") == {
        "flax_dotattn._src",
        "flax_dotattn._src.bench",
        "flax_dotattn.bench.cli",
        "flax_dotattn.bench.cli.main",
        "flax_dotattn.bench",
    }
    assert "flax_dotattn.bench" in _imported_modules("from . import bench", "flax_dotattn.__init__")


def test_library_never_imports_the_benchmark():
    """Imports run one way: ``flax_dotattn.bench`` uses the library, never the reverse."""
    for path in _library_files():
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        imported = _imported_modules(path.read_text(), module)
        assert not {m for m in imported if m.split(".")[:2] == ["flax_dotattn", "bench"]}, path


@pytest.mark.parametrize(
    "name", ["DotAttention", "MultiHeadDotAttention", "from_linen", "to_linen"]
)
def test_nnx_namespace_exports(name):
    from flax_dotattn import nnx as fdnnx

    assert name in fdnnx.__all__ and getattr(fdnnx, name).__doc__
