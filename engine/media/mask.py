"""The mouth mask: which pixels of the aligned 512x512 face are regenerated (SPEC §3, §8).

The released model was trained with the LatentSync mask (256x256, 255 = keep, 0 = regenerate): a
U-shaped region from below the nose to the chin with the nose strip kept. ``render_mouth_mask`` draws
that shape from a few geometric parameters (``MouthMaskGeometry``; fitted to the released image, IoU
0.994 at 256x256), so the package carries no image file. A user's own mask (``--mask PATH``) is read
with ``load_mask``.

    keep = mouth_mask01()                             # [256, 256] float32, 1 = keep, 0 = regenerate
    keep = load_mask("my_mask.png")                   # any 8-bit grey / RGB image -> luminance / 255
    mask_ch = latent_mask_channel(keep, 64, 64)       # [1, 1, 1, 64, 64], 1 = mouth (channel 32 of the DiT)
    keep_px = pixel_mask(keep, 512)                   # [512, 512] {0, 1}: masked video = pixels * keep_px
    soft = soft_mask(keep, 512)                       # [512, 512] in [0, 1]: paste-back blend weight

Resizing everywhere: bilinear, align_corners False, no antialias. Binarization: value > 0.5 (keep).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import MediaError

MASK_SIZE = 256
"""Side of the reference mask grid (the LatentSync mask is 256x256)."""


@dataclass(frozen=True, kw_only=True)
class MouthMaskGeometry:
    """The regenerated region, in pixel units of the 256x256 reference grid (x right, y down).

    The region is the part below ``top`` of a Lame curve (superellipse) centred at (``center_x``,
    ``center_y``): |dx / half_width|^exp_x + (dy / half_height)^exp_y <= 1 for dy > 0 and
    |dx| <= half_width above the centre line; the bottom bends right by ``bottom_shift`` (dy/half_height)^2
    pixels (the released mask's chin is off-centre). The nose strip ``nose_left`` <= x <= ``nose_right``,
    y < ``nose_bottom`` is kept. Fitted by maximizing IoU against LatentSync's mask.png.
    """

    top: float = 95.2
    """Upper edge of the region (just under the nose)."""
    center_x: float = 127.6
    """Horizontal centre."""
    half_width: float = 118.9
    """Horizontal semi-axis."""
    center_y: float = 152.8
    """Row where the lower curve starts to narrow."""
    half_height: float = 90.8
    """Vertical semi-axis of the lower curve (its lowest point is center_y + half_height)."""
    exp_x: float = 1.9
    """Superellipse exponent across."""
    exp_y: float = 1.7
    """Superellipse exponent down."""
    bottom_shift: float = 3.6
    """Rightward shift of the curve at its lowest point."""
    nose_left: float = 77.7
    """Left edge of the kept nose strip."""
    nose_right: float = 177.6
    """Right edge of the kept nose strip."""
    nose_bottom: float = 128.1
    """Lower edge of the kept nose strip."""


LATENTSYNC_MOUTH = MouthMaskGeometry()


def render_mouth_mask(
    height: int = MASK_SIZE, width: int = MASK_SIZE, geometry: MouthMaskGeometry = LATENTSYNC_MOUTH
) -> np.ndarray:
    """Rasterize the mouth region at pixel centres: [height, width] uint8, 255 = keep, 0 = regenerate."""
    ys = (np.arange(height, dtype=np.float64) + 0.5) * (MASK_SIZE / height)
    xs = (np.arange(width, dtype=np.float64) + 0.5) * (MASK_SIZE / width)
    y, x = ys[:, None], xs[None, :]
    g = geometry
    depth = np.clip((y - g.center_y) / g.half_height, 0.0, None)  # 0 above the curve's start
    across = np.abs(x - g.center_x - g.bottom_shift * depth**2) / g.half_width
    mouth = (y >= g.top) & (across**g.exp_x + depth**g.exp_y <= 1.0)
    nose = (x >= g.nose_left) & (x <= g.nose_right) & (y < g.nose_bottom)
    return np.where(mouth & ~nose, 0, 255).astype(np.uint8)


def mouth_mask01(height: int = MASK_SIZE, width: int = MASK_SIZE) -> torch.Tensor:
    """The built-in mask as float: [height, width] float32, 1 = keep, 0 = regenerate.

    The default 256x256 stands in for the released mask.png; resize it with the functions below
    (as the released code does) rather than rendering at 512."""
    return torch.from_numpy(render_mouth_mask(height, width)).float() / 255.0


def load_mask(path: str | Path) -> torch.Tensor:
    """Read a user mask image (255 = keep, 0 = regenerate): [H, W] float32 luminance / 255.

    Any 8-bit grey, palette or RGB(A) image is accepted (alpha ignored; luminance = ITU-R 601 weights)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise MediaError(f"mask file {str(path)!r} does not exist; pass --mask with an image path")
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode not in ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX"):
                raise MediaError(
                    f"mask {str(path)!r} has pixel mode {mode!r}; save it as an 8-bit grey or RGB image"
                )
            grey = np.asarray(im.convert("L"), dtype=np.float32)
    except UnidentifiedImageError:
        raise MediaError(f"mask {str(path)!r} is not a readable image; pass a PNG/JPEG/BMP file") from None
    mask = torch.from_numpy(grey / 255.0)
    regenerated = float((mask <= 0.5).float().mean())
    if regenerated == 0.0:
        raise MediaError(f"mask {str(path)!r} has no dark pixels (0 = regenerate): it would change nothing")
    if regenerated == 1.0:
        raise MediaError(f"mask {str(path)!r} is dark everywhere: it must keep part of the face (255 = keep)")
    return mask


def _resize(mask01: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """mask01: [H, W] -> [height, width], bilinear, align_corners False, no antialias (float32)."""
    if mask01.ndim != 2:
        raise ValueError(f"a mask must be 2-D [H, W], got shape {tuple(mask01.shape)}")
    x = mask01.float()[None, None]
    return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=False)[0, 0]


def _size(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def latent_mask_channel(mask01: torch.Tensor, latent_h: int, latent_w: int) -> torch.Tensor:
    """DiT input channel 32. mask01: [H, W] (1 = keep) -> [1, 1, 1, latent_h, latent_w] float32 with
    1 = mouth (regenerate): resize, keep where > 0.5, invert."""
    keep = _resize(mask01, latent_h, latent_w) > 0.5
    return (~keep).float()[None, None, None]


def pixel_mask(mask01: torch.Tensor, size: int | tuple[int, int] = 512) -> torch.Tensor:
    """Binarized keep mask for the masked-video stream. mask01: [H, W] -> [h, w] float32 in {0, 1}
    (resize, then 1 where > 0.5). Pixels in [-1, 1] times this mask put 0 in the mouth."""
    h, w = _size(size)
    return (_resize(mask01, h, w) > 0.5).float()


def soft_mask(mask01: torch.Tensor, size: int | tuple[int, int] = 512) -> torch.Tensor:
    """Non-binarized keep mask for paste-back. mask01: [H, W] -> [h, w] float32 in [0, 1]:
    face = generated * (1 - m) + original * m."""
    h, w = _size(size)
    return _resize(mask01, h, w).clamp(0, 1)
