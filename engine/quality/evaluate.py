"""``lipforcing eval``: every metric of predicted videos against reference videos, per video and in aggregate.

    report = evaluate("out/", "ref/", EvalConfig(weights="weights/"))     # pairs the videos by file name
    write_plot(report, "report.png")

Each video is decoded once (25 fps, RGB); predicted and reference must have the same frame count and size.
Metrics (see the README for what each measures and how it maps to the paper's table):

    ssim, psnr               whole frame; ``psnr`` is "inf" for identical videos (pooled or per-frame, see below)
    ssim_mouth, psnr_mouth   the mouth region: a box of one size per video around the reference's lips
    lmd                      mean distance of the mouth landmarks, pixels
    sync_c, sync_d, av_offset  SyncNet v2 of the predicted video against the speech (and the reference's)
    fid                      Frechet distance of Inception features of the frames
    fvd                      Frechet distance of I3D features of 16-frame clips (aggregate only)
    csim                     cosine similarity of ArcFace embeddings, frame by frame

A metric whose weights are missing from ``--weights`` is listed under ``unavailable`` with the file it needs
and where it comes from; the others still run.

Three conventions move the numbers and differ between published evaluations; each is a field of ``EvalConfig``
(a flag of ``lipforcing eval``) and the report records them under ``conventions``:

    psnr        "pooled" (default): the MSE over all frames, then PSNR; "per-frame": the mean of each frame's PSNR
    fid_resize  "network" (default): the FID Inception resizes the frames itself; "clean": clean-fid's resize
    fvd_clips   "every" (default): every consecutive 16-frame clip; "first": one clip per video (StyleGAN-V)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, MediaError
from ..media.io import VideoReader, load_audio, probe
from . import features, image, syncnet
from .faces import FaceTrack, arcface_crops, landmark_distance, track_faces

log = logging.getLogger("lipforcing")

SCHEMA = "lipforcing-eval/1"
VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v"}
WEIGHTED = {"sync": syncnet.WEIGHTS_FILE, "fid": features.INCEPTION.file, "fvd": features.I3D.file,
            "csim": features.ARCFACE.file}
SOURCES = {"sync": (syncnet.WEIGHTS_URL, "SyncNet v2 (syncnet_python's download_model.sh)"),
           "fid": (features.INCEPTION.url, features.INCEPTION.what), "fvd": (features.I3D.url, features.I3D.what),
           "csim": (features.ARCFACE.url, features.ARCFACE.what)}


PSNR_DEFINITIONS = {
    "pooled": "10 log10(255^2 / MSE), the MSE over all pixels of all frames (aggregate: of all videos); 'inf' when "
              "identical",
    "per-frame": "the mean over frames of each frame's 10 log10(255^2 / MSE) (aggregate: over all frames of all "
                 "videos); 'inf' when any frame is identical",
}
FID_DEFINITIONS = {
    "network": "frames handed over at their size, resized to 299 by the network (bilinear; clean-fid's "
               "legacy_tensorflow mode, StyleGAN2-ADA)",
    "clean": "frames resized to 299x299 outside the network, per channel in float, PIL bicubic, clipped to 0..255 "
             "(clean-fid's clean mode)",
}
FVD_DEFINITIONS = {
    "every": "every consecutive non-overlapping 16-frame clip of each video",
    "first": "one 16-frame clip per video, its first frames (StyleGAN-V's protocol)",
}


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    weights: str | None = None
    """A folder with syncnet_v2.model, inception-2015-12-05.pt, i3d_torchscript.pt, arcface.onnx (any subset)."""
    audio: str | None = None
    """Speech for Sync-C/D (default: the predicted video's own audio track, else the reference's)."""
    device: str = "cpu"
    random_features: bool = False
    """Random-weight feature networks in place of missing weights (tests: the numbers mean nothing)."""
    progress: bool = True
    psnr: str = "pooled"
    """PSNR over frames: "pooled" (of the MSE over all frames) or "per-frame" (the mean of the frames' PSNRs)."""
    fid_resize: str = "network"
    """FID input: "network" (frames at their size, resized by the Inception) or "clean" (clean-fid's resize)."""
    fvd_clips: str = "every"
    """FVD clips: "every" consecutive 16-frame clip of each video, or the "first" only (StyleGAN-V)."""

    def __post_init__(self) -> None:
        for name, allowed in (("psnr", image.PSNR_MODES), ("fid_resize", features.FID_RESIZE),
                              ("fvd_clips", features.FVD_CLIPS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} {getattr(self, name)!r}: one of {', '.join(allowed)}")

    @property
    def conventions(self) -> dict[str, str]:
        return {"psnr": self.psnr, "fid_resize": self.fid_resize, "fvd_clips": self.fvd_clips}


@dataclass
class _Networks:
    syncnet: torch.nn.Module | None = None
    inception: torch.nn.Module | None = None
    i3d: torch.nn.Module | None = None
    arcface: object | None = None
    unavailable: dict = field(default_factory=dict)
    random: list = field(default_factory=list)


def _networks(config: EvalConfig) -> _Networks:
    folder = Path(config.weights) if config.weights else None
    if folder is not None and not folder.is_dir():
        raise ConfigError(f"--weights {folder}: not a folder")
    nets = _Networks()
    for metric, file in WEIGHTED.items():
        path = folder / file if folder else None
        if path is not None and path.is_file():
            if metric == "sync":
                nets.syncnet = syncnet.load_syncnet(path, config.device)
            elif metric == "fid":
                nets.inception = features.load_torchscript(path, config.device)
            elif metric == "fvd":
                nets.i3d = features.load_torchscript(path, config.device)
            else:
                nets.arcface = features.ArcFace(path, config.device)
        elif config.random_features:
            nets.random.append(metric)
            if metric == "sync":
                nets.syncnet = syncnet.random_syncnet(device=config.device)
            elif metric == "fid":
                nets.inception = features.RandomImageFeatures().to(config.device).eval()
            elif metric == "fvd":
                nets.i3d = features.RandomVideoFeatures().to(config.device).eval()
            else:
                nets.arcface = _RandomIdentity()
        else:
            url, what = SOURCES[metric]
            where = f"{folder}/{file}" if folder else f"--weights DIR with {file}"
            nets.unavailable[metric] = {"needs": file, "what": what, "from": url, "looked_in": where}
    return nets


class _RandomIdentity:
    """A random projection in place of ArcFace (tests)."""

    def __init__(self) -> None:
        self.projection = np.random.default_rng(0).standard_normal((3 * 28 * 28, 128))

    def __call__(self, crops: np.ndarray) -> np.ndarray:
        small = crops.reshape(len(crops), 28, 4, 28, 4, 3).mean(axis=(2, 4)).reshape(len(crops), -1) / 127.5 - 1
        return features.unit_rows(small @ self.projection)


def pair_videos(pred: str | Path, ref: str | Path) -> list[tuple[str, Path, Path]]:
    """(name, predicted, reference): two files, or two folders paired by file name (without suffix)."""
    pred, ref = Path(pred), Path(ref)
    for path, flag in ((pred, "--pred"), (ref, "--ref")):
        if not path.exists():
            raise MediaError(f"{flag} {path}: no such file or folder")
    if pred.is_file() and ref.is_file():
        return [(pred.stem, pred, ref)]
    if pred.is_dir() != ref.is_dir():
        raise ConfigError("--pred and --ref must both be files or both be folders")

    def videos(folder: Path) -> dict[str, Path]:
        return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in VIDEO_SUFFIXES}

    preds, refs = videos(pred), videos(ref)
    if not preds:
        raise MediaError(f"--pred {pred}: no videos in it ({', '.join(sorted(VIDEO_SUFFIXES))})")
    missing = sorted(set(preds) - set(refs))
    if missing:
        raise MediaError(f"no reference video in {ref} for {', '.join(missing[:5])}"
                         + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""))
    return [(name, preds[name], refs[name]) for name in sorted(preds)]


