"""The Python side of the C ABI (``include/lipforcing.h``): the same ``LipSync`` session, driven from C.

The C library embeds CPython (or joins the interpreter of a Python host), imports this module and calls
``NativeSession``; it passes plain bytes and numbers only. Engines are shared: sessions created with the same
configuration reuse one loaded engine (its weights), so creating and destroying sessions costs no reload; an
engine of the host's own (``NativeEngine``, lf_engine_create) is shared by the sessions made from it and freed with
them.

    s = NativeSession({"model": "tiny", "device": "cpu"})
    s.push_speech(float32_bytes, 16000); s.end_speech()        # the whole clip (or live=1: as it is spoken)
    s.push_frame(rgb_bytes, width, height, stride)              # any size; frames come out at the source size
    s.pop(timeout_s) -> (index, rgb [H, W, 3] uint8, width, height) | None (none yet) | "end" (closed and drained)
    s.pop_into(view, stride, timeout_s) -> (index, width, height) | None | "end"   # into the caller's buffer
    s.close()                                                   # flush: the rest becomes poppable

``redirect_output(sink)`` points an embedded interpreter's stdout and stderr at ``sink(level, line)`` (the C
library's log callback or its stderr), so that nothing Python prints reaches a C host's stdout.
"""

from __future__ import annotations

import io
import sys
import threading
from collections import deque
from collections.abc import Callable

import numpy as np

from ..errors import ConfigError, LipforcingError
from .engine import Engine, RunConfig, Weights, build_engine

CONFIG_KEYS = {"model", "device", "dtype", "encoder", "decoder", "backend", "scheduler", "pipeline", "seed",
               "max_sessions"}
WEIGHT_KEYS = {"ckpt", "vae", "taehv", "wav2vec", "text_embeds"}
_engines: dict[tuple, Engine] = {}
_engines_lock = threading.Lock()


class StateError(LipforcingError):
    """A call out of order (a frame before the speech is complete, a push after close)."""


class ArgumentError(LipforcingError):
    """A caller's buffer or size that cannot be used (LF_ERR_ARGUMENT)."""


class LineSink(io.TextIOBase):
    """A text stream that hands each complete line to ``sink(level, line)`` (level 0: stdout, 1: stderr)."""

    encoding = "utf-8"

    def __init__(self, sink: Callable[[int, str], None], level: int) -> None:
        self._sink, self._level, self._pending = sink, level, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        *lines, self._pending = (self._pending + text).split("\n")
        for line in lines:
            self._sink(self._level, line)
        return len(text)

    def flush(self) -> None:
        if self._pending:
            line, self._pending = self._pending, ""
            self._sink(self._level, line)

    def fileno(self) -> int:  # faulthandler and the like write to the process's stderr
        return 2


def redirect_output(sink: Callable[[int, str], None]) -> None:
    """Python's stdout and stderr to ``sink``, line by line (the embedded interpreter of the C library)."""
    sys.stdout, sys.stderr = LineSink(sink, 0), LineSink(sink, 1)


def _run_config(config: dict) -> tuple[RunConfig, Weights]:
    unknown = set(config) - CONFIG_KEYS - WEIGHT_KEYS - {"live", "lookahead"}
    if unknown:
        raise ConfigError(f"unknown configuration keys: {', '.join(sorted(unknown))}")
    run = {k: v for k, v in config.items() if k in CONFIG_KEYS and v not in (None, "")}
    for name in ("seed", "max_sessions"):
        if name in run:
            run[name] = int(run[name])
    if run.get("model", "14b") == "tiny":
        run.setdefault("dtype", "fp32")
    return RunConfig(**run), Weights(**{k: v for k, v in config.items() if k in WEIGHT_KEYS and v})


def _engine(config: dict) -> Engine:
    """The shared engine of this configuration (lf_create): loaded once, kept for the process's life."""
    key = _run_config(config)
    with _engines_lock:
        if key not in _engines:
            _engines[key] = build_engine(*key)
        return _engines[key]


class NativeEngine:
    """An engine a C host owns (lf_engine_create): its own weights, not lf_create's shared ones. Its sessions keep
    it alive; once the handle is destroyed and the last session has ended, it is freed."""

    def __init__(self, config: dict) -> None:
        self.engine = build_engine(*_run_config(config))

    def warm_up(self) -> float:
        return self.engine.warm_up()

    def session(self, options: dict) -> NativeSession:
        return NativeSession(options, engine=self.engine)

    def destroy(self) -> None:
        """Drop the handle; the engine's worker thread stops now when no session runs on it."""
        if not any(p.in_use for p in self.engine.parts):
            self.engine.close()


