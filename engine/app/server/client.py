"""The reference client of ``lipforcing serve`` (``lipforcing client``): one session over the WebSocket protocol.

    result = run_client(ClientOptions(url="ws://127.0.0.1:8080", avatar="me.lfa", speech="hello.wav",
                                      output="out.mp4"))
    result.frames, result.chunk_latency_p50_s, result.fps

It uploads a prepared avatar (an .lfa file) or a video (which the server prepares), or names an avatar the
server holds (a bare name: no folder, no .lfa; a local path to anything but an .lfa file is refused, so a
mistyped ``--avatar`` never sends some other file); streams the speech as it would be spoken (20 ms pieces
on the wall clock), or as fast as the connection takes it (``fast``); and writes the frames it receives, with
the speech, to an MP4, atomically: the file appears complete or not at all. A refusal (wrong token, busy
server, bad avatar) raises ``ServerRefused`` and writes nothing.

Latency is measured per chunk of output frames: from the moment the client had sent the speech that chunk
needs (its frames plus the server's look-ahead) to the arrival of the chunk's last frame.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ...errors import LipforcingError
from ..session import DEFAULT_LOOKAHEAD_S
from . import protocol

PIECE_S = 0.02
UPLOAD_PIECE = 256 << 10
"""The largest upload piece, when the server's limit (its ``hello``) allows it."""


class ServerRefused(LipforcingError):
    """The server refused the connection or the session (its reason is the message)."""


@dataclass(frozen=True, kw_only=True)
class ClientOptions:
    url: str
    """ws://HOST:PORT (the session path /v1/session is added) or the full session URL."""
    speech: str | None = None
    """Speech file (run_client); stream_session takes the samples instead."""
    output: str | None = None
    """The MP4 to write; None: frames are checked and counted, not decoded (load tests)."""
    avatar: str | None = None
    """An .lfa file to upload, or the name of an avatar the server holds (see ``avatar_file``)."""
    video: str | None = None
    token: str | None = None
    fast: bool = False
    lookahead: float = DEFAULT_LOOKAHEAD_S
    timeout: float = 120.0
    """Seconds without any message from the server before the client gives up."""


@dataclass
class ClientResult:
    frames: int
    duration_s: float
    """Wall time from the first speech sent to the last frame received."""
    fps: float
    """Frames received per second of ``duration_s``: the session's sustained rate (frames arrive in bursts of
    one chunk, so a rate between first and last arrival would overstate it)."""
    first_frame_s: float
    """From the first speech sent to the first frame received."""
    chunk_latency_p50_s: float
    chunk_latency_p95_s: float
    session: str
    replica: int
    chunk_latency_s: list[float] = field(default_factory=list, repr=False)
    audio: np.ndarray | None = field(default=None, repr=False)
    """The speech the server sent with the frames (int16, 16 kHz)."""

    def summary(self) -> str:
        return (f"{self.frames} frames in {self.duration_s:.2f} s ({self.fps:.1f} FPS); first frame after "
                f"{self.first_frame_s:.2f} s; chunk latency p50 {self.chunk_latency_p50_s * 1000:.0f} ms, "
                f"p95 {self.chunk_latency_p95_s * 1000:.0f} ms")

    def to_json(self) -> dict:
        record = asdict(self)
        record.pop("audio")
        return record


