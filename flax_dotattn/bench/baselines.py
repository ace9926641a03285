"""The implementations flax_dotattn is compared with, on ``[B, T, D]`` inputs.

* ``naive``: einsum -> softmax -> einsum, the textbook baseline.
* ``jax_nn``: ``jax.nn.dot_product_attention`` on ``[B, T, 1, D]`` with ``scale=1.0``.
* ``keras``: Keras 3's ``keras.layers.Attention`` on the JAX backend.
* ``torch_sdpa``: PyTorch's ``scaled_dot_product_attention`` with ``scale=1.0``.

Keras and PyTorch are optional: each is imported only when its entry is built or probed
by :func:`available`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Attend = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def cores() -> int:
    """The cores this process may run on (XLA's CPU client uses all of them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def naive(t: int, causal: bool) -> Attend:
    """Einsum -> softmax -> einsum on ``q, k, v`` of length ``t``."""

    def attend(q, k, v):
        s = jnp.einsum("bqd,bkd->bqk", q, k)  # [B, Tq, Tv]
        if causal:
            s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
        return jnp.einsum("bqk,bkd->bqd", jax.nn.softmax(s, axis=-1), v)

    return attend


def jax_nn(causal: bool) -> Attend:
    """``jax.nn.dot_product_attention`` with one head and ``scale=1.0``."""

    def attend(q, k, v):
        out = jax.nn.dot_product_attention(
            q[:, :, None], k[:, :, None], v[:, :, None], scale=1.0, is_causal=causal
        )  # [B, T, 1, D]
        return out[:, :, 0]

    return attend


def keras_attention(causal: bool) -> Attend:
    """Keras 3's ``Attention`` layer (no learned scale), which must run on JAX."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras

    if keras.backend.backend() != "jax":
        raise RuntimeError("the keras entry needs KERAS_BACKEND=jax")
    layer = keras.layers.Attention()

    def attend(q, k, v):
        return layer([q, v, k], use_causal_mask=causal)

    return attend


def torch_sdpa(mode: str, q, k, v, causal: bool) -> tuple[Callable, tuple]:
    """Torch SDPA and its inputs, copies of ``q, k, v`` as ``[B, 1, T, D]``: torch takes its
    fused CPU (flash) kernel only for 4-D inputs. ``mode="fwd_bwd"`` returns the gradients
    of ``sum(out**2)``, as the JAX entries do."""
    import torch
    from torch.nn import functional

    torch.set_num_threads(cores())
    grad = mode != "fwd"
    qt, kt, vt = (torch.from_numpy(np.array(x)[:, None]).requires_grad_(grad) for x in (q, k, v))

    def run(q_, k_, v_):
        sdpa = functional.scaled_dot_product_attention
        if not grad:
            with torch.no_grad():
                return sdpa(q_, k_, v_, is_causal=causal, scale=1.0)
        out = sdpa(q_, k_, v_, is_causal=causal, scale=1.0)
        return torch.autograd.grad((out**2).sum(), (q_, k_, v_))

    return run, (qt, kt, vt)


def assert_torch_matches(ours, theirs, mode: str) -> None:
    """Checks :func:`torch_sdpa`'s result ``theirs`` against the JAX entry's ``ours``."""
    theirs = (theirs,) if mode == "fwd" else theirs
    for a, b in zip(jax.tree.leaves(ours), theirs, strict=True):
        np.testing.assert_allclose(b.detach().numpy()[:, 0], np.asarray(a), rtol=2e-3, atol=2e-4)


def available(impls: Sequence[str]) -> list[str]:
    """``impls`` without ``keras`` and ``torch_sdpa`` when they are not installed (said on
    stderr)."""
    impls = list(impls)
    if "keras" in impls:
        os.environ.setdefault("KERAS_BACKEND", "jax")
        try:
            import keras  # noqa: F401
        except ImportError:
            print("keras is not installed: skipping the keras entry", file=sys.stderr)
            impls.remove("keras")
    if "torch_sdpa" in impls:
        try:
            import torch  # noqa: F401
        except ImportError:
            print(
                'PyTorch is not installed (pip install -e ".[bench]"): skipping torch_sdpa',
                file=sys.stderr,
            )
            impls.remove("torch_sdpa")
    return impls
