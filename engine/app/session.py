"""The session users embed: frames + speech in, lip-synced frames out, as they are made.

    engine = build_engine(RunConfig(model="14b"), Weights(...))
    with engine.session(speech_16k) as session:      # the whole speech up front (files): features once
        for frame in source:                          # np.uint8 [H, W, 3] RGB frames, any size
            for out in session.push(frame):           # finished frames, in order, as soon as they are done
                show(out)
        for out in session.close():                   # flush: the rest, then the session ends
            show(out)

    session = engine.session(lookahead=0.32)          # live speech (a microphone, a TTS stream)
    session.push_audio(samples, rate)                 # as it is spoken; end_audio() when it stops
    session = engine.session(speech, avatar=avatar)   # a prepared avatar: no frames to push, speech only

Per chunk (9 source frames for a clip's first chunk, then 12): locate the face in each frame (SPEC §8),
warp the frames to the aligned crops (512x512) on the device, zero the mouth for the masked stream, encode both
streams as one batch, run the student's two denoising calls and its commit call, decode, blend the
generated mouth with the aligned original using the soft mask and paste the face back into the frame.
A prepared avatar brings its crops, transforms and latents: only the student, the decoder and paste-back
run.

The fast path (``pipeline="streams"``) runs three worker threads joined by bounded queues: face location
(host), device work (the chunk pipeline's encode | student | decode on device streams, which only
enqueues work on a GPU) and paste-back + copy to the host. So alignment, paste-back and whatever the
caller does with the frames (muxing) stay off the device's critical path, and a chunk's frames are
handed out as soon as its decode has finished. ``pipeline="sequential"`` runs the same stages one after
another in the caller's thread (the reference path); both give the same frames.

Speech. With the whole speech up front the audio features come from one wav2vec2 pass over the clip (the
released model's global attention). Live (``lookahead`` given, or no speech at session start) each chunk's
features come from a window of the speech: ``context`` seconds before the chunk and ``lookahead`` seconds
after it, so a chunk runs once its frames and its look-ahead have arrived (see ``media/live_audio.py``).
The output length follows SPEC §6 in both modes (in live mode it is known once ``end_audio`` is called).
On an avatar, ``keep_alive`` fills a stall of the speech with silence in real time, so the avatar keeps
playing with a closed mouth instead of freezing.

Frames without a face cost no model time: a run of frames in which no face is found at all is passed
through unchanged and the student is not called. When a face appears again the model restarts there as
a new clip (its first chunk of 9 frames gives the reference latent; the audio features are taken from
that frame on), so a title card or a cut-away never feeds a made-up face to the model.

Latency: a chunk's frames come out once its last source frame (and, live, its audio look-ahead) has
arrived, 9 frames (0.36 s of video) for the first chunk, then 12 (0.48 s), plus the processing time of one
chunk. Push at least ``frames_needed`` frames (more are ignored); ``close`` completes a last partial chunk by
repeating its final frame and cuts its output to the frames actually pushed.
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
from ..media.face import FaceTransform, faces_to_tensor, fill_gaps, frames_and_crops, group_by_size, upload_frames
from ..media.length import AUDIO_RATE, clip_length_from_samples
from ..media.live_audio import DEFAULT_CONTEXT_S, SpeechBuffer, WindowedFeatures
from ..media.paste_back import paste_back
from ..runtime.pipeline import ChunkOutput
from ..runtime.timing import StageTimer

FIRST_CHUNK_FRAMES = 9  # pixel frames of a clip's first chunk (1 + 4 * 2)
CHUNK_FRAMES = 12  # pixel frames of every later chunk (4 * 3)
DEFAULT_LOOKAHEAD_S = 0.32
"""Seconds of speech a live chunk waits for beyond its last frame (see the README for the figures)."""
_END = object()  # end of input (close)
_POLL_S = 0.05


class _Stopped(Exception):
    """The session was stopped (an error in a worker, or abort) while a stage waited."""


@dataclass
class _Piece:
    """Consecutive source frames handled together: one model chunk, or a run passed through unchanged."""

    start: int
    """Absolute index of the first frame."""
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
    avatar_chunk: int | None = None
    """The chunk's index on a prepared avatar (its crops and latents come from the avatar)."""
    device: dict = field(default_factory=dict)
    """Device tensors of the chunk between the stages (frames, crops, the pipeline's output)."""

    @property
    def stop(self) -> int:
        """One past the last frame the chunk covers (padding included): its audio must reach this far."""
        return self.start + len(self.frames)


