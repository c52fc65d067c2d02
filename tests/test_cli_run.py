"""``lipforcing run`` / ``demo`` end to end with the tiny model (random weights) on real clips."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import wave

import numpy as np
import pytest

pytest.importorskip("av")
pytest.importorskip("mediapipe")
pytest.importorskip("transformers")

from lipforcing.engine.cli import main  # noqa: E402
from lipforcing.engine.face import FaceAligner  # noqa: E402
from lipforcing.engine.media import VideoReader, clip_length_from_samples, load_audio, probe  # noqa: E402
from lipforcing.engine.paste_back import footprint_box  # noqa: E402

TINY = ["--model", "tiny", "--device", "cpu", "--dtype", "fp32", "--encoder", "taehv", "--quiet"]


def _write_wav(path, audio: np.ndarray, rate: int = 16000) -> None:
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def short_speech(shared_dir, tmp_path_factory):
    """1.3 s of real speech (two chunks of output) to keep the CPU runs short."""
    speech = load_audio(shared_dir / "assets/clips/speech1.wav")[: int(1.3 * 16000)]
    path = tmp_path_factory.mktemp("audio") / "speech_1s3.wav"
    _write_wav(path, speech)
    return path, speech


@pytest.mark.parametrize("clip", ["face1.mp4", "face2.mp4", "face3.mp4", "face4.mp4", "face5.mp4"])
def test_run_on_real_clips(shared_dir, short_speech, tmp_path, clip):
    src = shared_dir / "assets/clips" / clip
    audio_path, speech = short_speech
    out = tmp_path / "out.mp4"
    assert main(["run", str(src), "--audio", str(audio_path), "-o", str(out), *TINY]) == 0
    info, src_info = probe(out), probe(src)
    n = clip_length_from_samples(speech.size).frames
    assert info.has_audio and info.audio_codec == "aac"
    assert info.video_codec == "h264" and info.fps == 25.0
    assert (info.width, info.height) == (src_info.width - src_info.width % 2, src_info.height - src_info.height % 2)
    out_frames = list(VideoReader(out))
    assert len(out_frames) == n
    assert abs(info.duration_s - n / 25) < 0.1
    # pixels outside the pasted face region are unchanged (up to H.264 re-encoding)
    aligner = FaceAligner()
    src_frames = list(VideoReader(src, max_frames=n))
    for i in (0, n // 2, n - 1):
        face = aligner.align(src_frames[i])
        assert face is not None
        x0, y0, x1, y1 = footprint_box(face.inverse[None], src_frames[i].shape[:2])
        keep = np.ones(out_frames[i].shape[:2], bool)
        keep[y0:y1, x0:x1] = False
        h, w = out_frames[i].shape[:2]
        assert keep.mean() > 0.2
        assert _psnr(out_frames[i][keep], src_frames[i][:h, :w][keep]) >= 40.0
        inside = ~keep
        assert _psnr(out_frames[i][inside], src_frames[i][:h, :w][inside]) < 40.0  # the mouth was repainted


def test_run_with_the_videos_own_audio(shared_dir, tmp_path):
    """No --audio: the clip's own track drives it and is muxed (a 1.3 s cut of a real clip, 30 fps source)."""
    from lipforcing.engine.media import VideoWriter

    full = shared_dir / "assets/clips/face4.mp4"
    src = tmp_path / "cut.mp4"
    info = probe(full)
    with VideoWriter(src, info.width, info.height, audio=load_audio(full)[: int(1.3 * 16000)]) as w:
        for frame in VideoReader(full, max_frames=33):
            w.write(frame)
    out = tmp_path / "own.mp4"
    assert main(["run", str(src), "-o", str(out), *TINY]) == 0
    n = clip_length_from_samples(load_audio(src).size).frames
    assert probe(out).has_audio and len(list(VideoReader(out))) == n


