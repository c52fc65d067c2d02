"""lipforcing eval: the metrics on shared clips (random-weight feature networks), the Sync-C/D arithmetic on
known distance tables, SyncNet's preprocessing conventions, missing weights and bad input."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("scipy")
pytest.importorskip("av")

from lipforcing.cli import main  # noqa: E402
from lipforcing.engine.errors import ConfigError, MediaError  # noqa: E402
from lipforcing.engine.media.io import VideoReader  # noqa: E402
from lipforcing.engine.quality import evaluate, features, image, syncnet  # noqa: E402
from lipforcing.engine.quality.compare import compare_outputs, quality_gate  # noqa: E402
from lipforcing.engine.quality.evaluate import EvalConfig  # noqa: E402

FRAMES = 40  # 1.6 s: 35 SyncNet windows, two 16-frame FVD clips


def _write(path, frames, audio=None):
    from lipforcing.engine.media.io import VideoWriter

    with VideoWriter(path, frames.shape[2], frames.shape[1], audio=audio) as writer:
        for frame in frames:
            writer.write(frame)
    return path


@pytest.fixture(scope="module")
def clip(shared_dir, tmp_path_factory):
    """(frames, speech, folder): the first 40 frames of a shared clip with its speech, written as ref/face1.mp4
    (the frames that come back from decoding are the ones the metrics see)."""
    pytest.importorskip("mediapipe")
    from lipforcing.engine.media.io import load_audio, read_frames

    src = shared_dir / "assets/clips/face1.mp4"
    speech = load_audio(src)[: FRAMES * 640]
    folder = tmp_path_factory.mktemp("eval")
    (folder / "ref").mkdir()
    path = _write(folder / "ref/face1.mp4", np.stack(list(read_frames(src, FRAMES))), speech)
    with VideoReader(path) as reader:
        frames = np.stack(list(reader))
    return frames, speech, folder


@pytest.fixture(scope="module")
def mouth_boxes(clip):
    from lipforcing.engine.media.face import FaceAligner
    from lipforcing.engine.quality.faces import track_faces

    with FaceAligner("mediapipe") as aligner:
        return track_faces(clip[0], aligner).mouth_boxes(margin=0.0)


def _eval(tmp_path, pred, ref, *extra) -> tuple[int, dict]:
    out = tmp_path / "report.json"
    code = main(["eval", "--pred", str(pred), "--ref", str(ref), "-o", str(out), "--quiet", "--device", "cpu",
                 *extra])
    return code, json.loads(out.read_text()) if out.exists() else {}


def test_a_video_against_itself(clip, tmp_path):
    """SSIM 1, PSNR inf (written as such), LMD 0, FID ~ 0, CSIM 1, and the same Sync-C as the reference; the
    JSON and the plot are written."""
    frames, _, folder = clip
    pred = tmp_path / "pred"
    pred.mkdir()
    shutil.copy(folder / "ref/face1.mp4", pred / "face1.mp4")
    plot = tmp_path / "report.png"
    code, report = _eval(tmp_path, pred, folder / "ref", "--random-features", "--plot", str(plot))
    assert code == 0
    video, agg = report["videos"][0], report["aggregate"]
    assert video["frames"] == FRAMES and video["name"] == "face1"
    assert video["ssim"] == 1.0 and video["psnr"] == "inf" and agg["psnr"] == "inf"
    assert video["ssim_mouth"] == 1.0 and video["psnr_mouth"] == "inf"
    assert video["lmd"] == 0.0 and video["lmd_frames"] == FRAMES
    assert video["fid"] == pytest.approx(0, abs=1e-3) and agg["fid"] == pytest.approx(0, abs=1e-3)
    assert agg["fvd"] == pytest.approx(0, abs=1e-3) and agg["fvd_clips"] == 2
    assert video["csim"] == pytest.approx(1.0) and agg["csim"] == pytest.approx(1.0)
    assert (video["sync_c"], video["sync_d"], video["av_offset"]) == \
        (video["sync_c_ref"], video["sync_d_ref"], video["av_offset_ref"])
    assert FRAMES - 6 <= video["sync_windows"] <= FRAMES - 5  # (AAC may end a few samples short of 40 frames)
    assert report["unavailable"] == {} and set(report["random_weights"]) == {"sync", "fid", "fvd", "csim"}
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_tiny_models_output_against_its_source(clip, tmp_path):
    """The done-when case: ``lipforcing run`` (tiny model, random weights) on 21 frames of a shared clip, then
    ``lipforcing eval`` of its output against the source writes the JSON and the plot; the repainted mouth
    shows (the tiny model's mouth is noise, so the mouth region differs more than the frame)."""
    frames, speech, _ = clip
    ref = _write(tmp_path / "face1.mp4", frames[:21], speech[: 21 * 640])
    (tmp_path / "out").mkdir()
    pred = tmp_path / "out/face1.mp4"
    assert main(["run", str(ref), "-o", str(pred), "--model", "tiny", "--device", "cpu", "--dtype", "fp32",
                 "--encoder", "taehv", "--quiet"]) == 0
    plot = tmp_path / "tiny.png"
    code, report = _eval(tmp_path, pred, ref, "--random-features", "--plot", str(plot))
    assert code == 0 and plot.stat().st_size > 0
    video = report["videos"][0]
    assert video["frames"] == 21 and video["psnr"] != "inf"
    assert video["ssim_mouth"] < video["ssim"] < 1
    assert video["lmd"] > 0 and 0 < video["csim"] < 1


def test_a_blurred_mouth_shows_in_the_mouth_region(clip, mouth_boxes, tmp_path):
    """Blurring only the mouth lowers the mouth-region SSIM far more than the whole frame's; blurring the whole
    frame lowers the whole frame's SSIM and PSNR (scored with the other metric conventions: per-frame PSNR,
    clean-fid's resize, one FVD clip per video)."""
    import cv2

    frames, speech, folder = clip
    mouth = frames.copy()
    for frame, (x, y, w, h) in zip(mouth, mouth_boxes):
        frame[y : y + h, x : x + w] = cv2.GaussianBlur(frame[y : y + h, x : x + w], (0, 0), 4)
    whole = np.stack([cv2.GaussianBlur(f, (0, 0), 4) for f in frames])
    pred = tmp_path / "pred"
    pred.mkdir()
    _write(pred / "face1.mp4", mouth, speech)
    code, report = _eval(tmp_path, pred, folder / "ref")
    assert code == 0 and report["conventions"] == {"psnr": "pooled", "fid_resize": "network", "fvd_clips": "every"}
    m = report["videos"][0]
    assert m["ssim_mouth"] < m["ssim"] - 0.05, m  # the mouth region shows the damage; the whole frame hides it
    assert m["lmd_frames"] == FRAMES  # a face in every frame of both: LMD over all of them
    assert 0.5 < m["lmd"] < 5, m["lmd"]  # the blurred lips are found, about 2 px from where they were
    _write(pred / "face1.mp4", whole, speech)
    code, report = _eval(tmp_path, pred, folder / "ref", "--psnr", "per-frame", "--fid-resize", "clean",
                         "--fvd-clips", "first", "--random-features")
    w = report["videos"][0]
    assert code == 0 and w["ssim"] < min(0.97, m["ssim"]) and w["psnr"] != "inf" and w["psnr"] < 40
    # the other conventions, recorded and applied: PSNR per frame of the decoded videos, one FVD clip per video
    assert report["conventions"] == {"psnr": "per-frame", "fid_resize": "clean", "fvd_clips": "first"}
    with VideoReader(pred / "face1.mp4") as reader:
        decoded = np.stack(list(reader)).astype(np.float64)
    frame_mse = np.square(decoded - frames).reshape(FRAMES, -1).mean(1)
    assert w["psnr"] == report["aggregate"]["psnr"] == pytest.approx(np.mean(10 * np.log10(255**2 / frame_mse)),
                                                                       abs=1e-4)
    assert w["psnr"] > 10 * np.log10(255**2 / frame_mse.mean())  # above the pooled value
    assert "clean mode" in report["definitions"]["fid"] and w["fid"] > 0
    assert report["aggregate"]["fvd"] is None and "one per video" in report["aggregate"]["fvd_note"]


def test_missing_weights_are_reported_unavailable(clip, tmp_path, capsys):
    frames, _, folder = clip
    weights = tmp_path / "weights"
    weights.mkdir()
    code, report = _eval(tmp_path, folder / "ref/face1.mp4", folder / "ref/face1.mp4", "--weights", str(weights))
    assert code == 0
    assert set(report["unavailable"]) == {"sync", "fid", "fvd", "csim"}
    assert report["unavailable"]["sync"]["needs"] == "syncnet_v2.model"
    assert "robots.ox.ac.uk" in report["unavailable"]["sync"]["from"]
    assert report["unavailable"]["fid"]["needs"] == "inception-2015-12-05.pt"
    assert report["videos"][0]["ssim"] == 1.0 and "sync_c" not in report["videos"][0]  # the others still ran
    assert "sync: unavailable, needs syncnet_v2.model" in capsys.readouterr().out


def test_weights_in_the_folder_are_used(clip, tmp_path):
    """SyncNet weights saved as the release does (a flat state dict) and an ArcFace ONNX model are loaded
    from --weights; the ONNX model runs on onnxruntime."""
    pytest.importorskip("onnxruntime")
    frames, _, folder = clip
    weights = tmp_path / "weights"
    weights.mkdir()
    torch.save(syncnet.random_syncnet(seed=3).state_dict(), weights / "syncnet_v2.model")
    arcface = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 8, 8), torch.nn.Flatten(), torch.nn.Linear(8 * 14 * 14, 16))
    torch.onnx.export(arcface, (torch.zeros(1, 3, 112, 112),), str(weights / "arcface.onnx"), dynamo=False,
                      input_names=["x"], dynamic_axes={"x": {0: "n"}})
    code, report = _eval(tmp_path, folder / "ref/face1.mp4", folder / "ref/face1.mp4", "--weights", str(weights))
    assert code == 0 and set(report["unavailable"]) == {"fid", "fvd"} and report["random_weights"] == []
    assert report["videos"][0]["csim"] == pytest.approx(1.0)
    assert FRAMES - 6 <= report["videos"][0]["sync_windows"] <= FRAMES - 5


