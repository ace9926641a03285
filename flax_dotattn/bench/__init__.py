"""The benchmark, run as ``python -m flax_dotattn.bench`` (options: ``--help``).

A client of the library, which never imports it. One job per module:

* :mod:`~flax_dotattn.bench.cli`: the command line (options, defaults, outputs).
* :mod:`~flax_dotattn.bench.runs`: a run over shapes and modes, or over scenarios, as rows.
* :mod:`~flax_dotattn.bench.entries`: what one entry times, a jitted function and its inputs.
* :mod:`~flax_dotattn.bench.baselines`: the implementations compared with: naive einsum,
  ``jax.nn``, Keras and PyTorch (the last two imported only when asked for).
* :mod:`~flax_dotattn.bench.measure`: median wall time, peak memory from ``/proc``, the
  machine and its load.
* :mod:`~flax_dotattn.bench.plot`: time and peak memory against T (matplotlib, imported
  only when drawing).
* :mod:`~flax_dotattn.bench.report`: the rows as a Markdown table, JSON and console lines.
"""

from flax_dotattn.bench.cli import main as main

__all__ = ["main"]
