"""Type aliases and the allowed choices, declared once.

The choices of each option are the arguments of its ``Literal`` alias, so the public
signatures, the config and the validation read them from the same place.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, get_args

import jax

from flax_dotattn._src.blocks import BlockSizes

#: The one array alias used in every signature.
Array = jax.Array

ScoreMode = Literal["dot", "concat"]
Implementation = Literal["xla", "chunked", "cudnn", "pallas_tpu", "pallas_gpu"]
PrecisionName = Literal["default", "high", "highest"]
FloatDtypeName = Literal["float16", "bfloat16", "float32", "float64"]

SCORE_MODES: tuple[str, ...] = get_args(ScoreMode)
IMPLEMENTATIONS: tuple[str | None, ...] = (None, *get_args(Implementation))
PRECISIONS: tuple[str, ...] = get_args(PrecisionName)
FLOAT_DTYPES: tuple[str, ...] = get_args(FloatDtypeName)

#: The learned scalars, in Keras's ``get_weights()`` order.
PARAM_NAMES: tuple[str, ...] = ("scale", "concat_score_weight")

Params = Mapping[str, Any] | None
Masks = Sequence[Any] | None

#: ``window``: None or ``(left, right)``, a None side unbounded.
Window = tuple[int | None, int | None] | None
#: ``score_mod(scores [..., Bq, Bk], q_pos [(...,) Bq, 1], kv_pos [1, Bk]) -> scores``.
ScoreMod = Callable[[Array, Array, Array], Array]
#: ``mask_mod(q_pos [(...,) Bq, 1], kv_pos [1, Bk]) -> bool [..., Bq, Bk]`` (broadcastable).
MaskMod = Callable[[Array, Array], Array]
#: What ``precision`` accepts: None, a ``jax.lax.Precision`` or its name (any case).
PrecisionLike = jax.lax.Precision | str | None
#: What ``block_size`` accepts: None, an int, a pair ``(Bq, Bk)``, a mapping of
#: :class:`BlockSizes` fields or a :class:`BlockSizes`.
BlockSizeLike = BlockSizes | int | tuple[int, int] | Mapping[str, int | None] | None
#: What ``dtype`` and ``param_dtype`` accept: a dtype or its name.
DTypeLike = jax.typing.DTypeLike
