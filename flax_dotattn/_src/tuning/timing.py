"""Interleaved wall-clock timing, shared by the benchmark and the tuner, and the tuner's inputs."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

import jax


def time_interleaved(
    entries: Mapping[str, tuple[Callable, tuple]], repeats: int, sample_seconds: float = 0.05
) -> dict[str, float]:
    """Median seconds per call of each entry (name -> ``(function, arguments)``).

    Each function is called once to compile and warm up. Then ``repeats`` rounds take one
    sample of every entry in turn, in reversed order every other round, so that a slow
    drift of a shared machine (or the cache state one entry leaves to the next) touches
    all of them alike. A sample runs enough back-to-back calls to last about
    ``sample_seconds``, so that short calls are not dominated by the timer and dispatch.
    """
    calls = {}
    for name, (fn, args) in entries.items():
        jax.block_until_ready(fn(*args))  # compile and warm up
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        calls[name] = max(1, int(sample_seconds / max(time.perf_counter() - start, 1e-6)))
    samples: dict[str, list[float]] = {name: [] for name in entries}
    order = list(entries)
    for round_ in range(repeats):
        for name in order if round_ % 2 == 0 else order[::-1]:
            (fn, args), n = entries[name], calls[name]
            start = time.perf_counter()
            for _ in range(n):
                out = fn(*args)
            jax.block_until_ready(out)
            samples[name].append((time.perf_counter() - start) / n)
    return {name: statistics.median(s) for name, s in samples.items()}


def attention_inputs(b: int, t: int, d: int, dtype: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Fixed random ``query, key, value [b, t, d]`` in ``dtype`` (query and key scaled by
    0.1, so that the softmax is neither flat nor saturated)."""
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = (jax.random.normal(kq, (b, t, d)) * 0.1).astype(dtype)
    k = (jax.random.normal(kk, (b, t, d)) * 0.1).astype(dtype)
    v = jax.random.normal(kv, (b, t, d)).astype(dtype)
    return q, k, v
