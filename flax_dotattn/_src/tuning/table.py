"""The tuned table: per-device crossover and block sizes, read by the automatic choice.

``python -m flax_dotattn.tune`` (:mod:`flax_dotattn._src.tuning.tuner`) measures, on the device it
runs on, where the chunked path starts to beat the materialised one and which blocks the
chunked kernel runs fastest with, and writes them here as a small JSON table. The
dispatcher (:func:`flax_dotattn._src.dispatch.plan`) and the chunked kernel's default
blocks read it through :func:`lookup`, at trace time; without a table (or with
``FLAX_DOTATTN_TUNING=off``) they use the shipped defaults.

Where the table lives: ``$FLAX_DOTATTN_CACHE_DIR`` if set, else
``$XDG_CACHE_HOME/flax_dotattn`` if ``XDG_CACHE_HOME`` is set, else
``~/.cache/flax_dotattn``; one file per backend and device kind,
``tuning-<backend>-<device kind>.json`` (on a CPU the device kind names the host's CPU
model and cores, since XLA calls every CPU "cpu"). A table is used only when its format version,
backend, device kind, jax version and library version all match this process; otherwise
(or when it cannot be read) it is ignored with one warning per file and process.

The table changes speed, never the numbers a user asks for: it is not consulted under
dropout (whose random pattern is drawn per block), explicit ``implementation=`` and
``block_size=`` win over it, and otherwise only the order of the blocks' floating-point
sums can differ (like any two block sizes, to rounding).

Table layout (``"version": 1``)::

    {"format": "flax_dotattn.tuning", "version": 1,
     "key": {"backend": "cpu", "device_kind": "cpu", "jax": "0.10.2", "flax_dotattn": "0.2.0"},
     "cases": {"dot/full/float32": {
         "crossover_bytes": 1048576,
         "blocks": [{"min_length": 724, "max_length": 2048, "block_q": 512, ...},
                    {"min_length": 2049, "max_length": null, "block_q": 2048, ...}]}},
     "kernels": {"pallas_tpu": {"full": [{"min_length": 724, "max_length": null,
                                          "forward": [512, 1024], "backward": [512, 512]}],
                                "causal": [...]}},   # per kernel: see kernel_blocks
     ...}   # plus free-form "machine", "created", "load_average" and "measurements"

A case is ``<score_mode>/<full|causal>/<input dtype>``; ``blocks`` is read in order, the
first entry whose ``min_length`` (query length; absent or null: no bound) is at most ``Tq`` and
whose ``max_length`` is None or at least ``Tq`` applies; a length no entry covers takes
the shipped blocks (the tuner measures blocks at a few lengths and does not extrapolate
below the shortest).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
import json
import math
import os
import pathlib
import platform
import re
import threading
import types
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from flax_dotattn._src.blocks import BlockSizes
from flax_dotattn._src.options import AttentionOptions
from flax_dotattn._src.validation import AttentionInputs
from flax_dotattn._src.version import __version__

#: The format version this library reads and writes.
TABLE_VERSION = 1
TABLE_FORMAT = "flax_dotattn.tuning"
#: The environment variables: the table's directory, and ``off`` to disable tuning.
CACHE_DIR_ENV = "FLAX_DOTATTN_CACHE_DIR"
TUNING_ENV = "FLAX_DOTATTN_TUNING"
_OFF = frozenset({"off", "0", "false", "no"})


class Tuned(NamedTuple):
    """What the table says for one call: the crossover and the blocks (None: not tuned)."""

    device_kind: str
    crossover_bytes: int | None
    blocks: BlockSizes | None


def enabled() -> bool:
    """False when ``FLAX_DOTATTN_TUNING`` is ``off`` (or ``0``, ``false``, ``no``)."""
    return os.environ.get(TUNING_ENV, "").strip().lower() not in _OFF


def cache_dir() -> pathlib.Path:
    """The directory of the tuned tables (see the module docstring)."""
    if os.environ.get(CACHE_DIR_ENV):
        return pathlib.Path(os.environ[CACHE_DIR_ENV]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return pathlib.Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "flax_dotattn"
    return pathlib.Path("~/.cache/flax_dotattn").expanduser()


def device_key() -> dict[str, str]:
    """What a table must match: backend, device kind, jax and library versions."""

    device = jax.devices()[0]
    kind = str(getattr(device, "device_kind", device.platform))
    if device.platform == "cpu":  # XLA names every CPU "cpu": add the host's model and cores
        kind = f"{kind} {host_cpu()} x{_cores()}"
    return {
        "backend": jax.default_backend(),
        "device_kind": kind,
        "jax": jax.__version__,
        "flax_dotattn": __version__,
    }


@functools.cache
def host_cpu() -> str:
    """The host CPU's model name (``/proc/cpuinfo``), else the platform's processor."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def table_path(key: Mapping[str, str] | None = None) -> pathlib.Path:
    """The table file for ``key`` (default: this process's device) in :func:`cache_dir`."""
    key = key or device_key()
    kind = re.sub(r"[^A-Za-z0-9._-]+", "_", key["device_kind"]).strip("_").lower() or "device"
    return cache_dir() / f"tuning-{key['backend']}-{kind}.json"


