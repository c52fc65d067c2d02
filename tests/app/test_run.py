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

from lipforcing.cli import main  # noqa: E402
from lipforcing.engine.app.engine import RunConfig, build_engine  # noqa: E402
from lipforcing.engine.app.run import run_video  # noqa: E402
from lipforcing.engine.errors import NoFaceError  # noqa: E402
from lipforcing.engine.media.face import FaceAligner  # noqa: E402
from lipforcing.engine.media.io import VideoReader, load_audio, probe  # noqa: E402
from lipforcing.engine.media.length import clip_length_from_samples  # noqa: E402
from lipforcing.engine.media.paste_back import footprint_box  # noqa: E402

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
    from lipforcing.engine.media.io import VideoWriter

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
    """A clip without a face: the cheap detection pass decides before any model work. The output is the input
    with the speech (no chunk run), or, with --require-face, an error and no file."""
    from lipforcing.engine.media.io import VideoWriter

    src = tmp_path / "noface.mp4"
    rng = np.random.default_rng(0)
    speech = (0.1 * rng.standard_normal(16000)).astype(np.float32)
    with VideoWriter(src, 160, 120, audio=speech) as w:
        for i in range(25):
            w.write(np.full((120, 160, 3), 90 + i, np.uint8))
    out, report = tmp_path / "out.mp4", tmp_path / "r.json"
    assert main(["run", str(src), "-o", str(out), "--report", str(report), *TINY]) == 0
    frames_in, frames_out = list(VideoReader(src)), list(VideoReader(out))
    n = clip_length_from_samples(16000).frames
    assert len(frames_out) == n
    assert _psnr(frames_out[3], frames_in[3]) > 40
    summary = json.loads(report.read_text())
    assert summary["chunks"] == 0 and summary["frames_passed_through"] == n
    out2 = tmp_path / "out2.mp4"
    assert main(["run", str(src), "-o", str(out2), "--require-face", *TINY]) == 2
    assert "no face" in capsys.readouterr().err and not out2.exists()
    engine = build_engine(RunConfig(model="tiny", device="cpu", dtype="fp32", encoder="taehv", require_face=True))
    engine.pipeline.submit = lambda *a, **k: pytest.fail("the model ran on a faceless clip")
    with pytest.raises(NoFaceError, match="no face"):
        run_video(src, None, out2, engine, progress=False)


@pytest.fixture(scope="module")
def default_run(shared_dir, short_speech, tmp_path_factory):
    """``lipforcing run`` on face5 with the short speech, every option at its default, with --timing and a report:
    (argv, output video, report, stdout)."""
    import contextlib
    import io

    folder = tmp_path_factory.mktemp("default_run")
    out, report = folder / "default.mp4", folder / "default.json"
    args = ["run", str(shared_dir / "assets/clips/face5.mp4"), "--audio", str(short_speech[0]), "-o", str(out),
            "--report", str(report), "--timing", *TINY]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(args) == 0
    return args, out, report, stdout.getvalue()


def test_report_names_the_path_that_ran(default_run, short_speech):
    args, _, report, stdout = default_run
    summary = json.loads(report.read_text())
    n = clip_length_from_samples(short_speech[1].size).frames
    assert summary["frames"] == n and summary["seconds"] > 0 and summary["fps"] > 0
    assert summary["path"] == {
        "scheduler": "static", "pipeline": "sequential", "device_streams": False, "cuda_graphs": False,
        "attention": "reference", "compile": False, "encoder": "taehv", "decoder": "taehv",
        "decoder_backend": "torch", "device": "cpu", "model": "tiny", "dtype": "fp32", "kv_cache": "float32",
        "max_sessions": 1, "gpus": 1, "face": "mediapipe",
    }
    assert {"face alignment", "encode", "student", "decode", "paste-back"} <= set(summary["stage_seconds"])
    assert set(summary["fields"]) >= {"fps", "path", "stage_seconds"}
    assert "static scheduler" in stdout


def test_the_default_path_writes_the_reference_paths_frames(default_run, short_speech, tmp_path):
    """``lipforcing run`` as a user runs it (the static scheduler and every default of the CPU path) writes the
    frames of the plain reference path (the sequential sampler, reference attention, PyTorch decoder), decoded
    from the two MP4s; each report names the path that ran. (Two chunks, to keep it short: the steady-state
    window is compared in tests/runtime/test_static.py.)"""
    args, default_out, default_report, _ = default_run
    out, report = tmp_path / "reference.mp4", tmp_path / "reference.json"
    assert main(args[:4] + ["-o", str(out), "--report", str(report), "--scheduler", "reference", "--pipeline",
                            "sequential", "--backend", "reference", "--decoder-backend", "torch", *TINY]) == 0
    assert json.loads(default_report.read_text())["path"]["scheduler"] == "static"
    untimed = json.loads(report.read_text())
    assert "stage_seconds" not in untimed  # timing is opt-in (the default run asked for it)
    path = untimed["path"]
    assert {k: path[k] for k in ("scheduler", "pipeline", "attention", "decoder_backend")} == \
        {"scheduler": "reference", "pipeline": "sequential", "attention": "reference", "decoder_backend": "torch"}
    fast, reference = np.stack(list(VideoReader(default_out))), np.stack(list(VideoReader(out)))
    assert len(fast) == len(reference) == clip_length_from_samples(short_speech[1].size).frames == 21
    assert np.array_equal(fast, reference)


