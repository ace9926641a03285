"""Config files: :func:`save_config` and :func:`load_config` for JSON and YAML.

PyYAML is imported only when a YAML file is read or written, so nothing else in the
library needs it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flax_dotattn._src.config.classes import DotAttentionConfig, MultiHeadDotAttentionConfig
from flax_dotattn._src.options import fail

#: What the files hold; a mapping with ``num_heads`` is a multi-head config.
AnyConfig = DotAttentionConfig | MultiHeadDotAttentionConfig

_SUFFIXES = {".json": "json", ".yaml": "yaml", ".yml": "yaml"}


def _format_of(path: Path) -> str:
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        fail(f"config path must end in one of {sorted(_SUFFIXES)}; received {str(path)!r}.")
    return fmt


def _parse(text: str, fmt: str, path: Path) -> Any:
    """The document in ``text``; a ValueError naming ``path`` when it does not parse."""
    if fmt == "json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"could not parse JSON config file {str(path)!r}: {e}") from e
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"could not parse YAML config file {str(path)!r}: {e}") from e


def save_config(config: AnyConfig, path: str | Path) -> Path:
    """Writes ``config`` to a ``.json``, ``.yaml`` or ``.yml`` file.

    Args:
      config: the :class:`DotAttentionConfig` or :class:`MultiHeadDotAttentionConfig` to
        save.
      path: destination; the suffix picks the format.

    Returns:
      The path written.
    """
    if not isinstance(config, (DotAttentionConfig, MultiHeadDotAttentionConfig)):
        fail(
            "save_config expects a DotAttentionConfig or a MultiHeadDotAttentionConfig; "
            f"received a {type(config).__name__}."
        )
    path = Path(path)
    data = config.to_dict()
    if _format_of(path) == "json":
        path.write_text(json.dumps(data, indent=2) + "\n")
    else:
        import yaml

        path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def load_config(path: str | Path) -> AnyConfig:
    """Reads a config written by :func:`save_config` (or by hand) from JSON or YAML.

    Args:
      path: a ``.json``, ``.yaml`` or ``.yml`` file holding a mapping of field names.

    Returns:
      The validated config, a ``MultiHeadDotAttentionConfig`` when the file has a
      ``num_heads`` key and a ``DotAttentionConfig`` otherwise.

    Raises:
      ValueError: for an unknown suffix, malformed content, a non-mapping document,
        unknown keys or invalid values.
    """
    path = Path(path)
    fmt = _format_of(path)
    data = _parse(path.read_text(), fmt, path)
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        fail(
            f"config file {str(path)!r} must hold a mapping of field names; "
            f"received a {type(data).__name__}."
        )
    if "num_heads" in data:
        return MultiHeadDotAttentionConfig.from_dict(data)
    return DotAttentionConfig.from_dict(data)
