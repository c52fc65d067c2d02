"""``lipforcing run --gpus N``: one stream whose student runs on N ranks (sequence parallel, dit/parallel.py).

Rank 0 runs the whole session as usual (decoding, alignment, encoders, decoder, paste-back, muxing); its
student is a ``RankedStudent``, which sends every call (warm-up, clip start, chunk) to ranks 1..N-1 before it
runs its own share. Those ranks run ``serve_student``: the same student on their own device (``cuda:<rank>``,
or the CPU with gloo), the same calls in the same order, each computing its tokens and its heads; every rank
ends each call with the same x0, and rank 0 hands its copy on. Inputs travel from rank 0 as host tensors (a
chunk's latents: ~0.8 MB); the activations of the calls travel in the scheme's all-to-alls.

    lipforcing run talk.mp4 --audio speech.wav -o out.mp4 --gpus 2        # spawns ranks 0 and 1

Not yet: several sessions per engine with --gpus (the batcher), serve and bench with --gpus.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_map

_STOP = "stop"


def _to(device: torch.device | str, value):
    return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, value)


class RankedStudent:
    """Rank 0's student: each call goes to the other ranks first, then runs here (every other attribute is the
    local student's: cfg, cache, backend, cuda_graphs ...)."""

    def __init__(self, local) -> None:
        self.local = local
        self._stopped = False

    def __getattr__(self, name: str):
        return getattr(self.local, name)

    def _send(self, name: str, *args, **kwargs) -> None:
        dist.broadcast_object_list([(name, _to("cpu", args), _to("cpu", kwargs))], src=0)

    def start_clip(self, *args, **kwargs):
        self._send("start_clip", *args, **kwargs)
        return self.local.start_clip(*args, **kwargs)

    def run_chunk(self, *args, **kwargs):
        self._send("run_chunk", *args, **kwargs)
        return self.local.run_chunk(*args, **kwargs)

    def warm_up(self, *args, **kwargs):
        self._send("warm_up", *args, **kwargs)
        return self.local.warm_up(*args, **kwargs)

    def stop(self) -> None:
        """Tell the other ranks the stream has ended (idempotent)."""
        if not self._stopped:
            self._stopped = True
            self._send(_STOP)


def serve_student(student) -> int:
    """Ranks 1..N-1: run rank 0's student calls on ``student`` until it stops; returns the calls served."""
    device = student.device
    served = 0
    while True:
        message = [None]
        dist.broadcast_object_list(message, src=0)
        name, args, kwargs = message[0]
        if name == _STOP:
            return served
        getattr(student, name)(*_to(device, args), **_to(device, kwargs))
        served += 1


def run_rank(rank: int, world: int, argv: list[str]) -> int | dict:
    """The target of each rank of ``lipforcing run --gpus N`` (engine/runtime/ranks.py spawns them)."""
    from .cli import build_parser, engine_config
    from .engine import load_networks, make_student

    args = build_parser().parse_args(argv)
    if rank == 0:
        import signal

        from .cli import _on_sigterm

        # stopped like the command itself: a valid MP4 of the frames so far, or none (run.py)
        signal.signal(signal.SIGTERM, _on_sigterm)
        return args.run(args)  # the engine sees torch.distributed initialised: its student is a RankedStudent
    cfg, weights = engine_config(args)
    cfg = rank_config(cfg, rank)
    networks = load_networks(cfg, weights)
    return {"served": serve_student(make_student(cfg, networks.student))}


def rank_config(cfg, rank: int):
    """The rank's own device: cuda:<rank> on CUDA (one GPU each), the CPU otherwise."""
    from dataclasses import replace

    return replace(cfg, device=f"cuda:{rank}") if cfg.device.startswith("cuda") else cfg
