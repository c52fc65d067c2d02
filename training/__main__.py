"""``python -m lipforcing.training STAGE ...`` (and ``torchrun ... -m lipforcing.training STAGE ...``): exactly
``lipforcing train STAGE ...``, through the ``lipforcing`` program (its error handling, signals and quiet logs)."""

import sys

from ..cli import main

sys.exit(main(["train", *sys.argv[1:]]))
