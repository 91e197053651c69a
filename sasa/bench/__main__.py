"""``python -m sasa.bench ARGS`` = ``sasa bench ARGS``."""

import sys

from ..cli import main

sys.argv = ["sasa", "bench", *sys.argv[1:]]
sys.exit(main(sys.argv[1:]))
