"""``lipforcing bench``: the session users run, measured end to end, with an ablation of the fast path.

    lipforcing bench --model 1.3b --chunks 20 --out results.json
    lipforcing bench --model tiny --compare baseline.json --max-regression 5     # a CI gate

Every variant drives the same ``LipSync`` session API as ``lipforcing run``: synthetic 25 fps frames (a
drawn face with a slight motion, placed in a larger frame) go through face alignment, warping, both encoder
streams, the student's calls, decoding and paste-back, and come back as finished frames. The face's box is
known, so alignment runs the ``box`` face backend (``--face-backend box --face-box``): no detector, and no
package beyond the device image's (torch, numpy, OpenCV).
Inputs are random where they are not frames (text, speech-like audio features come from the engine's
audio encoder on synthesized speech); the weights are random at the model's real shapes, or real with
``--ckpt``. The networks are loaded once and shared by every variant.

The ablation adds one piece of the fast path at a time (the last one is what ``lipforcing run`` runs):

    reference   the plain path: eager reference loop, PyTorch attention, stages in turn, PyTorch decoder
    +kernels    the Triton kernels (attention with fused RoPE, norms, modulation) in the same loop
    +graphs     the static scheduler: static buffers, one CUDA graph per window shape
    +streams    the chunk pipeline: encode | student | decode on device streams, worker threads
    +decoder    the TAEHV decoder on TensorRT (onnxruntime where TensorRT cannot run)
    +sdpa       the same fast path with the sdpa attention backend (PyTorch SDPA / flash-attn over a window
                rotated once per call) instead of the Triton attention: the production alternative
    +fp8        the fast path (+decoder) with the student's block weights and KV cache in e4m3 (--dtype fp8):
                the same weights quantised, fp8 GEMMs on Hopper (dequantised elsewhere)

A piece that cannot run here (no CUDA, no Triton, no backend decoder) is named in the variant's ``skipped``
field; the variant is then measured without it when that still changes the path, else left out. What
every figure means is written into the JSON (``fields``, see ``bench/report.py``). With ``out``, the report
is rewritten after every variant (``complete`` false until the last), so a run killed part-way keeps what it
measured.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import platform
import statistics
import subprocess
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..engine.app.demo import moving_frames, synth_speech
from ..engine.app.engine import Engine, Networks, RunConfig, load_networks
from ..engine.dit.build import random_student
from ..engine.dit.config import ModelConfig
from ..engine.errors import ConfigError
from ..engine.media.length import OUTPUT_FPS
from ..engine.tools.info import model_info
from .report import FIELDS, SCHEMA

log = logging.getLogger("lipforcing")

ABLATION: dict[str, dict] = {
    "reference": dict(scheduler="reference", pipeline="sequential", backend="reference", decoder_backend="torch"),
    "+kernels": dict(scheduler="reference", pipeline="sequential", backend="triton", decoder_backend="torch"),
    "+graphs": dict(scheduler="static", pipeline="sequential", backend="triton", decoder_backend="torch"),
    "+streams": dict(scheduler="static", pipeline="streams", backend="triton", decoder_backend="torch"),
    "+decoder": dict(scheduler="static", pipeline="streams", backend="triton", decoder_backend="best"),
}
# The production alternative to the Triton attention: the whole fast path with the sdpa backend instead.
ABLATION["+sdpa"] = dict(scheduler="static", pipeline="streams", backend="sdpa", decoder_backend="best")
# The whole fast path on e4m3 block weights and KV cache (--dtype fp8): the same weights, quantised.
ABLATION["+fp8"] = dict(scheduler="static", pipeline="streams", backend="triton", decoder_backend="best", dtype="fp8")
COMPILED = {"+compile": dict(scheduler="static", pipeline="streams", backend="triton", decoder_backend="best",
                             compile=True)}


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    model: str = "tiny"
    ckpt: str | None = None
    device: str = "cuda"
    dtype: str = "bf16"
    encoder: str = "wan"
    decoder: str = "taehv"
    frame_hw: tuple[int, int] = (720, 1280)
    """Source frame size; the face occupies about a third of its height."""
    chunks: int = 8
    """Timed steady-state chunks (after chunks 0 and 1, which are shorter and cheaper)."""
    variants: tuple[str, ...] = tuple(ABLATION)
    """Ablation variants to measure (empty with ``avatar_sessions``)."""
    avatar_sessions: tuple[int, ...] = ()
    """Measure the prepared-avatar path with these numbers of concurrent sessions (e.g. 1, 2, 4)."""
    quality: bool = False
    """Also compare each variant's frames with the reference path's (``quality`` in each result; the reference
    is run twice and compared with itself)."""
    quality_weights: str | None = None
    """A folder with syncnet_v2.model: Sync-C joins the comparison."""
    progress: bool = True
    gpus: int = 1
    """Ranks each variant's student runs on (one stream, sequence parallel; ``bench --gpus``)."""


