"""Tuning: the table the automatic choice reads, and what writes it.

* :mod:`.table`: the tuning table (reading, checking, looking entries up).
* :mod:`.tuner`: ``python -m flax_dotattn.tune`` (the crossover and the chunked blocks).
* :mod:`.kernel_tuners`: the Pallas kernels' block grids.
* :mod:`.timing`: the interleaved timer the tuner and the benchmark share.
"""
