"""The kernels: one module (or package) per ``implementation=`` name.

* :mod:`.xla`: the materialised path (``[..., Tq, Tv]`` scores).
* :mod:`.chunked`: the blockwise path, O(T) memory forward and backward.
* :mod:`.cudnn`: cuDNN's fused kernel through ``jax.nn.dot_product_attention``.
* :mod:`.pallas_tpu`: JAX's splash attention (Pallas, TPU).
* :mod:`.pallas_gpu`: JAX's Pallas GPU (Triton) flash attention.

Shared helpers, not kernels: :mod:`.fused_inputs` (laying a call out for a fused kernel)
and :mod:`.linear_map` (a linear map with a given transpose, for derivative rules).

Kernels never import each other: the runner (:mod:`flax_dotattn._src.runner`) composes a
fused kernel's run-time fallback and its forward-mode route through the chunked kernel,
and the dispatcher (:mod:`flax_dotattn._src.dispatch`) chooses from what each kernel
declares it takes (:mod:`.capabilities`).
"""