def test_bad_input_gets_a_clear_error_naming_the_file(clip, tmp_path, capsys):
    frames, speech, folder = clip
    ref = folder / "ref/face1.mp4"
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    assert _eval(tmp_path, broken, ref)[0] == 2
    assert f"{broken}" in capsys.readouterr().err
    short = _write(tmp_path / "short.mp4", frames[:20])
    assert _eval(tmp_path, short, ref)[0] == 2
    err = capsys.readouterr().err
    assert "short.mp4: 20 frames" in err and f"has {FRAMES}" in err and "Traceback" not in err
    blank = np.full((FRAMES, 128, 128, 3), 90, np.uint8)
    no_face = _write(tmp_path / "blank.mp4", blank)
    assert _eval(tmp_path, no_face, no_face)[0] == 2
    assert "blank.mp4: no face was found" in capsys.readouterr().err
    (tmp_path / "p").mkdir()
    (tmp_path / "r").mkdir()
    shutil.copy(ref, tmp_path / "p/other.mp4")
    assert _eval(tmp_path, tmp_path / "p", tmp_path / "r")[0] == 2
    assert "no reference video" in capsys.readouterr().err and not (tmp_path / "report.json").exists()


# --- Sync-C / Sync-D -------------------------------------------------------------------------------------------


def test_sync_scores_of_known_distance_tables():
    table = np.full((4, 31), 8.0)
    table[:, 10] = [2.0, 3.0, 4.0, 3.0]  # the best offset: column 10
    table[:, 20] = 6.0
    result = syncnet.sync_scores(table)
    assert result.sync_d == pytest.approx(3.0)  # the minimum of the mean distances
    assert result.sync_c == pytest.approx(8.0 - 3.0)  # the median (8) minus the minimum
    assert result.offset == 15 - 10 and result.windows == 4
    flat = syncnet.sync_scores(np.full((3, 31), 5.0))
    assert flat.sync_c == 0.0 and flat.offset == 15  # no preference: the first column
    with pytest.raises(ValueError, match=r"a distance table is \[windows, 2 vshift \+ 1\]"):
        syncnet.sync_scores(np.zeros((3, 30)))