def test_demo_writes_mp4_and_timing(tmp_path, capsys):
    out = tmp_path / "demo.mp4"
    assert main(["demo", "-o", str(out), "--seconds", "1.0", "--quiet"]) == 0
    info = probe(out)
    assert info.has_video and info.has_audio and info.fps == 25.0
    timing = json.loads(out.with_suffix(".timing.json").read_text())
    assert timing["frames"] == 21 and timing["faces_found"] > 0
    assert {"encode", "student", "decode", "paste-back"} <= set(timing["stage_seconds"])
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("case,needle", [("missing", "does not exist"), ("garbage", "cannot read")])
def test_bad_video_is_a_clear_error(tmp_path, capsys, case, needle):
    src = tmp_path / f"{case}.mp4"
    if case == "garbage":
        src.write_bytes(b"\x00garbage" * 100)
    out = tmp_path / "out.mp4"
    assert main(["run", str(src), "-o", str(out), *TINY]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and needle in err and "Traceback" not in err
    assert not out.exists()


def test_audio_only_input_and_short_audio(shared_dir, tmp_path, capsys):
    out = tmp_path / "out.mp4"
    speech = shared_dir / "assets/clips/speech1.wav"
    assert main(["run", str(speech), "-o", str(out), *TINY]) == 2
    assert "no video stream" in capsys.readouterr().err
    short = tmp_path / "short.wav"
    _write_wav(short, np.zeros(1600, np.float32) + 0.01)
    assert main(["run", str(shared_dir / "assets/clips/face1.mp4"), "--audio", str(short), "-o", str(out),
                 *TINY]) == 2
    assert "too short" in capsys.readouterr().err
    empty = tmp_path / "empty.wav"
    _write_wav(empty, np.zeros(0, np.float32))
    assert main(["run", str(shared_dir / "assets/clips/face1.mp4"), "--audio", str(empty), "-o", str(out),
                 *TINY]) == 2
    assert "error:" in capsys.readouterr().err
    assert not out.exists()


def test_no_face_passes_through_or_fails_with_require_face(tmp_path, capsys):
    from lipforcing.engine.media import VideoWriter

    src = tmp_path / "noface.mp4"
    rng = np.random.default_rng(0)
    speech = (0.1 * rng.standard_normal(16000)).astype(np.float32)
    with VideoWriter(src, 160, 120, audio=speech) as w:
        for i in range(25):
            w.write(np.full((120, 160, 3), 90 + i, np.uint8))
    out = tmp_path / "out.mp4"
    assert main(["run", str(src), "-o", str(out), *TINY]) == 0
    frames_in, frames_out = list(VideoReader(src)), list(VideoReader(out))
    assert len(frames_out) == clip_length_from_samples(16000).frames
    assert _psnr(frames_out[3], frames_in[3]) > 40
    out2 = tmp_path / "out2.mp4"
    assert main(["run", str(src), "-o", str(out2), "--require-face", *TINY]) == 2
    assert "no face" in capsys.readouterr().err and not out2.exists()


def test_missing_weights_list_every_file(tmp_path, capsys, shared_dir):
    out = tmp_path / "out.mp4"
    assert main(["run", str(shared_dir / "assets/clips/face1.mp4"), "-o", str(out), "--model", "14b"]) == 2
    err = capsys.readouterr().err
    for flag in ("--ckpt", "--vae", "--taehv", "--wav2vec", "--text-embeds"):
        assert flag in err
    assert "lipforcing_14b.pth" in err and "Wan2.1_VAE.pth" in err and "taew2_1.pth" in err


def test_interrupted_run_leaves_a_valid_file_or_none(shared_dir, tmp_path):
    out = tmp_path / "interrupted.mp4"
    cmd = [sys.executable, "-m", "lipforcing.engine.cli", "run", str(shared_dir / "assets/clips/face2.mp4"), "-o",
           str(out), *TINY]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ})
    deadline = 120
    import time

    start = time.time()
    while time.time() - start < deadline:  # wait until frames are being written, then interrupt
        if list(tmp_path.glob(".interrupted.*.partial.mp4")) and time.time() - start > 20:
            break
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    leftovers = list(tmp_path.glob("*.partial*"))
    assert not leftovers
    if out.exists():
        info = probe(out)
        assert info.has_video and len(list(VideoReader(out))) > 0
