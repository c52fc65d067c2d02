"""``lipforcing serve`` under abuse: a speech flood, a client that does not read, a WebRTC offer that never
connects, 50 idle connections, a corpus of malformed messages and offers, too many uploads at once, and signals
during the warm-up. Each attack runs beside an honest client, which must still get every frame of its session,
while the server's resident memory (read from /proc) rises no more than two honest sessions' worth (and
``RSS_MARGIN``).

One server (tiny model, CPU, loopback) with small limits serves every attack, so that each limit is reached in
seconds: a 2 s lag, a 4 s idle timeout, 52 connections, 2 sessions, 64 MB of uploads at once."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("aiortc")
from app.test_server import (  # noqa: E402  (the server process and its helpers, shared with test_server.py)
    TINY_ARGS,
    TOKEN,
    ServerProcess,
    _connect,
    _free_port,
    _next_text,
    _post,
    _request,
)

from lipforcing.engine.app.server import protocol  # noqa: E402
from lipforcing.engine.app.server.client import ClientOptions, stream_session  # noqa: E402
from lipforcing.engine.media.io import load_audio  # noqa: E402

RSS_MARGIN = 320 << 20
"""How far beyond two honest sessions' worth the server's resident memory may rise during an attack (which runs
beside an honest session, and holds at most one session itself): a flood before the queues were bounded added
700 MB. A WebRTC session (its threads' allocator arenas, its tracks' queues) was measured at up to 285 MB past
two sessions' worth."""
LAG_S, IDLE_S, CONNECTIONS = 2, 4, 52


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("abuse")


@pytest.fixture(scope="module")
def honest_speech(shared_dir) -> np.ndarray:
    """0.4 s of a shared speech clip (9 output frames: one chunk), int16."""
    return protocol.to_pcm16(load_audio(shared_dir / "assets/clips/speech1.wav")[:6400])


@pytest.fixture(scope="module")
def server(workdir, tiny_avatar_file, honest_speech):
    avatars = workdir / "avatars"
    avatars.mkdir()
    shutil.copy(tiny_avatar_file, avatars / "face3.lfa")
    process = ServerProcess(workdir, "--avatars", str(avatars), "--token", TOKEN, "--max-sessions", "2",
                            "--max-lag", str(LAG_S), "--idle-timeout", str(IDLE_S), "--max-connections",
                            str(CONNECTIONS), "--max-uploads-mb", "64", "--max-upload-mb", "48")
    async def two_sessions():  # (a session's parts are built once: the first sessions' memory is no attack's)
        await asyncio.gather(_honest(process, honest_speech), _honest(process, honest_speech))

    asyncio.run(two_sessions())
    with PeakRss(process.process.pid) as rss:
        asyncio.run(_honest(process, honest_speech))
    process.session_rss = rss.peak - rss.before  # what one session holds on top, at its peak
    yield process
    assert process.stop() == 0, process.log.read_text()


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no VmRSS")


class PeakRss:
    """The server's resident memory sampled every 20 ms while the block runs: ``before`` and ``peak``."""

    def __init__(self, pid: int) -> None:
        self.pid, self.stop = pid, threading.Event()

    def __enter__(self):
        self.before = self.peak = _rss(self.pid)
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(0.02):
            self.peak = max(self.peak, _rss(self.pid))

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


async def _honest(server, speech: np.ndarray) -> int:
    """An honest client's session, sent as fast as the server takes it: the frames it got (all of them, or an
    exception)."""
    options = ClientOptions(url=server.ws, token=TOKEN, avatar="face3", fast=True, timeout=60)
    result = await stream_session(options, speech)
    assert result.frames == 9 and result.audio.size == 9 * 640, result
    return result.frames


