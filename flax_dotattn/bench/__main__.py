"""``python -m flax_dotattn.bench``."""

import sys

from flax_dotattn.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
