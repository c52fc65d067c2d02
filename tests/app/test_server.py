"""``lipforcing serve``: the server process, the reference client, WebRTC, the web page in Chromium, limits and
faults, a load of eight sessions, and Ray Serve replicas. Everything runs on loopback with the tiny model."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import wave
from pathlib import Path

import numpy as np
import pytest

from conftest import SERVER_PACKAGES, in_threads, require

require(*SERVER_PACKAGES)

from lipforcing.cli import main  # noqa: E402
from lipforcing.engine.app.server import protocol  # noqa: E402
from lipforcing.engine.app.server.client import ClientOptions, run_client  # noqa: E402
from lipforcing.engine.media.io import VideoReader, load_audio, probe  # noqa: E402
from lipforcing.engine.media.length import clip_length_from_samples  # noqa: E402

TINY_ARGS = ["--model", "tiny", "--device", "cpu", "--dtype", "fp32", "--encoder", "taehv"]
TOKEN = "test-token"
STARTUP_S = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(request: urllib.request.Request, timeout: float) -> tuple[int, dict]:
    """(HTTP status, JSON body) of a request; error statuses included."""
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            return exc.code, json.loads(body or b"{}")
        except ValueError:  # Ray's proxy answers in plain text while its replicas start
            return exc.code, {"text": body.decode(errors="replace")}


def _get(url: str, token: str | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    return _request(request, timeout=10)


class ServerProcess:
    """``lipforcing serve`` in a child process, as users start it."""

    def __init__(self, workdir: Path, *args: str, env: dict | None = None) -> None:
        self.port = _free_port()
        self.http = f"http://127.0.0.1:{self.port}"
        self.ws = f"ws://127.0.0.1:{self.port}"
        self.log = workdir / f"serve-{self.port}.log"
        command = [sys.executable, "-m", "lipforcing.cli", "serve", "--port", str(self.port), *TINY_ARGS, *args]
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, **(env or {})}, cwd=workdir)
        self.wait_ready()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the server exited ({self.process.returncode}):\n{self.log.read_text()}")
            try:
                if _get(f"{self.http}/healthz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop(signal.SIGKILL)
        pytest.fail(f"the server was not ready within {STARTUP_S} s:\n{self.log.read_text()}")

    def stats(self) -> dict:
        status, body = _get(f"{self.http}/v1/stats", TOKEN)
        assert status == 200, body
        return body

    def wait_idle(self, timeout: float = 20.0) -> dict:
        """Every session gone and its slot free."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if stats["sessions"] == 0 and stats["slots_in_use"] == 0 or time.monotonic() > deadline:
                return stats
            time.sleep(0.2)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def _wait_log(server: ServerProcess, text: str, timeout: float = 300.0) -> bool:
    """Until the server's log says ``text`` (a replica's /healthz can answer before the others are warm)."""
    deadline = time.monotonic() + timeout
    while text not in server.log.read_text():
        if time.monotonic() > deadline or server.process.poll() is not None:
            return False
        time.sleep(0.5)
    return True


