"""``lipforcing bench``: end-to-end throughput, time to first frame and per-stage times of the engine,
reference and optimized backends side by side in one run.

    python -m lipforcing.engine.cli bench --model 1.3b --chunks 20 --warmup 3 --out results.json
    lipforcing bench --model tiny --compare baseline.json --max-regression 5     # CI gate

What each figure means is written into the JSON (``fields``, see ``bench/report.py``). Inputs are random
(not zeros) at the real shapes; with ``--model`` the weights are random too, with ``--ckpt`` real.
Backends:
    reference  the plain sequential loop: StreamingSampler (eager, reference attention), PyTorch decoder
    optimized  StaticStudent (Triton kernels when available, CUDA graphs on CUDA) inside ChunkPipeline
               (encode / student / decode on three CUDA streams), decoder via TensorRT when available
    compiled   optimized with the student's blocks under torch.compile (opt-in: compiling takes minutes;
               it changes the model in place, so it is always measured last)
On a machine without CUDA the tiny model runs on the CPU and the report says the figures are CPU figures.
"""

from __future__ import annotations

import json
import logging
import platform
import statistics
import subprocess
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from ..engine.codecs import make_decoder, make_encoder
from ..engine.config import ModelConfig, StreamConfig
from ..engine.info import model_info
from ..engine.model import CausalWanStudent
from ..engine.sampler import StreamingSampler
from ..engine.scheduler import ChunkPipeline, StaticStudent
from ..engine.taehv import TAEHV, TAEHVConfig
from ..engine.wan_vae import WanVAE, WanVAEConfig
from .report import FIELDS, SCHEMA

log = logging.getLogger("lipforcing")


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    model: str = "tiny"
    height: int = 512
    width: int = 512
    chunks: int = 8
    """Timed steady-state chunks (after the warm-up)."""
    warmup: int = 3
    """Untimed chunks first; at least 3 so every window shape (chunk 0, 1, steady) is warm."""
    backends: tuple[str, ...] = ("reference", "optimized")
    device: str = "cuda"
    dtype: str = "bf16"
    encoder: str = "wan"
    ckpt: str | None = None
    progress: bool = True


class _Clock:
    """Per-stage timing: CUDA events on a GPU, wall clock on a CPU (results in ms)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.samples: dict[str, list[float]] = defaultdict(list)

    def stage(self, name: str, fn, *args):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(*args)
            end.record()
            end.synchronize()
            self.samples[name].append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            out = fn(*args)
            self.samples[name].append((time.perf_counter() - t0) * 1e3)
        return out

    def medians(self) -> dict[str, float]:
        return {k: round(statistics.median(v), 3) for k, v in self.samples.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_networks(cfg: BenchConfig, device: torch.device):
    """Student (random weights at real shapes, or the checkpoint), encoder and decoder models."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.dtype]
    tiny = cfg.model == "tiny"
    if tiny:
        dtype = torch.float32
    if cfg.ckpt:
        from ..engine.checkpoint import load_student

        model = load_student(cfg.ckpt, device=device, dtype=dtype)
    else:
        with torch.device("meta"):
            model = CausalWanStudent(ModelConfig.from_name(cfg.model))
        model = model.to_empty(device=device).to(dtype)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
    taehv_cfg = TAEHVConfig(encoder_width=16, decoder_widths=(32, 16, 16, 16)) if tiny else TAEHVConfig()
    taehv = TAEHV(taehv_cfg).to(device, dtype).eval()
    vae = None
    if cfg.encoder == "wan":
        vae = WanVAE(WanVAEConfig.from_name("tiny" if tiny else "wan2.1")).to(device, dtype).eval()
    return model.eval(), vae, taehv


def _inputs(model: CausalWanStudent, stream: StreamConfig, n_chunks: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    latent = 3 * n_chunks
    v = 1 + 4 * (latent - 1)
    text = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g)
    audio = torch.randn(1, v, cfg.audio_dim, generator=g)
    h, w = stream.latent_h * 8, stream.latent_w * 8
    pixels = [torch.rand(9 if b == 0 else 12, 3, h, w, generator=g) * 2 - 1 for b in range(n_chunks)]
    mask = (torch.rand(1, 1, 1, stream.latent_h, stream.latent_w, generator=g) > 0.6).float()
    return text, audio, pixels, mask


