"""The prepared training data (training/data.py): format and shapes, equality with the engine's own alignment,
audio features and encoder, skipped inputs, resuming after a finished or an interrupted run, the reader, the CLI."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TOLERANCE
from lipforcing.engine.errors import ConfigError
from lipforcing.engine.numerics import rel_error

pytest.importorskip("safetensors")
from lipforcing.training import data as data_module  # noqa: E402
from lipforcing.training.data import (  # noqa: E402
    PrepareSettings,
    TrainData,
    add_prepare_data_arguments,
    prepare_data,
    run_prepare_data,
)

FRAMES, LATENTS, SIDE, AUDIO_DIM = 81, 21, 8, 256  # tiny_data: 81-frame clips, 64x64 faces, tiny wav2vec2
SHORT_CLIP = 9  # clips of the tests that prepare videos of their own


def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def _files(root: Path) -> set[str]:
    return {p.name for p in root.iterdir()}


@pytest.fixture(scope="module")
def talking_clip(shared_dir, tmp_path_factory) -> Path:
    """The first 20 frames of a shared clip with its own speech: two clips of SHORT_CLIP frames, quick to prepare."""
    from lipforcing.engine.media.io import VideoWriter, load_audio, probe, read_frames

    src = shared_dir / "assets/clips/face5.mp4"
    path = tmp_path_factory.mktemp("talk") / "talk.mp4"
    info = probe(src)
    with VideoWriter(path, info.width, info.height, audio=load_audio(src)) as writer:
        for frame in read_frames(src, 20):
            writer.write(frame)
    return path


@pytest.fixture(scope="module")
def short_settings(tiny_data_settings) -> PrepareSettings:
    """``tiny_data``'s settings with SHORT_CLIP-frame clips, for the tests that prepare videos of their own."""
    from dataclasses import replace

    return replace(tiny_data_settings, clip_frames=SHORT_CLIP, stride=SHORT_CLIP)


