"""Automatic choice of implementation, per platform, from static shapes, dtype and
features.

One traced call can lower to several platforms (``jax.export`` for TPU from a CPU host,
AOT ``.lower()``), so the choice is made once per platform (:func:`plans`) and
:mod:`.kernels` defers it to lowering with ``jax.lax.platform_dependent``; the current
backend only matters for an explicit ``"cudnn"`` and for the default of
:func:`~flax_dotattn.which_implementation`.

* ``"cpu"`` (and any platform without its own rule): ``"xla"`` (materialised) for short
  sequences and whenever the weights are returned; ``"chunked"`` once one sequence's
  materialised intermediate (its ``[Tq, Tv]`` scores; ``[Tq, Tv, D]`` in concat mode)
  reaches :data:`CHUNKED_CROSSOVER_BYTES`.
* ``"tpu"``: ``"pallas_tpu"`` (splash attention) where it takes the inputs with Keras's
  numbers (:func:`ineligibility`) and both lengths reach one kernel block; otherwise the
  CPU rule.
* ``"cuda"``: ``"cudnn"`` for calls the fused kernel takes with Keras's numbers
  (:func:`ineligibility`) when a GPU is attached (``jax.nn`` checks the installed cuDNN
  while tracing, so no cuDNN call can be traced on a host without one); else
  ``"pallas_gpu"`` from one kernel block of keys, unless padding the queries to the keys'
  padded length would more than double them; otherwise the CPU rule.
  ``"rocm"``: the CPU rule.

What each kernel takes is one table
(:data:`flax_dotattn._src.kernels.capabilities.TABLE`): :func:`ineligibility` reads a
kernel's row, then the kernel's own ``constraints()`` (head sizes, bands, ...), and the
plans' reasons are its words.

The rule reads the size of *one* sequence, never the batch: under ``jax.vmap`` a call sees
only its own example, and the rule must choose what the batched call chooses (the chunked
kernel itself takes a vmapped axis into its batch, so both then cost the same). The
crossovers were measured with ``python -m flax_dotattn.bench`` (see README); the time of
either path is nearly proportional to the batch, so the batch does not move them. A table
written by ``python -m flax_dotattn.tune`` for this device replaces them (see
:mod:`flax_dotattn._src.tuning.table`); the reason then ends in "(tuned on <device kind>)".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax

from flax_dotattn._src.kernels import capabilities, cudnn, pallas_gpu, pallas_tpu
from flax_dotattn._src.options import AttentionOptions
from flax_dotattn._src.tuning import table as tuning
from flax_dotattn._src.validation import AttentionInputs

#: Per sequence, by score mode. ``"dot"``: on a quiet 2-core AMD EPYC CPU, at
#: ``8 x 512`` (1 MiB of scores) the chunked path ran the forward at 0.86x to 0.90x of the
#: materialised one and forward+backward at 1.06x (interleaved, 7 samples), so T = 512 stays
#: materialised; from ``4 x 1024`` (4 MiB) chunked was as fast forward and 1.5x to 1.7x
#: forward+backward, 2x at T = 4096. ``"concat"`` (``[Tq, Tv, D]`` tanh intermediate,
#: D = 64): at T = 128 (4 MiB) xla was 1.4x faster forward+backward; from T = 256 (16 MiB)
#: chunked was faster (1.4x; 5x at 512).
CHUNKED_CROSSOVER_BYTES = {"dot": 2 * 2**20, "concat": 16 * 2**20}


#: The platforms a call is planned for, by their lowering names.
PLATFORMS = ("cpu", "tpu", "cuda", "rocm")
#: ``platform=`` spellings :func:`plan` accepts beyond :data:`PLATFORMS`.
_ALIASES = {"gpu": "cuda"}


#: The Pallas kernels by implementation name (anywhere but the platform their row of the
#: capability table names, they run in interpret mode).
PALLAS_KERNELS = ("pallas_tpu", "pallas_gpu")
#: The static checks each kernel makes beyond its row of the capability table.
_CONSTRAINTS: dict[str, Callable[[AttentionInputs, AttentionOptions], str | None]] = {
    "pallas_tpu": pallas_tpu.constraints,
    "cudnn": cudnn.constraints,
    "pallas_gpu": pallas_gpu.constraints,
}


def ineligibility(
    implementation: str, inputs: AttentionInputs, options: AttentionOptions
) -> str | None:
    """Why ``implementation`` cannot run these (static) inputs with Keras's numbers, or
    None when it can: its row of the capability table, then its own constraints."""
    reason = capabilities.TABLE[implementation].missing(inputs, options)
    if reason is None and implementation in _CONSTRAINTS:
        reason = _CONSTRAINTS[implementation](inputs, options)
    return reason


def shard_ineligibility(inputs: AttentionInputs, options: AttentionOptions) -> str | None:
    """Why one key shard of :func:`sequence_parallel_attention` cannot run on splash."""
    if options.causal or options.window is not None:
        return (
            "causal/window on a key shard: rows may see none of the shard's keys, which "
            "the kernel's backward pass cannot take"
        )
    return ineligibility("pallas_tpu", inputs, options)


class Plan(NamedTuple):
    """How :func:`dot_attention` will run."""

    implementation: str  # "xla", "chunked", "cudnn", "pallas_tpu" or "pallas_gpu"
    reason: str = ""  # why, in words


def current_platform() -> str:
    """The default backend's platform, by its lowering name (``"cuda"``, ``"rocm"``,
    ``"tpu"``, ``"cpu"``)."""
    backend = jax.default_backend()
    if backend == "gpu":
        return jax.devices()[0].platform  # "cuda" or "rocm"
    return backend


def check_platform(platform: object) -> str:
    """``platform`` (None: the current backend) as one of :data:`PLATFORMS`."""
    if platform is None:
        return current_platform()
    if isinstance(platform, str) and platform.lower() in (*PLATFORMS, *_ALIASES):
        name = platform.lower()
        return _ALIASES.get(name, name)
    raise ValueError(
        f"platform must be None or one of {(*PLATFORMS, *_ALIASES)}; received "
        f"platform={platform!r}."
    )


def materialised_bytes(inputs: AttentionInputs, score_mode: str) -> int:
    """Bytes of the largest intermediate the materialised path forms for one sequence."""
    tq, tv = inputs.query.shape[-2], inputs.key.shape[-2]
    per_score = inputs.query.shape[-1] if score_mode == "concat" else 1
    return tq * tv * per_score * inputs.compute_dtype.itemsize


def plans(inputs: AttentionInputs, options: AttentionOptions) -> dict[str, Plan]:
    """The :class:`Plan` of every platform in :data:`PLATFORMS`.

    Raises:
      ValueError: when the requested implementation cannot run these inputs.
    """
    return {platform: plan(inputs, options, platform) for platform in PLATFORMS}


def plan(inputs: AttentionInputs, options: AttentionOptions, platform: str | None = None) -> Plan:
    """The :class:`Plan` for these (static) inputs and options on ``platform`` (None: the
    current backend).

    ``options.implementation=None`` chooses automatically; an explicit choice is checked
    (the same on every platform: ``"pallas_tpu"`` runs in interpret mode off TPU).

    Raises:
      ValueError: when the requested implementation cannot run these inputs.
    """
    platform = check_platform(platform)
    implementation = options.implementation
    if implementation == "cudnn":
        fused_reason = _fused_reason(inputs, options)
        if fused_reason:
            raise ValueError(f"implementation='cudnn' cannot run these inputs: {fused_reason}.")
        return Plan("cudnn", reason="requested")
    if implementation is not None:
        kernel_reason = ineligibility(implementation, inputs, options)
        if kernel_reason:
            raise ValueError(
                f"implementation={implementation!r} cannot run these inputs: {kernel_reason}."
            )
        own_platform = capabilities.TABLE[implementation].platform
        interpreted = implementation in PALLAS_KERNELS and platform != own_platform
        mode = f" (Pallas interpret mode on {platform})" if interpreted else ""
        return Plan(implementation, reason="requested" + mode)
    if platform == "tpu":
        return _tpu_plan(inputs, options)
    if platform == "cuda":
        return _cuda_plan(inputs, options)
    return _cpu_plan(inputs, options)


def _cpu_plan(inputs: AttentionInputs, options: AttentionOptions) -> Plan:
    """The rule of CPUs, and of any platform where no kernel of its own takes the call."""
    if options.return_attention_scores:
        return Plan("xla", reason="the weights are returned, which only xla forms")
    size = materialised_bytes(inputs, options.score_mode)
    limit, tuned = CHUNKED_CROSSOVER_BYTES[options.score_mode], ""
    table = tuning.for_call(inputs, options)
    if table is not None and table.crossover_bytes is not None:
        limit, tuned = table.crossover_bytes, f" (tuned on {table.device_kind})"
    size_mib, limit_mib = _mib(size, limit)
    what = f"one sequence's materialised scores would take {size_mib} MiB"
    if size < limit:
        return Plan("xla", reason=f"{what} < {limit_mib} MiB{tuned}")
    return Plan("chunked", reason=f"{what} >= {limit_mib} MiB{tuned}")


def _mib(size: int, limit: int) -> tuple[str, str]:
    """Both byte counts in MiB to 3 significant digits, more where that would print two
    different counts alike (``T = 724`` is 1.99957 MiB, not "2 MiB < 2 MiB")."""
    for digits in (3, 6, 9, 17):
        shown = f"{size / 2**20:.{digits}g}", f"{limit / 2**20:.{digits}g}"
        if shown[0] != shown[1] or size == limit:
            break
    return shown


def _tpu_plan(inputs: AttentionInputs, options: AttentionOptions) -> Plan:
    """``"pallas_tpu"`` where splash takes the call, else the CPU rule (with why)."""
    reason = ineligibility("pallas_tpu", inputs, options)
    tq, tv = inputs.query.shape[-2], inputs.key.shape[-2]
    if reason is None and min(tq, tv) < pallas_tpu.MIN_AUTOMATIC_LENGTH:
        reason = (
            f"Tq={tq}, Tv={tv}: shorter than one kernel block ({pallas_tpu.MIN_AUTOMATIC_LENGTH})"
        )
    if reason is None:
        tuned = pallas_tpu.blocks_are_tuned(inputs, options)
        note = tuning.tuned_note() if tuned else ""
        return Plan("pallas_tpu", reason=f"on TPU the splash kernel takes these inputs{note}")
    fallback = _cpu_plan(inputs, options)
    return fallback._replace(reason=f"pallas_tpu: {reason}; {fallback.reason}")


def _cuda_plan(inputs: AttentionInputs, options: AttentionOptions) -> Plan:
    """``"cudnn"`` where the fused kernel takes the call, else ``"pallas_gpu"`` where the
    Pallas kernel does, else the CPU rule (with why each was passed over)."""
    fused_reason = _fused_reason(inputs, options)
    if fused_reason is None:
        return Plan("cudnn", reason="on GPU the fused kernel takes these inputs")
    triton_reason = ineligibility("pallas_gpu", inputs, options)
    tv = inputs.key.shape[-2]
    if triton_reason is None and tv < pallas_gpu.FORWARD_BLOCK:
        triton_reason = f"Tv={tv}: shorter than one kernel block ({pallas_gpu.FORWARD_BLOCK})"
    padded = pallas_gpu.shipped_blocks(tv).length
    if triton_reason is None and padded > 2 * inputs.query.shape[-2]:
        triton_reason = (
            f"Tq={inputs.query.shape[-2]}: the kernel would pad the queries to {padded} "
            "rows, the keys' length (more than twice the work)"
        )
    if triton_reason is None:
        tuned = pallas_gpu.call_blocks(inputs, options) != pallas_gpu.shipped_blocks(tv)
        note = tuning.tuned_note() if tuned else ""
        return Plan(
            "pallas_gpu",
            reason=f"cudnn: {fused_reason}; the Pallas GPU kernel takes these inputs{note}",
        )
    fallback = _cpu_plan(inputs, options)
    return fallback._replace(
        reason=f"cudnn: {fused_reason}; pallas_gpu: {triton_reason}; {fallback.reason}"
    )


def sequence_parallel_plans(
    inputs: AttentionInputs, options: AttentionOptions, shard_length: int
) -> dict[str, Plan]:
    """The kernel each key shard of :func:`sequence_parallel_attention` runs, per
    platform: ``"pallas_tpu"`` on TPU where splash takes a shard, else ``"chunked"`` (the
    merge needs each shard's softmax statistics, which only these two return)."""
    reason = shard_ineligibility(inputs, options)
    tq = inputs.query.shape[-2]
    if reason is None and min(tq, shard_length) < pallas_tpu.MIN_AUTOMATIC_LENGTH:
        reason = f"Tq={tq}, shard Tv={shard_length}: shorter than one kernel block"
    blockwise = Plan("chunked", reason="the shards' merge needs softmax statistics")
    result = {platform: blockwise for platform in PLATFORMS}
    if reason is None:
        result["tpu"] = Plan("pallas_tpu", reason="on TPU the splash kernel takes each shard")
    else:
        result["tpu"] = blockwise._replace(reason=f"pallas_tpu: {reason}")
    return result


def _fused_reason(inputs: AttentionInputs, options: AttentionOptions) -> str | None:
    """Why the fused GPU kernel cannot take these inputs here (None when it can); it is
    never traced without a GPU attached (``jax.nn`` checks cuDNN while tracing)."""
    if jax.default_backend() != "gpu":
        return f"the backend is {jax.default_backend()!r}, not 'gpu'"
    return ineligibility("cudnn", inputs, options)
