"""The session users embed: frames + speech in, lip-synced frames out, as they are made.

    engine = build_engine(RunConfig(model="14b"), Weights(...))
    with engine.session(speech_16k) as session:      # LipSync; audio features of the whole clip here
        for frame in source:                          # np.uint8 [H, W, 3] RGB frames, any size
            for out in session.push(frame):           # finished frames, in order, as soon as they are done
                show(out)
        for out in session.close():                   # flush: the rest, then the session ends
            show(out)

Per chunk (9 source frames for a clip's first chunk, then 12): locate the face in each frame (SPEC §8),
warp the frames to 512x512 crops on the device, zero the mouth for the masked stream, encode both
streams as one batch, run the student's two denoising calls and its commit call, decode, blend the
generated mouth with the aligned original using the soft mask and paste the face back into the frame.

The fast path (``pipeline="streams"``) runs three worker threads joined by bounded queues: face location
(host), device work (the chunk pipeline's encode | student | decode on device streams, which only
enqueues work on a GPU) and paste-back + copy to the host. So alignment, paste-back and whatever the
caller does with the frames (muxing) stay off the device's critical path, and a chunk's frames are
handed out as soon as its decode has finished. ``pipeline="sequential"`` runs the same stages one after
another in the caller's thread (the reference path); both give the same frames.

Frames without a face cost no model time: a run of frames in which no face is found at all is passed
through unchanged and the student is not called. When a face appears again the model restarts there as
a new clip (its first chunk of 9 frames gives the reference latent; the audio features are taken from
that frame on), so a title card or a cut-away never feeds a made-up face to the model.

Latency: a chunk's frames come out once its last source frame has arrived, 9 frames (0.36 s of video)
for the first chunk, then 12 (0.48 s), plus the processing time of one chunk. Audio features need the
whole clip: wav2vec2's attention is global in the released model, so the speech must be known when the
session starts. Push at least ``frames_needed`` frames (more are ignored); ``close`` completes a last
partial chunk by repeating its final frame and cuts its output to the frames actually pushed.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import ConfigError, LipforcingError
from ..media.face import FACE_SIZE, FaceTransform, warp_affine_torch
from ..media.length import clip_length_from_samples
from ..media.paste_back import faces_to_tensor, paste_back
from ..runtime.pipeline import ChunkOutput
from ..runtime.timing import StageTimer

FIRST_CHUNK_FRAMES = 9  # pixel frames of a clip's first chunk (1 + 4 * 2)
CHUNK_FRAMES = 12  # pixel frames of every later chunk (4 * 3)
_END = object()  # end of input (close)
_POLL_S = 0.05


class _Stopped(Exception):
    """The session was stopped (an error in a worker, or abort) while a stage waited."""


@dataclass
class _Piece:
    """Consecutive source frames handled together: one model chunk, or a run passed through unchanged."""

    frames: list[np.ndarray]
    """Source frames, np.uint8 [H, W, 3]; a padded last chunk repeats its final frame."""
    transforms: list[FaceTransform | None]
    """Where each frame's face is (None: no face, the frame is passed through)."""
    real: int
    """Frames actually pushed (the output is cut to these)."""
    model: bool
    """False: no face in any frame, the frames are passed through and no model runs."""
    clip_start: int | None = None
    """Absolute frame index where the model (re)starts a clip with this chunk, else None."""
    device: dict = field(default_factory=dict)
    """Device tensors of the chunk between the stages (frames, crops, the pipeline's output)."""


