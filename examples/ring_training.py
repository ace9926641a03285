"""Training a small packed long-context model with ring attention on simulated CPU devices.

Each row of ``--length`` tokens packs documents of random lengths (segment ids, sorted
along the row, as a packing data loader makes them). A document starts with a marker
token that names it; every later token of the document must predict that marker. The
answer is in the document's own first token, so attention has to find it among the
markers of every other document of the row: ``segment_ids`` keep each query inside its
document, ``causal`` and a sliding ``window`` as long as the longest document keep it local,
and the model uses grouped-query attention (``--heads`` query heads sharing ``--kv-heads``
key/value heads).

The sequence is sharded over ``--devices`` simulated CPU devices (mesh axis ``"seq"``):
tokens, activations and :func:`ring_attention` keep ``T / n`` positions per device. The
example trains with Adam, reports the loss and the held-out accuracy, and compares the
per-device memory of one training step (XLA's compiled memory analysis) with the same
model on one device (``dot_attention``, chunked kernel).

Run::

    python examples/ring_training.py --length 4096 --devices 8 --steps 150
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Sequence
from typing import Any


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=4096, help="tokens per packed row")
    parser.add_argument("--batch", type=int, default=2, help="rows per step")
    parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--documents", type=int, default=64, help="markers (vocabulary)")
    parser.add_argument("--max-document", type=int, default=256, help="longest document")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-depth", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def packed_batch(rng: Any, batch: int, length: int, markers: int, max_document: int):
    """Packed rows: ``tokens, targets, segment_ids`` ``int32 [batch, length]`` and the
    ``weights`` ``float32 [batch, length]`` of the positions scored (all but the markers).

    Markers are tokens ``0 .. markers - 1``; the other tokens are noise from
    ``markers .. 2 * markers - 1``."""
    import numpy as np

    tokens = rng.integers(markers, 2 * markers, size=(batch, length))
    targets = np.zeros((batch, length), np.int64)
    ids = np.zeros((batch, length), np.int64)
    weights = np.ones((batch, length), np.float32)
    for row in range(batch):
        start, doc = 0, 0
        while start < length:
            end = min(length, start + int(rng.integers(max_document // 4, max_document + 1)))
            marker = rng.integers(0, markers)
            tokens[row, start] = marker
            targets[row, start:end] = marker
            weights[row, start] = 0.0  # the marker itself is not predicted
            ids[row, start:end] = doc
            start, doc = end, doc + 1
    as_int = lambda x: x.astype(np.int32)  # noqa: E731
    return as_int(tokens), as_int(targets), as_int(ids), weights


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    flags = re.sub(
        r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", "")
    )
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}"
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from flax_dotattn import dot_attention, ring_attention

    cpus = jax.devices("cpu")
    if len(cpus) < args.devices:
        raise SystemExit(f"needs {args.devices} CPU devices; JAX was initialised with {len(cpus)}")
    mesh = Mesh(np.array(cpus[: args.devices]), ("seq",))
    h, hkv, dh = args.heads, args.kv_heads, args.head_depth
    g, vocab, width = h // hkv, 2 * args.documents, h * dh
    window = (args.max_document, 0)

    def init(key: Any) -> dict[str, Any]:
        keys = jax.random.split(key, 5)
        normal = lambda k, *shape: jax.random.normal(k, shape) / np.sqrt(shape[0])  # noqa: E731
        return {
            "embed": jax.random.normal(keys[0], (vocab, width)),
            "query": normal(keys[1], width, width),
            "key": normal(keys[2], width, hkv * dh),
            "value": normal(keys[3], width, hkv * dh),
            "out": normal(keys[4], width, vocab),
            "attention": {"scale": jnp.float32(1.0)},
        }

    def logits(params, tokens, ids, attention):
        b, t = tokens.shape
        x = params["embed"][tokens]  # [B, T, E]
        q = (x @ params["query"]).reshape(b, t, hkv, g, dh).transpose(0, 2, 3, 1, 4)
        k = (x @ params["key"]).reshape(b, t, hkv, 1, dh).transpose(0, 2, 3, 1, 4)
        v = (x @ params["value"]).reshape(b, t, hkv, 1, dh).transpose(0, 2, 3, 1, 4)
        seg = ids[:, None, None, :]  # [B, 1, 1, T]: every head of a row
        out = attention(params["attention"], q, v, k, causal=True, segment_ids=(seg, seg),
                        window=window)  # [B, Hkv, G, T, Dh]  # fmt: skip
        out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, width)
        return (x + out) @ params["out"]  # [B, T, V]

    def loss_fn(params, batch, attention):
        tokens, targets, ids, weights = batch
        lp = jax.nn.log_softmax(logits(params, tokens, ids, attention))
        nll = -jnp.take_along_axis(lp, targets[..., None], -1)[..., 0]
        return jnp.sum(nll * weights) / jnp.sum(weights)

    ring = functools.partial(ring_attention, mesh=mesh, axis_name="seq")
    one = functools.partial(dot_attention, implementation="chunked")
    optimizer = optax.adam(args.learning_rate)

    def make_step(attention):
        @jax.jit
        def step(params, opt_state, batch):
            loss, grads = jax.value_and_grad(loss_fn)(params, batch, attention)
            updates, opt_state = optimizer.update(grads, opt_state)
            return optax.apply_updates(params, updates), opt_state, loss

        return step

    rng = np.random.default_rng(args.seed)
    seq = NamedSharding(mesh, PartitionSpec(None, "seq"))
    replicated = NamedSharding(mesh, PartitionSpec())

    def batch_of(n_rows: int, sharding: Any):
        host = packed_batch(rng, n_rows, args.length, args.documents, args.max_document)
        return tuple(jax.device_put(x, sharding) for x in host)

    params = jax.device_put(init(jax.random.key(args.seed)), replicated)
    opt_state = jax.device_put(optimizer.init(params), replicated)

    # Per-device memory of one training step (compilation only).
    mib = 2.0**-20
    memory = {}
    for name, attention, sharding in (("ring", ring, seq), ("one device", one, None)):
        example_batch = batch_of(args.batch, sharding or cpus[0])
        arguments = (params, opt_state, example_batch)
        if sharding is None:
            arguments = jax.device_put(arguments, cpus[0])
        stats = make_step(attention).lower(*arguments).compile().memory_analysis()
        memory[name] = stats.temp_size_in_bytes
    print(f"T={args.length}, batch {args.batch}, {h} query heads sharing {hkv} key/value heads, "
          f"window {window}, {args.devices} devices")  # fmt: skip
    print("per-device temporaries of one training step (forward + backward + Adam):")
    for name, size in memory.items():
        print(f"  {name:10s} {size * mib:8.1f} MiB")

    step = make_step(ring)
    losses = []
    for i in range(args.steps):
        params, opt_state, loss = step(params, opt_state, batch_of(args.batch, seq))
        losses.append(float(loss))
        if i % max(1, args.steps // 5) == 0 or i == args.steps - 1:
            print(f"step {i:4d}  loss {losses[-1]:.3f}")

    tokens, targets, ids, weights = batch_of(args.batch, seq)
    predicted = jnp.argmax(
        jax.jit(functools.partial(logits, attention=ring))(params, tokens, ids), -1
    )
    accuracy = float(jnp.sum((predicted == targets) * weights) / jnp.sum(weights))
    print(f"held-out accuracy (predict the document's marker): {accuracy:.3f} "
          f"(chance {1 / args.documents:.3f})")  # fmt: skip
    return {"losses": losses, "accuracy": accuracy, "memory": memory}


if __name__ == "__main__":
    main()
