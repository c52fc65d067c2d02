"""The engine: every network of a model, loaded once, wired into the fast path (or the reference path).

    engine = build_engine(RunConfig(model="14b", device="cuda"), Weights(ckpt=..., vae=..., taehv=..., ...))
    engine.warm_up()                              # tune kernels, capture graphs (also done by the first session)
    session = engine.session(speech_16k)          # LipSync: frames in, lip-synced frames out
    engine.path                                   # exactly which path runs: scheduler, pipeline, graphs, ...

The default path is the fast one: the static scheduler (CUDA graphs on CUDA, Triton kernels when
available) inside the chunk pipeline (encode | student | decode on device streams, alignment and
paste-back on worker threads), the TAEHV decoder on TensorRT when it can run. ``RunConfig`` switches each
piece back to its plain reference (``scheduler="reference"``, ``pipeline="sequential"``,
``backend="reference"``, ``decoder_backend="torch"``); tests hold the two paths equal.

``load_networks`` and ``Engine`` are separate so that several engines (the benchmark's ablation) share one
set of weights. An engine runs up to ``RunConfig.max_sessions`` sessions at once (default 1), from any
threads; their student calls are batched by ``runtime.batcher.StudentBatcher``.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..codecs.latent import make_decoder, make_encoder
from ..codecs.taehv import TAEHV
from ..codecs.wan_vae import WanVAE
from ..dit.checkpoint import load_text_embeds
from ..dit.config import ModelConfig, StreamConfig
from ..dit.fp8 import to_fp8
from ..dit.model import CausalWanStudent
from ..errors import ConfigError, EngineBusy, WeightsError
from ..media.face import FACE_BACKENDS, FaceAligner
from ..media.mask import latent_mask_channel, load_mask, mouth_mask01, pixel_mask, soft_mask
from ..numerics import parse_precision
from ..runtime.pipeline import ChunkPipeline, DeviceStreams
from ..runtime.sampler import StreamingSampler
from ..runtime.static import StaticStudent
from ..user_cache import persist_triton_autotuning

log = logging.getLogger("lipforcing")

WEIGHT_SOURCES = {
    "ckpt": "the Lip Forcing student checkpoint (lipforcing_14b.pth, from the Lip Forcing release)",
    "vae": "the Wan 2.1 VAE (Wan2.1_VAE.pth, from the Wan-AI/Wan2.1-T2V-1.3B or -14B release)",
    "taehv": "the TAEHV decoder for Wan 2.1 (taew2_1.pth, from the madebyollin/taehv repository)",
    "wav2vec": "a directory with facebook/wav2vec2-base-960h (config.json + model.safetensors)",
    "text_embeds": "UMT5-XXL embeddings of 'a person talking' ([1, 512, 4096] tensor, text_emb.pt)",
}
SCHEDULERS = ("static", "reference")
PIPELINES = ("streams", "sequential")


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Options of an engine; the CLI flags map onto these one to one."""

    model: str = "14b"
    """Student preset: tiny (random weights, for demos and tests), 1.3b or 14b."""
    device: str = ""
    """Where the networks run (default: cuda when available, else cpu)."""
    dtype: str = "bf16"
    """Weight dtype of the student and codecs: bf16, fp16, fp32, or fp8 (the student's block weights and KV cache
    in e4m3, computing in bf16; the codecs in bf16). The tiny model computes in fp32 (fp8: with e4m3 weights)."""
    encoder: str = "wan"
    """Latent encoder: wan (as released) or taehv."""
    encoder_group_frames: int | None = 4
    """Encode in groups of this many frames (4: the released procedure, least memory); None: whole chunks."""
    decoder: str = "taehv"
    """Latent decoder: taehv (as released) or wan."""
    decoder_group_latents: int | None = 1
    """Decode this many latents at a time (1: the released procedure, least memory); None: whole chunks."""
    decoder_backend: str | None = None
    """TAEHV decoder backend: auto, tensorrt, onnxruntime or torch (default: auto on CUDA, torch on CPU)."""
    compiled: str | None = None
    """A folder written by ``lipforcing compile`` whose artefacts the decoder backend uses."""
    scheduler: str = "static"
    """static (static buffers, CUDA graphs on CUDA) or reference (the plain eager loop)."""
    pipeline: str = ""
    """streams (device streams and worker threads) or sequential (every stage in turn, in the caller);
    default: streams on CUDA, sequential on a CPU (where the stages would compete for the same cores)."""
    cuda_graphs: bool | None = None
    """Replay the static scheduler's chunks from CUDA graphs (default: on CUDA)."""
    backend: str | None = None
    """Student kernels: reference, triton or sdpa (default: triton on CUDA when available)."""
    compile: bool = False
    """torch.compile each of the student's calls once per window shape (static scheduler)."""
    face_box: tuple[float, float, float, float] | None = None
    """Choose the face whose centre lies in this (x, y, w, h) box instead of the largest face."""
    face_backend: str = "mediapipe"
    """mediapipe (detect and track the face) or box (the face is ``face_box`` and does not move; no package)."""
    mask: str | None = None
    """A mouth mask image (255 = keep) instead of the built-in LatentSync-shaped mask."""
    require_face: bool = False
    """Fail instead of passing the video through when no face is found anywhere."""
    detect_every: int = 5
    """Run the face detector every k frames and track landmarks in between."""
    seed: int = 0
    """Seed of the sampler's noise (and of the tiny model's random weights)."""
    max_sessions: int = 1
    """Sessions that may run at once on the engine's weights (their student calls are batched)."""
    gpus: int = 1
    """Ranks each stream's student runs on (sequence parallel, dit/parallel.py); above 1 the engine is built inside
    rank 0 of an initialised torch.distributed group (``lipforcing run|serve --gpus N`` spawns the ranks). Several
    sessions share the ranks as they share one GPU (their chunks batched on every rank)."""

    def __post_init__(self) -> None:
        if not self.device:
            object.__setattr__(self, "device", _default_device())
        if not self.pipeline:
            object.__setattr__(self, "pipeline", "streams" if self.device.startswith("cuda") else "sequential")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"unknown scheduler {self.scheduler!r}; choose one of {SCHEDULERS}")
        if self.pipeline not in PIPELINES:
            raise ConfigError(f"unknown pipeline {self.pipeline!r}; choose one of {PIPELINES}")
        if self.max_sessions < 1:
            raise ConfigError(f"max_sessions must be at least 1, got {self.max_sessions}")
        if self.max_sessions > 1 and self.scheduler != "static":
            raise ConfigError("several sessions at once need the static scheduler")
        if self.gpus < 1:
            raise ConfigError(f"gpus must be at least 1, got {self.gpus}")
        if self.compile and self.scheduler != "static":
            raise ConfigError("--compile needs the static scheduler")
        if self.cuda_graphs and (self.scheduler != "static" or not self.device.startswith("cuda")):
            raise ConfigError("CUDA graphs need the static scheduler on a CUDA device")
        if self.face_backend not in FACE_BACKENDS:
            raise ConfigError(f"unknown face backend {self.face_backend!r}; choose one of {FACE_BACKENDS}")
        if self.face_backend == "box" and self.face_box is None:
            raise ConfigError("the box face backend needs the face's box (face_box / --face-box x,y,w,h)")
        parse_precision(self.dtype)

    @staticmethod
    def reference(**changes) -> RunConfig:
        """The plain reference path: eager loop, reference kernels, sequential stages, PyTorch decoder."""
        base = dict(scheduler="reference", pipeline="sequential", backend="reference", decoder_backend="torch")
        return RunConfig(**{**base, **changes})


