"""``DotAttentionFields``: the schema of ``DotAttentionConfig`` (the modules'
hyper-parameters, frozen, validated and hashable).

The schema only: the fields, their checks (from :data:`flax_dotattn._src.options.OPTIONS`)
and the ``dict`` round trip. Keras configs are translated by
:mod:`flax_dotattn._src.config.keras`, which builds on this module; the public class joining
both is :mod:`flax_dotattn._src.config.classes`; files are read and written by
:mod:`flax_dotattn._src.config.files`. It knows nothing of the rest of the library.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Self, TypeVar

from flax_dotattn._src.blocks import BlockSizes
from flax_dotattn._src.mods import to_name
from flax_dotattn._src.options import check_fields, fail
from flax_dotattn._src.types import (
    FloatDtypeName,
    Implementation,
    MaskMod,
    PrecisionName,
    ScoreMod,
    ScoreMode,
    Window,
)

_Config = TypeVar("_Config")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DotAttentionFields:
    """The fields and checks of :class:`DotAttentionConfig` (its schema, with no Keras:
    the Keras translation builds on it)."""

    use_scale: bool = False
    scale_init: float = 1.0
    score_mode: ScoreMode = "dot"
    dropout_rate: float = 0.0
    causal: bool = False
    deterministic: bool | None = None
    dtype: FloatDtypeName | None = None
    param_dtype: FloatDtypeName = "float32"
    precision: PrecisionName | None = None
    window: Window = None
    logits_soft_cap: float | None = None
    score_mod: ScoreMod | None = None
    mask_mod: MaskMod | None = None
    implementation: Implementation | None = None
    block_size: BlockSizes | None = None

    def __post_init__(self) -> None:
        check_fields(self)

    @classmethod
    def of(cls, obj: Any) -> Self:
        """Reads the fields from same-named attributes of ``obj`` (e.g. a module)."""
        return cls(**{f.name: getattr(obj, f.name) for f in dataclasses.fields(cls)})

    def initial_value(self, param: str) -> float:
        """The initial value of the learned scalar ``param``: ``scale_init`` for
        ``"scale"``, 1.0 (Keras's) for ``"concat_score_weight"``."""
        return self.scale_init if param == "scale" else 1.0

    @property
    def param_names(self) -> tuple[str, ...]:
        """Names of the learned scalars, in Keras's ``get_weights()`` order."""
        names: tuple[str, ...] = ("scale",) if self.use_scale else ()
        if self.score_mode == "concat":
            names += ("concat_score_weight",)
        return names

    # -- dict ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Returns a plain ``dict`` of the fields (JSON/YAML-serialisable)."""
        return plain_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Builds a config from a mapping of field names; unknown keys raise ValueError."""
        check_keys(cls, data)
        return cls(**data)


def field_values(config: Any) -> dict[str, Any]:
    """A config dataclass's fields as keyword arguments (of a module's constructor, say)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def plain_dict(config: Any) -> dict[str, Any]:
    """A config's fields as plain data (JSON/YAML-serialisable): ``block_size`` as a dict,
    ``window`` as a list, ``score_mod`` and ``mask_mod`` by their registered names (a
    ValueError for a function that is not registered: it cannot be written)."""
    data = field_values(config)
    for name in ("score_mod", "mask_mod"):
        data[name] = to_name(name, data[name])
    if config.block_size is not None:
        data["block_size"] = config.block_size.to_dict()
    if config.window is not None:
        data["window"] = list(config.window)
    return data


def check_keys(cls: type, data: Any) -> None:
    """Raises a ValueError unless ``data`` is a mapping whose keys are fields of ``cls``."""
    name = cls.__name__
    if not isinstance(data, Mapping):
        fail(
            f"{name}.from_dict expects a mapping of field names; received a {type(data).__name__}."
        )
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in data if k not in fields)
    if unknown:
        fail(f"{name} got unknown keys {unknown}; expected keys from {sorted(fields)}.")


def check_config(config: _Config, where: str) -> _Config:
    """Returns ``config`` if it is a DotAttentionConfig, else raises a ValueError naming
    ``where`` (the function that was given it)."""
    if not isinstance(config, DotAttentionFields):
        fail(f"{where} expects a DotAttentionConfig; received a {type(config).__name__}.")
    return config
