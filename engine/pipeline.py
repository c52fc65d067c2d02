"""The whole media path as a streaming session: frames + speech in, lip-synced frames out.

    parts = build_components(RunConfig(model="14b", device="cuda"), Weights(ckpt=..., vae=..., ...))
    session = LipSync(parts, speech_16k)          # audio features of the whole clip are computed here
    for frames in source:                         # np.uint8 [H, W, 3] RGB frames, any batch size
        for out in session.push(frames):          # finished frames, chunk by chunk
            writer.write(out)
    for out in session.close(): writer.write(out)

Per chunk (9 source frames for chunk 0, then 12): align each face to 512x512 (SPEC §8), zero the mouth
for the masked stream, encode both streams (each with its own causal encoder state), run the student's
two denoising calls and its commit call, decode, blend the generated mouth with the aligned original
using the soft mask, and paste the face back into the frame.

Latency: a chunk's frames come out once its last source frame has arrived: 9 frames (0.36 s of video)
for the first chunk, then 12 (0.48 s), plus the processing time of one chunk. Audio features need the
whole clip: wav2vec2's attention is global in the released model, so the speech must be known when the
session starts (a live mode with bounded look-ahead would change what the network sees).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .codecs import BackendTAEHVDecoder, LatentDecoder, LatentEncoder, make_decoder, make_encoder
from .config import ModelConfig, StreamConfig
from .errors import ConfigError, WeightsError
from .face import FACE_SIZE, AlignedFace, FaceAligner
from .mask import latent_mask_channel, load_mask, mouth_mask01, pixel_mask, soft_mask
from .media import chunk_frame_range, clip_length_from_samples
from .paste_back import faces_to_tensor, paste_back
from .scheduler import StaticStudent

log = logging.getLogger("lipforcing")

WEIGHT_SOURCES = {
    "ckpt": "the Lip Forcing student checkpoint (lipforcing_14b.pth, from the Lip Forcing release)",
    "vae": "the Wan 2.1 VAE (Wan2.1_VAE.pth, from the Wan-AI/Wan2.1-T2V-1.3B or -14B release)",
    "taehv": "the TAEHV decoder for Wan 2.1 (taew2_1.pth, from the madebyollin/taehv repository)",
    "wav2vec": "a directory with facebook/wav2vec2-base-960h (config.json + model.safetensors)",
    "text_embeds": "UMT5-XXL embeddings of 'a person talking' ([1, 512, 4096] tensor, text_emb.pt)",
}


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Options of one run; the CLI flags map onto these one to one."""

    model: str = "14b"
    """Student preset: tiny (random weights, for demos and tests), 1.3b or 14b."""
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    """Where the networks run."""
    dtype: str = "bf16"
    """Weight dtype of the student: bf16, fp16 or fp32 (the tiny model always runs in fp32)."""
    encoder: str = "wan"
    """Latent encoder: wan (as released) or taehv."""
    decoder: str = "taehv"
    """Latent decoder: taehv (as released) or wan."""
    decoder_backend: str | None = None
    """TAEHV decoder backend: auto, tensorrt, onnxruntime or torch (default: auto on CUDA, torch on CPU)."""
    compile: bool = False
    """torch.compile the student's blocks (another student backend; compiles on the first chunks)."""
    backend: str | None = None
    """Student attention backend: reference or triton (default: triton on CUDA when available)."""
    face_box: tuple[float, float, float, float] | None = None
    """Choose the face whose centre lies in this (x, y, w, h) box instead of the largest face."""
    mask: str | None = None
    """A mouth mask image (255 = keep) instead of the built-in LatentSync-shaped mask."""
    require_face: bool = False
    """Fail instead of passing the video through when no face is found anywhere."""
    detect_every: int = 5
    """Run the face detector every k frames and track landmarks in between."""
    seed: int = 0
    """Seed of the sampler's noise."""


