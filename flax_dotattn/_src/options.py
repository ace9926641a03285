"""The options spec: every option's default and check, and ``AttentionOptions``.

Each option (``causal``, ``window``, ``score_mode``, ...) is declared once in
:data:`OPTIONS`: its default and its check, which returns the canonical value or raises a
ValueError naming the option, the allowed values and the received value. Everything that
takes an option validates it here: :class:`AttentionOptions` (the options of one attention
call, which the internals pass around), :class:`DotAttentionConfig` (the modules'
hyper-parameters) and, through them, every public entry point. ``tests/test_options.py``
checks that each public signature and module field declares the same names and defaults.

This module knows nothing of the rest of the library.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple, NoReturn

import jax
import jax.numpy as jnp
import numpy as np

from flax_dotattn._src.blocks import BlockSizes
from flax_dotattn._src.mods import check_function
from flax_dotattn._src.types import (
    FLOAT_DTYPES,
    IMPLEMENTATIONS,
    PRECISIONS,
    SCORE_MODES,
    Implementation,
    MaskMod,
    PrecisionName,
    ScoreMod,
    ScoreMode,
    Window,
)


def fail(message: str) -> NoReturn:
    """Raises the ValueError of a rejected input (every check of the library uses it)."""
    raise ValueError(message)


def _received(name: str, value: Any) -> str:
    return f"received {name}={value!r} of type {type(value).__name__}."


# -- checks: each returns the canonical value or raises a ValueError naming ``name``. ----


def check_bool(name: str, value: Any) -> bool:
    """A Python (or NumPy) bool, static under ``jit``: not an array, not an int."""
    if not isinstance(value, (bool, np.bool_)):
        fail(f"{name} must be a Python bool (it is static under jit); {_received(name, value)}")
    return bool(value)


def check_optional_bool(name: str, value: Any) -> bool | None:
    """None or a Python bool."""
    if value is not None and not isinstance(value, (bool, np.bool_)):
        fail(f"{name} must be None or a Python bool; {_received(name, value)}")
    return None if value is None else bool(value)


def check_choice(choices: tuple[Any, ...]) -> Callable[[str, Any], Any]:
    """The check that ``value`` is one of ``choices`` (strings compared by value)."""

    def check(name: str, value: Any) -> Any:
        if not any(value is c or (type(value) is str and value == c) for c in choices):
            fail(f"{name} must be one of {choices!r}; received {name}={value!r}.")
        return value

    return check


def _real_number(name: str, value: Any, wanted: str) -> float:
    """A real (not bool) number as a Python float, or a ValueError saying ``wanted``.
    str() of a NumPy scalar is its shortest round-trip repr: np.float32(0.1) -> 0.1."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.integer, np.floating)
    ):
        fail(f"{name} must be {wanted}; {_received(name, value)}")
    return float(str(value)) if isinstance(value, np.floating) else float(value)


def check_finite_float(name: str, value: Any) -> float:
    """A finite real number, as a Python float."""
    number = _real_number(name, value, "a finite Python float")
    if not np.isfinite(number):
        fail(f"{name} must be finite; received {name}={number!r}.")
    return number


def check_soft_cap(name: str, value: Any) -> float | None:
    """None, or a finite real number > 0 (the cap of ``cap * tanh(logits / cap)``)."""
    if value is None:
        return None
    cap = _real_number(name, value, "None or a finite Python float > 0")
    if not (np.isfinite(cap) and cap > 0.0):
        fail(f"{name} must be None or a finite float > 0; received {name}={cap!r}.")
    return cap


def check_dropout_rate(name: str, value: Any) -> float:
    """A real number in ``[0, 1)``, as a Python float."""
    rate = _real_number(name, value, "a Python float in [0, 1)")
    if not 0.0 <= rate < 1.0:
        fail(f"{name} must be in [0, 1); received {name}={rate!r}.")
    return rate


def float_dtype_name(name: str, value: Any, *, allow_none: bool = False) -> str | None:
    """The canonical name of a floating dtype, or a ValueError naming ``name``."""
    if value is None and allow_none:
        return None
    try:
        dtype = jnp.dtype(value).name if value is not None else None
    except TypeError:
        dtype = None
    if dtype not in FLOAT_DTYPES:
        fail(
            f"{name} must be {'None or ' if allow_none else ''}one of {FLOAT_DTYPES} (a name "
            f"or a dtype); received {name}={value!r}."
        )
    return dtype


def check_optional_dtype(name: str, value: Any) -> str | None:
    """None or the name of a floating dtype."""
    return float_dtype_name(name, value, allow_none=True)


def check_precision(name: str, value: Any) -> str | None:
    """None, or the lower-case name of a ``jax.lax.Precision`` (given as one or by name)."""
    if value is None:
        return None
    if isinstance(value, jax.lax.Precision):
        return value.name.lower()
    if isinstance(value, str) and value.lower() in PRECISIONS:
        return value.lower()
    fail(
        f"{name} must be None, a jax.lax.Precision or one of {PRECISIONS} (any case); "
        f"received {name}={value!r}."
    )


def to_lax_precision(name: str | None) -> jax.lax.Precision | None:
    """A checked precision name as the ``jax.lax.Precision`` the matmuls take."""
    return None if name is None else jax.lax.Precision[name.upper()]


UNBOUNDED_WINDOW = 2**30  # a window side this large is None (no limit)


