"""``lipforcing run --gpus N``: one stream whose student runs on N ranks (sequence parallel, dit/parallel.py).

Rank 0 runs the whole session as usual (decoding, alignment, encoders, decoder, paste-back, muxing); its
student is a ``RankedStudent``, which sends its creation and every call (warm-up, clip start, chunk) to ranks
1..N-1 before it runs its own share. Those ranks run ``serve_students``: the same student on their own device
(``cuda:<rank>``, or the CPU with gloo), the same calls in the same order, each computing its tokens and its
heads; every rank ends each call with the same x0, and rank 0 hands its copy on. Inputs travel from rank 0 as
host tensors (a chunk's latents: ~0.8 MB); the activations of the calls travel in the scheme's all-to-alls.

    lipforcing run talk.mp4 --audio speech.wav -o out.mp4 --gpus 2        # spawns ranks 0 and 1

``lipforcing bench --gpus N`` runs the same way (bench/commands.py): each variant's engine opens a student on every
rank. Not yet: several sessions per engine with --gpus (the batcher), serve with --gpus.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_map

_STOP, _EXIT = "stop", "exit"


def _to(device: torch.device | str, value):
    return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, value)


class RankedStudent:
    """Rank 0's student: its creation (``open``, with the engine's config), each call and its end (``stop``) go to
    the other ranks first, then run here (every other attribute is the local student's: cfg, cache, backend ...)."""

    def __init__(self, local, config) -> None:
        self.local = local
        self._stopped = False
        _send("open", config)

    def __getattr__(self, name: str):
        return getattr(self.local, name)

    def start_clip(self, *args, **kwargs):
        _send("start_clip", *args, **kwargs)
        return self.local.start_clip(*args, **kwargs)

    def run_chunk(self, *args, **kwargs):
        _send("run_chunk", *args, **kwargs)
        return self.local.run_chunk(*args, **kwargs)

    def warm_up(self, *args, **kwargs):
        _send("warm_up", *args, **kwargs)
        return self.local.warm_up(*args, **kwargs)

    def stop(self) -> None:
        """The engine is closing: the other ranks drop their student (idempotent)."""
        if not self._stopped:
            self._stopped = True
            _send(_STOP)


def _send(name: str, *args, **kwargs) -> None:
    dist.broadcast_object_list([(name, _to("cpu", args), _to("cpu", kwargs))], src=0)


def end_ranks() -> None:
    """Rank 0, when the command is done: the other ranks leave ``serve_students``."""
    if dist.is_initialized():
        _send(_EXIT)


def serve_students(rank: int, model_for: Callable) -> dict:
    """Ranks 1..N-1: build the student rank 0 opens (``model_for(config)`` gives the network for a RunConfig), run
    its calls until rank 0 ends; returns what this rank did: calls and seconds per call kind."""
    from .engine import make_student

    student, device = None, None
    calls: dict[str, int] = {}
    seconds: dict[str, float] = {}
    while True:
        message = [None]
        dist.broadcast_object_list(message, src=0)
        name, args, kwargs = message[0]
        if name == _EXIT:
            return {"rank": rank, "calls": calls, "seconds": {k: round(v, 4) for k, v in seconds.items()}}
        if name == "open":
            config = rank_config(args[0], rank)
            student, device = make_student(config, model_for(config)), torch.device(config.device)
            continue
        if name == _STOP:
            student = None
            continue
        began = time.perf_counter()
        getattr(student, name)(*_to(device, args), **_to(device, kwargs))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        calls[name] = calls.get(name, 0) + 1
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - began


def run_rank(rank: int, world: int, argv: list[str]) -> int | dict:
    """The target of each rank of ``lipforcing run --gpus N`` (engine/runtime/ranks.py spawns them)."""
    from .cli import build_parser, engine_config
    from .engine import load_networks

    args = build_parser().parse_args(argv)
    args.argv = argv
    if rank == 0:
        import signal

        from .cli import _on_sigterm

        # stopped like the command itself: a valid MP4 of the frames so far, or none (run.py)
        signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            return args.run(args)  # torch.distributed is initialised: the engine's student is a RankedStudent
        finally:
            end_ranks()
    cfg, weights = engine_config(args)
    networks = load_networks(rank_config(cfg, rank), weights)
    return serve_students(rank, lambda config: networks.student)


def rank_config(cfg, rank: int):
    """The rank's own device: cuda:<rank> on CUDA (one GPU each), the CPU otherwise."""
    from dataclasses import replace

    return replace(cfg, device=f"cuda:{rank}") if cfg.device.startswith("cuda") else cfg
