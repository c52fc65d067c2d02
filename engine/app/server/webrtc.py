"""WebRTC transport (aiortc): the browser's microphone in, the lip-synced video and its speech out.

    POST /v1/webrtc/offer {"sdp": ..., "type": "offer", "avatar": NAME, "lookahead": 0.32}
      -> {"sdp": ..., "type": "answer", "session": ID}

The peer sends one audio track (the speech); the server answers with a video track (the avatar's frames,
25 fps, timestamps on the 90 kHz clock) and an audio track (the speech that goes with them, 20 ms frames),
both stamped from the output frame index, so a receiver plays them in sync. The media flows directly
between the peer and this server process (ICE); only the offer passes through a load balancer, so behind
Ray Serve a session stays on the replica that answered its offer. When the peer's track ends the session
finishes its last frames; when the connection fails or closes the session is stopped and freed.

The offer carries one audio transceiver that sends (the microphone) and one video transceiver that receives.
A data channel labelled ``lipforcing``, when the peer opens one, carries the JSON messages of the WebSocket
protocol: ``ready``, ``error``, ``done`` and ``closing`` (server shutdown) from the server; ``end`` (no more
speech: the session finishes its frames and sends ``done``) and ``close`` from the peer. RTP has no end of
speech: without ``end`` a session runs until the peer closes the connection, the avatar playing on silence.

Bounds: a peer that has not connected ``idle_timeout`` seconds after its answer is closed and its session freed;
the outgoing tracks hold at most ``TRACK_QUEUE_S`` seconds of frames, and a session whose tracks take nothing
for ``max_lag`` seconds is closed; speech that arrives faster than the session runs (past ``live.py``'s
bound) is dropped, since RTP cannot be slowed down.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from fractions import Fraction

import numpy as np

from ...errors import EngineBusy, LipforcingError
from . import protocol
from .live import LiveSession

log = logging.getLogger("lipforcing")
VIDEO_CLOCK = 90000
AUDIO_FRAME = 320  # 20 ms at 16 kHz
WEBRTC_RATE = 48000  # what aiortc's Opus decoder gives
TRACK_QUEUE_S = 2.0
"""Seconds of frames each outgoing track may hold before the session's output waits."""


def preload() -> bool:
    """Import the WebRTC stack now (the server's start-up), so the first offer does not wait for it and its
    memory is the server's from the start; False where aiortc is not installed (offers are then refused)."""
    try:
        import aiortc  # noqa: F401
        import av  # noqa: F401
    except ImportError:
        return False
    return True


def _tracks():
    from aiortc import MediaStreamTrack

    class QueueTrack(MediaStreamTrack):
        """A track whose frames are put on a queue (by the session's output pump)."""

        def __init__(self, kind: str, size: int) -> None:
            super().__init__()
            self.kind = kind
            self.queue: asyncio.Queue = asyncio.Queue(maxsize=size)

        async def recv(self):
            frame = await self.queue.get()
            if frame is None:
                self.stop()
                from aiortc.mediastreams import MediaStreamError

                raise MediaStreamError
            return frame

    per_second = protocol.OUTPUT_RATE // AUDIO_FRAME
    return QueueTrack("video", int(TRACK_QUEUE_S * 25)), QueueTrack("audio", int(TRACK_QUEUE_S * per_second))


