"""flax_dotattn: Keras's dot-product (Luong-style) ``Attention`` for JAX and Flax.

Public API:

* :func:`dot_attention`: the pure function (``jit``/``vmap``/``grad`` friendly).
* :class:`DotAttention`: a Flax Linen module owning the learned scalars.
* :class:`MultiHeadDotAttention`, :class:`MultiHeadDotAttentionConfig`: a multi-head
  module (Keras's ``MultiHeadAttention``, grouped-query heads, a decoding cache) and its
  config; :func:`multi_head_params_from_keras`, :func:`multi_head_params_to_keras`.
* :class:`DotAttentionConfig`, :func:`load_config`, :func:`save_config`: hyper-parameters
  that round-trip through dict/JSON/YAML and Keras configs.
* :func:`params_from_keras`, :func:`params_to_keras`: weight conversion with Keras.
* :func:`sequence_parallel_attention`: keys/values sharded along ``Tv`` over a mesh axis.
* :func:`ring_attention`: queries, keys and values sharded along the sequence (a ring).
* :func:`which_implementation`: which path a call would take, and why.
* :func:`make_causal_mask`, :func:`attention_scores`: building blocks.
* :class:`BlockSizes`: the chunked path's block lengths.
* :func:`flax_attention_fn`: Flax's ``attention_fn`` (for ``nn.MultiHeadDotProductAttention``
  and ``nnx.MultiHeadAttention``) on these kernels; :mod:`flax_dotattn.jax_nn` has
  ``jax.nn.dot_product_attention``'s API.
* :mod:`flax_dotattn.mods`: score and mask functions (ALiBi, T5 buckets, prefix-LM,
  documents, windows, soft-cap) for ``score_mod`` / ``mask_mod``, and their registry.
"""

from flax_dotattn import mods as mods
from flax_dotattn._src.attention import dot_attention as dot_attention
from flax_dotattn._src.attention import which_implementation as which_implementation
from flax_dotattn._src.blocks import BlockSizes as BlockSizes
from flax_dotattn._src.config.classes import DotAttentionConfig as DotAttentionConfig
from flax_dotattn._src.config.classes import (
    MultiHeadDotAttentionConfig as MultiHeadDotAttentionConfig,
)
from flax_dotattn._src.config.files import load_config as load_config
from flax_dotattn._src.config.files import save_config as save_config
from flax_dotattn._src.config.keras import params_from_keras as params_from_keras
from flax_dotattn._src.config.keras import params_to_keras as params_to_keras
from flax_dotattn._src.config.multi_head_keras import (
    multi_head_params_from_keras as multi_head_params_from_keras,
)
from flax_dotattn._src.config.multi_head_keras import (
    multi_head_params_to_keras as multi_head_params_to_keras,
)
from flax_dotattn._src.doors.flax_attention import flax_attention_fn as flax_attention_fn
from flax_dotattn._src.masks import make_causal_mask as make_causal_mask
from flax_dotattn._src.modules.linen import DotAttention as DotAttention
from flax_dotattn._src.modules.multi_head_linen import (
    MultiHeadDotAttention as MultiHeadDotAttention,
)
from flax_dotattn._src.parallel.key_sharded import (
    sequence_parallel_attention as sequence_parallel_attention,
)
from flax_dotattn._src.parallel.ring import ring_attention as ring_attention
from flax_dotattn._src.scores import attention_scores as attention_scores
from flax_dotattn._src.version import __version__ as __version__

__all__ = (
    "BlockSizes",
    "DotAttention",
    "DotAttentionConfig",
    "MultiHeadDotAttention",
    "MultiHeadDotAttentionConfig",
    "attention_scores",
    "dot_attention",
    "flax_attention_fn",
    "load_config",
    "make_causal_mask",
    "mods",
    "multi_head_params_from_keras",
    "multi_head_params_to_keras",
    "params_from_keras",
    "params_to_keras",
    "ring_attention",
    "save_config",
    "sequence_parallel_attention",
    "which_implementation",
)
