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
