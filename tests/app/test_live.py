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


def test_a_live_session_that_nobody_reads_holds_a_bounded_output_and_stops_taking_speech():
    """The server's live session over a session that makes every frame its speech allows at once: when nothing takes its
    output, at most ``MAX_OUTPUTS_WAITING`` chunks wait, the worker waits too, and ``wait_room`` holds the
    speech once ``MAX_SPEECH_AHEAD_S`` seconds of it wait; taking the output lets both go on."""
    import asyncio

    from lipforcing.engine.app.server import live as live_module

    class Session:
        frames_out, frames_needed = 0, None

        def push_audio(self, samples, rate):
            return [np.zeros((4, 6, 3), np.uint8)] * round(samples.size / rate * 25)  # every frame it can make

        def keep_alive(self, slack):
            return []

        def speech_for_frames(self, first, count):
            return np.zeros(640 * count, np.float32)

        def abort(self):
            pass

    class Engine:
        def session(self, **kwargs):
            return Session()

    class Avatar:
        config = {"frame_hw": (4, 6)}

    async def scenario():
        live = live_module.LiveSession(Engine(), Avatar(), loop=asyncio.get_running_loop(), lookahead=0.32,
                                       jpeg_quality=None)
        second = np.zeros(16000, np.int16)
        pushed = 0
        while live.has_room() and pushed < 100:
            live.push_audio(second)
            pushed += 1
            await asyncio.sleep(0.05)  # the worker turns it into a chunk, or waits for the output to be taken
        await asyncio.sleep(0.3)
        waiting, held = live._outputs.qsize(), not live.has_room()
        room = asyncio.ensure_future(live.wait_room())
        await asyncio.sleep(0.2)
        blocked = not room.done()
        outputs = live.outputs()
        for _ in range(waiting):
            await outputs.__anext__()  # the output is taken: the worker goes on, the speech has room again
        await asyncio.wait_for(room, 10)
        live.close()

        async def drain():
            async for _ in outputs:  # until the worker says "closed": it ends before the loop does
                pass

        await asyncio.wait_for(drain(), 10)
        return pushed, waiting, held, blocked

    pushed, waiting, held, blocked = asyncio.run(scenario())
    assert waiting == live_module.MAX_OUTPUTS_WAITING and held and blocked, (pushed, waiting)
    assert pushed <= 16  # the speech stopped being taken: 4 s handed over (waiting), 10 s ahead, at most
