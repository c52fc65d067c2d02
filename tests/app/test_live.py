"""Live sessions: speech pushed as it is spoken, chunks released once their look-ahead has arrived."""

from __future__ import annotations

import time

import numpy as np
import pytest

pytest.importorskip("av")
pytest.importorskip("mediapipe")
pytest.importorskip("transformers")

from lipforcing.engine.app.demo import moving_frames, portrait, synth_speech  # noqa: E402
from lipforcing.engine.app.engine import Engine, RunConfig, load_networks  # noqa: E402
from lipforcing.engine.errors import ConfigError  # noqa: E402
from lipforcing.engine.media.length import chunk_frame_range  # noqa: E402

TINY = dict(model="tiny", device="cpu", dtype="fp32", encoder="taehv")


@pytest.fixture(scope="module")
def networks():
    return load_networks(RunConfig(**TINY))


@pytest.fixture(scope="module")
def clip():
    speech = synth_speech(1.3)  # 32 frames -> N = 21 (two chunks)
    return moving_frames(portrait(), 21), speech


def _run(engine, frames, speech, **session):
    out = []
    with engine.session(speech, **session) as s:
        for f in frames:
            out += s.push(f)
        out += s.close()
    return out


@pytest.mark.parametrize("pipeline", ["sequential", "streams"])
def test_live_speech_releases_chunks_as_their_audio_arrives(networks, clip, pipeline):
    frames, speech = clip
    engine = Engine(RunConfig(**TINY, pipeline=pipeline), networks)
    session = engine.session(lookahead=0.32)
    assert session.live and session.frames_needed is None
    first, second = chunk_frame_range(0).stop, chunk_frame_range(1).stop
    out = []
    for f in frames:
        out += session.push(f)
    assert not session._audio_ready(first) and session.pop() == []  # frames are in, speech is not: nothing runs
    first_chunk_audio = (9 + 8) * 640  # 9 frames + 0.32 s look-ahead
    out += session.push_audio(speech[: first_chunk_audio - 640])
    assert not session._audio_ready(first) and out + session.pop() == []  # one frame of look-ahead short
    out += session.push_audio(speech[first_chunk_audio - 640 : first_chunk_audio])
    assert session._audio_ready(first) and not session._audio_ready(second)
    deadline = time.monotonic() + 120
    while len(out) < 9 and time.monotonic() < deadline:
        out += session.pop(timeout=1)
    assert len(out) == 9 and session.pop() == []  # the first chunk, and only it (the second lacks its speech)
    out += session.push_audio(speech[first_chunk_audio:])
    out += session.end_audio()
    assert session.frames_needed == 21
    out += session.close()
    assert len(out) == 21


def test_live_mode_with_a_window_over_the_whole_clip_equals_the_file_mode(networks, clip):
    """With a window as long as the clip every chunk sees the whole speech: the same frames as the file mode
    (whole-clip features, the default for files, unchanged)."""
    frames, speech = clip
    engine = Engine(RunConfig(**TINY), networks)
    whole = _run(engine, frames, speech)
    live = _run(engine, frames, speech, lookahead=10.0, context=10.0)
    assert len(live) == len(whole) == 21
    assert max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(live, whole)) <= 1
    short = _run(engine, frames, speech, lookahead=0.0, context=0.5)
    assert any(not np.array_equal(a, b) for a, b in zip(short, whole))  # a short window does change the mouth


def test_speech_at_any_rate_and_misuse(networks, clip):
    frames, speech = clip
    engine = Engine(RunConfig(**TINY), networks)
    import av  # noqa: F401  (the resampler)

    rate = 44100
    resampled = np.interp(np.arange(int(speech.size * rate / 16000)) * 16000 / rate, np.arange(speech.size), speech)
    with engine.session(resampled.astype(np.float32), sample_rate=rate) as s:
        assert s.frames_needed == 21
        s.abort()
    session = engine.session(speech)
    with pytest.raises(ConfigError, match="complete"):
        session.push_audio(speech)
    session.abort()
    with pytest.raises(ConfigError, match="closed"):
        session.push(frames[0])
