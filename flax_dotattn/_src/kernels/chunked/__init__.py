"""The blockwise kernel behind ``implementation="chunked"``: memory-efficient attention
with Keras's semantics, differentiable in both modes.

An online softmax over key blocks (FlashAttention-2 style) that never forms the
``[..., Tq, Tv]`` scores, with exact block skipping, a blockwise forward-mode tangent and
its hand-written transpose, and vmap folding. Every direction takes O(T · block) memory.
The numbers are those of the materialised path up to float rounding.

Modules, one concern each:

* :mod:`.operands`: static settings, operands, named tangents, :func:`prepare`;
* :mod:`.layout`: cutting operands into blocks (per position and per pair);
* :mod:`.bounds`: logit bounds and the exact-zero test behind skipping;
* :mod:`.skipping`: which key blocks a query block visits (band, data tests, two passes);
* :mod:`.softmax`: one block's masked logits, softmax weights and dropout;
* :mod:`.forward`, :mod:`.tangent`, :mod:`.transpose`: the three passes;
* :mod:`.batching`: ``jax.vmap`` folding the mapped axis into the batch;
* :mod:`.kernel`: the differentiable kernel and the entry point :func:`attention`.

This file is the kernel's interface: the rest of the library (``dot_attention``,
``sequence_parallel_attention``, ``ring_attention``) uses only these names. Shape
glossary: ``...`` batch dims, ``Tq``/``Tv`` query/key lengths, ``D`` query/key depth,
``Dv`` value depth, ``B`` the flattened batch, ``Bq``/``Bk`` block lengths, ``nQ``/``nK``
block counts.
"""

from flax_dotattn._src.kernels.chunked.bounds import logit_bounds, negligible
from flax_dotattn._src.kernels.chunked.forward import forward
from flax_dotattn._src.kernels.chunked.kernel import attention, tangent
from flax_dotattn._src.kernels.chunked.operands import (
    Operands,
    Static,
    Tangents,
    clip_blocks,
    prepare,
)
from flax_dotattn._src.kernels.chunked.tangent import Residuals

__all__ = [
    "Operands",
    "Residuals",
    "Static",
    "Tangents",
    "attention",
    "clip_blocks",
    "forward",
    "logit_bounds",
    "negligible",
    "prepare",
    "tangent",
]