def _write_video(path: Path, frames: int, audio: np.ndarray | None) -> Path:
    """A 64x64 video of noise frames (no face), with ``audio`` (float32 [S], 16 kHz) or no audio track."""
    from lipforcing.engine.media.io import VideoWriter

    rng = np.random.default_rng(1)
    with VideoWriter(path, 64, 64, audio=audio) as writer:
        for _ in range(frames):
            writer.write(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    return path


def test_manifest_and_shards_have_the_documented_shapes(tiny_data, tiny_data_sources):
    from safetensors import safe_open

    from lipforcing.engine.media.io import load_audio

    manifest = _manifest(tiny_data)
    assert manifest["format"] == "lipforcing-train-data/1"
    assert manifest["settings"] == {
        "fps": 25, "size": 64, "clip_frames": FRAMES, "stride": FRAMES, "codec": "taehv", "preset": "tiny",
        "latent_frames": LATENTS, "latent_h": SIDE, "latent_w": SIDE, "audio_dim": AUDIO_DIM, "text_len": 16,
        "text_dim": 4096, "sample_rate": 16000, "audio_features": "clip"}
    face3, face4 = (str(p) for p in tiny_data_sources)
    assert [(c["id"], c["source"], c["start_frame"], c["frames"], c["shard"]) for c in manifest["clips"]] == [
        ("face3-0000", face3, 0, FRAMES, "shard-00000.safetensors"),
        ("face4-0000", face4, 0, FRAMES, "shard-00001.safetensors"),
        ("face4-0001", face4, FRAMES, FRAMES, "shard-00001.safetensors")]
    assert manifest["skipped"] == []
    for path, shard, clips in ((tiny_data_sources[0], "shard-00000.safetensors", 1),
                               (tiny_data_sources[1], "shard-00001.safetensors", 2)):
        entry = manifest["sources"][str(path.resolve())]
        assert entry == {"status": "done", "size": path.stat().st_size, "mtime": path.stat().st_mtime,
                         "shard": shard, "clips": clips}
    assert _files(tiny_data) == {"manifest.json", "common.safetensors", "shard-00000.safetensors",
                                 "shard-00001.safetensors"}

    speech = {str(p): load_audio(p) for p in tiny_data_sources}
    for clip in manifest["clips"]:
        with safe_open(str(tiny_data / clip["shard"]), "pt") as f:
            name = clip["id"]
            keys = {k for k in f.keys() if k.startswith(name + "/")}  # noqa: SIM118 - safe_open has no __iter__
            assert keys == {f"{name}/latents", f"{name}/masked_latents", f"{name}/audio", f"{name}/wav"}
            shapes = {k.split("/")[1]: tuple(f.get_tensor(k).shape) for k in keys}
            assert shapes == {"latents": (16, LATENTS, SIDE, SIDE), "masked_latents": (16, LATENTS, SIDE, SIDE),
                              "audio": (FRAMES, AUDIO_DIM), "wav": (FRAMES * 640,)}
            assert all(f.get_tensor(k).dtype == torch.float32 for k in keys)
            start = clip["start_frame"] * 640
            expected = speech[clip["source"]][start : start + FRAMES * 640]
            assert np.array_equal(f.get_tensor(f"{name}/wav").numpy(), expected)  # the clip's own speech


@torch.no_grad()
def test_latents_and_audio_are_the_engines_on_the_aligned_frames(tiny_data, tiny_data_sources):
    """Clip face3-0000 again, by hand, from the engine's parts: aligner, session warp, mask, encoder, wav2vec2."""
    from lipforcing.engine.codecs.latent import make_encoder
    from lipforcing.engine.media.face import FaceAligner, frames_and_crops
    from lipforcing.engine.media.io import VideoReader, load_audio
    from lipforcing.engine.media.mask import latent_mask_channel, mouth_mask01, pixel_mask
    from lipforcing.engine.tools.tiny import tiny_networks, tiny_wav2vec2

    source = tiny_data_sources[0]
    aligner = FaceAligner()
    with VideoReader(source, max_frames=FRAMES) as reader:
        frames = list(reader)
    matrices = [aligner.locate(frame).matrix for frame in frames]
    _, crops = frames_and_crops(frames, matrices, torch.device("cpu"))  # [81, 3, 512, 512] in [0, 1]
    crops = F.interpolate(crops, size=(64, 64), mode="bilinear", align_corners=False, antialias=True)
    keep = pixel_mask(mouth_mask01(), 64)
    pixels = crops * 2 - 1
    encoder = make_encoder("taehv", taehv=tiny_networks("cpu", seed=0)[2], group_frames=4)
    masked, unmasked = encoder.push(torch.stack([pixels * keep, pixels]))
    speech = load_audio(source)
    features = tiny_wav2vec2(0)(speech[: FRAMES * 640], FRAMES)  # the default: the clip's own speech
    whole_video = tiny_wav2vec2(0)(speech, speech.size // 640)[:FRAMES]  # --audio-features video

    data = TrainData(tiny_data)
    clip = data.clip(0)
    assert clip.id == "face3-0000"
    tol = TOLERANCE[torch.float32]
    assert rel_error(clip.latents[0], unmasked) < tol
    assert rel_error(clip.masked_latents[0], masked) < tol
    assert rel_error(clip.audio[0], features) < tol
    assert rel_error(clip.audio[0], whole_video) > 100 * tol  # the two choices differ: the test tells them apart
    assert torch.equal(data.mask_latent, latent_mask_channel(mouth_mask01(), SIDE, SIDE))
    # Masking changes the latents, and most where the mouth is (the encoder is local in space).
    change = (clip.latents - clip.masked_latents).abs().mean(dim=(0, 1, 2))  # [h, w]
    mouth = data.mask_latent[0, 0, 0].bool()
    assert 0 < mouth.float().mean() < 1
    assert change[mouth].mean() > 2 * change[~mouth].mean() > 0


def test_reader_batches_stack_the_clips(tiny_data):
    from lipforcing.engine.tools.tiny import tiny_networks

    data = TrainData(tiny_data)
    assert len(data) == 3 and data.settings["latent_frames"] == LATENTS
    assert torch.equal(data.text_context, tiny_networks("cpu", seed=0)[3])
    batch = data.batch([2, 0])
    assert batch.id == "face4-0001,face3-0000"
    assert batch.latents.shape == batch.masked_latents.shape == (2, 16, LATENTS, SIDE, SIDE)
    assert batch.audio.shape == (2, FRAMES, AUDIO_DIM) and batch.wav.shape == (2, FRAMES * 640)
    assert batch.ref_latent.shape == (2, 16, 1, SIDE, SIDE)
    for row, index in enumerate([2, 0]):
        clip = data.clip(index)
        assert torch.equal(batch.latents[row], clip.latents[0]) and torch.equal(batch.wav[row], clip.wav)
        assert torch.equal(batch.audio[row], clip.audio[0])
    assert not torch.equal(batch.latents[0], batch.latents[1])
    copy = pickle.loads(pickle.dumps(data))  # what a data-loader worker receives
    assert torch.equal(copy.clip(1).masked_latents, data.clip(1).masked_latents)


def test_a_second_run_does_no_work(tiny_data, tiny_data_sources, tiny_data_settings, tmp_path, monkeypatch):
    out = tmp_path / "data"
    shutil.copytree(tiny_data, out)
    before = {name: (out / name).read_bytes() for name in _files(out)}

    def fail(*args, **kwargs):
        raise AssertionError("a source already prepared was prepared again")

    monkeypatch.setattr(data_module, "prepare_source", fail)
    report = prepare_data(tiny_data_sources, out, tiny_data_settings, progress=False)
    assert (report.sources_unchanged, report.clips_added, report.clips_total) == (2, 0, 3)
    assert {name: (out / name).read_bytes() for name in _files(out)} == before


@pytest.mark.parametrize("change, message", [(dict(size=128), "size: 64 -> 128"),
                                             (dict(codec="wan"), "codec: taehv -> wan"),
                                             (dict(seed=1), "text embeddings")])
def test_other_settings_are_refused(tiny_data, tiny_data_sources, tiny_data_settings, tmp_path, change, message):
    from dataclasses import replace

    out = tmp_path / "data"
    shutil.copytree(tiny_data, out)
    with pytest.raises(ConfigError, match=message):
        prepare_data(tiny_data_sources, out, replace(tiny_data_settings, **change), progress=False)
    assert _manifest(out) == _manifest(tiny_data)


def test_an_interrupted_run_leaves_complete_files_and_resumes(talking_clip, short_settings, tmp_path, monkeypatch):
    import safetensors.torch

    first, second = tmp_path / "first.mp4", tmp_path / "second.mp4"
    shutil.copy(talking_clip, first)
    shutil.copy(talking_clip, second)
    out = tmp_path / "data"
    real_save = safetensors.torch.save_file

    def save_then_stop(tensors, filename, metadata=None):  # Ctrl-C while the second shard is being written
        real_save(tensors, filename, metadata=metadata)
        if metadata.get("source") == str(second):
            raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        prepare_data([first, second], out, short_settings, progress=False)
    assert _files(out) == {"manifest.json", "common.safetensors", "shard-00000.safetensors"}  # no temporary file
    manifest = _manifest(out)
    assert list(manifest["sources"]) == [str(first.resolve())]
    assert [c["id"] for c in manifest["clips"]] == ["first-0000", "first-0001"]
    assert len(TrainData(out)) == 2

    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    report = prepare_data([first, second], out, short_settings, progress=False)
    assert (report.sources_unchanged, report.sources_done, report.clips_total) == (1, 1, 4)
    data = TrainData(out)
    assert [c["id"] for c in data.clips] == ["first-0000", "first-0001", "second-0000", "second-0001"]
    assert data.clips[3]["start_frame"] == SHORT_CLIP
    assert torch.equal(data.clip(1).latents, data.clip(3).latents)  # the same video, the same latents
    assert not torch.equal(data.clip(0).latents, data.clip(1).latents)

    stat = first.stat()  # a source that changed since is prepared again, into a new shard
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**10))
    report = prepare_data([first, second], out, short_settings, progress=False)
    assert (report.sources_unchanged, report.sources_done, report.clips_total) == (1, 1, 4)
    assert _files(out) == {"manifest.json", "common.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"}
    data = TrainData(out)
    assert [(c["id"], c["shard"]) for c in data.clips] == [
        ("second-0000", "shard-00001.safetensors"), ("second-0001", "shard-00001.safetensors"),
        ("first-0000", "shard-00002.safetensors"), ("first-0001", "shard-00002.safetensors")]
    assert _manifest(out)["sources"][str(first.resolve())]["mtime"] == first.stat().st_mtime != stat.st_mtime


