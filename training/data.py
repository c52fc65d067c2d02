"""The training data set: talking-head videos prepared once into aligned, encoded clips, and its reader.

    lipforcing prepare-data talk1.mp4 talk2.mp4 -o data/ --preset real --codec wan --vae Wan2.1_VAE.pth \\
        --wav2vec wav2vec2-base-960h/ --text-emb text_emb.pt
    report = prepare_data(["talk1.mp4"], "data/", PrepareSettings(preset="tiny", codec="taehv", size=64))

    data = TrainData("data/")
    clip = data.clip(0)                # TrainClip: latents / masked_latents [1, 16, L, h, w], audio [1, V, A], wav [S]
    batch = data.batch([0, 3])         # the same, stacked along dim 0 (wav [B, S])
    data.text_context, data.mask_latent            # [1, T, D], [1, 1, 1, h, w] (1 = mouth)
    ref_latent = clip.latents[:, :, :1]            # the reference latent (SPEC §3): frame 0 alone, causal VAE

Each source video is prepared the way inference sees a video (one implementation of each step):
- frames resampled to 25 fps (``VideoReader``), audio decoded to 16 kHz mono (``load_audio``); the video is
  cut to the frames its audio covers (floor(25 d) frames, SPEC §6);
- faces aligned by the inference aligner (``FaceAligner.locate`` over the whole video in order: detection,
  tracking, translation EMA, reuse of the last alignment for short gaps) and warped to 512x512 by
  ``frames_and_crops``; resized to ``size`` when that is smaller (bilinear, antialiased);
- clips of ``clip_frames`` (1 + 4k) frames every ``stride`` frames. A frame counts as without a face when
  the detector found none in it (the aligner reused an earlier alignment, or had none to reuse); a clip with
  more than ``max_missing_faces`` such frames is skipped, and a kept clip's frames that have no alignment at
  all borrow the nearest later one (else the nearest earlier), as a session does;
- audio features (``Wav2Vec2Features``, SPEC §7), [clip_frames, A] (A = 10752 for wav2vec2-base-960h, 256 for
  the tiny random one): by default (``audio_features="clip"``, the release's training data) wav2vec2 runs over
  each clip's own speech; ``"video"`` runs it ONCE per video on its whole audio, as inference computes them for a
  whole clip (wav2vec2's attention is global), and slices each clip's frames (memory then grows with the square
  of the video's length; split videos of many minutes first);
- latents of the unmasked and of the masked crops, encoded as one causal stream per clip exactly as the
  chunk pipeline encodes them (pixels in [-1, 1]; masked = pixels times the binarized mouth mask, so the mouth
  is 0; one batch of two through ``LatentEncoder`` in the released groups of 4 frames): [16, L, h, w] each,
  L = 1 + (clip_frames - 1) / 4, h = w = size / 8. The latent of frame 0 alone is the clip's reference latent
  (a causal codec encodes frame 0 by itself), so it is not stored separately.

Skipped, with the reason recorded in the manifest and the other videos going on: a file that cannot be read,
a video without an audio track or with silent audio, a video shorter than one clip (``too short: N frames,
need 81``), a clip with too many frames without a face.

Format ``lipforcing-train-data/1`` (everything float32):

    DIR/manifest.json       {"format", "settings": {fps, size, clip_frames, stride, codec, preset, latent_frames,
                             latent_h, latent_w, audio_dim, text_len, text_dim, sample_rate, audio_features},
                             "clips": [{id, source, start_frame, frames, shard}], "skipped": [{source,
                             start_frame (null: the whole video), reason}], "sources": {absolute path: {status
                             "done" | "skipped", size, mtime, shard, clips}}}
    DIR/common.safetensors  text_context [1, T, D]; mask_latent [1, 1, 1, h, w] (1 = mouth, DiT channel 32)
    DIR/shard-NNNNN.safetensors   one per source video with clips: for each clip id, "<id>/latents",
                             "<id>/masked_latents" [16, L, h, w], "<id>/audio" [clip_frames, A] and "<id>/wav"
                             [clip_frames * 640] (the clip's 16 kHz speech, for the SyncNet reward)

Resuming: a run on an existing DIR skips the sources the manifest records with the same absolute path, size
and modification time, and refuses other settings. Each shard and the manifest are written atomically (a
temporary file renamed into place), the manifest after every source, so an interrupted run leaves only
complete shards and a manifest of completed sources; running it again finishes the job.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..engine.codecs.latent import CODECS, LatentEncoder, make_encoder
from ..engine.dit.checkpoint import load_text_embeds
from ..engine.dit.config import ModelConfig
from ..engine.errors import ConfigError, MediaError
from ..engine.media.audio_features import SAMPLES_PER_FRAME, Wav2Vec2Features
from ..engine.media.face import FACE_SIZE, FaceAligner, FaceTransform, fill_gaps, frames_and_crops
from ..engine.media.io import VideoReader, atomic_output, load_audio, probe, write_json
from ..engine.media.length import AUDIO_RATE, OUTPUT_FPS
from ..engine.media.mask import latent_mask_channel, load_mask, mouth_mask01, pixel_mask

log = logging.getLogger("lipforcing")

FORMAT = "lipforcing-train-data/1"
MANIFEST, COMMON = "manifest.json", "common.safetensors"
PRESETS = ("tiny", "real")
AUDIO_FEATURES = ("clip", "video")
SILENT_PEAK = 1e-4
"""Audio whose peak stays below this (-80 dBFS) is silence: no speech to learn from."""
NO_DATA = "no prepared data in {root} (run lipforcing prepare-data)"


# ---------------------------------------------------------------------------------------------------
# Settings and networks


@dataclass(frozen=True, kw_only=True)
class PrepareSettings:
    """How to prepare the data; the ``prepare-data`` flags map onto these one to one."""

    preset: str = "tiny"
    """tiny (random-weight networks of ``engine.tools.tiny``, for tests) or real (the weight files below)."""
    codec: str = "wan"
    """Latent encoder: wan (the released encoder) or taehv."""
    size: int = FACE_SIZE
    """Side of the faces encoded: 512 (the model's), or smaller (a multiple of 16) for tests."""
    clip_frames: int = 81
    """Frames per clip, 1 + 4k (81: 21 latents, the training recipe's clips)."""
    stride: int | None = None
    """Frames between the starts of successive clips (default: clip_frames, no overlap)."""
    max_missing_faces: int = 4
    """A clip with more frames than this in which no face was detected is skipped."""
    device: str = ""
    """Where the networks run (default: cuda when available, else cpu)."""
    seed: int = 0
    """Seed of the tiny preset's random weights."""
    wav2vec: str | None = None
    """Directory with facebook/wav2vec2-base-960h (real preset)."""
    vae: str | None = None
    """Wan2.1_VAE.pth (real preset, codec wan)."""
    taehv: str | None = None
    """taew2_1.pth (real preset, codec taehv)."""
    text_emb: str | None = None
    """torch-saved [1, text_len, text_dim] text embeddings (required by the real preset)."""
    mask: str | None = None
    """A mouth mask image (255 = keep) instead of the engine's built-in LatentSync-shaped mask."""
    audio_features: str = "clip"
    """clip: wav2vec2 over each clip's own speech (the release's training data); video: over the whole video's
    speech, sliced per clip (what inference computes for a whole video)."""

    def __post_init__(self) -> None:
        if self.audio_features not in AUDIO_FEATURES:
            raise ConfigError(f"--audio-features must be one of {AUDIO_FEATURES}, got {self.audio_features!r}")
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; choose one of {PRESETS}")
        if self.codec not in CODECS:
            raise ConfigError(f"unknown codec {self.codec!r}; choose one of {CODECS}")
        if not 16 <= self.size <= FACE_SIZE or self.size % 16:
            raise ConfigError(f"--size must be a multiple of 16 from 16 to {FACE_SIZE}, got {self.size}")
        if self.clip_frames < 5 or (self.clip_frames - 1) % 4:
            raise ConfigError(f"--clip-frames must be 1 + 4k frames (5, 9, ..., 81), got {self.clip_frames}")
        if self.stride is None:
            object.__setattr__(self, "stride", self.clip_frames)
        if self.stride < 1:
            raise ConfigError(f"--stride must be at least 1, got {self.stride}")
        if self.max_missing_faces < 0:
            raise ConfigError(f"--max-missing-faces must be >= 0, got {self.max_missing_faces}")
        if not self.device:
            object.__setattr__(self, "device", "cuda" if torch.cuda.is_available() else "cpu")
        used = {"--wav2vec": self.wav2vec, "--vae": self.vae, "--taehv": self.taehv}
        wanted = {"--wav2vec", "--vae" if self.codec == "wan" else "--taehv"} if self.preset == "real" else set()
        stray = [flag for flag, value in used.items() if value is not None and flag not in wanted]
        if stray:
            verb = "is" if len(stray) == 1 else "are"
            raise ConfigError(f"{', '.join(stray)} {verb} not used with --preset {self.preset} --codec {self.codec}; "
                              "leave it out")

    @property
    def latent_frames(self) -> int:
        return 1 + (self.clip_frames - 1) // 4


@dataclass(eq=False)
class PreparationNetworks:
    """What preparing a video runs: the face aligner, the audio encoder, the latent encoder and the masks."""

    aligner: FaceAligner
    audio: Wav2Vec2Features
    encoder: LatentEncoder
    text_context: torch.Tensor  # [1, T, D] float32, CPU
    keep_pixels: torch.Tensor  # [size, size] {0, 1}: 1 = keep, 0 = mouth (zeroed in the masked stream)
    mask_latent: torch.Tensor  # [1, 1, 1, size / 8, size / 8] float32, CPU, 1 = mouth


def _required(settings: PrepareSettings) -> dict[str, str]:
    """flag -> value for the weight files the real preset needs."""
    need = {"--wav2vec": settings.wav2vec, "--text-emb": settings.text_emb}
    need.update({"--vae": settings.vae} if settings.codec == "wan" else {"--taehv": settings.taehv})
    return need


def check_weight_files(settings: PrepareSettings) -> None:
    """Raise one ConfigError naming every flag of a missing weight file (real preset)."""
    what = {"--wav2vec": "a directory with facebook/wav2vec2-base-960h (config.json + model.safetensors)",
            "--vae": "the Wan 2.1 VAE (Wan2.1_VAE.pth)", "--taehv": "TAEHV for Wan 2.1 (taew2_1.pth)",
            "--text-emb": "UMT5-XXL embeddings of 'a person talking' ([1, 512, 4096], text_emb.pt)"}
    wanted = _required(settings) if settings.preset == "real" else {"--text-emb": settings.text_emb}
    lines = [f"{flag} ({'not given' if value is None else f'{value} does not exist'}): {what[flag]}"
             for flag, value in wanted.items()
             if (value is None and settings.preset == "real") or (value is not None and not Path(value).exists())]
    if lines:
        raise ConfigError(f"preparing data with --preset {settings.preset} needs:\n  " + "\n  ".join(lines))


def load_preparation_networks(settings: PrepareSettings) -> PreparationNetworks:
    """Build (tiny: random weights, seeded) or load (real) every network preparing the data runs, in fp32."""
    check_weight_files(settings)
    device = torch.device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but CUDA is not available; use --device cpu")
    if settings.preset == "tiny":
        from ..engine.tools.tiny import tiny_networks, tiny_wav2vec2

        _, vae, taehv, text = tiny_networks(device, seed=settings.seed)
        audio = tiny_wav2vec2(settings.seed).to(device)
    else:
        from ..engine.codecs.taehv import load_taehv
        from ..engine.codecs.wan_vae import load_wan_vae

        audio = Wav2Vec2Features.from_dir(settings.wav2vec, device=device)
        vae = load_wan_vae(settings.vae, device=device) if settings.codec == "wan" else None
        taehv = load_taehv(settings.taehv, device=device) if settings.codec == "taehv" else None
        text = None
    if settings.text_emb is not None:  # UMT5-XXL embeddings: text_dim 4096 for every preset
        text = load_text_embeds(settings.text_emb, ModelConfig.from_name("tiny" if settings.preset == "tiny" else
                                                                         "14b").text_dim)
    keep = load_mask(settings.mask) if settings.mask else mouth_mask01()
    latent = settings.size // 8
    return PreparationNetworks(
        aligner=FaceAligner(warp="torch" if device.type == "cuda" else "cv2", device=device),
        audio=audio,
        encoder=make_encoder(settings.codec, vae=vae, taehv=taehv, group_frames=4),
        text_context=text.float().cpu(),
        keep_pixels=pixel_mask(keep, settings.size).to(device),
        mask_latent=latent_mask_channel(keep, latent, latent),
    )


def manifest_settings(settings: PrepareSettings, nets: PreparationNetworks) -> dict:
    """The ``settings`` block of the manifest: what the trainer needs to know, and what a resume must match."""
    latent = settings.size // 8
    return {"fps": OUTPUT_FPS, "size": settings.size, "clip_frames": settings.clip_frames, "stride": settings.stride,
            "codec": settings.codec, "preset": settings.preset, "latent_frames": settings.latent_frames,
            "latent_h": latent, "latent_w": latent, "audio_dim": nets.audio.feature_dim,
            "text_len": nets.text_context.shape[1], "text_dim": nets.text_context.shape[2], "sample_rate": AUDIO_RATE,
            "audio_features": settings.audio_features}


# ---------------------------------------------------------------------------------------------------
# One video -> clips


@dataclass
class _Frame:
    """One frame as the aligner left it; ``raw`` is kept only while the frame has no alignment."""

    detected: bool  # the detector found a face in this very frame
    matrix: np.ndarray | None  # [2, 3] frame -> 512x512 crop, None: no alignment (not even a reused one)
    crop: torch.Tensor | None  # [3, size, size] in [0, 1]
    raw: np.ndarray | None  # uint8 [H, W, 3]


def _crop(frame: np.ndarray, matrix: np.ndarray, size: int, device: torch.device) -> torch.Tensor:
    """The session's warp (``frames_and_crops``) to 512x512, resized to size: [3, size, size] in [0, 1]."""
    _, crops = frames_and_crops([frame], [matrix], device)
    if size != FACE_SIZE:
        crops = F.interpolate(crops, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return crops[0]


class _ClipWindows:
    """The aligned frames of one video, cut into windows of ``clip_frames`` every ``stride`` frames.

    Iterating yields (start frame, frames of the window); every frame goes through the aligner, in order,
    whether or not a window keeps it (tracking and smoothing need the whole sequence). ``frames_read`` says
    how many frames there were once the iteration is over."""

    def __init__(self, path: Path, max_frames: int, nets: PreparationNetworks, settings: PrepareSettings,
                 bar) -> None:  # bar: a tqdm bar, advanced by one per frame read
        self.path, self.max_frames, self.nets, self.settings, self.bar = path, max_frames, nets, settings, bar
        self.frames_read = 0

    def __iter__(self) -> Iterator[tuple[int, list[_Frame]]]:
        s, aligner = self.settings, self.nets.aligner
        device = self.nets.keep_pixels.device
        aligner.reset()
        window: list[_Frame] = []
        start = 0
        with VideoReader(self.path, max_frames=self.max_frames) as reader:
            for i, image in enumerate(reader):
                where: FaceTransform | None = aligner.locate(image)
                self.frames_read = i + 1
                self.bar.update(1)
                if i < start:
                    continue
                if where is None:
                    window.append(_Frame(detected=False, matrix=None, crop=None, raw=image))
                else:
                    crop = _crop(image, where.matrix, s.size, device)
                    window.append(_Frame(detected=not where.reused, matrix=where.matrix, crop=crop, raw=None))
                if len(window) == s.clip_frames:
                    yield start, window
                    window = window[s.stride :]
                    start += s.stride


def _window_pixels(window: Sequence[_Frame], settings: PrepareSettings) -> torch.Tensor | str:
    """The crops of a window [clip_frames, 3, size, size] in [0, 1], or why the window is skipped."""
    missing = sum(not f.detected for f in window)
    if all(f.matrix is None for f in window):
        return "no face in any frame"
    if missing > settings.max_missing_faces:
        return (f"no face in {missing} of {len(window)} frames (more than --max-missing-faces "
                f"{settings.max_missing_faces})")
    matrices = fill_gaps([f.matrix for f in window])
    device = next(f.crop.device for f in window if f.crop is not None)
    return torch.stack([f.crop if f.crop is not None else _crop(f.raw, m, settings.size, device)
                        for f, m in zip(window, matrices)])


@torch.no_grad()
def encode_clip(encoder: LatentEncoder, crops: torch.Tensor,
                keep_pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """crops [T, 3, H, W] in [0, 1]; keep_pixels [H, W] {0, 1} -> (latents, masked_latents), [16, L, h, w] float32
    each: one causal stream of the unmasked and one of the masked pixels, as ``ChunkPipeline.encode``."""
    pixels = crops * 2 - 1
    encoder.reset()
    z = encoder.push(torch.stack([pixels * keep_pixels, pixels]))  # [2, 16, L, h, w]: row 0 masked
    encoder.reset()
    return z[1].float().cpu().contiguous(), z[0].float().cpu().contiguous()


@dataclass
class SourceResult:
    """What preparing one video gave: its clips' tensors and manifest entries, or why it was skipped."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    clips: list[dict] = field(default_factory=list)  # {"id", "start_frame", "frames"}
    skipped: list[tuple[int | None, str]] = field(default_factory=list)  # (start frame or None, reason)


def _skip(reason: str) -> SourceResult:
    return SourceResult(skipped=[(None, reason)])


def _count_frames(path: Path, limit: int) -> int:
    """Frames of the video at 25 fps, counting up to ``limit``."""
    try:
        with VideoReader(path, max_frames=limit) as reader:
            return sum(1 for _ in reader)
    except MediaError:
        return 0


def prepare_source(path: Path, prefix: str, nets: PreparationNetworks, settings: PrepareSettings,
                   progress: bool = False) -> SourceResult:
    """Align, cut and encode one video (see the module docstring). Clip ids are ``{prefix}-{window:04d}``."""
    from tqdm import tqdm

    try:
        info = probe(path)
        if not info.has_video:
            return _skip("no video stream")
        if not info.has_audio:
            return _skip("no audio track")
        speech = load_audio(path)  # float32 [S], 16 kHz mono
    except MediaError as err:
        return _skip(str(err))
    if float(np.abs(speech).max()) < SILENT_PEAK:
        return _skip("silent audio track")
    frames = speech.size // SAMPLES_PER_FRAME  # SPEC §6: the frames the audio covers
    need = settings.clip_frames
    if frames < need:
        return _skip(f"too short: {min(frames, _count_frames(path, frames))} frames, need {need}")
    whole = nets.audio(speech, frames).float().cpu() if settings.audio_features == "video" else None  # [frames, A]
    result = SourceResult()
    with tqdm(total=frames, desc=path.name, unit="frame", disable=not progress, leave=False) as bar:
        windows = _ClipWindows(path, frames, nets, settings, bar)
        try:
            for start, window in windows:
                pixels = _window_pixels(window, settings)
                if isinstance(pixels, str):
                    result.skipped.append((start, pixels))
                    continue
                name = f"{prefix}-{start // settings.stride:04d}"
                latents, masked = encode_clip(nets.encoder, pixels, nets.keep_pixels)
                wav = speech[start * SAMPLES_PER_FRAME : (start + need) * SAMPLES_PER_FRAME]
                if whole is None:
                    features = nets.audio(wav, need).float().cpu()
                else:  # a copy: overlapping clips (stride < clip) share rows of the features
                    features = whole[start : start + need].clone()
                result.tensors.update({f"{name}/latents": latents, f"{name}/masked_latents": masked,
                                       f"{name}/audio": features,
                                       f"{name}/wav": torch.from_numpy(wav.copy())})
                result.clips.append({"id": name, "start_frame": start, "frames": need})
                bar.set_postfix(clips=len(result.clips))
        except MediaError as err:
            return _skip(str(err))
    if windows.frames_read < need:
        return _skip(f"too short: {windows.frames_read} frames, need {need}")
    return result


# ---------------------------------------------------------------------------------------------------
# The data set on disk


@dataclass
class PrepareReport:
    """What a ``prepare_data`` run did."""

    out_dir: Path
    clips_added: int = 0
    clips_total: int = 0
    sources_done: int = 0
    """Videos prepared by this run (at least one clip)."""
    sources_skipped: int = 0
    """Videos of this run that gave no clip."""
    sources_unchanged: int = 0
    """Videos already prepared by an earlier run (same path, size and modification time)."""
    skipped: list[dict] = field(default_factory=list)
    """This run's manifest ``skipped`` entries."""

    def summary(self) -> str:
        """One line: what this run added and skipped, and what the directory holds."""

        def count(n: int, what: str) -> str:
            return f"{n} {what}{'' if n == 1 else 's'}"

        clips_skipped = sum(e["start_frame"] is not None for e in self.skipped)
        return (f"prepared {count(self.clips_added, 'clip')} from {count(self.sources_done, 'video')} into "
                f"{self.out_dir} ({count(self.clips_total, 'clip')} in all; skipped "
                f"{count(self.sources_skipped, 'video')} and {count(clips_skipped, 'clip')}; "
                f"{count(self.sources_unchanged, 'video')} already prepared)")


def _open_manifest(out: Path, settings: dict) -> dict:
    """The manifest of ``out`` (a new one when there is none); refuses another format or other settings."""
    path = out / MANIFEST
    if not path.exists():
        return {"format": FORMAT, "settings": settings, "clips": [], "skipped": [], "sources": {}}
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a readable manifest ({exc}); use another -o directory") from None
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"{path}: format {manifest.get('format')!r}, not {FORMAT}; use another -o directory")
    old = manifest.get("settings", {})
    changed = [f"{k}: {old.get(k)} -> {v}" for k, v in settings.items() if old.get(k) != v]
    if changed:
        raise ConfigError(f"{out} was prepared with other settings ({', '.join(changed)}); prepare into another -o "
                          "directory or use the same settings")
    return manifest


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically (complete or absent), with the mode a plain new file gets (safetensors
    itself makes its files private, 0600)."""
    from safetensors.torch import save_file

    with atomic_output(path) as tmp:
        tmp.touch()
        mode = tmp.stat().st_mode
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, mode)


def _check_common(out: Path, text_context: torch.Tensor, mask_latent: torch.Tensor) -> None:
    """Write common.safetensors, or check that the existing one holds the same text context and mask."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = out / COMMON
    common = {"text_context": text_context.contiguous(), "mask_latent": mask_latent.contiguous()}
    if not path.exists():
        save_tensors(common, path, {"format": FORMAT})
        return
    try:
        old = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise ConfigError(f"{path}: not readable ({exc}); prepare into another -o directory") from None
    for name, value in common.items():
        if name not in old or old[name].shape != value.shape or not torch.equal(old[name], value):
            what = "text embeddings (--text-emb, --seed)" if name == "text_context" else "mouth mask (--mask)"
            raise ConfigError(f"{out} was prepared with other {what}; prepare into another -o directory")


def _next_shard(manifest: dict) -> str:
    used = [int(s["shard"][6:11]) for s in manifest["sources"].values() if s.get("shard")]
    return f"shard-{max(used, default=-1) + 1:05d}.safetensors"


def _prefix(path: Path, manifest: dict, shard: str) -> str:
    """A clip-id prefix no other source of the manifest uses: the file's stem, else the stem and shard number."""
    taken = {c["id"].rsplit("-", 1)[0] for c in manifest["clips"]}
    return path.stem if path.stem not in taken else f"{path.stem}-{shard[6:11]}"


def _forget(manifest: dict, key: str, given: str) -> str | None:
    """Drop a changed source's entries from the manifest; returns its old shard (to delete)."""
    old = manifest["sources"].pop(key)
    shard = old.get("shard")
    manifest["clips"] = [c for c in manifest["clips"] if shard is None or c["shard"] != shard]
    manifest["skipped"] = [e for e in manifest["skipped"]
                           if e["source"] != given and str(Path(e["source"]).resolve()) != key]
    return shard


def _input_paths(videos: Sequence[str | os.PathLike[str]]) -> list[str]:
    if not videos:
        raise ConfigError("no input videos: give one or more talking-head video files")
    problems = [f"{v}: {'is a directory' if Path(v).is_dir() else 'does not exist'}"
                for v in videos if not Path(v).is_file()]
    if problems:
        raise ConfigError("input videos not found:\n  " + "\n  ".join(problems))
    unique: dict[str, str] = {}
    for v in videos:
        unique.setdefault(str(Path(v).resolve()), str(v))
    return list(unique.values())


def prepare_data(videos: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str],
                 settings: PrepareSettings, *, progress: bool = True) -> PrepareReport:
    """Prepare ``videos`` into ``out_dir`` (created if needed; resumed if it holds earlier work): see the module
    docstring. Raises ConfigError for no inputs, a missing input, missing weight files, an output path that is a
    file or holds data prepared with other settings."""
    given = _input_paths(videos)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"-o {out} is a file; give a directory for the prepared data")
    nets = load_preparation_networks(settings)
    manifest = _open_manifest(out, manifest_settings(settings, nets))
    out.mkdir(parents=True, exist_ok=True)
    _check_common(out, nets.text_context, nets.mask_latent)
    write_json(out / MANIFEST, manifest)
    report = PrepareReport(out_dir=out)
    for source in given:
        path = Path(source)
        key, stat = str(path.resolve()), path.stat()
        old = manifest["sources"].get(key)
        if old is not None and old.get("size") == stat.st_size and old.get("mtime") == stat.st_mtime:
            report.sources_unchanged += 1
            continue
        old_shard = _forget(manifest, key, source) if old is not None else None
        shard = _next_shard(manifest)
        result = prepare_source(path, _prefix(path, manifest, shard), nets, settings, progress)
        if result.clips:
            save_tensors(result.tensors, out / shard, {"format": FORMAT, "source": source})
        skipped = [{"source": source, "start_frame": start, "reason": reason} for start, reason in result.skipped]
        for start, reason in result.skipped:
            log.warning("%s%s: skipped: %s", source, "" if start is None else f" frame {start}", reason)
        manifest["clips"] += [{**c, "source": source, "shard": shard} for c in result.clips]
        manifest["skipped"] += skipped
        manifest["sources"][key] = {"status": "done" if result.clips else "skipped", "size": stat.st_size,
                                    "mtime": stat.st_mtime, "shard": shard if result.clips else None,
                                    "clips": len(result.clips)}
        write_json(out / MANIFEST, manifest)
        if old_shard is not None and old_shard != shard:
            (out / old_shard).unlink(missing_ok=True)
        report.clips_added += len(result.clips)
        report.sources_done += bool(result.clips)
        report.sources_skipped += not result.clips
        report.skipped += skipped
    report.clips_total = len(manifest["clips"])
    return report


