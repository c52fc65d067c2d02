"""The C ABI gives the Python session's frames: lipforcing_host (the C example host, CPython embedded) on raw
frames and speech against ``LipSync`` on the same input, frame for frame. Needs the native build (``make
native``; ``make test`` builds it first)."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest

from conftest import REPO_ROOT

from .conftest import TINY

HOST = REPO_ROOT / os.environ.get("LIPFORCING_BUILD", "build") / "lipforcing_host"


def test_the_c_host_gives_the_python_sessions_frames(shared_dir, tmp_path):
    if not HOST.is_file():
        pytest.skip(f"the native build is absent ({HOST}): run `make native`")
    import cv2

    from lipforcing.engine.app.engine import RunConfig, build_engine
    from lipforcing.engine.media.io import load_audio, read_frames

    clip = shared_dir / "assets/clips/face3.mp4"
    frames = np.stack([cv2.resize(f, (320, 320), interpolation=cv2.INTER_AREA) for f in read_frames(clip, 9)])
    speech = load_audio(clip)[: 9 * 640].astype(np.float32)  # one chunk
    (tmp_path / "speech.f32").write_bytes(speech.tobytes())
    done = subprocess.run([str(HOST), "--model", "tiny", "--device", "cpu", "--encoder", "taehv", "--width", "320",
                           "--height", "320", "--speech", str(tmp_path / "speech.f32")], input=frames.tobytes(),
                          capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode()
    from_c = np.frombuffer(done.stdout, np.uint8).reshape(-1, 320, 320, 3)

    engine = build_engine(RunConfig(**TINY))
    with engine.session(speech) as session:
        from_python = [out for frame in frames for out in session.push(frame)]
        from_python += session.close()
    assert len(from_c) == len(from_python) == 9
    assert np.array_equal(from_c, np.stack(from_python))
    assert b"9 frames in, 9 frames out" in done.stderr


def test_the_embedded_interpreters_output_reaches_the_sink_line_by_line():
    from lipforcing.engine.app.native import LineSink

    lines: list[tuple[int, str]] = []
    stream = LineSink(lambda level, line: lines.append((level, line)), 1)
    assert stream.write("import note\nhalf") == len("import note\nhalf")
    stream.write(" a line\n\n")
    assert lines == [(1, "import note"), (1, "half a line"), (1, "")]
    print("no newline", end="", file=stream)
    stream.flush()
    stream.flush()  # nothing pending: nothing more
    assert lines[3:] == [(1, "no newline")]