def _telemetry() -> dict:
    try:
        import pynvml
    except ImportError:
        return {"nvml": "nvidia-ml-py not installed"}
    try:
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        util = pynvml.nvmlDeviceGetUtilizationRates(h)
        return {
            "name": pynvml.nvmlDeviceGetName(h),
            "sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
            "mem_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM),
            "power_w": pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0,
            "temperature_c": pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU),
            "gpu_utilization_pct": util.gpu,
            "memory_utilization_pct": util.memory,
            "driver": pynvml.nvmlSystemGetDriverVersion(),
        }
    except Exception as exc:  # telemetry is informative; a failure must not lose the measurement
        return {"nvml": f"unavailable: {exc}"}


def _run_backend(name: str, cfg: BenchConfig, nets, stream: StreamConfig, device: torch.device, bar) -> dict:
    model, vae, taehv = nets
    total = cfg.warmup + cfg.chunks
    text, audio, pixels, mask = _inputs(model, stream, total, device)
    enc_m = make_encoder(cfg.encoder, vae=vae, taehv=taehv)
    enc_r = make_encoder(cfg.encoder, vae=vae, taehv=taehv)
    keep = (torch.rand(pixels[0].shape[-2:], generator=torch.Generator().manual_seed(1)) > 0.4).float().to(device)

    def encode(px):
        return enc_m.push(px * keep), enc_r.push(px)

    paste = _paste_stage(pixels[0].shape[-2:], device)

    optimized = name in ("optimized", "compiled")
    if name == "compiled":
        from ..compile.backends import compile_student

        compile_student(model, mode="max-autotune-no-cudagraphs" if device.type == "cuda" else None)
    if optimized:
        from ..compile.backends import ChunkDecoder

        student = StaticStudent(model, stream)
        chunk_decoder = ChunkDecoder.create(taehv, backend="auto", latent_hw=(stream.latent_h, stream.latent_w),
                                            device=device)

        def decode(x0):
            return chunk_decoder(x0.permute(0, 2, 1, 3, 4))

        decoder_backend, student_backend = chunk_decoder.backend, f"{student.backend}+graphs={student.cuda_graphs}"
    else:
        student = StreamingSampler(model, stream, backend="reference")
        dec = make_decoder("taehv", taehv=taehv)
        decode, decoder_backend, student_backend = dec.push, "torch", "reference"

    def reset():
        for e in (enc_m, enc_r):
            e.reset()
        if optimized:
            chunk_decoder.reset()
        else:
            dec.reset()

    # 1. per-stage times, stages run one after another (warm-up chunks excluded)
    clock = _Clock(device)
    reset()
    first = encode(pixels[0].to(device))
    student.start_clip(text, audio, first[1][:, :, :1], mask)
    reset()
    for b in range(total):
        px = pixels[b].to(device)
        masked, ref = clock.stage("encode", encode, px)
        step = student.run_chunk if optimized else (lambda m, r: student.denoise_chunk(m, r).x0)
        x0 = clock.stage("student", step, masked, ref)
        frames = clock.stage("decode", decode, x0)
        if paste is not None:
            clock.stage("paste-back", paste, frames)
        if b < cfg.warmup:
            clock.samples.clear()
        bar.update(1)
    stage_ms = clock.medians()

    # 2. time to first frame: a fresh clip on the warm engine, from submitting chunk 0 to its frames on the host
    reset()
    student.start_clip(text, audio, first[1][:, :, :1], mask)
    host_pixels = [p.pin_memory() if device.type == "cuda" else p for p in pixels]
    if optimized:
        pipe = ChunkPipeline(student, encode, decode)

        def run(chunks):
            return list(pipe.run(chunks))
    else:
        def run(chunks):
            return [decode(student.denoise_chunk(*encode(p.to(device))).x0).cpu() for p in chunks]
    _sync(device)
    t0 = time.perf_counter()
    run(host_pixels[:1])
    ttff_ms = (time.perf_counter() - t0) * 1e3
    # 3. throughput: the rest of the warm-up drained, then the timed chunks as one pipelined run of the same
    #    clip (the pipeline fills and drains once inside the timed region, which slightly understates fps)
    run(host_pixels[1 : cfg.warmup])
    bar.update(cfg.warmup)
    _sync(device)
    t0 = time.perf_counter()
    outs = run(host_pixels[cfg.warmup :])
    _sync(device)
    elapsed = time.perf_counter() - t0
    bar.update(cfg.chunks)
    n_frames = sum(o.shape[0] if o.dim() == 4 else o.shape[1] for o in outs)
    fps = n_frames / elapsed
    info = model_info(model.cfg, stream)
    student_ms = stage_ms.get("student", float("nan"))
    return {
        "fps": round(fps, 3),
        "ttff_ms": round(ttff_ms, 3),
        "stage_ms": stage_ms,
        "chunk_ms": round(elapsed / cfg.chunks * 1e3, 3),
        "frames": n_frames,
        "chunks": cfg.chunks,
        "achieved_tflops": round(info.flops_per_chunk_steady / (student_ms / 1e3) / 1e12, 3),
        "student_backend": student_backend,
        "decoder_backend": decoder_backend,
        "encoder": cfg.encoder,
    }


