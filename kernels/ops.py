"""The Triton kernels as ``torch.library`` custom ops (namespace ``lipforcing``) and their Python API.

    from lipforcing.kernels import ops
    o = ops.attention(q, k_live, v_live, k_cache, v_cache, q_frame_pos, cache_frame_pos, (32, 32), (22, 21, 21))
    h = ops.modulated_layer_norm(x, scale, shift, eps)
    x = ops.gated_residual(x, y, gate)
    q = ops.rms_norm(x, weight, eps)
    x0, x_next = ops.flow_update(v_tok, x_t, t, t_next, eps)

Every op has a fake (meta) implementation, so ``torch.compile`` and ``torch.export`` trace through it and
CUDA graphs capture the launch. The real implementation runs the Triton launcher on CUDA tensors; on CPU
tensors only under ``TRITON_INTERPRET=1`` (the Triton interpreter, for tests); otherwise it raises. Triton
and the kernel modules are imported on first use, so importing this module needs only torch.
"""

from __future__ import annotations

import importlib
import math
import os

import torch

from .patches import infer_patch_hw

_NO_DEVICE_MESSAGE = (
    "lipforcing.kernels: the Triton kernels run on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1, "
    "for tests); got CPU tensors. Use the PyTorch reference backend on CPU."
)


def _launcher(module: str, name: str, device: torch.device):
    """The Triton launcher ``name`` of ``lipforcing.kernels.<module>``, checked usable for ``device``."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError(_NO_DEVICE_MESSAGE)
    try:
        kernel_module = importlib.import_module(f"lipforcing.kernels.{module}")
    except ImportError as err:
        raise RuntimeError(f"lipforcing.kernels: Triton is not importable ({err}); install the 'gpu' extra") from err
    return getattr(kernel_module, name)


def _contiguous_like(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


# --- attention ---------------------------------------------------------------------------------------


@torch.library.custom_op("lipforcing::sink_window_attention", mutates_args=())
def _sink_window_attention_op(
    q: torch.Tensor,
    k_live: torch.Tensor,
    v_live: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    q_frame_pos: torch.Tensor,
    cache_frame_pos: torch.Tensor,
    rows: int,
    cols: int,
    pairs_t: int,
    pairs_h: int,
    pairs_w: int,
    theta: float,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    launch = _launcher("sink_window_attention", "sink_window_attention", q.device)
    return launch(
        q, k_live, v_live, k_cache, v_cache, q_frame_pos, cache_frame_pos,
        (rows, cols), (pairs_t, pairs_h, pairs_w), theta, scale, k_scale=k_scale, v_scale=v_scale,
    )


@_sink_window_attention_op.register_fake
def _(q, k_live, v_live, k_cache, v_cache, q_frame_pos, cache_frame_pos, rows, cols, pairs_t, pairs_h,
      pairs_w, theta, scale, k_scale=None, v_scale=None):
    torch._check(k_live.shape == q.shape and v_live.shape == q.shape, lambda: "k_live/v_live must match q")
    torch._check(k_cache.shape == v_cache.shape, lambda: "k_cache and v_cache shapes differ")
    return _contiguous_like(q)


def attention(
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
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sink + window attention with fused dynamic RoPE; see ``sink_window_attention.sink_window_attention``.

    q, k_live, v_live: [B, Lq, H, D]; k_cache, v_cache: [B, Lc, H, D]; q_frame_pos: [Fq] int;
    cache_frame_pos: [Fc] int; grid_hw: (rows, cols); pairs_thw: RoPE pairs per axis; k_scale, v_scale:
    [B, Fc, H] float32 for an e4m3 cache (read directly, dequantised in registers).
    Returns [B, Lq, H, D] in q's dtype.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    rows, cols = (int(s) for s in grid_hw)
    pt, ph, pw = (int(p) for p in pairs_thw)
    return torch.ops.lipforcing.sink_window_attention(
        q, k_live, v_live, k_cache, v_cache, q_frame_pos, cache_frame_pos, rows, cols, pt, ph, pw,
        float(theta), scale, k_scale, v_scale,
    )


# --- flow update -------------------------------------------------------------------------------------


@torch.library.custom_op("lipforcing::flow_x0", mutates_args=())
def _flow_x0_op(v_tok: torch.Tensor, x_t: torch.Tensor, t: float, patch_h: int, patch_w: int) -> torch.Tensor:
    launch = _launcher("flow_update", "flow_update", x_t.device)
    return launch(v_tok, x_t, t, patch_hw=(patch_h, patch_w))


@_flow_x0_op.register_fake
def _(v_tok, x_t, t, patch_h, patch_w):
    return _contiguous_like(x_t)


@torch.library.custom_op("lipforcing::flow_x0_renoise", mutates_args=())
def _flow_x0_renoise_op(
    v_tok: torch.Tensor, x_t: torch.Tensor, eps: torch.Tensor, t: float, t_next: float, patch_h: int, patch_w: int
) -> tuple[torch.Tensor, torch.Tensor]:
    launch = _launcher("flow_update", "flow_update", x_t.device)
    return launch(v_tok, x_t, t, t_next, eps, patch_hw=(patch_h, patch_w))


@_flow_x0_renoise_op.register_fake
def _(v_tok, x_t, eps, t, t_next, patch_h, patch_w):
    torch._check(eps.shape == x_t.shape, lambda: "eps must have x_t's shape")
    return _contiguous_like(x_t), _contiguous_like(x_t)


def flow_update(
    v_tok: torch.Tensor,
    x_t: torch.Tensor,
    t: float,
    t_next: float | None = None,
    eps: torch.Tensor | None = None,
    *,
    patch_hw: tuple[int, int] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x0 = x_t - t * unpatchify(v_tok) (and x_next = (1 - t_next) x0 + t_next eps when eps is given).

    v_tok: [B, L, ph*pw*C]; x_t, eps: [B, C, F, H, W]; patch_hw inferred from the shapes when None.
    Returns x0, or (x0, x_next), in x_t's dtype.
    """
    if (t_next is None) != (eps is None):
        raise ValueError("pass t_next and eps together (re-noising) or neither")
    if patch_hw is None:
        patch_hw = infer_patch_hw(v_tok, x_t)
    ph, pw = (int(p) for p in patch_hw)
    if eps is None:
        return torch.ops.lipforcing.flow_x0(v_tok, x_t, float(t), ph, pw)
    return torch.ops.lipforcing.flow_x0_renoise(v_tok, x_t, eps, float(t), float(t_next), ph, pw)


