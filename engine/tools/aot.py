"""AOTInductor packages of the student for hosts without Python (``lipforcing export-aot``).

    export_aot(model, stream, out_dir)        # text.pt2 + call_c0.pt2, call_c3.pt2, call_c4.pt2 + aot.json

The streaming loop needs two kinds of network calls, each compiled ahead of time with
``torch._inductor.aoti_compile_and_package`` (weights inside the package):

- ``text.pt2``: text_context [1, text_len, text_dim] -> (text_k, text_v), each [layers, 1, text_len, H, D]:
  the cross-attention K/V, once per clip.
- ``call_c<N>.pt2``, one per window shape (N cached frames: 0 for a clip's first chunk, then 3, then 4 for the
  released sink 1 + window 7): (x_in [1, 65, 3, h, w], t [1] float64, audio [1, V, audio_dim] (the chunk's
  video-frame audio features: 9 for the first chunk, then 12), text_k, text_v, cache_k, cache_v
  [layers, 1, N * tokens, H, D]) -> (flow [1, 16, 3, h, w], new_k, new_v [layers, 1, 3 * tokens, H, D]).
  The KV cache is explicit state: the host keeps it and passes the visible frames' raw K/V (window order);
  a commit call (t = 0) returns the chunk's raw K/V, which the host stores. Dynamic RoPE is applied inside,
  from the window positions of the shape.

``aot.json`` records the configuration (sizes, t_list, window, sink, chunk, the shapes) that the C++ student
(``native/lf_student``) reads. The calls compute exactly what the Python reference path computes (the same
modules, the reference attention).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ...kernels.rope import apply_rope
from ..dit.attention import RopeTable, sdpa
from ..dit.cache import ChunkPlan, cache_capacity, plan_chunk
from ..dit.config import StreamConfig
from ..dit.model import CausalWanStudent
from ..media.io import write_json

log = logging.getLogger("lipforcing")
AOT_FORMAT = "lipforcing-aot/1"


class _ExplicitCache:
    """An attention context over a cache passed in as tensors; it collects the chunk's raw K/V."""

    backend = "reference"

    def __init__(self, cache_k, cache_v, q_angles, k_angles) -> None:
        self.cache_k, self.cache_v, self.q_angles, self.k_angles = cache_k, cache_v, q_angles, k_angles
        self.new_k: list[torch.Tensor] = []
        self.new_v: list[torch.Tensor] = []

    def self_attention(self, layer: int, q, k, v):
        keys, values = k, v
        if self.cache_k is not None:
            keys = torch.cat([self.cache_k[layer], k], dim=1)
            values = torch.cat([self.cache_v[layer], v], dim=1)
        self.new_k.append(k)
        self.new_v.append(v)
        return sdpa(apply_rope(q, self.q_angles), apply_rope(keys, self.k_angles), values)


class TextCall(nn.Module):
    def __init__(self, model: CausalWanStudent) -> None:
        super().__init__()
        self.model = model

    def forward(self, text_context: torch.Tensor):
        kv = self.model.text_kv(text_context)
        return torch.stack([k for k, _ in kv]), torch.stack([v for _, v in kv])


class ChunkCall(nn.Module):
    """One network call of a chunk with a given window shape (see the module docstring)."""

    def __init__(self, model: CausalWanStudent, plan: ChunkPlan, rope: RopeTable) -> None:
        super().__init__()
        self.model, self.plan = model, plan
        self.register_buffer("q_angles", rope.queries(plan).clone(), persistent=False)
        self.register_buffer("k_angles", rope.keys(plan).clone(), persistent=False)

    def forward(self, x_in, t, audio, text_k, text_v, cache_k=None, cache_v=None):
        codes = self.model.audio_proj(audio, clip_start=self.plan.start == 0)
        e, e0 = self.model.time_modulation(t, 1)
        ctx = _ExplicitCache(cache_k, cache_v, self.q_angles, self.k_angles)
        text_kv = [(text_k[i], text_v[i]) for i in range(text_k.shape[0])]
        flow = self.model.forward_static(x_in, e, e0, codes, text_kv, ctx)
        return flow, torch.stack(ctx.new_k), torch.stack(ctx.new_v)


def window_shapes(stream: StreamConfig) -> list[ChunkPlan]:
    """One plan per distinct number of cached frames, in the order chunks meet them."""
    seen, plans = set(), []
    horizon = stream.window_frames + stream.sink_frames + 3 * stream.chunk_frames
    for start in range(0, horizon, stream.chunk_frames):
        plan = plan_chunk(start, stream)
        if plan.num_cached not in seen:
            seen.add(plan.num_cached)
            plans.append(plan)
    return plans


def _compile(module: nn.Module, args: tuple, path: Path) -> None:
    from torch._inductor import aoti_compile_and_package

    program = torch.export.export(module, args, strict=False)
    aoti_compile_and_package(program, package_path=str(path))


@torch.no_grad()
def export_aot(model: CausalWanStudent, stream: StreamConfig, out: str | Path, *, text_len: int | None = None,
               progress=None) -> dict:
    """Write the packages and ``aot.json`` into ``out``; returns the description."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    device = next(model.parameters()).device
    dtype = torch.float32
    model = model.eval()
    rope = RopeTable(cfg, stream, device)
    tokens = rope.tokens
    h, w = stream.latent_h, stream.latent_w
    text_len = text_len or cfg.text_len
    heads, head_dim, layers = cfg.num_heads, cfg.head_dim, cfg.num_layers
    text = torch.zeros(1, text_len, cfg.text_dim, device=device, dtype=dtype)
    steps = [("text", TextCall(model), (text,))]
    tk = torch.zeros(layers, 1, text_len, heads, head_dim, device=device, dtype=dtype)
    shapes = []
    for plan in window_shapes(stream):
        c = plan.chunk_frames
        frames = 1 + 4 * (c - 1) if plan.start == 0 else 4 * c
        args = [torch.zeros(1, cfg.in_dim, c, h, w, device=device, dtype=dtype),
                torch.zeros(1, dtype=torch.float64, device=device),
                torch.zeros(1, frames, cfg.audio_dim, device=device, dtype=dtype), tk, tk.clone()]
        if plan.num_cached:
            kv = torch.zeros(layers, 1, plan.num_cached * tokens, heads, head_dim, device=device, dtype=dtype)
            args += [kv, kv.clone()]
        name = f"call_c{plan.num_cached}"
        steps.append((name, ChunkCall(model, plan, rope), tuple(args)))
        shapes.append({"package": f"{name}.pt2", "cached_frames": plan.num_cached, "audio_frames": frames,
                       "first_start": plan.start})
    for name, module, args in steps:
        if progress:
            progress(name)
        _compile(module, args, out / f"{name}.pt2")
    description = {
        "format": AOT_FORMAT, "layers": layers, "heads": heads, "head_dim": head_dim, "tokens_per_frame": tokens,
        "latent_h": h, "latent_w": w, "in_dim": cfg.in_dim, "out_dim": cfg.out_dim, "text_len": text_len,
        "text_dim": cfg.text_dim, "audio_dim": cfg.audio_dim, "chunk_frames": stream.chunk_frames,
        "sink_frames": stream.sink_frames, "window_frames": stream.window_frames,
        "cache_capacity": cache_capacity(stream), "t_list": list(stream.t_list), "commit_t": stream.commit_t,
        "text_package": "text.pt2", "shapes": shapes,
    }
    write_json(out / "aot.json", description)  # complete or absent: lf_student reads it
    return description
