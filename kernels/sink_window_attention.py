"""Sink + window self-attention with the 3-axis dynamic RoPE fused in registers (SPEC §5).

The keys of a call are [cached frames (raw, unrotated K), the chunk's own live frames]; every key and
query is rotated on the fly with its window-relative temporal position and its (row, col) in the token
grid, so the cache is never rotated, copied or concatenated in memory. cos / sin come from a [positions,
D/2] float32 table (a few KB, L1-resident) indexed by each pair's own integer position: no transcendental
instruction (MUFU) in the key loop, whose MUFU pipe the softmax's exp2 already keeps busy.

    o = sink_window_attention(q, k_live, v_live, k_cache, v_cache, q_frame_pos, cache_frame_pos,
                              grid_hw=(32, 32), pairs_thw=(22, 21, 21))
    # q, k_live, v_live: [B, Lq, H, D]; k_cache, v_cache: [B, Lc, H, D] (Lc may be 0)

``sink_window_attention_ref`` is the fp32 PyTorch reference with the same signature.

Kernel layout: one program per (BLOCK_M queries, batch, head). Each tile is loaded as its even dims
and its odd dims (two stride-2 loads, which compile to fewer registers than one load plus a split),
rotated in fp32 with cos/sin of position * freq, cast back to the input dtype, and the scores are
dot(q_even, k_even^T) + dot(q_odd, k_odd^T) (a dot product is invariant to a common permutation of D,
so the halves never need re-interleaving).
Online softmax in fp32 (exp2 with the scale folded in), one pass over the cache keys, one over the live
keys.

The autotuner benchmarks on the first call of each (batch, heads, Lq, Lc, D, dtype) and keeps the result in
Triton's cache folder (the engine points TRITON_CACHE_DIR at its user cache): warm up before capturing a CUDA
graph. ``lipforcing kernels --static`` compiles every config for sm_90a on the CPU and reports registers,
spills, shared memory and CTAs per SM (kernels/STATIC.md).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os

import torch
import triton
import triton.language as tl

from lipforcing.kernels.rope import apply_rope, rope_angles, rope_angles_table

SUPPORTED_HEAD_DIMS = (32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _pair_axes(HALF: tl.constexpr, PAIRS_T: tl.constexpr, PAIRS_H: tl.constexpr):
    """Per pair j in [0, HALF): whether it rotates by the temporal position, or by the row (else the column)."""
    j = tl.arange(0, HALF)
    return j, j < PAIRS_T, (j >= PAIRS_T) & (j < PAIRS_T + PAIRS_H)


@triton.jit
def _load_rotated(
    base_ptr,                  # first token of the tile, head already applied
    offs_tok,                  # [BLOCK] token index inside the (cache or live) sequence
    n_tok,                     # tokens in the sequence
    stride_tok,
    pos_ptr,                   # [F] temporal position per frame
    cols,
    tokens_per_frame,
    pair,                      # [HALF] pair index
    is_t,                      # [HALF]
    is_h,                      # [HALF]
    cos_ptr, sin_ptr,          # [P, HALF] float32 cos / sin of position p times pair j's frequency
    scale_ptr,                 # SCALED: [F] float32 dequantisation scale per frame (this head's), stride_scale
    stride_scale,
    BLOCK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    SCALED: tl.constexpr,
):
    """Load a [BLOCK, HEAD_DIM] tile (e4m3 times its frame's scale when SCALED) and return its RoPE-rotated
    (even, odd) halves in fp32."""
    HALF: tl.constexpr = HEAD_DIM // 2
    offs_p = tl.arange(0, HALF)
    valid = offs_tok < n_tok
    rows_in = tl.arange(0, BLOCK)
    ptrs = base_ptr + rows_in[:, None] * stride_tok + 2 * offs_p[None, :]
    x_even = tl.load(ptrs, mask=valid[:, None], other=0.0).to(tl.float32)
    x_odd = tl.load(ptrs + 1, mask=valid[:, None], other=0.0).to(tl.float32)

    frame = offs_tok // tokens_per_frame
    if SCALED:
        s = tl.load(scale_ptr + frame * stride_scale, mask=valid, other=0.0)
        x_even = x_even * s[:, None]
        x_odd = x_odd * s[:, None]
    in_frame = offs_tok - frame * tokens_per_frame
    row = in_frame // cols
    col = in_frame - row * cols
    t_pos = tl.load(pos_ptr + frame, mask=valid, other=0)
    pos = tl.where(is_t[None, :], t_pos[:, None], tl.where(is_h[None, :], row[:, None], col[:, None]))
    table = pos * HALF + pair[None, :]  # a few KB, read from L1: no MUFU in the key loop
    cos = tl.load(cos_ptr + table, mask=valid[:, None], other=1.0)
    sin = tl.load(sin_ptr + table, mask=valid[:, None], other=0.0)
    return x_even * cos - x_odd * sin, x_even * sin + x_odd * cos


@triton.jit
def _attend_keys(
    acc, m_i, l_i,             # running output [BLOCK_M, D], row max [BLOCK_M], row sum [BLOCK_M] (fp32)
    q_even, q_odd,             # [BLOCK_M, HALF] rotated queries in the input dtype
    k_ptr, v_ptr,              # first token of this (batch, head)
    n_keys,
    stride_k_tok, stride_v_tok,
    pos_ptr, cols, tokens_per_frame,
    pair, is_t, is_h, cos_ptr, sin_ptr,
    qk_scale,                  # softmax scale * log2(e)
    k_scale_ptr, v_scale_ptr, stride_scale,  # SCALED: e4m3 keys / values, one float32 scale per frame
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SCALED: tl.constexpr,
):
    """Online-softmax pass over n_keys keys starting at k_ptr / v_ptr."""
    offs_d = tl.arange(0, HEAD_DIM)
    rows_in = tl.arange(0, BLOCK_N)
    for start in range(0, n_keys, BLOCK_N):
        offs_n = start + rows_in
        valid = offs_n < n_keys
        k_even, k_odd = _load_rotated(
            k_ptr + start * stride_k_tok, offs_n, n_keys, stride_k_tok, pos_ptr, cols, tokens_per_frame,
            pair, is_t, is_h, cos_ptr, sin_ptr, k_scale_ptr, stride_scale, BLOCK_N, HEAD_DIM, SCALED,
        )
        k_even = k_even.to(q_even.dtype)
        k_odd = k_odd.to(q_even.dtype)
        s = tl.dot(q_even, tl.trans(k_even), input_precision=DOT_PRECISION)
        s = tl.dot(q_odd, tl.trans(k_odd), s, input_precision=DOT_PRECISION)   # [BLOCK_M, BLOCK_N]
        s = tl.where(valid[None, :], s * qk_scale, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_ptr + (start + rows_in)[:, None] * stride_v_tok + offs_d[None, :], mask=valid[:, None], other=0.0
        )
        if SCALED:
            sv = tl.load(v_scale_ptr + (offs_n // tokens_per_frame) * stride_scale, mask=valid, other=0.0)
            v = (v.to(tl.float32) * sv[:, None]).to(q_even.dtype)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


# ``batch`` is read by the autotuner's key only; not specializing it on its value keeps batch 1 and batch 2
# one binary.
@triton.jit(do_not_specialize=["batch"])
def _sink_window_attention_fwd_kernel(
    q_ptr, k_live_ptr, v_live_ptr, k_cache_ptr, v_cache_ptr, o_ptr,
    q_pos_ptr, cache_pos_ptr,
    cos_ptr, sin_ptr,          # [P, HEAD_DIM / 2] float32 RoPE table (``rope_table``)
    k_scale_ptr, v_scale_ptr,  # KV_FP8: [B, Fc, H] float32 scales of the e4m3 cache (strides stride_s*)
    stride_sb, stride_sf, stride_sh,
    stride_qb, stride_ql, stride_qh,
    stride_klb, stride_kll, stride_klh,
    stride_vlb, stride_vll, stride_vlh,
    stride_kcb, stride_kcl, stride_kch,
    stride_vcb, stride_vcl, stride_vch,
    stride_ob, stride_ol, stride_oh,
    batch, num_heads, LQ, LC, cols, tokens_per_frame,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    PAIRS_T: tl.constexpr,
    PAIRS_H: tl.constexpr,
    PAIRS_W: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    HALF: tl.constexpr = HEAD_DIM // 2
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)

    pair, is_t, is_h = _pair_axes(HALF, PAIRS_T, PAIRS_H)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q_base = q_ptr + b * stride_qb + h * stride_qh + pid_m * BLOCK_M * stride_ql
    q_even, q_odd = _load_rotated(
        q_base, offs_m, LQ, stride_ql, q_pos_ptr, cols, tokens_per_frame,
        pair, is_t, is_h, cos_ptr, sin_ptr, k_scale_ptr, 0, BLOCK_M, HEAD_DIM, False,
    )
    q_even = q_even.to(q_ptr.dtype.element_ty)   # [BLOCK_M, HALF]
    q_odd = q_odd.to(q_ptr.dtype.element_ty)

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    acc, m_i, l_i = _attend_keys(
        acc, m_i, l_i, q_even, q_odd,
        k_cache_ptr + b * stride_kcb + h * stride_kch, v_cache_ptr + b * stride_vcb + h * stride_vch,
        LC, stride_kcl, stride_vcl, cache_pos_ptr, cols, tokens_per_frame,
        pair, is_t, is_h, cos_ptr, sin_ptr, qk_scale,
        k_scale_ptr + b * stride_sb + h * stride_sh, v_scale_ptr + b * stride_sb + h * stride_sh, stride_sf,
        BLOCK_N, HEAD_DIM, DOT_PRECISION, KV_FP8,
    )
    acc, m_i, l_i = _attend_keys(
        acc, m_i, l_i, q_even, q_odd,
        k_live_ptr + b * stride_klb + h * stride_klh, v_live_ptr + b * stride_vlb + h * stride_vlh,
        LQ, stride_kll, stride_vll, q_pos_ptr, cols, tokens_per_frame,
        pair, is_t, is_h, cos_ptr, sin_ptr, qk_scale, k_scale_ptr, v_scale_ptr, 0,
        BLOCK_N, HEAD_DIM, DOT_PRECISION, False,
    )

    out = acc / l_i[:, None]
    offs_d = tl.arange(0, HEAD_DIM)
    o_ptrs = o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=(offs_m < LQ)[:, None])


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per head dim. The in-register rotation of every K tile
# costs registers that a plain flash-attention kernel does not need: these are the configs that compile
# for sm_90a without spilling (ptxas -v, Triton 3.9; checked by ``lipforcing kernels --static`` and
# tests/kernels/test_static_report.py); 128x64 / 4 warps for D=128 spills ~2-5 KB.
_TILES = {
    128: [(128, 64, 8, 1), (128, 64, 8, 2), (128, 32, 8, 2), (128, 32, 8, 3), (64, 64, 8, 2), (64, 32, 4, 2)],
    64: [(128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (128, 32, 4, 3), (64, 64, 8, 2), (64, 32, 4, 2)],
    32: [(128, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 32, 4, 2)],
}
# fp32 inputs take the FMA path of tl.dot (no tensor cores with input_precision="ieee"), whose operands and
# accumulators need several times the registers: with the tiles above every D=128 config spilled (up to
# 64 KB of spill stores at 128x64, ptxas dropping to 32 registers). These compile for sm_90a without
# spilling; the D=128 ones stay below 255 registers (112-245), headroom for another ptxas release.
_TILES_FP32 = {
    128: [(64, 16, 8, 1), (64, 16, 8, 3), (32, 16, 8, 2), (32, 16, 4, 3), (16, 16, 4, 2)],
    64: [(64, 64, 8, 2), (64, 32, 8, 2), (64, 16, 8, 2), (32, 32, 4, 2)],
    32: [(128, 32, 8, 2), (64, 64, 8, 2), (64, 32, 4, 2), (32, 64, 4, 2), (32, 32, 4, 3)],
}


def _gpu_configs() -> list[triton.Config]:
    tiles = sorted({tile for table in (_TILES, _TILES_FP32) for per_dim in table.values() for tile in per_dim})
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)
        for bm, bn, warps, stages in tiles
    ]


def _configs_for_head_dim_and_dtype(configs, named_args, **kwargs):
    """Early prune: the tiles of this head dim for 16-bit inputs, or the fp32 ones."""
    table = _TILES_FP32 if named_args["q_ptr"].dtype == torch.float32 else _TILES
    tiles = set(table[kwargs["HEAD_DIM"]])
    return [
        c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in tiles
    ]


def _persistent_autotune() -> dict:
    """Keep autotuning results on disk (Triton's cache folder, TRITON_CACHE_DIR) so that later processes
    skip the benchmark; Triton releases before ``cache_results`` existed tune again in every process."""
    return {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


_sink_window_attention_fwd_tuned = triton.autotune(
    configs=_gpu_configs(),
    # Everything that moves the best tile: the grid (batch x heads x Lq / BLOCK_M), the window (Lq, Lc), the
    # head dim and the dtype. The dtype is not named because Triton adds it itself: Autotuner.run appends
    # str(arg.dtype) of every tensor argument to the key (checked in Triton 3.9's runtime/autotuner.py).
    key=["batch", "num_heads", "LQ", "LC", "HEAD_DIM", "DOT_PRECISION"],
    prune_configs_by={"early_config_prune": _configs_for_head_dim_and_dtype},
    **_persistent_autotune(),
)(_sink_window_attention_fwd_kernel)

# The autotuner's keys launched in this process (its ``key`` plus the dtype Triton adds): a new one is a tuning
# event (a benchmark of every config, or a disk-cache read). Warm-ups run every key first; tests count them.
_TUNED_KEYS: set[tuple] = set()


def tuning_events() -> int:
    """How many distinct autotuning keys the attention has launched in this process (interpreter runs count
    the same keys, so CPU tests check where tuning would happen on a GPU)."""
    return len(_TUNED_KEYS)


# The interpreter runs every program in Python: small tiles keep CPU tests fast and exercise masking.
_INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16}


# Positions a table covers at least: every temporal position (window slots: 0-10 for the released sink + window;
# the kernel's contract is < TABLE_POSITIONS) and a token grid side up to 64 (1024x1024 frames); larger grids grow it.
TABLE_POSITIONS = 64
_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def rope_table(device: torch.device, pairs_thw: tuple[int, int, int], theta: float,
               positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position p times pair j's frequency, [P, D/2] float32 (computed in float64, like the
    reference RoPE), made once per (device, pairs, theta) and grown when a call needs more positions. The kernel
    indexes it with each pair's own position (temporal, row or column): integers, so one table serves all three
    axes. Made by the first (warm-up) call, so a CUDA graph captures the launch and never the allocation."""
    key = (str(device), tuple(pairs_thw), float(theta))
    have = _TABLES.get(key)
    if have is None or have[0].shape[0] < positions:
        count = max(positions, TABLE_POSITIONS)
        angles = rope_angles_table(count, tuple(pairs_thw), theta)  # [P, D/2] float64
        _TABLES[key] = (angles.cos().float().to(device), angles.sin().float().to(device))
    return _TABLES[key]


def _check_inputs(q, k_live, v_live, k_cache, v_cache, q_frame_pos, cache_frame_pos, grid_hw, pairs_thw,
                  k_scale=None, v_scale=None):
    if q.dim() != 4:
        raise ValueError(f"q must be [B, Lq, H, D], got shape {tuple(q.shape)}")
    b, lq, h, d = q.shape
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim {d} is not supported; use one of {SUPPORTED_HEAD_DIMS}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q dtype {q.dtype} is not supported; use one of {SUPPORTED_DTYPES}")
    for name, t in (("k_live", k_live), ("v_live", v_live)):
        if t.shape != q.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} must equal q shape {tuple(q.shape)}")
    if k_cache.dim() != 4 or k_cache.shape[0] != b or k_cache.shape[2:] != (h, d):
        raise ValueError(f"k_cache must be [B={b}, Lc, H={h}, D={d}], got {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} must equal k_cache {tuple(k_cache.shape)}")
    cache_dtype = q.dtype
    if (k_scale is None) != (v_scale is None):
        raise ValueError("k_scale and v_scale go together (an e4m3 cache) or not at all")
    if k_scale is not None:
        cache_dtype = torch.float8_e4m3fn
        frames = cache_frame_pos.shape[0] if cache_frame_pos.dim() == 1 else -1
        for name, t in (("k_scale", k_scale), ("v_scale", v_scale)):
            if t.dtype != torch.float32 or tuple(t.shape) != (b, frames, h) or t.device != q.device:
                raise ValueError(f"{name} must be float32 [B={b}, Fc={frames}, H={h}] on {q.device}, "
                                 f"got {t.dtype} {tuple(t.shape)} on {t.device}")
        if k_scale.stride() != v_scale.stride():
            raise ValueError(f"k_scale and v_scale must have the same strides "
                             f"({k_scale.stride()} vs {v_scale.stride()})")
    for name, t in (("q", q), ("k_live", k_live), ("v_live", v_live), ("k_cache", k_cache), ("v_cache", v_cache)):
        expected = cache_dtype if name.endswith("cache") else q.dtype
        if t.dtype != expected:
            raise TypeError(f"{name} dtype {t.dtype} differs from {expected}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim (stride {t.stride(-1)})")
    rows, cols = grid_hw
    tokens = rows * cols
    if tokens <= 0:
        raise ValueError(f"grid_hw {tuple(grid_hw)} must be positive")
    for name, pos, n in (("q_frame_pos", q_frame_pos, lq), ("cache_frame_pos", cache_frame_pos, k_cache.shape[1])):
        if pos.dim() != 1 or pos.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be a 1-D int32/int64 tensor, got {pos.dtype} {tuple(pos.shape)}")
        if pos.device != q.device:
            raise ValueError(f"{name} is on {pos.device}, q on {q.device}")
        if pos.numel() * tokens != n:
            raise ValueError(f"{name} has {pos.numel()} frames of {rows}x{cols} tokens but the sequence has {n}")
    if len(pairs_thw) != 3 or sum(pairs_thw) != d // 2 or min(pairs_thw) <= 0:
        raise ValueError(f"pairs_thw {tuple(pairs_thw)} must be 3 positive counts summing to head_dim/2 = {d // 2}")


def sink_window_attention(
    q: torch.Tensor,
    k_live: torch.Tensor,
    v_live: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    q_frame_pos: torch.Tensor,
    cache_frame_pos: torch.Tensor,
    grid_hw: tuple[int, int],
    pairs_thw: tuple[int, int, int],
    theta: float = 10000.0,
    scale: float | None = None,
    *,
    out: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention of the chunk's queries over [cache keys, live keys], RoPE applied on the fly.

    q, k_live, v_live: [B, Lq, H, D], q and k after RMSNorm and not rotated; Lq = Fq * rows * cols tokens
        ordered (frame, row, col).
    k_cache, v_cache: [B, Lc, H, D] raw cached keys / values (Lc = Fc * rows * cols, may be 0); any strides
        with a contiguous last dim (views of a preallocated cache are read in place).
    q_frame_pos: [Fq] int temporal positions of the chunk's frames (the live keys use them too).
    cache_frame_pos: [Fc] int temporal positions of the cached frames. Positions are in [0, TABLE_POSITIONS)
        (window slots: the kernel reads cos / sin from a table, see ``rope_table``).
    grid_hw: (rows, cols) of each frame's token grid. pairs_thw: complex pairs per axis, summing to D/2.
    scale: softmax scale, default 1/sqrt(D). out: optional [B, Lq, H, D] buffer in q's dtype.
    k_scale, v_scale: [B, Fc, H] float32 when the cache is e4m3 (``SinkWindowCache(kv_fp8=True)``): each cached
        frame's keys / values are read as e4m3 values times their frame's and head's scale.
    Returns o: [B, Lq, H, D] in q's dtype.
    """
    _check_inputs(q, k_live, v_live, k_cache, v_cache, q_frame_pos, cache_frame_pos, grid_hw, pairs_thw,
                  k_scale, v_scale)
    b, lq, h, d = q.shape
    rows, cols = grid_hw
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError(f"out must be a {q.dtype} tensor of shape {tuple(q.shape)} with a contiguous last dim")
    if lq == 0 or b == 0 or h == 0:
        return out
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    pt, ph, pw = (int(p) for p in pairs_thw)
    fp8 = k_scale is not None
    scales = (k_scale, v_scale, *k_scale.stride()) if fp8 else (q_frame_pos, q_frame_pos, 0, 0, 0)
    cos, sin = rope_table(q.device, (pt, ph, pw), theta, max(rows, cols))
    args = (
        q, k_live, v_live, k_cache, v_cache, out, q_frame_pos, cache_frame_pos, cos, sin, *scales,
        *q.stride()[:3], *k_live.stride()[:3], *v_live.stride()[:3],
        *k_cache.stride()[:3], *v_cache.stride()[:3], *out.stride()[:3],
        b, h, lq, k_cache.shape[1], cols, rows * cols,
        scale * math.log2(math.e),
    )
    meta = {
        "HEAD_DIM": d, "PAIRS_T": pt, "PAIRS_H": ph, "PAIRS_W": pw,
        "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32", "KV_FP8": fp8,
    }
    _TUNED_KEYS.add((b, h, lq, k_cache.shape[1], d, meta["DOT_PRECISION"], q.dtype, k_cache.dtype))
    if _interpreting():
        grid = (triton.cdiv(lq, _INTERPRETER_BLOCKS["BLOCK_M"]), b * h)
        _sink_window_attention_fwd_kernel[grid](*args, **meta, **_INTERPRETER_BLOCKS)
    else:
        def grid(m):
            return (triton.cdiv(lq, m["BLOCK_M"]), b * h)

        # Meta tensors (the static report records this launch without a GPU) need no device guard.
        with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
            _sink_window_attention_fwd_tuned[grid](*args, **meta)
    return out


def sink_window_attention_ref(
    q: torch.Tensor,
    k_live: torch.Tensor,
    v_live: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    q_frame_pos: torch.Tensor,
    cache_frame_pos: torch.Tensor,
    grid_hw: tuple[int, int],
    pairs_thw: tuple[int, int, int],
    theta: float = 10000.0,
    scale: float | None = None,
    *,
    compute_dtype: torch.dtype = torch.float32,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference: RoPE (float64 angles, engine.rope) on [cache, live] keys and queries, then softmax
    attention in ``compute_dtype`` (fp32 by default; float64 for error baselines). Same shapes as
    ``sink_window_attention`` (an e4m3 cache is dequantised first); returns [B, Lq, H, D] in q's dtype."""
    rows, cols = grid_hw
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if k_scale is not None:
        frames = cache_frame_pos.shape[0]
        k_cache = (k_cache.to(compute_dtype).unflatten(1, (frames, -1)) * k_scale[:, :, None, :, None]).flatten(1, 2)
        v_cache = (v_cache.to(compute_dtype).unflatten(1, (frames, -1)) * v_scale[:, :, None, :, None]).flatten(1, 2)
    k = torch.cat([k_cache, k_live], dim=1).to(compute_dtype)                  # [B, Lc + Lq, H, D]
    v = torch.cat([v_cache, v_live], dim=1).to(compute_dtype)
    key_pos = torch.cat([cache_frame_pos, q_frame_pos]).to(q.device)
    k = apply_rope(k, rope_angles(key_pos, rows, cols, tuple(pairs_thw), theta))
    qr = apply_rope(q.to(compute_dtype), rope_angles(q_frame_pos, rows, cols, tuple(pairs_thw), theta))
    scores = torch.einsum("bqhd,bkhd->bhqk", qr, k) * scale                   # [B, H, Lq, Lk]
    o = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v)
    return o.to(q.dtype)
