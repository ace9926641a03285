"""The CNN + Attention text-similarity network of Keras's ``Attention`` documentation, in Flax.

Architecture (the code example of the ``tf.keras.layers.Attention`` documentation): a shared
token embedding, a shared ``Conv1D`` with ``same`` padding, ``DotAttention`` between the query
and value encodings, global average pooling of the query encoding and of the attention
output, concatenation, and dense layers. Padding masks flow into the attention and the
pooling.

Task (generated, so it needs no download): does the value sequence contain the query's
token pattern, in order and contiguous? Negatives contain a near miss (two adjacent
pattern tokens swapped, or one replaced), so the tokens alone do not decide the label:
the network must line query positions up with value positions, which is what attention
does. The same network without attention (value encoding pooled instead) is trained as a
baseline.

After training it draws the attention weights of one positive pair and one near miss
(``out/text_similarity_attention.png``; needs matplotlib, ``pip install -e ".[examples]"``).

Run: ``python examples/text_similarity.py [--steps 1500] [--baseline false] [--out-dir out]``
(see ``configs/text_similarity.yaml``).
"""

from __future__ import annotations

import pathlib
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import load_example_config, progress

from flax_dotattn import DotAttention, DotAttentionConfig


def make_batch(rng: np.random.Generator, n: int, cfg: dict):
    """Returns ``(query [n, Lq], value [n, Lv], label [n])`` int arrays, 0 = padding."""
    lq_max, lv_max, vocab = cfg["query_max_length"], cfg["value_max_length"], cfg["vocab"]
    query = np.zeros((n, lq_max), np.int32)
    value = np.zeros((n, lv_max), np.int32)
    label = rng.integers(0, 2, n).astype(np.int32)
    for i in range(n):
        lq = rng.integers(cfg["query_min_length"], lq_max + 1)
        lv = rng.integers(cfg["value_min_length"], lv_max + 1)
        pattern = rng.integers(1, vocab, lq)
        query[i, :lq] = pattern
        value[i, :lv] = rng.integers(1, vocab, lv)
        inserted = pattern.copy()
        if not label[i]:  # a near miss: swap two adjacent tokens, or replace one
            j = rng.integers(0, lq - 1)
            if rng.random() < 0.5 and inserted[j] != inserted[j + 1]:
                inserted[j], inserted[j + 1] = inserted[j + 1], inserted[j]
            else:
                k = rng.integers(0, lq)
                inserted[k] = 1 + (inserted[k] - 1 + rng.integers(1, vocab - 1)) % (vocab - 1)
        start = rng.integers(0, lv - lq + 1)
        value[i, start : start + lq] = inserted
        if not label[i] and _contains(value[i, :lv], pattern):
            label[i] = 1  # the random tokens happened to spell the pattern
    return query, value, label


def _contains(seq, pattern) -> bool:
    n = len(pattern)
    return any(np.array_equal(seq[s : s + n], pattern) for s in range(len(seq) - n + 1))


def masked_mean(x, mask):
    """Global average pooling over the unmasked positions: ``[B, T, F] -> [B, F]``."""
    mask = mask[..., None].astype(x.dtype)
    return (x * mask).sum(-2) / jnp.maximum(mask.sum(-2), 1.0)


class TextSimilarity(nn.Module):
    """CNN + Attention (or, with ``attention=None``, the same network without it)."""

    vocab: int
    embed_dim: int
    filters: int
    kernel_size: int
    hidden: int
    attention: DotAttentionConfig | None

    @nn.compact
    def __call__(self, query_ids, value_ids, *, train: bool = False, return_weights=False):
        """Logits ``[B]``; with ``return_weights``, also the attention weights ``[B, Lq, Lv]``."""
        q_mask, v_mask = query_ids != 0, value_ids != 0  # [B, Lq], [B, Lv]
        embed = nn.Embed(self.vocab, self.embed_dim)  # shared token embedding
        cnn = nn.Conv(self.filters, (self.kernel_size,), padding="SAME")  # shared Conv1D
        # The documentation's snippet embeds query_input twice; the value input is meant.
        query_enc = cnn(embed(query_ids))  # [B, Lq, F]
        value_enc = cnn(embed(value_ids))  # [B, Lv, F]
        weights = None
        if self.attention is not None:
            attended = DotAttention.from_config(self.attention)(
                query_enc,
                value_enc,
                masks=(q_mask, v_mask),
                deterministic=not train,
                return_attention_scores=return_weights,
            )  # [B, Lq, F], or that and the weights [B, Lq, Lv]
            if return_weights:
                attended, weights = attended
            pooled = masked_mean(attended, q_mask)
        else:
            pooled = masked_mean(value_enc, v_mask)  # the no-attention baseline
        x = jnp.concatenate([masked_mean(query_enc, q_mask), pooled], axis=-1)
        x = nn.relu(nn.Dense(self.hidden)(x))
        logits = nn.Dense(1)(x)[..., 0]  # [B]
        return (logits, weights) if return_weights else logits