@dataclass(frozen=True, kw_only=True)
class Weights:
    """Weight files of a real model (not needed for the tiny model)."""

    ckpt: str | None = None
    vae: str | None = None
    taehv: str | None = None
    wav2vec: str | None = None
    text_embeds: str | None = None


class AudioEncoder:
    """The wav2vec2 feature extractor, loaded on first use and freed on ``release()`` (it runs once per clip,
    so a single-clip run frees it before the first chunk)."""

    def __init__(self, load, device: torch.device) -> None:
        self._load, self._model, self.device = load, None, device
        self._lock = threading.Lock()  # sessions in several threads load it once (imports are not thread-safe)

    def __call__(self, speech: np.ndarray, n_frames: int) -> torch.Tensor:
        """speech: float32 [S] 16 kHz mono -> features [n_frames, audio_dim] on the engine's device."""
        model = self._model
        if model is None:
            with self._lock:
                if self._model is None:
                    self._model = self._load().to(self.device)
                model = self._model
        return model(speech, n_frames)

    def release(self) -> None:
        with self._lock:
            self._model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


@dataclass
class Networks:
    """The loaded networks of one model; engines built on them share the weights."""

    student: CausalWanStudent
    vae: WanVAE | None
    taehv: TAEHV | None
    audio: AudioEncoder
    text_context: torch.Tensor  # [1, text_len, text_dim]


def missing_weights(cfg: RunConfig, w: Weights) -> list[str]:
    """Which weight files a real model still needs, as lines naming the flag and where to get the file."""
    if cfg.model == "tiny":
        if w.ckpt is not None and not Path(w.ckpt).exists():
            return [f"--ckpt ({w.ckpt} does not exist): a tiny student exported by lipforcing train export"]
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


