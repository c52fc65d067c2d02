"""Fused rectified-flow update: unpatchify the head's velocity tokens and step the latent (SPEC §2, §4.7-8).

    x0 = flow_update(v_tok, x_t, t)                                   # clean estimate
    x0, x_next = flow_update(v_tok, x_t, t, t_next=0.769, eps=noise)  # ... and the re-noised input

v_tok: [B, L, P] token-major head output, L = F * rows * cols tokens ordered (frame, row, col); each
token's P = ph * pw * C values are laid out (p_h, p_w, channel) with channel fastest:
    v[b, c, f, ph*r + a, pw*q + b'] = v_tok[b, (f*rows + r)*cols + q, (a*pw + b')*C + c].
x_t, eps: [B, C, F, H, W] latents with H = rows * ph, W = cols * pw.

One pass writes x0 = x_t - t v and, when eps is given, x_next = (1 - t_next) x0 + t_next eps, without
materializing the unpatchified v. Arithmetic is fp32; the released code does this update in float64,
so fp32 latents differ from it by ~1 ulp (~1e-7 relative), far inside any downstream tolerance.
``flow_update_ref`` is the float64 PyTorch reference (the released code's precision).

t and t_next may be Python floats or 1-element tensors on the latent's device (read by the kernel,
so a CUDA graph captured once can be replayed with new times).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from lipforcing.kernels.patches import infer_patch_hw, unpatchify

_BLOCK = 1024


@triton.jit
def _flow_update_fwd_kernel(
    v_ptr, x_ptr, eps_ptr, x0_ptr, x_next_ptr, t_ptr, t_next_ptr,
    t_value, t_next_value,
    n_elements, channels, frames, height, width, rows, cols,
    stride_vb, stride_vl,
    stride_xb, stride_xc, stride_xf, stride_xh,
    stride_eb, stride_ec, stride_ef, stride_eh,
    PATCH_H: tl.constexpr,
    PATCH_W: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    T_IN_MEMORY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # offs indexes the contiguous [B, C, F, H, W] outputs; int32 coordinates (the launcher checks the
    # size) keep the five div/mods cheap, addresses are formed in int64 from the batch index.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    w = offs % width
    rest = offs // width
    y = rest % height
    rest = rest // height
    f = rest % frames
    rest = rest // frames
    c = rest % channels
    b = (rest // channels).to(tl.int64)

    token = (f * rows + y // PATCH_H) * cols + w // PATCH_W
    slot = ((y % PATCH_H) * PATCH_W + w % PATCH_W) * channels + c
    v = tl.load(v_ptr + b * stride_vb + token * stride_vl + slot, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(
        x_ptr + b * stride_xb + c * stride_xc + f * stride_xf + y * stride_xh + w, mask=mask, other=0.0
    ).to(tl.float32)
    if T_IN_MEMORY:
        t = tl.load(t_ptr).to(tl.float32)
    else:
        t = t_value
    x0 = x - t * v
    tl.store(x0_ptr + offs, x0.to(x0_ptr.dtype.element_ty), mask=mask)
    if HAS_NOISE:
        if T_IN_MEMORY:
            t_next = tl.load(t_next_ptr).to(tl.float32)
        else:
            t_next = t_next_value
        noise = tl.load(
            eps_ptr + b * stride_eb + c * stride_ec + f * stride_ef + y * stride_eh + w, mask=mask, other=0.0
        ).to(tl.float32)
        x_next = (1.0 - t_next) * x0 + t_next * noise
        tl.store(x_next_ptr + offs, x_next.to(x_next_ptr.dtype.element_ty), mask=mask)


def _check_inputs(v_tok, x_t, eps, patch_hw):
    if x_t.dim() != 5 or v_tok.dim() != 3 or v_tok.shape[0] != x_t.shape[0]:
        raise ValueError(
            f"expected v_tok [B, L, P] and x_t [B, C, F, H, W], got {tuple(v_tok.shape)}, {tuple(x_t.shape)}"
        )
    ph, pw = infer_patch_hw(v_tok, x_t) if patch_hw is None else patch_hw
    _, c, f, h, w = x_t.shape
    if h % ph or w % pw or v_tok.shape[1] != f * (h // ph) * (w // pw) or v_tok.shape[2] != c * ph * pw:
        raise ValueError(f"patch {(ph, pw)} does not map v_tok {tuple(v_tok.shape)} onto x_t {tuple(x_t.shape)}")
    if eps is not None and eps.shape != x_t.shape:
        raise ValueError(f"eps shape {tuple(eps.shape)} must equal x_t shape {tuple(x_t.shape)}")
    for name, tensor in (("v_tok", v_tok), ("x_t", x_t), ("eps", eps)):
        if tensor is None:
            continue
        if tensor.device != x_t.device:
            raise ValueError(f"{name} is on {tensor.device}, x_t on {x_t.device}")
        if not tensor.dtype.is_floating_point:
            raise TypeError(f"{name} must be floating point, got {tensor.dtype}")
        if tensor.numel() and tensor.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim (stride {tensor.stride(-1)})")
    return ph, pw


def _time_arg(t: float | torch.Tensor, device: torch.device, name: str) -> tuple[float, torch.Tensor | None]:
    if isinstance(t, torch.Tensor):
        if t.numel() != 1 or t.device != device:
            raise ValueError(
                f"{name} must be a float or a 1-element tensor on {device}, got {tuple(t.shape)} on {t.device}"
            )
        return 0.0, t
    return float(t), None


def flow_update(
    v_tok: torch.Tensor,
    x_t: torch.Tensor,
    t: float | torch.Tensor,
    t_next: float | torch.Tensor | None = None,
    eps: torch.Tensor | None = None,
    *,
    patch_hw: tuple[int, int] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x0 = x_t - t * unpatchify(v_tok), and x_next = (1 - t_next) x0 + t_next eps when eps is given.

    v_tok: [B, L, ph*pw*C] (any dtype, last dim contiguous); x_t, eps: [B, C, F, H, W] (last dim
    contiguous). patch_hw: (ph, pw), inferred from the shapes when None. Returns x0 (and x_next),
    contiguous, in x_t's dtype.
    """
    if (t_next is None) != (eps is None):
        raise ValueError("pass t_next and eps together (re-noising) or neither")
    ph, pw = _check_inputs(v_tok, x_t, eps, patch_hw)
    b, c, f, h, w = x_t.shape
    x0 = torch.empty(x_t.shape, dtype=x_t.dtype, device=x_t.device)
    x_next = torch.empty_like(x0) if eps is not None else None
    n = x0.numel()
    if n == 0:
        return x0 if x_next is None else (x0, x_next)
    if n >= 2**31:
        raise ValueError(f"x_t has {n} elements; the kernel indexes at most 2**31 - 1 (split the batch)")
    t_value, t_tensor = _time_arg(t, x_t.device, "t")
    t_next_value, t_next_tensor = _time_arg(0.0 if t_next is None else t_next, x_t.device, "t_next")
    if eps is not None and (t_tensor is None) != (t_next_tensor is None):
        raise ValueError("t and t_next must both be floats or both be tensors")
    noise = eps if eps is not None else x_t
    grid = (triton.cdiv(n, _BLOCK),)
    with torch.cuda.device(x_t.device) if x_t.is_cuda else contextlib.nullcontext():
        _flow_update_fwd_kernel[grid](
            v_tok, x_t, noise, x0, x_next if x_next is not None else x0,
            t_tensor if t_tensor is not None else x_t, t_next_tensor if t_next_tensor is not None else x_t,
            t_value, t_next_value,
            n, c, f, h, w, h // ph, w // pw,
            v_tok.stride(0), v_tok.stride(1),
            *x_t.stride()[:4], *noise.stride()[:4],
            PATCH_H=ph, PATCH_W=pw, HAS_NOISE=eps is not None, T_IN_MEMORY=t_tensor is not None,
            BLOCK=_BLOCK, num_warps=4,
        )
    return x0 if x_next is None else (x0, x_next)


