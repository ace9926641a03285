"""``DotAttentionConfig``: a frozen, validated, serialisable set of hyper-parameters.

The config round-trips through ``dict``, JSON and YAML files and translates to and from
Keras layer configs (``keras.layers.Attention.get_config()`` in Keras 3, and legacy
``tf.keras`` configs). It knows nothing of the rest of the library.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from flax_dotattn._src.blocks import BlockSizes
from flax_dotattn._src.types import (
    FLOAT_DTYPES,
    IMPLEMENTATIONS,
    PRECISIONS,
    SCORE_MODES,
    FloatDtypeName,
    Implementation,
    PrecisionName,
    ScoreMode,
)

# Generic Keras ``Layer`` keys that carry nothing this library models; ignored on import.
_KERAS_IGNORED_KEYS = frozenset(
    {
        "name",
        "trainable",
        "seed",
        "batch_input_shape",
        "batch_shape",
        "input_shape",
        "autocast",
        "dynamic",
    }
)


def _fail(message: str) -> NoReturn:
    raise ValueError(message)


def _received(name: str, value: Any) -> str:
    return f"received {name}={value!r} of type {type(value).__name__}."


# -- option checks: each returns the canonical value or raises a ValueError naming ``name``.


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        _fail(f"{name} must be a Python bool (it is static under jit); {_received(name, value)}")
    return bool(value)


def _check_optional_bool(name: str, value: Any) -> bool | None:
    if value is not None and not isinstance(value, (bool, np.bool_)):
        _fail(f"{name} must be None or a Python bool; {_received(name, value)}")
    return None if value is None else bool(value)


def _check_choice(choices: tuple[Any, ...]) -> Callable[[str, Any], Any]:
    def check(name: str, value: Any) -> Any:
        if not any(value is c or (type(value) is str and value == c) for c in choices):
            _fail(f"{name} must be one of {choices!r}; received {name}={value!r}.")
        return value

    return check


def _check_dropout_rate(name: str, value: Any) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.integer, np.floating)
    ):
        _fail(f"{name} must be a Python float in [0, 1); {_received(name, value)}")
    # str() of a NumPy scalar is its shortest round-trip repr: np.float32(0.1) -> 0.1.
    rate = float(str(value)) if isinstance(value, np.floating) else float(value)
    if not 0.0 <= rate < 1.0:
        _fail(f"{name} must be in [0, 1); received {name}={rate!r}.")
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
        _fail(
            f"{name} must be {'None or ' if allow_none else ''}one of {FLOAT_DTYPES} (a name "
            f"or a dtype); received {name}={value!r}."
        )
    return dtype


def _check_optional_dtype(name: str, value: Any) -> str | None:
    return float_dtype_name(name, value, allow_none=True)


def _check_precision(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, jax.lax.Precision):
        return value.name.lower()
    if isinstance(value, str) and value.lower() in PRECISIONS:
        return value.lower()
    _fail(
        f"{name} must be None, a jax.lax.Precision or one of {PRECISIONS} (any case); "
        f"received {name}={value!r}."
    )


UNBOUNDED_WINDOW = 2**30  # a window side this large is None (no limit)


def _check_window(name: str, value: Any) -> tuple[int | None, int | None] | None:
    def side(x: Any) -> bool:
        return x is None or (
            isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)) and x >= 0
        )

    if value is None:
        return None
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(map(side, value)):
        # Positions are int32: a side of 2**30 or more lets every query of a sequence
        # shorter than that see every key, exactly as None does, so it becomes None.
        return tuple(None if x is None or x >= UNBOUNDED_WINDOW else int(x) for x in value)
    _fail(
        f"{name} must be None or a pair (left, right) of non-negative ints (None: unbounded "
        f"side); received {name}={value!r}."
    )


def _check_block_size(name: str, value: Any) -> BlockSizes | None:
    return BlockSizes.coerce(value, name)


def _option(default: Any, doc: str, check: Callable[[str, Any], Any]) -> Any:
    """Declares an option: its default, its one-line doc and its check, in one place."""
    return dataclasses.field(default=default, metadata={"doc": doc, "check": check})


@dataclasses.dataclass(frozen=True, kw_only=True)
class DotAttentionConfig:
    """Hyper-parameters of :class:`DotAttention`, frozen, validated and hashable.

    This dataclass is the one declaration of every option: its name, default, allowed
    values, check and one-line doc. The Linen and NNX modules take their fields from it,
    :func:`dot_attention` checks its keyword arguments with the same checks
    (``check_option``), and the docs below are generated from it.

    Being hashable, a config can be a static argument of ``jax.jit`` or a Flax module
    attribute. Dtypes and precision are stored by name so the config serialises.

    Attributes:
      {options}

    Examples:
      >>> from flax_dotattn import DotAttentionConfig
      >>> cfg = DotAttentionConfig(use_scale=True, causal=True)
      >>> DotAttentionConfig.from_dict(cfg.to_dict()) == cfg
      True
      >>> keras_cfg = {"name": "attention", "use_scale": True, "score_mode": "dot",
      ...              "dropout": 0.1, "seed": None, "dtype": "float32"}
      >>> DotAttentionConfig.from_keras(keras_cfg).dropout_rate
      0.1
    """

    use_scale: bool = _option(
        False,
        "learn a scalar ``scale`` that multiplies the logits (inside the ``tanh`` in "
        "concat mode), initialised to 1.0 (Keras ``use_scale``).",
        _check_bool,
    )
    score_mode: ScoreMode = _option(
        "dot",
        '``"dot"`` (``query @ key^T``) or ``"concat"`` (``sum(tanh(query + key))``), as '
        "Keras's ``score_mode``.",
        _check_choice(SCORE_MODES),
    )
    dropout_rate: float = _option(
        0.0,
        "dropout on the attention weights, in ``[0, 1)`` (Keras ``dropout``).",
        _check_dropout_rate,
    )
    causal: bool = _option(
        False,
        "query ``i`` attends to keys ``j <= i`` only, top-left aligned when ``Tq != Tv`` "
        "(see :func:`make_causal_mask`).",
        _check_bool,
    )
    deterministic: bool | None = _option(
        None,
        "True disables dropout; None leaves it to the call, which must then decide "
        "whenever ``dropout_rate > 0``.",
        _check_optional_bool,
    )
    dtype: FloatDtypeName | None = _option(
        None,
        "computation dtype (name or dtype); inputs are cast to it (None: follow the inputs).",
        _check_optional_dtype,
    )
    param_dtype: FloatDtypeName = _option(
        "float32", "dtype (name or dtype) of the learned scalars.", float_dtype_name
    )
    precision: PrecisionName | None = _option(
        None,
        'matmul precision: None, a ``jax.lax.Precision`` or its name (``"default"``, '
        '``"high"``, ``"highest"``, any case).',
        _check_precision,
    )
    window: tuple[int | None, int | None] | None = _option(
        None,
        "sliding window ``(left, right)``: query ``i`` sees keys ``i - left <= j <= i + "
        "right`` (global positions, top-left aligned like ``causal``; a None side, or "
        "one of 2**30 or more, is unbounded); with ``causal=True``, ``(w, 0)`` is a causal "
        "sliding window. The chunked path computes only the blocks inside the band.",
        _check_window,
    )
    implementation: Implementation | None = _option(
        None,
        'None (automatic), ``"xla"``, ``"chunked"`` or ``"cudnn"``; see :func:`dot_attention`.',
        _check_choice(IMPLEMENTATIONS),
    )
    block_size: BlockSizes | None = _option(
        None,
        "blocks of the chunked path: None (the measured default per score mode), an int, "
        "a pair ``(Bq, Bk)`` or a :class:`BlockSizes`.",
        _check_block_size,
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, f.metadata["check"](f.name, getattr(self, f.name)))

    @classmethod
    def of(cls, obj: Any) -> DotAttentionConfig:
        """Reads the fields from same-named attributes of ``obj`` (e.g. a module)."""
        return cls(**{f.name: getattr(obj, f.name) for f in dataclasses.fields(cls)})

    @property
    def param_names(self) -> tuple[str, ...]:
        """Names of the learned scalars, in Keras's ``get_weights()`` order."""
        names = ("scale",) if self.use_scale else ()
        if self.score_mode == "concat":
            names += ("concat_score_weight",)
        return names

    # -- dict ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Returns a plain ``dict`` of the fields (JSON/YAML-serialisable)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if self.block_size is not None:
            data["block_size"] = self.block_size.to_dict()
        if self.window is not None:
            data["window"] = list(self.window)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DotAttentionConfig:
        """Builds a config from a mapping of field names; unknown keys raise ValueError."""
        if not isinstance(data, Mapping):
            _fail(
                "DotAttentionConfig.from_dict expects a mapping of field names; "
                f"received a {type(data).__name__}."
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in data if k not in fields)
        if unknown:
            _fail(
                f"DotAttentionConfig got unknown keys {unknown}; "
                f"expected keys from {sorted(fields)}."
            )
        return cls(**data)

    # -- Keras --------------------------------------------------------------------------

    @classmethod
    def from_keras(cls, keras_config: Mapping[str, Any]) -> DotAttentionConfig:
        """Builds a config from a Keras ``Attention`` layer config.

        Accepts Keras 3's ``layer.get_config()`` (``use_scale``, ``score_mode``,
        ``dropout``, ``seed``, ``dtype`` as a name or a ``DTypePolicy`` dict), legacy
        ``tf.keras`` 2.x configs (which may carry ``causal``), and the serialised form
        ``{"class_name": "Attention", "config": {...}}``.

        Mapping: ``dropout`` -> ``dropout_rate``; a dtype policy ``"mixed_bfloat16"``
        -> ``dtype="bfloat16", param_dtype="float32"``; a plain ``"float32"`` -> both
        ``"float32"``. ``name``, ``trainable`` and ``seed`` are dropped (randomness
        comes from the ``"dropout"`` rng stream here). Any other unknown key raises.

        Args:
          keras_config: the Keras layer config mapping.

        Returns:
          The equivalent ``DotAttentionConfig``.

        Raises:
          ValueError: on unknown keys or invalid values.
        """
        if not isinstance(keras_config, Mapping):
            _fail(
                "from_keras expects a Keras layer config dict; "
                f"received a {type(keras_config).__name__}."
            )
        if "class_name" in keras_config and "config" in keras_config:
            if keras_config["class_name"] != "Attention":
                _fail(
                    "from_keras expects an 'Attention' layer config; received "
                    f"class_name={keras_config['class_name']!r}."
                )
            keras_config = keras_config["config"]
        known = {"use_scale", "score_mode", "dropout", "causal", "dtype"}
        unknown = sorted(str(k) for k in keras_config if k not in known | _KERAS_IGNORED_KEYS)
        if unknown:
            _fail(
                f"from_keras got unknown Keras config keys {unknown}; expected keys from "
                f"{sorted(known | _KERAS_IGNORED_KEYS)}."
            )
        dtype, param_dtype = _from_keras_dtype(keras_config.get("dtype"))
        return cls(
            use_scale=keras_config.get("use_scale", False),
            score_mode=keras_config.get("score_mode", "dot"),
            dropout_rate=keras_config.get("dropout", 0.0),
            causal=keras_config.get("causal", False),
            dtype=dtype,
            param_dtype=param_dtype,
        )

    def to_keras(self, *, legacy: bool = False) -> dict[str, Any]:
        """Returns a config that ``keras.layers.Attention.from_config`` accepts.

        What cannot be carried: ``deterministic`` (Keras uses the call's ``training``
        flag), ``precision``, ``implementation`` and ``block_size`` (Keras has one
        materialised path), ``window`` (with a warning: Keras has none); and in Keras 3
        (``legacy=False``) ``causal``, which is a call argument there
        (``layer(..., use_causal_mask=True)``): a warning is issued when a causal config
        is exported that way. ``dtype=None`` ("follow the inputs")
        exports as the ``param_dtype`` policy.

        Args:
          legacy: emit a ``tf.keras`` 2.x config (with ``causal``) instead of Keras 3's.

        Returns:
          A dict with ``name``, ``trainable``, ``dtype``, ``use_scale``, ``score_mode``,
          ``dropout`` and (Keras 3) ``seed`` or (legacy) ``causal``.
        """
        if self.dtype is None or self.dtype == self.param_dtype:
            policy = self.param_dtype
        elif self.param_dtype == "float32" and self.dtype in ("float16", "bfloat16"):
            policy = f"mixed_{self.dtype}"
        else:
            _fail(
                f"to_keras cannot express dtype={self.dtype!r} with "
                f"param_dtype={self.param_dtype!r} as a Keras dtype policy."
            )
        config: dict[str, Any] = {
            "name": "attention",
            "trainable": True,
            "dtype": policy,
            "use_scale": self.use_scale,
            "score_mode": self.score_mode,
            "dropout": self.dropout_rate,
        }
        if legacy:
            config["causal"] = self.causal
        else:
            config["seed"] = None
            if self.causal:
                warnings.warn(
                    "Keras 3's Attention has no causal config entry; call the layer with "
                    "use_causal_mask=True instead.",
                    UserWarning,
                    stacklevel=2,
                )
        if self.window is not None:
            warnings.warn(
                f"Keras's Attention has no sliding window; window={self.window} is not "
                "exported (build the equivalent mask yourself).",
                UserWarning,
                stacklevel=2,
            )
        return config


