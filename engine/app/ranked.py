"""``lipforcing run|serve --gpus N``: one stream whose student runs on N ranks (sequence parallel, dit/parallel.py).

Rank 0 runs the whole command as usual (decoding, alignment, encoders, decoder, paste-back, muxing; the server);
its student is a ``RankedStudent``, which sends its creation and every call (warm-up, clip start, chunk; with
several sessions the batcher's slot calls) to ranks 1..N-1 before it runs its own share. Those ranks run
``serve_students``: the same student on their own device (``cuda:<rank>``, or the CPU with gloo), the same calls
in the same order, each computing its tokens and its heads; every rank ends each call with the same x0, and rank 0
hands its copy on. Inputs travel from rank 0 as host tensors (a chunk's latents: ~0.8 MB) in host-side messages
(``ranks.control_group``); the activations of the calls travel in the scheme's all-to-alls.

    lipforcing run talk.mp4 --audio speech.wav -o out.mp4 --gpus 2        # spawns ranks 0 and 1
    lipforcing serve --gpus 2 --max-sessions 4                            # every session's chunks on both

Several sessions (``max_sessions`` above 1) share the ranks as they share one GPU: the batcher's calls (open and
close a slot, group the waiting sessions, run a group) are sent like the others, a session's slot named by its
row; every rank's scheduler makes the same moves in the same order, so the rows agree. ``lipforcing bench --gpus
N`` runs the same way (bench/commands.py).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_map

from ..runtime.ranks import control_group

_STOP, _EXIT = "stop", "exit"


@dataclass(frozen=True)
class _Row:
    """A session's slot in a message: its row, which names the same session on every rank."""

    row: int


class RankedStudent:
    """Rank 0's student: its creation (``open``, with the engine's config), each call and its end (``stop``) go to
    the other ranks first, then run here (every other attribute is the local student's: cfg, cache, backend ...).
    A lock keeps each message and its local call together, so that calls from several threads (the engine's
    warm-up, the batcher) reach every rank in one order."""

    def __init__(self, local, config) -> None:
        self.local = local
        self._stopped = False
        self._lock = threading.RLock()
        _send("open", config, local.stream)

    def __getattr__(self, name: str):
        return getattr(self.local, name)

    def _forward(self, name: str, *args, **kwargs):
        with self._lock:
            if self._stopped:
                raise RuntimeError("the student's ranks were stopped (the engine is closed)")
            _send(name, *_rows(args), **_rows(kwargs))
            return getattr(self.local, name)(*args, **kwargs)

    def warm_up(self, *args, **kwargs):
        return self._forward("warm_up", *args, **kwargs)

    def start_clip(self, *args, **kwargs):
        return self._forward("start_clip", *args, **kwargs)

    def run_chunk(self, *args, **kwargs):
        return self._forward("run_chunk", *args, **kwargs)

    # several sessions: what the batcher (runtime/batcher.py) calls
    def open_slot(self):
        return self._forward("open_slot")

    def close_slot(self, slot):
        return self._forward("close_slot", slot)

    def groups(self, slots):
        return self._forward("groups", slots)

    def run_group(self, slots, *args, **kwargs):
        return self._forward("run_group", slots, *args, **kwargs)

    def set_text(self, *args, **kwargs):
        return self._forward("set_text", *args, **kwargs)

    def stop(self) -> None:
        """The engine is closing: the other ranks drop their student (idempotent)."""
        with self._lock:
            if not self._stopped:
                self._stopped = True
                _send(_STOP)


def _rows(value):
    """Slots (runtime/static.py) as their rows, every tensor on the host: a call as it travels."""
    from ..runtime.static import Slot

    def leaf(v):
        if isinstance(v, Slot):
            return _Row(v.row)
        return v.to("cpu") if isinstance(v, torch.Tensor) else v

    return tree_map(leaf, value)


