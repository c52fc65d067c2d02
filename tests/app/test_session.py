"""The session users embed: the fast path equals the plain reference path frame for frame, faceless frames
cost no model time, and worker errors reach the caller."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("av")
pytest.importorskip("mediapipe")
pytest.importorskip("transformers")

from lipforcing.engine.app.demo import moving_frames, portrait, synth_speech  # noqa: E402
from lipforcing.engine.app.engine import Engine, RunConfig, build_engine, load_networks  # noqa: E402
from lipforcing.engine.errors import ConfigError  # noqa: E402
from lipforcing.engine.media.io import load_audio, read_frames  # noqa: E402
from lipforcing.engine.media.length import clip_length_from_samples  # noqa: E402

TINY = dict(model="tiny", device="cpu", dtype="fp32", encoder="taehv")


@pytest.fixture(scope="module")
def networks():
    return load_networks(RunConfig(**TINY))


def _frames_out(engine, frames, speech) -> list[np.ndarray]:
    out = []
    with engine.session(speech) as session:
        for frame in frames:
            out += session.push(frame)
        out += session.close()
    return out


@pytest.fixture(scope="module")
def real_clip(shared_dir):
    """A shared clip's first frames and 1.3 s of its own speech (two chunks: 21 frames)."""
    path = shared_dir / "assets/clips/face3.mp4"
    speech = load_audio(path)[: int(1.3 * 16000)]
    n = clip_length_from_samples(speech.size).frames
    return list(read_frames(path, n)), speech


def test_fast_path_equals_the_reference_path_frame_for_frame(networks, real_clip):
    """fp32 on the CPU: the static scheduler, sequential and with worker threads, gives the reference path's
    frames bit for bit (face alignment, crops, both encoder streams, the student, decoding, paste-back)."""
    frames, speech = real_clip
    reference = _frames_out(Engine(RunConfig.reference(**TINY), networks), frames, speech)
    assert len(reference) == len(frames) == 21
    for changes in (dict(), dict(pipeline="streams")):
        engine = Engine(RunConfig(**TINY, **changes), networks)
        assert engine.path["scheduler"] == "static"
        got = _frames_out(engine, frames, speech)
        assert len(got) == len(reference)
        assert all(np.array_equal(a, b) for a, b in zip(got, reference)), changes
    assert any(not np.array_equal(a, b) for a, b in zip(reference, frames))  # the mouth was repainted


def test_frames_without_a_face_cost_no_model_time(networks):
    """A faceless start is passed through without running the model; the model starts at the first chunk with
    a face as a new clip (9 frames), and a frame count that ends mid-chunk is completed and cut."""
    face = moving_frames(portrait(), 30)
    blank = [np.full_like(face[0], 90) for _ in range(12)]
    frames = blank + face  # 42 frames: 9 + 3 faceless, then the face from frame 12
    speech = synth_speech(1.7)  # 42 frames -> N = 1 + 4 (L - 1) with L = 9: 33 frames
    engine = Engine(RunConfig(**TINY, pipeline="streams"), networks)
    with engine.session(speech, timing=True) as session:
        n = session.frames_needed
        out = []
        for frame in frames[:n]:
            out += session.push(frame)
        out += session.close()
        summary = session.summary()
    assert len(out) == n == 33
    assert all(np.array_equal(out[i], frames[i]) for i in range(12))  # passed through untouched
    assert any(not np.array_equal(out[i], frames[i]) for i in range(12, n))  # lip-synced
    # frames 0..8 are a faceless run (no model); frames 9..17 start the model (9..11 have no face: they borrow
    # the first face's transform for their crops and are passed through in the output)
    assert summary["frames_passed_through"] == 9
    assert summary["chunks"] == 3  # frames 9..17, 18..29, 30..32 (completed to 12 and cut)
    assert set(summary["stage_seconds"]) >= {"encode", "student", "decode", "paste-back", "face alignment"}


def test_an_all_faceless_clip_runs_no_model(networks):
    frames = [np.full((96, 128, 3), 40 + i, np.uint8) for i in range(21)]
    engine = Engine(RunConfig(**TINY), networks)
    with engine.session(synth_speech(0.9), timing=True) as session:
        out = [f for frame in frames for f in session.push(frame)] + session.close()
        summary = session.summary()
    assert len(out) == 21 and all(np.array_equal(a, b) for a, b in zip(out, frames))
    assert summary["chunks"] == 0 and "student" not in summary["stage_seconds"]


def test_worker_errors_and_misuse_reach_the_caller(networks):
    engine = Engine(RunConfig(**TINY, pipeline="streams"), networks)
    session = engine.session(synth_speech(0.9))
    with pytest.raises(ConfigError, match="already runs 1 session"):
        engine.session(synth_speech(0.9))
    with pytest.raises(ConfigError, match="np.uint8"):
        session.push(np.zeros((4, 4), np.float32))
    session.abort()
    with pytest.raises(ConfigError, match="closed"):
        session.push(np.zeros((8, 8, 3), np.uint8))
    # a failure inside a worker thread (here: the device stage) is raised by the next call, not swallowed
    session = engine.session(synth_speech(0.9))

    def broken(*args, **kwargs):
        raise RuntimeError("device stage exploded")

    engine.pipeline.submit = broken
    with pytest.raises(RuntimeError, match="device stage exploded"):
        for frame in moving_frames(portrait(), 21):
            session.push(frame)
        session.close()
    assert not engine.busy  # the failed session released the engine


def test_build_engine_reports_the_path():
    engine = build_engine(RunConfig(**TINY))
    assert engine.path == {
        "scheduler": "static", "pipeline": "sequential", "device_streams": False, "cuda_graphs": False,
        "attention": "reference", "compile": False, "encoder": "taehv", "decoder": "taehv", "decoder_backend": "torch",
        "device": "cpu", "model": "tiny", "dtype": "fp32", "kv_cache": "float32", "max_sessions": 1, "gpus": 1,
        "face": "mediapipe",
    }
    assert engine.warm_up() == 0.0  # nothing to tune or capture on a CPU without torch.compile
