"""The WebSocket protocol of ``lipforcing serve`` (version 1), shared by the server, the reference client and
the web page (``static/index.html`` mirrors these constants).

Connect to ``ws://HOST:PORT/v1/session`` with ``Authorization: Bearer TOKEN`` or ``?token=TOKEN`` (browsers
cannot set headers); a missing or wrong token is refused with HTTP 401 (or close code 4401 where the
transport cannot send a status), before any session exists.

Client -> server
    text   {"type": "start", "avatar": NAME}                      a prepared avatar the server holds
           {"type": "start", "upload": "avatar"|"video", "bytes": N}
                                                                then N bytes in UPLOAD messages: an .lfa
                                                                file, or a video the server prepares
           optional in start: "lookahead": seconds, "sample_rate": Hz of the speech (default 16000)
           {"type": "end"}                                       no more speech: finish and send "done"
           {"type": "close"}                                     end the session now
    binary 0x01 AUDIO  + PCM s16le mono at the start's sample_rate (speech, as it is spoken)
           0x02 UPLOAD + file bytes (consecutive pieces of the upload)

Server -> client
    text   {"type": "hello", "protocol": 1, "max_message_bytes": N, "max_upload_bytes": M, "max_lag_s": S}
                                                                first, on every connection: the server's limits
                                                                (UPLOAD pieces carry at most N - 1 bytes; a
                                                                client that takes no frame for S seconds is
                                                                dropped)
           {"type": "ready", "session": ID, "width": W, "height": H, "fps": 25, "sample_rate": 16000,
            "protocol": 1, "replica": PID}
           {"type": "error", "code": CODE, "message": TEXT}      the request is refused; the connection stays
                                                                unless the code is fatal (see FATAL)
           {"type": "done", "frames": N}                         every frame was sent; the server closes
           {"type": "closing", "reason": TEXT}                   the server ends the session (idle, shutdown)
    binary 0x10 FRAME + uint32 index + uint32 pts_ms + JPEG      one output frame (RGB, 25 fps)
           0x11 AUDIO + uint32 first frame index + PCM s16le mono 16 kHz
                                                                the speech that goes with the frames from
                                                                that index on (640 samples per frame)

All integers are little-endian. Frames come in order; a frame's audio may arrive before or after it.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import numpy as np

from ...media.audio_features import SAMPLES_PER_FRAME  # noqa: F401  (the speech per frame; clients use it)
from ...media.length import AUDIO_RATE, OUTPUT_FPS

PROTOCOL_VERSION = 1
AUDIO_IN, UPLOAD = 0x01, 0x02
FRAME, AUDIO_OUT = 0x10, 0x11
OUTPUT_RATE = AUDIO_RATE
"""Sample rate of the speech the server sends back (and of the ``ready`` message's sample_rate)."""
MAX_MESSAGE = 64 << 20
"""The transport's cap on one message, either way (the server's own limit for clients is lower)."""
FATAL = {"auth", "busy", "bad_avatar", "bad_upload", "internal"}
"""Error codes after which the server closes the connection."""
_FRAME_HEADER = struct.Struct("<BII")
_AUDIO_HEADER = struct.Struct("<BI")


class ProtocolError(ValueError):
    """A malformed message (the server answers with an error and carries on)."""


MAX_LOOKAHEAD_S = 5.0


def lookahead_of(message: dict, default: float) -> float:
    """The session's look-ahead from a start message or a WebRTC offer (seconds, 0..5)."""
    value = message.get("lookahead", default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= MAX_LOOKAHEAD_S:
        raise ProtocolError(f"lookahead must be a number of seconds between 0 and {MAX_LOOKAHEAD_S:g}")
    return float(value)


def encode_frame(index: int, jpeg: bytes) -> bytes:
    return _FRAME_HEADER.pack(FRAME, index, index * 40) + jpeg


def encode_audio_out(first_frame: int, pcm: np.ndarray) -> bytes:
    """pcm: int16 [S] mono at 16 kHz."""
    return _AUDIO_HEADER.pack(AUDIO_OUT, first_frame) + np.ascontiguousarray(pcm, "<i2").tobytes()


def encode_audio_in(pcm: np.ndarray) -> bytes:
    return bytes([AUDIO_IN]) + np.ascontiguousarray(pcm, "<i2").tobytes()


def encode_upload(piece: bytes) -> bytes:
    return bytes([UPLOAD]) + piece


@dataclass(frozen=True)
class Decoded:
    """A decoded binary message."""

    kind: int
    index: int = 0
    payload: bytes | np.ndarray = b""


def decode_binary(data: bytes) -> Decoded:
    """Any binary message of either direction."""
    if not data:
        raise ProtocolError("empty binary message")
    kind = data[0]
    if kind == AUDIO_IN:
        if (len(data) - 1) % 2:
            raise ProtocolError("AUDIO carries 16-bit samples: an odd number of bytes")
        return Decoded(AUDIO_IN, payload=np.frombuffer(data, "<i2", offset=1))
    if kind == UPLOAD:
        return Decoded(UPLOAD, payload=data[1:])
    if kind == FRAME:
        if len(data) < _FRAME_HEADER.size:
            raise ProtocolError("FRAME shorter than its header")
        _, index, _ = _FRAME_HEADER.unpack_from(data)
        return Decoded(FRAME, index=index, payload=data[_FRAME_HEADER.size :])
    if kind == AUDIO_OUT:
        if len(data) < _AUDIO_HEADER.size or (len(data) - _AUDIO_HEADER.size) % 2:
            raise ProtocolError("malformed AUDIO_OUT message")
        _, index = _AUDIO_HEADER.unpack_from(data)
        return Decoded(AUDIO_OUT, index=index, payload=np.frombuffer(data, "<i2", offset=_AUDIO_HEADER.size))
    raise ProtocolError(f"unknown binary message type 0x{kind:02x}")


def decode_text(text: str) -> dict:
    """A control message: a JSON object with a string "type"."""
    try:
        message = json.loads(text)
    except ValueError:
        raise ProtocolError("a text message must be JSON") from None
    except RecursionError:
        raise ProtocolError("a text message must be JSON nested less deeply") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolError('a text message must be a JSON object with a "type"')
    return message


def hello(*, max_message_bytes: int, max_upload_bytes: int, max_lag_s: float) -> str:
    """The ``hello`` message: the first one on every connection, the server's limits."""
    return json.dumps({"type": "hello", "protocol": PROTOCOL_VERSION, "max_message_bytes": max_message_bytes,
                       "max_upload_bytes": max_upload_bytes, "max_lag_s": max_lag_s})


def ready(session: str, width: int, height: int) -> str:
    """The ``ready`` message of a session that starts (both transports)."""
    return json.dumps({"type": "ready", "session": session, "width": width, "height": height, "fps": OUTPUT_FPS,
                       "sample_rate": OUTPUT_RATE, "protocol": PROTOCOL_VERSION, "replica": os.getpid()})


def closing(reason: str) -> str:
    """The ``closing`` message: the server ends the session (shutdown)."""
    return json.dumps({"type": "closing", "reason": reason})


def error(code: str, message: str) -> str:
    return json.dumps({"type": "error", "code": code, "message": message})


def to_pcm16(samples: np.ndarray) -> np.ndarray:
    """float [-1, 1] -> int16."""
    return (np.clip(np.asarray(samples, np.float32), -1.0, 1.0) * 32767.0).round().astype("<i2")
