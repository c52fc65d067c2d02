"""The TAEHV decoder through a compiled backend (TensorRT | onnxruntime), or PyTorch when neither can run.

    decoder = make_decoder_backend(taehv, "auto", latent_hw=(64, 64), device="cuda")    # LatentDecoder interface
    frames = decoder.push(z)      # z [1, 16, 3, h, w] -> frames [9 or 12, 3, 8h, 8w] in [0, 1]
    decoder.backend               # which one runs; reported by the run summary and the benchmark

``auto`` (``choose_decoder_backend``, the one rule the engine and the benchmark share): for a CUDA engine
TensorRT, else onnxruntime when it has its CUDA execution provider, else the PyTorch decoder on the GPU; never
a decoder on the host CPU (onnxruntime's CPU provider takes 8-12 s a chunk). For a CPU engine, the PyTorch
decoder. An unavailable backend (asked for or picked by ``auto``) falls back with a warning that names the
reason; never silently, and ``decoder.backend`` names what runs.

Artefacts are reused across processes: the decoder's ONNX step comes from ``compiled_dir`` (what
``lipforcing compile`` wrote, checked against the weights) or from the user cache, keyed by a hash of
the weights and the shapes; TensorRT engines sit beside it, keyed by the ONNX bytes, shapes, GPU, TensorRT
version and precision. The caller's TAEHV module is never moved or cast: the export works on a copy.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..engine.codecs.latent import LatentDecoder, make_decoder
from ..engine.codecs.taehv import TAEHV
from ..engine.errors import ConfigError
from ..engine.user_cache import user_cache_dir
from .tensorrt_engine import tensorrt_status

log = logging.getLogger("lipforcing")

DECODER_BACKENDS = ("tensorrt", "onnxruntime", "torch")
MANIFEST = "compiled.json"
"""Written by ``lipforcing compile`` beside its artefacts: what they were built from."""
MANIFEST_FORMAT = "lipforcing-compiled/1"


def _onnxruntime_status() -> tuple[bool, str]:
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        return False, f"{exc.name} is not installed (pip install 'lipforcing[trt]')"
    return True, "ok"


@dataclass(frozen=True, kw_only=True)
class DecoderRuntimes:
    """What this host offers the compiled decoders (``probe_decoder_runtimes``)."""

    tensorrt: tuple[bool, str]
    """(usable, reason): TensorRT importable with a CUDA device (``tensorrt_status``)."""
    onnxruntime: tuple[bool, str]
    """(usable, reason): onnxruntime and the exporter (onnxscript) importable."""
    onnxruntime_providers: tuple[str, ...] = ()
    """onnxruntime's execution providers (``onnxruntime.get_available_providers()``); empty when not usable."""


def probe_decoder_runtimes() -> DecoderRuntimes:
    """Probe TensorRT, onnxruntime and onnxruntime's execution providers (imports them; creates no tensor)."""
    ort = _onnxruntime_status()
    providers: tuple[str, ...] = ()
    if ort[0]:
        import onnxruntime

        providers = tuple(onnxruntime.get_available_providers())
    return DecoderRuntimes(tensorrt=tensorrt_status(), onnxruntime=ort, onnxruntime_providers=providers)


def choose_decoder_backend(requested: str, device_type: str, runtimes: DecoderRuntimes) -> tuple[str, str]:
    """(backend, why): the decoder that runs for an engine on ``device_type`` ("cuda", "cpu") when
    ``requested`` (auto | tensorrt | onnxruntime | torch) is asked for; ``why`` says what ruled out the
    faster choices ("" when nothing did). Pure: ``runtimes`` describes the host.

    A CUDA engine decodes on its GPU: ``auto`` takes TensorRT, else onnxruntime with its CUDAExecutionProvider,
    else PyTorch; onnxruntime's CPU provider is never used for it, asked for or not. A CPU engine runs
    onnxruntime (CPU provider) only when asked for; ``auto`` keeps it on the PyTorch decoder."""
    if requested not in ("auto", *DECODER_BACKENDS):
        raise ConfigError(f"unknown decoder backend {requested!r}; choose auto or one of {DECODER_BACKENDS}")
    if requested == "torch":
        return "torch", ""
    no_trt = _tensorrt_unusable(device_type, runtimes)
    no_ort = _onnxruntime_unusable(device_type, runtimes)
    if requested == "tensorrt":
        return ("torch", no_trt) if no_trt else ("tensorrt", "")
    if requested == "onnxruntime":
        return ("torch", no_ort) if no_ort else ("onnxruntime", "")
    if device_type != "cuda":
        return "torch", f"the engine runs on {device_type}: auto takes a compiled decoder for a CUDA engine only"
    if not no_trt:
        return "tensorrt", ""
    if not no_ort:
        return "onnxruntime", no_trt
    return "torch", f"{no_trt}; {no_ort}"