def require_device(cfg: RunConfig) -> torch.device:
    """The config's device, or ConfigError when it is CUDA and this machine has none."""
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but CUDA is not available; use --device cpu")
    return device


def require_weights(cfg: RunConfig, weights: Weights, *, student_only: bool = False) -> None:
    """WeightsError naming every weight file a run of ``cfg`` still needs (``student_only``: the checkpoint)."""
    missing = missing_weights(cfg, weights)
    if student_only:
        missing = [line for line in missing if line.startswith("--ckpt")]
    if missing:
        raise WeightsError(f"the {cfg.model} model needs these weight files:\n  " + "\n  ".join(missing))


def load_networks(cfg: RunConfig, weights: Weights = Weights()) -> Networks:
    """Load (or, for the tiny model, build with random weights) every network a run of ``cfg`` uses, each
    straight into its dtype on its device."""
    require_weights(cfg, weights)
    device = require_device(cfg)
    if cfg.model == "tiny":
        from ..dit.checkpoint import load_student
        from ..tools.tiny import tiny_networks, tiny_wav2vec2

        student, vae, taehv, text = tiny_networks(device, seed=cfg.seed)
        fp8 = parse_precision(cfg.dtype)[1]
        if weights.ckpt is not None:  # a tiny student trained by lipforcing train (the other networks stay random)
            student = load_student(weights.ckpt, cfg=student.cfg, device=device, dtype=torch.float32, fp8=fp8)
        elif fp8:
            to_fp8(student, torch.float32)
        return Networks(student, vae, taehv, AudioEncoder(lambda: tiny_wav2vec2(cfg.seed), device), text)
    from ..codecs.taehv import load_taehv
    from ..codecs.wan_vae import load_wan_vae
    from ..dit.checkpoint import load_student
    from ..media.audio_features import Wav2Vec2Features

    dtype = parse_precision(cfg.dtype)[0]
    student = load_student_network(cfg, weights)
    vae = load_wan_vae(weights.vae, device=device, dtype=dtype) if "wan" in (cfg.encoder, cfg.decoder) else None
    taehv = load_taehv(weights.taehv, device=device, dtype=dtype) if "taehv" in (cfg.encoder, cfg.decoder) else None
    _drop_unused_halves(cfg, vae, taehv)
    audio = AudioEncoder(lambda: Wav2Vec2Features.from_dir(weights.wav2vec), device)
    return Networks(student, vae, taehv, audio, load_text_embeds(weights.text_embeds, student.cfg.text_dim))


def load_student_network(cfg: RunConfig, weights: Weights = Weights()) -> CausalWanStudent:
    """The student network alone, as ``load_networks`` loads it (ranks 1..N-1 of ``--gpus N`` need nothing else:
    the codecs and wav2vec2 run on rank 0)."""
    if cfg.model == "tiny":
        return load_networks(cfg, weights).student  # seeded random codecs beside it: a few MB
    from ..dit.checkpoint import load_student

    require_weights(cfg, weights, student_only=True)
    dtype, fp8 = parse_precision(cfg.dtype)
    return load_student(weights.ckpt, cfg=ModelConfig.from_name(cfg.model), device=torch.device(cfg.device),
                        dtype=dtype, fp8=fp8)


def _drop_unused_halves(cfg: RunConfig, vae: WanVAE | None, taehv: TAEHV | None) -> None:
    """Free the encoder or decoder half of a codec the run does not use (the Wan decoder alone is 0.15 GB)."""
    if vae is not None and cfg.decoder != "wan":
        del vae.decoder, vae.conv2
    if vae is not None and cfg.encoder != "wan":
        del vae.encoder, vae.conv1
    if taehv is not None and cfg.encoder != "taehv":
        del taehv.encoder


@dataclass(eq=False)
class SessionParts:
    """What one session owns: codec states, its chunk pipeline and device streams, its face aligner."""

    streams: DeviceStreams
    encoder: object
    decoder: object
    pipeline: ChunkPipeline
    aligner: FaceAligner
    in_use: bool = False


