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
import signal
import socket
import threading
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


_CONTROL: dict[str, dist.ProcessGroup | None] = {}


def init_from_env(backend: str, timeout_s: float = 60.0) -> tuple[int, int]:
    """Initialise the default group from torchrun's (or ``launch_ranks``'s) environment; (rank, world). With
    NCCL each rank's current CUDA device is its ``LOCAL_RANK`` (one GPU each), and a gloo group is made beside
    it for the host-side messages (``control_group``)."""
    if not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        _CONTROL.clear()
    control_group()
    return dist.get_rank(), dist.get_world_size()


def control_group() -> dist.ProcessGroup | None:
    """The group for host-side messages between the ranks (pickled objects: which call runs next): the default
    group when it is gloo, else a gloo group over the same ranks, so that a message never round-trips through a
    GPU. Every rank must call it first at the same point (``init_from_env`` does)."""
    if "group" not in _CONTROL:
        gloo = dist.get_backend() == "gloo"
        _CONTROL["group"] = None if gloo else dist.new_group(backend="gloo")
    return _CONTROL["group"]


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
    ``target`` must be importable (a module-level function). Raises ``RankFailed`` if any rank fails.

    Signals (when called from the main thread): SIGTERM to this process is passed on to rank 0, which runs the
    command and stops as it would alone (``run``: the frames so far; ``serve``: its sessions told and closed), then
    ends the other ranks; their values come back as usual. SIGINT is left to the ranks: Ctrl-C reaches every
    process of the terminal's group, rank 0 included."""
    if world < 1:
        raise LipforcingError(f"the number of ranks must be at least 1, got {world}")
    ctx = mp.get_context("spawn")
    results: mp.Queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, backend, timeout_s, target, args, results),
                         daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    previous = {}
    if threading.current_thread() is threading.main_thread():  # (after the start: the ranks keep Python's own)

        def pass_on(signum, frame) -> None:
            if procs[0].is_alive():
                procs[0].terminate()

        previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, pass_on),
                    signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN)}
    values: dict[int, object] = {}
    reported: dict[int, str] = {}  # rank -> its error

    def take(item) -> None:
        rank, ok, value = item
        (values if ok else reported)[rank] = value

    deadline = float("inf")  # once a rank failed or vanished: how long the others get to notice and stop
    interrupted = True  # until the ranks are done: an error in this process while it waits stops them
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
        interrupted = False
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if interrupted and procs[0].is_alive():
            # rank 0 runs the command: SIGTERM stops it as it stops the command (run: the frames so far; serve:
            # sessions told and closed), and it ends the other ranks; it gets the time a server's close takes
            procs[0].terminate()
            procs[0].join(timeout=grace_s + 20)
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
        causes += [f"rank {r} of {world} failed: {why}" for r, why in reported.items()]  # the first failure first
        raise RankFailed("; then ".join(causes) + "; the other ranks were stopped")
    if len(values) < world:
        raise RankFailed(f"ranks {sorted(set(range(world)) - set(values))} of {world} returned nothing")
    return [values[r] for r in range(world)]
