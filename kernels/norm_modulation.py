"""LayerNorm without affine fused with the per-frame adaLN modulation of the DiT blocks (SPEC §4.5-6).

    h = modulated_layer_norm(x, scale, shift, eps=1e-6)   # LN(x) * (1 + scale) + shift
    # x: [B, F*T, dim]; scale, shift: [B, F, dim] (row f for the T tokens of frame f) or [B, 1, dim]

Statistics (mean, biased variance) and the modulation are fp32; the result is cast to x's dtype once.
The released code rounds LN(x) to bf16 before modulating in fp32, so a bf16 run differs from it by at
most one extra bf16 rounding. ``modulated_layer_norm_ref`` is the fp32 PyTorch reference.

One program normalizes one token row held entirely in registers (dim <= 16384).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

MAX_DIM = 16384


@triton.jit
def _modulated_layer_norm_fwd_kernel(
    x_ptr, scale_ptr, shift_ptr, y_ptr,
    tokens, tokens_per_frame, dim, eps,
    stride_xb, stride_xl,
    stride_sb, stride_sf,
    stride_hb, stride_hf,
    stride_yb, stride_yl,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    b = (row // tokens).to(tl.int64)
    n = row % tokens
    f = n // tokens_per_frame
    offs = tl.arange(0, BLOCK_D)
    mask = offs < dim

    x = tl.load(x_ptr + b * stride_xb + n * stride_xl + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, 0) / dim
    centered = tl.where(mask, x - mean, 0.0)
    var = tl.sum(centered * centered, 0) / dim
    normed = centered * tl.rsqrt(var + eps)

    scale = tl.load(scale_ptr + b * stride_sb + f * stride_sf + offs, mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + b * stride_hb + f * stride_hf + offs, mask=mask, other=0.0).to(tl.float32)
    y = normed * (1.0 + scale) + shift
    tl.store(y_ptr + b * stride_yb + n * stride_yl + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def frame_rows(x: torch.Tensor, table: torch.Tensor, name: str) -> torch.Tensor:
    """Validate a per-frame table [B or 1, F or 1, dim] against x [B, F*T, dim]; return it expanded to
    [B, F', dim] (a view: broadcast dims get stride 0)."""
    b, n, dim = x.shape
    if table.dim() != 3 or table.shape[-1] != dim or table.shape[0] not in (1, b):
        raise ValueError(f"{name} must be [B={b} or 1, F or 1, dim={dim}], got {tuple(table.shape)}")
    frames = table.shape[1]
    if frames == 0 or n % frames:
        raise ValueError(f"{name} has {frames} frame rows, which do not divide the {n} tokens of x")
    if table.device != x.device:
        raise ValueError(f"{name} is on {table.device}, x on {x.device}")
    if table.numel() and table.stride(-1) != 1 and dim > 1:
        raise ValueError(f"{name} must have a contiguous last dim (stride {table.stride(-1)})")
    return table.expand(b, frames, dim)


def _check_x(x: torch.Tensor) -> None:
    if x.dim() != 3:
        raise ValueError(f"x must be [B, F*T, dim], got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be floating point, got {x.dtype}")
    if x.numel() and x.stride(-1) != 1:
        raise ValueError(f"x must have a contiguous last dim (stride {x.stride(-1)})")
    if x.shape[-1] > MAX_DIM:
        raise ValueError(f"dim {x.shape[-1]} exceeds {MAX_DIM}, the widest row one program holds")


def _row_warps(block_d: int) -> int:
    return min(16, max(1, block_d // 512))


def modulated_layer_norm(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """LN(x) * (1 + scale) + shift, LayerNorm without affine over the last dim.

    x: [B, F*T, dim] (last dim contiguous); scale, shift: [B or 1, F or 1, dim], row f applies to the
    tokens f*T .. f*T + T - 1. Returns a contiguous [B, F*T, dim] tensor in x's dtype.
    """
    _check_x(x)
    scale = frame_rows(x, scale, "scale")
    shift = frame_rows(x, shift, "shift")
    if scale.shape[1] != shift.shape[1]:
        raise ValueError(f"scale has {scale.shape[1]} frame rows but shift has {shift.shape[1]}")
    b, n, dim = x.shape
    y = torch.empty((b, n, dim), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    block_d = triton.next_power_of_2(dim)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _modulated_layer_norm_fwd_kernel[(b * n,)](
            x, scale, shift, y,
            n, n // scale.shape[1], dim, float(eps),
            x.stride(0), x.stride(1), scale.stride(0), scale.stride(1), shift.stride(0), shift.stride(1),
            y.stride(0), y.stride(1),
            BLOCK_D=block_d, num_warps=_row_warps(block_d),
        )
    return y


def modulated_layer_norm_ref(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """fp32 reference of ``modulated_layer_norm`` (same shapes)."""
    b, n, dim = x.shape
    frames = scale.shape[1]
    normed = torch.nn.functional.layer_norm(x.float(), (dim,), eps=eps)
    normed = normed.reshape(b, frames, n // frames, dim)                # [B, F, T, dim]
    y = normed * (1 + scale.float()[:, :, None]) + shift.float()[:, :, None]
    return y.reshape(b, n, dim).to(x.dtype)