class Engine:
    """Every part a session needs, built once from ``Networks`` and a ``RunConfig``. Up to ``max_sessions``
    sessions run at once, sharing the weights and, batched when they can be, the student's calls."""

    def __init__(self, config: RunConfig, networks: Networks) -> None:
        self.config, self.networks = config, networks
        self.device = device = torch.device(config.device)
        persist_triton_autotuning()
        self.face_size = networks.student.cfg.face_size  # side of the aligned crops (SPEC: 512; tiny: 256)
        self.stream = networks.student.cfg.face_stream()
        self.student = make_student(config, networks.student, self.stream)
        if config.gpus > 1:  # rank 0 of the stream's ranks: every student call goes to the others too
            from .ranked import RankedStudent

            self.student = RankedStudent(self.student, config)
        self.batcher = None
        if config.max_sessions > 1:
            from ..runtime.batcher import StudentBatcher

            self.batcher = StudentBatcher(self.student, gather_s=0.002 if device.type == "cuda" else 0.02)
        keep = load_mask(config.mask) if config.mask else mouth_mask01()
        self.keep_mask = keep  # [256, 256] (or the user's size), 1 = keep
        self.keep_pixels = pixel_mask(keep, self.face_size).to(device)  # [S, S] {0, 1}: masked stream
        self.soft_mask = soft_mask(keep, self.face_size).to(device)  # [S, S] paste-back blend
        self.mask_latent = latent_mask_channel(keep, self.stream.latent_h, self.stream.latent_w).to(device)
        self.parts: list[SessionParts] = [self._make_parts()]
        self._lock = threading.RLock()  # sessions start and end from any thread
        self.warmed_up = False
        log.info("lipforcing: engine %s", self.path)

    def _make_parts(self) -> SessionParts:
        cfg, nets = self.config, self.networks
        streams = DeviceStreams(self.device, enabled=cfg.pipeline == "streams")
        encoder = make_encoder(cfg.encoder, vae=nets.vae, taehv=nets.taehv, group_frames=cfg.encoder_group_frames)
        decoder = self._make_decoder(streams)
        pipeline = ChunkPipeline(self.student, encoder, decoder, self.keep_pixels, streams=streams)
        aligner = FaceAligner(cfg.face_backend, face_box=cfg.face_box, detect_every=cfg.detect_every,
                              warp="torch" if self.device.type == "cuda" else "cv2", device=self.device,
                              size=self.face_size)
        return SessionParts(streams=streams, encoder=encoder, decoder=decoder, pipeline=pipeline, aligner=aligner)

    # the first session's parts (a single-session engine has only these)
    streams = property(lambda self: self.parts[0].streams)
    encoder = property(lambda self: self.parts[0].encoder)
    decoder = property(lambda self: self.parts[0].decoder)
    pipeline = property(lambda self: self.parts[0].pipeline)
    aligner = property(lambda self: self.parts[0].aligner)

    @property
    def busy(self) -> bool:
        """Every session slot is taken."""
        return all(p.in_use for p in self.parts) and len(self.parts) >= self.config.max_sessions

    def acquire_parts(self) -> SessionParts:
        """A free set of session parts (EngineBusy when ``max_sessions`` sessions run already)."""
        with self._lock:
            free = next((p for p in self.parts if not p.in_use), None)
            if free is None:
                if len(self.parts) >= self.config.max_sessions:
                    raise EngineBusy(f"this engine already runs {self.config.max_sessions} session(s); close one "
                                     "first (or build the engine with a larger max_sessions)")
                free = self._make_parts()
                self.parts.append(free)
            free.in_use = True
        if self.batcher is not None:
            free.pipeline.student = self.batcher.session()
        return free

    def release_parts(self, parts: SessionParts) -> None:
        with self._lock:
            if not parts.in_use:
                return
            if self.batcher is not None:
                parts.pipeline.student.close()
            parts.in_use = False

    def _make_decoder(self, streams: DeviceStreams):
        cfg, nets = self.config, self.networks
        backend = cfg.decoder_backend or ("auto" if self.device.type == "cuda" else "torch")
        if cfg.decoder != "taehv" or backend == "torch":
            if cfg.decoder != "taehv" and backend not in ("torch", "auto"):
                log.warning("lipforcing: decoder backend %s applies to TAEHV only; the Wan decoder runs in PyTorch",
                            backend)
            return make_decoder(cfg.decoder, vae=nets.vae, taehv=nets.taehv, group_latents=cfg.decoder_group_latents)
        from ...compile.decoder import make_decoder_backend

        return make_decoder_backend(nets.taehv, backend, latent_hw=(self.stream.latent_h, self.stream.latent_w),
                                    device=self.device, compiled_dir=cfg.compiled, stream=streams.stream("decode"),
                                    group_latents=cfg.decoder_group_latents)

    @property
    def path(self) -> dict:
        """Exactly which path runs (the run report and the benchmark record it)."""
        student = self.student
        return {
            "scheduler": self.config.scheduler,
            "pipeline": self.config.pipeline,
            "device_streams": self.streams.parallel,
            "cuda_graphs": bool(getattr(student, "cuda_graphs", False)),
            "attention": student.backend,
            "compile": self.config.compile,
            "encoder": self.config.encoder,
            "decoder": self.config.decoder,
            "decoder_backend": self.decoder.backend,
            "face": self.config.face_backend,
            "device": str(self.device),
            "model": self.config.model,
            "max_sessions": self.config.max_sessions,
            "gpus": self.config.gpus,
            "dtype": self.config.dtype if self.config.model != "tiny" or self.config.dtype == "fp8" else "fp32",
            "kv_cache": str(student.cache.k.dtype).removeprefix("torch."),
        }

    @property
    def needs_warm_up(self) -> bool:
        """Whether a warm-up has anything to do: kernels to tune, graphs to capture, calls to compile."""
        return not self.warmed_up and (self.device.type == "cuda" or self.config.compile
                                       or self.student.backend == "triton")

    @torch.no_grad()
    def warm_up(self) -> float:
        """Tune the kernels and capture the graphs of every window shape on dummy data, and run the codecs once,
        before the first real chunk. Returns the seconds spent (0 when there is nothing to prepare)."""
        with self._lock:
            return self._warm_up()

    def _warm_up(self) -> float:
        if not self.needs_warm_up:
            self.warmed_up = True
            return 0.0
        import time

        began = time.perf_counter()
        self.student.warm_up(self.networks.text_context)
        freed = offload_text_weights(self.config, self.networks.student)
        if freed:
            log.info("lipforcing: text-only weights moved to host memory (%.2f GB)", freed / 1e9)
        s = self.face_size
        self.encoder.push(torch.zeros(2, 9, 3, s, s, device=self.device))
        z = torch.zeros(1, 16, self.stream.chunk_frames, self.stream.latent_h, self.stream.latent_w, device=self.device)
        self.decoder.push(z)
        self.encoder.reset()
        self.decoder.reset()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.warmed_up = True
        return time.perf_counter() - began

    def session(self, speech: np.ndarray | None = None, *, sample_rate: int = 16000, timing: bool = False,
                lookahead: float | None = None, context: float | None = None, avatar=None):
        """A new ``LipSync`` session on this engine (at most ``max_sessions`` at once): the whole speech up front,
        or live speech (``lookahead``, or no speech), on pushed frames or on a prepared ``avatar``."""
        from ..media.live_audio import DEFAULT_CONTEXT_S
        from .session import LipSync

        return LipSync(self, speech, sample_rate=sample_rate, timing=timing, lookahead=lookahead,
                       context=DEFAULT_CONTEXT_S if context is None else context, avatar=avatar)

    def close(self) -> None:
        """Stop the engine's worker thread (several sessions) and, with several GPUs, the other ranks' students;
        its sessions must have ended."""
        if self.batcher is not None:
            self.batcher.shutdown()
        if hasattr(self.student, "stop"):
            self.student.stop()

    def release_audio_encoder(self) -> None:
        """Free wav2vec2 (it is loaded again by the next session)."""
        self.networks.audio.release()


