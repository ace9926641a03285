"""The Flax modules: thin owners of parameters over the pure function.

* :mod:`.linen`, :mod:`.nnx`: ``DotAttention`` (Linen and NNX).
* :mod:`.multi_head`: the multi-head maths shared by :mod:`.multi_head_linen` and
  :mod:`.multi_head_nnx` (``MultiHeadDotAttention``).
* :mod:`.call`: the one call path every module takes into ``attend``.
"""
