"""A tiny causal language model with ``MultiHeadDotAttention``, decoded with a KV cache.

A 2-layer decoder-only transformer in Flax NNX (pre-norm blocks, grouped-query attention
with 4 query heads on 2 key/value heads, rotary position embeddings, an optional causal
sliding window) learns a generated copy task: after ``[BOS, x1..xL, SEP]`` it must write
``x1..xL`` again. Training rows pack several sequences, kept apart by ``segment_ids``, with
RoPE positions restarting in each sequence; the loss counts the copied half only.

It then generates greedily from the prompts of held-out sequences twice: with the cache
(``init_cache``, one prefill of the prompt, then one compiled step per token that attends
over the cache through ``query_offset``/``kv_length``), and by recomputing the whole
prefix at every step. It asserts that the cached logits equal the full-sequence forward's
and reports the copy accuracy and the tokens per second of both ways.

Last, it serves a ragged batch as a server would: prompts of different lengths prefilled
in one call (``new_length``, one ``cache_index`` per sequence), then one compiled step per
token for every sequence at its own position. The local layers (``local_window``: a
causal sliding window on every other layer, as Gemma's) keep a rolling cache of
``local_window + prefill`` slots instead of the whole sequence. It asserts that each
sequence's logits equal decoding that sequence alone with ordinary caches.

Run: ``python examples/decode_lm.py [--steps 300] [--window 4]`` (see
``configs/decode_lm.yaml``).
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import load_example_config, progress
from flax import nnx

from flax_dotattn import nnx as fdnnx

PAD, BOS, SEP = 0, 1, 2


def rope(x: jax.Array, positions: jax.Array) -> jax.Array:
    """Rotary position embeddings: rotates the pairs ``(x[..., i], x[..., i + D/2])`` of
    ``x [..., T, heads, D]`` by ``positions [..., T] * 10000**(-2i/D)``."""
    half = x.shape[-1] // 2
    freq = 10000.0 ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [D/2]
    freq = freq.reshape((1,) * positions.ndim + (half,))
    angle = positions[..., None].astype(jnp.float32) * freq  # [..., T, D/2]
    angle = angle[..., None, :]  # [..., T, 1, D/2]: every head alike
    angle = angle.reshape((1,) * (x.ndim - angle.ndim) + angle.shape)
    cos, sin = jnp.cos(angle).astype(x.dtype), jnp.sin(angle).astype(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def make_rows(rng: np.random.Generator, n: int, cfg: dict):
    """Packed rows: tokens, segment ids, positions and a loss mask, each ``[n, T]``."""
    length, t = cfg["copy_length"], cfg["row_length"]
    seq = 2 * length + 2
    tokens = np.full((n, t), PAD, np.int32)
    segments = np.zeros((n, t), np.int32)  # padding is segment 0
    positions = np.zeros((n, t), np.int32)
    loss_mask = np.zeros((n, t), bool)
    for i in range(n):
        for s in range(cfg["pack"]):
            x = rng.integers(3, cfg["vocab"], length)
            at = s * seq
            tokens[i, at : at + seq] = np.concatenate([[BOS], x, [SEP], x])
            segments[i, at : at + seq] = s + 1
            positions[i, at : at + seq] = np.arange(seq)
            loss_mask[i, at + length + 1 : at + seq - 1] = True  # predicts the copy
    return tokens, segments, positions, loss_mask


class Block(nnx.Module):
    """Pre-norm transformer block: causal grouped-query attention, then an MLP."""

    def __init__(self, cfg: dict, rngs: nnx.Rngs, local: bool = False):
        d = cfg["model_dim"]
        window = cfg["local_window"] if local else cfg["window"]
        self.local = local
        self.norm1 = nnx.RMSNorm(d, rngs=rngs)
        self.attention = fdnnx.MultiHeadDotAttention(
            cfg["num_heads"],
            d,
            cfg["key_dim"],
            num_kv_heads=cfg["num_kv_heads"],
            use_bias=False,
            causal=True,
            window=(window, 0) if window else None,
            query_key_transform=rope,
            rngs=rngs,
        )
        self.norm2 = nnx.RMSNorm(d, rngs=rngs)
        self.up = nnx.Linear(d, cfg["mlp_dim"], rngs=rngs)
        self.down = nnx.Linear(cfg["mlp_dim"], d, rngs=rngs)

    def __call__(self, x, segment_ids=None, positions=None, decode=False, new_length=None):
        h = self.norm1(x)
        x = x + self.attention(
            h, h, segment_ids=segment_ids, positions=positions, decode=decode,
            new_length=new_length,
        )  # fmt: skip
        return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class CopyLM(nnx.Module):
    """Token embedding, ``layers`` blocks, a final norm and the vocabulary projection."""

    def __init__(self, cfg: dict, rngs: nnx.Rngs):
        self.embed = nnx.Embed(cfg["vocab"], cfg["model_dim"], rngs=rngs)
        local = lambda i: bool(cfg["local_window"]) and i % 2 == 0  # noqa: E731
        self.blocks = nnx.List([Block(cfg, rngs, local(i)) for i in range(cfg["layers"])])
        self.norm = nnx.RMSNorm(cfg["model_dim"], rngs=rngs)
        self.head = nnx.Linear(cfg["model_dim"], cfg["vocab"], rngs=rngs)

    def __call__(self, tokens, segments=None, positions=None, decode=False, new_length=None):
        """Logits ``[B, T, vocab]`` for ``tokens [B, T]`` (decoding: ``new_length``, the
        valid new tokens of each sequence, with a per-sequence cache)."""
        x = self.embed(tokens)
        ids = None if segments is None else (segments, segments)
        for block in self.blocks:
            x = block(x, ids, positions, decode, new_length)
        return self.head(self.norm(x))

    def init_cache(
        self, batch: int, max_length: int, *, per_sequence: bool = False, chunk: int = 0
    ) -> None:
        """Empty caches: ``max_length`` slots, or for the local layers (with ``chunk``, the
        longest call) a rolling cache of ``window + chunk`` slots."""
        for block in self.blocks:
            window = block.attention.window
            rolling = bool(chunk) and block.local
            slots = window[0] + chunk if rolling else max_length
            block.attention.init_cache(
                (batch, slots, self.embed.features), per_sequence=per_sequence, rolling=rolling
            )


def train(model: CopyLM, cfg: dict, rng: np.random.Generator) -> tuple[float, float]:
    optimizer = nnx.Optimizer(model, optax.adam(cfg["learning_rate"]), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, tokens, segments, positions, mask):
        def loss_fn(model):
            logits = model(tokens[:, :-1], segments[:, :-1], positions[:, :-1])
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
            return jnp.sum(ce * mask[:, :-1]) / jnp.sum(mask)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    start = time.perf_counter()
    with progress() as bar:
        task = bar.add_task("train copy", total=cfg["steps"], status="")
        for i in range(cfg["steps"]):
            loss = step(model, optimizer, *make_rows(rng, cfg["batch_size"], cfg))
            if i % 50 == 0 or i == cfg["steps"] - 1:
                bar.update(task, status=f"loss {float(loss):.3f}")
            bar.advance(task)
    return float(loss), time.perf_counter() - start


@functools.partial(jax.jit, static_argnums=0)
def cached_step(graphdef, params, cache, tokens):
    """Logits ``[B, V]`` after ``tokens [B, Tn]`` (the prompt, or the last token) and the
    updated cache: one compiled step per ``Tn``, whatever the position."""
    model = nnx.merge(graphdef, params, cache)
    logits = model(tokens, decode=True)[:, -1]
    return logits, nnx.state(model, nnx.Cache)


@functools.partial(jax.jit, static_argnums=0)
def full_step(graphdef, state, buffer, t):
    """Logits ``[B, V]`` at position ``t`` of the whole buffer ``[B, T]`` (causal: the
    padding after ``t`` is unseen)."""
    logits = nnx.merge(graphdef, state)(buffer)  # [B, T, V]
    return jax.lax.dynamic_index_in_dim(logits, t, axis=1, keepdims=False)


def generate_cached(model: CopyLM, prompts: jax.Array, new: int):
    """Greedy tokens ``[B, new]`` and their logits ``[B, new, V]``, with the KV cache: one
    prefill of the prompts, then one step per token."""
    batch, prompt_length = prompts.shape
    model.init_cache(batch, prompt_length + new)
    graphdef, params, cache = nnx.split(model, nnx.Param, nnx.Cache)
    logits, cache = cached_step(graphdef, params, cache, prompts)
    all_logits = [logits]
    for _ in range(new - 1):
        logits, cache = cached_step(graphdef, params, cache, jnp.argmax(logits, -1)[:, None])
        all_logits.append(logits)
    logits = jnp.stack(all_logits, axis=1)
    return jnp.argmax(logits, -1), logits


def generate_uncached(model: CopyLM, prompts: jax.Array, new: int):
    """The same greedy decoding, recomputing the whole prefix at every step."""
    batch, prompt_length = prompts.shape
    graphdef, state = nnx.split(model)
    buffer = jnp.concatenate([prompts, jnp.full((batch, new), PAD, jnp.int32)], axis=1)
    all_logits = []
    for i in range(new):
        t = prompt_length - 1 + i
        logits = full_step(graphdef, state, buffer, t)
        buffer = buffer.at[:, t + 1].set(jnp.argmax(logits, -1))
        all_logits.append(logits)
    logits = jnp.stack(all_logits, axis=1)
    return jnp.argmax(logits, -1), logits


def tokens_per_second(generate, model, prompts, new) -> tuple[float, jax.Array, jax.Array]:
    """Runs ``generate`` once to compile, then times a second run."""
    jax.block_until_ready(generate(model, prompts, new))
    start = time.perf_counter()
    tokens, logits = jax.block_until_ready(generate(model, prompts, new))
    return prompts.shape[0] * new / (time.perf_counter() - start), tokens, logits


@functools.partial(jax.jit, static_argnums=0)
def ragged_step(graphdef, params, cache, tokens, new_length):
    """Logits ``[B, V]`` at each sequence's last valid new token and the updated cache:
    ``tokens [B, Tn]`` hold ``new_length [B]`` valid tokens each (then padding)."""
    model = nnx.merge(graphdef, params, cache)
    logits = model(tokens, decode=True, new_length=new_length)  # [B, Tn, V]
    last = jnp.take_along_axis(logits, (new_length - 1)[:, None, None], axis=1)[:, 0]
    return last, nnx.state(model, nnx.Cache)


def serve_ragged(model: CopyLM, sequences: np.ndarray, lengths: np.ndarray, new: int):
    """Greedy decoding of a ragged batch in one compiled step per token: the prompts
    ``sequences[i, :lengths[i]]`` prefilled together, then ``new`` tokens each. Returns the
    logits ``[B, new, V]`` and the seconds per decoding step."""
    batch, longest = len(lengths), int(lengths.max())
    prompts = np.where(np.arange(longest) < lengths[:, None], sequences[:, :longest], PAD)
    model.init_cache(batch, longest + new, per_sequence=True, chunk=longest)
    graphdef, params, cache = nnx.split(model, nnx.Param, nnx.Cache)
    counts = jnp.asarray(lengths, jnp.int32)
    logits, cache = ragged_step(graphdef, params, cache, jnp.asarray(prompts), counts)
    all_logits, ones = [logits], jnp.ones(batch, jnp.int32)
    start = time.perf_counter()
    for i in range(new - 1):
        if i == 1:  # the first token step compiled; time the others
            start = time.perf_counter()
        token = jnp.argmax(logits, -1)[:, None].astype(jnp.int32)
        logits, cache = ragged_step(graphdef, params, cache, token, ones)
        all_logits.append(jax.block_until_ready(logits))
    return jnp.stack(all_logits, axis=1), (time.perf_counter() - start) / max(new - 2, 1)


def main(argv=None) -> dict:
    cfg = load_example_config("decode_lm", argv, __doc__)
    rng = np.random.default_rng(cfg["seed"])
    model = nnx.jit(lambda: CopyLM(cfg, nnx.Rngs(cfg["seed"])))()  # one compile, not op by op
    loss, seconds = train(model, cfg, rng)

    length = cfg["copy_length"]
    symbols = np.random.default_rng(cfg["seed"] + 1).integers(
        3, cfg["vocab"], (cfg["eval_examples"], length)
    )
    prompts = jnp.asarray(
        np.concatenate(
            [np.full((len(symbols), 1), BOS), symbols, np.full((len(symbols), 1), SEP)], 1
        ),
        jnp.int32,
    )
    cached_rate, cached, cached_logits = tokens_per_second(generate_cached, model, prompts, length)
    full_rate, full, _ = tokens_per_second(generate_uncached, model, prompts, length)

    # The cached logits must be the full-sequence forward's, position by position.
    sequence = jnp.concatenate([prompts, cached], axis=1)
    forward = nnx.jit(CopyLM.__call__)(model, sequence)[:, prompts.shape[1] - 1 : -1]
    logit_error = float(jnp.max(jnp.abs(cached_logits - forward)))
    assert logit_error < 1e-4, f"cached logits differ from the full forward by {logit_error}"
    assert np.array_equal(np.asarray(cached), np.asarray(full)), "cached != uncached tokens"
    accuracy = float(np.mean(np.all(np.asarray(cached) == symbols, axis=-1)))

    # A ragged batch: held-out sequences cut at different lengths, decoded together; each
    # sequence's logits must be those of decoding it alone (ordinary caches, batch of 1).
    full_sequences = np.asarray(jnp.concatenate([prompts, cached], axis=1))
    batch = min(4, len(full_sequences))
    lengths = length + 2 + np.arange(batch) % 4 - 2  # prompts of L .. L + 3 tokens
    serve_new = length - 2
    ragged_logits, step_seconds = serve_ragged(model, full_sequences[:batch], lengths, serve_new)
    ragged_error = 0.0
    for i, n in enumerate(lengths):
        _, alone = generate_cached(model, jnp.asarray(full_sequences[i : i + 1, :n]), serve_new)
        ragged_error = max(ragged_error, float(jnp.max(jnp.abs(ragged_logits[i] - alone[0]))))
    assert ragged_error < 1e-4, (
        f"a ragged sequence differs from decoding it alone by {ragged_error}"
    )

    heads = f"{cfg['num_heads']} query heads on {cfg['num_kv_heads']} key/value heads"
    print(f"copy task: {cfg['layers']} layers, {heads}, RoPE, packed rows of {cfg['pack']}")
    print(f"training: loss {loss:.4f} after {cfg['steps']} steps ({seconds:.1f}s)")
    print(f"greedy copy, exact match on {len(symbols)} held-out prompts: {accuracy:.1%}")
    print(f"cached logits == full-sequence logits: max |difference| {logit_error:.1e}")
    print(
        f"generation: {cached_rate:,.0f} tokens/s with the cache, {full_rate:,.0f} tokens/s "
        f"recomputing the prefix ({cached_rate / full_rate:.1f}x)"
    )
    local = f", local layers on a rolling cache of {cfg['local_window']} + prefill slots"
    print(
        f"ragged batch of {batch} (prompts of {lengths.min()}..{lengths.max()} tokens"
        f"{local if cfg['local_window'] else ''}): one step for all, "
        f"{step_seconds * 1e3:.2f} ms per token step; each sequence == decoding it alone "
        f"(max |difference| {ragged_error:.1e})"
    )
    return {
        "loss": loss,
        "accuracy": accuracy,
        "logit_error": logit_error,
        "ragged_error": ragged_error,
        "cached_tokens_per_second": cached_rate,
        "uncached_tokens_per_second": full_rate,
        "seconds": seconds,
    }


if __name__ == "__main__":
    main()
