"""Feature networks of the distribution and identity metrics, and the Frechet distance.

- FID: Inception-v3 pool features (2048-d) of every frame. The network is the TorchScript export of the
  TensorFlow FID Inception that StyleGAN2-ADA and clean-fid publish (``inception-2015-12-05.pt``), called as
  they call it: float RGB 0..255 [N, 3, H, W], ``return_features=True``. Two resize conventions
  (``FID_RESIZE``): "network" hands the frames over at their size and the network resizes them to 299 itself
  (bilinear, without antialiasing: StyleGAN2-ADA, and clean-fid's "legacy_tensorflow" mode); "clean" resizes
  each channel to 299 x 299 outside the network, in float, with PIL's antialiased bicubic filter, clipped to
  0..255 (clean-fid's default "clean" mode).
- FVD: I3D (Kinetics-400) logits-layer features (400-d) of 16-frame clips, from the TorchScript export used
  by StyleGAN-V and DIGAN (``i3d_torchscript.pt``): float RGB in [-1, 1], [N, 3, 16, 224, 224],
  ``rescale=False, resize=False, return_features=True``. Two clip conventions (``FVD_CLIPS``): "every"
  consecutive non-overlapping clip of each video, or "first", one clip per video, its first 16 frames
  (StyleGAN-V's ``fvd2048_16f`` takes one 16-frame clip per video: a generated video's first frames).
- CSIM: the cosine similarity of ArcFace embeddings of the two videos' faces, frame by frame, from an
  ONNX model supplied by the user (insightface's ``w600k_r50.onnx``, say): RGB 112 x 112 aligned on five
  points, (x - 127.5) / 127.5, run with onnxruntime.

Random-weight stand-ins of the same call signatures let tests run the whole pipeline without downloads.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError


@dataclass(frozen=True)
class Weights:
    file: str
    url: str
    what: str


INCEPTION = Weights("inception-2015-12-05.pt",
                    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt",
                    "the FID Inception-v3 (TorchScript, as clean-fid and StyleGAN2-ADA use it)")
I3D = Weights("i3d_torchscript.pt", "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt",
              "the FVD I3D (TorchScript, as StyleGAN-V uses it)")
ARCFACE = Weights("arcface.onnx", "insightface buffalo_l: w600k_r50.onnx (https://github.com/deepinsight/insightface)",
                  "an ArcFace ONNX model, renamed or linked to arcface.onnx")
FVD_CLIP = 16
FID_RESIZE = ("network", "clean")
FID_SIZE = 299
FVD_CLIPS = ("every", "first")


def load_torchscript(path: Path, device: str | torch.device) -> torch.jit.ScriptModule:
    try:
        return torch.jit.load(str(path), map_location=device).eval()
    except Exception as exc:
        raise ConfigError(f"{path}: cannot be loaded as a TorchScript model ({exc})") from None


class RandomImageFeatures(nn.Module):
    """A random-weight stand-in for the FID Inception: same call, 64-d features."""

    def __init__(self, dim: int = 64, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(3, dim, 8, stride=8)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.02)
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        x = F.interpolate(x / 127.5 - 1, size=(64, 64), mode="bilinear", align_corners=False)
        return torch.tanh(self.conv(x)).mean(dim=(2, 3))


class RandomVideoFeatures(nn.Module):
    """A random-weight stand-in for the FVD I3D: same call, 32-d features."""

    def __init__(self, dim: int = 32, seed: int = 1) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv3d(3, dim, (4, 8, 8), stride=(4, 8, 8))
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.02)
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = True) -> torch.Tensor:
        x = F.interpolate(x, size=(x.shape[2], 64, 64), mode="trilinear", align_corners=False)
        return torch.tanh(self.conv(x)).mean(dim=(2, 3, 4))


def clean_resize(frames: np.ndarray, size: int = FID_SIZE) -> np.ndarray:
    """clean-fid's "clean" resize: uint8 RGB [N, H, W, 3] -> float32 [N, size, size, 3], each channel resized in
    float by PIL's bicubic filter (antialiased when shrinking), clipped to 0..255."""
    from PIL import Image

    out = np.empty((len(frames), size, size, 3), np.float32)
    for i, frame in enumerate(frames):
        for c in range(3):
            channel = Image.fromarray(np.ascontiguousarray(frame[:, :, c], dtype=np.float32))  # mode "F"
            out[i, :, :, c] = np.asarray(channel.resize((size, size), resample=Image.Resampling.BICUBIC))
    return np.clip(out, 0, 255, out=out)