class LipSync:
    """A streaming lip-sync session over one clip."""

    def __init__(
        self,
        engine,
        speech: np.ndarray | None = None,
        *,
        sample_rate: int = AUDIO_RATE,
        timing: bool = False,
        lookahead: float | None = None,
        context: float = DEFAULT_CONTEXT_S,
        avatar=None,
    ) -> None:
        """speech: float [S] mono at ``sample_rate`` (the whole clip), or None (live: ``push_audio``).
        lookahead / context: seconds of speech after / before a chunk for its features (live mode)."""
        self.engine = engine
        self.timer = StageTimer(enabled=timing)
        self.avatar = avatar
        if avatar is not None:
            avatar.check_engine(engine)
        engine.warm_up()
        self.parts = engine.acquire_parts()  # codec states, pipeline, streams and aligner of this session
        try:
            self._init_speech(speech, sample_rate, lookahead, context)
        except BaseException:
            engine.release_parts(self.parts)
            raise
        self.parts.aligner.reset()
        self._pending: list[tuple[np.ndarray, FaceTransform | None]] = []
        self._accepted = 0  # source frames taken into the session
        self._align_s = 0.0  # face location time of the pending frames
        self._running = False  # the model is inside a clip (the next chunk is 12 frames)
        self._avatar_chunks = 0  # chunks of the avatar handed to the device stage
        self._ready: deque[_Piece] = deque()  # sequential path: chunks waiting for their audio
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
        self._threads: list[threading.Thread] = []
        if engine.config.pipeline == "streams":
            self._start_workers()

    def _init_speech(self, speech, sample_rate: int, lookahead: float | None, context: float) -> None:
        engine = self.engine
        self.live = speech is None or lookahead is not None
        self._speech = SpeechBuffer()
        self._speech_lock = threading.Condition()
        self._clock: float | None = None
        self._features: torch.Tensor | None = None
        self.length = None
        if speech is not None:
            self._speech.push(speech, sample_rate)
            self._speech.end()
            self.length = clip_length_from_samples(self._speech.samples)
        if self.live:
            self._window = WindowedFeatures(engine.networks.audio, lookahead_s=DEFAULT_LOOKAHEAD_S
                                            if lookahead is None else lookahead, context_s=context)
        else:
            with self.timer.stage("audio features"):
                features = engine.networks.audio(self._speech.window(0, self._speech.samples), self.length.frames)
            self._check_audio_dim(features)
            self._features = features.to(engine.device)  # [N, audio_dim]

    # --- public API -----------------------------------------------------------------------------------

    @property
    def frames_needed(self) -> int | None:
        """Output length N (SPEC §6): push at least this many source frames (extra ones are ignored). Live:
        None until ``end_audio``."""
        return None if self.length is None else self.length.frames

    def push(self, frames: np.ndarray | list[np.ndarray]) -> list[np.ndarray]:
        """Accept source frames (np.uint8 [H, W, 3] each, or [T, H, W, 3]); return the frames finished so far."""
        self._check_open()
        if self.avatar is not None:
            raise ConfigError("a session on a prepared avatar takes no frames: push speech (push_audio)")
        batch = list(frames) if not isinstance(frames, np.ndarray) or frames.ndim == 4 else [frames]
        for frame in batch:
            frame = _check_frame(frame)
            if self._threads:
                self._put(self._inbox[0], frame)
            else:
                self._run_inline(frame)
        return self.pop()

    def push_audio(self, samples: np.ndarray, rate: int = AUDIO_RATE) -> list[np.ndarray]:
        """Live speech as it arrives (float [S] mono or [C, S], any rate); returns the frames finished so far."""
        self._check_open()
        if not self.live or self._speech.ended:
            raise ConfigError("this session's speech is complete (given up front or ended with end_audio)")
        with self._speech_lock:
            self._speech.push(samples, rate)
            if self._clock is None:
                self._clock = time.monotonic() - self._speech.samples / AUDIO_RATE
            self._speech_lock.notify_all()
        self._after_audio()
        return self.pop()

    def end_audio(self) -> list[np.ndarray]:
        """No more speech: the output length becomes known (SPEC §6) and the last chunks can run."""
        self._check_open()
        if self.live and not self._speech.ended:
            with self._speech_lock:
                self._speech.end()
                self.length = clip_length_from_samples(max(self._speech.samples, FIRST_CHUNK_FRAMES * 640))
                self._speech_lock.notify_all()
            self._after_audio()
        return self.pop()

    def keep_alive(self, now: float | None = None, slack: float = 0.0) -> list[np.ndarray]:
        """Live speech on an avatar: if the speech has fallen more than ``slack`` seconds behind the wall clock
        (nothing is being said), fill the gap with silence so the avatar keeps playing with a closed mouth.
        Call it regularly; the clock starts at the first call or the first speech."""
        if not self.live or self._speech.ended:
            return self.pop()
        now = time.monotonic() if now is None else now
        if self._clock is None:
            self._clock = now
        missing = int((now - slack - self._clock) * AUDIO_RATE) - self._speech.samples
        if missing > 0:
            with self._speech_lock:
                self._speech.silence(missing)  # at 16 kHz, whatever rate the speaker's audio comes at
                self._speech_lock.notify_all()
            self._after_audio()
        return self.pop()

    def speech_for_frames(self, first: int, count: int) -> np.ndarray:
        """The 16 kHz speech that goes with output frames [first, first + count): float32 [640 count] (silence
        where there is none; what the session pushed to fill a stall is silence too)."""
        with self._speech_lock:
            return self._speech.window(first * 640, (first + count) * 640)

    def pop(self, timeout: float = 0.0) -> list[np.ndarray]:
        """Finished frames, in order; waits up to ``timeout`` seconds for at least one (0: never waits). On an
        avatar run sequentially, each call first runs the next chunk the speech allows."""
        if self.avatar is not None and not self._threads and not self._closed:
            self._avatar_step()
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
            if self.live and not self._speech.ended:
                self.end_audio()
            if self._threads:
                if self.avatar is None:
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
        with self._speech_lock:
            self._speech_lock.notify_all()
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
            "audio": "live" if self.live else "whole clip",
            "avatar": self.avatar is not None,
            "stage_seconds": {k: round(v, 4) for k, v in self.timer.seconds.items()},
            "path": self.engine.path,
        }

    # --- sources: pushed frames or a prepared avatar ---------------------------------------------------

    def _locate(self, item) -> list[_Piece]:
        """Host stage: find each frame's face; cut the frames into chunks (or pass-through runs)."""
        if item is _END:
            return [self._cut(pad=True)] if self._pending else []
        if self.length is not None and self._accepted >= self.length.frames:
            return []  # beyond the clip's length (SPEC §6): ignored
        began = time.perf_counter()
        where = self.parts.aligner.locate(item)
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
            return _Piece(start=start, frames=frames, transforms=transforms, real=real, model=False)
        size = self._chunk_size()
        if pad and real < size:  # complete a last partial chunk by repeating its final frame
            frames += [frames[-1]] * (size - real)
            transforms += [transforms[-1]] * (size - real)
        clip_start = None if self._running else start
        self._running = True
        return _Piece(start=start, frames=frames, transforms=transforms, real=real, model=True, clip_start=clip_start)

    def _avatar_piece(self, b: int) -> _Piece:
        """Chunk b of the avatar's played sequence: frames, transforms and crops come from the avatar."""
        avatar = self.avatar
        start = 0 if b == 0 else FIRST_CHUNK_FRAMES + CHUNK_FRAMES * (b - 1)
        size = FIRST_CHUNK_FRAMES if b == 0 else CHUNK_FRAMES
        played = range(start, start + size)
        frames = [avatar.frame(i) for i in played]
        transforms = [FaceTransform(matrix=avatar.matrices[s], inverse=avatar.inverses[s], reused=False, anchors=None)
                      for s in (avatar.source(i) for i in played)]
        self.faces_found += size
        return _Piece(start=start, frames=frames, transforms=transforms, real=size, model=True,
                      clip_start=0 if b == 0 else None, avatar_chunk=b)

    def _next_avatar_piece(self) -> _Piece | None | bool:
        """The avatar's next chunk if the speech allows it now; True when the speech is complete and every
        chunk was handed out; None while waiting for speech."""
        b = self._avatar_chunks
        start = 0 if b == 0 else FIRST_CHUNK_FRAMES + CHUNK_FRAMES * (b - 1)
        if self.length is not None and start >= self.length.frames:
            return True
        stop = start + (FIRST_CHUNK_FRAMES if b == 0 else CHUNK_FRAMES)
        if self.live and not self._audio_ready(stop):
            return None
        self._avatar_chunks += 1
        return self._avatar_piece(b)

    def _avatar_step(self, every: bool = False) -> None:
        """Sequential path on an avatar: run the next chunk the speech allows (``every``: all of them)."""
        while True:
            piece = self._next_avatar_piece()
            if not isinstance(piece, _Piece):
                return
            self._ready.append(piece)
            self._drain()
            if not every:
                return

    def _feeder(self) -> None:
        """Worker (threads) on an avatar: hands the avatar's chunks to the device stage as the speech allows."""
        try:
            while True:
                piece = self._next_avatar_piece()
                if piece is True:
                    self._put(self._inbox[1], _END)
                    return
                if piece is None:
                    with self._speech_lock:
                        if self._stop.is_set():
                            return
                        self._speech_lock.wait(_POLL_S)
                    continue
                self._put(self._inbox[1], piece)
        except _Stopped:
            return
        except BaseException as exc:
            self._fail(exc)

    # --- audio ------------------------------------------------------------------------------------------

    def _check_audio_dim(self, features: torch.Tensor) -> None:
        audio_dim = self.engine.networks.student.cfg.audio_dim
        if features.shape[-1] != audio_dim:
            raise ConfigError(f"audio features have {features.shape[-1]} channels; the model expects {audio_dim}")

    def _audio_ready(self, stop: int) -> bool:
        if not self.live:
            return True
        with self._speech_lock:
            return self._window.ready(self._speech, stop)

    def _wait_audio(self, stop: int) -> None:
        """Device stage (threads): wait until the speech reaches frame ``stop`` plus the look-ahead."""
        with self._speech_lock:
            while not self._window.ready(self._speech, stop):
                if self._stop.is_set():
                    raise _Stopped
                self._speech_lock.wait(_POLL_S)

    def _after_audio(self) -> None:
        if self.avatar is None and not self._threads:
            self._drain()

    def _audio_from(self, start: int) -> torch.Tensor:
        """Whole-clip features [1, V, C] of a clip the model starts at frame ``start``: as many latent frames as
        whole chunks can cover to the end of the speech (the last rows repeat where a chunk runs past it)."""
        left = self.length.frames - start
        chunks = 1 + math.ceil(max(0, left - FIRST_CHUNK_FRAMES) / CHUNK_FRAMES)
        rows = torch.arange(start, start + chunks * CHUNK_FRAMES - 3, device=self._features.device)
        return self._features[rows.clamp_max(self.length.frames - 1)][None]

    def _live_codes(self, piece: _Piece) -> torch.Tensor:
        """The chunk's audio codes [1, 3, hidden] from a window of the live speech."""
        with self._speech_lock:  # copy the window, then let more speech arrive during the wav2vec2 pass
            audio, w0 = self._window.speech_for(self._speech, piece.start, piece.stop)
            keep_from, _ = self._window.window(self._speech, piece.stop, piece.stop)
            keep_from = min(keep_from, piece.start - 2 * CHUNK_FRAMES)  # frames still on their way out too
            self._speech.drop_before(max(0, keep_from) * 640)  # what later chunks no longer reach
        with self.timer.stage("audio features"):
            features = self._window.features_of(audio, w0, piece.start, piece.stop)
        self._check_audio_dim(features)
        model = self.engine.networks.student
        emb = features[None].to(self.engine.device, model.dtype)
        return model.audio_proj(emb, clip_start=piece.clip_start is not None)

    # --- stages ----------------------------------------------------------------------------------------

    def _device(self, piece) -> list:
        """Device stage: upload, warp to crops and submit the chunk to the pipeline (only enqueues on a GPU)."""
        if piece is _END or not piece.model:
            return [piece]
        if self.live:
            if self._threads:
                self._wait_audio(piece.stop)
            if self.length is not None:  # the speech ended: cut what lies beyond the clip's length
                piece.real = min(piece.real, self.length.frames - piece.start)
                if piece.real <= 0:
                    return []
        engine = self.engine
        parts = self.parts
        with torch.no_grad(), parts.streams.on("encode"):
            codes = self._live_codes(piece) if self.live else None
            if piece.clip_start is not None:
                audio = None if self.live else self._audio_from(piece.clip_start)
                parts.pipeline.start_clip(engine.networks.text_context, audio, engine.mask_latent)
            latents = None
            if piece.avatar_chunk is not None:
                b, avatar = piece.avatar_chunk, self.avatar
                frames = upload_frames(piece.frames, engine.device)
                crops = faces_to_tensor([avatar.crop(i) for i in range(piece.start, piece.stop)], engine.device)
                latents = avatar.latents(3 * b, 3 * b + 3).to(engine.device, non_blocking=True)
            else:
                matrices = [t.matrix for t in fill_gaps(piece.transforms)]  # a frame without a face borrows one
                frames, crops = frames_and_crops(piece.frames, matrices, engine.device, engine.face_size)
            piece.device["frames"], piece.device["crops"] = frames, crops
            piece.device["output"] = parts.pipeline.submit(None if latents is not None else crops * 2 - 1,
                                                            self.timer, codes=codes, latents=latents)
        return [piece]

    def _finish(self, piece) -> list:
        """Host stage: paste the generated faces back (on the device) and hand the frames over."""
        if piece is _END:
            return []
        if not piece.model:
            self.frames_passed_through += piece.real
            return [piece.frames[: piece.real]]
        engine, streams = self.engine, self.parts.streams
        output: ChunkOutput = piece.device["output"]
        out = list(piece.frames[: piece.real])
        with streams.on("finish"):
            streams.wait("finish", output.done)
            for tensor in (output.frames, piece.device["crops"], *piece.device["frames"]):
                streams.keep(tensor, "finish")
            with self.timer.stage("paste-back", streams.stream("finish")):
                generated, aligned, frames = output.frames, piece.device["crops"], piece.device["frames"]
                faces = [i for i in range(piece.real) if piece.transforms[i] is not None]
                for idx in group_by_size([piece.frames[i] for i in faces]).values():
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
        if item is _END:
            if self.avatar is None:
                self._ready.extend(self._locate(_END))
            else:
                self._avatar_step(every=True)
            self._drain(final=True)
            return
        self._ready.extend(self._locate(item))
        self._drain()

    def _drain(self, final: bool = False) -> None:
        """Sequential path: run every waiting chunk whose audio is in (``final``: all of them, the speech ended)."""
        while self._ready and (final or not self._ready[0].model or self._audio_ready(self._ready[0].stop)):
            for submitted in self._device(self._ready.popleft()):
                for frames in self._finish(submitted):
                    self._deliver(frames)

    def _start_workers(self) -> None:
        self._inbox = [queue.Queue(maxsize=2 * CHUNK_FRAMES), queue.Queue(maxsize=2), queue.Queue(maxsize=2)]
        stages = [("align", self._locate), ("device", self._device), ("finish", self._finish)]
        for i, (name, fn) in enumerate(stages):
            outbox = self._inbox[i + 1] if i + 1 < len(stages) else None
            target, args = self._worker, (self._inbox[i], fn, outbox)
            if i == 0 and self.avatar is not None:  # an avatar's chunks come from the speech, not from frames
                target, args, name = self._feeder, (), "avatar"
            thread = threading.Thread(target=target, args=args, name=f"lipforcing-{name}", daemon=True)
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
        except BaseException as exc:
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        """A worker's error: handed to the caller's thread by the next push / pop / close."""
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

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigError("the session is closed: start a new session")

    def _join(self) -> None:
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=30)
        self._threads = []

    def _end(self) -> None:
        if not self._closed:
            self._closed = True
            self.engine.release_parts(self.parts)


def _check_frame(frame) -> np.ndarray:
    image = np.asarray(frame)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or min(image.shape[:2]) < 2:
        raise ConfigError(f"a frame must be np.uint8 [H, W, 3] RGB, got {image.dtype} {tuple(image.shape)}")
    return image