def _best_decoder_backend(device: torch.device) -> tuple[str | None, str | None]:
    """(backend, why not a faster one) of the fastest compiled TAEHV decoder for an engine on ``device``; None
    when none can run. On CUDA it is what ``--decoder-backend auto`` takes (``choose_decoder_backend``: never
    onnxruntime without its CUDA provider); a CPU engine's one compiled decoder is onnxruntime's CPU provider."""
    from ..compile.decoder import choose_decoder_backend, probe_decoder_runtimes

    runtimes = probe_decoder_runtimes()
    if device.type == "cuda":
        backend, why = choose_decoder_backend("auto", device.type, runtimes)
    else:
        backend, why = choose_decoder_backend("onnxruntime", device.type, runtimes)
        why = why or f"TensorRT: needs a CUDA engine, this one runs on {device.type}"
    return (None, why) if backend == "torch" else (backend, why or None)


def variant_config(name: str, base: RunConfig, device: torch.device) -> tuple[RunConfig | None, list[str]]:
    """The RunConfig of an ablation variant, and what it had to leave out here (None: nothing left to run)."""
    from ..engine.dit.attention import resolve_backend

    changes = dict({**ABLATION, **COMPILED}[name])
    skipped = []
    if changes.get("backend") == "triton":
        try:
            if device.type != "cuda":
                raise ConfigError("they run on CUDA (the Triton interpreter on a CPU is for tests)")
            resolve_backend("triton", device)
        except ConfigError as exc:
            skipped.append(f"Triton kernels: {exc}")
            changes["backend"] = "reference"
    if changes["scheduler"] == "static" and device.type != "cuda":
        skipped.append("CUDA graphs: no CUDA device (the static scheduler runs without them)")
    if changes.get("decoder_backend") == "best":
        backend, why = _best_decoder_backend(device)
        if backend is None:
            skipped.append(f"backend decoder: {why}")
        changes["decoder_backend"] = backend or "torch"
        if why and backend:
            skipped.append(f"{why} (onnxruntime instead)")
    return replace(base, **changes), skipped


def build_networks(cfg: BenchConfig) -> Networks:
    """The tiny model's networks, or random weights at a real preset's shapes (no download), shared by
    every variant."""
    if cfg.model == "tiny" and not cfg.ckpt:
        return load_networks(RunConfig(model="tiny", device=cfg.device, dtype="fp32", encoder=cfg.encoder,
                                       decoder=cfg.decoder))
    from ..engine.codecs.taehv import TAEHV, TAEHVConfig
    from ..engine.codecs.wan_vae import WanVAE, WanVAEConfig
    from ..engine.numerics import built_in, parse_dtype

    dtype = parse_dtype(cfg.dtype)
    if cfg.ckpt:
        from ..engine.dit.checkpoint import load_student

        student = load_student(cfg.ckpt, device=cfg.device, dtype=dtype)
    else:
        student = random_student(ModelConfig.from_name(cfg.model), device=cfg.device, dtype=dtype)
    with built_in(dtype, cfg.device):  # no fp32 copy of the codecs' weights either
        vae = WanVAE(WanVAEConfig()).eval() if cfg.encoder == "wan" or cfg.decoder == "wan" else None
        taehv = TAEHV(TAEHVConfig()).eval()
    text = torch.randn(1, student.cfg.text_len, student.cfg.text_dim, generator=torch.Generator().manual_seed(0))
    audio = _RandomAudioFeatures(student.cfg.audio_dim, torch.device(cfg.device))
    return Networks(student, vae, taehv, audio, text)