@dataclass(frozen=True, kw_only=True)
class Weights:
    """Weight files of a real model (not needed for the tiny model)."""

    ckpt: str | None = None
    vae: str | None = None
    taehv: str | None = None
    wav2vec: str | None = None
    text_embeds: str | None = None


@dataclass
class Components:
    """Everything a session needs, loaded once and reusable across clips."""

    student: StaticStudent
    encoder_masked: LatentEncoder
    encoder_ref: LatentEncoder
    decoder: LatentDecoder
    audio_features: torch.nn.Module  # (audio [S] 16 kHz, n_frames) -> [n_frames, audio_dim]
    text_context: torch.Tensor  # [1, text_len, text_dim]
    aligner: FaceAligner
    keep_mask: torch.Tensor  # [256, 256] (or the user's size) 1 = keep
    config: RunConfig


def _dtype(name: str) -> torch.dtype:
    try:
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}; choose bf16, fp16 or fp32") from None


def missing_weights(cfg: RunConfig, w: Weights) -> list[str]:
    """Which weight files a real model still needs, as lines naming the flag and where to get the file."""
    if cfg.model == "tiny":
        return []
    needed = {"ckpt", "wav2vec", "text_embeds"}
    needed |= {"vae"} if "wan" in (cfg.encoder, cfg.decoder) else set()
    needed |= {"taehv"} if "taehv" in (cfg.encoder, cfg.decoder) else set()
    lines = []
    for name in sorted(needed):
        value = getattr(w, name)
        if value is None or not Path(value).exists():
            flag = "--" + name.replace("_", "-")
            state = "not given" if value is None else f"{value} does not exist"
            lines.append(f"{flag} ({state}): {WEIGHT_SOURCES[name]}")
    return lines


def build_components(cfg: RunConfig, weights: Weights = Weights()) -> Components:
    """Load (or, for the tiny model, build with random weights) every network of a run."""
    missing = missing_weights(cfg, weights)
    if missing:
        raise WeightsError(f"the {cfg.model} model needs these weight files:\n  " + "\n  ".join(missing))
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but CUDA is not available; use --device cpu")
    stream = StreamConfig.for_resolution(FACE_SIZE, FACE_SIZE)
    if cfg.model == "tiny":
        from .demo_models import tiny_components

        model, vae, taehv, audio, text = tiny_components(device, seed=cfg.seed)
    else:
        model, vae, taehv, audio, text = _real_components(cfg, weights, device)
    if cfg.compile:
        from ..compile.backends import compile_student

        compile_student(model)
    student = StaticStudent(model, stream, backend=cfg.backend, seed=cfg.seed)
    keep = load_mask(cfg.mask) if cfg.mask else mouth_mask01()
    return Components(
        student=student,
        encoder_masked=make_encoder(cfg.encoder, vae=vae, taehv=taehv),
        encoder_ref=make_encoder(cfg.encoder, vae=vae, taehv=taehv),
        decoder=_decoder(cfg, vae, taehv, stream, device),
        audio_features=audio,
        text_context=text,
        aligner=FaceAligner(face_box=cfg.face_box, detect_every=cfg.detect_every,
                            warp="torch" if device.type == "cuda" else "cv2", device=device),
        keep_mask=keep,
        config=cfg,
    )


def _decoder(cfg: RunConfig, vae, taehv, stream: StreamConfig, device: torch.device):
    """The latent decoder; TAEHV may run through a compiled backend (falls back loudly when absent)."""
    backend = cfg.decoder_backend or ("auto" if device.type == "cuda" else "torch")
    if cfg.decoder != "taehv" or backend == "torch":
        if cfg.decoder != "taehv" and backend not in ("torch", "auto"):
            log.warning("lipforcing: decoder backend %s applies to TAEHV only; the Wan decoder runs in PyTorch",
                        backend)
        return make_decoder(cfg.decoder, vae=vae, taehv=taehv)
    from ..compile.backends import ChunkDecoder

    chunk = ChunkDecoder.create(taehv, backend=backend, latent_hw=(stream.latent_h, stream.latent_w), device=device)
    return BackendTAEHVDecoder(chunk) if chunk.backend != "torch" else make_decoder("taehv", taehv=taehv)