def test_sigterm_before_the_first_frame_leaves_no_file(shared_dir, tmp_path):
    """SIGTERM while the engine warms up (no frame finished yet): exit 143, one line saying so, no output file
    and no hidden partial file."""
    out = tmp_path / "never.mp4"
    cmd = [sys.executable, "-m", "lipforcing.cli", "-v", "run", str(shared_dir / "assets/clips/face2.mp4"), "-o",
           str(out), *TINY]  # -v: the engine's start-up line says when the handlers are in place
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ})
    lines = []
    for line in iter(proc.stderr.readline, b""):
        lines.append(line)
        if line.startswith(b"lipforcing: engine "):  # built, not warmed up: the first frame is seconds away
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.communicate(timeout=120)[1]
    err = (b"".join(lines) + rest).decode()
    assert any(line.startswith(b"lipforcing: engine ") for line in lines), err
    assert proc.returncode == 143, err
    assert err.splitlines()[-1] == "terminated" and "Traceback" not in err, err
    assert not out.exists() and list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())


def test_missing_weights_list_every_file(tmp_path, capsys, shared_dir):
    out = tmp_path / "out.mp4"
    assert main(["run", str(shared_dir / "assets/clips/face1.mp4"), "-o", str(out), "--model", "14b"]) == 2
    err = capsys.readouterr().err
    for flag in ("--ckpt", "--vae", "--taehv", "--wav2vec", "--text-embeds"):
        assert flag in err
    assert "lipforcing_14b.pth" in err and "Wan2.1_VAE.pth" in err and "taew2_1.pth" in err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_leaves_a_valid_file_or_none(shared_dir, tmp_path, sig):
    """Ctrl-C and SIGTERM (service managers, docker stop) both leave a valid MP4 of the frames written so far
    and no hidden partial file; the console shows no native log lines."""
    import re
    import threading
    import time

    out = tmp_path / "interrupted.mp4"
    cmd = [sys.executable, "-m", "lipforcing.cli", "run", str(shared_dir / "assets/clips/face2.mp4"), "-o",
           str(out), *[a for a in TINY if a != "--quiet"]]  # the progress bar says when frames are out
    # a shell's background job starts with SIGINT ignored, and Python then keeps it ignored: give the run the
    # default disposition, as a terminal would
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    chunks: list[bytes] = []
    written = threading.Event()

    def watch() -> None:  # the progress bar's "done/total" counts finished frames handed to the writer
        for piece in iter(lambda: proc.stderr.read1(4096), b""):
            chunks.append(piece)
            counts = [int(n) for n in re.findall(rb"(\d+)/\d+ \[", b"".join(chunks[-4:]))]
            if counts and max(counts) >= 9:
                written.set()

    reader = threading.Thread(target=watch, daemon=True)
    reader.start()
    start = time.time()
    while time.time() - start < 600 and not written.is_set() and proc.poll() is None:
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    assert written.is_set(), "no frame was finished within 600 s"
    proc.send_signal(sig)
    proc.wait(timeout=120)
    reader.join(timeout=10)
    err = b"".join(chunks)
    assert proc.returncode == (130 if sig == signal.SIGINT else 143), err.decode()
    leftovers = list(tmp_path.glob("*.partial*")) + list(tmp_path.glob(".*"))
    assert not leftovers
    assert out.exists(), "frames were written before the signal: they are kept"
    info = probe(out)
    assert info.has_video and len(list(VideoReader(out))) > 0
    text = err.decode()
    for noise in ("W0000", "Feedback manager", "XNNPACK", "landmark_projection"):
        assert noise not in text, text


def test_ctrl_c_through_code_run_from_a_string_still_exits_130(tmp_path):
    """CPython under ``-m`` ends a process with SIGINT (-2) when a KeyboardInterrupt last passed through code run
    from a string (exec: dataclasses, namedtuples), handled or not; the command's Ctrl-C status stays 130."""
    (tmp_path / "interrupted_in_exec.py").write_text(
        "import argparse, sys\n"
        "from lipforcing.engine.app.cli import run_command\n"
        "sys.exit(run_command(argparse.Namespace(run=lambda args: exec('raise KeyboardInterrupt'))))\n")
    proc = subprocess.run([sys.executable, "-m", "interrupted_in_exec"], cwd=tmp_path, capture_output=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])})
    assert proc.returncode == 130 and proc.stderr.decode().splitlines()[-1] == "interrupted", proc.stderr.decode()


def test_run_on_two_ranks_writes_one_process_frames(default_run, tmp_path):
    """``lipforcing run --gpus 2`` on a CPU: two gloo ranks share the student (sequence parallel, rank 0 runs
    the session) and write the frames one process writes (x0 agrees to fp32 rounding, so the decoded frames
    differ by at most one level where a value sits on a rounding edge)."""
    args, default_out, _, _ = default_run
    out, report = tmp_path / "two.mp4", tmp_path / "two.json"
    assert main(args[:4] + ["-o", str(out), "--report", str(report), "--gpus", "2", *TINY]) == 0
    assert json.loads(report.read_text())["path"]["gpus"] == 2
    one, two = np.stack(list(VideoReader(default_out))), np.stack(list(VideoReader(out)))
    assert one.shape == two.shape
    diff = np.abs(one.astype(int) - two.astype(int))
    assert diff.max() <= 2 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())
