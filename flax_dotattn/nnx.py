"""Flax NNX API of flax_dotattn: ``DotAttention``, ``MultiHeadDotAttention`` and Linen <->
NNX conversion."""

from flax_dotattn._src.modules.multi_head_nnx import MultiHeadDotAttention as MultiHeadDotAttention
from flax_dotattn._src.modules.nnx import DotAttention as DotAttention
from flax_dotattn._src.modules.nnx import from_linen as from_linen
from flax_dotattn._src.modules.nnx import to_linen as to_linen

__all__ = ("DotAttention", "MultiHeadDotAttention", "from_linen", "to_linen")