def _real_components(cfg: RunConfig, w: Weights, device: torch.device):
    from .audio_features import Wav2Vec2Features
    from .checkpoint import load_student
    from .taehv import load_taehv
    from .wan_vae import load_wan_vae

    dtype = _dtype(cfg.dtype)
    model = load_student(w.ckpt, cfg=ModelConfig.from_name(cfg.model), device=device, dtype=dtype)
    vae = load_wan_vae(w.vae, device=device, dtype=dtype) if w.vae and "wan" in (cfg.encoder, cfg.decoder) else None
    taehv = load_taehv(w.taehv, device=device, dtype=dtype) if "taehv" in (cfg.encoder, cfg.decoder) else None
    audio = Wav2Vec2Features.from_dir(w.wav2vec, device=device)
    return model, vae, taehv, audio, load_text_embeds(w.text_embeds, model.cfg)


def load_text_embeds(path: str, cfg: ModelConfig) -> torch.Tensor:
    """A [1, text_len, text_dim] tensor (or [text_len, text_dim], or a dict holding one) -> [1, L, D]."""
    from .checkpoint import read_state_dict

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True) if not path.endswith(".safetensors") \
            else read_state_dict(path)
    except Exception as exc:  # a text-embedding file is small; any failure to read it is the user's file
        raise WeightsError(f"{path}: cannot read the text embeddings ({exc})") from None
    if isinstance(obj, dict):
        tensors = [v for v in obj.values() if isinstance(v, torch.Tensor)]
        if len(tensors) != 1:
            raise WeightsError(f"{path}: expected one tensor in the dict, found {len(tensors)}")
        obj = tensors[0]
    if not isinstance(obj, torch.Tensor):
        raise WeightsError(f"{path}: expected a tensor of text embeddings")
    x = obj[None] if obj.dim() == 2 else obj
    if x.dim() != 3 or x.shape[0] != 1 or x.shape[2] != cfg.text_dim:
        raise WeightsError(f"{path}: text embeddings must be [1, text_len, {cfg.text_dim}], got {tuple(obj.shape)}")
    return x.float()