def _listening(root: int) -> list[str]:
    """The local ``address:port`` of the TCP sockets that ``root`` and its descendants listen on (Ray's GCS,
    raylet, workers and proxy included), from /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    family = {root}
    while grown := {pid for pid, parent in parents.items() if parent in family} - family:
        family |= grown
    inodes = set()
    for pid in family:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    addresses = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                local, port = fields[1].split(":")
                if len(local) == 8:
                    address = socket.inet_ntoa(bytes.fromhex(local)[::-1])
                else:  # (the kernel's words of an IPv6 address)
                    words = b"".join(bytes.fromhex(local[i : i + 8])[::-1] for i in range(0, 32, 8))
                    address = socket.inet_ntop(socket.AF_INET6, words)
                addresses.append(f"{address}:{int(port, 16)}")
    return addresses


def _write_wav(path: Path, samples: np.ndarray) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(protocol.to_pcm16(samples).tobytes())
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("serve")


@pytest.fixture(scope="module")
def speech(shared_dir, workdir):
    """The first second of a shared speech clip (21 output frames), and 0.4 s of it (9 frames: one chunk)."""
    audio = load_audio(shared_dir / "assets/clips/speech1.wav")
    return _write_wav(workdir / "speech1s.wav", audio[:16000]), _write_wav(workdir / "speech04.wav", audio[:6400])


@pytest.fixture(scope="module")
def server(workdir, tiny_avatar_file):
    avatars = workdir / "avatars"
    avatars.mkdir()
    shutil.copy(tiny_avatar_file, avatars / "face3.lfa")
    process = ServerProcess(workdir, "--avatars", str(avatars), "--token", TOKEN, "--max-sessions", "8",
                            "--idle-timeout", "20")
    yield process
    assert process.stop() == 0, process.log.read_text()


def _client(server, output, speech, **kwargs):
    options = dict(url=server.ws, token=TOKEN, avatar="face3", speech=str(speech), output=str(output))
    return run_client(ClientOptions(**{**options, **kwargs}))


def _frames_expected(path) -> int:
    return clip_length_from_samples(load_audio(path).size).frames


# --- serve + client ------------------------------------------------------------------------------------------


def test_serve_and_client_turn_a_shared_clip_and_speech_into_an_mp4(server, tiny_avatar_file, speech, workdir):
    """The client uploads the prepared avatar (.lfa) and streams a second of speech in real time."""
    out, report = workdir / "client.mp4", workdir / "client.json"
    args = ["client", "--url", server.ws, "--token", TOKEN, "--avatar", str(tiny_avatar_file),
            "--speech", str(speech[0]), "-o", str(out), "--report", str(report)]
    assert main(args) == 0
    expected = _frames_expected(speech[0])
    assert expected == 21
    info = probe(out)
    assert info.has_audio and (info.width, info.height) == (590, 590)
    assert len(list(VideoReader(out))) == expected
    record = json.loads(report.read_text())
    assert record["frames"] == expected and len(record["chunk_latency_s"]) == 2
    assert 0 < record["chunk_latency_p50_s"] <= record["chunk_latency_p95_s"]
    assert server.wait_idle()["slots_in_use"] == 0


def test_the_speech_comes_back_with_its_frames(server, speech, workdir):
    """The audio the server sends beside the frames is the speech the client sent, 640 samples a frame."""
    result = _client(server, workdir / "back.mp4", speech[1], fast=True)
    sent = protocol.to_pcm16(load_audio(speech[1]))
    assert result.frames == 9 and result.audio.size == 9 * 640
    np.testing.assert_array_equal(result.audio[: sent.size], sent[: 9 * 640])


def test_a_video_upload_is_prepared_by_the_server(server, short_video, speech, workdir):
    out = workdir / "video.mp4"
    assert main(["client", "--url", server.ws, "--token", TOKEN, "--video", str(short_video),
                 "--speech", str(speech[1]), "-o", str(out), "--fast"]) == 0
    assert len(list(VideoReader(out))) == 9
    assert not any(server.log.parent.glob("*.video"))  # the upload was removed once prepared


def test_four_clients_at_once_all_succeed(server, speech, workdir):
    results = {}

    def one(i: int) -> None:
        results[i] = _client(server, workdir / f"four{i}.mp4", speech[1])

    errors = in_threads(one, 4, timeout=240)
    assert not errors and len(results) == 4
    for i, result in results.items():
        assert result.frames == 9 and len(list(VideoReader(workdir / f"four{i}.mp4"))) == 9
    stats = server.wait_idle()
    assert stats["slots_in_use"] == 0 and stats["slots"] <= 8


def test_a_wrong_token_is_refused_and_writes_nothing(server, speech, tmp_path, capsys):
    out = tmp_path / "refused.mp4"
    for token in ("wrong", ""):
        assert main(["client", "--url", server.ws, "--token", token, "--avatar", "face3",
                     "--speech", str(speech[1]), "-o", str(out)]) == 2
        assert "wrong or missing token" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert _get(f"{server.http}/v1/stats")[0] == 401
    assert _get(f"{server.http}/v1/stats", "wrong")[0] == 401
    assert _get(f"{server.http}/healthz")[0] == 200  # the health check needs no token
    assert server.stats()["sessions"] == 0  # no session was made


def test_an_unknown_avatar_is_refused_with_its_reason(server, speech, tmp_path, capsys):
    assert main(["client", "--url", server.ws, "--token", TOKEN, "--avatar", "nobody",
                 "--speech", str(speech[1]), "-o", str(tmp_path / "x.mp4")]) == 2
    assert "no avatar 'nobody'" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


# --- bad clients ---------------------------------------------------------------------------------------------


async def _connect(server, token: str | None = TOKEN, **kwargs):
    """A connection past the server's ``hello`` (its limits, kept as ``ws.hello``)."""
    from websockets.asyncio.client import connect

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    ws = await connect(f"{server.ws}/v1/session", additional_headers=headers, max_size=protocol.MAX_MESSAGE,
                       **kwargs)
    ws.hello = json.loads(await asyncio.wait_for(ws.recv(), 30))
    assert ws.hello["type"] == "hello", ws.hello
    return ws


