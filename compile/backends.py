"""Backend selection for the decoder (TensorRT | onnxruntime | torch) and torch.compile of the student.

    decoder = ChunkDecoder.create(taehv, backend="auto", latent_hw=(64, 64), device="cuda")
    frames = decoder(z)              # z [N, 3, 16, h, w] -> frames [N, 9 or 12, 3, 8h, 8w] in [0, 1]
    decoder.backend                  # which one runs; reported by the engine and the benchmark
    compile_student(model)           # torch.compile each DiT block (another student backend)

``auto`` takes TensorRT when it can be used here, else the PyTorch decoder. An unavailable backend
(asked for or picked by ``auto``) falls back with a warning that names the reason; never silently.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch

from ..engine.taehv import TAEHV, TAEHVStreamDecoder
from .tensorrt_engine import tensorrt_status

log = logging.getLogger("lipforcing")

DECODER_BACKENDS = ("tensorrt", "onnxruntime", "torch")


def _onnxruntime_status() -> tuple[bool, str]:
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        return False, f"{exc.name} is not installed (pip install 'lipforcing[trt]')"
    return True, "ok"


def select_decoder_backend(requested: str, device: torch.device | str) -> str:
    """Resolve ``requested`` (auto | tensorrt | onnxruntime | torch) to a backend that works here."""
    if requested not in ("auto", *DECODER_BACKENDS):
        raise ValueError(f"unknown decoder backend {requested!r}; choose auto or one of {DECODER_BACKENDS}")
    if requested == "torch":
        return "torch"
    if requested in ("auto", "tensorrt"):
        ok, why = tensorrt_status()
        if ok and torch.device(device).type == "cuda":
            return "tensorrt"
        why = why if not ok else "the engine runs on the CPU"
        log.warning("lipforcing: TensorRT decoder unavailable (%s); using the PyTorch decoder", why)
        return "torch"
    ok, why = _onnxruntime_status()
    if ok:
        return "onnxruntime"
    log.warning("lipforcing: onnxruntime decoder unavailable (%s); using the PyTorch decoder", why)
    return "torch"


class ChunkDecoder:
    """Decodes 3-latent chunks in stream order with the selected backend (trims the stream's first frames)."""

    def __init__(self, taehv: TAEHV, backend: str, step=None) -> None:
        self.taehv, self.backend, self._step = taehv, backend, step
        self.reset()

    @staticmethod
    def create(
        taehv: TAEHV,
        *,
        backend: str = "auto",
        latent_hw: tuple[int, int],
        device: torch.device | str = "cpu",
        cache_dir: str | Path | None = None,
    ) -> ChunkDecoder:
        chosen = select_decoder_backend(backend, device)
        log.info("lipforcing: decoder backend %s", chosen)
        if chosen == "torch":
            return ChunkDecoder(taehv, "torch")
        from .onnx_export import OnnxStepRunner, export_decoder

        work = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="lipforcing-"))
        work.mkdir(parents=True, exist_ok=True)
        onnx_path = export_decoder(taehv.float().cpu(), work / "taehv_decoder.onnx", latent_hw)
        if chosen == "onnxruntime":
            return ChunkDecoder(taehv, "onnxruntime", OnnxStepRunner(onnx_path))
        from .tensorrt_engine import TensorRTRunner, build_or_load_engine

        runner = OnnxStepRunner(onnx_path)
        shapes = {"x": (1, 3, taehv.config.latent_channels, *latent_hw)}
        shapes.update({i.name: tuple(i.shape) for i in runner.state_inputs})
        plan = build_or_load_engine(onnx_path, shapes, cache_dir=work)
        return ChunkDecoder(taehv, "tensorrt", _TensorRTStep(TensorRTRunner(plan), shapes))

    def reset(self) -> None:
        self._to_trim = self.taehv.frames_to_trim
        self._stream = TAEHVStreamDecoder(self.taehv) if self.backend == "torch" else None
        if self._step is not None:
            self._step.reset()

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """z: [N, 3, 16, h, w] -> frames [N, T, 3, 8h, 8w] in [0, 1] (T = 9 for the first chunk, else 12)."""
        if self._stream is not None:
            return self._stream.push(z.to(next(self.taehv.parameters()).dtype))
        frames = self._step.step(z).to(z.device)
        trim, self._to_trim = self._to_trim, 0
        return frames[:, trim:]


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


def compile_student(model: torch.nn.Module, *, mode: str | None = "max-autotune-no-cudagraphs",
                    backend: str = "inductor") -> torch.nn.Module:
    """torch.compile every DiT block in place (fixed shapes; the scheduler adds CUDA graphs itself)."""
    for i, block in enumerate(model.blocks):
        model.blocks[i] = torch.compile(block, mode=mode, backend=backend, dynamic=False, fullgraph=False)
    log.info("lipforcing: student blocks compiled with torch.compile (%s, %s)", backend, mode)
    return model