@dataclass
class StageTimes:
    """Wall seconds per stage (CUDA is synchronised at stage boundaries only when timing is requested)."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    sync: bool = False

    def measure(self, name: str):
        return _Timer(self, name)


class _Timer:
    def __init__(self, times: StageTimes, name: str) -> None:
        self.times, self.name = times, name

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        if self.times.sync and torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.seconds[self.name] += time.perf_counter() - self.start


class LipSync:
    """A streaming lip-sync session over one clip (the speech is known up front)."""

    def __init__(self, parts: Components, speech: np.ndarray, *, timing: bool = False) -> None:
        """speech: float32 [S] 16 kHz mono."""
        self.parts = parts
        self.length = clip_length_from_samples(int(np.asarray(speech).shape[-1]))
        self.times = StageTimes(sync=timing)
        student = parts.student
        self.device = student.device
        with self.times.measure("audio features"):
            feats = parts.audio_features(speech, self.length.frames)  # [N, audio_dim]
        if feats.shape[-1] != student.model.cfg.audio_dim:
            raise ConfigError(f"audio features have {feats.shape[-1]} channels; the model expects "
                              f"{student.model.cfg.audio_dim}")
        self._audio = feats[None].to(self.device)
        self._keep_px = pixel_mask(parts.keep_mask, FACE_SIZE).to(self.device)  # [512, 512] 1 = keep
        self._soft = soft_mask(parts.keep_mask, FACE_SIZE).to(self.device)
        h, w = student.stream.latent_h, student.stream.latent_w
        self._mask_latent = latent_mask_channel(parts.keep_mask, h, w).to(self.device)
        for part in (parts.encoder_masked, parts.encoder_ref, parts.decoder, parts.aligner):
            part.reset()
        self._pending: list[np.ndarray] = []
        self._chunk = 0
        self._started = False
        self._last_crop: np.ndarray | None = None
        self.faces_found = 0
        self.frames_out = 0

    @property
    def frames_needed(self) -> int:
        """Output length N (SPEC §6): push at least this many source frames (extra ones are ignored)."""
        return self.length.frames

    def push(self, frames: np.ndarray | list[np.ndarray]) -> list[np.ndarray]:
        """Accept source frames (np.uint8 [H, W, 3] each, or [T, H, W, 3]); return finished frames."""
        batch = list(frames) if not isinstance(frames, np.ndarray) or frames.ndim == 4 else [frames]
        self._pending.extend(batch)
        out: list[np.ndarray] = []
        while self._chunk < self.length.chunks and len(self._pending) >= len(chunk_frame_range(self._chunk)):
            n = len(chunk_frame_range(self._chunk))
            chunk, self._pending = self._pending[:n], self._pending[n:]
            out.extend(self._process(chunk))
        return out

    def close(self) -> list[np.ndarray]:
        """Flush: a last incomplete chunk is completed by repeating its final frame and its output is cut
        to the frames actually pushed."""
        out: list[np.ndarray] = []
        if self._pending and self._chunk < self.length.chunks:
            n = len(chunk_frame_range(self._chunk))
            real = len(self._pending)
            chunk = self._pending + [self._pending[-1]] * (n - real)
            out = self._process(chunk)[:real]
        self._pending = []
        return out

    def _align(self, frames: list[np.ndarray]) -> list[AlignedFace | None]:
        with self.times.measure("face alignment"):
            faces = [self.parts.aligner.align(f) for f in frames]
        self.faces_found += sum(f is not None and not f.reused for f in faces)
        return faces

    def _crops(self, faces: list[AlignedFace | None]) -> torch.Tensor:
        """Aligned crops in [-1, 1], [T, 3, 512, 512]; frames without a face borrow the nearest crop."""
        crops = []
        for i, face in enumerate(faces):
            if face is None:
                donor = next((f for f in faces[i:] if f is not None), None)
                crop = donor.image if donor is not None else self._last_crop
                if crop is None:
                    crop = np.full((FACE_SIZE, FACE_SIZE, 3), 127, np.uint8)
            else:
                crop = face.image
            self._last_crop = crop
            crops.append(crop)
        return faces_to_tensor(crops, self.device) * 2 - 1

    def _process(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        parts, student, t = self.parts, self.parts.student, self.times
        faces = self._align(frames)
        crops = self._crops(faces)  # [T, 3, 512, 512] in [-1, 1]
        with t.measure("encode"):
            masked = parts.encoder_masked.push(crops * self._keep_px)
            ref_seq = parts.encoder_ref.push(crops)
        if not self._started:
            student.start_clip(parts.text_context, self._audio, ref_seq[:, :, :1], self._mask_latent)
            self._started = True
        with t.measure("student"):
            x0 = student.run_chunk(masked, ref_seq)
        with t.measure("decode"):
            generated = parts.decoder.push(x0)  # [T, 3, 512, 512] in [0, 1]
        with t.measure("paste-back"):
            out = self._paste(frames, faces, generated, (crops + 1) / 2)
        self._chunk += 1
        self.frames_out += len(out)
        return out

    def _paste(self, frames, faces, generated, aligned) -> list[np.ndarray]:
        out = list(frames)
        idx = [i for i, f in enumerate(faces) if f is not None]
        if not idx:
            return out
        by_size: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i in idx:
            by_size[frames[i].shape].append(i)
        for group in by_size.values():
            src = torch.from_numpy(np.stack([frames[i] for i in group])).to(self.device)
            inverse = np.stack([faces[i].inverse for i in group])
            pasted = paste_back(src, generated[group].float(), aligned[group].float(), self._soft, inverse)
            for j, i in enumerate(group):
                out[i] = pasted[j].cpu().numpy()
        return out
