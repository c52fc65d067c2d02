"""The arithmetic that picks how one stream's student runs on N GPUs: compute, bytes moved and time per chunk.

    rows = scheme_table(ModelConfig.from_name("14b"), StreamConfig.for_resolution(512, 512), ranks=(2, 4, 8))
    plan = rank_plan(cfg, stream, ranks=4)      # what each GPU holds and moves for the chosen scheme
    split_memory(memory_plan(cfg, stream), 4)   # the one-GPU memory plan, per GPU
    print(format_table(rows)); print(format_rank_plan("14b", plan))

A steady-state chunk is three calls of the student (two denoising calls and the commit call), each over the
chunk's 3 x 1024 query tokens; every call depends on the one before (x0 of call 1 feeds call 2, the commit
writes the cache the next chunk's first call reads), so nothing of one stream can run two calls at once.

Schemes (per call, per block; S = query tokens x dim x 2 bytes, the bf16 activations of the call):
    tensor parallel    heads and FFN split (q, k, v and the first FFN layer by columns, o and the second by
                       rows): 3 all-reduces (self-attention out, cross-attention out, FFN out), each moving
                       2 (N - 1) / N x S per rank in a ring; weights and KV cache 1/N per rank.
    sequence parallel  every rank keeps T / N tokens of each frame; self-attention regroups by heads with
                       all-to-alls of q, k, v and the output: 4 x (N - 1) / N^2 x S per rank; weights whole on
                       every rank, KV cache 1/N (each rank caches its heads).
    pipeline           blocks split in N stages, the residual stream (fp32) passed on: 4 x tokens x dim bytes
                       per stage boundary and call. A stream's calls are sequential, so only one stage works at
                       a time: no faster than one GPU (pipelining consecutive chunks' calls would let a chunk
                       attend to a cache its predecessor has not committed: not the released network).
Times: compute at ``peak_tflops`` split evenly; transfers at ``link_gbs`` per direction (NVLink 4 on H100: 450
GB/s); "serial" adds them (the collectives sit between the matmuls that need their results), "overlapped" takes
the larger (the best any overlap can do). FPS counts the student alone, 12 frames per chunk: the codecs run on
rank 0 on their own device streams, beside the student.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..dit.cache import cache_capacity, visible_cached_frames
from ..dit.config import ModelConfig, StreamConfig, tokens_per_frame
from ..dit.model import count_parameters
from .info import DEFAULT_PEAK_TFLOPS, call_flops

NVLINK_GBS = 450.0  # H100 SXM NVLink 4: 900 GB/s both directions, 450 each way
SCHEMES = ("tensor parallel", "sequence parallel", "pipeline")
CHOSEN = "sequence parallel"
"""What the engine runs (dit/parallel.py): at 4 GPUs it moves ~1/8 of tensor parallelism's bytes for the same
split of compute, and its KV cache splits the same way; it costs whole weights on every GPU."""


@dataclass(frozen=True)
class SchemeRow:
    model: str
    scheme: str
    ranks: int
    possible: bool
    """False when the ranks do not divide the heads (tensor and sequence parallel split heads)."""
    compute_ms: float
    """Per rank per chunk at the peak rate."""
    comm_mb: float
    """Bytes each rank sends per chunk (MB)."""
    comm_ms: float
    chunk_ms_serial: float
    chunk_ms_overlapped: float
    fps_serial: float
    fps_overlapped: float
    weights_gb: float
    """Per rank, bf16."""
    kv_cache_gb: float
    """Per rank, bf16, one session."""


def _chunk_flops(cfg: ModelConfig, stream: StreamConfig) -> float:
    t = tokens_per_frame(cfg, stream)
    lq = stream.chunk_frames * t
    start = (stream.window_frames + stream.sink_frames) * stream.chunk_frames  # well inside the steady state
    keys = (len(visible_cached_frames(start, stream)) + stream.chunk_frames) * t
    return (len(stream.t_list) + 1) * call_flops(cfg, lq, keys)


def _sizes(cfg: ModelConfig, stream: StreamConfig) -> tuple[float, float, float, float]:
    """(bf16 bytes of the blocks' weights, of the rest, of one session's KV cache, S = one call's activations)."""
    d, f = cfg.dim, cfg.ffn_dim
    block = 8 * d * d + 2 * d * f  # self- and cross-attention q, k, v, o; the FFN
    blocks = 2.0 * cfg.num_layers * block
    rest = 2.0 * count_parameters(cfg) - blocks
    t = tokens_per_frame(cfg, stream)
    kv = 2.0 * 2 * cfg.num_layers * cache_capacity(stream) * t * cfg.dim
    activations = 2.0 * stream.chunk_frames * t * d
    return blocks, rest, kv, activations


def scheme_table(cfg: ModelConfig, stream: StreamConfig, *, name: str = "", ranks=(2, 4, 8),
                 peak_tflops: float = DEFAULT_PEAK_TFLOPS, link_gbs: float = NVLINK_GBS) -> list[SchemeRow]:
    """One row per (scheme, ranks), plus the one-GPU row (ranks 1) for reference."""
    flops = _chunk_flops(cfg, stream)
    blocks, rest, kv, s = _sizes(cfg, stream)
    calls_blocks = (len(stream.t_list) + 1) * cfg.num_layers
    one_ms = flops / (peak_tflops * 1e12) * 1e3
    rows = [_row(name, "one GPU", 1, True, one_ms, 0.0, link_gbs, stream, blocks + rest, kv)]
    for n in ranks:
        splits_heads = cfg.num_heads % n == 0
        tp = calls_blocks * 3 * 2 * (n - 1) / n * s
        rows.append(_row(name, "tensor parallel", n, splits_heads, one_ms / n, tp, link_gbs, stream,
                         blocks / n + rest, kv / n))
        sp = calls_blocks * 4 * (n - 1) / n**2 * s
        rows.append(_row(name, "sequence parallel", n, splits_heads and tokens_per_frame(cfg, stream) % n == 0,
                         one_ms / n, sp, link_gbs, stream, blocks + rest, kv / n))
        # pipeline: one stage busy at a time, so the chunk takes one GPU's compute plus the hand-overs
        # (every hand-over is on the critical path: the bytes of all of them, one after another)
        hand_over = (len(stream.t_list) + 1) * (n - 1) * 2 * s  # the fp32 residual stream: twice S
        rows.append(_row(name, "pipeline", n, cfg.num_layers % n == 0, one_ms, hand_over, link_gbs, stream,
                         (blocks + rest) / n, kv / n, serial_only=True))
    return rows


def _row(name, scheme, n, possible, compute_ms, comm_bytes, link_gbs, stream, weights, kv, *,
         serial_only: bool = False) -> SchemeRow:
    comm_ms = comm_bytes / (link_gbs * 1e9) * 1e3
    serial = compute_ms + comm_ms
    overlapped = serial if serial_only else max(compute_ms, comm_ms)
    frames = 4 * stream.chunk_frames  # 12 video frames per chunk of 3 latents
    return SchemeRow(name, scheme, n, possible, round(compute_ms, 2), round(comm_bytes / 1e6, 1), round(comm_ms, 2),
                     round(serial, 2), round(overlapped, 2), round(frames / serial * 1e3, 1),
                     round(frames / overlapped * 1e3, 1), round(weights / 1e9, 2), round(kv / 1e9, 3))


def rank_plan(cfg: ModelConfig, stream: StreamConfig, ranks: int, *, name: str = "",
              peak_tflops: float = DEFAULT_PEAK_TFLOPS, link_gbs: float = NVLINK_GBS) -> dict:
    """The chosen scheme at ``ranks`` GPUs: per-GPU memory of the student and communication per chunk."""
    rows = [r for r in scheme_table(cfg, stream, name=name, ranks=(ranks,), peak_tflops=peak_tflops,
                                    link_gbs=link_gbs) if r.scheme in (CHOSEN, "one GPU")]
    one, chosen = rows
    return {"model": name, "ranks": ranks, "scheme": CHOSEN, "possible": chosen.possible,
            "one_gpu": asdict(one), "per_rank": asdict(chosen),
            "note": "student only, bf16, one session, 512x512; codecs on rank 0 beside the student; "
                    f"compute at {peak_tflops:g} TFLOP/s, transfers at {link_gbs:g} GB/s per direction"}


def split_memory(plan: dict, ranks: int) -> dict:
    """Per-GPU memory of the chosen scheme from the one-GPU memory plan (``tools.memory.memory_plan``): the KV
    cache and the graph pool (the calls' activations: T / N tokens, or H / N heads in attention) split N ways;
    rank 0 also holds the codecs, the frames and the clip-start networks, the other ranks only the student."""
    items = {i["name"]: i for i in plan["items"]}
    split = {"KV cache", "graph pool"}
    student = {"student weights", "KV cache", "text K/V", "scheduler buffers", "time and RoPE tables", "graph pool"}
    saved = sum(items[k]["bytes"] for k in split if k in items) * (ranks - 1) // ranks
    others = sum(items[k]["bytes"] // (ranks if k in split else 1) for k in student if k in items)
    others += max(items.get(k, {}).get("bytes", 0) for k in ("student text weights", "clip conditioning"))
    return {"ranks": ranks, "rank0_bytes": plan["total_bytes"] - saved, "other_rank_bytes": others,
            "one_gpu_bytes": plan["total_bytes"]}


def format_table(rows: list[SchemeRow]) -> str:
    lines = ["| model | scheme | GPUs | compute ms | sent MB | transfer ms | chunk ms serial / overlapped | "
             "student FPS serial / overlapped | weights GB per GPU | KV cache GB per GPU |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r.possible:
            lines.append(f"| {r.model} | {r.scheme} | {r.ranks} | n/a: {r.ranks} GPUs do not split the work evenly "
                         "| | | | | | |")
            continue
        lines.append(f"| {r.model} | {r.scheme} | {r.ranks} | {r.compute_ms:.1f} | {r.comm_mb:,.0f} | "
                     f"{r.comm_ms:.1f} | "
                     f"{r.chunk_ms_serial:.1f} / {r.chunk_ms_overlapped:.1f} | {r.fps_serial:.1f} / "
                     f"{r.fps_overlapped:.1f} | {r.weights_gb:.1f} | {r.kv_cache_gb:.2f} |")
    return "\n".join(lines)


def format_rank_plan(plan: dict) -> str:
    r, one = plan["per_rank"], plan["one_gpu"]
    if not plan["possible"]:
        return f"{plan['model']}: {plan['ranks']} GPUs do not divide the heads or a frame's tokens"
    return "\n".join([
        f"model {plan['model']} on {plan['ranks']} GPUs, {plan['scheme']} ({plan['note']})",
        f"  student weights per GPU   {r['weights_gb']:8.2f} GB (whole on every GPU)",
        f"  KV cache per GPU          {r['kv_cache_gb']:8.3f} GB (one GPU: {one['kv_cache_gb']:.3f} GB)",
        f"  sent per GPU per chunk    {r['comm_mb']:8.1f} MB in all-to-alls ({r['comm_ms']:.1f} ms)",
        f"  compute per GPU per chunk {r['compute_ms']:8.1f} ms (one GPU: {one['compute_ms']:.1f} ms)",
        f"  chunk                     {r['chunk_ms_serial']:8.1f} ms serial, {r['chunk_ms_overlapped']:.1f} ms "
        f"overlapped: {r['fps_serial']:.1f} / {r['fps_overlapped']:.1f} FPS of student "
        f"(one GPU: {one['fps_serial']:.1f})",
    ])