def session_url(url: str) -> str:
    """ws://HOST:PORT/v1/session from ws://HOST:PORT, http://HOST:PORT or HOST:PORT."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url if "://" in url else f"ws://{url}")
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    path = parts.path if parts.path not in ("", "/") else "/v1/session"
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


def avatar_file(avatar: str) -> Path | None:
    """The prepared avatar file ``avatar`` names, to upload; None for a bare name (an avatar the server holds).
    A path (one with a folder, or with the .lfa suffix) must be an .lfa file whose header says it is an
    avatar; anything else is refused before the client connects."""
    from safetensors import SafetensorError, safe_open

    from ..avatar import AVATAR_FORMAT, SUFFIX

    path = Path(avatar)
    if path.suffix != SUFFIX and path.name == avatar and avatar not in (".", ".."):
        return None
    if path.suffix != SUFFIX:
        raise LipforcingError(f"--avatar {avatar}: a local avatar must be a prepared {SUFFIX} file (made by "
                              f"'lipforcing prepare-avatar'); a bare name is an avatar the server holds")
    if not path.is_file():
        raise LipforcingError(f"--avatar {avatar}: no such file")
    try:
        with safe_open(str(path), "np") as f:  # the header only
            format_name = (f.metadata() or {}).get("format")
    except (SafetensorError, OSError):
        format_name = None
    if format_name != AVATAR_FORMAT:
        raise LipforcingError(f"--avatar {avatar}: not a prepared avatar file ('lipforcing prepare-avatar' makes "
                              f"them); nothing was sent")
    return path


def run_client(options: ClientOptions) -> ClientResult:
    """Run one session to the end (see the module docstring); ``ServerRefused`` on a refusal."""
    from ...media.io import load_audio

    if options.speech is None:
        raise LipforcingError("give the speech to send (a file)")
    if options.output is not None:
        output = Path(options.output)
        if not output.parent.is_dir():
            raise LipforcingError(f"{output}: output directory {output.parent} does not exist")
    speech = protocol.to_pcm16(load_audio(options.speech))
    return asyncio.run(stream_session(options, speech))


async def stream_session(options: ClientOptions, speech: np.ndarray) -> ClientResult:
    """One session in the running event loop: ``speech`` int16 [S] at 16 kHz (many can run at once)."""
    if (options.avatar is None) == (options.video is None):
        raise LipforcingError("give an avatar (--avatar FILE or NAME) or a video (--video FILE), one of them")
    if options.video is not None:
        upload = ("video", Path(options.video))
    else:
        file = avatar_file(options.avatar)
        upload = ("avatar", file) if file is not None else None
    return await _Client(options, speech, upload).run()


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


class _Client:
    def __init__(self, options: ClientOptions, speech: np.ndarray, upload: tuple[str, Path] | None) -> None:
        self.options, self.speech = options, speech
        self.upload = upload  # ("avatar" | "video", the file to send); None: an avatar the server holds
        self.sent_at: list[tuple[int, float]] = []  # (samples sent so far, when)
        self.writer = None
        self.frames = 0
        self.arrivals: list[float] = []
        self.audio = np.zeros(0, np.int16)
        self.lookahead_samples = 0

    async def run(self) -> ClientResult:
        from websockets.asyncio.client import connect
        from websockets.exceptions import InvalidStatus

        o = self.options
        headers = {"Authorization": f"Bearer {o.token}"} if o.token else {}
        try:
            async with connect(session_url(o.url), additional_headers=headers, max_size=protocol.MAX_MESSAGE,
                               open_timeout=o.timeout) as ws:
                ready = await self._start(ws)
                try:
                    result = await self._stream(ws, ready)
                except BaseException:
                    if self.writer is not None:
                        self.writer.abort()
                    raise
                return result
        except InvalidStatus as exc:
            status = exc.response.status_code
            reason = "wrong or missing token" if status == 401 else f"HTTP {status}"
            raise ServerRefused(f"the server refused the connection: {reason}") from None
        except OSError as exc:
            raise ServerRefused(f"cannot reach {o.url}: {exc}") from None

    async def _start(self, ws) -> dict:
        o, upload = self.options, self.upload
        hello = await self._hello(ws)
        start = {"type": "start", "lookahead": o.lookahead, "sample_rate": 16000}
        if upload is None:
            start["avatar"] = o.avatar
        else:
            start.update(upload=upload[0], bytes=upload[1].stat().st_size)
        await ws.send(json.dumps(start))
        if upload is not None:
            piece_bytes = min(UPLOAD_PIECE, int(hello["max_message_bytes"]) - 1)  # (one byte of message type)
            if piece_bytes < 1:
                raise ServerRefused(f"the server takes messages of {hello['max_message_bytes']} bytes: too small "
                                    f"to upload anything")
            with open(upload[1], "rb") as f:
                while piece := f.read(piece_bytes):
                    await ws.send(protocol.encode_upload(piece))
        while True:  # the server may take a while to prepare an uploaded video
            message = await self._receive(ws, o.timeout + (600 if o.video else 0))
            if isinstance(message, str):
                reply = json.loads(message)
                if reply["type"] == "ready":
                    self.lookahead_samples = int(o.lookahead * 16000)
                    return reply
                if reply["type"] in ("error", "closing"):
                    raise ServerRefused(f"the server refused the session: {_reason(reply)}")

    async def _hello(self, ws) -> dict:
        """The server's first message: its limits."""
        message = await self._receive(ws, self.options.timeout)
        reply = json.loads(message) if isinstance(message, str) else {}
        if reply.get("type") != "hello" or not isinstance(reply.get("max_message_bytes"), int):
            raise ServerRefused("the server did not say hello: not a lipforcing server of this protocol version")
        return reply

    async def _receive(self, ws, timeout: float):
        from websockets.exceptions import ConnectionClosed

        try:
            return await asyncio.wait_for(ws.recv(), timeout)
        except asyncio.TimeoutError:
            raise LipforcingError(f"the server sent nothing for {timeout:g} s") from None
        except ConnectionClosed as exc:
            raise LipforcingError(f"the server closed the connection ({exc.rcvd or 'no reason given'}) "
                                  f"after {self.frames} frames") from None

    async def _stream(self, ws, ready: dict) -> ClientResult:
        from ...media.io import VideoWriter

        if self.options.output is not None:
            self.writer = VideoWriter(self.options.output, ready["width"], ready["height"],
                                      audio=self.speech.astype(np.float32) / 32768.0, keep_partial=False)
        self.began = time.monotonic()
        sender = asyncio.create_task(self._send_speech(ws))
        try:
            done = await self._receive_frames(ws)
        finally:
            if not sender.done():
                sender.cancel()
        if done != self.frames:
            raise LipforcingError(f"the server reported {done} frames but {self.frames} arrived")
        if self.writer is not None:
            await asyncio.to_thread(self.writer.close)
        return self._result(ready)

    async def _send_speech(self, ws) -> None:
        piece = int(PIECE_S * 16000) if not self.options.fast else 16000
        for start in range(0, self.speech.size, piece):
            chunk = self.speech[start : start + piece]
            if not self.options.fast:
                delay = self.began + start / 16000 - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            await ws.send(protocol.encode_audio_in(chunk))
            self.sent_at.append((start + chunk.size, time.monotonic()))
        await ws.send(json.dumps({"type": "end"}))

    async def _receive_frames(self, ws) -> int:
        pieces = []
        while True:
            message = await self._receive(ws, self.options.timeout)
            if isinstance(message, str):
                reply = json.loads(message)
                if reply["type"] == "done":
                    if pieces:
                        self.audio = np.concatenate(pieces)
                    return int(reply["frames"])
                if reply["type"] in ("error", "closing"):
                    raise LipforcingError(f"the session ended early after {self.frames} frames: {_reason(reply)}")
                continue
            decoded = protocol.decode_binary(message)
            if decoded.kind == protocol.AUDIO_OUT:
                if decoded.index * protocol.SAMPLES_PER_FRAME != sum(p.size for p in pieces):
                    raise LipforcingError(f"speech for frame {decoded.index} arrived out of order")
                pieces.append(decoded.payload)
            elif decoded.kind == protocol.FRAME:
                if decoded.index != self.frames:
                    raise LipforcingError(f"frame {decoded.index} arrived where frame {self.frames} was expected")
                self.arrivals.append(time.monotonic())  # before decoding and encoding it: latency is the server's
                if self.writer is not None:
                    self.writer.write(_decode_jpeg(decoded.payload))
                self.frames += 1

    def _speech_sent_by(self, samples: int) -> float | None:
        """When the client had sent ``samples`` samples of speech (None: it never did; the end covers it)."""
        for count, when in self.sent_at:
            if count >= samples:
                return when
        return self.sent_at[-1][1] if self.sent_at else None

    def _result(self, ready: dict) -> ClientResult:
        from ...media.length import chunk_frame_range

        latencies, chunk = [], 0
        while (frames := chunk_frame_range(chunk)).stop <= self.frames:
            needed = min(frames.stop * protocol.SAMPLES_PER_FRAME + self.lookahead_samples, self.speech.size)
            sent = self._speech_sent_by(needed)
            if sent is not None:
                latencies.append(max(0.0, self.arrivals[frames.stop - 1] - sent))
            chunk += 1
        duration = (self.arrivals[-1] - self.began) if self.arrivals else 0.0
        return ClientResult(
            frames=self.frames, duration_s=duration, fps=self.frames / duration if duration > 0 else 0.0,
            first_frame_s=(self.arrivals[0] - self.began) if self.arrivals else float("nan"),
            chunk_latency_p50_s=_percentile(latencies, 50), chunk_latency_p95_s=_percentile(latencies, 95),
            session=ready["session"], replica=int(ready.get("replica", 0)), chunk_latency_s=latencies,
            audio=self.audio,
        )


def _reason(reply: dict) -> str:
    if reply["type"] == "closing":
        return reply.get("reason", "closed")
    return f"{reply.get('message', '')} ({reply.get('code', 'error')})"


def _decode_jpeg(data: bytes) -> np.ndarray:
    import cv2

    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise LipforcingError("the server sent a frame that is not a JPEG image")
    return np.ascontiguousarray(image[..., ::-1])