def _decode(path: Path) -> np.ndarray:
    with VideoReader(path) as reader:
        return np.stack(list(reader))


def _speech(config: EvalConfig, pred: Path, ref: Path) -> tuple[np.ndarray | None, str | None]:
    if config.audio:
        return load_audio(config.audio), config.audio
    for path in (pred, ref):
        if probe(path).has_audio:
            return load_audio(path), str(path)
    return None, None


def _finite(value: float) -> float | str:
    return "inf" if math.isinf(value) else round(value, 4)


def _video_metrics(name: str, pred_path: Path, ref_path: Path, config: EvalConfig, nets: _Networks,
                   aligner, pooled: dict) -> dict:
    pred, ref = _decode(pred_path), _decode(ref_path)
    if len(pred) != len(ref):
        raise MediaError(f"{pred_path}: {len(pred)} frames, but its reference {ref_path} has {len(ref)} "
                         "(both are read at 25 fps)")
    if pred.shape[1:] != ref.shape[1:]:
        raise MediaError(f"{pred_path}: frames of {pred.shape[2]}x{pred.shape[1]}, but its reference {ref_path} "
                         f"has {ref.shape[2]}x{ref.shape[1]}")
    out: dict = {"name": name, "pred": str(pred_path), "ref": str(ref_path), "frames": len(pred)}
    ssim = image.ssim_per_frame(pred, ref, device=config.device)
    frame_mse = image.mse_per_frame(pred, ref)
    out.update(ssim=round(float(ssim.mean()), 5), psnr=_psnr(frame_mse, config))
    pooled["ssim"].append(ssim)
    pooled["mse"].append((float(frame_mse.mean()), pred.size))
    pooled["psnr_frames"].append(image.psnr_per_frame(frame_mse))

    ref_track = track_faces(ref, aligner)
    if not ref_track.found.any():
        raise MediaError(f"{ref_path}: no face was found in any frame")
    pred_track = track_faces(pred, aligner)
    boxes = ref_track.mouth_boxes()
    pm, rm = image.crop_boxes(pred, boxes), image.crop_boxes(ref, boxes)
    ssim_mouth = image.ssim_per_frame(pm, rm, device=config.device)
    mouth_mse = image.mse_per_frame(pm, rm)
    out.update(ssim_mouth=round(float(ssim_mouth.mean()), 5), psnr_mouth=_psnr(mouth_mse, config))
    pooled["ssim_mouth"].append(ssim_mouth)
    pooled["mse_mouth"].append((float(mouth_mse.mean()), pm.size))
    pooled["psnr_mouth_frames"].append(image.psnr_per_frame(mouth_mse))
    out["per_frame"] = {"ssim": [round(float(v), 5) for v in ssim],
                        "ssim_mouth": [round(float(v), 5) for v in ssim_mouth]}
    if pred_track.found.any():
        lmd, counted = landmark_distance(pred_track, ref_track)
        out.update(lmd=round(lmd, 4), lmd_frames=counted)
        pooled["lmd"].append((lmd, counted))
    else:
        out.update(lmd=None, lmd_note=f"no face was found in {pred_path}")

    if nets.syncnet is not None:
        speech, source = _speech(config, pred_path, ref_path)
        if speech is None:
            out["sync_note"] = "no speech: give --audio, or videos with an audio track"
        else:
            faces = _faces_of(pred_track, ref_track)
            result = syncnet.score(nets.syncnet, pred, faces.face_boxes(), speech, device=config.device)
            baseline = syncnet.score(nets.syncnet, ref, ref_track.face_boxes(), speech, device=config.device)
            out.update(sync_c=round(result.sync_c, 4), sync_d=round(result.sync_d, 4), av_offset=result.offset,
                       sync_windows=result.windows, sync_c_ref=round(baseline.sync_c, 4),
                       sync_d_ref=round(baseline.sync_d, 4), av_offset_ref=baseline.offset, speech=source)
            pooled["sync"].append((result.sync_c, result.sync_d))
    if nets.inception is not None:
        fp = features.image_features(nets.inception, pred, device=config.device, resize=config.fid_resize)
        fr = features.image_features(nets.inception, ref, device=config.device, resize=config.fid_resize)
        out["fid"] = round(features.frechet_distance(fp, fr), 4) if len(pred) >= 2 else None
        pooled["fid_pred"].append(fp)
        pooled["fid_ref"].append(fr)
    if nets.i3d is not None:
        pooled["fvd_pred"].append(features.video_features(nets.i3d, pred, device=config.device,
                                                          clips=config.fvd_clips))
        pooled["fvd_ref"].append(features.video_features(nets.i3d, ref, device=config.device, clips=config.fvd_clips))
    if nets.arcface is not None:
        ep = nets.arcface(arcface_crops(pred, _faces_of(pred_track, ref_track)))
        er = nets.arcface(arcface_crops(ref, ref_track))
        cos = (ep * er).sum(1)
        out["csim"] = round(float(cos.mean()), 5)
        pooled["csim"].append(cos)
    return out