def _under_attack(server, speech, attack) -> tuple[object, PeakRss]:
    """``attack()`` (a coroutine function) beside an honest session; (the attack's result, its PeakRss)."""
    async def both():
        attacking = asyncio.ensure_future(attack())
        await asyncio.sleep(0.3)  # the attack is under way
        await _honest(server, speech)
        return await attacking

    with PeakRss(server.process.pid) as rss:
        result = asyncio.run(both())
    rise, bound = rss.peak - rss.before, 2 * server.session_rss + RSS_MARGIN
    assert rise < bound, f"the server's memory rose {rise >> 20} MB (two sessions hold {bound >> 20} MB at most)"
    return result, rss


async def _started(server, **connect):
    ws = await _connect(server, **connect)
    await ws.send(json.dumps({"type": "start", "avatar": "face3"}))
    assert (await _next_text(ws))["type"] == "ready"
    return ws


# --- the attacks ---------------------------------------------------------------------------------------------


def test_a_speech_flood_is_read_at_the_sessions_pace(server, honest_speech):
    """Up to 160 MB of speech (83 minutes) sent as fast as the socket takes it: the server reads no more than its
    session can use soon, so the sender is held back once the sockets' buffers are full (tens of MB on loopback),
    not buffered by the server."""
    noise = np.random.default_rng(0).integers(-3000, 3000, 32768, dtype=np.int16)  # (zeros would be deflated)
    piece = protocol.encode_audio_in(noise)  # 64 KB, 2 s of speech

    async def flood() -> int:
        ws = await _started(server)
        sent = 0
        try:
            for _ in range(2560):
                await asyncio.wait_for(ws.send(piece), 3)
                sent += len(piece)
        except TimeoutError:  # held back: the server stopped reading
            pass
        ws.transport.abort()
        return sent

    sent, _ = _under_attack(server, honest_speech, flood)
    assert sent < 96 << 20, f"the server took {sent >> 20} MB of speech at once"
    assert server.wait_idle(timeout=30)["slots_in_use"] == 0  # the flood's session ends with its connection


def test_a_client_that_does_not_read_costs_no_more_than_its_session(server, honest_speech):
    """A client that starts a session, sends a second of speech and never reads a frame (its socket's window
    kept small): the server's memory stays bounded, the honest session finishes, and the reader's session is
    freed (by the lag, or once its frames fit in the sockets' buffers; the drop itself is the next test's)."""
    async def slow_reader() -> tuple[float, dict]:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # (before connecting: a small window)
        sock.connect(("127.0.0.1", server.port))
        ws = await _started(server, sock=sock)
        ws.transport.pause_reading()  # nothing more is read from the socket
        await ws.send(protocol.encode_audio_in(np.zeros(16000, np.int16)))
        await ws.send(json.dumps({"type": "end"}))
        try:  # (the honest session ends meanwhile)
            return ws.hello["max_lag_s"], await asyncio.to_thread(server.wait_idle, 60)
        finally:
            ws.transport.abort()

    (lag, stats), _ = _under_attack(server, honest_speech, slow_reader)
    assert lag == LAG_S and stats["sessions"] == 0 and stats["slots_in_use"] == 0, stats


def test_a_connection_whose_client_takes_no_frame_is_dropped_after_the_lag():
    """The connection's sender, against a transport that never takes a frame: after ``max_lag`` seconds it
    stops the session, ends the receive loop and says why in the log (before: it waited forever, holding the
    session's slot)."""
    from lipforcing.engine.app.server.app import Connection, ServerOptions

    class Stuck:
        """A WebSocket whose client took the hello, then reads nothing more (sends of frames never finish) and
        sends nothing."""

        async def send_bytes(self, data):
            await asyncio.Event().wait()

        async def send_text(self, text):
            pass

        async def receive(self):
            await asyncio.Event().wait()

    class Live:
        closed = False

        async def outputs(self):
            yield ("frames", [(0, b"jpeg")], (0, np.zeros(640, np.int16)))
            while not self.closed:
                await asyncio.sleep(0.01)
            yield ("closed", 1)

        def close(self):
            self.closed = True

    class State:
        options = ServerOptions(max_lag=0.3)

    async def scenario():
        connection = Connection(Stuck(), State())
        connection.live = Live()
        reader = asyncio.ensure_future(connection.run())
        await asyncio.sleep(0.05)  # the receive loop waits for a message
        began = time.monotonic()
        await asyncio.wait_for(connection._send_outputs(), 10)
        await asyncio.wait_for(reader, 10)  # the receive loop ends too
        return connection, time.monotonic() - began

    connection, took = asyncio.run(scenario())
    assert connection.dropped == "the client took no frame for 0.3 s" and connection.live.closed
    assert 0.3 <= took < 5, took


