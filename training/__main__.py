"""``python -m lipforcing.training STAGE ...`` (and ``torchrun ... -m lipforcing.training STAGE ...``)."""

import sys

from .cli import main

sys.exit(main())