def _psnr(frame_mse: np.ndarray, config: EvalConfig) -> float | str:
    """A video's PSNR in the configured convention, from its frames' MSEs [N]."""
    if config.psnr == "per-frame":
        return _finite(float(image.psnr_per_frame(frame_mse).mean()))
    return _finite(image.psnr_from_mse(float(frame_mse.mean())))


def _faces_of(pred: FaceTrack, ref: FaceTrack) -> FaceTrack:
    """The predicted video's landmarks, or the reference's where the prediction has no face (the same
    framing: only the mouth differs)."""
    return FaceTrack([p if p is not None else r for p, r in zip(pred.points, ref.points)])


def _aggregate(pooled: dict, nets: _Networks, config: EvalConfig) -> dict:
    def psnr_of(region: str):
        if config.psnr == "per-frame":  # every frame of every video counts once
            return _finite(float(np.concatenate(pooled[f"psnr{region}_frames"]).mean()))
        pairs = pooled[f"mse{region}"]  # (MSE, pixels) per video: every pixel counts once
        return _finite(image.psnr_from_mse(sum(m * n for m, n in pairs) / sum(n for _, n in pairs)))

    agg = {
        "ssim": round(float(np.concatenate(pooled["ssim"]).mean()), 5), "psnr": psnr_of(""),
        "ssim_mouth": round(float(np.concatenate(pooled["ssim_mouth"]).mean()), 5),
        "psnr_mouth": psnr_of("_mouth"),
        "lmd": round(sum(v * n for v, n in pooled["lmd"]) / sum(n for _, n in pooled["lmd"]), 4)
        if pooled["lmd"] else None,
    }
    if pooled["sync"]:
        agg["sync_c"] = round(float(np.mean([c for c, _ in pooled["sync"]])), 4)  # a plain mean over videos
        agg["sync_d"] = round(float(np.mean([d for _, d in pooled["sync"]])), 4)
    if nets.inception is not None:
        agg["fid"] = round(features.frechet_distance(np.concatenate(pooled["fid_pred"]),
                                                     np.concatenate(pooled["fid_ref"])), 4)
    if nets.i3d is not None:
        fp = [f for f in pooled["fvd_pred"] if f.size]
        fr = [f for f in pooled["fvd_ref"] if f.size]
        clips = sum(len(f) for f in fp)
        if clips >= 2:
            agg["fvd"] = round(features.frechet_distance(np.concatenate(fp), np.concatenate(fr)), 4)
            agg["fvd_clips"] = clips
        else:
            agg["fvd"] = None
            agg["fvd_note"] = (f"FVD needs at least two {features.FVD_CLIP}-frame clips in all; the videos give {clips}"
                               + (" (one per video with fvd_clips 'first')" if config.fvd_clips == "first" else ""))
    if pooled["csim"]:
        agg["csim"] = round(float(np.concatenate(pooled["csim"]).mean()), 5)
    return agg


