"""``BlockSizes``: the tunables of the chunked kernel, as one small frozen dataclass.

Like Pallas's flash-attention ``BlockSizes``: validated on construction, hashable (a static
argument under ``jit``), with a measured default per score mode. It knows nothing of the
rest of the library.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np


def _is_positive_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)) and bool(x >= 1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
    """Block lengths of the chunked path, for the forward and the derivative passes.

    The forward pass walks ``[Bq, Bk]`` score blocks; the derivative pass (the JVP, and
    the backward pass that JAX derives from it by transposition) walks
    ``[block_q_backward, block_k_backward]`` blocks, which default to the forward ones.
    With dropout the derivative pass always uses the forward blocks, since the dropout
    pattern is drawn per block. ``block_q`` counts query positions: with key/value
    shared by ``G`` query batch entries (grouped-query attention), a block holds the
    ``block_q * G`` query rows that read the same key block.

    Attributes:
      block_q: query rows per forward block ``Bq``.
      block_k: keys per forward block ``Bk``.
      block_q_backward: query rows per derivative block (None: ``block_q``).
      block_k_backward: keys per derivative block (None: ``block_k``).

    Examples:
      >>> from flax_dotattn import BlockSizes
      >>> BlockSizes(block_q=512, block_k=128).backward
      (512, 128)
      >>> BlockSizes.coerce((256, 64)) == BlockSizes(block_q=256, block_k=64)
      True
      >>> BlockSizes.default("dot").forward
      (2048, 256)
    """

    block_q: int
    block_k: int
    block_q_backward: int | None = None
    block_k_backward: int | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.name.endswith("_backward"):
                continue
            if not _is_positive_int(value):
                raise ValueError(
                    f"BlockSizes.{f.name} must be a positive int"
                    f"{' or None' if f.name.endswith('_backward') else ''}; "
                    f"received {f.name}={value!r}."
                )
            object.__setattr__(self, f.name, int(value))

    @property
    def forward(self) -> tuple[int, int]:
        """``(Bq, Bk)`` of the forward pass."""
        return self.block_q, self.block_k

    @property
    def backward(self) -> tuple[int, int]:
        """``(Bq, Bk)`` of the derivative (JVP and backward) pass."""
        return (
            self.block_q if self.block_q_backward is None else self.block_q_backward,
            self.block_k if self.block_k_backward is None else self.block_k_backward,
        )

    @classmethod
    def default(
        cls,
        score_mode: str,
        window: tuple[int | None, int | None] | None = None,
        causal: bool = False,
        base: BlockSizes | None = None,
        length: int | None = None,
    ) -> BlockSizes:
        """The default blocks for ``score_mode``, given the ``window``, ``causal`` and the
        query ``length`` (``Tq``; None: long).

        ``"dot"``: ``(2048, 256)``, tall query blocks keep the matmuls large and short key
        blocks keep the working set in cache; ``(1024, 256)`` when causal, which computes
        less of the hidden triangle, and for a ``length`` below 2048 half of it as a power
        of two, at least 512, so that a causal sequence of 1024 has two query blocks (one
        block would compute the whole hidden triangle; at 512, two blocks of 256 cost more
        in per-block work than they skip). ``"concat"``: ``(256, 128)``,
        smaller because each step forms a ``[B, Bq, Bk, D]`` tanh block. A sliding
        ``window`` of span ``w`` (both sides bounded, the right one by ``causal`` too)
        takes square blocks of half the largest power of two up to ``w``, between 64 and
        256, so that most of the band's blocks are visible. ``base`` replaces the blocks
        without a window (a tuned table's, see ``python -m flax_dotattn.tune``); a window
        narrows it the same way. The benchmark page gives the timings behind these choices.

        Examples:
          >>> BlockSizes.default("dot", causal=True).forward
          (1024, 256)
          >>> BlockSizes.default("dot", causal=True, length=1024).forward
          (512, 256)
        """
        if base is None and score_mode == "concat":
            base = cls(block_q=256, block_k=128)
        elif base is None and causal:  # shorter query blocks compute less of the triangle
            half = 2 ** max((length or 2048).bit_length() - 2, 0)  # a power of two <= length / 2
            base = cls(block_q=min(1024, max(512, half)), block_k=256)
        elif base is None:
            base = cls(block_q=2048, block_k=256)
        left, right = window or (None, None)
        if causal and right is not None:
            right = min(right, 0)
        elif causal:
            right = 0
        if left is None or right is None:
            return base
        span = max(left + right + 1, 1)
        side = min(max(2 ** (span.bit_length() - 1) // 2, 64), 256)
        return cls(block_q=min(base.block_q, side), block_k=min(base.block_k, side))

    @classmethod
    def coerce(cls, value: Any, name: str = "block_size") -> BlockSizes | None:
        """Reads None, an int, a pair ``(Bq, Bk)``, a mapping of fields or a BlockSizes.

        Raises:
          ValueError: naming ``name`` for anything else.
        """
        if value is None or isinstance(value, BlockSizes):
            return value
        if _is_positive_int(value):
            return cls(block_q=int(value), block_k=int(value))
        if (
            isinstance(value, (tuple, list))
            and len(value) == 2
            and all(_is_positive_int(b) for b in value)
        ):
            return cls(block_q=int(value[0]), block_k=int(value[1]))
        if isinstance(value, Mapping):
            fields = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(str(k) for k in value if k not in fields)
            if unknown:
                raise ValueError(
                    f"{name} got unknown BlockSizes keys {unknown}; expected keys from "
                    f"{sorted(fields)}."
                )
            missing = sorted({"block_q", "block_k"} - set(value))
            if missing:
                raise ValueError(
                    f"{name} as a mapping needs keys {missing}; received {name}={value!r}."
                )
            return cls(**value)
        raise ValueError(
            f"{name} must be None, a positive int, a pair (block_q, block_k) of them, a "
            f"BlockSizes or a mapping of its fields; received {name}={value!r}."
        )

    def to_dict(self) -> dict[str, int | None]:
        """The fields as a plain dict (JSON/YAML-serialisable)."""
        return dataclasses.asdict(self)
