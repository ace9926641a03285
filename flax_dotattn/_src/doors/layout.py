"""From ``jax.nn``'s and Flax's layout to :func:`dot_attention`'s, and back.

``jax.nn`` and Flax lay attention out sequence-first, ``[batch..., T, N, H]`` (queries,
``N`` heads) and ``[batch..., S, K, H]`` (keys and values, ``K`` heads dividing ``N``), with
masks and biases broadcastable to ``[batch..., N, T, S]``. :func:`dot_attention` takes
``[..., T, D]``. Query head ``n`` reads key/value head ``n // G`` (``G = N // K``), so the
query becomes ``[batch..., K, G, T, H]`` and keys/values ``[batch..., K, 1, S, H]``: grouped
heads broadcast without copies. With ``K == N`` the group axis is left out.

This module imports neither flax nor keras.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from flax_dotattn._src.options import fail
from flax_dotattn._src.types import Array


class Heads(NamedTuple):
    """How the heads of one call are laid out: ``N`` query heads over ``K`` key/value heads,
    after ``batch_ndim`` batch dims."""

    batch_ndim: int
    query_heads: int  # N
    kv_heads: int  # K

    @property
    def groups(self) -> int:
        """``G = N // K``, the query heads that share one key/value head."""
        return self.query_heads // self.kv_heads

    @property
    def head_ndim(self) -> int:
        """How many dims the heads take in :func:`dot_attention`'s layout (2 when grouped)."""
        return 1 if self.groups == 1 else 2

    def query(self, x: Array) -> Array:
        """``[batch..., T, N, H]`` -> ``[batch..., K, G, T, H]`` (``[batch..., N, T, H]``)."""
        x = jnp.swapaxes(x, -3, -2)  # [batch..., N, T, H]
        if self.groups == 1:
            return x
        return x.reshape(x.shape[:-3] + (self.kv_heads, self.groups) + x.shape[-2:])

    def key_value(self, x: Array) -> Array:
        """``[batch..., S, K, H]`` -> ``[batch..., K, 1, S, H]`` (``[batch..., K, S, H]``)."""
        x = jnp.swapaxes(x, -3, -2)  # [batch..., K, S, H]
        return x if self.groups == 1 else x[..., None, :, :]

    def output(self, x: Array) -> Array:
        """``[batch..., K, G, T, Hv]`` (``[batch..., N, T, Hv]``) -> ``[batch..., T, N, Hv]``."""
        if self.groups > 1:
            x = x.reshape(x.shape[:-4] + (self.query_heads,) + x.shape[-2:])
        return jnp.swapaxes(x, -3, -2)

    def pairs(self, name: str, x: Array, tq: int, tv: int, batch: tuple[int, ...]) -> Array:
        """A mask or bias broadcastable (NumPy rules) to ``[batch..., N, T, S]`` in the
        layout of the grouped query's weights: full rank, each dim 1 or full, the head dim
        split into ``[K, G]`` (or ``[1, 1]``).

        Raises:
          ValueError: naming ``name`` when ``x`` does not broadcast to
            ``[batch..., N, T, S]``.
        """
        target = batch + (self.query_heads, tq, tv)
        if x.ndim > len(target) or not all(
            s in (1, t) for s, t in zip(x.shape[::-1], target[::-1], strict=False)
        ):
            fail(
                f"{name} must broadcast (NumPy rules) to [batch..., N, T, S] = {target}; "
                f"received shape {tuple(x.shape)}."
            )
        x = x.reshape((1,) * (len(target) - x.ndim) + x.shape)
        if self.groups == 1:
            return x
        heads = (self.kv_heads, self.groups) if x.shape[-3] > 1 else (1, 1)
        return x.reshape(x.shape[:-3] + heads + x.shape[-2:])

    def per_sequence(self, x: Array) -> Array:
        """``[batch...]`` -> ``[batch..., 1, (1)]``: one value per sequence (a length) at
        the rank of the grouped query's batch dims."""
        return x.reshape(x.shape + (1,) * self.head_ndim)

    def per_query(self, x: Array) -> Array:
        """``[batch..., T]`` -> ``[batch..., 1, (1), T]``: one value per query position (a
        query mask) at the grouped query's rank but its depth."""
        return x.reshape(x.shape[:-1] + (1,) * self.head_ndim + x.shape[-1:])