def _local(value, student, device: torch.device):
    """A received call's arguments on this rank: rows as this rank's slots, tensors on its device."""

    def leaf(v):
        if isinstance(v, _Row):
            return student.slot_at(v.row)
        return v.to(device) if isinstance(v, torch.Tensor) else v

    return tree_map(leaf, value)


def _send(name: str, *args, **kwargs) -> None:
    """Rank 0: the next call (its name and arguments, on the host), to every other rank."""
    dist.broadcast_object_list([(name, args, kwargs)], src=0, group=control_group())


def end_ranks() -> None:
    """Rank 0, when the command is done: the other ranks leave ``serve_students``."""
    if dist.is_initialized():
        _send(_EXIT)


def serve_students(rank: int, model_for: Callable) -> dict:
    """Ranks 1..N-1: build the student rank 0 opens (``model_for(config)`` gives the network for a RunConfig), run
    its calls until rank 0 ends; returns what this rank did: calls and seconds per call kind. Ctrl-C reaches every
    process of the terminal's group: these ranks leave it to rank 0, which ends them when its command is done."""
    from .engine import make_student, offload_text_weights

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    student, device = None, None
    calls: dict[str, int] = {}
    seconds: dict[str, float] = {}
    while True:
        message = [None]
        dist.broadcast_object_list(message, src=0, group=control_group())
        name, args, kwargs = message[0]
        if name == _EXIT:
            return {"rank": rank, "calls": calls, "seconds": {k: round(v, 4) for k, v in seconds.items()}}
        if name == "open":  # (config, stream)
            config = rank_config(args[0], rank)
            student, device = make_student(config, model_for(config), args[1]), torch.device(config.device)
            continue
        if name == _STOP:
            student = None
            continue
        began = time.perf_counter()
        getattr(student, name)(*_local(args, student, device), **_local(kwargs, student, device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if name == "warm_up":  # as rank 0's engine does
            offload_text_weights(config, student.model)
        calls[name] = calls.get(name, 0) + 1
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - began


def run_rank(rank: int, world: int, argv: list[str], module: str | None = None) -> int | dict:
    """The target of each rank of ``lipforcing run|serve|bench --gpus N`` (``spawn_ranks``, or torchrun): rank 0
    runs the command, the others serve its student, the network each needs coming from the command's
    ``rank_student(args, rank)`` (a parser default). ``module``: the command's own, imported first (a package above
    the engine, such as bench, registers its commands when imported)."""
    import importlib

    from .cli import build_parser, configure_logging, run_command

    if module:
        importlib.import_module(module)
    args = build_parser().parse_args(argv)
    args.argv = argv
    configure_logging(args.verbose)
    if rank == 0:
        # the command's own exit status, SIGTERM included (run: a valid MP4 of the frames so far, or none; serve:
        # its sessions told and closed, status 0); torch.distributed is initialised: its student is a RankedStudent
        try:
            return run_command(args)
        finally:
            end_ranks()
    return serve_students(rank, args.rank_student(args, rank))


def spawn_ranks(args, gpus: int, device: str) -> list:
    """Spawn ``gpus`` ranks of the parsed command ``args`` (``run_rank`` on its command line: gloo processes on a
    CPU, NCCL with one CUDA device each); their return values by rank (rank 0's: the command's exit status)."""
    from ..errors import ConfigError
    from ..runtime.ranks import launch_ranks

    cuda = device.startswith("cuda")
    if cuda and torch.cuda.device_count() < gpus:
        raise ConfigError(f"--gpus {gpus}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return launch_ranks(run_rank, gpus, (args.argv, args.run.__module__), backend="nccl" if cuda else "gloo",
                        timeout_s=600)


def rank_config(cfg, rank: int):
    """The rank's own device: cuda:<rank> on CUDA (one GPU each), the CPU otherwise."""
    from dataclasses import replace

    return replace(cfg, device=f"cuda:{rank}") if cfg.device.startswith("cuda") else cfg
