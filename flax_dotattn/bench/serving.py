"""The ``serving`` scenario: decoding steps of :class:`MultiHeadDotAttention` as a server
runs them.

* A local layer (causal window of :data:`SERVING_WINDOW` past keys) at position
  :data:`SERVING_CONTEXT` - 1: one step on the full cache of :data:`SERVING_CONTEXT` slots
  against one on a rolling cache of ``window + 1`` slots, with the bytes each cache holds.
* A ragged batch: :data:`SERVING_BATCH` sequences at different positions of a
  :data:`SERVING_RAGGED_LENGTH`-slot cache, one step for all (one ``cache_index`` per
  sequence) against one call per sequence.

Each step is jitted with the cache donated and runs in a decoding loop (each step's cache
is the next one's input, the positions advancing), as a server runs it; the time is the
median over rounds of :data:`SERVING_STEPS` steps, the entries interleaved. 4 heads of
depth 64, 256 features, float32, forward.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flax_dotattn import MultiHeadDotAttention
from flax_dotattn._src.modules import multi_head

#: The local layer's context (the full cache's slots) and window.
SERVING_CONTEXT, SERVING_WINDOW = 32768, 1024
#: The ragged batch: sequences, and the slots of their cache.
SERVING_BATCH, SERVING_RAGGED_LENGTH = 8, 4096
_HEADS, _KEY_DIM, _FEATURES = 4, 64, 256
#: Steps per timed round.
SERVING_STEPS = 10


def _cache(
    layer: MultiHeadDotAttention, batch: int, slots: int, index: Any, per_sequence: bool = False
) -> dict[str, jax.Array]:
    """A filled Linen cache collection: random keys and values, ``cache_index=index``."""
    empty = multi_head.empty_cache(
        layer.config, (batch,), slots, jnp.float32, per_sequence=per_sequence
    )
    k1, k2 = jax.random.split(jax.random.key(1))
    return {
        "cached_key": jax.random.normal(k1, empty.key.shape),
        "cached_value": jax.random.normal(k2, empty.value.shape),
        "cache_index": jnp.asarray(index, jnp.int32).reshape(empty.cache_index.shape),
        "cached_mask": empty.mask,
    }


def _step(layer: MultiHeadDotAttention, params: Any):
    """``step(cache, x) -> (output, new cache)``, jitted with the cache donated."""
    decoder = layer.clone(decode=True)

    def step(cache, x):
        out, variables = decoder.apply({"params": params, "cache": cache}, x, x, mutable=["cache"])
        return out, variables["cache"]

    return jax.jit(step, donate_argnums=0)


def _time_loops(entries: dict[str, tuple[Any, Any, Any]], repeats: int) -> dict[str, float]:
    """Median seconds per step of each ``name -> (step, state, x)`` decoding loop: one
    warm-up step, then ``repeats`` interleaved rounds of :data:`SERVING_STEPS` steps."""
    states = {
        name: jax.block_until_ready(step(state, x))[1] for name, (step, state, x) in entries.items()
    }
    samples: dict[str, list[float]] = {name: [] for name in entries}
    order = list(entries)
    for round_ in range(repeats):
        for name in order if round_ % 2 == 0 else order[::-1]:
            step, _, x = entries[name]
            state = states[name]
            start = time.perf_counter()
            outputs = []
            for _ in range(SERVING_STEPS):
                out, state = step(state, x)
                outputs.append(out)  # every step's output is computed and waited for
            states[name] = jax.block_until_ready((outputs, state))[1]
            samples[name].append((time.perf_counter() - start) / SERVING_STEPS)
    return {name: float(np.median(s)) for name, s in samples.items()}


def _mib(cache: dict[str, jax.Array]) -> float:
    return sum(x.nbytes for x in cache.values()) / 2**20


def serving_rows(repeats: int) -> list[dict[str, Any]]:
    """Times the scenario's steps (interleaved) and prints and returns one row each."""
    rows = []
    local = MultiHeadDotAttention(
        num_heads=_HEADS, key_dim=_KEY_DIM, causal=True, window=(SERVING_WINDOW, 0)
    )
    small = jnp.zeros((1, 4, _FEATURES))
    params = local.init(jax.random.key(0), small, small)["params"]
    x = jax.random.normal(jax.random.key(2), (1, 1, _FEATURES))
    # The loop ends at the last position: it starts (repeats * steps + 1) positions before.
    position = SERVING_CONTEXT - (repeats * SERVING_STEPS + 1)
    caches = {
        "local_full_cache": (local, _cache(local, 1, SERVING_CONTEXT, position)),
        "local_rolling_cache": (
            local.clone(rolling_cache=True),
            _cache(local, 1, SERVING_WINDOW + 1, position),
        ),
    }
    sizes = {name: _mib(c) for name, (_, c) in caches.items()}
    entries = {name: (_step(layer, params), c, x) for name, (layer, c) in caches.items()}
    seconds = _time_loops(entries, repeats)
    for name in caches:
        row = dict(
            scenario="serving",
            entry=name,
            length=SERVING_CONTEXT,
            window=SERVING_WINDOW,
            seconds=seconds[name],
            cache_mib=sizes[name],
        )
        rows.append(row)
        print(
            f"serving  {name:22} T={SERVING_CONTEXT} window={SERVING_WINDOW}: "
            f"{seconds[name] * 1e3:8.3f} ms per step, cache {row['cache_mib']:.2f} MiB",
            flush=True,
        )

    full = MultiHeadDotAttention(num_heads=_HEADS, key_dim=_KEY_DIM, causal=True)
    room = repeats * SERVING_STEPS + 1
    positions = np.random.default_rng(0).integers(16, SERVING_RAGGED_LENGTH - room, SERVING_BATCH)
    ragged = _cache(full, SERVING_BATCH, SERVING_RAGGED_LENGTH, positions, per_sequence=True)
    tokens = jax.random.normal(jax.random.key(3), (SERVING_BATCH, 1, _FEATURES))
    one_step = _step(full.clone(per_sequence_cache=True), params)
    single = _step(full, params)
    alone = [
        {name: x[i : i + 1] for name, x in ragged.items() if name != "cache_index"}
        | {"cache_index": ragged["cache_index"][i]}
        for i in range(SERVING_BATCH)
    ]

    def separate(caches, tokens):
        steps = [single(c, tokens[i : i + 1]) for i, c in enumerate(caches)]
        return [out for out, _ in steps], [c for _, c in steps]

    seconds = _time_loops(
        {
            "ragged_batch_one_step": (one_step, ragged, tokens),
            "one_call_per_sequence": (separate, alone, tokens),
        },
        repeats,
    )
    for name in ("ragged_batch_one_step", "one_call_per_sequence"):
        row = dict(
            scenario="serving",
            entry=name,
            length=SERVING_RAGGED_LENGTH,
            batch=SERVING_BATCH,
            seconds=seconds[name],
        )
        rows.append(row)
        print(
            f"serving  {name:22} B={SERVING_BATCH} T={SERVING_RAGGED_LENGTH} (positions "
            f"{positions.min()}..{positions.max()}): {seconds[name] * 1e3:8.3f} ms per step",
            flush=True,
        )
    return rows
