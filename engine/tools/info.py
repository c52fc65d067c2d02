"""Sizes, memory and FLOPs of a model at a resolution, to plan performance against the compute floor.

    info = model_info(ModelConfig.from_name("14b"), StreamConfig.for_resolution(512, 512))
    print(format_info("14b", stream, info))

FLOPs count multiply-adds as two operations and cover the matrix work (linear layers, attention scores
and values, convolutions); norms, RoPE and elementwise work are memory-bound and not counted. Per chunk
the student makes ``len(t_list)`` denoising calls plus one commit call, each on ``chunk_frames`` latent
frames. The codecs' FLOPs are counted by running them on the meta device under PyTorch's FLOP counter:
the encoder encodes a steady-state chunk's 12 frames for both streams (masked and unmasked), the decoder
turns 3 latents into 12 frames.

Two floors: video-to-video (the encoder runs on every chunk) and a prepared avatar (its latents are
computed once, so only the student and the decoder run per chunk).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..codecs.latent import LatentDecoder, LatentEncoder
from ..codecs.taehv import TAEHV, TAEHVConfig
from ..codecs.wan_vae import WanVAE, WanVAEConfig
from ..dit.cache import cache_capacity, visible_cached_frames
from ..dit.config import ModelConfig, StreamConfig, tokens_per_frame
from ..dit.model import count_parameters

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
    """The student's FLOPs per steady-state chunk (denoising calls + commit call)."""
    encoder: str
    encoder_flops_per_chunk: float
    """Both streams (masked and unmasked) of a steady-state chunk's 12 frames."""
    decoder: str
    decoder_flops_per_chunk: float
    output_frames_per_chunk: int
    flops_per_output_frame: float
    """Student + encoder + decoder, per output frame (video-to-video)."""
    floor_ms_per_chunk: float
    """Video-to-video: student + encoder + decoder at the peak rate."""
    floor_fps: float
    floor_ms_per_chunk_avatar: float
    """Prepared avatar (latents computed once): student + decoder at the peak rate."""
    floor_fps_avatar: float
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


def codec_flops(stream: StreamConfig, encoder: str, decoder: str) -> tuple[float, float]:
    """(encoder, decoder) FLOPs of a steady-state chunk with the released codec sizes, counted on meta."""
    h, w = stream.latent_h * 8, stream.latent_w * 8
    with torch.device("meta"):
        models = {"wan": WanVAE(WanVAEConfig()), "taehv": TAEHV(TAEHVConfig())}
    enc = LatentEncoder(encoder, models[encoder])
    dec = LatentDecoder(decoder, models[decoder])
    z = torch.zeros(1, 16, stream.chunk_frames, stream.latent_h, stream.latent_w, device="meta")
    enc.push(torch.zeros(2, 9, 3, h, w, device="meta"))  # the first chunk; the steady state is counted below
    dec.push(z)
    with FlopCounterMode(display=False) as counter:
        enc.push(torch.zeros(2, 12, 3, h, w, device="meta"))
    encode = float(counter.get_total_flops())
    with FlopCounterMode(display=False) as counter:
        dec.push(z)
    return encode, float(counter.get_total_flops())


def model_info(
    cfg: ModelConfig,
    stream: StreamConfig,
    *,
    dtype_bytes: int = 2,
    peak_tflops: float = DEFAULT_PEAK_TFLOPS,
    encoder: str = "wan",
    decoder: str = "taehv",
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
    encode, decode = codec_flops(stream, encoder, decoder)
    out_frames = 4 * c  # 4 video frames per latent frame after the first chunk
    rate = peak_tflops * 1e12
    floor_ms = (steady + encode + decode) / rate * 1e3
    avatar_ms = (steady + decode) / rate * 1e3
    return ModelInfo(
        parameters=params,
        weight_bytes=params * dtype_bytes,
        kv_cache_bytes=2 * cfg.num_layers * cache_capacity(stream) * tpf * cfg.dim * dtype_bytes,
        tokens_per_frame=tpf,
        query_tokens=c * tpf,
        flops_per_call=shapes,
        flops_per_chunk_steady=steady,
        encoder=encoder,
        encoder_flops_per_chunk=encode,
        decoder=decoder,
        decoder_flops_per_chunk=decode,
        output_frames_per_chunk=out_frames,
        flops_per_output_frame=(steady + encode + decode) / out_frames,
        floor_ms_per_chunk=floor_ms,
        floor_fps=out_frames / (floor_ms / 1e3),
        floor_ms_per_chunk_avatar=avatar_ms,
        floor_fps_avatar=out_frames / (avatar_ms / 1e3),
        peak_tflops=peak_tflops,
        dtype_bytes=dtype_bytes,
    )


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def format_info(name: str, stream: StreamConfig, info: ModelInfo) -> str:
    chunk = f"{info.output_frames_per_chunk} output frames per chunk"
    lines = [
        f"model {name} at {stream.latent_h * 8}x{stream.latent_w * 8} pixels "
        f"({stream.latent_h}x{stream.latent_w} latents, {info.tokens_per_frame} tokens per latent frame)",
        f"  parameters          {info.parameters / 1e9:.3f} B ({info.parameters:,})",
        f"  weights             {_gb(info.weight_bytes)} at {info.dtype_bytes} bytes per value",
        f"  KV cache            {_gb(info.kv_cache_bytes)} (sink + what the next chunk sees, all layers, K and V)",
        "  FLOPs per call      " + ", ".join(f"{k} {v / 1e12:.2f} T" for k, v in info.flops_per_call.items()),
        f"  student per chunk   {info.flops_per_chunk_steady / 1e12:.2f} T (steady state, {len(stream.t_list)} "
        "calls + commit)",
        f"  {info.encoder} encoder       {info.encoder_flops_per_chunk / 1e12:.2f} T per chunk (12 frames, masked "
        "and unmasked streams)",
        f"  {info.decoder} decoder     {info.decoder_flops_per_chunk / 1e12:.2f} T per chunk (3 latents -> 12 frames)",
        f"  FLOPs per frame     {info.flops_per_output_frame / 1e12:.3f} T ({chunk}, codecs included)",
        f"  compute floor       {info.floor_ms_per_chunk:.1f} ms per chunk = {info.floor_fps:.0f} FPS video-to-video; "
        f"{info.floor_ms_per_chunk_avatar:.1f} ms = {info.floor_fps_avatar:.0f} FPS with a prepared avatar "
        f"(at {info.peak_tflops:.0f} TFLOP/s)",
    ]
    return "\n".join(lines)


def info_dict(info: ModelInfo) -> dict:
    return asdict(info)