def test_a_webrtc_offer_that_never_connects_is_freed_after_the_idle_timeout(server, honest_speech):
    from aiortc import RTCPeerConnection

    async def offer_only() -> tuple[int, float]:
        pc = RTCPeerConnection()
        pc.addTransceiver("audio", direction="sendonly")
        pc.addTransceiver("video", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        body = {"sdp": pc.localDescription.sdp, "type": "offer", "avatar": "face3"}
        status, _ = await asyncio.to_thread(_post, f"{server.http}/v1/webrtc/offer", body)
        await pc.close()  # the answer is never applied: the peer never connects
        began, deadline = time.monotonic(), time.monotonic() + 60
        while "the peer did not connect within 4 s" not in server.log.read_text() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return status, time.monotonic() - began

    (status, freed_after), _ = _under_attack(server, honest_speech, offer_only)
    assert status == 200 and freed_after < IDLE_S + 3, freed_after
    assert server.wait_idle(timeout=30)["slots_in_use"] == 0


def test_fifty_idle_connections_are_capped_and_closed(server, honest_speech):
    """50 connections that say nothing beside an honest one: the server refuses connections past its cap
    (HTTP 503, before accepting) and closes the idle ones after its idle timeout."""
    from websockets.exceptions import InvalidStatus

    async def idle() -> tuple[list[dict], int]:
        crowd = []
        try:
            crowd += [await _connect(server) for _ in range(50)]
            await asyncio.sleep(0.5)  # the honest session connects meanwhile (51)
            crowd.append(await _connect(server))  # 52: the cap
            with pytest.raises(InvalidStatus) as refused:
                await _connect(server)
            replies = await asyncio.gather(*(_next_text(ws, timeout=IDLE_S + 10) for ws in crowd))
        finally:
            for ws in crowd:
                ws.transport.abort()
        return replies, refused.value.response.status_code

    (replies, status), _ = _under_attack(server, honest_speech, idle)
    assert status == 503
    assert replies == [{"type": "closing", "reason": f"idle for {IDLE_S} s"}] * 51, replies[:3]


DEEP = "[" * 100_000 + "]" * 100_000
CORPUS = [
    "", "null", "{}", "[]", '"start"', "1e999999", "\x00",
    json.dumps({"type": None}), json.dumps({"type": ["start"]}), json.dumps({"type": "start", "avatar": None}),
    json.dumps({"type": "start", "avatar": 3}), json.dumps({"type": "start", "avatar": ["face3"]}),
    json.dumps({"type": "start", "avatar": "face3", "lookahead": 1e308}),
    json.dumps({"type": "start", "avatar": "face3", "lookahead": -1}),
    json.dumps({"type": "start", "avatar": "face3", "sample_rate": 0}),
    json.dumps({"type": "start", "avatar": "face3", "sample_rate": "16000"}),
    json.dumps({"type": "start", "upload": "avatar", "bytes": -5}),
    json.dumps({"type": "start", "upload": "avatar", "bytes": 2 ** 80}),
    json.dumps({"type": "start", "upload": "shell", "bytes": 10}), json.dumps({"type": "end"}),
    DEEP, '{"a":' * 50_000 + "1" + "}" * 50_000, json.dumps({"type": "x" * 500_000}),
    b"", b"\x00", b"\x01\x00", b"\x02" + b"x" * 100, b"\x10", b"\x11\x00\x00", b"\xff" * 1000,
]


def test_a_corpus_of_malformed_messages_and_offers_gets_errors(server, honest_speech):
    """Every message is answered ``malformed`` (or ``too_large``) on a connection that stays open; every bad offer
    gets a 4xx with a JSON error (an offer over the message limit: 413, unread); the log has no traceback."""
    async def corpus() -> list[dict]:
        ws = await _connect(server)
        replies = []
        for message in CORPUS:
            await ws.send(message)
            replies.append(await _next_text(ws))
        await ws.close()
        return replies

    def offers() -> list[int]:
        statuses = []
        for raw in (b"x" * (2 << 20), b"{" * ((1 << 20) + 1), DEEP.encode(), b"", b'{"sdp": 1}', b'"offer"',
                    json.dumps({"sdp": "v=0\r\n" * 1000, "type": "offer", "avatar": "face3"}).encode()):
            request = urllib.request.Request(f"{server.http}/v1/webrtc/offer", raw,
                                             {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
            try:
                status, answer = _request(request, timeout=30)
            except urllib.error.URLError as exc:  # answered 413 and closed before the body was all sent
                assert isinstance(exc.reason, BrokenPipeError | ConnectionResetError) and len(raw) > 1 << 20, exc
                status, answer = 413, {"error": "(unread)"}
            assert "error" in answer, answer
            statuses.append(status)
        return statuses

    async def both_kinds():
        return await corpus(), await asyncio.to_thread(offers)

    (replies, statuses), _ = _under_attack(server, honest_speech, both_kinds)
    assert all(r["type"] == "error" and r["code"] in ("malformed", "too_large") for r in replies), replies
    assert len(replies) == len(CORPUS)
    assert statuses[0] == 413 and statuses[1] == 413 and all(400 <= s < 500 for s in statuses), statuses
    assert "Traceback" not in server.log.read_text()


def test_uploads_in_progress_are_capped_together(server, honest_speech, workdir):
    """Three uploads of 30 MB announced at once against a 64 MB cap: the third is refused ``busy``, and the
    refused and abandoned uploads leave no file."""
    async def uploads() -> list[dict]:
        connections, replies = [], []
        for _ in range(3):
            ws = await _connect(server)
            await ws.send(json.dumps({"type": "start", "upload": "video", "bytes": 30 << 20}))
            await ws.send(protocol.encode_upload(b"\0" * 1000))
            connections.append(ws)
        replies.append(await _next_text(connections[2]))
        for ws in connections:
            ws.transport.abort()
        return replies

    replies, _ = _under_attack(server, honest_speech, uploads)
    assert replies[0]["code"] == "busy" and "uploads" in replies[0]["message"], replies


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_a_warm_up_stops_that_server_only(server, honest_speech, tmp_path, sig, status):
    """A second server stopped while it warms up exits at once with the signal's status and leaves no files,
    while the running server's honest session finishes."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()

    async def warm_and_stop() -> tuple[int, int]:
        with open(tmp_path / "log", "w") as log:
            process = subprocess.Popen([sys.executable, "-m", "lipforcing.cli", "serve", "--port", str(_free_port()),
                                        *TINY_ARGS], stdout=log, stderr=subprocess.STDOUT,
                                       env={**os.environ, "TMPDIR": str(scratch)})
        while not any(scratch.iterdir()):  # its temporary folder exists: the warm-up is under way
            assert process.poll() is None, (tmp_path / "log").read_text()
            await asyncio.sleep(0.01)
        process.send_signal(sig)
        return await asyncio.to_thread(process.wait, 60)

    code, _ = _under_attack(server, honest_speech, warm_and_stop)
    log = (tmp_path / "log").read_text()
    if "ready (" in log:
        pytest.skip("the warm-up finished before the signal arrived")
    assert code == status and "Traceback" not in log, log
    assert list(scratch.iterdir()) == []

