"""Latent encoders and decoders behind one streaming interface (Wan 2.1 VAE or TAEHV).

    enc = make_encoder("wan", vae=vae)          # or make_encoder("taehv", taehv=taehv)
    z = enc.push(pixels)                         # pixels [T, 3, H, W] in [-1, 1] -> z [1, 16, l, H/8, W/8]
    dec = make_decoder("taehv", taehv=taehv)
    frames = dec.push(z)                         # z [1, 16, l, h, w] -> frames [T', 3, 8h, 8w] in [0, 1]

Each object keeps its own causal state (``reset()`` starts a new clip). Pushing 9 then 12, 12, ... pixel
frames returns 3 latents per push; pushing 3 latents returns 9 frames for the first chunk, 12 after, for
both families, so the engine can switch between them per run (the released engine encodes with the Wan
VAE and decodes with TAEHV).
"""

from __future__ import annotations

import torch

from .taehv import TAEHV, TAEHVStreamDecoder, TAEHVStreamEncoder
from .wan_vae import WanVAE, WanVAEStreamDecoder, WanVAEStreamEncoder

CODECS = ("wan", "taehv")


class LatentEncoder:
    """Streaming pixel -> latent encoder; pixels [T, 3, H, W] in [-1, 1]."""

    def __init__(self, kind: str, model: WanVAE | TAEHV) -> None:
        self.kind, self.model = kind, model
        self.dtype = next(model.parameters()).dtype
        self.reset()

    def reset(self) -> None:
        self._stream = WanVAEStreamEncoder(self.model) if self.kind == "wan" else TAEHVStreamEncoder(self.model)

    @torch.no_grad()
    def push(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(self.dtype)
        if self.kind == "wan":
            return self._stream.push(x.permute(1, 0, 2, 3)[None]).float()  # [1, 3, T, H, W]
        z = self._stream.push(((x + 1) / 2)[None])  # [1, T, 3, H, W] in [0, 1]
        return z.permute(0, 2, 1, 3, 4).float()


class LatentDecoder:
    """Streaming latent -> pixel decoder; returns frames [T, 3, H, W] in [0, 1]."""

    backend = "torch"

    def __init__(self, kind: str, model: WanVAE | TAEHV) -> None:
        self.kind, self.model = kind, model
        self.dtype = next(model.parameters()).dtype
        self.reset()

    def reset(self) -> None:
        self._stream = WanVAEStreamDecoder(self.model) if self.kind == "wan" else TAEHVStreamDecoder(self.model)

    @torch.no_grad()
    def push(self, z: torch.Tensor) -> torch.Tensor:
        """z: [1, 16, l, h, w]."""
        x = z.to(self.dtype)
        if self.kind == "wan":
            frames = self._stream.push(x)[0].permute(1, 0, 2, 3)  # [T, 3, H, W] in [-1, 1]
            return ((frames.float() + 1) / 2).clamp(0, 1)
        return self._stream.push(x.permute(0, 2, 1, 3, 4))[0].float()


class BackendTAEHVDecoder:
    """The TAEHV decoder through a compiled backend (onnxruntime or TensorRT), same interface as
    ``LatentDecoder``: push(z [1, 16, l, h, w]) -> frames [T, 3, H, W] in [0, 1]."""

    kind = "taehv"

    def __init__(self, chunk_decoder) -> None:
        self.chunk_decoder = chunk_decoder
        self.backend = chunk_decoder.backend

    def reset(self) -> None:
        self.chunk_decoder.reset()

    @torch.no_grad()
    def push(self, z: torch.Tensor) -> torch.Tensor:
        return self.chunk_decoder(z.permute(0, 2, 1, 3, 4))[0].float()


def _check(kind: str) -> None:
    if kind not in CODECS:
        raise ValueError(f"unknown codec {kind!r}; choose one of {CODECS}")


def make_encoder(kind: str, *, vae: WanVAE | None = None, taehv: TAEHV | None = None) -> LatentEncoder:
    _check(kind)
    model = vae if kind == "wan" else taehv
    if model is None:
        raise ValueError(f"the {kind} encoder needs its model")
    return LatentEncoder(kind, model)


def make_decoder(kind: str, *, vae: WanVAE | None = None, taehv: TAEHV | None = None) -> LatentDecoder:
    _check(kind)
    model = vae if kind == "wan" else taehv
    if model is None:
        raise ValueError(f"the {kind} decoder needs its model")
    return LatentDecoder(kind, model)