def test_unusable_videos_are_skipped_with_their_reason(talking_clip, short_settings, tmp_path):
    from lipforcing.engine.media.io import load_audio

    speech = load_audio(talking_clip)
    short = _write_video(tmp_path / "short.mp4", 5, speech)
    mute = _write_video(tmp_path / "mute.mp4", 20, None)
    silent = _write_video(tmp_path / "silent.mp4", 20, np.zeros_like(speech))
    faceless = _write_video(tmp_path / "faceless.mp4", 12, speech)
    videos = [short, mute, talking_clip, silent, faceless]
    report = prepare_data(videos, tmp_path / "data", short_settings, progress=False)
    assert (report.sources_done, report.sources_skipped, report.clips_added) == (1, 4, 2)
    manifest = _manifest(tmp_path / "data")
    assert manifest["skipped"] == [
        {"source": str(short), "start_frame": None, "reason": f"too short: 5 frames, need {SHORT_CLIP}"},
        {"source": str(mute), "start_frame": None, "reason": "no audio track"},
        {"source": str(silent), "start_frame": None, "reason": "silent audio track"},
        {"source": str(faceless), "start_frame": 0, "reason": "no face in any frame"}]
    assert [c["source"] for c in manifest["clips"]] == [str(talking_clip)] * 2
    status = {Path(k).name: (v["status"], v["shard"], v["clips"]) for k, v in manifest["sources"].items()}
    assert status == {"short.mp4": ("skipped", None, 0), "mute.mp4": ("skipped", None, 0),
                      "talk.mp4": ("done", "shard-00000.safetensors", 2), "silent.mp4": ("skipped", None, 0),
                      "faceless.mp4": ("skipped", None, 0)}