def test_the_distance_table_finds_a_shift():
    """Video window i equal to audio window i + 3: the distance is 0 three columns right of centre, so the
    offset is -3 (the reference's sign), and a zero-padded end is no match."""
    g = torch.Generator().manual_seed(0)
    audio = torch.randn(40, 16, generator=g)
    video = torch.cat([audio[3:], torch.randn(3, 16, generator=g)])
    table = syncnet.distance_table(video, audio)
    assert table.shape == (40, 31)
    assert np.allclose(table[:37, 18], 0, atol=1e-3)
    assert table[0, :15].min() > 1  # windows before the start are zero vectors, far from any embedding
    assert syncnet.sync_scores(table).offset == -3


# --- SyncNet preprocessing ---------------------------------------------------------------------------------------


def test_syncnet_preprocessing_on_a_shared_clip(clip, mouth_boxes):
    """Window counts, MFCC shape, BGR crops, the 110 padding, int16 scaling and the offset range, with random
    weights on a shared clip."""
    from lipforcing.engine.media.face import FaceAligner
    from lipforcing.engine.quality.faces import track_faces

    frames, speech, _ = clip
    ceps = syncnet.mfcc(syncnet.int16_scale(speech))
    assert ceps.shape == (1 + math.ceil((speech.size - 400) / 160), 13)  # 100 per second
    # int16 scaling moves only the energy coefficient (by 2 ln 32767); a float waveform is the classic mistake
    assert np.array_equal(syncnet.int16_scale(speech), np.round(np.clip(speech, -1, 1) * 32767))
    assert syncnet.int16_scale(np.array([-2.0, -1.0, 0.0, 0.5, 1.0])).tolist() == [-32767, -32767, 0, 16384, 32767]
    scaled, float_ceps = syncnet.mfcc(speech.astype(np.float64) * 32767), syncnet.mfcc(speech)
    assert np.allclose(scaled[:, 1:], float_ceps[:, 1:], atol=1e-6)
    assert np.allclose(scaled[:, 0] - float_ceps[:, 0], 2 * math.log(32767), atol=1e-6)
    assert syncnet.window_count(len(frames), speech.size) == FRAMES - 5
    with FaceAligner("mediapipe") as aligner:
        boxes = track_faces(frames, aligner).face_boxes()
    crops = syncnet.syncnet_crops(frames, boxes)
    assert crops.shape == (FRAMES, 224, 224, 3) and crops.dtype == np.uint8
    red = np.zeros((3, 100, 100, 3), np.uint8)
    red[..., 0] = 255
    edge = syncnet.syncnet_crops(red, np.array([[0.0, 0.0, 60.0, 60.0]] * 3))
    assert (edge[:, 150:, 150:, 2] == 255).all() and (edge[:, 150:, 150:, :2] == 0).all()  # BGR: red is last
    assert (edge[:, :5, :5] == 110).all()  # outside the frame: the reference's padding value
    net = syncnet.random_syncnet()
    video, audio = syncnet.embed(net, crops, ceps, samples=speech.size)
    assert video.shape == audio.shape == (FRAMES - 5, 1024)
    result = syncnet.score(net, frames, boxes, speech)
    assert result.windows == FRAMES - 5 and -15 <= result.offset <= 15
    assert result.sync_c > 0 and result.sync_d > 0  # the offsets' mean distances differ: not a flat table
    assert result == syncnet.sync_scores(syncnet.distance_table(video, audio))  # the crops and MFCCs above
    with pytest.raises(MediaError, match="too short for SyncNet"):
        syncnet.embed(net, crops[:5], ceps)


