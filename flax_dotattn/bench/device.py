"""``--device``: the accelerator table, ready to run on a GPU or TPU.

bfloat16 ``[B, H, T, D]`` inputs (``B = 1``, ``H = 8``, ``D = 128`` by default), ``T`` from
1024 to 32768, forward and forward+backward (the gradients of ``sum(out**2)``), each
implementation at ``scale = 1`` on the layout it takes natively (no transposes timed):

* ``ours``: :func:`flax_dotattn.dot_attention` with the automatic choice; the row names
  the kernel :func:`flax_dotattn.which_implementation` reports for the inputs;
* ``jax_nn_cudnn`` (GPU only): ``jax.nn.dot_product_attention(implementation="cudnn")``
  on ``[B, T, H, D]``;
* ``splash`` (TPU only): JAX's splash attention kernel called directly
  (``make_splash_mha_single_device`` with a full or causal mask, vmapped over ``B``);
* ``naive``: einsum -> softmax -> einsum, up to ``--max-naive-length``.

Entries another platform lacks are skipped with a line on stderr, so the same command runs
anywhere (on CPU it times ``ours`` and ``naive`` only: a smoke test at tiny sizes). Peak
memory is not probed here (the ``/proc`` probe sees host memory only).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from flax_dotattn import dot_attention, which_implementation

DEVICE_IMPLS = ("ours", "jax_nn_cudnn", "splash", "naive")
DEVICE_LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
DEVICE_BATCH, DEVICE_HEADS, DEVICE_DEPTH = 1, 8, 128
#: The platform each optional entry needs.
NEEDS_PLATFORM = {"jax_nn_cudnn": "gpu", "splash": "tpu"}


def available(impls: Sequence[str], platform: str | None = None) -> list[str]:
    """``impls`` without the entries this platform lacks (said on stderr)."""
    platform = platform or jax.default_backend()
    kept = []
    for impl in impls:
        needed = NEEDS_PLATFORM.get(impl)
        if needed is not None and needed != platform:
            print(f"{impl} needs a {needed.upper()}; skipping it on {platform}", file=sys.stderr)
            continue
        kept.append(impl)
    return kept


def _inputs(b: int, h: int, t: int, d: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """bfloat16 ``[B, H, T, D]`` query, key and value."""
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    shape = (b, h, t, d)
    q = jax.random.normal(kq, shape, jnp.float32) * d**-0.5
    k = jax.random.normal(kk, shape, jnp.float32)
    v = jax.random.normal(kv, shape, jnp.float32)
    return tuple(x.astype(jnp.bfloat16) for x in (q, k, v))  # type: ignore[return-value]


def _naive(causal: bool) -> Callable:
    def attend(q, k, v):  # [B, H, T, D]
        s = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
        if causal:
            t = q.shape[-2]
            s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
        w = jax.nn.softmax(s, axis=-1).astype(v.dtype)
        return jnp.einsum("bhqk,bhkd->bhqd", w, v)

    return attend


def _cudnn(causal: bool) -> Callable:
    def attend(q, k, v):  # [B, T, H, D]
        return jax.nn.dot_product_attention(
            q, k, v, scale=1.0, is_causal=causal, implementation="cudnn"
        )

    return attend


def _splash(h: int, t: int, causal: bool) -> Callable:
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as masks,
    )

    one = masks.CausalMask((t, t)) if causal else masks.FullMask((t, t))
    kernel = splash.make_splash_mha_single_device(masks.MultiHeadMask([one] * h))
    return jax.vmap(kernel)  # [B, H, T, D]


def build(spec: dict[str, Any]) -> tuple[Callable, tuple]:
    """A jitted entry and its inputs from ``{"device": impl, "mode", "b", "h", "t", "d",
    "causal"}``."""
    impl, mode, causal = spec["device"], spec["mode"], spec.get("causal", False)
    b, h, t, d = spec["b"], spec["h"], spec["t"], spec["d"]
    q, k, v = _inputs(b, h, t, d)
    if impl == "ours":
        attend: Callable = lambda q, k, v: dot_attention(None, q, v, k, causal=causal)  # noqa: E731
    elif impl == "naive":
        attend = _naive(causal)
    elif impl == "jax_nn_cudnn":
        attend = _cudnn(causal)
        q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, T, H, D]
    elif impl == "splash":
        attend = _splash(h, t, causal)
    else:
        raise ValueError(f"--device entries are {DEVICE_IMPLS}; received {impl!r}.")
    if mode == "fwd":
        return jax.jit(attend), (q, k, v)

    def loss(q, k, v):
        return jnp.sum(jnp.square(attend(q, k, v).astype(jnp.float32)))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2))), (q, k, v)


def kernel_name(spec: dict[str, Any]) -> str:
    """The kernel an entry runs: for ``ours``, what :func:`which_implementation` says."""
    impl = spec["device"]
    if impl != "ours":
        return {"naive": "xla einsum", "jax_nn_cudnn": "cudnn", "splash": "splash"}[impl]
    # which_implementation reads shapes and dtypes only: a host array costs no device memory.
    dummy = cast(jax.Array, np.empty((spec["b"], spec["h"], spec["t"], spec["d"]), jnp.bfloat16))
    return which_implementation(None, dummy, dummy, causal=spec.get("causal", False)).implementation


def flops(mode: str, b: int, h: int, t: int, d: int, causal: bool) -> float:
    """Model FLOPs: 2 matmuls forward, 4 more backward; half of them under ``causal``."""
    per_matmul = 2.0 * b * h * t * t * d * (0.5 if causal else 1.0)
    return per_matmul * (2 if mode == "fwd" else 6)


def rows(
    impls: Sequence[str],
    lengths: Sequence[int],
    *,
    batch: int,
    heads: int,
    depth: int,
    modes: Sequence[str],
    causal: bool,
    repeats: int,
    max_naive_length: int,
    time_entries: Callable[[dict[str, dict[str, Any]], int], dict[str, float]],
) -> list[dict[str, Any]]:
    """Times each length and mode (entries interleaved); prints and returns one row per
    entry, with the kernel it took."""
    out = []
    for t in lengths:
        for mode in modes:
            names = [i for i in impls if i != "naive" or t <= max_naive_length]
            specs = {
                i: dict(device=i, mode=mode, b=batch, h=heads, t=t, d=depth, causal=causal)
                for i in names
            }
            seconds = time_entries(specs, repeats)
            for i in names:
                s = seconds[i]
                row = dict(
                    batch=batch,
                    heads=heads,
                    length=t,
                    depth=depth,
                    mode=mode,
                    causal=causal,
                    impl=i,
                    kernel=kernel_name(specs[i]),
                    seconds=s,
                    tflops=flops(mode, batch, heads, t, depth, causal) / s / 1e12,
                    speedup_vs_naive=seconds["naive"] / s if "naive" in seconds else None,
                )
                out.append(row)
                print(line(row), flush=True)
    return out


def line(row: dict[str, Any]) -> str:
    """One row as the console shows it."""
    naive = row["speedup_vs_naive"]
    return (
        f"T={row['length']:<6} {row['mode']:8} {row['impl']:13} {row['kernel']:11} "
        f"{row['seconds'] * 1e3:10.3f} ms {row['tflops']:8.2f} TFLOP/s"
        + ("" if naive is None else f"  {naive:5.2f}x vs naive")
    )


def to_markdown(table: list[dict[str, Any]], header: str) -> str:
    """The rows as a Markdown table."""
    lines = [
        header,
        "",
        "| T | mode | entry | kernel | median ms | TFLOP/s | vs naive |",
        "|---:|---|---|---|---:|---:|---:|",
    ]
    for r in table:
        naive = "—" if r["speedup_vs_naive"] is None else f"{r['speedup_vs_naive']:.2f}x"
        mode = r["mode"] + (" causal" if r["causal"] else "")
        lines.append(
            f"| {r['length']} | {mode} | {r['impl']} | {r['kernel']} | "
            f"{r['seconds'] * 1e3:.3f} | {r['tflops']:.2f} | {naive} |"
        )
    return "\n".join(lines) + "\n"