def _tensorrt_unusable(device_type: str, runtimes: DecoderRuntimes) -> str:
    """Why TensorRT cannot decode for an engine on ``device_type`` ("" when it can)."""
    if device_type != "cuda":
        return f"TensorRT: needs a CUDA engine, this one runs on {device_type}"
    ok, why = runtimes.tensorrt
    return "" if ok else f"TensorRT: {why}"


def _onnxruntime_unusable(device_type: str, runtimes: DecoderRuntimes) -> str:
    """Why onnxruntime cannot decode for an engine on ``device_type`` ("" when it can): a CUDA engine needs its
    CUDA execution provider, any other engine its CPU provider."""
    ok, why = runtimes.onnxruntime
    if not ok:
        return f"onnxruntime: {why}"
    provider = "CUDAExecutionProvider" if device_type == "cuda" else "CPUExecutionProvider"
    if provider in runtimes.onnxruntime_providers:
        return ""
    have = ", ".join(runtimes.onnxruntime_providers) or "none"
    host = "; the CPU provider would decode on the host CPU" if device_type == "cuda" else ""
    return f"onnxruntime: no {provider} in this build (it has {have}){host}"


def select_decoder_backend(requested: str, device: torch.device | str) -> str:
    """Resolve ``requested`` (auto | tensorrt | onnxruntime | torch) to the backend that runs for an engine on
    ``device`` (``choose_decoder_backend`` on this host); a fallback is logged as a warning with its reason."""
    if requested == "torch":
        return "torch"
    device_type = torch.device(device).type
    backend, why = choose_decoder_backend(requested, device_type, probe_decoder_runtimes())
    if why and (requested != "auto" or device_type == "cuda"):
        log.warning("lipforcing: decoder backend %s asked for, %s runs (%s)", requested, backend, why)
    elif why:
        log.info("lipforcing: decoder backend %s (%s)", backend, why)
    return backend


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's parameters and buffers (names, shapes and fp32 values): what an export embeds."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().float().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def read_manifest(compiled_dir: str | Path) -> dict:
    """The manifest of a ``lipforcing compile`` folder (clear error when absent or unreadable)."""
    path = Path(compiled_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{compiled_dir}: no {MANIFEST}; it is not a folder written by 'lipforcing compile'") \
            from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable ({exc})") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ConfigError(f"{path}: format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}; "
                          "run 'lipforcing compile' again")
    return manifest


def decoder_onnx(taehv: TAEHV, latent_hw: tuple[int, int], *, compiled_dir: str | Path | None = None) -> Path:
    """The decoder's ONNX step for these weights and latent size: from ``compiled_dir`` when given, else from
    the user cache (exported there on a miss)."""
    from .onnx_export import export_decoder

    digest = weights_digest(taehv)
    if compiled_dir is not None:
        manifest = read_manifest(compiled_dir)
        if manifest.get("taehv_sha256") != digest:
            raise ConfigError(f"{compiled_dir} was compiled from other TAEHV weights; run 'lipforcing compile "
                              "--taehv <the weights of this run>' again, or leave out --compiled")
        if tuple(manifest.get("latent_hw", ())) != tuple(latent_hw):
            raise ConfigError(f"{compiled_dir} was compiled for {manifest.get('latent_hw')} latents, this run needs "
                              f"{list(latent_hw)}")
        return Path(compiled_dir) / manifest["decoder"]
    key = hashlib.sha256(f"{digest}|{latent_hw}|{torch.__version__}".encode()).hexdigest()[:24]
    path = user_cache_dir("onnx") / f"taehv_decoder_{key}.onnx"
    if path.is_file():
        log.info("lipforcing: ONNX decoder from the cache (%s)", path)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("lipforcing: exporting the TAEHV decoder to ONNX (%s)", path)
    return export_decoder(copy.deepcopy(taehv).float().cpu().eval(), path, latent_hw)


