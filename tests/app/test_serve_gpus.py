"""``lipforcing serve --gpus 2`` on a CPU: two gloo ranks run every session's student (sequence parallel), two
sessions at once are batched on both, and SIGTERM ends the server and its ranks with status 0. (That the ranks
give one process's x0, sessions batched or not, is tests/dit/test_parallel.py's.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import wave
from pathlib import Path

import numpy as np

from conftest import SERVER_PACKAGES, in_threads, require

require(*SERVER_PACKAGES)

from lipforcing.engine.app.server import protocol  # noqa: E402
from lipforcing.engine.app.server.client import ClientOptions, run_client  # noqa: E402
from lipforcing.engine.media.io import VideoReader, load_audio  # noqa: E402
from lipforcing.engine.runtime.ranks import free_port  # noqa: E402

TOKEN = "gpus-token"


def _stats(port: int) -> dict | None:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/stats", headers={"Authorization": f"Bearer {TOKEN}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.load(response)
    except OSError:
        return None


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (the spawned ranks and their helpers), from /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_serve_on_two_ranks_batches_two_sessions_and_stops_its_ranks(shared_dir, tiny_avatar_file, tmp_path):
    avatars = tmp_path / "avatars"
    avatars.mkdir()
    (avatars / "face3.lfa").write_bytes(tiny_avatar_file.read_bytes())
    speech = tmp_path / "speech.wav"
    with wave.open(str(speech), "wb") as w:  # 0.4 s of a shared speech clip: one chunk of 9 frames
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(protocol.to_pcm16(load_audio(shared_dir / "assets/clips/speech1.wav")[:6400]).tobytes())
    port, log = free_port(), tmp_path / "serve.log"
    command = [sys.executable, "-m", "lipforcing.cli", "serve", "--port", str(port), "--model", "tiny", "--device",
               "cpu", "--dtype", "fp32", "--encoder", "taehv", "--gpus", "2", "--max-sessions", "2",
               "--avatars", str(avatars), "--token", TOKEN]
    with open(log, "w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=os.environ, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 180
        while (stats := _stats(port)) is None or not stats["ready"]:
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        assert stats["engine"]["gpus"] == 2 and stats["max_sessions"] == 2
        ranks = _descendants(server.pid)
        assert len(ranks) >= 2, ranks  # rank 0 (the server) and rank 1 (its student's other half)

        results = {}

        def one(i: int) -> None:
            results[i] = run_client(ClientOptions(url=f"ws://127.0.0.1:{port}", token=TOKEN, avatar="face3",
                                                  speech=str(speech), output=str(tmp_path / f"out{i}.mp4")))

        assert not in_threads(one, 2, timeout=240)
        for i in range(2):
            assert results[i].frames == 9 and len(list(VideoReader(tmp_path / f"out{i}.mp4"))) == 9
            assert np.isfinite(results[i].chunk_latency_p50_s)
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=90) == 0, log.read_text()
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in ranks) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in ranks if _alive(pid)], "a rank outlived the server"
        assert "Traceback" not in log.read_text(), log.read_text()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_serve_gpus_is_refused_with_ray_and_without_enough_devices(capsys):
    from lipforcing.cli import main

    assert main(["serve", "--model", "tiny", "--device", "cpu", "--gpus", "2", "--ray"]) == 2
    assert "--gpus N runs one server on N ranks" in capsys.readouterr().err
    import torch

    have = torch.cuda.device_count()  # more ranks than CUDA devices (or none at all): said before any rank starts
    for command in ("serve", "run"):
        args = [command, *(["x.mp4", "-o", "x.mp4"] if command == "run" else ["--port", str(free_port())]),
                "--model", "tiny", "--device", "cuda", "--gpus", str(have + 1)]
        assert main(args) == 2
        err = capsys.readouterr().err
        if torch.cuda.is_available():
            assert f"--gpus {have + 1}: this machine has {have} CUDA device(s)" in err, err
        else:
            assert "--device cuda was asked for but CUDA is not available" in err, err
        assert "Traceback" not in err
