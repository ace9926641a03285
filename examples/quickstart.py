"""Quick start: the pure function, the Linen module and a config from ``configs/``.

Run: ``python examples/quickstart.py [--config configs/causal_scaled.yaml]``
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from flax_dotattn import DotAttention, dot_attention, load_config, make_causal_mask

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def show(label: str, array) -> None:
    body = np.array2string(np.asarray(array), precision=3, suppress_small=True)
    print(f"   {label}:\n      " + body.replace("\n", "\n      "))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=str(CONFIGS / "causal_scaled.yaml"))
    args = parser.parse_args(argv)

    # 1. The pure function: Keras's own 2x2 example, weights [1, e] / (1 + e).
    query = jnp.array([[1.0, 0.0], [0.0, 1.0]])  # [Tq, D]
    key = jnp.array([[0.0, 1.0], [1.0, 0.0]])  # [Tv, D]
    value = jnp.array([[1.0, 2.0], [3.0, 4.0]])  # [Tv, Dv]
    out, weights = dot_attention(None, query, value, key, return_attention_scores=True)
    print("1) dot_attention on Keras's 2x2 example")
    show("weights", weights)
    show("output", out)

    # 2. Masks and causality on a batch: [B, Tq, D] queries against [B, Tv, D] keys.
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 4, 8)), jnp.float32)
    kv = jnp.asarray(rng.normal(size=(2, 4, 8)), jnp.float32)
    value_mask = jnp.array([[True, True, True, False], [True, True, True, True]])
    _, w = dot_attention(
        None, q, kv, masks=(None, value_mask), causal=True, return_attention_scores=True
    )
    print("2) causal + value mask (first batch row; key 3 is padding):")
    show("causal mask", make_causal_mask(4, 4).astype(int))
    show("weights", w[0])

    # 3. The Linen module, built from a YAML config.
    cfg = load_config(args.config)
    layer = DotAttention.from_config(cfg)
    variables = layer.init(jax.random.key(0), q, kv, deterministic=True)
    out_train = layer.apply(
        variables, q, kv, deterministic=False, rngs={"dropout": jax.random.key(1)}
    )
    out_eval = layer.apply(variables, q, kv, deterministic=True)
    print(f"3) DotAttention from {pathlib.Path(args.config).name}: {cfg}")
    print("   params:", jax.tree.map(lambda x: float(x), dict(variables.get("params", {}))))
    print(
        "   output shape:",
        out_eval.shape,
        "| train/eval differ (dropout):",
        bool(not np.allclose(out_train, out_eval)),
    )
    same = np.allclose(
        out_eval,
        dot_attention(dict(variables.get("params", {})), q, kv, causal=cfg.causal),
    )
    print("   module output == dot_attention output:", bool(same))


if __name__ == "__main__":
    main()