# ---------------------------------------------------------------------------------------------------
# Reader


@dataclass
class TrainClip:
    """One clip (or a batch of B clips) of the prepared data, float32 on the CPU."""

    id: str
    """The clip's id (a batch: the ids joined by commas)."""
    latents: torch.Tensor
    """[B, 16, L, h, w] unmasked latents (channels 49:65 of the DiT input, SPEC §3; x0 of the loss)."""
    masked_latents: torch.Tensor
    """[B, 16, L, h, w] latents of the mouth-masked frames (channels 33:49)."""
    audio: torch.Tensor
    """[B, V, A] per-video-frame audio features, V = 1 + 4 (L - 1)."""
    wav: torch.Tensor
    """[S] (a batch: [B, S]) the clip's 16 kHz speech, S = V * 640."""

    @property
    def ref_latent(self) -> torch.Tensor:
        """[B, 16, 1, h, w]: the reference latent (channels 16:32), the latent of frame 0 alone."""
        return self.latents[:, :, :1]


class TrainData:
    """Reads a directory written by ``prepare_data``; shards are opened on first use (memory-mapped)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        self.root = Path(root)
        try:
            manifest = json.loads((self.root / MANIFEST).read_text())
            common = load_file(str(self.root / COMMON))
        except (OSError, ValueError, SafetensorError) as exc:
            raise ConfigError(f"{NO_DATA.format(root=self.root)}: {exc}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ConfigError(f"{NO_DATA.format(root=self.root)}: {MANIFEST} is not {FORMAT}")
        if not manifest.get("clips"):
            raise ConfigError(f"{NO_DATA.format(root=self.root)}: it holds no clips")
        self.settings: dict = manifest["settings"]
        self.clips: list[dict] = manifest["clips"]
        self.skipped: list[dict] = manifest.get("skipped", [])
        self.text_context: torch.Tensor = common["text_context"]  # [1, T, D]
        self.mask_latent: torch.Tensor = common["mask_latent"]  # [1, 1, 1, h, w], 1 = mouth
        self._shards: dict[str, object] = {}

    def check_model(self, model: ModelConfig, preset: str) -> None:
        """Refuse data prepared for another model (its audio features or text embedding sizes)."""
        for key, want in (("audio_dim", model.audio_dim), ("text_dim", model.text_dim), ("text_len", model.text_len)):
            if self.settings.get(key) != want:
                raise ConfigError(f"{self.root}: prepared with {key} {self.settings.get(key)}, the {preset} model "
                                  f"needs {want} (prepare the data with the matching preset)")

    def __len__(self) -> int:
        return len(self.clips)

    def _shard(self, name: str):
        if name not in self._shards:
            from safetensors import safe_open

            path = self.root / name
            if not path.is_file():
                raise ConfigError(f"{path}: a shard the manifest lists is missing; run lipforcing prepare-data again")
            self._shards[name] = safe_open(str(path), framework="pt", device="cpu")
        return self._shards[name]

    def clip(self, index: int) -> TrainClip:
        """The clip ``index`` (manifest order) with a batch dimension of 1."""
        entry = self.clips[index]
        shard, name = self._shard(entry["shard"]), entry["id"]
        return TrainClip(id=name, latents=shard.get_tensor(f"{name}/latents")[None],
                         masked_latents=shard.get_tensor(f"{name}/masked_latents")[None],
                         audio=shard.get_tensor(f"{name}/audio")[None], wav=shard.get_tensor(f"{name}/wav"))

    def batch(self, indices: Sequence[int]) -> TrainClip:
        """The clips ``indices`` stacked along dim 0 (wav [B, S])."""
        clips = [self.clip(i) for i in indices]
        return TrainClip(id=",".join(c.id for c in clips), latents=torch.cat([c.latents for c in clips]),
                         masked_latents=torch.cat([c.masked_latents for c in clips]),
                         audio=torch.cat([c.audio for c in clips]), wav=torch.stack([c.wav for c in clips]))

    def other_clip(self, index: int) -> int:
        """Another clip than ``index``: the next one of the same source video (the same speaker) if it has one,
        else the next clip of the data set."""
        n, source = len(self.clips), self.clips[index].get("source")
        for k in range(1, n):
            j = (index + k) % n
            if self.clips[j].get("source") == source:
                return j
        if n < 2:
            raise ConfigError(f"{self.root}: one clip only; the copy check needs a second clip")
        return (index + 1) % n

    def __getstate__(self) -> dict:  # data-loader workers open their own shards
        return {**self.__dict__, "_shards": {}}


# ---------------------------------------------------------------------------------------------------
# Command line


def add_prepare_data_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``lipforcing prepare-data`` (one per ``PrepareSettings`` field)."""
    p.add_argument("videos", nargs="*", metavar="VIDEO", help="talking-head videos with their speech")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="where the data set goes (resumed if there)")
    p.add_argument("--preset", default="tiny", choices=PRESETS,
                   help="tiny: random-weight networks, for tests (default); real: the weight files below")
    p.add_argument("--codec", default="wan", choices=CODECS, help="latent encoder (default wan, as released)")
    p.add_argument("--size", type=int, default=FACE_SIZE, help="side of the encoded faces (default 512)")
    p.add_argument("--clip-frames", type=int, default=81, help="frames per clip, 1 + 4k (default 81)")
    p.add_argument("--stride", type=int, default=None, help="frames between clip starts (default: --clip-frames)")
    p.add_argument("--max-missing-faces", type=int, default=4,
                   help="skip a clip with more frames than this without a detected face (default 4)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0, help="seed of the tiny preset's random weights")
    w = p.add_argument_group("weights (--preset real)")
    w.add_argument("--wav2vec", metavar="DIR", help="directory with wav2vec2-base-960h (config.json + weights)")
    w.add_argument("--vae", metavar="FILE", help="Wan 2.1 VAE (Wan2.1_VAE.pth), for --codec wan")
    w.add_argument("--taehv", metavar="FILE", help="TAEHV for Wan 2.1 (taew2_1.pth), for --codec taehv")
    w.add_argument("--text-emb", "--text-embeds", dest="text_emb", metavar="FILE",
                   help="[1, 512, 4096] text embeddings (text_emb.pt); optional with --preset tiny")
    w.add_argument("--mask", metavar="IMAGE", help="mouth mask image (255 = keep) instead of the built-in one")
    p.add_argument("--audio-features", default="clip", choices=AUDIO_FEATURES,
                   help="clip: wav2vec2 over each clip's own speech (default, as the release trained); video: over "
                        "the whole video, sliced per clip (as inference computes them)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def settings_from_args(args: argparse.Namespace) -> PrepareSettings:
    """``PrepareSettings`` from the flags of ``add_prepare_data_arguments``."""
    return PrepareSettings(
        preset=args.preset, codec=args.codec, size=args.size, clip_frames=args.clip_frames, stride=args.stride,
        max_missing_faces=args.max_missing_faces, device=args.device or "", seed=args.seed, wav2vec=args.wav2vec,
        vae=args.vae, taehv=args.taehv, text_emb=args.text_emb, mask=args.mask, audio_features=args.audio_features,
    )


def run_prepare_data(args: argparse.Namespace) -> int:
    """``lipforcing prepare-data``: prepare, print a one-line summary, return 0."""
    report = prepare_data(args.videos, args.output, settings_from_args(args), progress=not args.quiet)
    print(report.summary())
    return 0