async def _next_text(ws, timeout: float = 30.0) -> dict:
    while True:
        message = await asyncio.wait_for(ws.recv(), timeout)
        if isinstance(message, str):
            return json.loads(message)


def test_malformed_and_oversized_messages_get_errors_and_the_server_stays_up(server):
    async def scenario() -> list[dict]:
        replies = []
        ws = await _connect(server)
        for message in ("not json", json.dumps([1, 2]), json.dumps({"type": "dance"}), json.dumps({"type": "end"}),
                        bytes([0x7F, 1, 2]), b"", bytes([protocol.AUDIO_IN, 1, 2, 3]),
                        protocol.encode_audio_in(np.zeros(320, np.int16)), bytes([protocol.FRAME]) + b"x" * 20,
                        json.dumps({"type": "start", "avatar": "face3", "lookahead": "soon"})):
            await ws.send(message)
            replies.append(await _next_text(ws))
        await ws.send(json.dumps({"type": "start", "avatar": "face3"}))  # the connection still works
        replies.append(await _next_text(ws))
        await ws.send(json.dumps({"type": "start", "avatar": "face3"}))
        replies.append(await _next_text(ws))
        await ws.close()
        return replies

    async def oversized() -> tuple[dict, int | None]:
        """One byte over the limit the server states: the transport refuses it (code 1009, "message too big")
        before the server reads it whole."""
        from websockets.exceptions import ConnectionClosed

        ws = await _connect(server)
        limit = ws.hello["max_message_bytes"]
        await ws.send(bytes([protocol.AUDIO_IN]) + bytes(limit))
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 30)
        return ws.hello, closed.value.rcvd.code if closed.value.rcvd else None

    replies = asyncio.run(scenario())
    codes = [r.get("code") for r in replies[:-2]]
    assert codes == ["malformed"] * 10, replies
    assert replies[-2]["type"] == "ready" and replies[-1]["code"] == "malformed"  # a second start
    assert "already started" in replies[-1]["message"]
    hello, code = asyncio.run(oversized())
    assert hello["max_message_bytes"] == 1 << 20 and code == 1009, (hello, code)
    assert _get(f"{server.http}/healthz")[0] == 200
    assert server.wait_idle()["slots_in_use"] == 0


def test_a_client_that_disconnects_mid_stream_has_its_session_freed(server, speech):
    pcm = protocol.to_pcm16(load_audio(speech[0]))

    async def scenario() -> int:
        ws = await _connect(server)
        await ws.send(json.dumps({"type": "start", "avatar": "face3"}))
        assert (await _next_text(ws))["type"] == "ready"
        await ws.send(protocol.encode_audio_in(pcm))
        frames = 0
        while frames < 9:  # the first chunk arrives, then the client vanishes mid-stream
            message = await asyncio.wait_for(ws.recv(), 60)
            frames += isinstance(message, bytes) and message[0] == protocol.FRAME
        ws.transport.abort()  # no close handshake, no "close" message
        return frames

    slots_before = server.stats()["slots"]
    assert asyncio.run(scenario()) == 9
    stats = server.wait_idle()
    assert stats["sessions"] == 0 and stats["slots_in_use"] == 0
    assert stats["slots"] == slots_before  # the parts are reused, not leaked


# --- WebRTC --------------------------------------------------------------------------------------------------


