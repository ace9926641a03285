"""A tiny language model in the style of Gemma 2, decoded with a KV cache.

Written here from Gemma 2's description: pre- and post-norm blocks whose attention
soft-caps its logits (``logits_soft_cap=50``: ``50 * tanh(logits / 50)``), alternating
local (a causal sliding window) and global layers, grouped-query attention (4 query heads
on 2 key/value heads), queries pre-scaled by ``query_pre_attn_scalar ** -0.5`` (so no
learned scale), rotary embeddings, GeGLU MLPs, tied embeddings and a final logit soft-cap.
Plain JAX with a parameter pytree: every attention is one :func:`flax_dotattn.dot_attention`
call.

It first checks one attention layer against a plain ``jnp`` implementation of the same
layer (dense logits, cap, masks subtracting 1e9, softmax), then learns a generated copy
task (after ``[BOS, x1..xL, SEP]`` write ``x1..xL`` again: a local layer's window is too
short to copy, a global layer must), then generates greedily with the cache (a prefill of
the prompts, then one compiled step per token through ``query_offset``/``kv_length``) and
asserts that the cached logits equal the full forward's.

Run: ``python examples/gemma2_style.py [--steps 300]`` (see ``configs/gemma2_style.yaml``).
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import load_example_config, progress

from flax_dotattn import dot_attention

PAD, BOS, SEP = 0, 1, 2


def rope(x: jax.Array, positions: jax.Array) -> jax.Array:
    """Rotary embeddings of ``x [B, heads..., T, D]`` at ``positions [T]``."""
    half = x.shape[-1] // 2
    freq = 10000.0 ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [D/2]
    angle = positions[:, None].astype(jnp.float32) * freq[None, :]  # [T, D/2]
    angle = angle.reshape((1,) * (x.ndim - 2) + angle.shape)
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def rms_norm(x: jax.Array, scale: jax.Array) -> jax.Array:
    """Gemma's RMSNorm: ``x / rms(x) * (1 + scale)``."""
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
    return x * (1.0 + scale.reshape((1,) * (x.ndim - 1) + scale.shape))


def init_params(cfg: dict, key: jax.Array) -> dict:
    d, h, hkv, hd, f = (cfg[k] for k in ("model_dim", "num_heads", "num_kv_heads", "head_dim",
                                         "mlp_dim"))  # fmt: skip
    keys = iter(jax.random.split(key, 8 * cfg["layers"] + 1))

    def dense(*shape):
        return jax.random.normal(next(keys), shape) / np.sqrt(shape[0])

    layers = [
        {
            "q": dense(d, h, hd),
            "k": dense(d, hkv, hd),
            "v": dense(d, hkv, hd),
            "o": dense(h * hd, d).reshape(h, hd, d),
            "gate": dense(d, f),
            "up": dense(d, f),
            "down": dense(f, d),
            **{n: jnp.zeros(d) for n in ("pre_attn", "post_attn", "pre_mlp", "post_mlp")},
        }
        for _ in range(cfg["layers"])
    ]
    embed = jax.random.normal(next(keys), (cfg["vocab"], d))
    return {"embed": embed, "layers": layers, "final_norm": jnp.zeros(d)}


def is_local(i: int) -> bool:
    return i % 2 == 0  # layers 0, 2, ...: local; 1, 3, ...: global


def project(cfg: dict, layer: dict, x: jax.Array, positions: jax.Array):
    """Queries ``[B, Hkv, G, T, hd]`` (pre-scaled) and keys/values ``[B, Hkv, 1, T, hd]``."""
    b, t, _ = x.shape
    hkv, g = cfg["num_kv_heads"], cfg["num_heads"] // cfg["num_kv_heads"]
    q = jnp.einsum("btd,dhk->bhtk", x, layer["q"]).reshape(b, hkv, g, t, cfg["head_dim"])
    k = jnp.einsum("btd,dhk->bhtk", x, layer["k"])[:, :, None]
    v = jnp.einsum("btd,dhk->bhtk", x, layer["v"])[:, :, None]
    q = rope(q, positions) * cfg["query_pre_attn_scalar"] ** -0.5
    return q, rope(k, positions), v


