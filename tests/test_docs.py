"""The documentation says what the code does.

The docs build (``bash docs/build.sh``) runs every guide's code; these tests run the
semantics guide's code in the suite too, and check what the pages say about the shapes of
masks against what ``dot_attention`` does with them.
"""

import doctest
import pathlib
import re

import jax.numpy as jnp
import numpy as np
import pytest

from flax_dotattn import dot_attention

ROOT = pathlib.Path(__file__).resolve().parents[1]
GUIDES = ROOT / "docs" / "guides"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted(GUIDES.glob("*.md"))]

# docs/conf.py's doctest flags and global setup, so the outputs compare as in the build.
FLAGS = (
    doctest.ELLIPSIS
    | doctest.IGNORE_EXCEPTION_DETAIL
    | doctest.DONT_ACCEPT_TRUE_FOR_1
    | doctest.NORMALIZE_WHITESPACE
)


def doctest_blocks(path: pathlib.Path) -> list[str]:
    """The ``{doctest}`` blocks of a MyST page, in order, without their option lines."""
    blocks = re.findall(r"^```\{doctest\}[^\n]*\n(.*?)^```", path.read_text(), re.S | re.M)
    return ["".join(s for s in b.splitlines(True) if not s.startswith(":")) for b in blocks]


def test_semantics_guide_examples_run():
    """Every example of the semantics guide, in one namespace as in the build."""
    blocks = doctest_blocks(GUIDES / "semantics.md")
    assert len(blocks) >= 8, len(blocks)
    parser, globs = doctest.DocTestParser(), {}
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    with np.printoptions(precision=3, suppress=True):
        for i, block in enumerate(blocks):
            test = parser.get_doctest(block, globs, f"semantics.md block {i}", None, 0)
            runner.run(test, clear_globs=False)
            globs = test.globs  # DocTest copies its globals: carry them to the next block
    assert runner.summarize(verbose=False).failed == 0


def _section(text: str, heading: str) -> str:
    return re.search(rf"^## {heading}\n(.*?)(?=^## )", text, re.S | re.M).group(1)


# Sentences that would say masks must match the inputs' shapes exactly.
NOT_BROADCAST = re.compile(
    r"nothing is broadcast|masks?[^.]*must match[^.]*exactly|masks? (is|are) not broadcast",
    re.I,
)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_page_says_masks_are_not_broadcast(page):
    assert not NOT_BROADCAST.search(page.read_text().replace("\n", " "))


def test_semantics_guide_states_the_broadcasting_rule_the_function_follows():
    masks = _section((GUIDES / "semantics.md").read_text(), "Masks").replace("\n", " ")
    for claim in ("broadcasts by NumPy's rules", "`[Tv]`", "`[B, 1, Tv]`", "`[B, 1, 1, Tv]`"):
        assert claim in masks, claim
    # What it claims: those shapes give the numbers of the mask broadcast by hand ...
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 5, 4)), jnp.float32)
    keep = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)

    def by_hand(mask):
        full = jnp.broadcast_to(mask, (2, 3, 5, 5))
        return dot_attention(None, x, x, attention_mask=full)

    for kwargs, mask in [
        (dict(masks=(None, keep[0])), keep[0]),  # [Tv]
        (dict(masks=(None, keep[:, None])), keep[:, None, None]),  # [B, 1, Tv]
        (dict(attention_mask=keep[:, None, None]), keep[:, None, None]),  # [B, 1, 1, Tv]
    ]:
        np.testing.assert_allclose(dot_attention(None, x, x, **kwargs), by_hand(mask), atol=1e-6)
    # ... and a shape that does not broadcast is a ValueError naming both shapes.
    assert "`ValueError` naming both shapes" in masks
    with pytest.raises(ValueError, match=r"\(2, 3, 5\).*received shape \(2, 4\)"):
        dot_attention(None, x, x, masks=(None, keep[:, :4]))


def test_the_stated_crossover_lengths_and_causal_block_floor_are_the_codes():
    """The long-sequences guide and ``dot_attention``'s docstring name the last length the
    automatic choice keeps materialised, the first it runs chunked, and the causal query
    block's floor; all must follow ``CHUNKED_CROSSOVER_BYTES`` and ``BlockSizes.default``."""
    from flax_dotattn import BlockSizes, which_implementation

    def path(t: int) -> str:
        return which_implementation(None, jnp.ones((t, 8)), jnp.ones((t, 8))).implementation

    guide = (GUIDES / "long_sequences.md").read_text()
    (last,) = re.findall(r"up to `Tq = Tv = (\d+)`", guide)
    assert (path(int(last)), path(int(last) + 1)) == ("xla", "chunked")
    (first,) = re.findall(r"from ``Tq = Tv = (\d+)``", dot_attention.__doc__ or "")
    assert (path(int(first) - 1), path(int(first))) == ("xla", "chunked")
    (floor,) = re.findall(r"below 2048 tokens, at least (\d+)", guide)
    assert BlockSizes.default("dot", None, True, length=512).block_q == int(floor)
