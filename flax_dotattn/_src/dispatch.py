"""Automatic choice of implementation from static shapes, dtype, backend and features.

* ``"cudnn"`` on GPU for float16/bfloat16 inputs the fused kernel can take (see
  :func:`flax_dotattn._src.cudnn.ineligibility`).
* ``"xla"`` (materialised) for short sequences, and whenever the weights are returned.
* ``"chunked"`` once one sequence's materialised intermediate (its ``[Tq, Tv]`` scores;
  ``[Tq, Tv, D]`` in concat mode) reaches :data:`CHUNKED_CROSSOVER_BYTES`.

The rule reads the size of *one* sequence, never the batch: under ``jax.vmap`` a call sees
only its own example, and the rule must choose what the batched call chooses (the chunked
kernel itself takes a vmapped axis into its batch, so both then cost the same). The
crossovers were measured with ``python -m flax_dotattn.bench`` (see README); the time of
either path is nearly proportional to the batch, so the batch does not move them. A table
written by ``python -m flax_dotattn.tune`` for this device replaces them (see
:mod:`flax_dotattn._src.tuning`); the reason then ends in "(tuned on <device kind>)".
"""

from __future__ import annotations

from typing import NamedTuple

import jax

from flax_dotattn._src import tuning
from flax_dotattn._src.cudnn import ineligibility
from flax_dotattn._src.options import AttentionOptions
from flax_dotattn._src.validation import AttentionInputs

#: Per sequence, by score mode. On a 2-core x86 CPU, ``"dot"``: at T = 512 (1 MiB of
#: scores) both paths took the same time, forward and forward+backward, at B = 1 and 8;
#: from T = 1024 chunked was faster (8x1024: 2.5x forward, 1.5x forward+backward).
#: ``"concat"`` (``[Tq, Tv, D]`` tanh intermediate, D = 64): at T = 128 (4 MiB) xla was
#: 1.4x faster forward+backward; from T = 256 (16 MiB) chunked was faster (1.4x; 5x at 512).
CHUNKED_CROSSOVER_BYTES = {"dot": 2**20, "concat": 16 * 2**20}


class Plan(NamedTuple):
    """How :func:`dot_attention` will run."""

    implementation: str  # "xla", "chunked" or "cudnn"
    reason: str = ""  # why, in words


def materialised_bytes(inputs: AttentionInputs, score_mode: str) -> int:
    """Bytes of the largest intermediate the materialised path forms for one sequence."""
    tq, tv = inputs.query.shape[-2], inputs.key.shape[-2]
    per_score = inputs.query.shape[-1] if score_mode == "concat" else 1
    return tq * tv * per_score * inputs.compute_dtype.itemsize


def plan(inputs: AttentionInputs, options: AttentionOptions) -> Plan:
    """The :class:`Plan` for these (static) inputs and options.

    ``options.implementation=None`` chooses automatically; an explicit choice is checked.

    Raises:
      ValueError: when the requested implementation cannot run these inputs.
    """
    implementation = options.implementation
    fused_reason = _fused_reason(inputs, options) or _unsupported_by_fused(inputs, options)
    if implementation == "cudnn":
        if fused_reason:
            raise ValueError(f"implementation='cudnn' cannot run these inputs: {fused_reason}.")
        return Plan("cudnn", reason="requested")
    if implementation == "chunked" and options.return_attention_scores:
        raise ValueError(
            "implementation='chunked' never forms the [..., Tq, Tv] weights, so it cannot "
            "return them; received return_attention_scores=True (use implementation=None "
            "or 'xla')."
        )
    if implementation is not None:
        return Plan(implementation, reason="requested")
    if fused_reason is None:
        return Plan("cudnn", reason="on GPU the fused kernel takes these inputs")
    if options.return_attention_scores:
        return Plan("xla", reason="the weights are returned, which only xla forms")
    size = materialised_bytes(inputs, options.score_mode)
    limit, tuned = CHUNKED_CROSSOVER_BYTES[options.score_mode], ""
    table = tuning.for_call(inputs, options)
    if table is not None and table.crossover_bytes is not None:
        limit, tuned = table.crossover_bytes, f" (tuned on {table.device_kind})"
    what = f"one sequence's materialised scores would take {size / 2**20:.3g} MiB"
    if size < limit:
        return Plan("xla", reason=f"{what} < {limit / 2**20:.3g} MiB{tuned}")
    return Plan("chunked", reason=f"{what} >= {limit / 2**20:.3g} MiB{tuned}")


def _unsupported_by_fused(inputs: AttentionInputs, options: AttentionOptions) -> str | None:
    """Features this library does not (yet) map onto the fused kernel: they fall back, so
    the numbers never differ from Keras's rule."""
    features = {
        "attention_mask": inputs.masking.attention_mask,
        "bias": inputs.bias,
        "segment_ids": inputs.masking.query_segment_ids,
        "window": options.window,
        "query_offset": inputs.query_offset,
    }
    given = [name for name, x in features.items() if x is not None]
    return f"{', '.join(given)} given (not mapped onto the fused kernel)" if given else None


def _fused_reason(inputs: AttentionInputs, options: AttentionOptions) -> str | None:
    """Why the fused GPU kernel cannot take these inputs here (None when it can)."""
    if jax.default_backend() != "gpu":
        return f"the backend is {jax.default_backend()!r}, not 'gpu'"
    return ineligibility(
        inputs.query.shape,
        inputs.value.shape,
        inputs.dtype,
        score_mode=options.score_mode,
        causal=options.causal,
        dropout=options.dropout,
        return_attention_scores=options.return_attention_scores,
    )
