"""``lipforcing serve`` against a security review: tokens that cannot be empty, malformed input answered with
``error`` (never a dropped connection or a traceback), nothing disclosed without the token, no temporary files
left by a start that fails or is stopped, a client that uploads only avatar files, and a page that hides what it
hides. One server (tiny model, CPU, loopback) serves the checks that need one; the CLI's checks run in-process
with the server start replaced, so a check that fails cannot leave a server running."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import pytest
from app.test_server import (  # the server process and its helpers, shared with test_server.py
    TOKEN,
    ServerProcess,
    _connect,
    _next_text,
    _post,
    _request,
)


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
