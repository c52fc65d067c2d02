"""One client's live session on the server: a ``LipSync`` on an avatar, run by a worker thread and fed from the
event loop.

    live = LiveSession(engine, avatar, loop=asyncio.get_running_loop(), lookahead=0.32)
    live.push_audio(pcm16)            # from the event loop: returns at once
    live.end()                        # no more speech
    async for item in live.outputs(): # ("frames", [(index, jpeg), ...], (first_index, pcm16)), then ("done", n)
        ...
    live.close()                      # stop now (a disconnect): the session's memory is freed

The worker thread owns the session: it pushes the speech, calls ``keep_alive`` every tick (a stall of the
speech longer than ``idle_slack`` becomes silence, so the avatar keeps playing with a closed mouth), encodes
finished frames as JPEG and hands them, with the speech that goes with them, to the event loop. Nothing
the worker does blocks the loop.

Every queue is bounded, so a client controls no memory beyond a fixed amount. Speech: at most
``MAX_SPEECH_AHEAD_S`` seconds of speech past the frames handed out may wait; ``wait_room`` (awaited by the
connection after each piece) holds the connection's reader until the session catches up, which stops reading
the client's socket: a client that sends faster than the session runs is slowed down to its pace, not
buffered. Output: at most ``MAX_OUTPUTS_WAITING`` chunks of frames wait for the connection; past that the
worker waits, the speech backlog fills, and the connection decides when a client that does not read is
dropped (app.py).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator

import numpy as np

from ...media.length import OUTPUT_FPS
from .protocol import to_pcm16

TICK_S = 0.04
MAX_SPEECH_AHEAD_S = 10.0
"""Speech a client may send past the frames handed out (above the 5 s look-ahead a session may ask for)."""
MAX_OUTPUTS_WAITING = 4
"""Chunks of finished frames that may wait for the connection to take them."""


class LiveSession:
    """A session on an avatar, driven by speech pushed from the event loop (see the module docstring)."""

    def __init__(self, engine, avatar, *, loop: asyncio.AbstractEventLoop, lookahead: float,
                 sample_rate: int = 16000, idle_slack: float = 0.5, jpeg_quality: int | None = 85) -> None:
        """jpeg_quality None: frames are handed over as np.uint8 [H, W, 3] RGB (WebRTC encodes them itself)."""
        self.session = engine.session(avatar=avatar, lookahead=lookahead)
        self.loop, self.sample_rate, self.idle_slack = loop, sample_rate, idle_slack
        self.jpeg_quality = jpeg_quality
        self.width, self.height = avatar.config["frame_hw"][1], avatar.config["frame_hw"][0]
        self._commands: queue.Queue = queue.Queue()
        self._closing = threading.Event()
        self._outputs: asyncio.Queue = asyncio.Queue()
        self._waiting = threading.Semaphore(MAX_OUTPUTS_WAITING)  # one per chunk of frames not yet taken
        self._sent = 0  # frames handed to the loop
        self._pushed_s = 0.0  # seconds of speech pushed (event loop)
        self._room = asyncio.Event()  # set by the worker whenever it hands frames over or stops
        self._finished = False  # the worker handed over its last item
        self._thread = threading.Thread(target=self._work, name="lipforcing-live", daemon=True)
        self._thread.start()

    # --- from the event loop -----------------------------------------------------------------------------

    def push_audio(self, pcm: np.ndarray) -> None:
        """pcm: int16 [S] mono at ``sample_rate``. Await ``wait_room`` before pushing more."""
        self._pushed_s += pcm.size / self.sample_rate
        self._commands.put(("audio", pcm))

    def speech_ahead_s(self) -> float:
        """Seconds of speech pushed past the frames handed out."""
        return self._pushed_s - self._sent / OUTPUT_FPS

    def has_room(self) -> bool:
        return self.speech_ahead_s() <= MAX_SPEECH_AHEAD_S or self._closing.is_set() or self._finished

    async def wait_room(self) -> None:
        """Until the speech waiting is within ``MAX_SPEECH_AHEAD_S`` (or the session stopped)."""
        while True:
            self._room.clear()  # (the worker sets it through the loop: no wake-up is lost between the two lines)
            if self.has_room():
                return
            await self._room.wait()

    def end(self) -> None:
        self._commands.put(("end", None))

    def close(self) -> None:
        """Stop now; the session is aborted and its engine slot freed (idempotent). It takes effect before any
        speech still queued, within one chunk's work."""
        self._closing.set()
        self._room.set()
        self._commands.put(("close", None))

    async def outputs(self) -> AsyncIterator[tuple]:
        while True:
            item = await self._outputs.get()
            if item[0] == "frames":
                self._waiting.release()
            yield item
            if item[0] in ("done", "error", "closed"):
                return

    # --- the worker thread -------------------------------------------------------------------------------

    def _emit(self, item: tuple) -> None:
        if item[0] == "frames":  # wait for the connection to take the chunks before
            while not self._waiting.acquire(timeout=TICK_S):
                if self._closing.is_set():
                    return
        else:
            self._finished = True
        try:
            self.loop.call_soon_threadsafe(self._outputs.put_nowait, item)
            self.loop.call_soon_threadsafe(self._room.set)
        except RuntimeError:  # the connection's event loop has closed: nobody is left to take the item
            pass

    def _next_command(self) -> tuple[str, object]:
        """The next command, with every piece of speech queued behind it joined into one (a session that runs
        slower than real time then catches up in one push instead of one chunk per piece)."""
        try:
            kind, value = self._commands.get(timeout=TICK_S)
        except queue.Empty:
            return "tick", None
        if kind != "audio":
            return kind, value
        pieces = [value]
        while True:
            try:
                after = self._commands.get_nowait()
            except queue.Empty:
                break
            if after[0] != "audio":
                self._commands.queue.appendleft(after)  # handled next, after this speech
                break
            pieces.append(after[1])
        return "audio", np.concatenate(pieces) if len(pieces) > 1 else value

    def _work(self) -> None:
        session = self.session
        try:
            ended = False
            while True:
                kind, value = self._next_command()
                if kind == "close" or self._closing.is_set():
                    session.abort()
                    self._emit(("closed", self._sent))
                    return
                if kind == "audio" and not ended:
                    self._send(session.push_audio(value.astype(np.float32) / 32768.0, self.sample_rate))
                elif kind == "end" and not ended:
                    ended = True
                    self._send(session.end_audio())
                    while not self._closing.is_set() and session.frames_out < (session.frames_needed or 0):
                        self._send(session.pop(timeout=TICK_S))
                    if self._closing.is_set():
                        continue
                    self._send(session.close())
                    self._emit(("done", self._sent))
                    return
                elif not ended:
                    self._send(session.keep_alive(slack=self.idle_slack))
        except BaseException as exc:  # the connection reports it to its client
            session.abort()
            self._emit(("error", exc))

    def _send(self, frames: list[np.ndarray]) -> None:
        """Encode finished frames and hand them, with their speech, to the event loop."""
        if not frames:
            return
        import cv2

        first = self._sent
        encoded = []
        for i, frame in enumerate(frames):
            if self.jpeg_quality is None:
                encoded.append((first + i, frame))
                continue
            _, jpeg = cv2.imencode(".jpg", np.ascontiguousarray(frame[..., ::-1]),
                                   [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
            encoded.append((first + i, jpeg.tobytes()))
        speech = to_pcm16(self.session.speech_for_frames(first, len(frames)))
        self._emit(("frames", encoded, (first, speech)))
        self._sent += len(frames)