def _networks_for(run_cfg: RunConfig, networks: Networks, made: dict) -> Networks:
    """The shared networks, or for an fp8 variant the same ones with the student quantised beside the original
    (sharing every unquantised parameter; made once, kept in ``made``)."""
    if run_cfg.dtype != "fp8":
        return networks
    if "fp8" not in made:
        from ..engine.dit.fp8 import quantized_copy

        made["fp8"] = dataclasses.replace(networks, student=quantized_copy(networks.student))
    return made["fp8"]


class _RandomAudioFeatures:
    """Random per-frame features of a real model's width (wav2vec2-base is not downloaded for benchmarks)."""

    def __init__(self, dim: int, device: torch.device) -> None:
        self.dim, self.device = dim, device

    def __call__(self, speech: np.ndarray, n_frames: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        return torch.randn(n_frames, self.dim, generator=g).to(self.device)

    def release(self) -> None:
        pass


def synthetic_face(frame_hw: tuple[int, int]) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """(frame, box): a drawn face (head, hair, brows, eyes, nose, mouth, skin texture) centred in a frame of
    ``frame_hw`` (np.uint8 [H, W, 3] RGB), its features where ``media.face.box_anchors`` expects them for
    ``box`` = (x, y, w, h), which is 45 % of the frame's height."""
    import cv2

    from ..engine.media.face import FaceBox, box_anchors

    h, w = frame_hw
    bh = 0.45 * h
    bw = 0.8 * bh
    x, y = (w - bw) / 2, (h - bh) / 2
    rng = np.random.default_rng(0)
    frame = np.full((h, w, 3), 60, np.uint8)
    frame[:] = (np.linspace(40, 90, w)[None, :, None] + rng.normal(0, 6, (h, w, 1))).clip(0, 255).astype(np.uint8)
    cx, cy = int(x + bw / 2), int(y + bh / 2)
    cv2.ellipse(frame, (cx, int(y + 0.3 * bh)), (int(0.56 * bw), int(0.42 * bh)), 0, 180, 360, (50, 35, 25), -1)
    skin = np.zeros_like(frame)
    cv2.ellipse(skin, (cx, cy), (int(bw / 2), int(bh / 2)), 0, 0, 360, (1, 1, 1), -1)
    texture = (np.array([215, 170, 140]) + rng.normal(0, 8, (h, w, 1))).clip(0, 255)
    frame = np.where(skin > 0, texture, frame).astype(np.uint8)
    brow_l, brow_r, nose = box_anchors(FaceBox(x, y, bw, bh)).round().astype(int)
    eye = int(0.06 * bw)
    for bx, by in (brow_l, brow_r):
        cv2.line(frame, (bx - 2 * eye, by), (bx + 2 * eye, by - eye // 3), (60, 40, 30), max(2, eye // 2))
        cv2.ellipse(frame, (bx, by + 2 * eye), (int(1.6 * eye), eye), 0, 0, 360, (250, 250, 250), -1)
        cv2.circle(frame, (bx, by + 2 * eye), int(0.7 * eye), (40, 60, 90), -1)
    cv2.line(frame, (nose[0], int(brow_l[1] + 2 * eye)), tuple(nose), (170, 120, 100), max(2, eye // 3))
    cv2.ellipse(frame, tuple(nose), (int(1.2 * eye), int(0.6 * eye)), 0, 0, 180, (150, 100, 85), -1)
    mouth = (nose[0], int(nose[1] + 0.14 * bw))
    cv2.ellipse(frame, mouth, (int(0.16 * bw), int(0.04 * bw)), 0, 0, 360, (160, 60, 60), -1)
    cv2.line(frame, (mouth[0] - int(0.15 * bw), mouth[1]), (mouth[0] + int(0.15 * bw), mouth[1]), (90, 30, 30), 2)
    return frame, (x, y, bw, bh)


def synthetic_clip(frame_hw: tuple[int, int], chunks: int) -> tuple[list[np.ndarray], np.ndarray,
                                                                      tuple[float, float, float, float]]:
    """(frames, speech, face box): the drawn face with a slight motion in frames of ``frame_hw``, synthesized
    speech of the matching length (chunks x 12 - 3 frames), and the face's box for the ``box`` face backend."""
    n = 12 * chunks - 3
    face, box = synthetic_face(frame_hw)
    speech = synth_speech((n + 1) / OUTPUT_FPS)
    return moving_frames(face, n), speech, box


def _run_session(engine: Engine, frames: list[np.ndarray], speech: np.ndarray, keep: list | None = None) -> dict:
    """One clip through a session, frames pushed as fast as the session takes them (the finished frames are
    appended to ``keep`` when given)."""
    session = engine.session(speech, timing=True)
    began = time.perf_counter()
    received = 0
    for frame in frames:
        out = session.push(frame)
        received += len(out)
        if keep is not None:
            keep.extend(out)
    out = session.close()
    received += len(out)
    if keep is not None:
        keep.extend(out)
    ended = time.perf_counter()
    summary = session.summary()
    summary.update(began=began, ended=ended, received=received, chunk_done=list(session.chunk_done),
                   stage_samples={k: list(v) for k, v in session.timer.samples.items()})
    return summary


def _measure(engine: Engine, frames, speech, keep: list | None = None) -> dict:
    device = engine.device
    warm = engine.warm_up()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    run = _run_session(engine, frames, speech, keep)
    if run["chunks"] != len(run["chunk_done"]):
        raise ConfigError(f"the face of the synthetic frames was not found in every chunk ({run['chunks']} of "
                          f"{len(run['chunk_done'])}): use a larger --frame-size")
    done = run["chunk_done"]  # perf_counter when each chunk's frames were handed out
    steady_frames = 12 * (len(done) - 2)
    steady_s = done[-1] - done[1]
    stage_ms = {k: round(1e3 * statistics.median(v), 3) for k, v in engine_timer_samples(run).items()}
    info = model_info(engine.networks.student.cfg, engine.stream, encoder=engine.config.encoder,
                      decoder=engine.config.decoder)
    student_ms = stage_ms.get("student")
    result = {
        "fps": round(steady_frames / steady_s, 3),
        "fps_end_to_end": round(run["frames"] / (run["ended"] - run["began"]), 3),
        "ttff_ms": round(1e3 * (done[0] - run["began"]), 3),
        "chunk_ms": round(1e3 * steady_s / (len(done) - 2), 3),
        "stage_ms": stage_ms,
        "frames": run["frames"],
        "chunks": len(done),
        "warm_up_s": round(warm, 3),
        "achieved_tflops": round(info.flops_per_chunk_steady / (student_ms / 1e3) / 1e12, 3) if student_ms else None,
        "path": engine.path,
    }
    if device.type == "cuda":
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    return result


def engine_timer_samples(run: dict) -> dict[str, list[float]]:
    """Per-chunk stage samples of a run, without the first two chunks (shorter window shapes)."""
    per_clip = {"audio features"}
    return {k: (v[2:] if len(v) > 2 else v) for k, v in run["stage_samples"].items() if v and k not in per_clip}


def device_identity(device: torch.device | str) -> dict:
    """{"type", "name"} of the device a report was measured on (what ``--compare`` checks)."""
    device = torch.device(device)
    if device.type == "cuda":
        return {"type": "cuda", "name": torch.cuda.get_device_name(device)}
    return {"type": device.type, "name": platform.processor() or platform.machine()}


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


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


def _avatar_results(cfg: BenchConfig, networks: Networks, base: RunConfig, frames, speech):
    """The prepared-avatar path (no detection, alignment or encoder) with 1, 2, 4 ... concurrent sessions on one
    engine, each session in its own thread with its own speech; yields (name, result) as each count is done."""
    from ..engine.app.avatar import prepare_avatar
    from ..engine.runtime.threads import run_in_threads

    device = torch.device(cfg.device)
    fast, _ = variant_config("+decoder", base, device)
    prep = Engine(fast, networks)
    avatar = prepare_avatar(frames[:33], prep, progress=False)  # a short avatar: it loops forward and back
    prep.close()
    for n in cfg.avatar_sessions:
        engine = Engine(replace(fast, max_sessions=n), networks)
        warm = engine.warm_up()
        runs = [None] * n

        def one(i, engine=engine, runs=runs):
            s = engine.session(synth_speech(len(speech) / 16000, seed=i), avatar=avatar, timing=True)
            began = time.perf_counter()
            while s.frames_out < s.frames_needed:
                s.pop(timeout=0.05)
            s.close()
            runs[i] = dict(began=began, ended=time.perf_counter(), done=list(s.chunk_done), frames=s.frames_out,
                           stages={k: list(v) for k, v in s.timer.samples.items()})

        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        run_in_threads(one, n)
        per_session = [12 * (len(r["done"]) - 2) / (r["done"][-1] - r["done"][1]) for r in runs]
        steady_frames = sum(12 * (len(r["done"]) - 2) for r in runs)
        steady_s = max(r["done"][-1] for r in runs) - min(r["done"][1] for r in runs)
        began, ended = min(r["began"] for r in runs), max(r["ended"] for r in runs)
        stages = {k: round(1e3 * statistics.median([x for r in runs for x in r["stages"].get(k, [])[2:]]), 3)
                  for k in runs[0]["stages"] if k != "audio features" and len(runs[0]["stages"][k]) > 2}
        result = {
            "sessions": n,
            "fps": round(steady_frames / steady_s, 3),
            "fps_per_session": [round(f, 3) for f in per_session],
            "fps_end_to_end": round(sum(r["frames"] for r in runs) / (ended - began), 3),
            "ttff_ms": round(1e3 * statistics.median(r["done"][0] - r["began"] for r in runs), 3),
            "chunk_ms": round(1e3 * statistics.median((r["done"][-1] - r["done"][1]) / (len(r["done"]) - 2)
                                                     for r in runs), 3),
            "stage_ms": stages,
            "frames": sum(r["frames"] for r in runs),
            "chunks": sum(len(r["done"]) for r in runs),
            "warm_up_s": round(warm, 3),
            "batch_sizes": dict(sorted(Counter(engine.batcher.batches).items())) if engine.batcher else {1: "all"},
            "path": {**engine.path, "avatar": True},
        }
        if device.type == "cuda":
            result["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
        engine.close()
        yield f"avatar-{n}", result


def run_bench(cfg: BenchConfig, out: str | Path | None = None) -> dict:
    """Measure every variant of ``cfg`` in this process; returns the report (schema ``SCHEMA``). With ``out``,
    the report so far is written there after every variant (``complete``: false until the end)."""
    from tqdm import tqdm

    device = torch.device(cfg.device)
    networks = build_networks(cfg)
    frames, speech, box = synthetic_clip(cfg.frame_hw, cfg.chunks + 2)
    base = RunConfig(model=cfg.model, device=cfg.device, dtype=cfg.dtype, encoder=cfg.encoder, decoder=cfg.decoder,
                     face_backend="box", face_box=box, gpus=cfg.gpus)
    report = _report_head(cfg, device)
    results, seen_paths, outputs, variant_networks = report["results"], [], {}, {}

    def save() -> None:
        measured = {k: v for k, v in results.items() if "fps" in v}
        if "reference" in measured:
            for res in measured.values():
                res["speedup_vs_reference"] = round(res["fps"] / measured["reference"]["fps"], 3)
        if out is not None:
            dump(report, out)

    variants = cfg.variants
    if cfg.quality and variants and variants[0] != "reference":
        variants = ("reference", *(v for v in variants if v != "reference"))
    for name, result in _avatar_results(cfg, networks, base, frames, speech) if cfg.avatar_sessions else ():
        results[name] = result
        save()
    with tqdm(total=len(variants), unit="variant", desc="bench", disable=not cfg.progress) as bar:
        for name in variants:
            run_cfg, skipped = variant_config(name, base, device)
            engine = Engine(run_cfg, _networks_for(run_cfg, networks, variant_networks))
            if engine.path in seen_paths:
                same = next(k for k, v in results.items() if v.get("path") == engine.path)
                results[name] = {"skipped": skipped, "same_path_as": same}
            else:
                seen_paths.append(engine.path)
                keep = [] if cfg.quality else None
                results[name] = {**_measure(engine, frames, speech, keep), "skipped": skipped}
                if cfg.quality:
                    outputs[name] = np.stack(keep)
                    if name == "reference":  # the reference against itself: a second run (is it deterministic?)
                        again: list = []
                        _run_session(engine, frames, speech, again)
                        outputs["reference (second run)"] = np.stack(again)
            engine.close()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            save()
            bar.update(1)
    if cfg.quality:
        _add_quality(cfg, results, outputs, speech)
    report["complete"] = True
    save()
    return report


def _report_head(cfg: BenchConfig, device: torch.device) -> dict:
    """The report before any result: schema, field definitions, device and configuration."""
    cuda = device.type == "cuda"
    return {
        "schema": SCHEMA,
        "fields": FIELDS,
        "complete": False,
        "device": {
            **device_identity(device),
            "note": None if cuda else "CPU figures: no CUDA device",
            "telemetry": _telemetry() if cuda else None,
            "torch": torch.__version__,
        },
        "config": {**asdict(cfg), "frame_hw": list(cfg.frame_hw), "variants": list(cfg.variants),
                   "avatar_sessions": list(cfg.avatar_sessions), "commit": _commit()},
        "parallel": {"ranks": cfg.gpus, "scheme": "sequence parallel (all-to-all over heads)"}
        if cfg.gpus > 1 else None,
        "results": {},
    }


def _add_quality(cfg: BenchConfig, results: dict, outputs: dict, speech: np.ndarray) -> None:
    """``quality`` of every measured variant: its frames against the reference path's (see
    ``engine.quality.compare``); the reference's own entry compares its second run with its first."""
    from ..engine.quality.compare import compare_outputs
    from ..engine.quality.syncnet import WEIGHTS_FILE, load_syncnet

    net, note = None, f"Sync-C: needs {WEIGHTS_FILE} in --quality-weights"
    if cfg.quality_weights:
        path = Path(cfg.quality_weights) / WEIGHTS_FILE
        if path.is_file():
            net, note = load_syncnet(path), None
    reference = outputs.pop("reference")
    compared = compare_outputs(reference, outputs, speech=speech, syncnet_net=net)
    compared["reference"] = compared.pop("reference (second run)")
    for name, entry in compared.items():
        results[name]["quality"] = {**entry, **({"note": note} if note else {})}


def format_report(report: dict) -> str:
    lines = [f"device: {report['device']['name']} ({report['device']['type']})"]
    if report["device"]["note"]:
        lines.append(f"note: {report['device']['note']}")
    for name, res in report["results"].items():
        if "fps" not in res:
            lines.append(f"{name:>10}: same path as {res['same_path_as']} here ({'; '.join(res['skipped'])})")
            continue
        stages = ", ".join(f"{k} {v:.1f}" for k, v in res["stage_ms"].items())
        if "sessions" in res:
            lines.append(f"{name:>10}: {res['fps']:.2f} FPS in total, per session "
                         f"{', '.join(f'{f:.2f}' for f in res['fps_per_session'])}; stages (ms per chunk) {stages}")
            continue
        speed = f", x{res['speedup_vs_reference']:.2f} vs reference" if "speedup_vs_reference" in res else ""
        lines.append(f"{name:>10}: {res['fps']:.2f} FPS, TTFF {res['ttff_ms']:.0f} ms, stages (ms per chunk) "
                     f"{stages}{speed}")
        for why in res["skipped"]:
            lines.append(f"{'':>12}without {why}")
        if "quality" in res:
            q = res["quality"]
            against = "its second run" if name == "reference" else "the reference"
            sync = f", Sync-C {q['sync_c']} (reference {q['sync_c_reference']})" if "sync_c" in q else ""
            lines.append(f"{'':>12}quality vs {against}: PSNR {q.get('psnr')}, SSIM {q.get('ssim')}{sync}, "
                         f"drop {q['drop_pct']:.3f} %")
    return "\n".join(lines)


def dump(report: dict, path: str | Path) -> None:
    tmp = Path(path).with_name(f".{Path(path).name}.partial")
    tmp.write_text(json.dumps(report, indent=2, default=_json_default))
    tmp.replace(path)


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON serializable: {type(value)}")