def test_syncnet_weights_load_with_the_released_key_names(tmp_path):
    net = syncnet.random_syncnet(seed=5)
    assert "netcnnaud.0.weight" in net.state_dict() and "netfclip.3.bias" in net.state_dict()
    torch.save({f"__S__.{k}": v for k, v in net.state_dict().items()}, tmp_path / "prefixed.model")
    loaded = syncnet.load_syncnet(tmp_path / "prefixed.model")
    x = torch.randn(2, 1, 13, 20)
    assert torch.equal(loaded.forward_aud(x), net.forward_aud(x))
    torch.save({"netcnnaud.0.weight": torch.zeros(64, 1, 3, 3)}, tmp_path / "partial.model")
    with pytest.raises(ConfigError, match="not syncnet_v2 weights"):
        syncnet.load_syncnet(tmp_path / "partial.model")


# --- the pieces -----------------------------------------------------------------------------------------------------


def test_ssim_and_psnr_basics():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    assert np.allclose(image.ssim_per_frame(a, a), 1.0) and image.psnr(a, a) == math.inf
    b = np.clip(a.astype(int) + 10, 0, 255).astype(np.uint8)
    assert image.psnr(a, b) == pytest.approx(10 * math.log10(255**2 / image.mse(a, b)))
    low = np.full((1, 8, 8, 3), 100, np.uint8)  # a known error: every value off by 10 -> MSE 100, PSNR 28.13 dB
    assert image.psnr(low, low + 10) == pytest.approx(10 * math.log10(255**2 / 100), abs=1e-9)
    assert (image.ssim_per_frame(a, 255 - a) < 0.2).all()


