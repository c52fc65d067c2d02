"""Mouth mask: the geometric rendering matches LatentSync's mask.png; resize/binarize rules; user masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lipforcing.engine.errors import MediaError
from lipforcing.engine.media.mask import (
    latent_mask_channel,
    load_mask,
    mouth_mask01,
    pixel_mask,
    render_mouth_mask,
    soft_mask,
)


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.bool(), b.bool()
    return float((a & b).sum() / (a | b).sum())


@pytest.fixture(scope="module")
def released(shared_dir: Path) -> torch.Tensor:
    return load_mask(shared_dir / "assets" / "mask.png")


def test_matches_released_mask_at_256(released: torch.Tensor) -> None:
    ours = mouth_mask01()
    assert released.shape == ours.shape == (256, 256)
    assert iou(ours < 0.5, released < 0.5) >= 0.98  # measured 0.994


@pytest.mark.parametrize("size", [(64, 64), (32, 32), (48, 80)])
def test_matches_released_mask_at_latent_size(released: torch.Tensor, size: tuple[int, int]) -> None:
    ours, ref = latent_mask_channel(mouth_mask01(), *size), latent_mask_channel(released, *size)
    assert iou(ours, ref) >= 0.98  # measured 0.992 at 64x64
    assert iou(pixel_mask(mouth_mask01(), 512) < 0.5, pixel_mask(released, 512) < 0.5) >= 0.98


def test_rendered_geometry() -> None:
    """The documented facts of the released mask: rows 95-242, columns 9-247, ~40.7 %, nose strip kept."""
    dark = render_mouth_mask() == 0
    rows, cols = np.nonzero(dark.any(1))[0], np.nonzero(dark.any(0))[0]
    assert abs(rows.min() - 95) <= 1 and abs(rows.max() - 242) <= 2
    assert abs(cols.min() - 9) <= 1 and abs(cols.max() - 247) <= 1
    assert abs(dark.mean() - 0.407) < 0.01
    assert not dark[110, 128] and dark[110, 40] and dark[110, 215] and dark[180, 128]
    assert set(np.unique(render_mouth_mask(100, 60))) == {0, 255}  # any size, still binary


def test_latent_channel_semantics() -> None:
    keep = mouth_mask01()
    ch = latent_mask_channel(keep, 40, 24)
    assert ch.shape == (1, 1, 1, 40, 24) and ch.dtype == torch.float32
    assert set(ch.unique().tolist()) == {0.0, 1.0}
    assert ch[0, 0, 0, 28, 12] == 1.0 and ch[0, 0, 0, 2, 12] == 0.0  # mouth = 1, forehead = 0


def test_latent_channel_resize_and_threshold_on_known_blocks() -> None:
    """Bilinear, align_corners False, no antialias, keep where > 0.5, invert, on masks whose resize is known:
    halving a size averages each 2x2 block (3/4 kept -> keep, 2/4 -> exactly 0.5, not kept -> mouth); quartering
    it reads only the centre 2x2 of each 4x4 block (an antialiased or area resize would see the border too)."""
    blocks = torch.tensor([[1.0, 1.0, 1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]])  # [2, 2x3] -> 3 blocks
    keep = blocks.repeat(2, 1)  # [4, 6]: block sums 3, 2, 1 (left to right), twice
    assert latent_mask_channel(keep, 2, 3)[0, 0, 0].tolist() == [[0.0, 1.0, 1.0]] * 2
    ring = torch.zeros(4, 8)
    ring[1:3, 1:3] = 1  # left block: only the centre kept (4/16)
    ring[:, 4:] = 1
    ring[1:3, 5:7] = 0  # right block: all but the centre kept (12/16)
    assert latent_mask_channel(ring, 1, 2)[0, 0, 0].tolist() == [[0.0, 1.0]]


def test_pixel_and_soft_masks() -> None:
    """The soft mask is the bilinear resize (align_corners False: edge pixels clamp) and the pixel mask keeps
    where it is above 0.5: a 2x2 checkerboard at 4x4 has the separable profile a = (1, 3/4, 1/4, 0)."""
    checker = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    a = torch.tensor([1.0, 0.75, 0.25, 0.0])
    expected = a[:, None] * a[None, :] + (1 - a)[:, None] * (1 - a)[None, :]  # e.g. [1, 1]: 9/16 + 1/16
    soft, hard = soft_mask(checker, 4), pixel_mask(checker, 4)
    assert soft.shape == hard.shape == (4, 4)
    torch.testing.assert_close(soft, expected, rtol=0, atol=1e-6)
    assert hard.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]  # 0.625 kept, 0.375 not
    keep = mouth_mask01()
    assert ((soft_mask(keep, 512) > 0) & (soft_mask(keep, 512) < 1)).any(), "the soft mask keeps the bilinear edge"
    assert pixel_mask(keep, (96, 64)).shape == (96, 64)
    # the masked-video stream zeroes the region the mask channel marks: at 8x (the VAE's stride) they agree
    mouth_pixels = 1 - pixel_mask(keep, 512).reshape(64, 8, 64, 8).mean((1, 3))
    assert iou(latent_mask_channel(keep, 64, 64)[0, 0, 0], mouth_pixels > 0.5) >= 0.98  # measured 0.984


def _save(tmp_path: Path, name: str, array: np.ndarray, mode: str | None = None) -> Path:
    path = tmp_path / name
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(path)
    return path


def test_load_mask_formats(tmp_path: Path) -> None:
    grey = render_mouth_mask()
    ref = load_mask(_save(tmp_path, "grey.png", grey))
    assert ref.dtype == torch.float32 and ref.shape == (256, 256)
    assert torch.equal(ref, torch.from_numpy(grey).float() / 255)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    assert torch.equal(load_mask(_save(tmp_path, "rgb.png", rgb)), ref)
    assert torch.equal(load_mask(_save(tmp_path, "pal.png", rgb, "P")), ref)
    assert torch.equal(load_mask(_save(tmp_path, "rgba.png", rgb, "RGBA")), ref)
    # Luminance, not the red channel: pure green keeps 587/1000 of full scale.
    colour = np.zeros((8, 8, 3), np.uint8)
    colour[:4, :, 1] = 255
    m = load_mask(_save(tmp_path, "green.png", colour))
    assert abs(float(m[0, 0]) - 150 / 255) < 1e-6 and float(m[7, 7]) == 0.0


def test_load_mask_errors(tmp_path: Path) -> None:
    with pytest.raises(MediaError, match="does not exist"):
        load_mask(tmp_path / "nope.png")
    text = tmp_path / "mask.png"
    text.write_text("not an image")
    with pytest.raises(MediaError, match="not a readable image"):
        load_mask(text)
    with pytest.raises(MediaError, match="no dark pixels"):
        load_mask(_save(tmp_path, "white.png", np.full((16, 16), 255, np.uint8)))
    with pytest.raises(MediaError, match="dark everywhere"):
        load_mask(_save(tmp_path, "black.png", np.zeros((16, 16), np.uint8)))
    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((16, 16), 1000, np.uint16)).save(deep)
    with pytest.raises(MediaError, match="pixel mode"):
        load_mask(deep)
    with pytest.raises(ValueError, match="2-D"):
        latent_mask_channel(torch.ones(1, 16, 16), 8, 8)
