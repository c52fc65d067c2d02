"""Parity with golden reference files (see the shared golden README).

    report = check_golden(path, device="cpu", backend="reference")
    report.ok, report.errors   # relative L2 errors of every output

Streaming files (``lipforcing-golden/1``) carry a config, the weights (released key names), the inputs
(conditioning latents and the injected noise) and the outputs of the original network's streaming path in
float32: ``first_call_flow``, ``x0_step0``, ``x0``. Training files (``lipforcing-golden-train/1``) carry the
full-sequence forwards training uses, checked on the engine's full-sequence path (``dit/full_sequence.py``):
the bidirectional teacher / critic call (``flow_cond``, ``flow_uncond``, ``x0_cond``, ``x0_uncond``,
``x0_guided``) and the stage-1 block-causal student call with one timestep per frame and a (window, sink)
pair (``flow``, ``x0``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..dit.checkpoint import load_into
from ..dit.config import ModelConfig, StreamConfig
from ..dit.model import CausalWanStudent
from ..errors import LipforcingError
from ..numerics import rel_error
from ..runtime.sampler import StreamingSampler

GOLDEN_FORMAT = "lipforcing-golden/1"
TRAIN_FORMAT = "lipforcing-golden-train/1"
PASS_BOUND = 1e-4


@dataclass(frozen=True)
class GoldenConfig:
    """A model + stream config read from a golden file's ``config`` metadata."""

    model: ModelConfig
    stream: StreamConfig
    num_latent_frames: int
    extra: dict = field(default_factory=dict)

    @staticmethod
    def from_json(cfg: Mapping) -> GoldenConfig:
        if "head_dim" in cfg and cfg["head_dim"] * cfg["num_heads"] != cfg["dim"]:
            raise LipforcingError(f"head_dim {cfg['head_dim']} x {cfg['num_heads']} heads is not dim {cfg['dim']}")
        model = ModelConfig(
            dim=cfg["dim"], ffn_dim=cfg["ffn_dim"], num_heads=cfg["num_heads"], num_layers=cfg["num_layers"],
            in_dim=cfg.get("in_dim", 65), out_dim=cfg.get("out_dim", 16), text_dim=cfg.get("text_dim", 4096),
            text_len=cfg.get("text_len", 512), freq_dim=cfg.get("freq_dim", 256), eps=cfg.get("eps", 1e-6),
            audio_dim=cfg.get("audio_dim", 10752), audio_hidden=cfg.get("audio_hidden", 32),
            patch_size=tuple(cfg.get("patch_size", (1, 2, 2))),
            audio_blocks=tuple(cfg["audio_blocks"]) if "audio_blocks" in cfg else None,
            rope_pairs_thw=tuple(cfg["rope_pairs_thw"]) if "rope_pairs_thw" in cfg else None,
        )
        stream = StreamConfig(
            chunk_frames=cfg.get("chunk_frames", 3), sink_frames=cfg.get("sink_frames", 1),
            window_frames=cfg.get("window_frames", 7), t_list=tuple(cfg.get("t_list", (0.999, 0.769))),
            commit_t=cfg.get("commit_t", 0.0),
            # training files record full-sequence calls, whose positions are absolute (FullSequenceAttention);
            # the streaming flag does not apply to them
            dynamic_rope=True if cfg.get("format") == TRAIN_FORMAT else cfg.get("dynamic_rope", True),
            latent_h=cfg["latent_h"], latent_w=cfg["latent_w"],
        )
        return GoldenConfig(model=model, stream=stream, num_latent_frames=cfg["num_latent_frames"], extra=dict(cfg))


@dataclass
class GoldenReport:
    path: Path
    config: GoldenConfig
    errors: dict[str, float] = field(default_factory=dict)
    """Relative L2 error per quantity; ``<name>/worst_chunk`` is the worst chunk of a per-clip quantity."""

    @property
    def ok(self) -> bool:
        return all(e <= PASS_BOUND for e in self.errors.values())


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
    if meta.get("format") not in (GOLDEN_FORMAT, TRAIN_FORMAT):
        raise LipforcingError(f"{path}: format {meta.get('format')!r}, expected {GOLDEN_FORMAT!r} or {TRAIN_FORMAT!r}")
    config = json.loads(meta["config"])
    config["format"] = meta["format"]
    return GoldenConfig.from_json(config), tensors


def is_training(cfg: GoldenConfig) -> bool:
    """A training file (full-sequence forwards), not a streaming one."""
    return cfg.extra.get("format") == TRAIN_FORMAT