def unpatchify_ref(v_tok: torch.Tensor, shape: tuple[int, ...], patch_hw: tuple[int, int]) -> torch.Tensor:
    """[B, L, ph*pw*C] tokens -> [B, C, F, H, W] (SPEC §4.7), same dtype."""
    b, c, f, h, w = shape
    ph, pw = patch_hw
    return unpatchify(v_tok.reshape(b, f, -1, v_tok.shape[-1]), (h // ph, w // pw), c, (ph, pw))


def flow_update_ref(
    v_tok: torch.Tensor,
    x_t: torch.Tensor,
    t: float | torch.Tensor,
    t_next: float | torch.Tensor | None = None,
    eps: torch.Tensor | None = None,
    *,
    patch_hw: tuple[int, int] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Reference in float64 like the released code; same arguments and results as ``flow_update``."""
    if (t_next is None) != (eps is None):
        raise ValueError("pass t_next and eps together (re-noising) or neither")
    ph, pw = _check_inputs(v_tok, x_t, eps, patch_hw)
    t = t.double().reshape(()) if isinstance(t, torch.Tensor) else float(t)
    v = unpatchify_ref(v_tok.double(), tuple(x_t.shape), (ph, pw))
    x0 = x_t.double() - t * v
    if eps is None:
        return x0.to(x_t.dtype)
    t_next = t_next.double().reshape(()) if isinstance(t_next, torch.Tensor) else float(t_next)
    x_next = (1.0 - t_next) * x0 + t_next * eps.double()
    return x0.to(x_t.dtype), x_next.to(x_t.dtype)
