"""``jax.nn``'s attention API on flax_dotattn's kernels: change one import.

>>> from flax_dotattn.jax_nn import dot_product_attention   # was: from jax.nn import ...
"""

from flax_dotattn._src.doors.jax_nn import dot_product_attention as dot_product_attention

__all__ = ("dot_product_attention",)