def train(cfg: dict, attention: DotAttentionConfig | None, name: str, bar) -> dict:
    model = TextSimilarity(
        cfg["vocab"], cfg["embed_dim"], cfg["filters"], cfg["kernel_size"], cfg["hidden"], attention
    )
    data_rng = np.random.default_rng(cfg["seed"])
    eval_q, eval_v, eval_y = make_batch(
        np.random.default_rng(cfg["seed"] + 10_000), cfg["eval_examples"], cfg
    )
    q, v, _ = make_batch(data_rng, 2, cfg)
    params = model.init(jax.random.key(cfg["seed"]), q, v)["params"]
    opt = optax.adam(cfg["learning_rate"])
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, q, v, y, rng):
        def loss_fn(params):
            logits = model.apply({"params": params}, q, v, train=True, rngs={"dropout": rng})
            return optax.sigmoid_binary_cross_entropy(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def accuracy(params, q, v, y):
        logits = model.apply({"params": params}, q, v)
        return jnp.mean((logits > 0) == (y == 1))

    task = bar.add_task(name, total=cfg["steps"], status="")
    key = jax.random.key(cfg["seed"] + 1)
    start = time.perf_counter()
    for i in range(cfg["steps"]):
        q, v, y = make_batch(data_rng, cfg["batch_size"], cfg)
        key, sub = jax.random.split(key)
        params, opt_state, loss = step(params, opt_state, q, v, y, sub)
        if i % 100 == 0 or i == cfg["steps"] - 1:
            bar.update(task, status=f"loss {float(loss):.3f}")
        bar.advance(task)
    seconds = time.perf_counter() - start
    acc = float(accuracy(params, eval_q, eval_v, eval_y))
    bar.update(task, status=f"held-out accuracy {acc:.1%}")
    return {
        "accuracy": acc,
        "seconds": seconds,
        "params": params,
        "model": model,
        "eval": (eval_q, eval_v, eval_y),
    }


def _best_window(query, value) -> int:
    """Start of the value window most like the query: most tokens in common (a near miss
    keeps all or all but one), then most tokens in place."""
    n = len(query)

    def likeness(s: int) -> tuple[int, int]:
        window = value[s : s + n]
        common = sum(min(np.sum(window == t), np.sum(query == t)) for t in set(query.tolist()))
        return int(common), int(np.sum(window == query))

    return max(range(len(value) - n + 1), key=likeness)


def save_attention_picture(result: dict, path: pathlib.Path) -> bool:
    """Draws where the query attends in the value, for one positive pair and one near miss.

    Each panel is the weight matrix ``[Lq, Lv]`` of one held-out pair (padding left out),
    with the window that holds the query's pattern (or its near miss) outlined.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Rectangle
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[examples]'): no picture")
        return False
    eval_q, eval_v, eval_y = result["eval"]
    lengths = (eval_q != 0).sum(-1)  # [N]
    positive = int(np.argmax(eval_y == 1))
    same_length = (eval_y == 0) & (lengths == lengths[positive])  # panels of equal height
    picks = [positive, int(np.argmax(same_length if same_length.any() else eval_y == 0))]
    q, v = eval_q[picks], eval_v[picks]
    logits, weights = result["model"].apply(
        {"params": result["params"]}, q, v, return_weights=True
    )  # [2], [2, Lq, Lv]
    probs, weights = np.asarray(jax.nn.sigmoid(logits)), np.asarray(weights)
    fig, axes = plt.subplots(1, 2, figsize=(9, 2.6))
    for ax, i, name in zip(axes, range(2), ("positive pair", "near miss"), strict=True):
        lq, lv = int((q[i] != 0).sum()), int((v[i] != 0).sum())
        image = ax.imshow(weights[i, :lq, :lv], cmap="viridis", vmin=0.0, vmax=1.0)
        start = _best_window(q[i, :lq], v[i, :lv])
        ax.add_patch(
            Rectangle((start - 0.5, -0.5), lq, lq, fill=False, edgecolor="white", linewidth=1.5)
        )
        ax.set_xticks(range(lv), [str(t) for t in v[i, :lv]], fontsize=7)
        ax.set_yticks(range(lq), [str(t) for t in q[i, :lq]], fontsize=7)
        ax.set_xlabel("value token (position)")
        ax.set_ylabel("query token")
        ax.set_title(f"{name}: label {int(eval_y[picks[i]])}, predicted {probs[i]:.2f}", fontsize=9)
    fig.colorbar(image, ax=list(axes), shrink=0.9, pad=0.02, label="attention weight")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def main(argv=None) -> dict:
    cfg = load_example_config("text_similarity", argv, __doc__)
    attention = DotAttentionConfig.from_dict(cfg["attention"])
    with progress() as bar:
        results = {"attention": train(cfg, attention, "with attention", bar)}
        if cfg["baseline"]:
            results["baseline"] = train(cfg, None, "without attention", bar)
    with_att = results["attention"]
    print(
        f"CNN + DotAttention ({attention.score_mode}, use_scale={attention.use_scale}): "
        f"held-out accuracy {with_att['accuracy']:.1%} on {cfg['eval_examples']} pairs "
        f"after {cfg['steps']} steps ({with_att['seconds']:.1f}s)"
    )
    if "baseline" in results:
        base = results["baseline"]
        print(f"same network without attention: {base['accuracy']:.1%} ({base['seconds']:.1f}s)")
    if attention.use_scale:
        print(
            f"learned attention scale: {float(with_att['params']['DotAttention_0']['scale']):.3f}"
        )
    picture = pathlib.Path(cfg["out_dir"]) / "text_similarity_attention.png"
    if save_attention_picture(with_att, picture):
        print(f"attention weights (a positive pair and a near miss): {picture}")
    return {k: {"accuracy": r["accuracy"], "seconds": r["seconds"]} for k, r in results.items()}


if __name__ == "__main__":
    main(sys.argv[1:])