def test_webrtc_loopback_session(server, speech):
    """An aiortc peer sends a second of speech as its microphone track and receives video and audio tracks in
    step: every frame of the session, stamped 25 fps on the 90 kHz clock, with its speech."""
    pytest.importorskip("aiortc")
    from aiortc import RTCPeerConnection, RTCSessionDescription
    from aiortc.contrib.media import MediaPlayer

    async def scenario():
        pc = RTCPeerConnection()
        player = MediaPlayer(str(speech[0]))
        pc.addTrack(player.audio)
        pc.addTransceiver("video", direction="recvonly")
        channel = pc.createDataChannel("lipforcing")
        messages: list[dict] = []
        done = asyncio.Event()

        @channel.on("message")
        def on_message(text):
            messages.append(json.loads(text))
            if messages[-1]["type"] in ("done", "error"):
                done.set()

        received = {"video": [], "audio": []}

        async def drain(track):
            try:
                while True:
                    received[track.kind].append(await track.recv())
            except Exception:  # the track ended
                pass

        pc.on("track", lambda track: asyncio.ensure_future(drain(track)))
        await pc.setLocalDescription(await pc.createOffer())
        body = json.dumps({"sdp": pc.localDescription.sdp, "type": "offer", "avatar": "face3"}).encode()
        request = urllib.request.Request(f"{server.http}/v1/webrtc/offer", body,
                                         {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
        answer = await asyncio.to_thread(lambda: json.load(urllib.request.urlopen(request, timeout=30)))
        await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
        deadline = time.monotonic() + 60
        while player.audio.readyState != "ended":  # the speech plays out in real time, to its end
            assert time.monotonic() < deadline, "the microphone track never ended"
            await asyncio.sleep(0.05)
        channel.send(json.dumps({"type": "end"}))
        await asyncio.wait_for(done.wait(), 120)
        deadline = time.monotonic() + 30
        while len(received["video"]) < messages[-1]["frames"] - 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # the last packets (the receiver may hold the very last frame)
        await pc.close()
        player.audio.stop()
        return messages, received

    messages, received = asyncio.run(scenario())
    assert messages[0]["type"] == "ready" and messages[-1]["type"] == "done", messages
    n = messages[-1]["frames"]
    assert n >= 21  # at least the second of speech (the stall before "end" is played as silence)
    pts = [frame.pts for frame in received["video"]]
    assert len(pts) >= n - 1  # over loopback nothing is lost; the receiver may hold the very last frame
    assert pts == sorted(pts) and pts[0] == 0 and all(b - a == 3600 for a, b in zip(pts, pts[1:]))
    assert sum(f.samples for f in received["audio"]) >= 0.8 * n * 640 * 3  # 48 kHz out of the Opus decoder
    assert server.wait_idle()["slots_in_use"] == 0


def test_a_bad_webrtc_offer_gets_a_clear_error(server):
    status, body = _post(f"{server.http}/v1/webrtc/offer", {"type": "offer", "avatar": "face3"})
    assert status == 400 and "sdp" in body["error"]
    status, body = _post(f"{server.http}/v1/webrtc/offer", {"sdp": "v=0", "type": "offer", "avatar": "face3"})
    assert status == 400 and "cannot answer" in body["error"]
    assert _post(f"{server.http}/v1/webrtc/offer", {}, token="wrong")[0] == 401
    assert server.wait_idle()["slots_in_use"] == 0


def _post(url: str, body: dict, token: str = TOKEN) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    return _request(request, timeout=30)


# --- the web page in Chromium --------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    """Headless Chromium driven over the DevTools protocol, its microphone a fake device (a beep)."""

    def __init__(self, url: str, profile: Path) -> None:
        self.process = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--mute-audio",
             "--remote-debugging-port=0", f"--user-data-dir={profile}", "--use-fake-ui-for-media-stream",
             "--use-fake-device-for-media-stream", "--autoplay-policy=no-user-gesture-required", url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.close()
                pytest.fail("Chromium did not start its DevTools endpoint")
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
        self.page = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")

    def stats_until(self, predicate, timeout: float, *, first: str | None = None) -> dict:
        """window.lipforcingStats, polled until ``predicate`` holds (or the time is up); ``first`` is a
        JavaScript expression evaluated in the page before polling (a click, say)."""
        from websockets.asyncio.client import connect

        async def poll() -> dict:
            async with connect(self.page, max_size=None) as ws:
                calls = 0

                async def evaluate(expression: str):
                    nonlocal calls
                    calls += 1
                    await ws.send(json.dumps({"id": calls, "method": "Runtime.evaluate",
                                              "params": {"expression": expression, "returnByValue": True}}))
                    while (reply := json.loads(await ws.recv())).get("id") != calls:
                        pass
                    return reply.get("result", {}).get("result", {}).get("value")

                if first:
                    await evaluate(first)
                deadline, stats = time.monotonic() + timeout, {}
                while time.monotonic() < deadline:
                    value = await evaluate("JSON.stringify(window.lipforcingStats || null)")
                    stats = json.loads(value) if value else {}
                    if stats and predicate(stats):
                        return stats
                    await asyncio.sleep(0.5)
                return stats

        return asyncio.run(poll())

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.mark.parametrize("transport", ["ws", "webrtc"])
def test_the_web_page_shows_live_frames_in_chromium(server, tmp_path, transport):
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium); the browser test needs it")
    url = f"{server.http}/?token={TOKEN}&avatar=face3&source=mic&transport={transport}&autostart=1"
    browser = Browser(url, tmp_path / "profile")
    try:
        live = browser.stats_until(lambda s: s["state"] == "live" or s["errors"], timeout=90)
        time.sleep(2.0)  # two seconds of microphone speech (a CPU makes their frames slower than real time)
        # Stop: no more speech; the server finishes the frames it owes and says "done"
        stats = browser.stats_until(lambda s: (s["done"] is not None and s["framesShown"] >= 21) or s["errors"],
                                    timeout=150, first="document.getElementById('stop').click()")
    finally:
        browser.close()
    assert live.get("errors") == [] and live.get("session"), live
    assert stats.get("errors") == [] and stats["done"] is not None, stats
    assert stats["framesShown"] >= 21, stats  # two chunks of frames arrived and were drawn in the page
    assert stats["framesReceived"] <= stats["done"] + 1, stats  # (a video element may count its last frame twice)
    if transport == "ws":
        assert stats["outOfOrder"] == 0 and stats["audioPieces"] >= 2
    assert server.wait_idle(timeout=60)["slots_in_use"] == 0  # closing the page freed the session


# --- load ------------------------------------------------------------------------------------------------------


def test_eight_sessions_at_once_get_every_frame_in_order(server, capsys):
    """Eight clients stream speech in real time at once. Every session must get all its frames, in order, with
    their speech; the p50/p95 chunk latency and FPS of each session are reported (a CPU runs them far slower
    than real time: the figures describe this machine, not the engine on a GPU)."""
    from lipforcing.bench.serve_load import LoadConfig, format_load, load_test

    report = load_test(LoadConfig(url=server.ws, token=TOKEN, avatar="face3", sessions=8, seconds=0.4))
    with capsys.disabled():
        print("\n" + format_load(report))
    if os.environ.get("LIPFORCING_LOAD_REPORT"):
        Path(os.environ["LIPFORCING_LOAD_REPORT"]).write_text(json.dumps(report, indent=2))
    assert report["all_ok"], report
    assert all(s["frames"] == s["expected_frames"] == 9 and s["audio_matches_frames"] for s in report["per_session"])
    assert report["chunk_latency_p95_s_max"] > 0
    assert server.wait_idle()["slots_in_use"] == 0


def test_bench_serve_sweeps_session_counts(server, tmp_path, capsys):
    """``bench-serve --sessions 1,2`` runs one load per count; the count reported as real time is the largest
    whose p95 chunk latency stayed within --max-latency. A CPU is far from real time, so the bounds that decide
    are the measured latencies themselves: a bound of 600 s passes every load whose latency was measured (and
    is below the load's wall time), a bound of 1 ms passes none."""
    out = tmp_path / "load.json"
    code = main(["bench-serve", "--url", server.ws, "--token", TOKEN, "--avatar", "face3", "--sessions", "1,2",
                 "--seconds", "0.4", "--max-latency", "600", "--out", str(out)])
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert code == 0 and report["all_ok"] and report["sweep"] == [1, 2], printed
    assert [load["sessions"] for load in report["loads"]] == [1, 2]
    for load in report["loads"]:  # a latency is measured, within the load's own wall time, and judged by it
        assert 0 < load["chunk_latency_p50_s_median"] <= load["chunk_latency_p95_s_max"] < load["wall_s"], load
        assert load["real_time"] == (load["chunk_latency_p95_s_max"] <= 600)
    assert report["sessions_at_real_time"] == max(load["sessions"] for load in report["loads"] if load["real_time"])
    assert "sessions in real time: 2" in printed
    strict = main(["bench-serve", "--url", server.ws, "--token", TOKEN, "--avatar", "face3", "--sessions", "1",
                   "--seconds", "0.4", "--max-latency", "0.001", "--out", str(out)])
    report = json.loads(out.read_text())
    assert strict == 0 and report["all_ok"] and not report["loads"][0]["real_time"]
    assert report["sessions_at_real_time"] == 0
    assert main(["bench-serve", "--url", server.ws, "--avatar", "face3", "--sessions", "0"]) == 2


# --- limits and shutdown (their own servers) ---------------------------------------------------------------------


def test_busy_idle_and_upload_limits(workdir, tiny_avatar_file, speech):
    avatars = workdir / "avatars-limits"
    avatars.mkdir()
    shutil.copy(tiny_avatar_file, avatars / "face3.lfa")
    server = ServerProcess(workdir, "--avatars", str(avatars), "--max-sessions", "1", "--idle-timeout", "2",
                           "--max-upload-mb", "1")

    async def scenario() -> list:
        first = await _connect(server, token=None)  # no token configured: open to loopback clients
        await first.send(json.dumps({"type": "start", "avatar": "face3"}))
        ready = await _next_text(first)
        second = await _connect(server, token=None)
        await second.send(json.dumps({"type": "start", "avatar": "face3"}))
        busy = await _next_text(second)
        third = await _connect(server, token=None)
        await third.send(json.dumps({"type": "start", "upload": "avatar", "bytes": 5 << 20}))
        too_big = await _next_text(third)
        idle = await _next_text(first, timeout=30)  # the first client says nothing more
        for ws in (first, second, third):
            await ws.close()
        return [ready, busy, too_big, idle]

    try:
        ready, busy, too_big, idle = asyncio.run(scenario())
        assert ready["type"] == "ready"
        assert busy["code"] == "busy" and "already runs 1 session" in busy["message"]
        assert too_big["code"] == "too_large"
        assert idle == {"type": "closing", "reason": "idle for 2 s"}
        assert server.wait_idle()["slots_in_use"] == 0
        result = run_client(ClientOptions(url=server.ws, avatar="face3", speech=str(speech[1]), fast=True))
        assert result.frames == 9  # the slot is free again
    finally:
        assert server.stop() == 0


def test_a_server_that_cannot_start_says_why_and_exits(server):
    """Missing weights end the process with status 2 and the list of files (not a server answering 500), and so
    does a port another server holds (before the warm-up)."""
    def serve(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "lipforcing.cli", "serve", *args], capture_output=True,
                              text=True, timeout=120)

    missing = serve("--port", str(_free_port()), "--model", "1.3b", "--device", "cpu")
    assert missing.returncode == 2 and "error: the server cannot start" in missing.stderr, missing.stderr
    assert "--ckpt (not given)" in missing.stderr and "Traceback" not in missing.stderr
    taken = serve("--port", str(server.port), *TINY_ARGS)
    assert taken.returncode == 2 and f"cannot listen on 127.0.0.1:{server.port}" in taken.stderr, taken.stderr