class LipSync:
    """A streaming lip-sync session over one clip (the speech is known up front)."""

    def __init__(self, engine, speech: np.ndarray, *, sample_rate: int = 16000, timing: bool = False) -> None:
        """speech: float32 [S] mono at ``sample_rate`` (16 kHz: the rate wav2vec2 was trained at)."""
        if sample_rate != 16000:
            raise ConfigError(f"speech must be 16 kHz mono (got {sample_rate} Hz); resample it first")
        if engine.busy:
            raise ConfigError("this engine already runs a session; close it first (one session per engine)")
        self.engine = engine
        self.length = clip_length_from_samples(int(np.asarray(speech).shape[-1]), sample_rate)
        self.timer = StageTimer(enabled=timing)
        engine.warm_up()
        engine.aligner.reset()
        with self.timer.stage("audio features"):
            features = engine.networks.audio(speech, self.length.frames)  # [N, audio_dim]
        audio_dim = engine.student.model.cfg.audio_dim
        if features.shape[-1] != audio_dim:
            raise ConfigError(f"audio features have {features.shape[-1]} channels; the model expects {audio_dim}")
        self._features = features.to(engine.device)
        self._pending: list[tuple[np.ndarray, FaceTransform | None]] = []
        self._accepted = 0  # source frames taken into the session (at most frames_needed)
        self._align_s = 0.0  # face location time of the pending frames
        self._running = False  # the model is inside a clip (the next chunk is 12 frames)
        self._out: deque[np.ndarray] = deque()
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._finished = threading.Event()
        self._closed = False
        self.faces_found = 0
        self.frames_out = 0
        self.chunks_run = 0
        self.frames_passed_through = 0
        self.chunk_done: list[float] = []  # perf_counter when each chunk's frames were handed out
        engine.busy = True
        self._threads: list[threading.Thread] = []
        if engine.config.pipeline == "streams":
            self._start_workers()

    # --- public API -----------------------------------------------------------------------------------

    @property
    def frames_needed(self) -> int:
        """Output length N (SPEC §6): push at least this many source frames (extra ones are ignored)."""
        return self.length.frames

    def push(self, frames: np.ndarray | list[np.ndarray]) -> list[np.ndarray]:
        """Accept source frames (np.uint8 [H, W, 3] each, or [T, H, W, 3]); return the frames finished so far."""
        if self._closed:
            raise ConfigError("push() after close(): start a new session")
        batch = list(frames) if not isinstance(frames, np.ndarray) or frames.ndim == 4 else [frames]
        for frame in batch:
            frame = _check_frame(frame)
            if self._threads:
                self._put(self._inbox[0], frame)
            else:
                self._run_inline(frame)
        return self.pop()

    def pop(self, timeout: float = 0.0) -> list[np.ndarray]:
        """Finished frames, in order; waits up to ``timeout`` seconds for at least one (0: never waits)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._out and self._error is None and not self._finished.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, _POLL_S))
            out = list(self._out)
            self._out.clear()
        self._raise_error()
        return out

    def close(self) -> list[np.ndarray]:
        """Flush: finish every pushed frame and end the session; returns the remaining frames."""
        if self._closed:
            return self.pop()
        try:
            if self._threads:
                self._put(self._inbox[0], _END)
                while not self._finished.wait(_POLL_S):
                    self._raise_error()
                self._join()
            else:
                self._run_inline(_END)
            self._raise_error()
        except BaseException:
            self.abort()
            raise
        self._end()
        self.timer.collect(wait=True)
        return self.pop()

    def abort(self) -> None:
        """Stop at once: workers end, queued work is dropped (frames already handed out stay valid)."""
        self._stop.set()
        self._join()
        self._end()

    def __enter__(self) -> LipSync:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def summary(self) -> dict:
        """Counts, stage seconds (when timed) and exactly which path ran."""
        self.timer.collect(wait=self._closed)
        return {
            "frames": self.frames_out,
            "chunks": self.chunks_run,
            "frames_passed_through": self.frames_passed_through,
            "faces_found": self.faces_found,
            "stage_seconds": {k: round(v, 4) for k, v in self.timer.seconds.items()},
            "path": self.engine.path,
        }

    # --- stages ----------------------------------------------------------------------------------------

    def _locate(self, item) -> list[_Piece]:
        """Host stage: find each frame's face; cut the frames into chunks (or pass-through runs)."""
        if item is _END:
            return [self._cut(pad=True)] if self._pending else []
        if self._accepted >= self.length.frames:
            return []  # beyond the clip's length (SPEC §6): ignored
        began = time.perf_counter()
        where = self.engine.aligner.locate(item)
        self._align_s += time.perf_counter() - began
        self.faces_found += where is not None and not where.reused
        self._pending.append((item, where))
        self._accepted += 1
        if len(self._pending) == self._chunk_size():
            return [self._cut(pad=False)]
        return []

    def _chunk_size(self) -> int:
        return CHUNK_FRAMES if self._running else FIRST_CHUNK_FRAMES

    def _cut(self, *, pad: bool) -> _Piece:
        self.timer.add("face alignment", self._align_s)  # one sample per chunk, like the other stages
        self._align_s = 0.0
        frames = [f for f, _ in self._pending]
        transforms = [t for _, t in self._pending]
        real = len(frames)
        self._pending = []
        start = self._accepted - real
        if not any(t is not None for t in transforms):
            self._running = False
            return _Piece(frames=frames, transforms=transforms, real=real, model=False)
        size = self._chunk_size()
        if pad and real < size:  # complete a last partial chunk by repeating its final frame
            frames += [frames[-1]] * (size - real)
            transforms += [transforms[-1]] * (size - real)
        clip_start = None if self._running else start
        self._running = True
        return _Piece(frames=frames, transforms=transforms, real=real, model=True, clip_start=clip_start)

    def _audio_from(self, start: int) -> torch.Tensor:
        """Audio features [1, V, C] of a clip the model starts at frame ``start``: as many latent frames as
        whole chunks can cover to the end of the speech (the last rows repeat where a chunk runs past it)."""
        left = self.length.frames - start
        chunks = 1 + math.ceil(max(0, left - FIRST_CHUNK_FRAMES) / CHUNK_FRAMES)
        rows = torch.arange(start, start + chunks * CHUNK_FRAMES - 3, device=self._features.device)
        return self._features[rows.clamp_max(self.length.frames - 1)][None]

    def _device(self, piece) -> list:
        """Device stage: upload, warp to crops and submit the chunk to the pipeline (only enqueues on a GPU)."""
        if piece is _END or not piece.model:
            return [piece]
        engine = self.engine
        with engine.streams.on("encode"):
            if piece.clip_start is not None:
                engine.pipeline.start_clip(engine.networks.text_context, self._audio_from(piece.clip_start),
                                           engine.mask_latent)
            frames, crops = self._crops(piece)
            piece.device["frames"], piece.device["crops"] = frames, crops
            piece.device["output"] = engine.pipeline.submit(crops * 2 - 1, self.timer)
        return [piece]

    def _crops(self, piece: _Piece) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Source frames on the device (one tensor per frame) and the aligned crops [T, 3, 512, 512] in [0, 1].
        A frame without a face borrows the nearest face's transform for its crop (its output is passed through)."""
        engine = self.engine
        donors = _fill_gaps(piece.transforms)
        if engine.device.type != "cuda":  # cv2's warp is the fast one on a CPU
            crops = [engine.aligner.warp_frame(f, t.matrix) for f, t in zip(piece.frames, donors)]
            frames = [torch.from_numpy(np.ascontiguousarray(f)) for f in piece.frames]
            return frames, faces_to_tensor(crops)
        frames = [torch.from_numpy(np.ascontiguousarray(f)).pin_memory().to(engine.device, non_blocking=True)
                  for f in piece.frames]
        crops = torch.empty(len(frames), 3, FACE_SIZE, FACE_SIZE, device=engine.device)
        for idx in _by_size(piece.frames).values():
            images = torch.stack([frames[i] for i in idx]).permute(0, 3, 1, 2).float()
            matrices = np.stack([donors[i].matrix for i in idx])
            crops[idx] = warp_affine_torch(images, matrices, (FACE_SIZE, FACE_SIZE)).round_().clamp_(0, 255)
        return frames, crops.div_(255.0)

    def _finish(self, piece) -> list:
        """Host stage: paste the generated faces back (on the device) and hand the frames over."""
        if piece is _END:
            return []
        if not piece.model:
            self.frames_passed_through += piece.real
            return [piece.frames[: piece.real]]
        engine, streams = self.engine, self.engine.streams
        output: ChunkOutput = piece.device["output"]
        out = list(piece.frames[: piece.real])
        with streams.on("finish"):
            streams.wait("finish", output.done)
            for tensor in (output.frames, piece.device["crops"], *piece.device["frames"]):
                streams.keep(tensor, "finish")
            with self.timer.stage("paste-back", streams.stream("finish")):
                generated, aligned, frames = output.frames, piece.device["crops"], piece.device["frames"]
                faces = [i for i in range(piece.real) if piece.transforms[i] is not None]
                for idx in _by_size([piece.frames[i] for i in faces]).values():
                    group = [faces[i] for i in idx]
                    inverse = np.stack([piece.transforms[i].inverse for i in group])
                    pasted = paste_back(torch.stack([frames[i] for i in group]), generated[group].float(),
                                        aligned[group], engine.soft_mask, inverse)
                    for i, image in zip(group, pasted.cpu().numpy()):
                        out[i] = image
        self.chunks_run += 1
        self.timer.collect()
        return [out]

    # --- plumbing ---------------------------------------------------------------------------------------

    def _deliver(self, frames: list[np.ndarray]) -> None:
        with self._cond:
            self._out.extend(frames)
            self.frames_out += len(frames)
            self.chunk_done.append(time.perf_counter())
            self._cond.notify_all()

    def _run_inline(self, item) -> None:
        for piece in self._locate(item):
            for submitted in self._device(piece):
                for frames in self._finish(submitted):
                    self._deliver(frames)

    def _start_workers(self) -> None:
        self._inbox = [queue.Queue(maxsize=2 * CHUNK_FRAMES), queue.Queue(maxsize=2), queue.Queue(maxsize=2)]
        stages = [("align", self._locate), ("device", self._device), ("finish", self._finish)]
        for i, (name, fn) in enumerate(stages):
            outbox = self._inbox[i + 1] if i + 1 < len(stages) else None
            thread = threading.Thread(target=self._worker, args=(self._inbox[i], fn, outbox),
                                      name=f"lipforcing-{name}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _worker(self, inbox: queue.Queue, fn, outbox: queue.Queue | None) -> None:
        try:
            while True:
                item = self._get(inbox)
                for result in fn(item):
                    if outbox is not None:
                        self._put(outbox, result)
                    elif result is not _END:
                        self._deliver(result)
                if item is _END:
                    if outbox is not None:
                        self._put(outbox, _END)
                    else:
                        self._finished.set()
                        with self._cond:
                            self._cond.notify_all()
                    return
        except _Stopped:
            return
        except BaseException as exc:  # handed to the caller's thread by the next push / pop / close
            with self._cond:
                if self._error is None:
                    self._error = exc
                self._cond.notify_all()
            self._stop.set()

    def _get(self, q: queue.Queue):
        while True:
            if self._stop.is_set():
                raise _Stopped
            try:
                return q.get(timeout=_POLL_S)
            except queue.Empty:
                continue

    def _put(self, q: queue.Queue, item) -> None:
        while True:
            self._raise_error()
            if self._stop.is_set():
                raise _Stopped
            try:
                q.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def _raise_error(self) -> None:
        if self._error is not None:
            error = self._error
            if isinstance(error, LipforcingError | KeyboardInterrupt):
                raise error
            raise RuntimeError(f"lipforcing session failed in a worker: {error!r}") from error

    def _join(self) -> None:
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=30)
        self._threads = []

    def _end(self) -> None:
        if not self._closed:
            self._closed = True
            self.engine.busy = False


def _check_frame(frame) -> np.ndarray:
    image = np.asarray(frame)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or min(image.shape[:2]) < 2:
        raise ConfigError(f"a frame must be np.uint8 [H, W, 3] RGB, got {image.dtype} {tuple(image.shape)}")
    return image


def _fill_gaps(transforms: list[FaceTransform | None]) -> list[FaceTransform]:
    """Each frame's transform, a frame without one taking the nearest later one (else the nearest earlier)."""
    out: list[FaceTransform | None] = list(transforms)
    nxt = None
    for i in range(len(out) - 1, -1, -1):
        nxt = out[i] if out[i] is not None else nxt
        out[i] = nxt
    prev = None
    for i, t in enumerate(out):
        prev = t if t is not None else prev
        out[i] = prev
    return out


def _by_size(frames: list[np.ndarray]) -> dict[tuple[int, ...], list[int]]:
    """Indices of the frames grouped by frame size (batched warps and paste-back need one size)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, f in enumerate(frames):
        groups.setdefault(tuple(f.shape), []).append(i)
    return groups
