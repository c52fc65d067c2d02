"""``lipforcing serve`` against a security review: tokens that cannot be empty, malformed input answered with
``error`` (never a dropped connection or a traceback), nothing disclosed without the token, no temporary files
left by a start that fails or is stopped, a client that uploads only avatar files, and a page that hides what it
hides. One server (tiny model, CPU, loopback) serves the checks that need one; the CLI's checks run in-process
with the server start replaced, so a check that fails cannot leave a server running."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from app.test_server import (  # the server process and its helpers, shared with test_server.py
    TINY_ARGS,
    TOKEN,
    ServerProcess,
    _connect,
    _free_port,
    _get,
    _next_text,
    _post,
    _request,
    _write_wav,
)

from lipforcing.cli import main
from lipforcing.engine.app.server import serve as serve_module
from lipforcing.engine.app.server.app import ServerOptions
from lipforcing.engine.errors import ConfigError


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("hardening")


@pytest.fixture(scope="module")
def scratch(workdir):
    """The server's TMPDIR: its temporary folder and uploads land here."""
    folder = workdir / "tmp"
    folder.mkdir()
    return folder


@pytest.fixture(scope="module")
def server(workdir, scratch):
    process = ServerProcess(workdir, "--token", TOKEN, env={"TMPDIR": str(scratch)})
    yield process
    assert process.stop() == 0, process.log.read_text()
    assert list(scratch.iterdir()) == []


# --- the token (in-process: the server start is replaced by a recorder) ------------------------------------------


@pytest.fixture
def serve(monkeypatch, capsys):
    """``lipforcing serve ARGS`` up to the server start: (exit status, stderr, the ServerOptions it would serve
    with, or None when it refused before)."""
    monkeypatch.delenv("LIPFORCING_TOKEN", raising=False)
    monkeypatch.setattr("lipforcing.engine.app.cli._check_port_free", lambda host, port: None)

    def run(*args: str) -> tuple[int, str, ServerOptions | None]:
        started = []
        monkeypatch.setattr(serve_module, "run_server", lambda options, **where: started.append(options))
        code = main(["serve", *TINY_ARGS, *args])
        return code, capsys.readouterr().err, started[0] if started else None

    return run


def _refused(result, *words: str) -> bool:
    code, err, started = result
    lines = err.strip().splitlines()
    return (code == 2 and started is None and len(lines) == 1 and lines[0].startswith("error:")
            and all(w in lines[0] for w in words))


def test_an_empty_token_is_an_error_not_an_open_server(serve, monkeypatch, tmp_path):
    """``--token "$TOKEN"`` with TOKEN unset, an empty token file or an empty $LIPFORCING_TOKEN: exit 2 before the
    warm-up, never a server without authentication."""
    blank = tmp_path / "blank"
    blank.write_text(" \n")
    assert _refused(serve("--token", ""), "--token is empty")
    assert _refused(serve("--token", "  "), "--token is empty")
    assert _refused(serve("--token-file", str(blank)), "is empty")
    assert _refused(serve("--token-file", str(tmp_path / "absent")), "--token-file")
    monkeypatch.setenv("LIPFORCING_TOKEN", "")
    assert _refused(serve(), "$LIPFORCING_TOKEN is empty")
    with pytest.raises(ConfigError):
        ServerOptions(token="")


def test_the_token_comes_from_a_file_or_the_environment(serve, monkeypatch, tmp_path):
    secret = tmp_path / "token"
    secret.write_text("from-the-file\n")
    assert serve("--token-file", str(secret))[2].token == "from-the-file"
    monkeypatch.setenv("LIPFORCING_TOKEN", "from-the-environment")
    assert serve()[2].token == "from-the-environment"
    assert serve("--token", "from-the-flag")[2].token == "from-the-flag"


def test_a_network_address_needs_a_token_or_insecure_no_auth(serve, tmp_path):
    for host in ("0.0.0.0", "::", "192.168.1.10", "example.org"):
        assert _refused(serve("--host", host), f"--host {host}", "--insecure-no-auth"), host
    for host in ("127.0.0.1", "127.0.0.5", "::1", "localhost"):
        assert serve("--host", host)[2].token is None, host
    assert serve("--host", "0.0.0.0", "--insecure-no-auth")[2].token is None
    secret = tmp_path / "token"
    secret.write_text("s3cret")
    assert serve("--host", "0.0.0.0", "--token-file", str(secret))[2].token == "s3cret"


