"""ONNX export of the TAEHV decoder and encoder as fixed-shape, explicit-state chunk steps.

The streaming TAEHV keeps causal state (each MemBlock's previous input frame). For a static engine the
state becomes graph inputs and outputs, so one graph serves every chunk:

    step = TAEHVDecoderStep(taehv)                  # (z [N, 3, 16, h, w], *state) -> (frames, *new_state)
    path = export_decoder(taehv, "dec.onnx", latent_hw=(64, 64), chunk_latents=3)
    runner = OnnxStepRunner(path)                   # onnxruntime, carries the state between chunks
    frames = runner.step(z)                         # [N, 12, 3, 512, 512]; the caller trims the first 3

The encoder step takes 12 frames: the first chunk's 9 frames preceded by 3 copies of frame 0 (the
alignment ``TAEHVStreamEncoder`` applies), then 12 frames per chunk. A step at the start of a stream is
given zero state, which is what the streaming modules use before the first frame.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..engine.codecs.taehv import TAEHV, MemBlock, TPool, run_blocks


def _memblock_inputs(blocks: nn.Sequential, x: torch.Tensor) -> list[tuple[int, torch.Size]]:
    """(block index, per-frame input shape [N, 1, C, H, W]) of every MemBlock, found by a meta-device trace."""
    shapes: list[tuple[int, torch.Size]] = []
    hooks = [
        blk.register_forward_pre_hook(lambda m, inp, i=i: shapes.append((i, inp[0].shape)))
        for i, blk in enumerate(blocks) if isinstance(blk, MemBlock)
    ]
    try:
        run_blocks(blocks, x, [None] * len(blocks))
    finally:
        for h in hooks:
            h.remove()
    n = x.shape[0]
    return [(i, torch.Size((n, 1, *s[1:]))) for i, s in shapes]


class _Step(nn.Module):
    """Run a TAEHV block stack on a fixed chunk with its MemBlock state as explicit tensors."""

    def __init__(self, blocks: nn.Sequential, example: torch.Tensor, clamp: bool) -> None:
        super().__init__()
        if any(isinstance(b, TPool) and b.stride > 1 for b in blocks) and example.shape[1] % 4:
            raise ValueError("an encoder step needs a multiple of 4 frames so no frame waits in TPool")
        self.blocks, self.clamp = blocks, clamp
        meta_blocks = copy.deepcopy(blocks).to("meta")  # shapes only: no memory, no compute
        self.state_layout = _memblock_inputs(meta_blocks, torch.empty(example.shape, device="meta"))

    def zero_state(self, device="cpu", dtype=torch.float32) -> list[torch.Tensor]:
        return [torch.zeros(shape, device=device, dtype=dtype) for _, shape in self.state_layout]

    def forward(self, x: torch.Tensor, *state: torch.Tensor):
        full: list = [None] * len(self.blocks)
        for (i, _), s in zip(self.state_layout, state):
            full[i] = s
        y = run_blocks(self.blocks, x, full)
        if self.clamp:
            y = y.clamp(0, 1)
        return (y, *[full[i] for i, _ in self.state_layout])


class TAEHVDecoderStep(_Step):
    """(z [N, C, 16, h, w], *state) -> (frames [N, 4C, 3, 8h, 8w] in [0, 1], *new_state)."""

    def __init__(self, taehv: TAEHV, latent_hw: tuple[int, int], chunk_latents: int = 3, batch: int = 1) -> None:
        ex = torch.zeros(batch, chunk_latents, taehv.config.latent_channels, *latent_hw)
        super().__init__(taehv.decoder, ex, clamp=True)
        self.example = ex


class TAEHVEncoderStep(_Step):
    """(frames [N, 12, 3, H, W] in [0, 1], *state) -> (latents [N, 3, 16, H/8, W/8], *new_state)."""

    def __init__(self, taehv: TAEHV, frame_hw: tuple[int, int], chunk_frames: int = 12, batch: int = 1) -> None:
        ex = torch.zeros(batch, chunk_frames, taehv.config.image_channels, *frame_hw)
        super().__init__(taehv.encoder, ex, clamp=False)
        self.example = ex


def export_step(step: _Step, path: str | Path) -> Path:
    """Export a step module to ONNX with fixed shapes; inputs ``x, state_0..`` and outputs ``y, new_state_0..``."""
    path = Path(path)
    n_state = len(step.state_layout)
    args = (step.example, *step.zero_state())
    input_names = ["x"] + [f"state_{i}" for i in range(n_state)]
    output_names = ["y"] + [f"new_state_{i}" for i in range(n_state)]
    tmp = path.with_name(path.name + ".partial")
    try:
        program = torch.onnx.export(step.eval(), args, input_names=input_names, output_names=output_names,
                                    dynamo=True, verbose=False)
        program.save(str(tmp))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def export_decoder(taehv: TAEHV, path: str | Path, latent_hw: tuple[int, int], chunk_latents: int = 3) -> Path:
    return export_step(TAEHVDecoderStep(taehv, latent_hw, chunk_latents), path)


def export_encoder(taehv: TAEHV, path: str | Path, frame_hw: tuple[int, int], chunk_frames: int = 12) -> Path:
    return export_step(TAEHVEncoderStep(taehv, frame_hw, chunk_frames), path)


def onnxruntime_providers(device: torch.device | str) -> list[str]:
    """CUDA when the engine runs on CUDA and this onnxruntime build has it, else the CPU provider."""
    import onnxruntime as ort

    if torch.device(device).type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxStepRunner:
    """Runs an exported step with onnxruntime, carrying the state from one chunk to the next.

    Inputs, outputs and the state stay torch tensors on ``device`` and are bound to the session by address
    (I/O binding), so on CUDA nothing goes through the host. ``stream`` (CUDA) is the stream the session
    computes on (onnxruntime's ``user_compute_stream``): the step is then ordered with the caller's work
    like any other kernel on that stream.
    """

    def __init__(self, path: str | Path, *, device: torch.device | str = "cpu",
                 stream: torch.cuda.Stream | None = None) -> None:
        import onnxruntime as ort

        self.device = torch.device(device)
        providers: list = onnxruntime_providers(self.device)
        if providers[0] == "CUDAExecutionProvider":
            options = {"device_id": self.device.index or 0}
            if stream is not None:
                options.update(has_user_compute_stream="1", user_compute_stream=str(stream.cuda_stream))
            providers = [("CUDAExecutionProvider", options), "CPUExecutionProvider"]
        else:
            self.device = torch.device("cpu")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: no provider-assignment chatter on the console
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.provider = self.session.get_providers()[0]
        inputs = self.session.get_inputs()
        self.state_inputs = [i for i in inputs if i.name.startswith("state_")]
        outputs = {o.name: o for o in self.session.get_outputs()}
        self._y = torch.empty(tuple(outputs["y"].shape), device=self.device)
        self.reset()

    def reset(self) -> None:
        self.state = [torch.zeros(tuple(i.shape), device=self.device) for i in self.state_inputs]
        self._next_state = [torch.empty_like(s) for s in self.state]

    def _bind(self, binding, name: str, tensor: torch.Tensor, output: bool) -> None:
        kind = "cuda" if tensor.is_cuda else "cpu"
        bind = binding.bind_output if output else binding.bind_input
        bind(name, kind, tensor.device.index or 0, np.float32, tuple(tensor.shape), tensor.data_ptr())

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """One chunk: x [N, ...] (float32 on any device) -> y (a new tensor on the runner's device)."""
        x = x.detach().to(self.device, torch.float32).contiguous()
        binding = self.session.io_binding()
        self._bind(binding, "x", x, output=False)
        for i, (spec, state, new) in enumerate(zip(self.state_inputs, self.state, self._next_state)):
            self._bind(binding, spec.name, state, output=False)
            self._bind(binding, f"new_state_{i}", new, output=True)
        self._bind(binding, "y", self._y, output=True)
        self.session.run_with_iobinding(binding)
        self.state, self._next_state = self._next_state, self.state
        return self._y.clone()
