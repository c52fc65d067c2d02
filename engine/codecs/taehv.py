"""TAEHV for Wan 2.1: the tiny causal video autoencoder of the released engine (SPEC §7).

Same normalized latent space as the Wan 2.1 VAE (16 channels, 4x time, 8x space), about 11.3M
parameters (encoder 1.47M, decoder 9.84M). Videos are NTCHW with pixels in [0, 1]. The module tree and
parameter names are those of the released ``taew2_1.pth`` (``encoder.N...`` / ``decoder.N...``
``nn.Sequential`` indices; MemBlock ``conv``/``skip``; TPool/TGrow ``conv``), so the released file
loads with ``load_state_dict(strict=True)``.

    tae = load_taehv("taew2_1.pth", device="cuda", dtype=torch.float16)
    z = tae.encode_video(frames)     # frames: [N, 1 + 4k, 3, H, W] in [0, 1] -> z: [N, 1 + k, 16, H/8, W/8]
    video = tae.decode_video(z)      # z: [N, L, 16, h, w] -> [N, 4L - 3, 3, 8h, 8w] in [0, 1]

    enc, dec = TAEHVStreamEncoder(tae), TAEHVStreamDecoder(tae)
    for chunk in pixel_chunks:       # 9 frames, then 12, 12, ... -> 3 latents per push
        z = enc.push(chunk)
        frames = dec.push(z)         # 9 frames for the first 3 latents, then 12 per 3 latents
    z_tail, frames_tail = enc.flush(), dec.flush()

Temporal alignment. The decoder turns latent k into 4 frames and drops the first 3 frames of the
stream, so latent 0 -> frame 0 and latent k -> frames 4k-3 .. 4k, exactly like the Wan VAE. The encoder
groups its input frames in 4s; with ``wan_alignment=True`` (default) three copies of frame 0 are
prepended, so latent 0 sees {0, 0, 0, 0} and latent k sees frames 4k-3 .. 4k, matching the decoder and
the Wan VAE. ``wan_alignment=False`` reproduces upstream ``TAEHV.encode_video`` (groups 4k .. 4k+3 from
frame 0, last frame repeated to fill the final group).

Every block is causal in time: MemBlock mixes each frame with the previous frame's input, TPool
concatenates ``stride`` consecutive frames, TGrow splits one frame into ``stride``. ``run_blocks`` applies
a block stack to a chunk of frames in parallel over time while carrying that state, so a stream pushed
in any chunking equals the one-shot result (pushing one frame at a time is the plain reference path).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class TAEHVConfig:
    """Sizes of a TAEHV model; the defaults are the released Wan 2.1 model (``taew2_1.pth``)."""

    latent_channels: int = 16
    """Latent channels (z_dim of the Wan 2.1 VAE)."""
    image_channels: int = 3
    """RGB."""
    encoder_width: int = 64
    """Channels of every encoder block."""
    decoder_widths: tuple[int, int, int, int] = (256, 128, 64, 64)
    """Channels of the three decoder stages and of the final projection."""
    encoder_time_downscale: tuple[bool, bool, bool] = (True, True, False)
    """Per encoder stage: TPool stride 2 (True) or 1."""
    decoder_time_upscale: tuple[bool, bool, bool] = (False, True, True)
    """Per decoder stage: TGrow stride 2 (True) or 1."""
    decoder_space_upscale: tuple[bool, bool, bool] = (True, True, True)
    """Per decoder stage: nearest 2x spatial upsampling (True) or none."""

    @property
    def time_downscale(self) -> int:
        return 2 ** sum(self.encoder_time_downscale)

    @property
    def time_upscale(self) -> int:
        return 2 ** sum(self.decoder_time_upscale)

    def replace(self, **changes) -> TAEHVConfig:
        return dataclasses.replace(self, **changes)


def _conv(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    """Soft clamp of the decoder input to (-3, 3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """Residual block that sees the current frame and the previous frame's input."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.conv = nn.Sequential(
            _conv(n_in * 2, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(), _conv(n_out, n_out)
        )
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        """x, past: [B, C, H, W] (current frame, previous frame's input; zeros before the first frame)."""
        return F.relu(self.conv(torch.cat([x, past], 1)) + self.skip(x))


class TPool(nn.Module):
    """Temporal pooling: ``stride`` consecutive frames, concatenated on channels, -> 1x1 conv -> 1 frame."""

    def __init__(self, n_f: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n_f * stride, n_f, 1, bias=False)


class TGrow(nn.Module):
    """Temporal upsampling: 1x1 conv to ``stride`` x channels, split into ``stride`` consecutive frames."""

    def __init__(self, n_f: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n_f, n_f * stride, 1, bias=False)


def _per_frame(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply a frame-wise module to x: [N, T, C, H, W]."""
    n, t = x.shape[:2]
    y = fn(x.flatten(0, 1))
    return y.reshape(n, t, *y.shape[1:])


def run_blocks(blocks: nn.Sequential, x: torch.Tensor, state: list) -> torch.Tensor:
    """Apply a TAEHV block stack to a chunk of frames, in parallel over time, carrying causal state.

    x: [N, T, C, H, W]; returns [N, T', C', H', W'] (T' depends on TPool/TGrow strides and on frames
    still buffered in TPool). ``state`` has one entry per block, ``None`` at stream start; it is updated
    in place: MemBlock -> its last input frame [N, 1, C, H, W]; TPool -> frames waiting for a full group.
    """
    n = x.shape[0]
    for i, block in enumerate(blocks):
        if isinstance(block, MemBlock):
            prev = state[i] if state[i] is not None else torch.zeros_like(x[:, :1])
            past = torch.cat([prev, x], 1)[:, : x.shape[1]]  # [N, T, C, H, W]: frame t sees frame t-1
            if x.shape[1]:
                state[i] = x[:, -1:].clone()
            y = block(x.flatten(0, 1), past.flatten(0, 1))
            x = y.reshape(n, x.shape[1], *y.shape[1:])
        elif isinstance(block, TPool):
            if state[i] is not None:
                x = torch.cat([state[i], x], 1)
            s, (_, t, c, h, w) = block.stride, x.shape
            used = t // s * s
            state[i] = x[:, used:].clone() if used < t else None
            groups = x[:, :used].reshape(n * (used // s), s * c, h, w)  # channels: frame-in-group major
            x = block.conv(groups).reshape(n, used // s, c, h, w)
        elif isinstance(block, TGrow):
            s, (_, t, c, h, w) = block.stride, x.shape
            x = block.conv(x.flatten(0, 1)).reshape(n, t * s, c, h, w)
        else:
            x = _per_frame(block, x)
    return x


class TAEHV(nn.Module):
    """Tiny causal video autoencoder (encoder and decoder ``nn.Sequential``s, released key names)."""

    def __init__(self, config: TAEHVConfig | None = None):
        super().__init__()
        self.config = cfg = config or TAEHVConfig()
        w, (d0, d1, d2, d3) = cfg.encoder_width, cfg.decoder_widths
        encoder: list[nn.Module] = [_conv(cfg.image_channels, w), nn.ReLU()]
        for down in cfg.encoder_time_downscale:
            encoder += [TPool(w, 2 if down else 1), _conv(w, w, stride=2, bias=False)]
            encoder += [MemBlock(w, w) for _ in range(3)]
        encoder.append(_conv(w, cfg.latent_channels))
        self.encoder = nn.Sequential(*encoder)

        decoder: list[nn.Module] = [Clamp(), _conv(cfg.latent_channels, d0), nn.ReLU()]
        for (c, c_next), up_t, up_s in zip(
            ((d0, d1), (d1, d2), (d2, d3)), cfg.decoder_time_upscale, cfg.decoder_space_upscale
        ):
            decoder += [MemBlock(c, c) for _ in range(3)]
            decoder += [nn.Upsample(scale_factor=2 if up_s else 1), TGrow(c, 2 if up_t else 1)]
            decoder.append(_conv(c, c_next, bias=False))
        decoder += [nn.ReLU(), _conv(d3, cfg.image_channels)]
        self.decoder = nn.Sequential(*decoder)

    @property
    def frames_to_trim(self) -> int:
        """Frames dropped from the start of the decoded stream (3 for the 4x model)."""
        return self.config.time_upscale - 1

    def encode_video(self, x: torch.Tensor, *, wan_alignment: bool = True) -> torch.Tensor:
        """Encode a whole video. x: [N, T, 3, H, W] in [0, 1] -> [N, T', 16, H/8, W/8].

        T' = ceil((T + 3) / 4) with ``wan_alignment`` (1 + k latents for 1 + 4k frames), else ceil(T / 4)."""
        enc = TAEHVStreamEncoder(self, wan_alignment=wan_alignment)
        z = enc.push(x)
        return torch.cat([z, enc.flush()], 1)

    def decode_video(self, z: torch.Tensor) -> torch.Tensor:
        """Decode a whole latent video. z: [N, L, 16, h, w] -> [N, 4L - 3, 3, 8h, 8w] in [0, 1]."""
        return TAEHVStreamDecoder(self).push(z)


def _check_ntchw(x: torch.Tensor, channels: int, what: str) -> None:
    if x.ndim != 5 or x.shape[2] != channels:
        raise ValueError(f"TAEHV expects {what} as [N, T, {channels}, H, W] (NTCHW), got {tuple(x.shape)}")


class TAEHVStreamEncoder:
    """Causal streaming encoder: push pixel frames in any chunking, get each latent as soon as its 4
    frames (after alignment) have arrived. The result equals ``TAEHV.encode_video`` on the concatenation.

    With ``wan_alignment`` the first push is preceded by 3 copies of its first frame, so a first chunk of
    1 + 4a frames and later chunks of 4b frames return exactly 1 + a and b latents with nothing buffered
    (the engine pushes 9, then 12, 12, ... -> 3 latents each). Other chunk sizes are valid too: up to 3
    frames wait inside TPool until their group is complete. ``flush`` repeats the last frame to complete a
    pending group and ends the stream.
    """

    def __init__(self, model: TAEHV, *, wan_alignment: bool = True):
        self.model = model
        self.wan_alignment = wan_alignment
        self.reset()

    def reset(self) -> None:
        self._state: list = [None] * len(self.model.encoder)
        self._frames_in = 0  # frames entered into the encoder, alignment copies included
        self._last: torch.Tensor | None = None  # [N, 1, 3, H, W]
        self._finished = False

    @property
    def pending_frames(self) -> int:
        """Frames waiting for the rest of their 4-frame group."""
        return self._frames_in % self.model.config.time_downscale

    def push(self, frames: torch.Tensor) -> torch.Tensor:
        """frames: [N, t, 3, H, W] in [0, 1] -> latents completed by this push: [N, l, 16, H/8, W/8]."""
        _check_ntchw(frames, self.model.config.image_channels, "pixel frames")
        if self._finished:
            raise RuntimeError("TAEHVStreamEncoder.push after flush(); call reset() to start a new stream")
        if self._frames_in == 0 and self.wan_alignment and frames.shape[1]:
            pad = self.model.config.time_downscale - 1
            frames = torch.cat([frames[:, :1].expand(-1, pad, -1, -1, -1), frames], 1)
        if frames.shape[1]:
            self._last = frames[:, -1:]
        self._frames_in += frames.shape[1]
        return run_blocks(self.model.encoder, frames, self._state)

    def flush(self) -> torch.Tensor:
        """Complete a pending group by repeating the last frame; returns its latent ([N, 0 or 1, 16, h, w])."""
        if self._last is None:
            raise RuntimeError("TAEHVStreamEncoder.flush before any frame was pushed")
        n_pad = -self._frames_in % self.model.config.time_downscale
        pad = self._last.expand(-1, n_pad, -1, -1, -1)
        self._frames_in += n_pad
        z = run_blocks(self.model.encoder, pad, self._state)
        self._finished = True
        return z


class TAEHVStreamDecoder:
    """Causal streaming decoder: push latents in any chunking (one at a time, or 3 per chunk); each latent
    returns its 4 frames immediately (the stream's first 3 frames are dropped, so the first latent gives
    1 frame). The concatenated output equals ``TAEHV.decode_video``; nothing is ever held back.
    """

    def __init__(self, model: TAEHV):
        self.model = model
        self.reset()

    def reset(self) -> None:
        self._state: list = [None] * len(self.model.decoder)
        self._to_trim = self.model.frames_to_trim
        self._empty: torch.Tensor | None = None

    def push(self, z: torch.Tensor) -> torch.Tensor:
        """z: [N, l, 16, h, w] -> frames [N, 4l (minus 3 on the stream's first latent), 3, 8h, 8w] in [0, 1]."""
        _check_ntchw(z, self.model.config.latent_channels, "latents")
        x = run_blocks(self.model.decoder, z, self._state).clamp(0, 1)
        trim = min(self._to_trim, x.shape[1])
        self._to_trim -= trim
        self._empty = x[:, :0]
        return x[:, trim:]

    def flush(self) -> torch.Tensor | None:
        """The decoder holds no frames back: returns [N, 0, 3, H, W] (None if nothing was pushed)."""
        return self._empty


def load_taehv(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    config: TAEHVConfig | None = None,
) -> TAEHV:
    """Build TAEHV and load ``taew2_1.pth`` / ``.safetensors`` strictly (the checks and error messages of
    ``checkpoint.read_state_dict`` / ``load_into``); returns an eval, no-grad model."""
    from ..dit.checkpoint import load_into, read_state_dict

    with torch.device("meta"):
        model = TAEHV(config)
    load_into(model, read_state_dict(path), device=device, dtype=dtype, source=f"{path} (TAEHV for Wan 2.1)")
    return model.eval().requires_grad_(False)