class NativeSession:
    """One session for a C host. Calls are serialized (a lock); the C side holds the GIL only inside them."""

    def __init__(self, config: dict, engine: Engine | None = None) -> None:
        self.engine = engine if engine is not None else _engine(config)
        self.live = bool(int(config.get("live") or 0))
        lookahead = config.get("lookahead")
        self._lock = threading.Lock()
        self._speech: list[np.ndarray] = []
        self._rate: int | None = None
        self._speech_done = False
        self._session = self.engine.session(lookahead=float(lookahead) if lookahead else None) if self.live else None
        self._out: deque = deque()
        self._index = 0
        self._closed = False
        self._finished = False

    def _take(self, frames) -> None:
        for frame in frames:
            self._out.append((self._index, frame))
            self._index += 1

    def push_speech(self, data: bytes, rate: int) -> None:
        with self._lock:
            if self._closed or self._speech_done:
                raise StateError("the speech is complete (end_speech or close was called)")
            if rate <= 0:
                raise ConfigError(f"sample rate must be positive, got {rate}")
            samples = np.frombuffer(data, np.float32).copy()
            if self.live:
                self._take(self._session.push_audio(samples, rate))
                return
            if self._rate is not None and rate != self._rate:
                raise ConfigError(f"the speech's sample rate changed from {self._rate} to {rate} Hz")
            self._rate = rate
            self._speech.append(samples)

    def end_speech(self) -> None:
        with self._lock:
            if self._closed:
                raise StateError("the session is closed")
            self._speech_done = True
            if self.live:
                self._take(self._session.end_audio())

    def push_frame(self, data: bytes, width: int, height: int, stride: int) -> None:
        with self._lock:
            if self._closed:
                raise StateError("the session is closed: no more frames")
            if width <= 0 or height <= 0 or stride < 3 * width:
                raise ConfigError(f"bad frame geometry: {width}x{height}, stride {stride} (at least {3 * width})")
            if len(data) < stride * (height - 1) + 3 * width:
                raise ConfigError(f"frame buffer of {len(data)} bytes is too small for {width}x{height}, stride "
                                  f"{stride}")
            if self._session is None:
                if not self._speech_done:
                    raise StateError("push the whole speech and call end_speech before the first frame (or create "
                                     "the session live)")
                if not self._speech:
                    raise StateError("no speech was pushed")
                self._session = self.engine.session(np.concatenate(self._speech), sample_rate=self._rate)
            rows = np.frombuffer(data, np.uint8, count=stride * (height - 1) + 3 * width)
            frame = np.lib.stride_tricks.as_strided(rows, (height, width, 3), (stride, 3, 1)).copy()
            self._take(self._session.push(frame))

    def pop(self, timeout: float):
        with self._lock:
            if not self._out and self._session is not None and not self._finished:
                self._take(self._session.pop(max(0.0, timeout)))
            if self._out:
                index, frame = self._out.popleft()
                frame = np.ascontiguousarray(frame, np.uint8)  # [H, W, 3]: the C side copies it once, from its buffer
                return index, frame, frame.shape[1], frame.shape[0]
            return "end" if self._finished else None

    def pop_into(self, buffer: memoryview, stride: int, timeout: float):
        """``pop`` written into ``buffer`` (rows of ``stride`` bytes): (index, width, height), None or "end". A
        frame that does not fit raises ValueError and stays queued."""
        with self._lock:
            if not self._out and self._session is not None and not self._finished:
                self._take(self._session.pop(max(0.0, timeout)))
            if not self._out:
                return "end" if self._finished else None
            index, frame = self._out[0]
            height, width = frame.shape[:2]
            needed = stride * (height - 1) + 3 * width
            if stride < 3 * width or len(buffer) < needed:
                raise ArgumentError(f"a {width}x{height} frame needs a stride of at least {3 * width} and "
                                    f"{stride * (height - 1) + 3 * width} bytes, got stride {stride} and "
                                    f"{len(buffer)} bytes")
            rows = np.frombuffer(buffer, np.uint8, count=needed)
            target = np.lib.stride_tricks.as_strided(rows, (height, width, 3), (stride, 3, 1), writeable=True)
            np.copyto(target, frame, casting="unsafe")
            self._out.popleft()
            return index, width, height

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._session is not None:
                self._take(self._session.close())
            self._finished = True

    def destroy(self) -> None:
        """Drop the session (closing it first if need be: its slot on the engine is freed)."""
        with self._lock:
            session, self._session = self._session, None
            running = not self._finished
            self._out.clear()
            self._closed = self._finished = True
        if session is not None and running:
            session.abort()
