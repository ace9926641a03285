"""Port a Keras 3 model's ``keras.layers.Attention`` to flax_dotattn and compare outputs.

Builds a small Keras functional model (embedding -> Attention -> pooling) on the JAX
backend, sets non-default layer weights, then ports the layer's config with
``DotAttentionConfig.from_keras`` and its weights with ``params_from_keras``, and shows the
Flax module returns the same outputs, padding masks included. Needs Keras 3
(``pip install -e ".[test]"``).

Run: ``python examples/from_keras.py [--score-mode dot] [--causal true] ...``
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")

import numpy as np
from _common import load_example_config, progress

from flax_dotattn import DotAttention, DotAttentionConfig, params_from_keras


def main(argv=None) -> dict:
    cfg = load_example_config("from_keras", argv, __doc__)
    try:
        import keras
    except ImportError:
        sys.exit("This example needs Keras 3: pip install -e '.[test]'")
    keras.utils.set_random_seed(cfg["seed"])

    # A Keras model: token ids -> embeddings -> Attention(query, value) with padding masks.
    q_ids = keras.Input(shape=(cfg["query_length"],), dtype="int32")
    v_ids = keras.Input(shape=(cfg["value_length"],), dtype="int32")
    embed = keras.layers.Embedding(cfg["vocab"], cfg["embed"], mask_zero=True)
    attention = keras.layers.Attention(use_scale=cfg["use_scale"], score_mode=cfg["score_mode"])
    q_emb, v_emb = embed(q_ids), embed(v_ids)
    attended = attention([q_emb, v_emb], use_causal_mask=cfg["causal"])
    model = keras.Model([q_ids, v_ids], [q_emb, v_emb, attended])
    attention.set_weights([np.float32(0.5 + i) for i in range(len(attention.get_weights()))])

    rng = np.random.default_rng(cfg["seed"])
    q_tokens = rng.integers(1, cfg["vocab"], (cfg["batch"], cfg["query_length"]))
    v_tokens = rng.integers(1, cfg["vocab"], (cfg["batch"], cfg["value_length"]))
    q_tokens[:, -2:] = 0  # padding (mask_zero=True turns it into Keras masks)
    v_tokens[:, -3:] = 0

    with progress() as bar:
        task = bar.add_task("port", total=3, status="running Keras")
        q_emb, v_emb, keras_out = (np.asarray(x) for x in model([q_tokens, v_tokens]))
        bar.update(task, advance=1, status="porting config and weights")
        config = DotAttentionConfig.from_keras(attention.get_config())
        if cfg["causal"]:  # a call argument in Keras 3, so not in its config
            config = DotAttentionConfig.from_dict({**config.to_dict(), "causal": True})
        params = params_from_keras(attention.get_weights(), config)
        bar.update(task, advance=1, status="running flax_dotattn")
        layer = DotAttention.from_config(config)
        masks = (q_tokens != 0, v_tokens != 0)
        ours = np.asarray(layer.apply({"params": params}, q_emb, v_emb, masks=masks))
        bar.update(task, advance=1, status="done")

    diff = float(np.abs(ours - keras_out).max())
    print("Keras layer config:", attention.get_config())
    print("ported config:     ", config)
    print("ported params:     ", {k: float(v) for k, v in params.items()})
    print(f"output shape {ours.shape}; max |flax_dotattn - Keras| = {diff:.2e}")
    print("identical within float32 rounding:", diff < 1e-5)
    return {"max_abs_diff": diff}


if __name__ == "__main__":
    main(sys.argv[1:])
