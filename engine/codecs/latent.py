"""Latent encoders and decoders behind one streaming interface (Wan 2.1 VAE or TAEHV).

    enc = make_encoder("wan", vae=vae)          # or make_encoder("taehv", taehv=taehv)
    z = enc.push(pixels)                         # pixels [N, T, 3, H, W] in [-1, 1] -> z [N, 16, l, H/8, W/8]
    dec = make_decoder("taehv", taehv=taehv)
    frames = dec.push(z)                         # z [1, 16, l, h, w] -> frames [T', 3, 8h, 8w] in [0, 1]

Each object keeps its own causal state (``reset()`` starts a new clip). The N videos of an encoder push
are N independent streams with stacked causal state: the engine encodes the masked and the unmasked
stream of a chunk as one batch of two. Pushing 9 then 12, 12, ... pixel frames returns 3 latents per
push; pushing 3 latents returns 9 frames for the first chunk, 12 after, for both families, so the engine
can switch between them per run (the released engine encodes with the Wan VAE and decodes with TAEHV).

``group_frames=4`` makes an encoder push its frames to the model in the released procedure's groups
(frame 0 alone, then groups of 4) and ``group_latents=1`` a decoder decode one latent at a time: the same
results with activation memory bounded by 4 frames (what the engine does by default).
"""

from __future__ import annotations

import torch

from .taehv import TAEHV, TAEHVStreamDecoder, TAEHVStreamEncoder
from .wan_vae import WanVAE, WanVAEStreamDecoder, WanVAEStreamEncoder

CODECS = ("wan", "taehv")


class LatentEncoder:
    """Streaming pixel -> latent encoder over N independent streams; pixels [N, T, 3, H, W] in [-1, 1]."""

    def __init__(self, kind: str, model: WanVAE | TAEHV, *, group_frames: int | None = None) -> None:
        if group_frames is not None and (group_frames < 1 or group_frames % 4):
            raise ValueError(f"group_frames must be a multiple of 4, got {group_frames}")
        self.kind, self.model, self.group_frames = kind, model, group_frames
        self.dtype = next(model.parameters()).dtype
        self.reset()

    def reset(self) -> None:
        self._stream = WanVAEStreamEncoder(self.model) if self.kind == "wan" else TAEHVStreamEncoder(self.model)
        self._started = False

    def _groups(self, frames: int) -> list[tuple[int, int]]:
        """(start, stop) of each push to the model: everything at once, or frame 0 alone then groups."""
        if self.group_frames is None:
            return [(0, frames)]
        first = 0 if self._started else 1
        bounds = [(0, first)] if first else []
        bounds += [(s, min(s + self.group_frames, frames)) for s in range(first, frames, self.group_frames)]
        return bounds

    @torch.no_grad()
    def push(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [N, T, 3, H, W] in [-1, 1] -> latents completed by this push [N, 16, l, h, w] float32."""
        if pixels.dim() != 5 or pixels.shape[2] != 3:
            raise ValueError(f"an encoder takes pixels as [N, T, 3, H, W], got {tuple(pixels.shape)}")
        x = pixels.to(self.dtype)
        out = []
        for start, stop in self._groups(x.shape[1]):
            part = x[:, start:stop]
            if self.kind == "wan":
                out.append(self._stream.push(part.permute(0, 2, 1, 3, 4)).float())  # [N, 3, t, H, W]
            else:
                out.append(self._stream.push((part + 1) / 2).permute(0, 2, 1, 3, 4).float())  # [0, 1] NTCHW
            self._started = True
        return out[0] if len(out) == 1 else torch.cat(out, dim=2)


class LatentDecoder:
    """Streaming latent -> pixel decoder; returns frames [T, 3, H, W] in [0, 1].

    ``group_latents=1`` decodes one latent at a time, as the released engine does: the same frames with
    activation memory bounded by 4 frames."""

    backend = "torch"

    def __init__(self, kind: str, model: WanVAE | TAEHV, *, group_latents: int | None = None) -> None:
        if group_latents is not None and group_latents < 1:
            raise ValueError(f"group_latents must be >= 1, got {group_latents}")
        self.kind, self.model, self.group_latents = kind, model, group_latents
        self.dtype = next(model.parameters()).dtype
        self.reset()

    def reset(self) -> None:
        self._stream = WanVAEStreamDecoder(self.model) if self.kind == "wan" else TAEHVStreamDecoder(self.model)

    @torch.no_grad()
    def push(self, z: torch.Tensor) -> torch.Tensor:
        """z: [1, 16, l, h, w]."""
        x = z.to(self.dtype)
        step = self.group_latents or x.shape[2]
        parts = [self._decode(x[:, :, s : s + step]) for s in range(0, x.shape[2], step)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "wan":
            frames = self._stream.push(x)[0].permute(1, 0, 2, 3)  # [T, 3, H, W] in [-1, 1]
            return ((frames.float() + 1) / 2).clamp(0, 1)
        return self._stream.push(x.permute(0, 2, 1, 3, 4))[0].float()


def _check(kind: str) -> None:
    if kind not in CODECS:
        raise ValueError(f"unknown codec {kind!r}; choose one of {CODECS}")


def make_encoder(
    kind: str, *, vae: WanVAE | None = None, taehv: TAEHV | None = None, group_frames: int | None = None
) -> LatentEncoder:
    _check(kind)
    model = vae if kind == "wan" else taehv
    if model is None:
        raise ValueError(f"the {kind} encoder needs its model")
    return LatentEncoder(kind, model, group_frames=group_frames)


def make_decoder(
    kind: str, *, vae: WanVAE | None = None, taehv: TAEHV | None = None, group_latents: int | None = None
) -> LatentDecoder:
    _check(kind)
    model = vae if kind == "wan" else taehv
    if model is None:
        raise ValueError(f"the {kind} decoder needs its model")
    return LatentDecoder(kind, model, group_latents=group_latents)
