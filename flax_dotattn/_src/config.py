"""``DotAttentionConfig``: a frozen, validated, serialisable set of hyper-parameters.

The config round-trips through ``dict``, JSON and YAML files and translates to and from
Keras layer configs (``keras.layers.Attention.get_config()`` in Keras 3, and legacy
``tf.keras`` configs). It knows nothing of the rest of the library.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import yaml

_SCORE_MODES = ("dot", "concat")
_PRECISIONS = ("default", "high", "highest")
_IMPLEMENTATIONS = (None, "xla", "chunked", "cudnn")
_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
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


def _fail(message: str) -> None:
    raise ValueError(message)


def _dtype_name(field: str, value: Any, allow_none: bool) -> str | None:
    if value is None:
        if allow_none:
            return None
        _fail(f"DotAttentionConfig.{field} must be one of {_FLOAT_DTYPES}; received None.")
    try:
        name = jnp.dtype(value).name
    except TypeError:
        name = None
    if name not in _FLOAT_DTYPES:
        _fail(
            f"DotAttentionConfig.{field} must be "
            f"{'None or ' if allow_none else ''}one of {_FLOAT_DTYPES}; "
            f"received {field}={value!r}."
        )
    return name


def _precision_name(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, jax.lax.Precision):
        return value.name.lower()
    if isinstance(value, str) and value.lower() in _PRECISIONS:
        return value.lower()
    _fail(
        f"DotAttentionConfig.precision must be None, a jax.lax.Precision or one of "
        f"{_PRECISIONS}; received precision={value!r}."
    )
    return None  # unreachable


def _block_size(value: Any) -> int | tuple[int, int] | None:
    def positive(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 1

    if value is None or positive(value):
        return value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(map(positive, value)):
        return tuple(value)
    _fail(
        "DotAttentionConfig.block_size must be None, a positive int or a pair of them; "
        f"received block_size={value!r}."
    )
    return None  # unreachable


def _check_type(field: str, value: Any, types: tuple[type, ...], expected: str) -> None:
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        _fail(
            f"DotAttentionConfig.{field} must be {expected}; "
            f"received {field}={value!r} of type {type(value).__name__}."
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class DotAttentionConfig:
    """Hyper-parameters of :class:`DotAttention`, frozen, validated and hashable.

    Being hashable, a config can be a static argument of ``jax.jit`` or a Flax module
    attribute. Dtypes and precision are stored by name so the config serialises.

    Attributes:
      use_scale: learn a scalar ``scale`` for the logits (Keras ``use_scale``).
      score_mode: ``"dot"`` or ``"concat"``.
      dropout_rate: dropout on the attention weights, in ``[0, 1)`` (Keras ``dropout``).
      causal: apply the causal mask by default.
      deterministic: default for disabling dropout; None means "decide at call time".
      dtype: computation dtype name (inputs are cast to it), or None to follow inputs.
      param_dtype: dtype name of the learned scalars (default ``"float32"``).
      precision: matmul precision name (``"default"``, ``"high"``, ``"highest"``) or
        None.
      implementation: None (automatic), ``"xla"``, ``"chunked"`` or ``"cudnn"``; see
        :func:`dot_attention`.
      block_size: blocks of the chunked path: None (measured default), an int, or a pair
        ``(block_q, block_k)`` (stored as a tuple; a list is accepted).

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

    use_scale: bool = False
    score_mode: str = "dot"
    dropout_rate: float = 0.0
    causal: bool = False
    deterministic: bool | None = None
    dtype: str | None = None
    param_dtype: str = "float32"
    precision: str | None = None
    implementation: str | None = None
    block_size: int | tuple[int, int] | None = None

    def __post_init__(self) -> None:
        _check_type("use_scale", self.use_scale, (bool,), "a bool")
        _check_type("causal", self.causal, (bool,), "a bool")
        if self.deterministic is not None:
            _check_type("deterministic", self.deterministic, (bool,), "None or a bool")
        _check_type("score_mode", self.score_mode, (str,), f"one of {_SCORE_MODES}")
        if self.score_mode not in _SCORE_MODES:
            _fail(
                f"DotAttentionConfig.score_mode must be one of {_SCORE_MODES}; "
                f"received score_mode={self.score_mode!r}."
            )
        _check_type("dropout_rate", self.dropout_rate, (int, float), "a float in [0, 1)")
        if not 0.0 <= self.dropout_rate < 1.0:
            _fail(
                "DotAttentionConfig.dropout_rate must be in [0, 1); "
                f"received dropout_rate={self.dropout_rate!r}."
            )
        # Normalise to canonical, serialisable values.
        object.__setattr__(self, "dropout_rate", float(self.dropout_rate))
        object.__setattr__(self, "dtype", _dtype_name("dtype", self.dtype, True))
        object.__setattr__(self, "param_dtype", _dtype_name("param_dtype", self.param_dtype, False))
        object.__setattr__(self, "precision", _precision_name(self.precision))
        if self.implementation not in _IMPLEMENTATIONS:
            _fail(
                f"DotAttentionConfig.implementation must be one of {_IMPLEMENTATIONS}; "
                f"received implementation={self.implementation!r}."
            )
        object.__setattr__(self, "block_size", _block_size(self.block_size))

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
        data = dataclasses.asdict(self)
        if isinstance(self.block_size, tuple):
            data["block_size"] = list(self.block_size)
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
        materialised path); and in Keras 3 (``legacy=False``) ``causal``, which is
        a call argument there (``layer(..., use_causal_mask=True)``): a warning is issued
        when a causal config is exported that way. ``dtype=None`` ("follow the inputs")
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
        return config


def _from_keras_dtype(policy: Any) -> tuple[str | None, str]:
    """Maps a Keras dtype policy (name or serialised dict) to ``(dtype, param_dtype)``."""
    if policy is None:
        return None, "float32"
    name = policy.get("config", {}).get("name") if isinstance(policy, Mapping) else policy
    if not isinstance(name, str):
        _fail(f"from_keras could not read the Keras dtype policy {policy!r}.")
    if name.startswith("mixed_"):
        return _dtype_name("dtype", name[len("mixed_") :], False), "float32"
    return _dtype_name("dtype", name, False), _dtype_name("param_dtype", name, False)


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