def check_window(name: str, value: Any) -> tuple[int | None, int | None] | None:
    """None, or a pair ``(left, right)`` of non-negative ints or None (unbounded)."""

    def side(x: Any) -> bool:
        return x is None or (
            isinstance(x, (int, np.integer))
            and not isinstance(x, (bool, np.bool_))
            and bool(x >= 0)
        )

    if value is None:
        return None
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(map(side, value)):
        # Positions are int32: a side of 2**30 or more lets every query of a sequence
        # shorter than that see every key, exactly as None does, so it becomes None.
        left, right = (None if x is None or x >= UNBOUNDED_WINDOW else int(x) for x in value)
        return left, right
    fail(
        f"{name} must be None or a pair (left, right) of non-negative ints (None: unbounded "
        f"side); received {name}={value!r}."
    )


def check_block_size(name: str, value: Any) -> BlockSizes | None:
    """None, or a :class:`BlockSizes` read from an int, a pair, a mapping or itself."""
    return BlockSizes.coerce(value, name)


# -- the spec ---------------------------------------------------------------------------


class Option(NamedTuple):
    """One option: its default and its check (returns the canonical value or raises)."""

    default: Any
    check: Callable[[str, Any], Any]


#: Every option of the library, by name. The modules' hyper-parameters
#: (:class:`DotAttentionConfig`) are all but ``return_attention_scores``, a call argument;
#: the options of one call (:class:`AttentionOptions`) are all but ``use_scale``,
#: ``scale_init`` and the dtypes, which the modules apply before calling.
OPTIONS: Mapping[str, Option] = MappingProxyType(
    {
        "use_scale": Option(False, check_bool),
        "scale_init": Option(1.0, check_finite_float),
        "score_mode": Option("dot", check_choice(SCORE_MODES)),
        "dropout_rate": Option(0.0, check_dropout_rate),
        "causal": Option(False, check_bool),
        "deterministic": Option(None, check_optional_bool),
        "dtype": Option(None, check_optional_dtype),
        "param_dtype": Option("float32", float_dtype_name),
        "precision": Option(None, check_precision),
        "window": Option(None, check_window),
        "logits_soft_cap": Option(None, check_soft_cap),
        "score_mod": Option(None, check_function),
        "mask_mod": Option(None, check_function),
        "implementation": Option(None, check_choice(IMPLEMENTATIONS)),
        "block_size": Option(None, check_block_size),
        "return_attention_scores": Option(False, check_bool),
    }
)


def check_fields(obj: Any) -> None:
    """Replaces every field of the frozen dataclass ``obj`` by its checked value."""
    for f in dataclasses.fields(obj):
        object.__setattr__(obj, f.name, OPTIONS[f.name].check(f.name, getattr(obj, f.name)))


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionOptions:
    """The options of one attention call, checked once: what the internals pass around.

    Built by every entry point from its keyword arguments (:meth:`from_arguments`); an
    entry point that lacks an option (``ring_attention`` has no ``implementation``) gets
    its default. Frozen and hashable, so it can be a static argument under ``jax.jit``.
    ``precision`` is held by name and ``block_size`` as a :class:`BlockSizes` (or None).

    Raises:
      ValueError: for an invalid option, and for ``dropout_rate > 0`` with
        ``deterministic=None``.
    """

    causal: bool = False
    window: Window = None
    logits_soft_cap: float | None = None
    score_mod: ScoreMod | None = None
    mask_mod: MaskMod | None = None
    score_mode: ScoreMode = "dot"
    dropout_rate: float = 0.0
    deterministic: bool | None = None
    return_attention_scores: bool = False
    precision: PrecisionName | None = None
    implementation: Implementation | None = None
    block_size: BlockSizes | None = None

    def __post_init__(self) -> None:
        check_fields(self)
        if self.dropout_rate > 0.0 and self.deterministic is None:
            fail(
                "deterministic must be True or False when dropout_rate > 0 (True: no "
                "dropout, as at inference); received deterministic=None with "
                f"dropout_rate={self.dropout_rate}."
            )

    @classmethod
    def from_arguments(cls, arguments: Mapping[str, Any]) -> AttentionOptions:
        """The options among an entry point's arguments, given by name (the entry
        point's ``locals()`` on entry, or a bound signature's ``arguments``); other
        names (arrays, ``mesh``, ...) are left out, and absent options take defaults."""
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{name: arguments[name] for name in names if name in arguments})

    @property
    def dropout(self) -> bool:
        """Whether dropout applies: a positive rate and ``deterministic=False``."""
        return self.dropout_rate > 0.0 and self.deterministic is False

    @property
    def applied_dropout_rate(self) -> float:
        """The rate the kernels apply: ``dropout_rate``, or 0 when dropout is off."""
        return self.dropout_rate if self.dropout else 0.0

    @property
    def lax_precision(self) -> jax.lax.Precision | None:
        """``precision`` as the ``jax.lax.Precision`` the matmuls take."""
        return to_lax_precision(self.precision)

    def dropout_key(self, dropout_rng: Any) -> Any:
        """The dropout key the kernels use: ``dropout_rng`` when dropout applies (where it
        is required), else None."""
        if not self.dropout:
            return None
        if dropout_rng is None:
            fail(
                "dropout_rng is required when deterministic=False and dropout_rate > 0; "
                f"received dropout_rng=None with dropout_rate={self.dropout_rate}."
            )
        return dropout_rng
