"""The Wan 2.1 video VAE (z_dim 16, 4x time, 8x space, ~127M parameters) with streaming encode/decode.

Module tree and parameter names are those of the released ``Wan2.1_VAE.pth`` (``encoder.conv1``,
``encoder.downsamples.N``, ``encoder.middle``, ``encoder.head``, ``conv1``, ``conv2``, ``decoder.*``;
RMS norms hold ``gamma``, residual blocks ``residual``/``shortcut``, resamples ``resample``/``time_conv``,
attention ``norm``/``to_qkv``/``proj``), so the released file loads with ``strict=True``.

    vae = load_wan_vae("Wan2.1_VAE.pth", device="cuda", dtype=torch.bfloat16)
    z = vae.encode(video)     # video: [B, 3, 1 + 4k, H, W] in [-1, 1] -> z: [B, 16, 1 + k, H/8, W/8] normalized
    video = vae.decode(z)     # z: [B, 16, L, h, w] -> [B, 3, 1 + 4(L - 1), 8h, 8w] in [-1, 1]

    enc, dec = WanVAEStreamEncoder(vae), WanVAEStreamDecoder(vae)
    z0 = enc.push(video[:, :, :9])      # frame 0 alone + 2 groups of 4 -> 3 latents
    z1 = enc.push(video[:, :, 9:21])    # 3 groups of 4 -> 3 latents
    frames = dec.push(z0)               # 9 frames, then 12 per 3 latents

Causality (SPEC §7). Every 3x3x3 convolution is causal in time: it sees its input's two previous frames
(zeros before frame 0). The released code encodes frame 0 alone and then groups of 4, keeping a 2-frame
cache per convolution; a temporal downsampler passes frame 0 through and then applies a stride-2
kernel-3 convolution whose windows start at frame 0 ((0,1,2), (2,3,4), ...); a temporal upsampler
passes the first latent frame through and turns every later frame into 2 with a causal convolution
over the frames after the first. Here each module keeps that state in a ``TimeCache`` and processes a
whole chunk in parallel over time, so any chunking that keeps the group boundaries (1 + 4a pixel frames
first, 4b after) returns the same latents as the released frame-0-then-4s procedure; ``encode`` with
``group_frames=4`` runs exactly that procedure and is the reference path.

Latents are normalized per channel: z = (mu - mean) / std with the SPEC §7 mean/std.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)

class TimeCache(dict):
    """Per-stream temporal state: module -> its cached frames (and (module, "started") -> True), plus one
    scratch arena that every causal convolution of the stream assembles its input in.

    A causal convolution needs [its previous frames, the new frames] in one tensor. Instead of concatenating
    (a new full-size activation per convolution per chunk), the new frames are written into the arena right
    after the history (by the SiLU before the convolution, so the activation is written once), and the
    history is a small preallocated buffer per convolution. Convolutions run one after another, so one
    arena, as large as the largest input, serves them all.
    """

    def __init__(self) -> None:
        super().__init__()
        self._arena: torch.Tensor | None = None

    def scratch(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A contiguous [shape] view of the arena in ``like``'s dtype and device (contents undefined)."""
        n = math.prod(shape)
        arena = self._arena
        if arena is None or arena.numel() < n or arena.dtype != like.dtype or arena.device != like.device:
            arena = self._arena = torch.empty(n, dtype=like.dtype, device=like.device)
        return arena[:n].view(shape)