def test_sigterm_tells_every_session_and_leaves_no_files(workdir, tiny_avatar_file, tmp_path):
    avatars = workdir / "avatars-term"
    avatars.mkdir()
    shutil.copy(tiny_avatar_file, avatars / "face3.lfa")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    server = ServerProcess(workdir, "--avatars", str(avatars), "--token", TOKEN, "--max-sessions", "2",
                           env={"TMPDIR": str(scratch)})

    async def scenario() -> list[dict]:
        live, uploading = await _connect(server), await _connect(server)
        await live.send(json.dumps({"type": "start", "avatar": "face3"}))
        assert (await _next_text(live))["type"] == "ready"
        await live.send(protocol.encode_audio_in(np.zeros(8000, np.int16)))
        await uploading.send(json.dumps({"type": "start", "upload": "video", "bytes": 1 << 20}))
        await uploading.send(protocol.encode_upload(b"\0" * 1000))  # half-uploaded when the server stops
        deadline = time.monotonic() + 30
        while not any(scratch.rglob("*.video")):  # the upload's file exists before the signal
            assert time.monotonic() < deadline, "the upload never reached the server's folder"
            await asyncio.sleep(0.05)
        server.process.send_signal(signal.SIGTERM)
        return [await _next_text(ws) for ws in (live, uploading)]

    replies = asyncio.run(scenario())
    assert replies == [{"type": "closing", "reason": "the server is shutting down"}] * 2
    assert server.stop(timeout=60) == 0
    assert list(scratch.iterdir()) == []  # the upload and the server's scratch folder are gone


