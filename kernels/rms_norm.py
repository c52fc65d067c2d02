"""RMSNorm over the full width with a learned weight: the q/k norms of the DiT attentions (SPEC §4.5).

    q = rms_norm(x, weight, eps=1e-6)   # x: [..., dim]; weight: [dim]

y = x * rsqrt(mean(x^2) + eps) * weight with fp32 statistics and products, cast to x's dtype once.
The released code casts the normalized x to bf16 before multiplying by the bf16 weight, so a bf16 run
differs from it by at most one extra bf16 rounding. ``rms_norm_ref`` is the fp32 reference.
One program normalizes one row held entirely in registers (dim <= 16384).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

MAX_DIM = 16384


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, w_ptr, y_ptr,
    dim, eps,
    stride_x, stride_y,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < dim
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, 0) / dim + eps)
    tl.store(y_ptr + row * stride_y + offs, (x * rstd * w).to(y_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x * rsqrt(mean(x^2, -1) + eps) * weight.

    x: [..., dim] whose leading dims flatten to rows without a copy (e.g. contiguous, or a row slice);
    weight: [dim]. Returns a contiguous tensor shaped like x in x's dtype.
    """
    if x.dim() == 0 or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must be [dim] matching x [..., dim]; got {tuple(weight.shape)} and {tuple(x.shape)}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device}, x on {x.device}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be floating point, got {x.dtype}")
    dim = x.shape[-1]
    if dim > MAX_DIM:
        raise ValueError(f"dim {dim} exceeds {MAX_DIM}, the widest row one program holds")
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    try:
        rows = x.view(-1, dim)
    except RuntimeError:
        raise ValueError(
            f"x with shape {tuple(x.shape)} and strides {x.stride()} cannot be viewed as rows; pass x.contiguous()"
        ) from None
    if rows.stride(-1) != 1:
        raise ValueError(f"x must have a contiguous last dim (stride {rows.stride(-1)})")
    block_d = triton.next_power_of_2(dim)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _rms_norm_fwd_kernel[(rows.shape[0],)](
            rows, weight, y, dim, float(eps), rows.stride(0), dim,
            BLOCK_D=block_d, num_warps=min(16, max(1, block_d // 512)),
        )
    return y


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """fp32 reference of ``rms_norm`` (same shapes)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