@dataclass(frozen=True, kw_only=True)
class WanVAEConfig:
    """Sizes of the Wan VAE; the defaults are the released Wan 2.1 VAE."""

    dim: int = 96
    """Base channel count."""
    z_dim: int = 16
    """Latent channels."""
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    """Channel multipliers of the stages."""
    num_res_blocks: int = 2
    """Residual blocks per encoder stage (decoder: one more)."""
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    """Per encoder downsampling stage: also halve time (the decoder mirrors it)."""

    @property
    def time_stride(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    @property
    def space_stride(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    def replace(self, **changes) -> WanVAEConfig:
        return dataclasses.replace(self, **changes)

    @staticmethod
    def from_name(name: str) -> WanVAEConfig:
        try:
            return VAE_PRESETS[name.lower()]
        except KeyError:
            raise ValueError(f"unknown VAE preset {name!r}; choose one of {sorted(VAE_PRESETS)}") from None


VAE_PRESETS: dict[str, WanVAEConfig] = {
    "wan2.1": WanVAEConfig(),
    "tiny": WanVAEConfig(dim=8),
}


class CausalConv3d(nn.Conv3d):
    """Conv3d that is causal in time: the input is preceded by its previous ``2 * padding_t`` frames
    (from the cache, zeros at stream start); spatial padding is symmetric zero padding."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.context = 2 * self.padding[0]
        self.padding = (0, self.padding[1], self.padding[2])

    def forward(self, x: torch.Tensor, cache: TimeCache) -> torch.Tensor:
        """x: [B, C, T, H, W] -> [B, C_out, T, H, W] (for time stride 1)."""
        if not self.context:
            return super().forward(x)
        self.input_slot(x, cache).copy_(x)
        return self.run_slot(cache)

    def input_slot(self, like: torch.Tensor, cache: TimeCache) -> torch.Tensor:
        """Where the new frames go: a [B, C, T, H, W] view of the arena right after this convolution's
        history (``like`` gives shape, dtype and device). Write the frames, then call ``run_slot``."""
        b, c, t, h, w = like.shape
        history = cache.get(self)
        if history is None or history.shape != (b, c, self.context, h, w) or history.dtype != like.dtype:
            history = cache[self] = like.new_zeros(b, c, self.context, h, w)  # zeros before frame 0
        window = cache.scratch((b, c, self.context + t, h, w), like)
        window[:, :, : self.context].copy_(history)
        cache[(self, "window")] = window
        return window[:, :, self.context :]

    def run_slot(self, cache: TimeCache) -> torch.Tensor:
        """Convolve the assembled [history, new frames] and keep the last frames as the next history."""
        window = cache.pop((self, "window"))
        y = super().forward(window)
        cache[self].copy_(window[:, :, -self.context :])
        return y


class RMSNorm(nn.Module):
    """L2-normalize over channels (dim 1), times sqrt(dim) and a learned ``gamma``."""

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, T, H, W] (or [B, C, H, W] with ``images``)."""
        return F.normalize(x, dim=1).mul_(self.gamma * self.scale)  # in place: one full-size temporary


class Upsample2x(nn.Module):
    """Nearest-neighbour 2x spatial upsampling (frame-wise)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="nearest-exact")


def _frame_wise(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2D module to every frame of x: [B, C, T, H, W]."""
    b, _, t = x.shape[:3]
    y = fn(x.transpose(1, 2).flatten(0, 1))
    return y.reshape(b, t, *y.shape[1:]).transpose(1, 2)


class Resample(nn.Module):
    """2x spatial up/down sampling, optionally with 2x temporal up/down sampling (``time_conv``)."""

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        if mode in ("upsample2d", "upsample3d"):
            self.resample = nn.Sequential(Upsample2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        elif mode in ("downsample2d", "downsample3d"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=(2, 2)))
        else:
            raise ValueError(f"unknown resample mode {mode!r}")
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=(0, 0, 0))

    def forward(self, x: torch.Tensor, cache: TimeCache) -> torch.Tensor:
        """x: [B, C, T, H, W] -> [B, C', T', H', W']."""
        if self.mode == "upsample3d":
            x = self._time_upsample(x, cache)
        x = _frame_wise(self.resample, x)
        if self.mode == "downsample3d":
            x = self._time_downsample(x, cache)
        return x

    def _time_upsample(self, x: torch.Tensor, cache: TimeCache) -> torch.Tensor:
        first = x[:, :, :0]
        if not cache.get((self, "started")) and x.shape[2]:
            cache[(self, "started")] = True
            first, x = x[:, :, :1], x[:, :, 1:]  # the stream's first frame is not upsampled in time
        b, c, t, h, w = x.shape
        if t == 0:
            return first
        y = self.time_conv(x, cache).reshape(b, 2, c, t, h, w)
        y = torch.stack([y[:, 0], y[:, 1]], 3).reshape(b, c, 2 * t, h, w)  # frame i -> (2i, 2i+1)
        return torch.cat([first, y], 2)

    def _time_downsample(self, x: torch.Tensor, cache: TimeCache) -> torch.Tensor:
        prev = cache.get(self)
        t = x.shape[2]
        if t == 0:
            return x
        if prev is None:
            if t % 2 != 1:
                raise ValueError(f"encode stream: the first chunk must have 1 + 4a frames (a time downsampler got {t})")
            out = torch.cat([x[:, :, :1], self.time_conv(x, cache)], 2) if t > 1 else x
        else:
            if t % 2:
                raise ValueError(f"encode stream: later chunks must have 4b frames (a time downsampler got {t})")
            out = self.time_conv(torch.cat([prev, x], 2), cache)
        cache[self] = x[:, :, -1:].clone()
        return out


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim), nn.SiLU(), nn.Dropout(0.0), CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: TimeCache) -> torch.Tensor:
        """x: [B, C_in, T, H, W] -> [B, C_out, T, H, W]."""
        h = x if isinstance(self.shortcut, nn.Identity) else self.shortcut(x, cache)
        return _run(self.residual, x, cache).add_(h)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: TimeCache) -> torch.Tensor:
        """x: [B, C, T, H, W] -> same shape."""
        return x + _frame_wise(self._attend, x)

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(n, 1, 3 * c, h * w).transpose(2, 3)  # [n, 1, hw, 3c]
        q, k, v = qkv.chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v)  # [n, 1, hw, c]
        return self.proj(y.squeeze(1).transpose(1, 2).reshape(n, c, h, w))


