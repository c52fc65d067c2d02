"""The ``lipforcing`` program: gathers the commands of every package and runs one.

    lipforcing run talk.mp4 --audio speech.wav -o out.mp4      # engine.app
    lipforcing bench --model 1.3b --out r.json                  # bench

The engine's commands live in ``engine.app.cli``; packages above it (``bench``) register theirs in the
same registry when imported here, so no lower layer imports a higher one.
"""

from __future__ import annotations

import sys

from .bench import commands as _bench_commands  # noqa: F401  (registers ``lipforcing bench``)
from .engine.app.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