def evaluate(pred: str | Path, ref: str | Path, config: EvalConfig = EvalConfig()) -> dict:
    """Every available metric of the predicted videos against the references; the report (``SCHEMA``)."""
    from tqdm import tqdm

    from ..media.face import FaceAligner

    pairs = pair_videos(pred, ref)
    if config.audio and not Path(config.audio).is_file():
        raise MediaError(f"--audio {config.audio}: no such file")
    nets = _networks(config)
    pooled: dict = {k: [] for k in ("ssim", "mse", "psnr_frames", "ssim_mouth", "mse_mouth", "psnr_mouth_frames",
                                    "lmd", "sync", "fid_pred", "fid_ref", "fvd_pred", "fvd_ref", "csim")}
    videos = []
    with FaceAligner("mediapipe") as aligner, tqdm(pairs, unit="video", desc="eval",
                                                    disable=not config.progress) as bar:
        for name, p, r in bar:
            bar.set_postfix_str(name)
            videos.append(_video_metrics(name, p, r, config, nets, aligner, pooled))
    return {
        "schema": SCHEMA,
        "videos": videos,
        "aggregate": _aggregate(pooled, nets, config),
        "conventions": config.conventions,
        "unavailable": nets.unavailable,
        "random_weights": nets.random,
        "note": "random-weight feature networks: their figures test the pipeline and mean nothing"
        if nets.random else None,
        "definitions": {
            "ssim": "mean SSIM (11x11 Gaussian, sigma 1.5) over frames; aggregate over all frames",
            "psnr": PSNR_DEFINITIONS[config.psnr],
            "ssim_mouth / psnr_mouth": "the same on a box around the reference's lips (median mouth size + 30% "
                                       "each side)",
            "lmd": "mean Euclidean distance of 40 lip landmarks (MediaPipe face mesh), frame pixels",
            "sync_c / sync_d / av_offset": "SyncNet v2, syncnet_python's protocol: confidence (median - min of the "
                                          "mean distances over offsets -15..15), min distance, offset in frames; "
                                          "*_ref: the reference video against the same speech; aggregate: mean "
                                          "over videos",
            "fid": "Frechet distance of Inception pool features of all frames; " + FID_DEFINITIONS[config.fid_resize],
            "fvd": "Frechet distance of I3D features of " + FVD_DEFINITIONS[config.fvd_clips] + " (aggregate only)",
            "csim": "mean cosine similarity of ArcFace embeddings of the two videos' faces, frame by frame",
        },
    }


