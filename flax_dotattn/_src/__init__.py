"""Private implementation modules of flax_dotattn; import from the package instead."""
