"""Parity with golden reference files (``lipforcing-golden/1``, see the shared golden README).

    report = check_golden(path, device="cpu", backend="reference")
    report.ok, report.errors   # relative L2 errors of first_call_flow, x0_step0 and x0

Each file carries a config, the weights (released key names), the inputs (conditioning latents and the
injected noise) and the outputs of the original network's streaming path in float32.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import GoldenConfig
from .errors import LipforcingError
from .model import CausalWanStudent
from .sampler import StreamingSampler

GOLDEN_FORMAT = "lipforcing-golden/1"
PASS_BOUND = 1e-4


@dataclass
class GoldenReport:
    path: Path
    config: GoldenConfig
    errors: dict[str, float] = field(default_factory=dict)
    """Relative L2 error per quantity; ``<name>/worst_chunk`` is the worst chunk of a per-clip quantity."""

    @property
    def ok(self) -> bool:
        return all(e <= PASS_BOUND for e in self.errors.values())


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def load_golden(path: str | Path) -> tuple[GoldenConfig, dict[str, torch.Tensor]]:
    """Read a golden file: its config and all its tensors (float32, CPU)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise LipforcingError(f"{path}: no such golden file")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError) as exc:
        raise LipforcingError(f"{path}: not a readable safetensors file ({exc})") from None
    if meta.get("format") != GOLDEN_FORMAT:
        raise LipforcingError(f"{path}: format {meta.get('format')!r}, expected {GOLDEN_FORMAT!r}")
    return GoldenConfig.from_json(json.loads(meta["config"])), tensors


def check_golden(
    path: str | Path, *, device: str = "cpu", backend: str | None = "reference", dtype: torch.dtype = torch.float32
) -> GoldenReport:
    """Run the streaming sampler on a golden file's inputs and compare with its outputs."""
    cfg, tensors = load_golden(path)
    weights = {k.removeprefix("weights/"): v for k, v in tensors.items() if k.startswith("weights/")}
    inp = {k.removeprefix("inputs/"): v for k, v in tensors.items() if k.startswith("inputs/")}
    ref = {k.removeprefix("outputs/"): v for k, v in tensors.items() if k.startswith("outputs/")}

    with torch.device("meta"):
        model = CausalWanStudent(cfg.model)
    from .checkpoint import load_into

    load_into(model, weights, device=device, dtype=dtype, source=str(path))
    model.eval()

    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise LipforcingError("--device cuda was asked for but CUDA is not available")
    batch = inp["noise"].shape[0]
    sampler = StreamingSampler(model, cfg.stream, batch=batch, backend=backend, keep_intermediates=True)
    sampler.start_clip(inp["text_context"], inp["audio_emb"], inp["ref_latent"], inp["mask_latent"])
    chunks = sampler.run_clip(inp["masked_video"], inp["ref_sequence"], inp["noise"], [inp["renoise"]])

    report = GoldenReport(path=Path(path), config=cfg)
    report.errors["first_call_flow"] = rel_error(chunks[0].flows[0], ref["first_call_flow"])
    c = cfg.stream.chunk_frames
    for name, got in (("x0_step0", [ch.x0_steps[0] for ch in chunks]), ("x0", [ch.x0 for ch in chunks])):
        report.errors[name] = rel_error(torch.cat(got, dim=2), ref[name])
        report.errors[f"{name}/worst_chunk"] = max(
            rel_error(g, ref[name][:, :, i * c : (i + 1) * c]) for i, g in enumerate(got)
        )
    return report