def attention_kind(cfg: GoldenConfig) -> str:
    """A training file's attention: ``bidirectional`` or ``block_causal`` (the files name it either key)."""
    return cfg.extra.get("attention") or cfg.extra.get("kind") or ""


def golden_student(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
                   ) -> tuple[GoldenConfig, CausalWanStudent, dict[str, torch.Tensor]]:
    """(config, the student with the file's weights in ``dtype`` on ``device`` (eval), every tensor of the file)."""
    cfg, tensors = load_golden(path)
    weights = {k.removeprefix("weights/"): v for k, v in tensors.items() if k.startswith("weights/")}
    with torch.device("meta"):
        model = CausalWanStudent(cfg.model)
    load_into(model, weights, device=device, dtype=dtype, source=str(path))
    return cfg, model.eval(), tensors


def check_golden(
    path: str | Path, *, device: str = "cpu", backend: str | None = "reference", dtype: torch.dtype = torch.float32
) -> GoldenReport:
    """Run the engine on a golden file's inputs (the streaming sampler, or the full-sequence path for a training
    file) and compare with its outputs."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise LipforcingError("--device cuda was asked for but CUDA is not available")
    cfg, model, tensors = golden_student(path, device=device, dtype=dtype)
    inp = {k.removeprefix("inputs/"): v for k, v in tensors.items() if k.startswith("inputs/")}
    ref = {k.removeprefix("outputs/"): v for k, v in tensors.items() if k.startswith("outputs/")}

    if is_training(cfg):
        return _check_training(path, cfg, model, inp, ref, device)

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


@torch.no_grad()
def _check_training(path, cfg: GoldenConfig, model: CausalWanStudent, inp: dict, ref: dict, device) -> GoldenReport:
    """A training file: the full-sequence call(s) on the whole clip (absolute RoPE positions, one timestep per
    frame), bidirectional (conditional, unconditional, guided) or block-causal with the file's (window, sink)."""
    from ..dit.full_sequence import FullSequenceAttention, block_causal_frame_mask
    from ..dit.model import input_channels

    extra, stream = cfg.extra, cfg.stream
    kind = attention_kind(cfg)
    frames = cfg.num_latent_frames
    dev = torch.device(device)
    x_t = inp["x_t"].to(dev)
    x_in = input_channels(x_t, inp["ref_latent"].to(dev), inp["mask_latent"].to(dev), inp["masked_video"].to(dev),
                          inp["ref_sequence"].to(dev))
    text, audio = inp["text_context"].to(dev), inp["audio_emb"].to(dev)
    report = GoldenReport(path=Path(path), config=cfg)
    if kind == "block_causal":
        visible = extra.get("visible_frames_per_chunk")
        if visible is not None:  # the file's own statement of the mask: ours must agree before anything runs
            mask = block_causal_frame_mask(frames, stream)
            c = stream.chunk_frames
            for b, keys in enumerate(visible):
                ours = sorted(torch.nonzero(mask[b * c]).flatten().tolist())
                if ours != sorted(keys):
                    raise LipforcingError(f"{path}: chunk {b} sees frames {ours} here, {sorted(keys)} in the file")
        t = torch.tensor(extra["t_frames"], dtype=torch.float64, device=dev)[None]  # [1, F]
        ctx = FullSequenceAttention(cfg.model, stream, frames, block_causal=True, device=dev)
        flow = model(x_in, t, model.prepare_clip(text, audio), ctx)
        x0 = (x_t.double() - t[:, None, :, None, None] * flow.double()).float()
        report.errors["flow"] = rel_error(flow, ref["flow"])
        report.errors["x0"] = rel_error(x0, ref["x0"])
        return report
    if kind != "bidirectional":
        raise LipforcingError(f"{path}: unknown attention {kind!r} (bidirectional or block_causal)")
    t = float(extra["t"])
    ctx = FullSequenceAttention(cfg.model, stream, frames, block_causal=False, device=dev)
    flow_c = model(x_in, t, model.prepare_clip(text, audio), ctx)
    flow_u = model(x_in, t, model.prepare_clip(torch.zeros_like(text), torch.zeros_like(audio)), ctx)
    x0_c = (x_t.double() - t * flow_c.double())
    x0_u = (x_t.double() - t * flow_u.double())
    scale = float(extra.get("guidance_scale_applied", extra.get("guidance_scale", 1.0)))
    guided = x0_c + (scale - 1) * (x0_c - x0_u)
    for name, got in (("flow_cond", flow_c), ("flow_uncond", flow_u), ("x0_cond", x0_c), ("x0_uncond", x0_u),
                      ("x0_guided", guided)):
        if name in ref:
            report.errors[name] = rel_error(got.float(), ref[name])
    return report
