"""Doors for code written against other attention APIs: ``jax.nn.dot_product_attention``
(:mod:`.jax_nn`) and Flax's ``attention_fn`` (:mod:`.flax_attention`), with their numbers,
on :func:`dot_attention`'s kernels. :mod:`.layout` maps their sequence-first layout onto
``[..., T, D]``; :mod:`.replace_rule` gives their masking rule on Keras's kernels."""
