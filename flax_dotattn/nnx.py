"""Flax NNX API of flax_dotattn: ``DotAttention``, ``MultiHeadDotAttention`` and Linen <->
NNX conversion."""

from flax_dotattn._src.multi_head_nnx import MultiHeadDotAttention as MultiHeadDotAttention
from flax_dotattn._src.nnx_module import DotAttention as DotAttention
from flax_dotattn._src.nnx_module import from_linen as from_linen
from flax_dotattn._src.nnx_module import to_linen as to_linen

__all__ = ("DotAttention", "MultiHeadDotAttention", "from_linen", "to_linen")