_TIME_MODULES = (CausalConv3d, Resample, ResidualBlock, AttentionBlock)


def _run(layers: nn.Sequential, x: torch.Tensor, cache: TimeCache) -> torch.Tensor:
    """Apply a layer stack; a SiLU followed (past any dropout) by a causal convolution writes its output
    straight into that convolution's input slot."""
    stack = [layer for layer in layers if not isinstance(layer, nn.Dropout)]  # inference: dropout is identity
    i = 0
    while i < len(stack):
        layer = stack[i]
        following = stack[i + 1] if i + 1 < len(stack) else None
        if isinstance(layer, nn.SiLU) and isinstance(following, CausalConv3d) and following.context:
            torch.ops.aten.silu.out(x, out=following.input_slot(x, cache))
            x = following.run_slot(cache)
            i += 2
            continue
        x = layer(x, cache) if isinstance(layer, _TIME_MODULES) else layer(x)
        i += 1
    return x


def _middle(dim: int) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))


class Encoder3d(nn.Module):
    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(cfg.dim_mult) - 1:
                blocks.append(Resample(out_dim, "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"))
        self.downsamples = nn.Sequential(*blocks)
        self.middle = _middle(out_dim)
        self.head = nn.Sequential(RMSNorm(out_dim), nn.SiLU(), CausalConv3d(out_dim, cfg.z_dim * 2, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: TimeCache) -> torch.Tensor:
        """x: [B, 3, T, H, W] -> [B, 2 z_dim, T', H/8, W/8]."""
        x = self.conv1(x, cache)
        for part in (self.downsamples, self.middle, self.head):
            x = _run(part, x, cache)
        return x


class Decoder3d(nn.Module):
    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.dim * m for m in (mult[-1], *mult[::-1])]
        temporal_upsample = cfg.temporal_downsample[::-1]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0])
        blocks: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # every Resample halves the channels on the way up
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(mult) - 1:
                blocks.append(Resample(out_dim, "upsample3d" if temporal_upsample[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*blocks)
        self.head = nn.Sequential(RMSNorm(out_dim), nn.SiLU(), CausalConv3d(out_dim, 3, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: TimeCache) -> torch.Tensor:
        """x: [B, z_dim, L, h, w] -> [B, 3, T, 8h, 8w]."""
        x = self.conv1(x, cache)
        for part in (self.middle, self.upsamples, self.head):
            x = _run(part, x, cache)
        return x


class WanVAE(nn.Module):
    """Wan 2.1 VAE: ``encoder``, ``conv1`` (moments), ``conv2`` (latent in), ``decoder``."""

    def __init__(self, config: WanVAEConfig | None = None):
        super().__init__()
        self.config = cfg = config or WanVAEConfig()
        if cfg.z_dim != len(LATENT_MEAN):
            raise ValueError(f"z_dim {cfg.z_dim}: the latent normalization is defined for {len(LATENT_MEAN)} channels")
        self.encoder = Encoder3d(cfg)
        self.conv1 = CausalConv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder3d(cfg)
        self._stats: tuple[torch.Tensor, torch.Tensor] | None = None

    def latent_stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std), each [1, 16, 1, 1, 1] float32 on ``device``; kept out of the state dict and
        never cast to the model dtype (bf16 would round std 2.8184 to 2.8125)."""
        if self._stats is None or self._stats[0].device != device:
            shape = (1, self.config.z_dim, 1, 1, 1)
            self._stats = (
                torch.tensor(LATENT_MEAN, device=device).view(shape),
                torch.tensor(LATENT_STD, device=device).view(shape),
            )
        return self._stats

    def encode_chunk(self, video: torch.Tensor, cache: TimeCache) -> torch.Tensor:
        """One step of a causal encode stream. video: [B, 3, t, H, W] in [-1, 1] -> normalized z
        [B, 16, l, h, w], float32 whatever the model dtype (as in the released code)."""
        mu = self.conv1(self.encoder(video, cache), cache)[:, : self.config.z_dim]
        mean, std = self.latent_stats(mu.device)
        return (mu.float() - mean) / std

    def decode_chunk(self, z: torch.Tensor, cache: TimeCache) -> torch.Tensor:
        """One step of a causal decode stream. z: [B, 16, l, h, w] normalized -> [B, 3, t, 8h, 8w] in [-1, 1]
        (model dtype)."""
        mean, std = self.latent_stats(z.device)
        z = (z.float() * std + mean).to(self.conv2.weight.dtype)
        return self.decoder(self.conv2(z, cache), cache).clamp(-1, 1)

    def encode(self, video: torch.Tensor, group_frames: int | None = None) -> torch.Tensor:
        """video: [B, 3, 1 + 4k, H, W] in [-1, 1] -> z: [B, 16, 1 + k, H/8, W/8] (normalized).

        ``group_frames=None`` encodes everything in one call; ``group_frames=4`` runs the released
        procedure (frame 0 alone, then groups of 4; bounded memory); any multiple of 4 works too."""
        _check_video(video, self.config)
        if group_frames is None:
            return self.encode_chunk(video, TimeCache())
        stream = WanVAEStreamEncoder(self)
        zs = [stream.push(video[:, :, :1])]
        zs += [stream.push(video[:, :, s : s + group_frames]) for s in range(1, video.shape[2], group_frames)]
        return torch.cat(zs, 2)

    def decode(self, z: torch.Tensor, group_latents: int | None = None) -> torch.Tensor:
        """z: [B, 16, L, h, w] normalized -> video [B, 3, 1 + 4(L - 1), 8h, 8w] clamped to [-1, 1].

        ``group_latents=1`` decodes one latent at a time like the released code (the reference path)."""
        if group_latents is None:
            return self.decode_chunk(z, TimeCache())
        cache = TimeCache()
        steps = range(0, z.shape[2], group_latents)
        return torch.cat([self.decode_chunk(z[:, :, s : s + group_latents], cache) for s in steps], 2)


def _check_video(video: torch.Tensor, cfg: WanVAEConfig) -> None:
    if video.ndim != 5 or video.shape[1] != 3:
        raise ValueError(f"the VAE expects video as [B, 3, T, H, W], got {tuple(video.shape)}")
    if (video.shape[2] - 1) % cfg.time_stride:
        raise ValueError(f"the VAE encodes 1 + {cfg.time_stride}k frames, got {video.shape[2]}")
    _check_frame_size(video, cfg)


def _check_frame_size(video: torch.Tensor, cfg: WanVAEConfig) -> None:
    s = cfg.space_stride
    if video.shape[3] % s or video.shape[4] % s:
        raise ValueError(f"frame size {video.shape[3]}x{video.shape[4]} must be a multiple of {s}")


class WanVAEStreamEncoder:
    """Causal streaming encoder: push pixel frames in any chunking; every latent is returned by the push
    that delivers its last frame (latent 0 = frame 0, latent k = frames 4k-3 .. 4k). Frames of an
    incomplete group wait in a buffer. The engine pushes 9 frames (frame 0 + 2 groups) and then 12
    (3 groups): 3 latents per push, nothing buffered. Equals ``WanVAE.encode`` on the concatenation.
    """

    def __init__(self, vae: WanVAE):
        self.vae = vae
        self.reset()

    def reset(self) -> None:
        self._cache = TimeCache()
        self._pending: torch.Tensor | None = None  # [B, 3, <4, H, W]
        self._started = False

    @property
    def pending_frames(self) -> int:
        return 0 if self._pending is None else self._pending.shape[2]

    def push(self, frames: torch.Tensor) -> torch.Tensor:
        """frames: [B, 3, t, H, W] in [-1, 1] -> z [B, 16, l, H/8, W/8] for the groups completed."""
        if frames.ndim != 5 or frames.shape[1] != 3:
            raise ValueError(f"the VAE expects frames as [B, 3, t, H, W], got {tuple(frames.shape)}")
        if self._pending is not None:
            frames = torch.cat([self._pending, frames], 2)
        stride = self.vae.config.time_stride
        t = frames.shape[2]
        if not self._started:
            ready = 1 + (t - 1) // stride * stride if t else 0
        else:
            ready = t // stride * stride
        self._pending = frames[:, :, ready:] if ready < t else None
        if ready == 0:
            s = self.vae.config.space_stride
            b, _, _, h, w = frames.shape
            return frames.new_zeros(b, self.vae.config.z_dim, 0, h // s, w // s, dtype=torch.float32)
        _check_frame_size(frames, self.vae.config)
        self._started = True
        return self.vae.encode_chunk(frames[:, :, :ready], self._cache)


class WanVAEStreamDecoder:
    """Causal streaming decoder: push latents in any chunking; latent 0 returns 1 frame, every later
    latent 4 frames, immediately. Equals ``WanVAE.decode`` on the concatenation; nothing is held back."""

    def __init__(self, vae: WanVAE):
        self.vae = vae
        self.reset()

    def reset(self) -> None:
        self._cache = TimeCache()

    def push(self, z: torch.Tensor) -> torch.Tensor:
        """z: [B, 16, l, h, w] normalized -> frames [B, 3, t, 8h, 8w] in [-1, 1]."""
        if z.ndim != 5 or z.shape[1] != self.vae.config.z_dim:
            c = self.vae.config.z_dim
            raise ValueError(f"the VAE decoder expects z as [B, {c}, l, h, w], got {tuple(z.shape)}")
        if z.shape[2] == 0:
            b, _, _, h, w = z.shape
            s = self.vae.config.space_stride
            return z.new_zeros(b, 3, 0, h * s, w * s, dtype=self.vae.conv2.weight.dtype)
        return self.vae.decode_chunk(z, self._cache)


def parameter_count(config: WanVAEConfig | None = None) -> int:
    """Parameters of the VAE, counted on the meta device (no memory)."""
    with torch.device("meta"):
        model = WanVAE(config)
    return sum(math.prod(p.shape) for p in model.parameters())


def load_wan_vae(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    config: WanVAEConfig | None = None,
) -> WanVAE:
    """Build the VAE on the meta device and load ``Wan2.1_VAE.pth`` / ``.safetensors`` strictly
    (tensors assigned, no double allocation); returns an eval, no-grad model on ``device``/``dtype``."""
    from ..dit.checkpoint import load_into, read_state_dict

    with torch.device("meta"):
        model = WanVAE(config)
    load_into(model, read_state_dict(path), device=device, dtype=dtype, source=f"{path} (Wan 2.1 VAE)")
    return model.eval().requires_grad_(False)
