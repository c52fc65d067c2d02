"""Prepared avatars: aligned and encoded once, equal to the unprepared path, looping for any speech length."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("av")
pytest.importorskip("mediapipe")
pytest.importorskip("transformers")

from conftest import gather_first_chunks, in_threads  # noqa: E402
from lipforcing.cli import main  # noqa: E402
from lipforcing.engine.app.avatar import Avatar, latent_period, prepare_avatar  # noqa: E402
from lipforcing.engine.app.demo import synth_speech  # noqa: E402
from lipforcing.engine.app.engine import Engine, RunConfig, load_networks  # noqa: E402
from lipforcing.engine.errors import ConfigError, MediaError, NoFaceError  # noqa: E402
from lipforcing.engine.media.io import VideoReader, VideoWriter, probe, read_frames  # noqa: E402
from lipforcing.engine.media.length import clip_length_from_samples  # noqa: E402

TINY = dict(model="tiny", device="cpu", dtype="fp32", encoder="taehv")
TINY_ARGS = ["--model", "tiny", "--device", "cpu", "--dtype", "fp32", "--encoder", "taehv", "--quiet"]


@pytest.fixture(scope="module")
def networks():
    return load_networks(RunConfig(**TINY))


@pytest.fixture(scope="module")
def avatar(tiny_avatar_file):
    return Avatar.load(tiny_avatar_file), tiny_avatar_file


def _frames_of(session, frames=None):
    out = []
    for f in frames or []:
        out += session.push(f)
    while session.frames_needed and session.frames_out < session.frames_needed and session.avatar is not None:
        out += session.pop(timeout=1)
    return out + session.close()


def test_prepared_equals_unprepared_for_the_same_frames(networks, short_video, avatar):
    avatar, _ = avatar
    speech = synth_speech(0.9)  # N = 21 frames, inside the 25-frame video
    engine = Engine(RunConfig(**TINY), networks)
    plain = _frames_of(engine.session(speech), list(read_frames(short_video, 21)))
    for pipeline in ("sequential", "streams"):
        engine = Engine(RunConfig(**TINY, pipeline=pipeline), networks)
        session = engine.session(speech, avatar=avatar, timing=True)
        prepared = _frames_of(session)
        assert len(prepared) == len(plain) == 21
        assert all(np.array_equal(a, b) for a, b in zip(prepared, plain)), pipeline
        stages = session.summary()["stage_seconds"]
        assert "encode" not in stages and "face alignment" not in stages  # skipped: done once, in prepare


def test_the_avatar_loops_forward_and_back(networks, avatar):
    avatar, _ = avatar
    n = avatar.n_frames
    assert [avatar.source(i) for i in (0, n - 1, n, 2 * n - 2, 2 * n - 1)] == [0, n - 1, n - 2, 0, 1]
    period = latent_period(n)
    stored = avatar.masked_latents.shape[2]
    assert period == 12 and stored >= period + 3  # 25 frames: ping-pong period 48 frames = 12 latents
    assert [avatar.latent_index(k) for k in (5, stored, stored + period)] == \
        [5, stored - period, stored - period]
    speech = synth_speech(3.0)  # N = 69 frames: almost three times the video
    session = Engine(RunConfig(**TINY), networks).session(speech, avatar=avatar)
    out = _frames_of(session)
    assert len(out) == clip_length_from_samples(speech.size).frames == 69
    assert out[0].shape == avatar.frame(0).shape


def test_an_idle_live_avatar_keeps_playing_on_silence(networks, avatar):
    avatar, _ = avatar
    session = Engine(RunConfig(**TINY), networks).session(avatar=avatar, lookahead=0.0)
    t0 = 1000.0
    assert session.keep_alive(now=t0) == []
    out = []
    for step in range(1, 16):  # 1.5 s of wall clock without speech
        out += session.keep_alive(now=t0 + 0.1 * step)
    out += session.close()
    assert len(out) >= 21  # the avatar kept moving on silence


def test_a_stall_of_a_48khz_speaker_is_filled_with_silence(networks, avatar):
    """A WebRTC speaker sends 48 kHz; when it stalls, the silence filled in must not break the session's rate."""
    import time

    avatar, _ = avatar
    session = Engine(RunConfig(**TINY), networks).session(avatar=avatar, lookahead=0.0)
    speech = synth_speech(0.4)
    at48k = np.interp(np.arange(speech.size * 3) / 3, np.arange(speech.size), speech).astype(np.float32)
    out = session.push_audio(at48k, 48000)
    out += session.keep_alive(now=time.monotonic() + 0.6)  # the speaker stalls: 0.6 s of silence
    filled = session._speech.samples
    assert filled >= int(1.0 * 16000) - 640
    out += session.push_audio(at48k[:4800], 48000)  # and speaks again, at its own rate
    out += session.end_audio()
    out += _frames_of(session)
    assert len(out) == clip_length_from_samples(session._speech.samples).frames