@pytest.mark.parametrize("allowed", [4, 6])
def test_a_clip_with_too_many_frames_without_a_face_is_skipped(talking_clip, short_settings, tmp_path, allowed):
    """Frames 2..7 of the first clip are noise: the aligner reuses the last alignment there (6 frames without a
    detected face), which a clip tolerates only up to --max-missing-faces."""
    from dataclasses import replace

    from lipforcing.engine.media.io import VideoReader, VideoWriter, load_audio

    with VideoReader(talking_clip) as reader:
        frames = list(reader)
    rng = np.random.default_rng(2)
    for i in range(2, 8):
        frames[i] = rng.integers(0, 256, frames[i].shape, dtype=np.uint8)
    path = tmp_path / "gap.mp4"
    with VideoWriter(path, frames[0].shape[1], frames[0].shape[0], audio=load_audio(talking_clip)) as writer:
        for frame in frames:
            writer.write(frame)
    settings = replace(short_settings, max_missing_faces=allowed)
    report = prepare_data([path], tmp_path / "data", settings, progress=False)
    manifest = _manifest(tmp_path / "data")
    if allowed < 6:
        assert report.skipped == manifest["skipped"] == [
            {"source": str(path), "start_frame": 0,
             "reason": "no face in 6 of 9 frames (more than --max-missing-faces 4)"}]
        assert [c["start_frame"] for c in manifest["clips"]] == [SHORT_CLIP]
    else:
        assert manifest["skipped"] == [] and [c["start_frame"] for c in manifest["clips"]] == [0, SHORT_CLIP]


def test_the_command_line_prints_a_summary(tiny_data, tiny_data_sources, tmp_path, capsys):
    out = tmp_path / "data"
    shutil.copytree(tiny_data, out)
    parser = argparse.ArgumentParser()
    add_prepare_data_arguments(parser)
    args = parser.parse_args([*map(str, tiny_data_sources), "-o", str(out), "--codec", "taehv", "--size", "64",
                              "--device", "cpu", "--quiet"])
    assert run_prepare_data(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "3 clips in all" in lines[0] and "2 videos already prepared" in lines[0]


@pytest.mark.parametrize("case", ["missing input", "no input", "output is a file", "missing weights",
                                  "bad clip length", "no data"])
def test_user_errors_are_config_errors(case, tmp_path, talking_clip):
    settings = PrepareSettings(codec="taehv", size=64, device="cpu")
    out = tmp_path / "data"
    if case == "missing input":
        with pytest.raises(ConfigError, match="nope.mp4: does not exist"):
            prepare_data([talking_clip, tmp_path / "nope.mp4"], out, settings, progress=False)
    elif case == "no input":
        with pytest.raises(ConfigError, match="no input videos"):
            prepare_data([], out, settings, progress=False)
    elif case == "output is a file":
        out.write_text("not a directory")
        with pytest.raises(ConfigError, match="is a file"):
            prepare_data([talking_clip], out, settings, progress=False)
    elif case == "missing weights":
        real = PrepareSettings(preset="real", codec="wan", device="cpu", vae=str(tmp_path / "Wan2.1_VAE.pth"))
        with pytest.raises(ConfigError, match=r"(?s)--wav2vec \(not given\).*--text-emb.*--vae .*does not exist"):
            prepare_data([talking_clip], out, real, progress=False)
    elif case == "bad clip length":
        with pytest.raises(ConfigError, match="1 \\+ 4k"):
            PrepareSettings(clip_frames=80)
    else:
        with pytest.raises(ConfigError, match="no prepared data in"):
            TrainData(tmp_path)
    assert not out.is_dir()


def test_overlapping_clips_are_stored_apart(talking_clip, short_settings, tmp_path):
    """A stride shorter than a clip: neighbouring clips share frames and, with whole-video audio features, audio rows,
    each stored on its own (per-clip features, the default, differ at the shared rows: each clip's own wav2vec2
    run sees other context; tested in test_latents_and_audio_are_the_engines_on_the_aligned_frames)."""
    from dataclasses import replace

    settings = replace(short_settings, stride=4, audio_features="video")
    report = prepare_data([talking_clip], tmp_path / "out", settings, progress=False)
    data = TrainData(tmp_path / "out")
    assert report.clips_total == len(data) >= 3
    first, second = data.clip(0), data.clip(1)
    assert torch.equal(first.audio[0, 4:], second.audio[0, : SHORT_CLIP - 4])  # the 4-frame shift, row for row
    assert not torch.equal(first.audio, second.audio)