OPTIONS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(DotAttentionConfig)}


def check_option(name: str, value: Any) -> Any:
    """Checks one option exactly as :class:`DotAttentionConfig` does; returns its value.

    Raises:
      ValueError: naming ``name``, the allowed values and the received value.
    """
    return OPTIONS[name].metadata["check"](name, value)


def document_options(*names: str, indent: int = 6) -> Callable[[Any], Any]:
    """Fills the ``{options}`` line of a docstring (indented by ``indent``) with Args-style
    entries ``name: one-line doc`` for ``names`` (default: every option)."""

    def fill(obj: Any) -> Any:
        entries = [f"{name}: {OPTIONS[name].metadata['doc']}" for name in names or OPTIONS]
        obj.__doc__ = obj.__doc__.replace("{options}", ("\n" + " " * indent).join(entries))
        return obj

    return fill


document_options(indent=6)(DotAttentionConfig)


def _from_keras_dtype(policy: Any) -> tuple[str | None, str]:
    """Maps a Keras dtype policy (name or serialised dict) to ``(dtype, param_dtype)``."""
    if policy is None:
        return None, "float32"
    name = policy.get("config", {}).get("name") if isinstance(policy, Mapping) else policy
    if not isinstance(name, str):
        _fail(f"from_keras could not read the Keras dtype policy {policy!r}.")
    if name.startswith("mixed_"):
        return float_dtype_name("dtype", name[len("mixed_") :]), "float32"
    return float_dtype_name("dtype", name), float_dtype_name("param_dtype", name)


