"""Video and audio in and out (PyAV only).

    info = probe("talk.mov")                     # size, fps, duration, codecs, rotation
    with VideoReader("talk.mov") as reader:      # any container/codec/frame rate -> 25 fps RGB
        for frame in reader:                     # np.uint8 [H, W, 3], streamed
            ...
    audio = load_audio("speech.m4a")             # np.float32 [S], 16 kHz mono
    length = clip_length_from_samples(audio.size, 16000)    # (length.py) N frames, L latent frames, chunks
    frames = read_frames("talk.mov", length.frames)          # exactly N: truncated or ping-ponged
    with VideoWriter("out.mp4", info.width, info.height, audio=audio) as writer:
        for frame in frames:
            writer.write(frame)                  # H.264 yuv420p 25 fps + AAC, atomic rename on close

Frame-rate conversion is by timestamps: output frame i (time i / 25 s from the container start)
is the source frame on screen at that time, i.e. the last frame whose presentation time is <= i / 25
(the first frame stands in for times before it). Variable-frame-rate sources are handled the same way.
The stream ends when i / 25 reaches the end of the last source frame (its time plus its duration).

Rotation: a display matrix (phone videos) is applied, so frames come out as they are shown; mirror
flips in the matrix are ignored. Audio and video share the container's time origin; a start offset of
the audio track relative to the video is not compensated.

Odd frame sizes: H.264 in yuv420p needs even width and height, so `VideoWriter` drops the last column
and/or row of an odd-sized frame (the output is at most one pixel smaller than the source; no pixel is
invented or rescaled).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import warnings
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from ..errors import MediaError
from .length import AUDIO_RATE, OUTPUT_FPS, ping_pong_indices

_T = TypeVar("_T")


def _av() -> Any:
    try:
        import av
    except ImportError as err:  # pragma: no cover - depends on the install
        raise MediaError("reading and writing media needs PyAV: pip install av") from err
    return av


# ---------------------------------------------------------------------------------------------------
# Probing and opening


@dataclass(frozen=True)
class MediaInfo:
    """What `probe` finds in a media file. Sizes are as displayed (rotation applied)."""

    path: Path
    has_video: bool
    width: int
    height: int
    fps: float
    """Average frame rate of the video stream (0 if unknown or no video)."""
    duration_s: float
    """Container duration (0 if unknown)."""
    video_codec: str | None
    rotation: int
    """Counter-clockwise display rotation in degrees applied to decoded frames (0, 90, 180, 270)."""
    has_audio: bool
    audio_codec: str | None
    audio_rate: int
    audio_channels: int


def _open(path: str | os.PathLike[str]) -> Any:
    """Open a container for reading, turning every failure into a MediaError that names the file."""
    av = _av()
    p = Path(path)
    if not p.exists():
        raise MediaError(f"{p}: file does not exist")
    if p.is_dir():
        raise MediaError(f"{p}: is a directory, expected a media file")
    if p.stat().st_size == 0:
        raise MediaError(f"{p}: file is empty (0 bytes)")
    try:
        return av.open(str(p), mode="r")
    except av.FFmpegError as err:
        raise MediaError(f"{p}: cannot read as audio/video (not a media file, or corrupt): {err}") from err


def _frame_rotation(frame: Any) -> int:
    try:
        angle = int(round(frame.rotation))
    except (AttributeError, TypeError, ValueError):
        return 0
    return (int(round(angle / 90)) * 90) % 360


def probe(path: str | os.PathLike[str]) -> MediaInfo:
    """Describe a media file: video size/fps/codec/rotation, duration, audio presence and format.

    Decodes at most one video frame (to read the rotation). Raises MediaError for a missing,
    unreadable or corrupt file.
    """
    container = _open(path)
    try:
        duration = container.duration / 1_000_000 if container.duration else 0.0
        width = height = rotation = 0
        fps = 0.0
        video_codec = None
        if container.streams.video:
            v = container.streams.video[0]
            if v.codec_context is not None:  # None: the codec has no decoder in this build
                width, height = v.codec_context.width, v.codec_context.height
                video_codec = v.codec_context.name
            rate = v.average_rate or v.guessed_rate or v.base_rate
            fps = float(rate) if rate else 0.0
            with contextlib.suppress(Exception):  # an undecodable stream still gets described
                frame = next(container.decode(v))
                rotation = _frame_rotation(frame)
                width, height = frame.width, frame.height
            if rotation in (90, 270):
                width, height = height, width
        audio_codec, audio_rate, audio_channels = None, 0, 0
        if container.streams.audio:
            a = container.streams.audio[0]
            if a.codec_context is not None:
                audio_codec = a.codec_context.name
                audio_rate, audio_channels = a.codec_context.sample_rate, a.codec_context.channels
        return MediaInfo(
            path=Path(path), has_video=bool(container.streams.video), width=width, height=height,
            fps=fps, duration_s=duration, video_codec=video_codec, rotation=rotation,
            has_audio=bool(container.streams.audio), audio_codec=audio_codec, audio_rate=audio_rate,
            audio_channels=audio_channels,
        )
    finally:
        container.close()


# ---------------------------------------------------------------------------------------------------
# Reading video


def resample_by_time(
    timed: Iterable[tuple[Fraction, Fraction, _T]], fps: Fraction | int = OUTPUT_FPS
) -> Iterator[_T]:
    """Resample a timed sequence to a constant rate: output i is the item on screen at time i / fps.

    timed: (presentation time, duration, item) in display order, times in seconds from the origin.
    An item is on screen from its time until the next item's time (the last until time + duration).
    Items never shown are skipped; items spanning several output ticks are repeated.
    """
    fps = Fraction(fps)
    i = 0
    prev: _T | None = None
    prev_end = Fraction(0)
    for t, duration, item in timed:
        if prev is not None:
            while Fraction(i) / fps < t:
                yield prev
                i += 1
        prev, prev_end = item, t + duration
    if prev is not None:
        while Fraction(i) / fps < prev_end:
            yield prev
            i += 1


class VideoReader:
    """Streams a video file as 25 fps (or `fps`) RGB frames: np.uint8 [H, W, 3], display orientation.

    Holds one decoded source frame at a time; iterates once. `max_frames` stops early (truncation to
    N frames). Use as a context manager or call `close()`.
    """

    def __init__(
        self, path: str | os.PathLike[str], fps: int | Fraction = OUTPUT_FPS, *, max_frames: int | None = None
    ) -> None:
        self.path = Path(path)
        self.fps = Fraction(fps)
        self.max_frames = max_frames
        self._container = _open(self.path)
        if not self._container.streams.video:
            self._container.close()
            raise MediaError(f"{self.path}: has no video stream (is it an audio-only file?)")
        self._stream = self._container.streams.video[0]
        if self._stream.codec_context is None:
            self._container.close()
            raise MediaError(
                f"{self.path}: unsupported video codec (no decoder for it in this PyAV build); "
                "re-encode the video to H.264"
            )
        self._stream.thread_type = "AUTO"
        self._started = False
        start = self._container.start_time
        self._origin = Fraction(start, 1_000_000) if start is not None else Fraction(0)
        rate = self._stream.average_rate or self._stream.guessed_rate or self._stream.base_rate
        self._default_duration = 1 / Fraction(rate) if rate else 1 / self.fps

    @property
    def source_fps(self) -> float:
        rate = self._stream.average_rate or self._stream.guessed_rate
        return float(rate) if rate else 0.0

    def _timed_frames(self) -> Iterator[tuple[Fraction, Fraction, Any]]:
        av = _av()
        time_base = self._stream.time_base
        last_time = None
        try:
            for frame in self._container.decode(self._stream):
                if frame.pts is None or time_base is None:
                    t = (last_time + self._default_duration) if last_time is not None else Fraction(0)
                else:
                    t = Fraction(frame.pts) * time_base - self._origin
                duration = (
                    Fraction(frame.duration) * time_base
                    if frame.duration and time_base is not None
                    else self._default_duration
                )
                last_time = t
                yield t, duration, frame
        except av.FFmpegError as err:
            raise MediaError(f"{self.path}: video stream is corrupt or cannot be decoded: {err}") from err

    def __iter__(self) -> Iterator[np.ndarray]:
        if self._started:
            raise RuntimeError("a VideoReader streams once; open a new one to read the video again")
        self._started = True
        if self.max_frames == 0:
            return
        count = 0
        last_frame, last_array = None, None
        for frame in resample_by_time(self._timed_frames(), self.fps):
            if frame is last_frame:
                yield last_array.copy()
            else:
                last_frame, last_array = frame, _frame_to_rgb(frame)
                yield last_array
            count += 1
            if count == self.max_frames:
                return
        if count == 0:
            raise MediaError(f"{self.path}: video stream has no decodable frames")

    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _frame_to_rgb(frame: Any) -> np.ndarray:
    """Decoded av.VideoFrame -> np.uint8 [H, W, 3] RGB, rotated for display."""
    image = frame.to_ndarray(format="rgb24")
    rotation = _frame_rotation(frame)
    if rotation:
        image = np.ascontiguousarray(np.rot90(image, k=rotation // 90))
    return image


def read_frames(path: str | os.PathLike[str], n_out: int, fps: int = OUTPUT_FPS) -> Iterator[np.ndarray]:
    """Exactly n_out frames of a video at `fps`: truncated if longer, ping-ponged if shorter (SPEC §6).

    Streams the first pass. Only when the source runs out is it decoded again, into memory, to play
    it backwards and forwards (memory then holds the short source, fewer than n_out frames).
    """
    count = 0
    with VideoReader(path, fps, max_frames=n_out) as reader:
        for frame in reader:
            count += 1
            yield frame
    if count >= n_out:
        return
    with VideoReader(path, fps) as reader:
        kept = list(reader)
    for index in ping_pong_indices(len(kept), n_out)[count:]:
        yield kept[index].copy()  # the same source frame recurs; callers may edit frames in place


# ---------------------------------------------------------------------------------------------------
# Reading audio


def load_audio(path: str | os.PathLike[str], sr: int | None = AUDIO_RATE, *, mono: bool = True) -> np.ndarray:
    """Decode the first audio track of any file (wav/mp3/m4a/flac or a video) and resample it.

    Returns np.float32 [S] when mono (the mean of the channels), else [C, S]; sr=None keeps
    the file's rate. Raises MediaError for a missing/corrupt file, no audio track or empty audio.
    """
    av = _av()
    container = _open(path)
    try:
        if not container.streams.audio:
            raise MediaError(f"{path}: has no audio track")
        stream = container.streams.audio[0]
        if stream.codec_context is None:
            raise MediaError(f"{path}: unsupported audio codec (no decoder in this PyAV build)")
        # Keep the source layout and average the channels afterwards: libswresample's stereo -> mono
        # downmix sums with 1/sqrt(2) gains (can exceed 1.0), the mean is the usual convention.
        resampler = av.AudioResampler(format="fltp", layout=None, rate=sr or stream.codec_context.sample_rate)
        chunks: list[np.ndarray] = []
        try:
            for frame in container.decode(stream):
                frame.pts = None  # let the resampler count samples; source timestamps may jump
                chunks.extend(f.to_ndarray() for f in resampler.resample(frame))
            chunks.extend(f.to_ndarray() for f in resampler.resample(None))
        except av.FFmpegError as err:
            raise MediaError(f"{path}: audio track is corrupt or cannot be decoded: {err}") from err
    finally:
        container.close()
    if not chunks or sum(c.shape[-1] for c in chunks) == 0:
        raise MediaError(f"{path}: audio track is empty (zero length)")
    audio = np.concatenate(chunks, axis=-1).astype(np.float32, copy=False)
    return audio.mean(axis=0, dtype=np.float32) if mono else audio


# ---------------------------------------------------------------------------------------------------
# Writing video


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside ``path`` (same suffix) to write to; renamed onto ``path`` when the block succeeds,
    removed when it fails, so ``path`` is either complete or untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{secrets.token_hex(4)}.partial{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write JSON atomically; a failure to write is a MediaError naming the file."""
    import json

    try:
        with atomic_output(path) as tmp:
            tmp.write_text(json.dumps(data, indent=2))
    except OSError as exc:
        raise MediaError(f"{path}: cannot write ({exc})") from None


