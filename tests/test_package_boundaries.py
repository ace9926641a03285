"""The blockwise kernel's package is used only through its interface.

``flax_dotattn._src.kernels.chunked`` lists its interface in ``__all__``; every other library
module (``dot_attention``, ``sequence_parallel_attention``, ``ring_attention``, ...) may
use those names and nothing else: no submodule imports, no private attribute.
"""

import ast
import inspect
import pathlib

import flax_dotattn
from flax_dotattn._src.kernels import chunked

_PACKAGE = pathlib.Path(flax_dotattn.__file__).parent
_KERNEL = _PACKAGE / "_src" / "kernels" / "chunked"


def _outside_modules():
    return [p for p in sorted(_PACKAGE.rglob("*.py")) if _KERNEL not in p.parents]


def _kernel_uses(tree: ast.AST) -> list[str]:
    """What a module takes from the kernel package: ``name`` for ``chunked.name`` and
    ``from ..chunked import name``, ``module:<m>`` for a submodule import."""
    used = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("flax_dotattn._src.kernels.chunked."):
                used.append(f"module:{node.module}")
            elif node.module == "flax_dotattn._src.kernels.chunked":
                used += [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            used += [
                f"module:{a.name}"
                for a in node.names
                if a.name.startswith("flax_dotattn._src.kernels.chunked")
            ]
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "chunked"
        ):
            used.append(node.attr)
    return used


def test_the_kernel_interface_names_functions_and_types_not_modules():
    for name in chunked.__all__:
        assert not inspect.ismodule(getattr(chunked, name)), name


def test_no_module_outside_the_kernel_reads_its_private_names():
    interface = set(chunked.__all__)
    offences = {}
    for path in _outside_modules():
        bad = [u for u in _kernel_uses(ast.parse(path.read_text())) if u not in interface]
        if bad:
            offences[str(path.relative_to(_PACKAGE))] = bad
    assert not offences, f"modules reaching past the kernel's interface: {offences}"


def test_the_boundary_check_sees_a_private_use():
    tree = ast.parse(
        "from flax_dotattn._src import chunked\n"
        "from flax_dotattn._src.kernels.chunked.layout import to_blocks\n"
        "chunked._forward(1)\n"
    )
    uses = _kernel_uses(tree)
    assert "_forward" in uses and "module:flax_dotattn._src.kernels.chunked.layout" in uses


# -- the house: kernels never import each other, and no import circle -------------------

_SRC = _PACKAGE / "_src"
#: The kernels, by the dotted prefix of their modules.
_KERNELS = tuple(
    f"flax_dotattn._src.kernels.{name}"
    for name in ("xla", "chunked", "cudnn", "pallas_tpu", "pallas_gpu")
)


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(_PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> set[str]:
    """The library modules a file imports, at module level or inside a function (a lazy
    import is still an edge of the graph): ``from a import b`` counts ``a.b`` when that
    is a module, else ``a``."""
    modules = {_module_name(p) for p in _PACKAGE.rglob("*.py")}
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path.parent)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:
                name = f"{base}.{alias.name}"
                found.add(name if name in modules else base)
    return {m for m in found if m in modules}


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted(_PACKAGE.rglob("*.py"))}


def _kernel_of(module: str) -> str | None:
    return next((k for k in _KERNELS if module == k or module.startswith(k + ".")), None)


def test_no_kernel_imports_another_kernel():
    offences = {
        module: sorted(m for m in imported if _kernel_of(m) not in (None, _kernel_of(module)))
        for module, imported in _graph().items()
        if _kernel_of(module) is not None
    }
    assert not {m: bad for m, bad in offences.items() if bad}, offences


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of ``graph`` (one path per circle found by depth-first search)."""
    circles, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                circles.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return circles


def test_no_import_circle_in_the_library():
    # The package's own __init__ re-exports the public names: it sits on top, and no
    # library module may import it (that would close a circle through everything).
    assert not _circles(_graph())


def test_the_circle_check_sees_a_circle_and_a_lazy_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _circles(graph) == [["a", "b", "c", "a"]]
    lazy = ast.parse("def f():\n    from flax_dotattn._src import dispatch\n")
    assert any(isinstance(n, ast.ImportFrom) for n in ast.walk(lazy))


def test_the_kernel_check_knows_each_kernel_and_their_helpers():
    assert _kernel_of("flax_dotattn._src.kernels.chunked.forward") == _KERNELS[1]
    assert _kernel_of("flax_dotattn._src.kernels.linear_map") is None  # a shared helper
    assert _kernel_of("flax_dotattn._src.runner") is None  # composes kernels
    assert "flax_dotattn._src.kernels.chunked" in _imports(_SRC / "runner.py")