def case_name(score_mode: str, causal: bool, dtype: Any) -> str:
    """The table's key of a case: ``<score_mode>/<full|causal>/<dtype>``."""
    return f"{score_mode}/{'causal' if causal else 'full'}/{np.dtype(dtype).name}"


def write_table(cases: Mapping[str, Any], **extra: Any) -> pathlib.Path:
    """Writes a table of ``cases`` for this device (atomically) and returns its path;
    ``extra`` are free-form fields (machine, load, measurements). The in-process copy is
    dropped, so the next trace reads the new table."""
    key = device_key()
    table = {"format": TABLE_FORMAT, "version": TABLE_VERSION, "key": key, **extra}
    table["cases"] = {name: dict(case) for name, case in cases.items()}
    problem = _problem(table, key)
    if problem:
        raise ValueError(f"refusing to write a tuning table that would be ignored: {problem}")
    path = table_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(table, indent=1) + "\n")
    os.replace(tmp, path)
    forget()
    return path


_lock = threading.Lock()
_tables: dict[pathlib.Path, dict[str, Any] | None] = {}
_warned: set[pathlib.Path] = set()


def forget() -> None:
    """Drops the tables read so far: the next lookup reads the file again (and may warn
    again). Jitted functions already traced keep the choice they made."""
    with _lock:
        _tables.clear()
        _warned.clear()


def current_table() -> dict[str, Any] | None:
    """This device's table, read once per process and file; None when there is none,
    tuning is off, or the table does not apply (with one warning)."""
    if not enabled():
        return None
    key = device_key()
    path = table_path(key)
    with _lock:
        if path not in _tables:
            _tables[path] = _read(path, key)
        return _tables[path]


def status() -> str:
    """Whether a tuned table is in use, in words (the benchmark prints it)."""
    if not enabled():
        return f"off ({TUNING_ENV}={os.environ.get(TUNING_ENV)}), shipped defaults"
    table = current_table()
    if table is None:
        return f"no tuned table ({table_path()} absent or ignored), shipped defaults"
    created = table.get("created", "at an unknown time")
    return f"tuned table {table_path()} (measured {created} on {table['key']['device_kind']})"


def lookup(score_mode: str, causal: bool, dtype: Any, length: int) -> Tuned | None:
    """The tuned crossover and blocks for a call (``length``: the query length ``Tq``), or
    None without an applicable table. The case of ``dtype`` is used, else float32's."""
    table = current_table()
    if table is None:
        return None
    cases = table["cases"]
    case = cases.get(case_name(score_mode, causal, dtype))
    if case is None:
        case = cases.get(case_name(score_mode, causal, np.float32))
    if case is None:
        return None
    entry = entry_for_length(case.get("blocks") or (), length)
    blocks = None if entry is None else BlockSizes.coerce(_block_fields(entry))
    return Tuned(table["key"]["device_kind"], case.get("crossover_bytes"), blocks)