def attend(cfg: dict, i: int, q, k, v, query_offset=None, kv_length=None) -> jax.Array:
    """One layer's attention ``[B, Hkv, G, Tq, hd]``: soft-capped, causal, local or not."""
    window = (cfg["local_window"] - 1, 0) if is_local(i) else None
    return dot_attention(
        None, q, v, k, causal=True, window=window, logits_soft_cap=cfg["attn_soft_cap"],
        query_offset=query_offset, kv_length=kv_length,
    )  # fmt: skip


def reference_attention(cfg: dict, i: int, q, k, v) -> jax.Array:
    """The same attention in plain ``jnp``, from the definition (keys repeated per group)."""
    s = jnp.einsum("bhgqd,bhgkd->bhgqk", q, jnp.broadcast_to(k, q.shape[:3] + k.shape[3:]))
    s = cfg["attn_soft_cap"] * jnp.tanh(s / cfg["attn_soft_cap"])
    qi, kj = jnp.arange(q.shape[-2])[:, None], jnp.arange(k.shape[-2])[None, :]
    keep = kj <= qi
    if is_local(i):
        keep = keep & (kj > qi - cfg["local_window"])
    s = jnp.where(keep, s, s - 1e9)
    return jnp.einsum(
        "bhgqk,bhgkd->bhgqd", jax.nn.softmax(s, -1), jnp.broadcast_to(v, s.shape[:3] + v.shape[3:])
    )


def block(cfg, i, layer, x, positions, cache=None, index=None):
    """One pre/post-norm block; with ``cache = (k, v)`` buffers ``[B, Hkv, 1, Tmax, hd]``
    the new keys/values are written at ``index`` and attention reads the cache."""
    h = rms_norm(x, layer["pre_attn"])
    q, k, v = project(cfg, layer, h, positions)
    if cache is None:
        out, new_cache = attend(cfg, i, q, k, v), None
    else:
        start = (0, 0, 0, index, 0)
        ck = jax.lax.dynamic_update_slice(cache[0], k, start)
        cv = jax.lax.dynamic_update_slice(cache[1], v, start)
        out = attend(cfg, i, q, ck, cv, query_offset=index, kv_length=index + x.shape[1])
        new_cache = (ck, cv)
    b, _, _, t, _ = out.shape
    out = out.reshape(b, cfg["num_heads"], t, cfg["head_dim"])
    x = x + rms_norm(jnp.einsum("bhtk,hkd->btd", out, layer["o"]), layer["post_attn"])
    h = rms_norm(x, layer["pre_mlp"])
    h = (jax.nn.gelu(h @ layer["gate"]) * (h @ layer["up"])) @ layer["down"]
    return x + rms_norm(h, layer["post_mlp"]), new_cache


def forward(cfg, params, tokens, caches=None, index=0):
    """Logits ``[B, T, vocab]`` (final soft-cap) and the updated caches."""
    positions = index + jnp.arange(tokens.shape[1])
    x = params["embed"][tokens] * np.sqrt(cfg["model_dim"])
    new_caches = []
    for i, layer in enumerate(params["layers"]):
        cache = None if caches is None else caches[i]
        x, cache = block(cfg, i, layer, x, positions, cache, index)
        new_caches.append(cache)
    logits = rms_norm(x, params["final_norm"]) @ params["embed"].T
    cap = cfg["final_soft_cap"]
    return cap * jnp.tanh(logits / cap), new_caches


def make_batch(rng: np.random.Generator, n: int, cfg: dict) -> np.ndarray:
    x = rng.integers(3, cfg["vocab"], (n, cfg["copy_length"]))
    return np.concatenate([np.full((n, 1), BOS), x, np.full((n, 1), SEP), x], 1).astype(np.int32)


def check_attention(cfg: dict, params: dict) -> float:
    """Max difference between each layer's attention and its plain ``jnp`` version."""
    x = jax.random.normal(jax.random.key(1), (2, 2 * cfg["copy_length"] + 2, cfg["model_dim"]))
    error = 0.0
    for i, layer in enumerate(params["layers"][:2]):  # one local and one global layer
        q, k, v = project(cfg, layer, x, jnp.arange(x.shape[1]))
        diff = attend(cfg, i, q, k, v) - reference_attention(cfg, i, q, k, v)
        error = max(error, float(jnp.max(jnp.abs(diff))))
    return error