def test_frechet_distance_of_gaussians():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4000, 3))
    assert features.frechet_distance(a, a) == pytest.approx(0, abs=1e-9)
    shifted = a + np.array([2.0, 0.0, 0.0])
    assert features.frechet_distance(a, shifted) == pytest.approx(4.0, rel=1e-6)  # |mu_a - mu_b|^2
    scaled = a * 2  # same mean: tr(S + 4S - 2 * 2S) = tr(S) ~ 3
    assert features.frechet_distance(a, scaled) == pytest.approx(3.0, rel=0.05)


def test_the_quality_gate():
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (4, 48, 48, 3), dtype=np.uint8)
    noisy = np.clip(ref + rng.normal(0, 25, ref.shape), 0, 255).astype(np.uint8)
    results = compare_outputs(ref, {"same": ref.copy(), "perturbed": noisy})
    assert results["same"]["drop_pct"] == 0 and results["same"]["psnr"] == "inf"
    assert results["perturbed"]["drop_pct"] > 5
    failures = quality_gate(results, max_drop=1.0)
    assert len(failures) == 1 and failures[0].startswith("perturbed: quality drop")


# --- conventions -------------------------------------------------------------------------------------------------


def _pooled(**lists) -> dict:
    """What ``evaluate`` gathers over the videos, with the given entries (the rest empty)."""
    keys = ("ssim", "mse", "psnr_frames", "ssim_mouth", "mse_mouth", "psnr_mouth_frames", "lmd", "sync", "fid_pred",
            "fid_ref", "fvd_pred", "fvd_ref", "csim")
    return {k: lists.get(k, []) for k in keys}


def test_psnr_pooled_or_per_frame():
    """Two frames with MSE 100 and 1: pooled, 10 log10(255^2 / 50.5) = 31.10 dB; per frame, the mean of 28.13 and
    48.13 dB. Over two videos the pooled value weighs pixels, the per-frame one frames."""
    ref = np.full((2, 16, 16, 3), 100, np.uint8)
    pred = ref + np.array([10, 1], np.uint8)[:, None, None, None]
    frame_mse = image.mse_per_frame(pred, ref)
    assert frame_mse.tolist() == [100.0, 1.0]
    per_frame = image.psnr_per_frame(frame_mse)
    assert per_frame.tolist() == pytest.approx([10 * math.log10(255**2 / 100), 10 * math.log10(255**2)])
    assert evaluate._psnr(frame_mse, EvalConfig()) == round(10 * math.log10(255**2 / 50.5), 4) == 31.0979
    assert evaluate._psnr(frame_mse, EvalConfig(psnr="per-frame")) == round(per_frame.mean(), 4) == 38.1308
    assert evaluate._psnr(np.array([0.0, 4.0]), EvalConfig(psnr="per-frame")) == "inf"  # one identical frame
    # aggregate: this video (2 frames of 16x16) and one frame of 160x160 with MSE 4
    big = np.array([4.0])
    pooled = _pooled(ssim=[np.ones(2), np.ones(1)], ssim_mouth=[np.ones(2), np.ones(1)],
                     mse=[(50.5, 2 * 768), (4.0, 100 * 768)], mse_mouth=[(50.5, 2 * 768), (4.0, 100 * 768)],
                     psnr_frames=[per_frame, image.psnr_per_frame(big)],
                     psnr_mouth_frames=[per_frame, image.psnr_per_frame(big)])
    agg = evaluate._aggregate(pooled, evaluate._Networks(), EvalConfig())
    pixels_weighed = (50.5 * 2 + 4.0 * 100) / 102
    assert agg["psnr"] == agg["psnr_mouth"] == round(10 * math.log10(255**2 / pixels_weighed), 4)
    agg = evaluate._aggregate(pooled, evaluate._Networks(), EvalConfig(psnr="per-frame"))
    assert agg["psnr"] == agg["psnr_mouth"] == round((per_frame.sum() + 10 * math.log10(255**2 / 4)) / 3, 4)
    with pytest.raises(ConfigError, match="psnr 'mean': one of pooled, per-frame"):
        EvalConfig(psnr="mean")