def length_ranges(lengths: Sequence[int]) -> list[tuple[int, int | None]]:
    """``(min_length, max_length)`` of the entries measured at increasing ``lengths``: each
    reaches halfway (geometrically) to its neighbours, the first down to ``T / sqrt(2)``
    (no extrapolation below) and the last without bound."""
    highs: list[int | None] = [round(math.sqrt(a * b)) for a, b in itertools.pairwise(lengths)]
    highs.append(None)
    lows = [round(lengths[0] / math.sqrt(2))] + [h + 1 for h in highs[:-1] if h is not None]
    return list(zip(lows, highs, strict=True))


def entry_for_length(entries: Any, length: int) -> dict[str, Any] | None:
    """The first of ``entries`` whose ``min_length`` (absent or None: 0) is at most
    ``length`` and whose ``max_length`` is None or at least it; None when none covers it.
    An entry that is not a mapping, or whose bounds are not ints (or None), covers no
    length: a hand-edited or corrupt table falls back to the shipped blocks, never raises
    (the kernels' entries are not checked when the table is read)."""
    for entry in entries:
        if not isinstance(entry, Mapping):
            continue
        low, high = entry.get("min_length"), entry.get("max_length")
        if not all(
            b is None or (isinstance(b, int) and not isinstance(b, bool)) for b in (low, high)
        ):
            continue
        if (low is None or low <= length) and (high is None or length <= high):
            return dict(entry)
    return None


def kernel_entry(name: str) -> dict[str, Any] | None:
    """What the tuner recorded for the accelerator kernel ``name`` (its tuner's entry), or
    None without an applicable table or entry; inside :func:`kernel_override` for
    ``name``, the override."""
    override = _kernel_overrides.get().get(name)
    if override is not None:
        return override
    table = current_table()
    return None if table is None else table.get("kernels", {}).get(name)


def kernel_blocks(
    name: str, causal: bool, length: int, depth: int, itemsize: int
) -> dict[str, Any] | None:
    """The tuned blocks of the accelerator kernel ``name`` for a ``causal`` (or full) call
    of (padded) ``length``, head size ``depth`` and operands of ``itemsize`` bytes: the
    entry of ``kernel_entry(name)["causal" or "full"]`` that covers it (see
    :func:`entry_for_length`), else None (the kernel's own rule applies).

    None too: when tuning is off (``FLAX_DOTATTN_TUNING=off``) and no override is active;
    for an entry measured in Pallas interpret mode (``--smoke`` off the kernel's
    platform), whose timings mean nothing; and for a call with a larger head size or
    wider dtype than the entry's ``depth`` and ``dtype`` (when it states them): blocks
    that fit the kernel's fast memory at the tuned size may not fit it there."""
    entry = kernel_entry(name)
    if not isinstance(entry, dict) or entry.get("interpreted"):
        return None
    tuned_depth, tuned_dtype = entry.get("depth"), entry.get("dtype")
    if tuned_depth is not None and not (isinstance(tuned_depth, int) and depth <= tuned_depth):
        return None
    if tuned_dtype is not None:
        try:
            if itemsize > np.dtype(tuned_dtype).itemsize:
                return None
        except TypeError:
            return None
    entries = entry.get("causal" if causal else "full")
    return entry_for_length(entries, length) if isinstance(entries, list) else None


def tuned_note() -> str:
    """`` (blocks tuned on <device kind>)``, for the reason of a plan whose kernel takes
    the table's blocks (``(blocks tuned)`` under :func:`kernel_override`)."""
    table = current_table()
    return f" (blocks tuned on {table['key']['device_kind']})" if table else " (blocks tuned)"


_kernel_overrides: contextvars.ContextVar[Mapping[str, dict[str, Any]]] = contextvars.ContextVar(
    "flax_dotattn_kernel_overrides", default=types.MappingProxyType({})
)