def write_plot(report: dict, path: str | Path) -> None:
    """Per-frame SSIM (whole frame and mouth) of every video, and the aggregate figures, as a PNG (atomic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..media.io import atomic_output

    fig, (curves, table) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [2.2, 1]})
    for video in report["videos"]:
        curves.plot(video["per_frame"]["ssim"], label=f"{video['name']} (frame)")
        curves.plot(video["per_frame"]["ssim_mouth"], linestyle="--", label=f"{video['name']} (mouth)")
    curves.set_xlabel("frame (25 fps)")
    curves.set_ylabel("SSIM vs reference")
    curves.set_ylim(top=1.005)
    curves.grid(alpha=0.3)
    curves.legend(fontsize=7, loc="lower left")
    table.axis("off")
    rows = [[k, str(v)] for k, v in report["aggregate"].items() if not k.endswith("_note")]
    rows += [[k, "unavailable"] for k in report["unavailable"]]
    table.table(cellText=rows, colLabels=["metric", "aggregate"], loc="center").scale(1, 1.3)
    if report.get("note"):
        fig.suptitle(report["note"], fontsize=9, color="firebrick")
    fig.tight_layout()
    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    except OSError as exc:
        raise MediaError(f"{path}: cannot write the plot ({exc})") from None
    finally:
        plt.close(fig)
