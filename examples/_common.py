"""Shared helpers for the examples: YAML configs with command-line overrides, progress bars."""

from __future__ import annotations

import argparse
import pathlib
from collections.abc import Sequence
from typing import Any

import yaml
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def _parser_for(value: Any):
    if isinstance(value, bool):
        return lambda s: {"true": True, "false": False}[s.lower()]
    if isinstance(value, int):
        return int
    if isinstance(value, float):
        return float
    return str


def load_example_config(name: str, argv: Sequence[str] | None, description: str) -> dict:
    """Reads ``configs/<name>.yaml``; every top-level scalar key becomes a ``--key`` flag.

    ``--config PATH`` picks another file. Nested mappings (e.g. ``attention:``) are kept
    as they are.
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=str(CONFIGS / f"{name}.yaml"))
    known, _ = pre.parse_known_args(argv)
    config = yaml.safe_load(pathlib.Path(known.config).read_text())
    parser = argparse.ArgumentParser(description=description, parents=[pre])
    for key, value in config.items():
        if not isinstance(value, dict):
            parser.add_argument(
                f"--{key.replace('_', '-')}",
                dest=key,
                default=value,
                type=_parser_for(value),
                help=f"(default: {value})",
            )
    args = parser.parse_args(argv)
    return {**config, **{k: v for k, v in vars(args).items() if k != "config"}}


def progress() -> Progress:
    """A rich progress bar with a live status field."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
    )