class _SpyImageNet(torch.nn.Module):
    """The FID network's call, recording what it is given; features: per-channel means and deviations."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x, return_features=True):
        self.seen.append(x.clone())
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], 1)


def test_fid_resize_in_the_network_or_clean():
    """ "network" hands the frames over at their size (0..255 integers); "clean" hands over 299x299 floats made by an
    antialiased bicubic resize, clipped to 0..255: a one-pixel checkerboard shrunk from 700 to 299 becomes a flat
    grey, where a plain bilinear resize (what the network does inside) aliases it into a pattern."""
    checker = np.indices((700, 700)).sum(0) % 2 * 255
    frames = np.repeat(checker[None, :, :, None], 3, 3).astype(np.uint8)[[0, 0]]  # [2, 700, 700, 3]
    net = _SpyImageNet()
    features.image_features(net, frames)
    assert net.seen[0].shape == (2, 3, 700, 700) and torch.equal(net.seen[0], net.seen[0].round())
    features.image_features(net, frames, resize="clean")
    clean = net.seen[1]
    assert clean.shape == (2, 3, 299, 299) and clean.dtype == torch.float32
    assert abs(float(clean.mean()) - 127.5) < 1 and float(clean.std()) < 5  # antialiased: grey
    bilinear = torch.nn.functional.interpolate(net.seen[0], size=(299, 299), mode="bilinear", align_corners=False)
    assert float(bilinear.std()) > 30  # aliased: the convention matters
    edge = np.zeros((1, 40, 40, 3), np.uint8)
    edge[:, :, 20:] = 255  # a step: bicubic overshoots on both sides, the clean resize clips it
    resized = features.clean_resize(edge)
    assert resized.min() == 0 and resized.max() == 255 and ((resized > 0) & (resized < 255)).any()
    flat = np.full((1, 50, 70, 3), 77, np.uint8)
    assert np.allclose(features.clean_resize(flat), 77, atol=1e-3)
    with pytest.raises(ConfigError, match="fid_resize 'bicubic'"):
        EvalConfig(fid_resize="bicubic")


def test_fvd_every_clip_or_the_first():
    """"every" takes each consecutive 16-frame clip, "first" one clip per video (its first 16 frames): with one
    40-frame video that is two clips or one, and one clip is too few for a Frechet distance (said in the report)."""
    rng = np.random.default_rng(0)
    preds, refs = (rng.integers(0, 256, (2, 40, 32, 32, 3), dtype=np.uint8) for _ in range(2))
    net = features.RandomVideoFeatures()
    every = features.video_features(net, preds[0])
    first = features.video_features(net, preds[0], clips="first")
    assert every.shape[0] == 2 and first.shape[0] == 1 and np.array_equal(first[0], every[0])
    assert features.video_features(net, preds[0][:15], clips="first").size == 0
    nets = evaluate._Networks(i3d=net)
    for clips, videos, expected in (("every", 1, 2), ("first", 1, None), ("first", 2, 2), ("every", 2, 4)):
        pooled = _pooled(ssim=[np.ones(1)], ssim_mouth=[np.ones(1)], mse=[(1.0, 1)], mse_mouth=[(1.0, 1)],
                         fvd_pred=[features.video_features(net, v, clips=clips) for v in preds[:videos]],
                         fvd_ref=[features.video_features(net, v, clips=clips) for v in refs[:videos]])
        agg = evaluate._aggregate(pooled, nets, EvalConfig(fvd_clips=clips))
        if expected is None:
            assert agg["fvd"] is None and "one per video" in agg["fvd_note"]
        else:
            assert agg["fvd_clips"] == expected and agg["fvd"] > 0, (clips, videos)
    with pytest.raises(ConfigError, match="fvd_clips 'random'"):
        EvalConfig(fvd_clips="random")