async def answer_offer(state, body: dict):
    """Create a session for the offer's peer and answer it (see the module docstring)."""
    import av
    from aiortc import RTCPeerConnection, RTCSessionDescription
    from fastapi.responses import JSONResponse

    name = body.get("avatar") if isinstance(body, dict) else None
    avatar = state.avatars.get(name) if isinstance(name, str) else None
    if avatar is None or not isinstance(body.get("sdp"), str) or body.get("type") != "offer":
        return JSONResponse({"error": f"an offer needs sdp, type 'offer' and avatar, one of {sorted(state.avatars)}"},
                            status_code=400)
    try:
        lookahead = protocol.lookahead_of(body, state.options.lookahead)
    except protocol.ProtocolError as exc:
        return JSONResponse({"error": str(exc)}, status_code=400)
    loop = asyncio.get_running_loop()
    try:
        live = await asyncio.to_thread(LiveSession, state.engine, avatar, loop=loop, sample_rate=WEBRTC_RATE,
                                       lookahead=lookahead, jpeg_quality=None)
    except EngineBusy as exc:
        return JSONResponse({"error": str(exc)}, status_code=503)
    except LipforcingError as exc:  # the avatar cannot be used
        return JSONResponse({"error": str(exc)}, status_code=400)
    pc = RTCPeerConnection()
    video, audio = _tracks()
    session_id = uuid.uuid4().hex[:12]
    channels: list = []  # the peer's "lipforcing" data channel, when it opened one

    def tell(message: str) -> None:  # a protocol message, encoded
        for channel in channels:
            if channel.readyState == "open":
                channel.send(message)

    async def consume(track) -> None:
        """The peer's speech: decoded frames (48 kHz) -> mono int16 -> the session."""
        from aiortc.mediastreams import MediaStreamError

        try:
            while True:
                frame = await track.recv()
                pcm = frame.to_ndarray()  # packed: [1, samples x channels]; planar: [channels, samples]
                channels_in = len(frame.layout.channels)
                mono = pcm.reshape(-1, channels_in).mean(axis=1) if frame.format.is_packed else pcm.mean(axis=0)
                if frame.sample_rate != WEBRTC_RATE:
                    raise MediaStreamError
                if live.has_room():  # (more speech than the session can take: dropped, RTP cannot wait)
                    live.push_audio(mono.astype(np.int16))
        except MediaStreamError:
            live.end()

    async def put(track, frame) -> None:
        await asyncio.wait_for(track.queue.put(frame), state.options.max_lag)

    async def pump() -> None:
        """The session's output -> the two outgoing tracks; a peer whose tracks take nothing for ``max_lag``
        seconds is closed."""
        try:
            await forward()
        except asyncio.TimeoutError:
            log.warning("lipforcing serve: WebRTC session %s dropped: its tracks took no frame for %g s",
                        session_id, state.options.max_lag)
            await drop()

    async def drop() -> None:
        live.close()
        state.peers.pop(pc, None)
        await pc.close()

    async def forward() -> None:
        async for item in live.outputs():
            if item[0] == "done":
                tell(json.dumps({"type": "done", "frames": item[1]}))
            elif item[0] == "error":
                log.warning("lipforcing serve: WebRTC session %s failed: %r", session_id, item[1])
                tell(protocol.error("internal", f"the session failed: {item[1]}"))
            if item[0] != "frames":
                break
            _, frames, (first, speech) = item
            for index, rgb in frames:
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
                frame.pts, frame.time_base = index * (VIDEO_CLOCK // 25), Fraction(1, VIDEO_CLOCK)
                await put(video, frame)
            for start in range(0, speech.size, AUDIO_FRAME):
                piece = speech[start : start + AUDIO_FRAME]
                out = av.AudioFrame.from_ndarray(piece[None].astype(np.int16), format="s16", layout="mono")
                out.sample_rate, out.pts = protocol.OUTPUT_RATE, first * protocol.SAMPLES_PER_FRAME + start
                out.time_base = Fraction(1, protocol.OUTPUT_RATE)
                await put(audio, out)
        await put(video, None)
        await put(audio, None)

    @pc.on("datachannel")
    def on_channel(channel) -> None:
        if channel.label != "lipforcing":
            return
        channels.append(channel)

        @channel.on("message")
        def on_message(message) -> None:
            try:
                kind = protocol.decode_text(message)["type"] if isinstance(message, str) else None
            except protocol.ProtocolError:
                kind = None
            if kind == "end":
                live.end()
            elif kind == "close":
                live.close()
            else:
                tell(protocol.error("malformed", 'the data channel takes {"type": "end"} and {"type": "close"}'))

        def ready() -> None:
            channel.send(protocol.ready(session_id, live.width, live.height))

        if channel.readyState == "open":
            ready()
        else:
            channel.on("open", ready)

    @pc.on("track")
    def on_track(track) -> None:
        if track.kind == "audio":
            asyncio.ensure_future(consume(track))

    @pc.on("connectionstatechange")
    async def on_state() -> None:
        if pc.connectionState in ("failed", "closed"):
            await drop()

    async def connect_or_drop() -> None:
        await asyncio.sleep(state.options.idle_timeout)
        if pc in state.peers and pc.connectionState != "connected":
            log.warning("lipforcing serve: WebRTC session %s dropped: the peer did not connect within %g s",
                        session_id, state.options.idle_timeout)
            await drop()

    state.peers[pc] = lambda reason: tell(protocol.closing(reason))
    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type="offer"))
        pc.addTrack(video)  # after the offer: the tracks take the transceivers it announced
        pc.addTrack(audio)
        await pc.setLocalDescription(await pc.createAnswer())
    except Exception as exc:  # an SDP aiortc cannot answer
        live.close()
        state.peers.pop(pc, None)
        await pc.close()
        return JSONResponse({"error": f"cannot answer the offer: {exc}"}, status_code=400)
    asyncio.ensure_future(pump())
    asyncio.ensure_future(connect_or_drop())
    log.info("lipforcing serve: WebRTC session %s", session_id)
    return {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type, "session": session_id}