def test_the_help_says_the_token_flag_is_visible_to_other_users(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--token-file PATH" in help_text and "process list (ps)" in help_text


# --- malformed input ----------------------------------------------------------------------------------------------

DEEP_ARRAY = "[" * 100_000 + "]" * 100_000
DEEP_OBJECT = '{"a":' * 100_000 + "1" + "}" * 100_000


def test_malformed_messages_get_an_error_and_the_connection_stays(server):
    """Values of the wrong type and JSON nested too deep for the parser: each answered ``malformed`` on the same
    connection, and the server's log has no traceback."""
    messages = [json.dumps({"type": "start", "avatar": ["face3"]}), json.dumps({"type": "start", "avatar": {"a": 1}}),
                json.dumps({"type": "start"}), DEEP_ARRAY, DEEP_OBJECT,
                json.dumps({"type": "start", "upload": "avatar", "bytes": True}),
                json.dumps({"type": "end"})]  # a message of the right shape at the wrong time: still answered

    async def scenario() -> list[dict]:
        ws = await _connect(server)
        replies = []
        for message in messages:
            await ws.send(message)
            replies.append(await _next_text(ws))
        await ws.close()
        return replies

    replies = asyncio.run(scenario())
    assert [r["code"] for r in replies] == ["malformed"] * len(messages), replies
    assert "Traceback" not in server.log.read_text()


def test_malformed_webrtc_offers_get_400_with_a_json_error(server):
    for body in ({"sdp": "v=0", "type": "offer", "avatar": ["face3"]}, {"sdp": "v=0", "type": "offer", "avatar": {}},
                 [1, 2]):
        status, answer = _post(f"{server.http}/v1/webrtc/offer", body)
        assert status == 400 and "avatar" in answer["error"], (body, status, answer)
    request = urllib.request.Request(f"{server.http}/v1/webrtc/offer", DEEP_OBJECT.encode(),
                                     {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
    status, answer = _request(request, timeout=30)
    assert status == 400 and "JSON" in answer["error"], (status, answer)
    assert "Traceback" not in server.log.read_text()


# --- disclosure ---------------------------------------------------------------------------------------------------


def test_without_the_token_the_health_check_says_only_that_it_is_ready(server):
    assert _get(f"{server.http}/healthz") == (200, {"status": "ok"})
    assert _get(f"{server.http}/healthz", "wrong") == (200, {"status": "ok"})
    status, details = _get(f"{server.http}/healthz", TOKEN)
    assert status == 200 and details["status"] == "ok" and {"replica", "engine", "avatars"} <= details.keys()
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
        assert _get(f"{server.http}{path}")[0] == 404, path


def test_a_bad_upload_is_refused_without_the_servers_paths(server, scratch):
    async def upload(kind: str) -> dict:
        ws = await _connect(server)
        await ws.send(json.dumps({"type": "start", "upload": kind, "bytes": 64}))
        await ws.send(bytes([0x02]) + b"not an avatar, not a video".ljust(64, b"."))
        reply = await _next_text(ws)
        await ws.close()
        return reply

    for kind in ("avatar", "video"):
        reply = asyncio.run(upload(kind))
        assert reply["code"] == "bad_upload" and f"the uploaded {kind}" in reply["message"], reply
        assert str(scratch) not in reply["message"] and "lipforcing-serve-" not in reply["message"], reply
        assert not re.search(r"[0-9a-f]{12}\.(lfa|video)", reply["message"]), reply  # the upload's file name


# --- the page -----------------------------------------------------------------------------------------------------


def test_the_page_hides_elements_marked_hidden(server):
    """The page's ``label {display: flex}`` outranks the browser's ``[hidden] {display: none}``: without its own
    rule the File picker shows with the microphone chosen."""
    with urllib.request.urlopen(f"{server.http}/", timeout=10) as response:
        page = response.read().decode()
    assert re.search(r"\[hidden\]\s*\{\s*display:\s*none\s*!important;?\s*\}", page)
    assert '<label id="file-label" hidden>' in page


# --- start-up leaks (their own processes) -------------------------------------------------------------------------


def _serve_process(*args: str, scratch: Path, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "lipforcing.cli", "serve", "--port", str(_free_port()),
                                 *TINY_ARGS, *args], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "TMPDIR": str(scratch)})


def test_a_server_that_cannot_start_leaves_no_temporary_folder(tmp_path):
    avatars, scratch = tmp_path / "avatars", tmp_path / "tmp"
    avatars.mkdir()
    scratch.mkdir()
    (avatars / "broken.lfa").write_bytes(b"not an avatar")
    process = _serve_process("--avatars", str(avatars), scratch=scratch, log=tmp_path / "log")
    assert process.wait(timeout=120) == 2
    log = (tmp_path / "log").read_text()
    assert "error: the server cannot start" in log and "broken.lfa" in log and "Traceback" not in log, log
    assert list(scratch.iterdir()) == []


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_the_warm_up_leaves_no_temporary_folder(tmp_path, sig, status):
    """The signal arrives once the server's temporary folder exists, while the engine warms up."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    process = _serve_process(scratch=scratch, log=tmp_path / "log")
    deadline = time.monotonic() + 120
    while not any(scratch.iterdir()):
        assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()
        time.sleep(0.01)
    process.send_signal(sig)
    code = process.wait(timeout=120)
    log = (tmp_path / "log").read_text()
    if "ready (" in log:
        pytest.skip("the warm-up finished before the signal arrived")
    assert code == status, log
    assert list(scratch.iterdir()) == []


# --- the reference client -----------------------------------------------------------------------------------------


def test_the_client_uploads_only_avatar_files(tmp_path, capsys):
    """A local path that is not a prepared .lfa file is refused before connecting (it used to be uploaded: any
    file, /etc/passwd included); a bare name is the name of an avatar on the server."""
    speech = _write_wav(tmp_path / "speech.wav", 0.1 * np.sin(np.arange(1600) / 5))
    notes = tmp_path / "notes.txt"
    notes.write_text("private")
    fake = tmp_path / "fake.lfa"
    fake.write_text("private")
    url = f"ws://127.0.0.1:{_free_port()}"  # nobody listens: reaching the connection means the avatar passed

    def client(avatar: str) -> tuple[int, str]:
        out = str(tmp_path / "out.mp4")
        code = main(["client", "--url", url, "--avatar", avatar, "--speech", str(speech), "-o", out])
        return code, capsys.readouterr().err

    for path in ("../../etc/passwd", "/etc/passwd", str(notes), "./face3"):
        code, err = client(path)
        assert code == 2 and "a local avatar must be a prepared .lfa file" in err and "cannot reach" not in err, err
    code, err = client(str(fake))
    assert code == 2 and "not a prepared avatar file" in err and "cannot reach" not in err, err
    code, err = client(str(tmp_path / "absent.lfa"))
    assert code == 2 and "no such file" in err, err
    code, err = client("face3")
    assert code == 2 and "cannot reach" in err, err


# --- sessions per engine ------------------------------------------------------------------------------------------


def test_sessions_per_engine_default_to_one_on_a_cpu_and_say_so(serve, caplog):
    code, _, options = serve()
    assert code == 0 and options.run_config.max_sessions == 1
    assert "1 session(s) per engine (on a CPU; --max-sessions sets it)" in caplog.text, caplog.text
    caplog.clear()
    code, _, options = serve("--max-sessions", "3")
    assert code == 0 and options.run_config.max_sessions == 3 and "per engine" not in caplog.text


def test_sessions_per_engine_on_a_gpu_are_what_the_memory_plan_fits(monkeypatch):
    """One session's plan, then each more, in 90% of the free memory, at most eight (the plan itself is
    ``lipforcing info --memory``'s, tested with the tools)."""
    from lipforcing.engine.app.engine import RunConfig
    from lipforcing.engine.app.server.serve import default_sessions

    asked = []

    def plan(cfg, stream, **kwargs):
        asked.append((cfg.num_layers, stream.latent_h, kwargs))
        return {"total_bytes": 10 << 30, "per_session_bytes": 2 << 30}

    monkeypatch.setattr("lipforcing.engine.tools.memory.memory_plan", plan)
    gpu = RunConfig(model="tiny", device="cuda", dtype="bf16", encoder="taehv")
    assert default_sessions(gpu, free_bytes=20 << 30)[0] == 5  # 18 GiB: 10 + 4 x 2
    assert default_sessions(gpu, free_bytes=10 << 30)[0] == 1  # not even one fits: one, as asked before
    assert default_sessions(gpu, free_bytes=200 << 30)[0] == 8
    sessions, why = default_sessions(gpu, free_bytes=20 << 30)
    assert "10.0 GiB for one session, 2.00 GiB each more, 20.0 GiB free" in why
    assert asked[0][1] == 32 and asked[0][2]["avatar"] and asked[0][2]["encoder"] == "taehv"  # tiny: 256x256 crops
    assert default_sessions(RunConfig(model="tiny", device="cuda", scheduler="reference"))[0] == 1
    assert len(asked) == 4  # (the reference scheduler never asks the plan)
