"""Start the ranks of one stream on this machine and collect what each returns; a rank that fails stops them all.

    results = launch_ranks(target, world=2, args=(spec,), backend="gloo")   # target(rank, world, *args)

Each rank is a spawned process with ``torch.distributed`` initialised (``backend``: gloo on CPUs, nccl on
GPUs, one GPU per rank; rendezvous on a free loopback port). The collectives time out after ``timeout_s``, so a
rank whose peer died does not wait forever: when any rank exits with an error, the others are given a few
seconds to notice (their next collective fails) and are then terminated, and ``launch_ranks`` raises a
``RankFailed`` that names the rank and its error. Under ``torchrun`` the same targets run as they are, one per
process (``init_from_env``).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..errors import LipforcingError


class RankFailed(LipforcingError):
    """A rank of a multi-rank run failed or vanished; the message names it and why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_from_env(backend: str, timeout_s: float = 60.0) -> tuple[int, int]:
    """Initialise the default group from torchrun's (or ``launch_ranks``'s) environment; (rank, world)."""
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def _rank_main(rank: int, world: int, port: int, backend: str, timeout_s: float, target: Callable, args: tuple,
               results: mp.Queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    try:
        if backend == "gloo":  # CPU ranks share the machine's cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        init_from_env(backend, timeout_s)
        value = target(rank, world, *args)
        results.put((rank, True, value))
    except BaseException as exc:  # reported to the parent, which names the rank
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        results.put((rank, False, f"{type(exc).__name__}: {first}"[:500] + _where(exc)))
        raise SystemExit(1) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    return f" (at {frames[-1].name}, {os.path.basename(frames[-1].filename)}:{frames[-1].lineno})" if frames else ""


def launch_ranks(target: Callable, world: int, args: tuple = (), *, backend: str = "gloo", timeout_s: float = 60.0,
                 grace_s: float = 10.0) -> list:
    """Run ``target(rank, world, *args)`` on ``world`` spawned ranks; returns their return values by rank.
    ``target`` must be importable (a module-level function). Raises ``RankFailed`` if any rank fails."""
    if world < 1:
        raise LipforcingError(f"the number of ranks must be at least 1, got {world}")
    ctx = mp.get_context("spawn")
    results: mp.Queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, backend, timeout_s, target, args, results),
                         daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    values: dict[int, object] = {}
    reported: dict[int, str] = {}  # rank -> its error

    def take(item) -> None:
        rank, ok, value = item
        (values if ok else reported)[rank] = value

    deadline = float("inf")  # once a rank failed or vanished: how long the others get to notice and stop
    try:
        while len(values) + len(reported) < world:
            try:
                take(results.get(timeout=0.2))
            except queue.Empty:
                if all(p.exitcode is not None for p in procs) or time.monotonic() > deadline:
                    break
            if deadline == float("inf") and (reported or any(p.exitcode not in (None, 0) for p in procs)):
                deadline = time.monotonic() + grace_s
        with contextlib.suppress(queue.Empty):  # what the last ranks put just before they exited
            while True:
                take(results.get(timeout=0.5))
    finally:
        for p in procs:
            p.join(timeout=0 if deadline < float("inf") else grace_s)
            if p.is_alive():
                p.terminate()  # SIGTERM: a rank that handles it (run's rank 0) finishes or removes its output
                p.join(timeout=15)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    # A rank gone without a word (killed, crashed, os._exit) is the cause; the others' errors follow from it.
    silent = [r for r, p in enumerate(procs) if r not in values and r not in reported and p.exitcode not in (None, 0)]
    if silent or reported:
        causes = [f"rank {r} of {world} exited with status {procs[r].exitcode}" for r in silent]
        causes += [f"rank {r} of {world} failed: {why}" for r, why in sorted(reported.items())]
        raise RankFailed("; then ".join(causes) + "; the other ranks were stopped")
    if len(values) < world:
        raise RankFailed(f"ranks {sorted(set(range(world)) - set(values))} of {world} returned nothing")
    return [values[r] for r in range(world)]
