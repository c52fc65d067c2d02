"""SSIM and PSNR of uint8 RGB frames, batched on torch.

SSIM follows Wang et al. (2004): an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, L = 255, computed
per channel on the valid region (no padding) and averaged over channels and pixels; one value per frame.
PSNR has two conventions (``PSNR_MODES``): "pooled", 10 log10(255^2 / MSE) with the MSE over all pixels of all
frames, and "per-frame", the mean over frames of each frame's PSNR (what per-frame loops over skimage's
``peak_signal_noise_ratio`` report). The per-frame mean is never below the pooled value (Jensen: the log is
concave), and a frame identical to its reference makes it ``inf``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

_K1, _K2, _L = 0.01, 0.03, 255.0
PSNR_MODES = ("pooled", "per-frame")


def _window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).float()


def _to_tensor(frames: np.ndarray | torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W] on ``device``."""
    t = torch.as_tensor(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
    return t.to(device).permute(0, 3, 1, 2).float()


def ssim_per_frame(pred: np.ndarray, ref: np.ndarray, *, device: str | torch.device = "cpu",
                   batch: int = 16) -> np.ndarray:
    """SSIM of each frame pair: pred, ref uint8 [N, H, W, 3] (at least 11 x 11) -> float64 [N]."""
    if pred.shape != ref.shape:
        raise ValueError(f"frame shapes differ: {pred.shape} vs {ref.shape}")
    if min(pred.shape[1:3]) < 11:
        raise ValueError(f"frames of {pred.shape[1]}x{pred.shape[2]} are smaller than the 11x11 SSIM window")
    window = _window().to(device)[None, None].expand(3, 1, 11, 11)
    c1, c2 = (_K1 * _L) ** 2, (_K2 * _L) ** 2
    out = []
    for start in range(0, pred.shape[0], batch):
        x = _to_tensor(pred[start : start + batch], device)
        y = _to_tensor(ref[start : start + batch], device)

        def blur(t: torch.Tensor) -> torch.Tensor:
            return F.conv2d(t, window, groups=3)

        mx, my = blur(x), blur(y)
        sxx, syy, sxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
        s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
        out.append(s.mean(dim=(1, 2, 3)).double().cpu())
    return torch.cat(out).numpy()


def mse_per_frame(pred: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Mean squared error of each frame over its pixels and channels (uint8 scale): [N, H, W, 3] -> float64 [N]."""
    if pred.shape != ref.shape:
        raise ValueError(f"frame shapes differ: {pred.shape} vs {ref.shape}")
    out = []
    for start in range(0, pred.shape[0], 32):  # in pieces: a long video's float copy would not fit
        d = pred[start : start + 32].astype(np.float64) - ref[start : start + 32]
        out.append(np.square(d).reshape(len(d), -1).mean(axis=1))
    return np.concatenate(out) if out else np.zeros(0)


def mse(pred: np.ndarray, ref: np.ndarray) -> float:
    """Mean squared error over every pixel and channel of every frame (uint8 scale)."""
    return float(mse_per_frame(pred, ref).mean())  # frames of one size: the mean of the frames' MSEs


def psnr_from_mse(value: float) -> float:
    return math.inf if value == 0 else 10 * math.log10(_L**2 / value)


def psnr(pred: np.ndarray, ref: np.ndarray) -> float:
    """Pooled PSNR: of the MSE over all frames."""
    return psnr_from_mse(mse(pred, ref))


def psnr_per_frame(frame_mse: np.ndarray) -> np.ndarray:
    """Each frame's PSNR from its MSE [N] -> float64 [N] (``inf`` where a frame equals its reference)."""
    return np.array([psnr_from_mse(float(m)) for m in frame_mse], np.float64)


def crop_boxes(frames: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """One crop per frame: frames uint8 [N, H, W, 3], boxes int [N, 4] (x, y, w, h) of one size (clipped to the
    frame by shifting) -> uint8 [N, h, w, 3]."""
    n, height, width = frames.shape[:3]
    w, h = int(boxes[0, 2]), int(boxes[0, 3])
    out = np.empty((n, h, w, 3), np.uint8)
    for i, (x, y, _, _) in enumerate(boxes):
        x = int(min(max(0, x), width - w))
        y = int(min(max(0, y), height - h))
        out[i] = frames[i, y : y + h, x : x + w]
    return out