def offload_text_weights(config: RunConfig, model: CausalWanStudent) -> int:
    """After the student's warm-up (its text K/V are cached), on CUDA with the static scheduler: move the text-only
    weights to host memory (4.3 GB for 14B). Bytes freed, 0 where they stay. Every rank of ``--gpus N`` does it."""
    if torch.device(config.device).type != "cuda" or config.scheduler != "static":
        return 0
    return model.offload_text_weights()


def make_student(config: RunConfig, model: CausalWanStudent, stream: StreamConfig | None = None):
    """The scheduler around the student: StaticStudent or the reference StreamingSampler (``stream``: default the
    model's face crops, as the engine runs it); with ``gpus`` above 1 this process's share of the stream (the
    default torch.distributed group must be initialised)."""
    stream = stream or model.cfg.face_stream()
    parallel = None
    if config.gpus > 1:
        from ..dit.parallel import SequenceParallel

        parallel = SequenceParallel()
        if parallel.size != config.gpus:
            raise ConfigError(f"gpus is {config.gpus} but the process group has {parallel.size} ranks")
    if config.scheduler == "static":
        return StaticStudent(model, stream, slots=config.max_sessions, backend=config.backend, seed=config.seed,
                             cuda_graphs=config.cuda_graphs, compile=config.compile, parallel=parallel)
    return StreamingSampler(model, stream, backend=config.backend, seed=config.seed, parallel=parallel)


def build_engine(cfg: RunConfig, weights: Weights = Weights()) -> Engine:
    """Load the networks of ``cfg`` and build its engine."""
    return Engine(cfg, load_networks(cfg, weights))
