"""Automatic choice of implementation from static shapes, dtype, backend and features.

* ``"xla"`` (materialised) for small problems, and whenever the weights are returned.
* ``"chunked"`` once the materialised intermediate passes a measured size: the
  ``[..., Tq, Tv]`` float32 scores (``[..., Tq, Tv, D]`` in concat mode).

The crossover was measured with ``python -m flax_dotattn.bench`` (see README).
"""

from __future__ import annotations

import math

from flax_dotattn._src.validation import AttentionInputs

#: Bytes of materialised float32 intermediate from which the chunked path is faster: on a
#: 2-core x86 CPU, forward+backward at 16 MiB of scores (4x1024x1024, 1x2048x2048) ran 2-4x
#: faster chunked, while at 8 MiB (8x512x512) the materialised path was still ahead.
CHUNKED_CROSSOVER_BYTES = 16 * 2**20


def materialised_bytes(inputs: AttentionInputs, score_mode: str) -> int:
    """Bytes of the largest intermediate the materialised path forms."""
    batch = math.prod(inputs.query.shape[:-2])
    tq, tv = inputs.query.shape[-2], inputs.key.shape[-2]
    per_score = inputs.query.shape[-1] if score_mode == "concat" else 1
    return batch * tq * tv * per_score * inputs.compute_dtype.itemsize


def choose_implementation(
    inputs: AttentionInputs, *, score_mode: str, return_attention_scores: bool
) -> str:
    """Returns ``"xla"`` or ``"chunked"`` for these (static) inputs."""
    if return_attention_scores:
        return "xla"
    if materialised_bytes(inputs, score_mode) >= CHUNKED_CROSSOVER_BYTES:
        return "chunked"
    return "xla"