class CompiledTAEHVDecoder:
    """The TAEHV decoder through onnxruntime or TensorRT, with ``LatentDecoder``'s interface:
    push(z [1, 16, l, h, w]) -> frames [T, 3, H, W] in [0, 1] (the stream's first frames trimmed)."""

    kind = "taehv"

    def __init__(self, backend: str, step, frames_to_trim: int) -> None:
        self.backend, self._step, self._frames_to_trim = backend, step, frames_to_trim
        self.reset()

    def reset(self) -> None:
        self._to_trim = self._frames_to_trim
        self._step.reset()

    @torch.no_grad()
    def push(self, z: torch.Tensor) -> torch.Tensor:
        frames = self._step.step(z.permute(0, 2, 1, 3, 4)).to(z.device)  # [1, 4l, 3, H, W]
        trim, self._to_trim = self._to_trim, 0
        return frames[0, trim:].float()


class _TensorRTStep:
    """Carries the decoder's MemBlock state between TensorRT executions (device-side copies only)."""

    def __init__(self, runner, shapes: dict[str, tuple[int, ...]]) -> None:
        self.runner = runner
        self.state_names = [n for n in shapes if n.startswith("state_")]
        self.state = {n: torch.zeros(shapes[n], device="cuda") for n in self.state_names}

    def reset(self) -> None:
        for s in self.state.values():
            s.zero_()

    def step(self, z: torch.Tensor) -> torch.Tensor:
        out = self.runner({"x": z, **self.state})
        for i, name in enumerate(self.state_names):
            self.state[name].copy_(out[f"new_state_{i}"])
        return out["y"].float().clone()


def make_decoder_backend(
    taehv: TAEHV,
    backend: str = "auto",
    *,
    latent_hw: tuple[int, int],
    device: torch.device | str = "cpu",
    compiled_dir: str | Path | None = None,
    stream: torch.cuda.Stream | None = None,
    group_latents: int | None = None,
) -> LatentDecoder | CompiledTAEHVDecoder:
    """The TAEHV decoder on the best available ``backend`` (see the module docstring); ``group_latents``
    applies to the PyTorch decoder (compiled steps decode a chunk's latents at once)."""
    chosen = select_decoder_backend(backend, device)
    log.info("lipforcing: decoder backend %s", chosen)
    if chosen == "torch":
        return make_decoder("taehv", taehv=taehv, group_latents=group_latents)
    from .onnx_export import OnnxStepRunner

    onnx_path = decoder_onnx(taehv, latent_hw, compiled_dir=compiled_dir)
    if chosen == "onnxruntime":
        runner = OnnxStepRunner(onnx_path, device=device, stream=stream)
        log.info("lipforcing: onnxruntime decoder on %s", runner.provider)
        if torch.device(device).type == "cuda" and runner.provider != "CUDAExecutionProvider":
            # The CUDA provider is listed but did not load (a missing CUDA/cuDNN library, say): onnxruntime
            # would decode on the host CPU, which the report would then misname.
            log.warning("lipforcing: onnxruntime's CUDA provider did not load (the session runs on %s); using "
                        "the PyTorch decoder", runner.provider)
            return make_decoder("taehv", taehv=taehv, group_latents=group_latents)
        return CompiledTAEHVDecoder("onnxruntime", runner, taehv.frames_to_trim)
    from .tensorrt_engine import TensorRTRunner, build_or_load_engine

    shapes = {"x": (1, 3, taehv.config.latent_channels, *latent_hw)}
    shapes.update({i.name: tuple(i.shape) for i in OnnxStepRunner(onnx_path).state_inputs})
    engines = Path(compiled_dir) / "engines" if compiled_dir is not None else user_cache_dir("tensorrt")
    plan = build_or_load_engine(onnx_path, shapes, cache_dir=engines)
    return CompiledTAEHVDecoder("tensorrt", _TensorRTStep(TensorRTRunner(plan), shapes), taehv.frames_to_trim)