def _remove_file(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


class VideoWriter:
    """H.264 (yuv420p) MP4 at 25 fps with optional AAC audio, written atomically.

    frames: np.uint8 [H, W, 3] RGB (or anything `np.asarray` turns into that), written as produced.
    audio: np.float32 [S] mono or [C, S] at `audio_rate` (more than 2 channels are averaged to mono);
    it is trimmed to the video duration (frames written / fps) and interleaved with the video as
    frames arrive.

    The file is written to a hidden temporary file in the destination directory and renamed onto
    `path` by `close()`. `abort()`, or any exception (KeyboardInterrupt included) inside a `with`
    block, finalizes the frames written so far into a valid, shorter MP4 (when `keep_partial` and at
    least one frame was written) or removes the temporary file. The destination never holds a
    half-written file.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        width: int,
        height: int,
        *,
        fps: int = OUTPUT_FPS,
        audio: np.ndarray | None = None,
        audio_rate: int = AUDIO_RATE,
        crf: int = 18,
        preset: str = "veryfast",
        keep_partial: bool = True,
    ) -> None:
        av = _av()
        self.path = Path(path)
        self.fps = fps
        self.keep_partial = keep_partial
        self.source_size = (height, width)
        self.size = (height - height % 2, width - width % 2)  # yuv420p needs even dimensions
        if min(self.size) < 2:
            raise MediaError(f"{self.path}: cannot write a {width}x{height} video")
        if not self.path.parent.is_dir():
            raise MediaError(f"{self.path}: output directory {self.path.parent} does not exist")
        self.frames_written = 0
        self._closed = False
        # Not mkstemp: its 0600 mode would survive the rename; a random name created by the muxer
        # gets the usual umask-derived mode.
        self._tmp = self.path.parent / f".{self.path.stem}.{secrets.token_hex(6)}.partial.mp4"
        # A writer dropped without close()/abort() (no `with`) must not leave its hidden file behind.
        self._remove_tmp = weakref.finalize(self, _remove_file, self._tmp)
        try:
            self._container = av.open(str(self._tmp), mode="w", format="mp4")
            codec = "libx264" if "libx264" in av.codecs_available else "h264"
            self._video = self._container.add_stream(codec, rate=fps)
            self._video.width, self._video.height = self.size[1], self.size[0]
            self._video.pix_fmt = "yuv420p"
            if codec == "libx264":
                self._video.options = {"crf": str(crf), "preset": preset}
            self._audio_data, self._audio_stream, self._audio_sent = None, None, 0
            if audio is not None:
                self._init_audio(np.asarray(audio, dtype=np.float32), audio_rate)
        except BaseException:
            self._discard()
            raise

    def _init_audio(self, audio: np.ndarray, rate: int) -> None:
        if audio.ndim == 1:
            audio = audio[None]
        if audio.ndim != 2 or audio.shape[1] == 0:
            raise MediaError(f"audio for {self.path} must be [S] or [C, S] with S > 0, got shape {audio.shape}")
        if audio.shape[0] > 2:  # surround: written as the mono mean
            audio = audio.mean(axis=0, keepdims=True)
        self._audio_data = np.ascontiguousarray(audio)
        self._audio_layout = "mono" if audio.shape[0] == 1 else "stereo"
        self._audio_stream = self._container.add_stream("aac", rate=rate, layout=self._audio_layout)
        self._audio_rate = rate

    def write(self, frame: Any) -> None:
        """Append one frame: uint8 [H, W, 3] RGB at the size given to the constructor."""
        av = _av()
        if self._closed:
            raise MediaError(f"{self.path}: write() after close()")
        image = np.asarray(frame)
        if image.shape != (*self.source_size, 3) or image.dtype != np.uint8:
            raise ValueError(f"expected uint8 {(*self.source_size, 3)}, got {image.dtype} {image.shape}")
        image = np.ascontiguousarray(image[: self.size[0], : self.size[1]])
        video_frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        video_frame.pts = self.frames_written
        video_frame.time_base = Fraction(1, self.fps)
        self._container.mux(self._video.encode(video_frame))
        self.frames_written += 1
        self._send_audio(self.frames_written)

    def _send_audio(self, n_frames: int, flush: bool = False) -> None:
        """Encode audio up to the end of video frame n_frames (trimmed to the video duration)."""
        av = _av()
        if self._audio_stream is None:
            return
        stop = min(self._audio_data.shape[1], round(n_frames * self._audio_rate / self.fps))
        if stop > self._audio_sent:
            chunk = np.ascontiguousarray(self._audio_data[:, self._audio_sent : stop])
            audio_frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=self._audio_layout)
            audio_frame.sample_rate = self._audio_rate
            audio_frame.pts = self._audio_sent
            audio_frame.time_base = Fraction(1, self._audio_rate)
            self._container.mux(self._audio_stream.encode(audio_frame))
            self._audio_sent = stop
        if flush:
            self._container.mux(self._audio_stream.encode(None))

    def _finalize(self) -> Path:
        """Flush the encoders, close the container and rename the temporary file onto `path`."""
        self._closed = True
        try:
            self._container.mux(self._video.encode(None))
            self._send_audio(self.frames_written, flush=True)
            self._container.close()
        except BaseException:
            self._discard()
            raise
        os.replace(self._tmp, self.path)
        self._remove_tmp.detach()
        return self.path

    def _discard(self) -> None:
        self._closed = True
        with contextlib.suppress(Exception):
            self._container.close()
        self._remove_tmp()

    def close(self) -> Path:
        """Finish the file and move it into place. Raises MediaError when no frame was written."""
        if self._closed:
            return self.path
        if self.frames_written == 0:
            self._discard()
            raise MediaError(f"{self.path}: no frames were written; no video produced")
        return self._finalize()

    def abort(self) -> Path | None:
        """Stop early: keep the frames written so far as a valid MP4 (returns its path) or remove it."""
        if self._closed:
            return None
        if self.keep_partial and self.frames_written > 0:
            try:
                return self._finalize()
            except Exception as err:  # never mask the error that caused the abort
                warnings.warn(f"could not finalize partial video {self.path}: {err}", stacklevel=2)
                return None
        self._discard()
        return None

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class BackgroundWriter:
    """A ``VideoWriter`` fed through a bounded queue and written by a worker thread, so the caller (the
    session's consumer) never waits for the H.264 encoder.

        with VideoWriter(path, w, h, audio=audio) as writer:
            background = BackgroundWriter(writer)
            background.write(frame)          # returns at once unless the queue is full
            background.close()               # waits for every frame to be written

    An error in the worker is raised by the next ``write`` / ``close``; ``abort`` drops the queued frames
    (the frames written so far stay, and the ``VideoWriter`` decides what becomes of them).
    """

    _END = object()

    def __init__(self, writer: VideoWriter, max_queued: int = 48) -> None:
        import queue
        import threading

        self.writer = writer
        self._queue: queue.Queue = queue.Queue(maxsize=max_queued)
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="lipforcing-writer", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        import queue

        try:
            while not self._stop.is_set():
                try:
                    frame = self._queue.get(timeout=0.05)
                except queue.Empty:
                    continue
                if frame is self._END:
                    return
                self.writer.write(frame)
        except BaseException as exc:  # raised again in the caller's thread
            self._error = exc

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def write(self, frame: np.ndarray) -> None:
        import queue

        while True:
            self._check()
            if not self._thread.is_alive():
                raise MediaError(f"{self.writer.path}: the writer has stopped")
            try:
                self._queue.put(frame, timeout=0.05)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Write every queued frame (the ``VideoWriter`` itself is closed by its owner)."""
        self.write(self._END)
        self._thread.join()
        self._check()

    def abort(self) -> None:
        """Stop without writing the queued frames."""
        self._stop.set()
        self._thread.join()
