"""The ``lipforcing`` program: gathers the commands of every package and runs one.

    lipforcing run talk.mp4 --audio speech.wav -o out.mp4      # engine.app
    lipforcing bench --model 1.3b --out r.json                  # bench
    lipforcing train stage1 --data DATA --out RUN               # training

The engine's commands live in ``engine.app.cli``; packages above it (``bench``) register theirs in the
same registry when imported here, and the training commands (``lipforcing.training.cli``, which may not import
the application layer) are added here, so no lower layer imports a higher one.
"""

from __future__ import annotations

import sys

from .bench import commands as _bench_commands  # noqa: F401  (registers ``lipforcing bench``)
from .bench import distill as _bench_distill  # noqa: F401  (registers ``lipforcing bench-distill``)
from .bench import kernels_command as _kernels_command  # noqa: F401  (registers ``lipforcing kernels``)
from .engine.app.cli import COMMANDS, main
from .training import cli as _training

COMMANDS["prepare-data"] = (_training.PREPARE_HELP, _training.prepare_data_arguments)
COMMANDS["train"] = (_training.TRAIN_HELP, _training.train_arguments)
COMMANDS["analyze-trajectory"] = (_training.TRAJECTORY_HELP, _training.trajectory_arguments)

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