def _paste_stage(hw: tuple[int, int], device: torch.device):
    """Paste-back of decoded 512x512 faces into 720p frames (a fixed, slightly rotated placement)."""
    import numpy as np

    from ..engine.face import FACE_SIZE
    from ..engine.mask import mouth_mask01, soft_mask
    from ..engine.paste_back import paste_back

    if tuple(hw) != (FACE_SIZE, FACE_SIZE):
        return None
    soft = soft_mask(mouth_mask01(), FACE_SIZE).to(device)
    g = torch.Generator().manual_seed(2)
    frame = (torch.rand(1, 720, 1280, 3, generator=g) * 255).to(torch.uint8).to(device)
    a = np.deg2rad(3.0)
    inverse = np.array([[0.8 * np.cos(a), -0.8 * np.sin(a), 430.0], [0.8 * np.sin(a), 0.8 * np.cos(a), 140.0]])

    def paste(frames: torch.Tensor) -> torch.Tensor:
        faces = frames.reshape(-1, *frames.shape[-3:]).float()  # [T, 3, 512, 512] in [0, 1]
        t = faces.shape[0]
        return paste_back(frame.expand(t, -1, -1, -1), faces, faces, soft, np.repeat(inverse[None], t, 0))

    return paste


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_bench(cfg: BenchConfig) -> dict:
    """Measure every backend of ``cfg`` in this process; returns the report (schema lipforcing-bench/1)."""
    if cfg.warmup < 3:
        raise ValueError("--warmup must be at least 3 chunks (chunk 0, chunk 1 and a steady-state chunk)")
    device = torch.device(cfg.device)
    stream = StreamConfig.for_resolution(cfg.height, cfg.width)
    nets = build_networks(cfg, device)
    from tqdm import tqdm

    total = len(cfg.backends) * 2 * (cfg.warmup + cfg.chunks)
    results = {}
    order = sorted(cfg.backends, key=lambda b: b == "compiled")  # compiling changes the model in place
    with tqdm(total=total, unit="chunk", desc="bench", disable=not cfg.progress) as bar:
        for name in order:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            res = _run_backend(name, cfg, nets, stream, device, bar)
            if device.type == "cuda":
                res["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
            results[name] = res
    if "reference" in results:
        for res in results.values():
            res["speedup_vs_reference"] = round(res["fps"] / results["reference"]["fps"], 3)
    cuda = device.type == "cuda"
    return {
        "schema": SCHEMA,
        "fields": FIELDS,
        "device": {
            "type": device.type,
            "name": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
            "note": None if cuda else "CPU figures: no CUDA device; the tiny model on the CPU",
            "telemetry": _telemetry() if cuda else None,
            "torch": torch.__version__,
        },
        "config": {**cfg.__dict__, "backends": list(cfg.backends), "commit": _commit()},
        "results": results,
    }


def format_report(report: dict) -> str:
    lines = [f"device: {report['device']['name']} ({report['device']['type']})"]
    if report["device"]["note"]:
        lines.append(f"note: {report['device']['note']}")
    for name, res in report["results"].items():
        stages = ", ".join(f"{k} {v:.1f}" for k, v in res["stage_ms"].items())
        lines.append(
            f"{name:>10}: {res['fps']:.2f} FPS, TTFF {res['ttff_ms']:.1f} ms, stages (ms) {stages}, "
            f"{res['achieved_tflops']:.2f} TFLOP/s in the student"
            + (f", x{res['speedup_vs_reference']:.2f} vs reference" if "speedup_vs_reference" in res else "")
        )
    return "\n".join(lines)


def dump(report: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report, indent=2))
