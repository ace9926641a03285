#!/usr/bin/env bash
# Builds the documentation from scratch, offline, failing on any warning:
#   1. HTML, nitpicky (-n): every cross-reference and link between pages must resolve;
#   2. doctest: the code of every guide runs and its output is compared;
#   3. docs/check_build.py: links and anchors in the built HTML exist, and every public
#      name is in the API reference.
# Needs the docs extra: python -m pip install -e ".[docs]". Output: docs/_build/html.
set -euo pipefail
cd "$(dirname "$0")/.."

rm -rf docs/_build
export KERAS_BACKEND=jax
export FLAX_DOTATTN_TUNING=off  # the guides show the shipped defaults' choices, not a local table
python -m sphinx -b html -W --keep-going -n -q docs docs/_build/html
python -m sphinx -b doctest -W --keep-going -q docs docs/_build/doctest
python docs/check_build.py docs/_build/html
