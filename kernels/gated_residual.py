"""Gated residual add of the DiT blocks: x + gate * y with a per-frame gate (SPEC §4.5).

    x = gated_residual(x, y, gate)
    # x, y: [B, F*T, dim]; gate: [B, F, dim] (row f for the T tokens of frame f) or [B, 1, dim]

Arithmetic is fp32, the result is cast to x's dtype once. ``gated_residual_ref`` is the fp32 reference.
Pass ``out=x`` to update the residual stream in place (each element is read before it is written).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from lipforcing.kernels.norm_modulation import frame_rows

_BLOCK_D_MAX = 1024


@triton.jit
def _gated_residual_fwd_kernel(
    x_ptr, y_ptr, gate_ptr, out_ptr,
    tokens, tokens_per_frame, dim,
    stride_xb, stride_xl,
    stride_yb, stride_yl,
    stride_gb, stride_gf,
    stride_ob, stride_ol,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    b = (row // tokens).to(tl.int64)
    n = row % tokens
    f = n // tokens_per_frame
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = offs < dim
    x = tl.load(x_ptr + b * stride_xb + n * stride_xl + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + b * stride_yb + n * stride_yl + offs, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + b * stride_gb + f * stride_gf + offs, mask=mask, other=0.0).to(tl.float32)
    out = x + gate * y
    tl.store(out_ptr + b * stride_ob + n * stride_ol + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def gated_residual(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """x + gate * y.

    x, y: [B, F*T, dim] (last dim contiguous, any dtypes); gate: [B or 1, F or 1, dim]. out: optional
    [B, F*T, dim] buffer in x's dtype (may be x itself). Returns out (contiguous when allocated here).
    """
    if x.dim() != 3 or y.shape != x.shape:
        raise ValueError(f"x and y must both be [B, F*T, dim], got {tuple(x.shape)} and {tuple(y.shape)}")
    for name, tensor in (("x", x), ("y", y)):
        if tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device}, x on {x.device}")
        if tensor.numel() and tensor.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim (stride {tensor.stride(-1)})")
    gate = frame_rows(x, gate, "gate")
    b, n, dim = x.shape
    if out is None:
        out = torch.empty((b, n, dim), dtype=x.dtype, device=x.device)
    elif (out.shape, out.dtype, out.device) != (x.shape, x.dtype, x.device) or (out.numel() and out.stride(-1) != 1):
        raise ValueError(f"out must be a {x.dtype} tensor of shape {tuple(x.shape)} with a contiguous last dim")
    if out.numel() == 0:
        return out
    block_d = min(_BLOCK_D_MAX, triton.next_power_of_2(dim))
    grid = (b * n, triton.cdiv(dim, block_d))
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _gated_residual_fwd_kernel[grid](
            x, y, gate, out,
            n, n // gate.shape[1], dim,
            x.stride(0), x.stride(1), y.stride(0), y.stride(1), gate.stride(0), gate.stride(1),
            out.stride(0), out.stride(1),
            BLOCK_D=block_d, num_warps=4,
        )
    return out


def gated_residual_ref(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """fp32 reference of ``gated_residual`` (same shapes)."""
    b, n, dim = x.shape
    frames = gate.shape[1]
    g = gate.float().expand(b, frames, dim)[:, :, None]                  # [B, F, 1, dim]
    out = x.float().reshape(b, frames, n // frames, dim) + g * y.float().reshape(b, frames, n // frames, dim)
    return out.reshape(b, n, dim).to(x.dtype)