def train(cfg: dict, params: dict, rng: np.random.Generator) -> tuple[dict, float, float]:
    optimizer = optax.adam(cfg["learning_rate"])
    state = optimizer.init(params)
    half = cfg["copy_length"] + 1  # predictions of the copied half start after SEP

    @jax.jit
    def step(params, state, tokens):
        def loss_fn(params):
            logits, _ = forward(cfg, params, tokens[:, :-1])
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
            return jnp.mean(ce[:, half:])

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = optimizer.update(grads, state)
        return optax.apply_updates(params, updates), state, loss

    start = time.perf_counter()
    with progress() as bar:
        task = bar.add_task("train copy", total=cfg["steps"], status="")
        for i in range(cfg["steps"]):
            params, state, loss = step(params, state, make_batch(rng, cfg["batch_size"], cfg))
            if i % 50 == 0 or i == cfg["steps"] - 1:
                bar.update(task, status=f"loss {float(loss):.3f}")
            bar.advance(task)
    return params, float(loss), time.perf_counter() - start


@functools.partial(jax.jit, static_argnums=(0,))
def _cached_step(cfg_items, params, caches, tokens, index):
    logits, caches = forward(dict(cfg_items), params, tokens, caches, index)
    return logits[:, -1], caches


def generate(cfg: dict, params: dict, prompts: jax.Array, new: int):
    """Greedy tokens ``[B, new]`` and their logits ``[B, new, V]`` with the KV cache."""
    b, t = prompts.shape
    shape = (b, cfg["num_kv_heads"], 1, t + new, cfg["head_dim"])
    caches = [(jnp.zeros(shape), jnp.zeros(shape)) for _ in range(cfg["layers"])]
    items = tuple(sorted(cfg.items()))
    logits, caches = _cached_step(items, params, caches, prompts, 0)
    all_logits = [logits]
    for i in range(new - 1):
        token = jnp.argmax(logits, -1)[:, None]
        logits, caches = _cached_step(items, params, caches, token, t + i)
        all_logits.append(logits)
    logits = jnp.stack(all_logits, axis=1)
    return jnp.argmax(logits, -1), logits


def main(argv=None) -> dict:
    cfg = load_example_config("gemma2_style", argv, __doc__)
    rng = np.random.default_rng(cfg["seed"])
    params = init_params(cfg, jax.random.key(cfg["seed"]))
    attention_error = check_attention(cfg, params)
    assert attention_error < 1e-5, f"attention differs from plain jnp by {attention_error}"
    params, loss, seconds = train(cfg, params, rng)

    length = cfg["copy_length"]
    batch = make_batch(np.random.default_rng(cfg["seed"] + 1), cfg["eval_examples"], cfg)
    prompts, symbols = jnp.asarray(batch[:, : length + 2]), batch[:, length + 2 :]
    tokens, cached_logits = generate(cfg, params, prompts, length)
    sequence = jnp.concatenate([prompts, tokens], axis=1)
    full = jax.jit(lambda p, s: forward(cfg, p, s)[0])(params, sequence)
    full = full[:, prompts.shape[1] - 1 : -1]
    logit_error = float(jnp.max(jnp.abs(cached_logits - full)))
    assert logit_error < 1e-4, f"cached logits differ from the full forward by {logit_error}"
    accuracy = float(np.mean(np.all(np.asarray(tokens) == symbols, axis=-1)))

    print(f"attention == plain jnp (soft-cap, window, GQA): max |difference| {attention_error:.1e}")
    print(f"training: loss {loss:.4f} after {cfg['steps']} steps ({seconds:.1f}s)")
    print(f"greedy copy, exact match on {len(symbols)} held-out prompts: {accuracy:.1%}")
    print(f"cached logits == full-sequence logits: max |difference| {logit_error:.1e}")
    return {
        "loss": loss,
        "accuracy": accuracy,
        "logit_error": logit_error,
        "attention_error": attention_error,
        "seconds": seconds,
    }


if __name__ == "__main__":
    main()
