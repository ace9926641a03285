"""Checks a built HTML site offline: internal links, anchors and the API's coverage.

Usage: ``python docs/check_build.py docs/_build/html`` (``docs/build.sh`` runs it).

* Every ``href``/``src`` that is not an external URL must name a file of the build, and a
  ``#fragment`` must name an ``id`` in that file.
* Every name in ``flax_dotattn.__all__``, ``flax_dotattn.nnx.__all__``,
  ``flax_dotattn.jax_nn.__all__`` and ``flax_dotattn.mods.__all__`` must have an entry (an
  ``id``) in ``api.html`` (a public submodule: its ``module-`` entry).

Exits 1 and lists the problems when there are any.
"""

from __future__ import annotations

import html.parser
import pathlib
import sys
import urllib.parse

EXTERNAL = ("http:", "https:", "mailto:", "data:", "javascript:")


class _Page(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("id", "name") and value:
                self.ids.add(value)
            if name in ("href", "src") and value:
                self.links.append(value)


def _parse(path: pathlib.Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def check_links(root: pathlib.Path) -> list[str]:
    pages = {p: _parse(p) for p in root.rglob("*.html")}
    problems = []
    for path, page in pages.items():
        for link in page.links:
            if link.startswith(EXTERNAL) or link.startswith("//"):
                continue
            parts = urllib.parse.urlsplit(link)  # drops "?v=..." cache busters
            target, fragment = urllib.parse.unquote(parts.path), parts.fragment
            dest = (path.parent / target).resolve() if target else path.resolve()
            if dest.is_dir():
                dest = dest / "index.html"
            where = f"{path.relative_to(root)}: {link}"
            if not dest.exists():
                problems.append(f"{where}: no file {dest}")
            elif fragment and dest.suffix == ".html":
                ids = pages[dest].ids if dest in pages else _parse(dest).ids
                if urllib.parse.unquote(fragment) not in ids:
                    problems.append(f"{where}: no anchor #{fragment}")
    return problems


def check_api(root: pathlib.Path) -> list[str]:
    import inspect

    import flax_dotattn
    import flax_dotattn.jax_nn
    import flax_dotattn.mods
    import flax_dotattn.nnx

    ids = _parse(root / "api.html").ids
    problems = []
    for module in (flax_dotattn, flax_dotattn.nnx, flax_dotattn.jax_nn, flax_dotattn.mods):
        for name in module.__all__:
            qualified = f"{module.__name__}.{name}"
            # a public submodule (``flax_dotattn.mods``) is documented by its automodule
            is_module = inspect.ismodule(getattr(module, name))
            documented = f"module-{qualified}" if is_module else qualified
            if documented not in ids:
                problems.append(f"api.html: {qualified} is public but not documented")
    return problems


def main(argv: list[str]) -> int:
    root = pathlib.Path(argv[0] if argv else "docs/_build/html").resolve()
    problems = check_links(root) + check_api(root)
    for problem in problems:
        print(problem, file=sys.stderr)
    pages = len(list(root.rglob("*.html")))
    print(f"check_build: {pages} pages, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