# --- Ray Serve ---------------------------------------------------------------------------------------------------


def test_ray_serve_replicas_keep_sessions_when_one_dies(workdir, tiny_avatar_file, speech):
    """Two CPU replicas: sessions spread over both; killing one mid-run leaves the other's session whole, and new
    sessions still start."""
    pytest.importorskip("ray.serve")
    avatars = workdir / "avatars-ray"
    avatars.mkdir()
    shutil.copy(tiny_avatar_file, avatars / "face3.lfa")
    ray_tmp = Path(tempfile.mkdtemp(prefix="lfray-", dir="/tmp"))  # Ray's socket paths must stay short
    server = ServerProcess(workdir, "--ray", "--replicas", "2", "--avatars", str(avatars), "--token", TOKEN,
                           env={"RAY_TMPDIR": str(ray_tmp)})
    pcm = protocol.to_pcm16(load_audio(speech[1]))  # one chunk of speech each: what is checked is who survives
    assert "2 Ray Serve replica(s) ready" in server.log.read_text() or _wait_log(server, "replica(s) ready")
    listening = _listening(server.process.pid)  # Serve's proxy, for clients: on --host only
    assert f"127.0.0.1:{server.port}" in listening and f"0.0.0.0:{server.port}" not in listening, listening

    async def session_on(exclude: set[int]):
        """A started session on a replica not in ``exclude`` (connections are spread by Ray's router)."""
        for _ in range(20):
            ws = await _connect(server)
            await ws.send(json.dumps({"type": "start", "avatar": "face3"}))
            ready = await _next_text(ws, timeout=60)
            if ready["type"] == "ready" and ready["replica"] not in exclude:
                return ws, ready["replica"]
            await ws.close()
        raise AssertionError("Ray never routed a session to a second replica")

    async def scenario():
        survivor, survivor_pid = await session_on(set())
        victim, victim_pid = await session_on({survivor_pid})
        for ws in (survivor, victim):
            await ws.send(protocol.encode_audio_in(pcm))
            await ws.send(json.dumps({"type": "end"}))
        os.kill(victim_pid, signal.SIGKILL)  # the replica dies mid-run
        frames, indices = 0, []
        while True:
            message = await asyncio.wait_for(survivor.recv(), 120)
            if isinstance(message, str):
                done = json.loads(message)
                break
            if message[0] == protocol.FRAME:
                indices.append(protocol.decode_binary(message).index)
                frames += 1
        from websockets.exceptions import ConnectionClosed

        with pytest.raises(ConnectionClosed):  # the victim's connection ends (Ray's proxy closes it), not a timeout
            while True:
                await asyncio.wait_for(victim.recv(), 60)
        return done, indices

    try:
        done, indices = asyncio.run(scenario())
        assert done == {"type": "done", "frames": 9} and indices == list(range(9))
        result = run_client(ClientOptions(url=server.ws, token=TOKEN, avatar="face3", speech=str(speech[1]),
                                          fast=True))
        assert result.frames == 9  # new sessions still start
    finally:
        assert server.stop(timeout=90) == 0, server.log.read_text()
        shutil.rmtree(ray_tmp, ignore_errors=True)
