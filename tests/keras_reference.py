"""Runs the real ``keras.layers.Attention`` (Keras 3, JAX backend) as a reference."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import warnings

import numpy as np

keras = __import__("keras")


def keras_attention(
    query,
    value,
    key=None,
    query_mask=None,
    value_mask=None,
    *,
    causal=False,
    use_scale=False,
    score_mode="dot",
    scale=None,
    concat_score_weight=None,
):
    """Returns ``(output, weights)`` from a Keras layer with the given weights.

    Inputs must have rank 3 (Keras 3 mishandles value masks on other ranks).
    """
    layer = keras.layers.Attention(use_scale=use_scale, score_mode=score_mode)
    inputs = [query, value] if key is None else [query, value, key]
    layer.build([np.shape(x) for x in inputs])
    weights = []
    if use_scale:
        weights.append(np.float32(1.0 if scale is None else scale))
    if score_mode == "concat":
        weights.append(np.float32(1.0 if concat_score_weight is None else concat_score_weight))
    layer.set_weights(weights)
    mask = None
    if query_mask is not None or value_mask is not None:
        mask = [query_mask, value_mask]
    with warnings.catch_warnings():
        # Keras warns that a softmax over Tv=1 is always 1; that case is tested on purpose.
        warnings.filterwarnings("ignore", message=".*softmax over axis -1", category=UserWarning)
        out, w = layer(inputs, mask=mask, use_causal_mask=causal, return_attention_scores=True)
    return np.asarray(out), np.asarray(w)
