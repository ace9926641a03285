"""Automatic choice of implementation from static shapes, dtype, backend and features.

* ``"cudnn"`` on GPU for float16/bfloat16 inputs the fused kernel can take (see
  :func:`flax_dotattn._src.fused.ineligibility`).
* ``"xla"`` (materialised) for small problems, and whenever the weights are returned.
* ``"chunked"`` once the materialised intermediate (the ``[..., Tq, Tv]`` float32
  scores; ``[..., Tq, Tv, D]`` in concat mode) reaches :data:`CHUNKED_CROSSOVER_BYTES`.
  Up to :data:`FORWARD_CROSSOVER_BYTES`, a forward pass that is not differentiated still
  runs materialised, since there the materialised forward is the faster one.

The crossovers were measured with ``python -m flax_dotattn.bench`` (see README).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax

from flax_dotattn._src.fused import ineligibility
from flax_dotattn._src.validation import AttentionInputs

#: From here, forward+backward runs faster chunked on a 2-core x86 CPU: 2x at 16 MiB
#: (4x1024², 1x2048²), while at 8 MiB (8x512²) both paths took the same time.
CHUNKED_CROSSOVER_BYTES = 16 * 2**20
#: From here, a forward pass alone runs faster chunked: 2x at 32 MiB (8x1024²), while at
#: 16 MiB (4x1024²) the materialised forward was ~10 % faster.
FORWARD_CROSSOVER_BYTES = 32 * 2**20


class Plan(NamedTuple):
    """How :func:`dot_attention` will run."""

    implementation: str  # "xla", "chunked" or "cudnn"
    materialise_primal: bool = False  # chunked, but a forward without gradient materialises
    reason: str = ""  # why, in words


def materialised_bytes(inputs: AttentionInputs, score_mode: str) -> int:
    """Bytes of the largest intermediate the materialised path forms."""
    batch = math.prod(inputs.query.shape[:-2])
    tq, tv = inputs.query.shape[-2], inputs.key.shape[-2]
    per_score = inputs.query.shape[-1] if score_mode == "concat" else 1
    return batch * tq * tv * per_score * inputs.compute_dtype.itemsize


def plan(
    inputs: AttentionInputs,
    implementation: str | None,
    *,
    score_mode: str,
    return_attention_scores: bool,
    dropout: bool,
    causal: bool,
    window: tuple[int | None, int | None] | None = None,
) -> Plan:
    """The :class:`Plan` for these (static) inputs and features.

    ``implementation=None`` chooses automatically; an explicit choice is checked.

    Raises:
      ValueError: when the requested implementation cannot run these inputs.
    """
    fused_reason = _fused_reason(
        inputs,
        score_mode=score_mode,
        return_attention_scores=return_attention_scores,
        dropout=dropout,
        causal=causal,
    )
    extra = _unsupported_by_fused(inputs, window)
    fused_reason = fused_reason or extra
    if implementation == "cudnn":
        if fused_reason:
            raise ValueError(f"implementation='cudnn' cannot run these inputs: {fused_reason}.")
        return Plan("cudnn", reason="requested")
    if implementation == "chunked" and return_attention_scores:
        raise ValueError(
            "implementation='chunked' never forms the [..., Tq, Tv] weights, so it cannot "
            "return them; received return_attention_scores=True (use implementation=None "
            "or 'xla')."
        )
    if implementation is not None:
        return Plan(implementation, reason="requested")
    if fused_reason is None:
        return Plan("cudnn", reason="on GPU the fused kernel takes these inputs")
    if return_attention_scores:
        return Plan("xla", reason="the weights are returned, which only xla forms")
    size = materialised_bytes(inputs, score_mode)
    mib = f"{size / 2**20:.3g} MiB"
    if size < CHUNKED_CROSSOVER_BYTES:
        return Plan("xla", reason=f"the materialised scores would take {mib} < 16 MiB")
    if size < FORWARD_CROSSOVER_BYTES and not dropout:
        return Plan(
            "chunked",
            materialise_primal=True,
            reason=f"the materialised scores would take {mib}, between 16 and 32 MiB: "
            "derivatives run chunked, a forward pass nothing differentiates materialised",
        )
    return Plan("chunked", reason=f"the materialised scores would take {mib} >= 32 MiB")


def _unsupported_by_fused(inputs: AttentionInputs, window) -> str | None:
    """Features this library does not (yet) map onto the fused kernel: they fall back, so
    the numbers never differ from Keras's rule."""
    features = {
        "attention_mask": inputs.masking.attention_mask,
        "bias": inputs.bias,
        "segment_ids": inputs.masking.query_segment_ids,
        "window": window,
    }
    given = [name for name, x in features.items() if x is not None]
    return f"{', '.join(given)} given (not mapped onto the fused kernel)" if given else None


def _fused_reason(inputs: AttentionInputs, **features: bool | str) -> str | None:
    """Why the fused GPU kernel cannot take these inputs here (None when it can)."""
    if jax.default_backend() != "gpu":
        return f"the backend is {jax.default_backend()!r}, not 'gpu'"
    return ineligibility(inputs.query.shape, inputs.value.shape, inputs.dtype, **features)