def test_file_format_errors(avatar, tmp_path, networks):
    _, path = avatar
    data = path.read_bytes()
    truncated = tmp_path / "truncated.lfa"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError, match="truncated"):
        Avatar.load(truncated)
    with pytest.raises(MediaError, match="no such avatar"):
        Avatar.load(tmp_path / "absent.lfa")
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    future = tmp_path / "future.lfa"
    save_file(tensors, str(future), metadata={**meta, "version": "2"})
    with pytest.raises(MediaError, match="version 2"):
        Avatar.load(future)
    foreign = tmp_path / "foreign.lfa"
    save_file({"x": torch.zeros(1)}, str(foreign), metadata={"format": "something-else"})
    with pytest.raises(MediaError, match="not a lipforcing avatar"):
        Avatar.load(foreign)
    loaded = Avatar.load(path)
    other_mask = Engine(RunConfig(**TINY), networks)
    other_mask.keep_mask = other_mask.keep_mask.flip(0)
    with pytest.raises(ConfigError, match="mouth mask"):
        loaded.check_engine(other_mask)
    loaded.config["encoder_sha256"] = "0" * 64
    with pytest.raises(ConfigError, match="encoder weights"):
        loaded.check_engine(Engine(RunConfig(**TINY), networks))


def test_a_video_without_a_face_everywhere_is_refused(networks, tmp_path):
    path = tmp_path / "blank.mp4"
    with VideoWriter(path, 64, 48) as writer:
        for i in range(5):
            writer.write(np.full((48, 64, 3), 50 + i, np.uint8))
    with pytest.raises(NoFaceError, match="frame 0"):
        prepare_avatar(path, Engine(RunConfig(**TINY), networks), progress=False)


def test_prepare_and_run_from_the_command_line(short_video, tmp_path, capsys):
    lfa = tmp_path / "cli.lfa"
    assert main(["prepare-avatar", str(short_video), "-o", str(lfa), *TINY_ARGS]) == 0
    assert "wrote" in capsys.readouterr().out and lfa.is_file()
    speech = tmp_path / "speech.wav"
    import wave

    # 33 output frames (chunks 0, 1 and one steady-state chunk): longer than the 25-frame video, which loops back
    pcm = (synth_speech(1.4) * 32767).astype("<i2")
    with wave.open(str(speech), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm.tobytes())
    out, report = tmp_path / "out.mp4", tmp_path / "r.json"
    assert main(["run", "--avatar", str(lfa), "--audio", str(speech), "-o", str(out), "--report", str(report),
                 *TINY_ARGS]) == 0
    assert len(list(VideoReader(out))) == 33 and probe(out).has_audio
    assert json.loads(report.read_text())["avatar"] is True
    live = tmp_path / "live.mp4"
    assert main(["run", "--avatar", str(lfa), "--audio", str(speech), "-o", str(live), "--audio-lookahead", "0.32",
                 "--report", str(report), *TINY_ARGS]) == 0
    assert len(list(VideoReader(live))) == 33 and json.loads(report.read_text())["audio"] == "live"
    assert main(["run", "--avatar", str(lfa), "-o", str(out), *TINY_ARGS]) == 2  # an avatar needs speech
    assert main(["run", str(short_video), "--avatar", str(lfa), "-o", str(out), *TINY_ARGS]) == 2
    assert main(["prepare-avatar", str(short_video), "-o", str(tmp_path / "x.mp4"), *TINY_ARGS]) == 2


def test_sessions_share_one_engine_and_equal_themselves_alone(networks, avatar, monkeypatch):
    """Two sessions on one engine (max_sessions=2), in two threads: their student calls are batched (the first
    chunks are held until both have asked, so the threads' timing decides nothing), and each gives the frames
    it gives alone."""
    avatar, _ = avatar
    speeches = [synth_speech(1.4, seed=s) for s in (1, 2)]
    alone = [_frames_of(Engine(RunConfig(**TINY), networks).session(s, avatar=avatar)) for s in speeches]
    engine = Engine(RunConfig(**TINY, max_sessions=2, pipeline="streams"), networks)
    gather_first_chunks(engine.batcher, 2, monkeypatch)
    together = [None, None]

    def run(i):
        together[i] = _frames_of(engine.session(speeches[i], avatar=avatar))

    errors = in_threads(run, 2, timeout=300)
    assert not errors, errors
    for got, want in zip(together, alone):
        assert len(got) == len(want) == 33
        assert max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(got, want)) <= 1
    # both sessions' chunks went through the one student thread, their first chunks as one call
    assert engine.batcher.batches[0] == 2 and sum(engine.batcher.batches) == 6
    assert engine.path["max_sessions"] == 2
    with pytest.raises(ConfigError, match="max_sessions must be"):
        RunConfig(**TINY, max_sessions=0)
