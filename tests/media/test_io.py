"""Media I/O: decoding (codecs, containers, rates, rotation, odd sizes), audio loading, the atomic
writer, bad inputs, the SPEC §6 clip-length rule and ping-pong extension."""

from __future__ import annotations

import math
import wave
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from lipforcing.engine.errors import MediaError
from lipforcing.engine.media.io import resample_by_time
from lipforcing.engine.media.length import clip_length_from_samples, ping_pong_indices

av = pytest.importorskip("av")
from lipforcing.engine.media.io import VideoReader, VideoWriter, load_audio, probe, read_frames  # noqa: E402

CLIPS = {  # name: (width, height, nominal fps) from shared/assets/README.md
    "face1.mp4": (700, 700, 30), "face2.mp4": (844, 844, 25), "face3.mp4": (590, 590, 25),
    "face4.mp4": (700, 700, 30), "face5.mp4": (524, 524, 25),
}


def level_frame(index: int, height: int, width: int) -> np.ndarray:
    """Flat frame whose gray level encodes its index (survives lossy coding), plus a white corner."""
    image = np.full((height, width, 3), 16 + 12 * (index % 18), np.uint8)
    image[: height // 4, : width // 4] = 255
    return image


def decoded_index(frame: np.ndarray) -> int:
    h, w = frame.shape[:2]
    level = float(frame[h // 2 :, w // 2 :].mean())
    return round((level - 16) / 12)


def make_video(
    path: Path, codec: str, width: int, height: int, times: list[Fraction], *, rotation: int | None = None,
    pix_fmt: str = "yuv420p", rate: int = 30,
) -> Path:
    """Encode frames 0..len(times)-1 (level_frame) shown at the given times (seconds); `rate` is the
    nominal rate declared by the stream (it sets the last frame's duration)."""
    if codec not in av.codecs_available:
        pytest.skip(f"PyAV build lacks the {codec} encoder")
    time_base = Fraction(1, 600)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.codec_context.time_base = time_base
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i, t in enumerate(times):
            frame = av.VideoFrame.from_ndarray(level_frame(i, height, width), format="rgb24")
            frame.pts, frame.time_base = int(t / time_base), time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def make_wav(path: Path, samples: np.ndarray, rate: int) -> Path:
    """int16 PCM wav; samples float [C, S] in [-1, 1]."""
    with wave.open(str(path), "wb") as f:
        f.setnchannels(samples.shape[0])
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes((np.clip(samples.T, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def fps_times(fps: int, n: int) -> list[Fraction]:
    return [Fraction(i, fps) for i in range(n)]


# ---------------------------------------------------------------------------------------------------
# Frame-rate conversion (no media needed)


def test_resample_by_time_rules() -> None:
    # 30 -> 25 fps: output i shows source floor(6 i / 5); the last source frame ends at 1 s.
    src = [(Fraction(i, 30), Fraction(1, 30), i) for i in range(30)]
    assert list(resample_by_time(src)) == [(6 * i) // 5 for i in range(25)]
    # 10 fps -> 25: repeats; a first frame at 0.1 s stands in for earlier times.
    assert list(resample_by_time([(Fraction(i + 1, 10), Fraction(1, 10), i) for i in range(2)])) == [0] * 5 + [1] * 3
    # variable rate: frame 1 is on screen from 0.04 to 0.2 s.
    step = Fraction(1, 25)
    vfr = [(Fraction(0), step, 0), (Fraction(1, 25), step, 1), (Fraction(1, 5), step, 2)]
    assert list(resample_by_time(vfr)) == [0, 1, 1, 1, 1, 2]


# ---------------------------------------------------------------------------------------------------
# Real clips


@pytest.mark.parametrize("name", sorted(CLIPS))
def test_decode_real_clip(shared_dir: Path, name: str) -> None:
    path = shared_dir / "assets" / "clips" / name
    width, height, fps = CLIPS[name]
    info = probe(path)
    assert (info.width, info.height, info.video_codec, info.has_audio) == (width, height, "h264", True)
    # Expected 25 fps count from the raw timestamps: ticks i / 25 before the end of the last frame.
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        last = list(container.decode(stream))[-1]
        origin = Fraction(container.start_time, 1_000_000)
        end = Fraction(last.pts + last.duration) * stream.time_base - origin
    expected = math.ceil(end * 25)
    count = 0
    with VideoReader(path) as reader:
        for frame in reader:
            assert frame.shape == (height, width, 3) and frame.dtype == np.uint8
            count += 1
    assert count == expected
    if fps == 30:
        assert count < 30 * info.duration_s  # the 30 fps clips really are thinned to 25 fps


def test_load_audio_real_files(shared_dir: Path) -> None:
    clips = shared_dir / "assets" / "clips"
    for name in ("speech1.wav", "speech2.wav", "face2.mp4"):
        info = probe(clips / name)
        audio = load_audio(clips / name)
        assert audio.dtype == np.float32 and audio.ndim == 1
        assert abs(audio.size - info.duration_s * 16000) < 0.03 * 16000
        assert 0.01 < np.abs(audio).max() <= 1.0
    stereo = load_audio(clips / "speech2.wav", sr=None, mono=False)
    assert stereo.shape[0] == 2 and abs(stereo.shape[1] / 48000 - 5.0133) < 0.01


def test_write_real_clip_round_trip(shared_dir: Path, tmp_path: Path) -> None:
    clips = shared_dir / "assets" / "clips"
    audio = load_audio(clips / "speech2.wav")
    length = clip_length_from_samples(audio.size)
    out = tmp_path / "out.mp4"
    with VideoWriter(out, 524, 524, audio=audio) as writer:
        for frame in read_frames(clips / "face5.mp4", length.frames):
            writer.write(frame)
    with av.open(str(out)) as container:
        video, sound = container.streams.video[0], container.streams.audio[0]
        assert (video.codec_context.name, video.codec_context.pix_fmt) == ("h264", "yuv420p")
        assert (video.width, video.height, video.average_rate) == (524, 524, 25)
        assert sound.codec_context.name == "aac" and sound.rate == 16000
        assert float(video.duration * video.time_base) == pytest.approx(length.duration_s, abs=1e-3)
        assert float(sound.duration * sound.time_base) == pytest.approx(length.duration_s, abs=0.07)
    assert len(list(VideoReader(out))) == length.frames == 117


# ---------------------------------------------------------------------------------------------------
# Generated videos: codecs, containers, rates, rotation, odd sizes


@pytest.mark.parametrize(
    "codec, suffix",
    [("libx264", ".mp4"), ("libx264", ".mov"), ("libx264", ".mkv"), ("libx265", ".mkv"),
     ("libx265", ".mp4"), ("libvpx-vp9", ".webm"), ("libvpx-vp9", ".mkv")],
)
def test_decode_codecs_and_containers_30fps(tmp_path: Path, codec: str, suffix: str) -> None:
    path = make_video(tmp_path / f"v{suffix}", codec, 64, 48, fps_times(30, 18))
    frames = list(VideoReader(path))
    assert len(frames) == 15  # 0.6 s at 25 fps
    assert [decoded_index(f) for f in frames] == [(6 * i) // 5 for i in range(15)]
    assert frames[0].shape == (48, 64, 3)


def test_decode_variable_frame_rate_and_low_rate(tmp_path: Path) -> None:
    times = [Fraction(0), Fraction(1, 25), Fraction(1, 5), Fraction(6, 25)]  # a 0.16 s hole after frame 1
    frames = list(VideoReader(make_video(tmp_path / "vfr.mp4", "libx264", 32, 32, times)))
    assert [decoded_index(f) for f in frames][:6] == [0, 1, 1, 1, 1, 2]
    low = list(VideoReader(make_video(tmp_path / "low.mkv", "libx264", 32, 32, fps_times(10, 4), rate=10)))
    assert [decoded_index(f) for f in low] == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]


def test_portrait_rotation_and_odd_sizes(tmp_path: Path) -> None:
    portrait = list(VideoReader(make_video(tmp_path / "p.mp4", "libx264", 48, 80, fps_times(25, 3))))
    assert portrait[0].shape == (80, 48, 3)
    rotated_path = make_video(tmp_path / "r.mp4", "libx264", 80, 48, fps_times(25, 3), rotation=90)
    info = probe(rotated_path)
    assert (info.width, info.height, info.rotation) == (48, 80, 90)
    rotated = list(VideoReader(rotated_path))[0]
    assert rotated.shape == (80, 48, 3)
    white = np.argwhere(rotated.min(-1) > 200)  # top-left block turned 90 deg counter-clockwise
    assert white[:, 0].min() >= 58 and white[:, 1].max() <= 12
    odd = make_video(tmp_path / "odd.mkv", "libx264", 65, 49, fps_times(25, 4), pix_fmt="yuv444p")
    frames = list(VideoReader(odd))
    assert frames[0].shape == (49, 65, 3) and len(frames) == 4
    out = tmp_path / "odd_out.mp4"
    with VideoWriter(out, 65, 49) as writer:
        for frame in frames:
            writer.write(frame)
    assert (probe(out).width, probe(out).height) == (64, 48)  # last column and row dropped


def test_read_frames_ping_pong(tmp_path: Path) -> None:
    path = make_video(tmp_path / "short.mp4", "libx264", 32, 32, fps_times(25, 5))
    assert [decoded_index(f) for f in read_frames(path, 12)] == ping_pong_indices(5, 12).tolist()
    assert [decoded_index(f) for f in read_frames(path, 3)] == [0, 1, 2]


# ---------------------------------------------------------------------------------------------------
# Writer


def sine(seconds: float, rate: int = 16000, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_writer_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    frames = [np.repeat(np.repeat(rng.integers(0, 255, (6, 8, 3), np.uint8), 12, 0), 12, 1) for _ in range(30)]
    out = tmp_path / "rt.mp4"
    with VideoWriter(out, 96, 72, audio=sine(2.0)) as writer:  # audio longer than the video: trimmed
        for frame in frames:
            writer.write(frame)
    info = probe(out)
    assert (info.width, info.height, info.fps, info.video_codec, info.audio_codec) == (96, 72, 25, "h264", "aac")
    assert info.duration_s == pytest.approx(30 / 25, abs=0.05)
    audio = load_audio(out)
    assert abs(audio.size - 30 / 25 * 16000) <= 1024  # AAC pads to whole 1024-sample frames
    decoded = list(VideoReader(out))
    assert len(decoded) == 30
    assert np.abs(decoded[7].astype(int) - frames[7]).mean() < 6  # crf 18, 4:2:0, random saturated colors
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


@pytest.mark.parametrize("interrupt", [RuntimeError, KeyboardInterrupt])
def test_writer_keeps_valid_partial_file_on_exception(tmp_path: Path, interrupt: type[BaseException]) -> None:
    out = tmp_path / "partial.mp4"
    out.write_bytes(b"previous result")
    with pytest.raises(interrupt), VideoWriter(out, 64, 48, audio=sine(3.0)) as writer:
        for i in range(10):
            writer.write(level_frame(i, 48, 64))
        assert out.read_bytes() == b"previous result"  # the destination is untouched while writing
        raise interrupt("stop")
    frames = list(VideoReader(out))
    assert [decoded_index(f) for f in frames] == list(range(10))
    assert probe(out).has_audio and probe(out).duration_s == pytest.approx(0.4, abs=0.05)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["partial.mp4"]


def test_writer_removes_temp_file_when_nothing_to_keep(tmp_path: Path) -> None:
    out = tmp_path / "none.mp4"
    with pytest.raises(KeyboardInterrupt), VideoWriter(out, 64, 48):
        raise KeyboardInterrupt
    with pytest.raises(ValueError, match=r"expected uint8 \(48, 64, 3\)"), \
            VideoWriter(out, 64, 48, keep_partial=False) as writer:
        writer.write(level_frame(0, 48, 64))
        writer.write(np.zeros((10, 10, 3), np.uint8))  # wrong size
    writer = VideoWriter(out, 64, 48)
    writer.write(level_frame(0, 48, 64))
    assert writer.abort() == out and len(list(VideoReader(out))) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["none.mp4"]
    out.unlink()
    with pytest.raises(MediaError, match="no frames"):
        VideoWriter(out, 64, 48).close()
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------
# Bad inputs


def test_bad_inputs_raise_media_error(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
    with pytest.raises(MediaError, match="garbage.mp4: cannot read"):
        VideoReader(garbage)
    with pytest.raises(MediaError, match="cannot read"):
        load_audio(garbage)
    with pytest.raises(MediaError, match="does not exist"):
        VideoReader(tmp_path / "missing.mp4")
    with pytest.raises(MediaError, match="does not exist"):
        load_audio(tmp_path / "missing.wav")
    empty = tmp_path / "empty.mp4"
    empty.touch()
    with pytest.raises(MediaError, match="empty"):
        probe(empty)

    speech = make_wav(tmp_path / "speech.wav", sine(0.5)[None], 16000)
    with pytest.raises(MediaError, match="no video stream"):
        VideoReader(speech)
    silent = make_wav(tmp_path / "zero.wav", np.zeros((1, 0), np.float32), 16000)
    with pytest.raises(MediaError, match="zero length|cannot read"):
        load_audio(silent)
    video_only = make_video(tmp_path / "video_only.mp4", "libx264", 32, 32, fps_times(25, 2))
    with pytest.raises(MediaError, match="no audio track"):
        load_audio(video_only)

    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(video_only.read_bytes()[: video_only.stat().st_size // 2])
    with pytest.raises(MediaError, match="truncated.mp4"):
        list(VideoReader(truncated))


def test_unsupported_codec_is_reported(tmp_path: Path) -> None:
    path = make_video(tmp_path / "v.mkv", "libx264", 32, 32, fps_times(25, 2))
    data = path.read_bytes()
    assert data.count(b"V_MPEG4/ISO/AVC") == 1
    unknown = tmp_path / "unknown.mkv"
    unknown.write_bytes(data.replace(b"V_MPEG4/ISO/AVC", b"V_UNKNOWN/X/AVC"))  # a codec id no decoder knows
    with pytest.raises(MediaError, match="unsupported video codec"):
        VideoReader(unknown)


def test_load_audio_resamples_and_averages_channels(tmp_path: Path) -> None:
    left = sine(1.0, 44100, 300.0)
    path = make_wav(tmp_path / "st.wav", np.stack([left, 0.5 * left]), 44100)
    mono = load_audio(path)
    assert mono.size == 16000
    reference = 0.75 * sine(1.0, 16000, 300.0)  # mean of the two channels
    assert np.abs(mono[100:-100] - reference[100:-100]).max() < 0.01
    assert load_audio(path, sr=None).size == 44100


def test_writer_dropped_without_close_leaves_nothing(tmp_path: Path) -> None:
    writer = VideoWriter(tmp_path / "dropped.mp4", 64, 48)
    writer.write(level_frame(0, 48, 64))
    del writer
    import gc

    gc.collect()
    assert list(tmp_path.iterdir()) == []
