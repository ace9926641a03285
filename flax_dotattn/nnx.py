"""Flax NNX API of flax_dotattn: ``DotAttention`` and Linen <-> NNX conversion."""

from flax_dotattn._src.nnx_module import DotAttention as DotAttention
from flax_dotattn._src.nnx_module import from_linen as from_linen
from flax_dotattn._src.nnx_module import to_linen as to_linen

__all__ = ("DotAttention", "from_linen", "to_linen")
