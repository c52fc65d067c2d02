"""Several sessions on one set of weights: their chunks meet in one thread that runs the student for them,
batching the sessions whose chunks have the same window shape.

    batcher = StudentBatcher(StaticStudent(model, stream, slots=4), device)
    student = batcher.session()          # a SessionStudent: the scheduler API for one session (its own row)
    student.start_clip(text, audio_emb, ref_latent, mask_latent)
    x0 = student.run_chunk(masked, ref_seq, codes=codes)   # blocks until the batch that holds it has run
    student.close()

Each session keeps its own cache rows, noise generator and clip; only the weights (and the batcher's thread)
are shared. A chunk request waits ``gather_s`` for other sessions' requests, then everything pending runs:
``StaticStudent.groups`` splits it into batches of consecutive rows with one window shape (every session in
the steady state is one batch). On CUDA the batcher computes on its own stream: a request carries an event
recorded on the session's stream after its inputs, and the session's stream waits for the batch's event
before it reads x0, so no host synchronisation is added. Sessions join and leave between chunks.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field

import torch

from .static import Slot, StaticStudent


@dataclass(eq=False)
class _Request:
    slot: Slot
    kind: str  # "start", "chunk" or "close"
    args: tuple = ()
    ready: torch.cuda.Event | None = None  # inputs written (on the session's stream)
    done: threading.Event = field(default_factory=threading.Event)
    result: torch.Tensor | None = None
    finished: torch.cuda.Event | None = None  # the batch's work on the batcher's stream
    error: BaseException | None = None


class StudentBatcher:
    """One thread runs the student for every session (see the module docstring)."""

    def __init__(self, student: StaticStudent, *, gather_s: float = 0.002) -> None:
        self.student, self.gather_s = student, gather_s
        self.device = student.device
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._pending: list[_Request] = []
        self._cond = threading.Condition()
        self._closed = False
        self.batches: list[int] = []  # sessions per batched call, for reports and tests
        self._thread = threading.Thread(target=self._loop, name="lipforcing-student", daemon=True)
        self._thread.start()

    def session(self) -> SessionStudent:
        """A new session's view of the scheduler (its own row)."""
        return SessionStudent(self, self._call(_Request(slot=None, kind="open")))

    def _call(self, request: _Request):
        if self.cuda and request.kind in ("start", "chunk"):
            request.ready = torch.cuda.Event()
            request.ready.record(torch.cuda.current_stream(self.device))
            for t in request.args:  # made on the session's stream, read on the batcher's
                if isinstance(t, torch.Tensor) and t.is_cuda:
                    t.record_stream(self.stream)
        with self._cond:
            if self._closed:
                raise RuntimeError("the student batcher is shut down")
            self._pending.append(request)
            self._cond.notify_all()
        request.done.wait()
        if request.error is not None:
            raise request.error
        if request.finished is not None:  # the caller's stream reads the result after the batch ran
            caller = torch.cuda.current_stream(self.device)
            caller.wait_event(request.finished)
            if isinstance(request.result, torch.Tensor):
                request.result.record_stream(caller)
        return request.result

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed and not self._pending:
                    return
            if self.gather_s:  # give the other sessions' requests of this round the whole moment to arrive
                deadline = time.monotonic() + self.gather_s
                with self._cond:  # (each arrival notifies: one wait() would end at the second request)
                    while not self._closed and (left := deadline - time.monotonic()) > 0:
                        self._cond.wait(left)
            with self._cond:
                batch, self._pending = self._pending, []
            self._run(batch)

    def _run(self, requests: list[_Request]) -> None:
        context = torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext()
        with context, torch.no_grad():
            for request in requests:
                if request.ready is not None:
                    self.stream.wait_event(request.ready)
            chunks = [r for r in requests if r.kind == "chunk"]
            for request in requests:
                if request.kind != "chunk":
                    self._single(request)
            by_slot = {id(r.slot): r for r in chunks}
            for group in self.student.groups([r.slot for r in chunks]):
                members = [by_slot[id(slot)] for slot in group]
                self._chunks(members)

    def _single(self, request: _Request) -> None:
        try:
            if request.kind == "open":
                request.result = self.student.open_slot()
            elif request.kind == "start":
                self.student.start_clip(*request.args, slot=request.slot)
            elif request.kind == "close":
                self.student.close_slot(request.slot)
            self._finish([request])
        except BaseException as exc:  # handed to the session that asked
            request.error = exc
            request.done.set()

    def _chunks(self, requests: list[_Request]) -> None:
        try:
            masked = torch.cat([r.args[0] for r in requests])
            ref_seq = torch.cat([r.args[1] for r in requests])
            codes = [r.args[2] for r in requests]
            codes = None if codes[0] is None else torch.cat(codes)
            x0 = self.student.run_group([r.slot for r in requests], masked, ref_seq, codes)
            for i, request in enumerate(requests):
                request.result = x0[i : i + 1].clone()
            self.batches.append(len(requests))
            self._finish(requests)
        except BaseException as exc:
            for request in requests:
                request.error = exc
                request.done.set()

    def _finish(self, requests: list[_Request]) -> None:
        finished = None
        if self.cuda:
            finished = torch.cuda.Event()
            finished.record(self.stream)
        for request in requests:
            request.finished = finished
            request.done.set()

    def shutdown(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=30)


class SessionStudent:
    """One session's scheduler API, served by the batcher (what ``ChunkPipeline`` drives)."""

    def __init__(self, batcher: StudentBatcher, slot: Slot) -> None:
        self.batcher, self.slot = batcher, slot
        self.device = batcher.device
        self.model = batcher.student.model
        self.backend = batcher.student.backend
        self.cuda_graphs = batcher.student.cuda_graphs

    def start_clip(self, text_context, audio_emb, ref_latent, mask_latent) -> None:
        self.batcher._call(_Request(slot=self.slot, kind="start",
                                    args=(text_context, audio_emb, ref_latent, mask_latent)))

    def run_chunk(self, masked_video, ref_sequence, codes=None) -> torch.Tensor:
        """[1, 16, 3, h, w] x0 of this session's next chunk (a tensor of its own)."""
        return self.batcher._call(_Request(slot=self.slot, kind="chunk", args=(masked_video, ref_sequence, codes)))

    def warm_up(self, text_context=None) -> float:
        return 0.0

    def close(self) -> None:
        self.batcher._call(_Request(slot=self.slot, kind="close"))