@contextlib.contextmanager
def kernel_override(name: str, entry: dict[str, Any]) -> Iterator[None]:
    """Calls traced inside read ``entry`` as the kernel ``name``'s table entry (the tuner
    times its candidates this way; jitted functions must be traced inside)."""
    token = _kernel_overrides.set({**_kernel_overrides.get(), name: entry})
    try:
        yield
    finally:
        _kernel_overrides.reset(token)


def for_call(inputs: AttentionInputs, options: AttentionOptions) -> Tuned | None:
    """:func:`lookup` for a checked call; None under dropout, whose random pattern
    depends on the path and the blocks (so the table never changes it)."""
    if options.applied_dropout_rate > 0.0:
        return None
    return lookup(options.score_mode, options.causal, inputs.dtype, inputs.query.shape[-2])


def default_blocks(inputs: AttentionInputs, options: AttentionOptions) -> BlockSizes:
    """The chunked kernel's blocks when ``block_size`` is None: the tuned ones (narrowed
    for a sliding window as :meth:`BlockSizes.default` narrows its own), else the default.
    A mask function takes the causal blocks, which compute less of what it hides."""
    tuned = for_call(inputs, options)
    base = None if tuned is None else tuned.blocks
    length = inputs.query.shape[-2]
    sparse = options.causal or options.mask_mod is not None
    return BlockSizes.default(options.score_mode, options.window, sparse, base=base, length=length)


def _read(path: pathlib.Path, key: Mapping[str, str]) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        table = json.loads(path.read_text())
        problem = _problem(table, key)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        problem = f"it cannot be read ({type(e).__name__}: {e})"
    if problem is None:
        return table
    if path not in _warned:
        _warned.add(path)
        warnings.warn(
            f"flax_dotattn ignores the tuning table {path}: {problem}. The shipped defaults "
            "apply; run `python -m flax_dotattn.tune` to measure this device again, or set "
            f"{TUNING_ENV}=off.",
            RuntimeWarning,
            stacklevel=2,
        )
    return None


def _problem(table: Any, key: Mapping[str, str]) -> str | None:
    """Why ``table`` does not apply to ``key`` (None when it does)."""
    if not isinstance(table, dict) or table.get("format") != TABLE_FORMAT:
        return f"it is not a {TABLE_FORMAT} table"
    if table.get("version") != TABLE_VERSION:
        return f"its version is {table.get('version')!r}, this library reads {TABLE_VERSION}"
    theirs = table.get("key")
    if not isinstance(theirs, dict):
        return "it has no key"
    for field, ours in key.items():
        if theirs.get(field) != ours:
            return f"it was measured with {field}={theirs.get(field)!r}, this is {ours!r}"
    cases = table.get("cases")
    if not isinstance(cases, dict):
        return "it has no cases"
    kernels = table.get("kernels", {})
    if not isinstance(kernels, dict) or not all(isinstance(k, dict) for k in kernels.values()):
        return "its kernels are not a mapping of mappings"
    for name, case in cases.items():
        problem = _case_problem(case)
        if problem:
            return f"case {name!r}: {problem}"
    return None


def _case_problem(case: Any) -> str | None:
    if not isinstance(case, dict):
        return "not a mapping"
    crossover = case.get("crossover_bytes")
    if crossover is not None and (
        not isinstance(crossover, int) or isinstance(crossover, bool) or crossover < 0
    ):
        return f"crossover_bytes must be a non-negative int, not {crossover!r}"
    blocks = case.get("blocks") or []
    if not isinstance(blocks, list):
        return "blocks must be a list"
    for entry in blocks:
        if not isinstance(entry, dict):
            return f"a blocks entry is not a mapping: {entry!r}"
        for bound in ("min_length", "max_length"):
            limit = entry.get(bound)
            if limit is not None and (
                not isinstance(limit, int) or isinstance(limit, bool) or limit < 0
            ):
                return f"{bound} must be a non-negative int or null, not {limit!r}"
        try:
            BlockSizes.coerce(_block_fields(entry))
        except ValueError as e:
            return str(e)
    return None


def _block_fields(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A blocks entry without its length bounds: the BlockSizes fields."""
    return {k: v for k, v in entry.items() if k not in ("min_length", "max_length")}