# --- norms and residual ------------------------------------------------------------------------------


@torch.library.custom_op("lipforcing::modulated_layer_norm", mutates_args=())
def _modulated_layer_norm_op(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
    launch = _launcher("norm_modulation", "modulated_layer_norm", x.device)
    return launch(x, scale, shift, eps)


@_modulated_layer_norm_op.register_fake
def _(x, scale, shift, eps):
    return _contiguous_like(x)


def modulated_layer_norm(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LN(x) * (1 + scale) + shift. x: [B, F*T, dim]; scale, shift: [B or 1, F or 1, dim]."""
    return torch.ops.lipforcing.modulated_layer_norm(x, scale, shift, float(eps))


@torch.library.custom_op("lipforcing::gated_residual", mutates_args=())
def _gated_residual_op(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    launch = _launcher("gated_residual", "gated_residual", x.device)
    return launch(x, y, gate)


@_gated_residual_op.register_fake
def _(x, y, gate):
    return _contiguous_like(x)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + gate * y. x, y: [B, F*T, dim]; gate: [B or 1, F or 1, dim]. Returns a new tensor in x's dtype."""
    return torch.ops.lipforcing.gated_residual(x, y, gate)


@torch.library.custom_op("lipforcing::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    launch = _launcher("rms_norm", "rms_norm", x.device)
    return launch(x, weight, eps)


@_rms_norm_op.register_fake
def _(x, weight, eps):
    return _contiguous_like(x)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight over the last dim. x: [..., dim]; weight: [dim]."""
    return torch.ops.lipforcing.rms_norm(x, weight, float(eps))
