"""SyncNet v2 (Chung & Zisserman, 2016) and the Sync-C / Sync-D protocol of ``syncnet_python``.

    net = load_syncnet("syncnet_v2.model")               # the released weights, supplied by the user
    result = sync_scores(*embed(net, syncnet_crops(frames, track.face_boxes()), mfcc(speech_16k)))
    result.sync_c, result.sync_d, result.offset

The protocol, as the reference implementation runs it:
- Video at 25 fps. The face crop per frame: half the face box's larger side ``s`` and its centre, each smoothed
  over time by a median filter of 13 frames; a square of 2.8 s around the centre (1.0 s above it, 1.8 s below,
  1.4 s either side), the frame padded with the value 110 where the square leaves it, resized to 224 x 224.
  Frames go in as **BGR, 0..255** floats (no normalisation). Our face box comes from the engine's landmarks
  (the reference uses the S3FD detector); the crop arithmetic is the reference's.
- Audio at 16 kHz, **int16-scaled** (the reference reads the WAV as int16 and does not rescale): 13 MFCCs
  (25 ms windows every 10 ms, 26 mel filters, 512-point FFT, pre-emphasis 0.97, lifter 22, the first
  coefficient replaced by the log frame energy), 100 per second, 4 per video frame.
- Window v pairs frames v..v+4 with MFCC rows 4v..4v+19; there are min(frames, samples / 640) - 5 windows.
- Each video embedding is compared with the audio embeddings shifted by -15..15 windows (zero vectors beyond
  the ends): L2 distances, averaged over the windows. Sync-D is the minimum of those 31 means, Sync-C the
  median minus the minimum, and the AV offset 15 minus the position of the minimum (in frames; positive when
  the audio leads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, MediaError
from ..media.audio_features import SAMPLES_PER_FRAME

VSHIFT = 15
WINDOW = 5
MFCC_PER_FRAME = 4
CROP_SCALE = 0.40
CROP_SIZE = 224
PAD_VALUE = 110
SMOOTH_FRAMES = 13
WEIGHTS_FILE = "syncnet_v2.model"
WEIGHTS_URL = "http://www.robots.ox.ac.uk/~vgg/software/lipsync/data/syncnet_v2.model"


def _conv_bn(conv: nn.Module, channels: int, bn: type) -> list[nn.Module]:
    return [conv, bn(channels), nn.ReLU(inplace=True)]


class SyncNet(nn.Module):
    """The SyncNet v2 network, with the module names of the released weights (``netcnnaud.0.weight``, ...).

    Audio: [N, 1, 13, 20] MFCC windows -> [N, 1024]. Lips: [N, 3, 5, 224, 224] BGR 0..255 -> [N, 1024]."""

    def __init__(self, embedding: int = 1024) -> None:
        super().__init__()
        c2, c3 = nn.Conv2d, nn.Conv3d
        self.netcnnaud = nn.Sequential(
            *_conv_bn(c2(1, 64, 3, padding=1), 64, nn.BatchNorm2d), nn.MaxPool2d(1, 1),
            *_conv_bn(c2(64, 192, 3, padding=1), 192, nn.BatchNorm2d), nn.MaxPool2d(3, (1, 2)),
            *_conv_bn(c2(192, 384, 3, padding=1), 384, nn.BatchNorm2d),
            *_conv_bn(c2(384, 256, 3, padding=1), 256, nn.BatchNorm2d),
            *_conv_bn(c2(256, 256, 3, padding=1), 256, nn.BatchNorm2d), nn.MaxPool2d(3, 2),
            *_conv_bn(c2(256, 512, (5, 4)), 512, nn.BatchNorm2d),
        )
        self.netfcaud = nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(inplace=True),
                                      nn.Linear(512, embedding))
        self.netcnnlip = nn.Sequential(
            *_conv_bn(c3(3, 96, (5, 7, 7), (1, 2, 2)), 96, nn.BatchNorm3d), nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
            *_conv_bn(c3(96, 256, (1, 5, 5), (1, 2, 2), (0, 1, 1)), 256, nn.BatchNorm3d),
            nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)),
            *_conv_bn(c3(256, 256, (1, 3, 3), padding=(0, 1, 1)), 256, nn.BatchNorm3d),
            *_conv_bn(c3(256, 256, (1, 3, 3), padding=(0, 1, 1)), 256, nn.BatchNorm3d),
            *_conv_bn(c3(256, 256, (1, 3, 3), padding=(0, 1, 1)), 256, nn.BatchNorm3d),
            nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
            *_conv_bn(c3(256, 512, (1, 6, 6)), 512, nn.BatchNorm3d),
        )
        self.netfclip = nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(inplace=True),
                                      nn.Linear(512, embedding))

    def forward_aud(self, x: torch.Tensor) -> torch.Tensor:
        return self.netfcaud(self.netcnnaud(x).flatten(1))

    def forward_lip(self, x: torch.Tensor) -> torch.Tensor:
        return self.netfclip(self.netcnnlip(x).flatten(1))


def load_syncnet(path: str | Path, device: str | torch.device = "cpu") -> SyncNet:
    """The released ``syncnet_v2.model`` (a flat dict of tensors; read without unpickling code)."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (SyncNet weights: {WEIGHTS_URL})") from None
    except Exception as exc:
        raise ConfigError(f"{path}: cannot be read as SyncNet weights ({exc})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(f"{path}: not a SyncNet state dict")
    state = {k.removeprefix("__S__.").removeprefix("module."): v for k, v in state.items()}
    net = SyncNet()
    expected = {k for k in net.state_dict() if not k.endswith("num_batches_tracked")}
    missing = sorted(expected - state.keys())
    if missing:
        raise ConfigError(f"{path}: not syncnet_v2 weights (missing {', '.join(missing[:3])}, ...)")
    net.load_state_dict({k: v for k, v in state.items() if k in net.state_dict()}, strict=False)
    return net.to(device).eval()


def random_syncnet(seed: int = 0, device: str | torch.device = "cpu") -> SyncNet:
    """SyncNet with random weights (tests: the protocol runs, the numbers mean nothing)."""
    torch.manual_seed(seed)
    return SyncNet().to(device).eval()


# --- audio --------------------------------------------------------------------------------------------------


def _hz_to_mel(hz):
    return 2595.0 * np.log10(1.0 + np.asarray(hz) / 700.0)


def _mel_to_hz(mel):
    return 700.0 * (10.0 ** (np.asarray(mel) / 2595.0) - 1.0)


def _mel_filterbank(n_filters: int, n_fft: int, rate: int) -> np.ndarray:
    points = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(rate / 2), n_filters + 2))
    bins = np.floor((n_fft + 1) * points / rate).astype(int)
    bank = np.zeros((n_filters, n_fft // 2 + 1))
    for j in range(n_filters):
        lo, mid, hi = bins[j], bins[j + 1], bins[j + 2]
        for i in range(lo, mid):
            bank[j, i] = (i - lo) / (mid - lo)
        for i in range(mid, hi):
            bank[j, i] = (hi - i) / (hi - mid)
    return bank


def mfcc(audio: np.ndarray, rate: int = 16000, *, n_ceps: int = 13, n_filters: int = 26, n_fft: int = 512,
         win: float = 0.025, step: float = 0.01, preemph: float = 0.97, lifter: int = 22) -> np.ndarray:
    """MFCCs of int16-scaled mono audio (the conventions above): float64 [frames, 13], 100 frames per second."""
    from scipy.fft import dct

    x = np.asarray(audio, np.float64)
    x = np.append(x[0], x[1:] - preemph * x[:-1]) if x.size else x
    length, hop = int(round(win * rate)), int(round(step * rate))
    count = 1 if x.size <= length else 1 + math.ceil((x.size - length) / hop)
    padded = np.concatenate([x, np.zeros((count - 1) * hop + length - x.size)])
    index = np.arange(length)[None, :] + hop * np.arange(count)[:, None]
    frames = padded[index]
    power = np.square(np.abs(np.fft.rfft(frames, n_fft))) / n_fft
    eps = np.finfo(np.float64).eps
    energy = np.where(power.sum(1) == 0, eps, power.sum(1))
    feat = power @ _mel_filterbank(n_filters, n_fft, rate).T
    feat = np.log(np.where(feat == 0, eps, feat))
    ceps = dct(feat, type=2, axis=1, norm="ortho")[:, :n_ceps]
    ceps *= 1 + (lifter / 2) * np.sin(np.pi * np.arange(n_ceps) / lifter)
    ceps[:, 0] = np.log(energy)
    return ceps


def int16_scale(audio: np.ndarray) -> np.ndarray:
    """Float speech in [-1, 1] -> the int16 range the reference feeds its MFCC (as float64)."""
    return np.round(np.clip(np.asarray(audio, np.float64), -1.0, 1.0) * 32767.0)


# --- video --------------------------------------------------------------------------------------------------


def syncnet_crops(frames: np.ndarray, face_boxes: np.ndarray) -> np.ndarray:
    """The reference's face crops: frames uint8 [N, H, W, 3] RGB, face boxes [N, 4] (x, y, w, h) ->
    uint8 [N, 224, 224, 3] **BGR**."""
    import cv2
    from scipy.signal import medfilt

    half = np.maximum(face_boxes[:, 2], face_boxes[:, 3]) / 2
    cx, cy = face_boxes[:, 0] + face_boxes[:, 2] / 2, face_boxes[:, 1] + face_boxes[:, 3] / 2
    kernel = min(SMOOTH_FRAMES, len(half) - (1 - len(half) % 2))  # odd, at most the length
    if kernel >= 3:
        half, cx, cy = (medfilt(v, kernel_size=kernel) for v in (half, cx, cy))
    out = np.empty((len(frames), CROP_SIZE, CROP_SIZE, 3), np.uint8)
    for i, frame in enumerate(frames):
        s = float(half[i])
        pad = int(s * (1 + 2 * CROP_SCALE))
        padded = cv2.copyMakeBorder(frame, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
        my, mx = cy[i] + pad, cx[i] + pad
        face = padded[int(my - s) : int(my + s * (1 + 2 * CROP_SCALE)),
                      int(mx - s * (1 + CROP_SCALE)) : int(mx + s * (1 + CROP_SCALE))]
        out[i] = cv2.resize(face, (CROP_SIZE, CROP_SIZE))[..., ::-1]  # bilinear; RGB -> BGR
    return out


# --- scores -------------------------------------------------------------------------------------------------


def window_count(n_frames: int, n_samples: int) -> int:
    return min(n_frames, n_samples // SAMPLES_PER_FRAME) - WINDOW


@torch.no_grad()
def embed(net: SyncNet, crops_bgr: np.ndarray, ceps: np.ndarray, *, samples: int | None = None, batch: int = 20,
          device: str | torch.device = "cpu", windows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(video, audio) embeddings of every window: crops uint8 [N, 224, 224, 3] BGR, ceps [T, 13] of ``samples``
    samples of speech (the window count follows the samples, as the reference counts them) -> float32 [W, 1024]
    each."""
    samples = samples if samples is not None else ceps.shape[0] * 160
    if windows is None:  # ``windows`` given: the caller's count (the released reward's)
        windows = window_count(len(crops_bgr), samples)
    windows = min(windows, (ceps.shape[0] - 20) // MFCC_PER_FRAME + 1)  # every window's 20 MFCC rows exist
    if windows < 1:
        raise MediaError(f"too short for SyncNet: {len(crops_bgr)} frames and {ceps.shape[0] / 100:.2f} s of speech "
                         f"(it needs at least {WINDOW + 1} frames of both)")
    video, audio = [], []
    lips = torch.from_numpy(np.ascontiguousarray(crops_bgr)).permute(3, 0, 1, 2)  # [3, N, 224, 224] uint8
    cc = torch.from_numpy(np.ascontiguousarray(ceps.T)).float()  # [13, T]
    for start in range(0, windows, batch):
        vs = range(start, min(windows, start + batch))
        lip = torch.stack([lips[:, v : v + WINDOW] for v in vs]).to(device).float()
        aud = torch.stack([cc[:, MFCC_PER_FRAME * v : MFCC_PER_FRAME * v + 20] for v in vs])[:, None].to(device)
        video.append(net.forward_lip(lip).float().cpu())
        audio.append(net.forward_aud(aud).float().cpu())
    return torch.cat(video), torch.cat(audio)


def distance_table(video: torch.Tensor, audio: torch.Tensor, vshift: int = VSHIFT) -> np.ndarray:
    """[W, 2 vshift + 1]: the L2 distance of video window i to audio windows i - vshift .. i + vshift (zero
    embeddings beyond the ends)."""
    padded = torch.nn.functional.pad(audio, (0, 0, vshift, vshift))
    rows = [torch.nn.functional.pairwise_distance(video[i : i + 1].expand(2 * vshift + 1, -1),
                                                  padded[i : i + 2 * vshift + 1]) for i in range(len(video))]
    return torch.stack(rows).double().numpy()


@dataclass(frozen=True)
class SyncResult:
    sync_c: float
    """Confidence (LSE-C): median minus minimum of the mean distances over offsets. Higher is better."""
    sync_d: float
    """Distance (LSE-D): the minimum mean distance. Lower is better."""
    offset: int
    """AV offset in frames at the minimum (the reference's sign: vshift minus the argmin)."""
    windows: int


def sync_scores(table: np.ndarray) -> SyncResult:
    """Sync-C, Sync-D and the offset of a distance table [W, 2 vshift + 1]."""
    table = np.asarray(table, np.float64)
    if table.ndim != 2 or table.shape[1] % 2 != 1 or table.shape[0] < 1:
        raise ValueError(f"a distance table is [windows, 2 vshift + 1], got {table.shape}")
    mean = table.mean(0)
    best = int(mean.argmin())
    return SyncResult(sync_c=float(np.median(mean) - mean[best]), sync_d=float(mean[best]),
                      offset=table.shape[1] // 2 - best, windows=table.shape[0])


def score(net: SyncNet, frames: np.ndarray, face_boxes: np.ndarray, speech: np.ndarray, *,
          device: str | torch.device = "cpu") -> SyncResult:
    """Sync scores of frames (uint8 [N, H, W, 3] RGB at 25 fps) against speech (float, 16 kHz)."""
    crops = syncnet_crops(frames, face_boxes)
    video, audio = embed(net, crops, mfcc(int16_scale(speech)), samples=speech.size, device=device)
    return sync_scores(distance_table(video, audio))


# --- the released reward's formula ----------------------------------------------------------------------------


def scale_32768(audio: np.ndarray) -> np.ndarray:
    """Float speech -> the released reward's MFCC input: times 32768 in float32, no rounding, no clipping."""
    return np.asarray(audio, np.float32) * np.float32(32768.0)


def release_sync_scores(table: np.ndarray) -> SyncResult:
    """Sync-C, Sync-D and the offset of a distance table [W, 2 vshift + 1] as the released reward averages it: at
    each shift s only the W - |s| pairs of video window i and audio window i + s that both exist (the table's zero
    padding beyond the ends is left out)."""
    table = np.asarray(table, np.float64)
    if table.ndim != 2 or table.shape[1] % 2 != 1 or table.shape[0] < 1:
        raise ValueError(f"a distance table is [windows, 2 vshift + 1], got {table.shape}")
    windows, vshift = table.shape[0], table.shape[1] // 2
    if windows <= vshift:  # the release averages an empty set there (NaN)
        raise MediaError(f"too short for the released Sync-C: {windows} windows, it needs more than {vshift} "
                         f"({vshift + WINDOW + 1} frames)")
    i = np.arange(windows)[:, None]
    shift = np.arange(-vshift, vshift + 1)[None, :]
    valid = (i + shift >= 0) & (i + shift < windows)  # [W, 2 vshift + 1]
    mean = (table * valid).sum(0) / valid.sum(0)
    best = int(mean.argmin())
    return SyncResult(sync_c=float(np.median(mean) - mean[best]), sync_d=float(mean[best]), offset=vshift - best,
                      windows=windows)


def release_sync_c(net: SyncNet, crops_bgr: np.ndarray, speech: np.ndarray, *,
                   device: str | torch.device = "cpu") -> SyncResult:
    """The released reward's scores of face crops [N, 224, 224, 3] BGR (uint8, or float 0..255: the release feeds
    resized pixels unrounded) against float speech at 16 kHz: ``scale_32768`` speech, every 5-frame window that has
    its 20 MFCC rows, ``release_sync_scores``."""
    ceps = mfcc(scale_32768(speech))
    video, audio = embed(net, np.ascontiguousarray(crops_bgr, np.float32), ceps, windows=len(crops_bgr) - WINDOW + 1,
                         device=device)  # capped by the MFCC rows: min(frames - 4, (rows - 20) // 4 + 1)
    return release_sync_scores(distance_table(video, audio))