@torch.no_grad()
def image_features(net: nn.Module, frames: np.ndarray, *, batch: int = 32, device: str | torch.device = "cpu",
                   resize: str = "network") -> np.ndarray:
    """FID features of uint8 RGB frames [N, H, W, 3] -> float64 [N, D]; ``resize`` is "network" or "clean"
    (see the module docstring)."""
    if resize not in FID_RESIZE:
        raise ConfigError(f"unknown FID resize {resize!r}: one of {', '.join(FID_RESIZE)}")
    out = []
    for start in range(0, len(frames), batch):
        piece = frames[start : start + batch]
        if resize == "clean":
            piece = clean_resize(piece)
        x = torch.from_numpy(np.ascontiguousarray(piece)).to(device)
        x = x.permute(0, 3, 1, 2).float()
        out.append(net(x, return_features=True).reshape(x.shape[0], -1).double().cpu())
    return torch.cat(out).numpy()


@torch.no_grad()
def video_features(net: nn.Module, frames: np.ndarray, *, batch: int = 4, device: str | torch.device = "cpu",
                   clips: str = "every") -> np.ndarray:
    """FVD features of 16-frame clips of uint8 RGB frames [N, H, W, 3] -> float64 [clips, D]: ``clips`` "every"
    consecutive clip (N // 16 of them) or the "first" only (resized to 224 x 224 here; no clip when the video
    is shorter than 16 frames)."""
    if clips not in FVD_CLIPS:
        raise ConfigError(f"unknown FVD clip sampling {clips!r}: one of {', '.join(FVD_CLIPS)}")
    count = len(frames) // FVD_CLIP if clips == "every" else min(1, len(frames) // FVD_CLIP)
    out = []
    for start in range(0, count, batch):
        group = []
        for c in range(start, min(count, start + batch)):
            x = torch.from_numpy(np.ascontiguousarray(frames[c * FVD_CLIP : (c + 1) * FVD_CLIP])).to(device)
            x = F.interpolate(x.permute(0, 3, 1, 2).float(), size=(224, 224), mode="bilinear", align_corners=False)
            group.append(x.permute(1, 0, 2, 3) / 127.5 - 1)  # [3, 16, 224, 224]
        feats = net(torch.stack(group), rescale=False, resize=False, return_features=True)
        out.append(feats.reshape(len(group), -1).double().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0))


def unit_rows(e: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float64): embeddings whose dot products are cosine similarities."""
    e = np.asarray(e, np.float64)
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """The Frechet distance of the Gaussians fitted to two feature sets [N, D]: |mu_a - mu_b|^2 +
    tr(S_a + S_b - 2 (S_a S_b)^(1/2)). Needs at least two samples in each."""
    from scipy import linalg

    if len(a) < 2 or len(b) < 2:
        raise ValueError("a Frechet distance needs at least two samples on each side")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings():  # fewer samples than dimensions give a singular product: expected here
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root = linalg.sqrtm(s_a @ s_b)
        if not np.isfinite(root).all():  # regularise both sides a little
            eps = np.eye(s_a.shape[0]) * 1e-6
            root = linalg.sqrtm((s_a + eps) @ (s_b + eps))
    root = root.real
    value = float(np.square(mu_a - mu_b).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(root))
    return max(0.0, value)


class ArcFace:
    """An ArcFace ONNX model on onnxruntime: uint8 RGB crops [N, 112, 112, 3] -> unit embeddings [N, D]."""

    def __init__(self, path: Path, device: str | torch.device = "cpu") -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise ConfigError("CSIM needs onnxruntime: pip install onnxruntime") from None
        providers = ["CPUExecutionProvider"]
        if str(device).startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:
            raise ConfigError(f"{path}: cannot be loaded as an ONNX model ({exc})") from None
        self.input = self.session.get_inputs()[0].name

    def __call__(self, crops: np.ndarray, batch: int = 64) -> np.ndarray:
        out = []
        for start in range(0, len(crops), batch):
            x = crops[start : start + batch].astype(np.float32).transpose(0, 3, 1, 2)
            out.append(self.session.run(None, {self.input: (x - 127.5) / 127.5})[0].reshape(len(x), -1))
        return unit_rows(np.concatenate(out))
