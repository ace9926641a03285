"""Sphinx configuration of the flax_dotattn documentation (build: ``bash docs/build.sh``).

Why Sphinx: it is what optax, chex and Flax use, so a JAX user meets the same layout;
autodoc + napoleon read the Google-style docstrings as they are; MyST lets the guides be
Markdown; and ``sphinx.ext.doctest`` runs every guide's code during the build. The build is
offline: no intersphinx, and the furo theme ships its assets.
"""

from __future__ import annotations

import doctest
import inspect
import os
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the library, even when it is not installed

# XLA flags for the guides' code, set before jax initialises:
# * 4 simulated CPU devices, for the multi-device guide;
# * no LLVM optimisation of compiled code: the guides compile many tiny functions once each
#   and run them on tiny arrays, so compilation is most of the build's time and this halves
#   it. The printed numbers are rounded and do not change.
_XLA_FLAGS = {
    "xla_force_host_platform_device_count": "4",
    "xla_backend_optimization_level": "0",
}
for _flag, _value in _XLA_FLAGS.items():
    if _flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --{_flag}={_value}".strip()

import flax_dotattn  # noqa: E402

project = "flax_dotattn"
author = "flax_dotattn authors"
copyright = "flax_dotattn authors"
release = version = flax_dotattn.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "bench_cpu*.md"]

# -- Cross-references ------------------------------------------------------------------
# Every reference must resolve (``-n``, with ``-W`` in docs/build.sh). There is no
# intersphinx (the build stays offline), so names from Python, NumPy, JAX and Flax that
# appear in signatures and docstrings have nothing to link to: they are listed here.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(builtins\.)?(bool|int|float|str|bytes|dict|list|tuple|type|object|None)"),
    (r"py:.*", r"(typing|collections\.abc|pathlib|dataclasses)\..*"),
    (r"py:.*", r"(Any|Mapping|Sequence|Path)"),
    (r"py:.*", r"(jax|jnp|np|numpy|flax|nn|nnx)(\..*)?"),
    (r"py:.*", r"(Array|Params|Masks)"),  # flax_dotattn's private type aliases
    # Literal aliases of the choices (flax_dotattn/_src/types.py), and the dispatcher's
    # Plan (a NamedTuple whose fields which_implementation documents).
    (r"py:.*", r"(ScoreMode|FloatDtypeName|PrecisionName|Implementation|Window)"),
    # The public config classes' private bases: their schemas (fields and checks, with no
    # Keras), whose fields the classes' own docstrings document.
    (r"py:.*", r"flax_dotattn\._src\.config\.(multi_head_schema|schema)\.\w+Fields"),
    (r"py:.*", r"(ScoreMod|MaskMod)"),  # the score and mask functions' Callable aliases
    (r"py:.*", r"(flax_dotattn\._src\.dispatch\.)?Plan"),
    # The TypedDicts of dot_attention's keyword arguments (its overloads and
    # which_implementation); the functions' Args sections document each argument.
    (r"py:.*", r"(flax_dotattn\._src\.attention\.)?(DotAttentionKeywords|AllKeywords)"),
]

# -- autodoc / napoleon ----------------------------------------------------------------
autodoc_default_options = {
    "members": True,  # with __all__: every public name, and nothing else
    "member-order": "bysource",
    "special-members": "__call__",
    "show-inheritance": False,
}
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # "Attributes:" as fields, so dataclass fields are not doubled

# -- MyST ------------------------------------------------------------------------------
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# -- doctest ---------------------------------------------------------------------------
# The guides' ``{doctest}``/``{testcode}`` blocks run in ``sphinx-build -b doctest``.
# Docstring examples (plain ``>>>`` blocks in the API reference) are already run by
# pytest's --doctest-modules, so they are not run twice here.
doctest_test_doctest_blocks = ""
# Sphinx's defaults plus NORMALIZE_WHITESPACE, so long outputs can be wrapped on the page.
doctest_default_flags = (
    doctest.ELLIPSIS
    | doctest.IGNORE_EXCEPTION_DETAIL
    | doctest.DONT_ACCEPT_TRUE_FOR_1
    | doctest.NORMALIZE_WHITESPACE
)
doctest_global_setup = """
import os
os.environ.setdefault("KERAS_BACKEND", "jax")
import numpy as np
np.set_printoptions(precision=3, suppress=True)
"""

# -- HTML ------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"flax_dotattn {release}"
html_static_path: list[str] = []
html_show_sourcelink = False


# -- Local hooks -----------------------------------------------------------------------


def _skip_field_values(app, what, name, obj, skip, options):
    """Class attributes (dataclass and module fields) are documented by the class's
    ``Attributes:`` section; autodoc would otherwise show a default's own docstring (e.g.
    ``param_dtype = jnp.float32`` documented as NumPy's float32)."""
    if what == "class" and not (inspect.isroutine(obj) or isinstance(obj, property)):
        return True
    return None


def _readable_defaults(app, what, name, obj, options, signature, return_annotation):
    """Rewrites defaults whose repr is not Python (``<class 'jax.numpy.float32'>``, Flax's
    ``<flax.linen.module._Sentinel object>`` for ``parent``), which breaks the parsing of
    the whole signature: a class becomes its dotted name, any other object ``...``."""
    if signature:
        signature = re.sub(r"<class '([\w.]+)'>", r"\1", signature)
        signature = re.sub(r"<[\w.]+ object( at 0x[0-9a-f]+)?>", "...", signature)
    return signature, return_annotation


def _resolve_public_names(app, env, node, contnode):
    """Resolves an unqualified ``:class:`X``` written inside ``flax_dotattn.nnx`` to
    ``flax_dotattn.X`` (as Python's own lookup would), when that public name exists."""
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    if "." in target or not node.get("py:module", "").startswith("flax_dotattn"):
        return None
    domain = env.get_domain("py")
    qualified = f"flax_dotattn.{target}"
    if qualified not in domain.objects:
        return None
    return domain.resolve_xref(
        env, node["refdoc"], app.builder, node["reftype"], qualified, node, contnode
    )


def setup(app):
    app.connect("autodoc-skip-member", _skip_field_values)
    app.connect("autodoc-process-signature", _readable_defaults)
    app.connect("missing-reference", _resolve_public_names)
