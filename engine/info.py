"""Sizes, memory and FLOPs of a model at a resolution, to plan performance against the compute floor.

    info = model_info(ModelConfig.from_name("14b"), StreamConfig.for_resolution(512, 512))
    print(format_info(info))

FLOPs count multiply-adds as two operations and cover the matrix work (linear layers, attention scores
and values); norms, RoPE and elementwise work are memory-bound and not counted. Per chunk the student
makes ``len(t_list)`` denoising calls plus one commit call, each on ``chunk_frames`` latent frames.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .cache import visible_cached_frames
from .config import ModelConfig, StreamConfig, tokens_per_frame
from .model import count_parameters

DEFAULT_PEAK_TFLOPS = 800.0  # dense bf16 GEMM rate an H100 SXM sustains on large products (datasheet: 989)


@dataclass(frozen=True)
class ModelInfo:
    parameters: int
    weight_bytes: int
    kv_cache_bytes: int
    tokens_per_frame: int
    query_tokens: int
    flops_per_call: dict[str, float]
    """Per window shape (chunk0 / chunk1 / steady): FLOPs of one call."""
    flops_per_chunk_steady: float
    output_frames_per_chunk: int
    flops_per_output_frame: float
    floor_ms_per_chunk: float
    floor_fps: float
    peak_tflops: float
    dtype_bytes: int


def call_flops(cfg: ModelConfig, query_tokens: int, key_tokens: int) -> float:
    """Matrix FLOPs of one network call with ``query_tokens`` tokens attending to ``key_tokens``."""
    d, lq = cfg.dim, query_tokens
    per_block = (
        2 * lq * d * d * 4  # self-attention q, k, v, o
        + 4 * lq * key_tokens * d  # self-attention scores and values
        + 2 * lq * d * d * 2  # cross-attention q, o (text K/V are computed once per clip)
        + 4 * lq * cfg.text_len * d  # cross-attention scores and values
        + 2 * lq * d * cfg.ffn_dim * 2  # feed-forward
    )
    pt, ph, pw = cfg.patch_size
    embed_head = 2 * lq * cfg.in_dim * pt * ph * pw * d + 2 * lq * d * cfg.patch_dim
    return float(cfg.num_layers * per_block + embed_head)


def model_info(
    cfg: ModelConfig, stream: StreamConfig, *, dtype_bytes: int = 2, peak_tflops: float = DEFAULT_PEAK_TFLOPS
) -> ModelInfo:
    tpf = tokens_per_frame(cfg, stream)
    c = stream.chunk_frames
    calls = len(stream.t_list) + 1
    shapes = {}
    for name, start in (("chunk0", 0), ("chunk1", c), ("steady", 10 * c)):
        key_frames = len(visible_cached_frames(start, stream)) + c
        shapes[name] = call_flops(cfg, c * tpf, key_frames * tpf)
    params = count_parameters(cfg)
    steady = shapes["steady"] * calls
    out_frames = 4 * c  # 4 video frames per latent frame after the first chunk
    floor_ms = steady / (peak_tflops * 1e12) * 1e3
    return ModelInfo(
        parameters=params,
        weight_bytes=params * dtype_bytes,
        kv_cache_bytes=2 * cfg.num_layers * stream.window_frames * tpf * cfg.dim * dtype_bytes,
        tokens_per_frame=tpf,
        query_tokens=c * tpf,
        flops_per_call=shapes,
        flops_per_chunk_steady=steady,
        output_frames_per_chunk=out_frames,
        flops_per_output_frame=steady / out_frames,
        floor_ms_per_chunk=floor_ms,
        floor_fps=out_frames / (floor_ms / 1e3),
        peak_tflops=peak_tflops,
        dtype_bytes=dtype_bytes,
    )


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def format_info(name: str, stream: StreamConfig, info: ModelInfo) -> str:
    lines = [
        f"model {name} at {stream.latent_h * 8}x{stream.latent_w * 8} pixels "
        f"({stream.latent_h}x{stream.latent_w} latents, {info.tokens_per_frame} tokens per latent frame)",
        f"  parameters          {info.parameters / 1e9:.3f} B ({info.parameters:,})",
        f"  weights             {_gb(info.weight_bytes)} at {info.dtype_bytes} bytes per value",
        f"  KV cache            {_gb(info.kv_cache_bytes)} ({stream.window_frames} frames, all layers, K and V)",
        "  FLOPs per call      " + ", ".join(f"{k} {v / 1e12:.2f} T" for k, v in info.flops_per_call.items()),
        f"  FLOPs per chunk     {info.flops_per_chunk_steady / 1e12:.2f} T (steady state, {len(stream.t_list)} calls"
        " + commit)",
        f"  FLOPs per frame     {info.flops_per_output_frame / 1e12:.3f} T ({info.output_frames_per_chunk} output"
        " frames per chunk)",
        f"  compute floor       {info.floor_ms_per_chunk:.1f} ms per chunk = {info.floor_fps:.0f} FPS at "
        f"{info.peak_tflops:.0f} TFLOP/s",
    ]
    return "\n".join(lines)


def info_dict(info: ModelInfo) -> dict:
    return asdict(info)