# -- files ------------------------------------------------------------------------------

_SUFFIXES = {".json": "json", ".yaml": "yaml", ".yml": "yaml"}


def _format_of(path: Path) -> str:
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        _fail(f"config path must end in one of {sorted(_SUFFIXES)}; received {str(path)!r}.")
    return fmt


def save_config(config: DotAttentionConfig, path: str | Path) -> Path:
    """Writes ``config`` to a ``.json``, ``.yaml`` or ``.yml`` file.

    Args:
      config: the config to save.
      path: destination; the suffix picks the format.

    Returns:
      The path written.
    """
    if not isinstance(config, DotAttentionConfig):
        _fail(f"save_config expects a DotAttentionConfig; received a {type(config).__name__}.")
    path = Path(path)
    data = config.to_dict()
    if _format_of(path) == "json":
        path.write_text(json.dumps(data, indent=2) + "\n")
    else:
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def load_config(path: str | Path) -> DotAttentionConfig:
    """Reads a config written by :func:`save_config` (or by hand) from JSON or YAML.

    Args:
      path: a ``.json``, ``.yaml`` or ``.yml`` file holding a mapping of field names.

    Returns:
      The validated ``DotAttentionConfig``.

    Raises:
      ValueError: for an unknown suffix, malformed content, a non-mapping document,
        unknown keys or invalid values.
    """
    path = Path(path)
    fmt = _format_of(path)
    text = path.read_text()
    try:
        data = json.loads(text) if fmt == "json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"could not parse {fmt.upper()} config file {str(path)!r}: {e}") from e
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        _fail(
            f"config file {str(path)!r} must hold a mapping of field names; "
            f"received a {type(data).__name__}."
        )
    return DotAttentionConfig.from_dict(data)
