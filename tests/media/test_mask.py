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
    # Bilinear, align_corners False, no antialias, threshold > 0.5, invert.
    resized = torch.nn.functional.interpolate(keep[None, None], size=(40, 24), mode="bilinear", align_corners=False)
    assert torch.equal(ch[0, 0, 0], (resized[0, 0] <= 0.5).float())


def test_pixel_and_soft_masks() -> None:
    keep = mouth_mask01()
    soft, hard = soft_mask(keep, 512), pixel_mask(keep, 512)
    assert soft.shape == hard.shape == (512, 512)
    assert torch.equal(hard, (soft > 0.5).float())
    assert ((soft > 0) & (soft < 1)).any(), "the soft mask keeps the bilinear edge"
    assert pixel_mask(keep, (96, 64)).shape == (96, 64)
    video = torch.rand(3, 512, 512) * 2 - 1
    masked = video * hard
    assert torch.all(masked[:, hard == 0] == 0)


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
