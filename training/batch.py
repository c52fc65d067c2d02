"""A training micro-batch on the device, and the per-sample random numbers that make runs reproducible.

Every random draw of a sample comes from its own generator, seeded by (run seed, step, phase, global sample
slot): the same step gives the same noise whether it runs in one process or split over several, with or without
gradient accumulation, and a resumed run draws exactly what an uninterrupted one would have.

    batch = TrainBatch.from_clips(data.batch(indices), data, device)
    rng = SampleRandom(seed, step, phase=0, slots=range(first, first + len(indices)))
    eps = rng.randn(batch.latents.shape[1:])                  # [B, 16, L, h, w], one generator per sample
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..engine.dit.model import ClipInputs, input_channels


@dataclass
class TrainBatch:
    """Conditioning and targets of a micro-batch (SPEC §3), float32 on the device."""

    latents: torch.Tensor
    """[B, 16, L, h, w] clean latents of the clip (the target x0, and the reference sequence)."""
    masked_latents: torch.Tensor
    """[B, 16, L, h, w] latents of the clip with the mouth zeroed in pixel space."""
    mask_latent: torch.Tensor
    """[B, 1, 1, h, w] the mask channel (1 = mouth)."""
    text_context: torch.Tensor
    """[B, text_len, text_dim]"""
    audio: torch.Tensor
    """[B, V, audio_dim] per-video-frame audio features, V = 1 + 4(L-1)."""
    wav: torch.Tensor
    """[B, S] 16 kHz speech of the clip (the SyncNet reward)."""
    reference: torch.Tensor | None = None
    """[B, 16, L, h, w] the reference-sequence channels when they are not the clip's own latents (the copy-risk
    check: another clip's, or zeros); None: ``latents``, as at inference."""

    @staticmethod
    def from_clips(clips, data, device: torch.device | str) -> TrainBatch:
        """From ``TrainData.batch(...)`` (training.data) and the data set's shared text context and mask."""
        b = clips.latents.shape[0]
        return TrainBatch(
            latents=clips.latents.to(device, torch.float32),
            masked_latents=clips.masked_latents.to(device, torch.float32),
            mask_latent=data.mask_latent.to(device, torch.float32).expand(b, -1, -1, -1, -1),
            text_context=data.text_context.to(device, torch.float32).expand(b, -1, -1),
            audio=clips.audio.to(device, torch.float32),
            wav=clips.wav.to(torch.float32),
        )

    @property
    def size(self) -> int:
        return self.latents.shape[0]

    @property
    def ref_latent(self) -> torch.Tensor:
        """[B, 16, 1, h, w] the latent of the clip's pixel frame 0 (frame 0 is encoded alone by the causal VAE)."""
        return self.latents[:, :, :1]

    def inputs(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """The 65 input channels [B, 65, F, h, w] of the noisy latent x [B, 16, F, h, w] at frames start..start+F-1;
        the reference sequence is the clip's own unmasked latents (as at inference, SPEC §3) unless ``reference``
        replaces it."""
        f = x.shape[2]
        sl = slice(start, start + f)
        reference = self.latents if self.reference is None else self.reference
        return input_channels(x, self.ref_latent, self.mask_latent, self.masked_latents[:, :, sl],
                              reference[:, :, sl])

    def with_reference(self, reference: torch.Tensor) -> TrainBatch:
        """The same batch with the reference-sequence channels replaced by ``reference`` [B, 16, L, h, w]."""
        return dataclasses.replace(self, reference=reference)

    def clip(self, conditional: bool = True) -> ClipInputs:
        """Text and audio for ``forward``; the unconditional branch replaces both by zeros (SPEC §9: their
        biases still act)."""
        if conditional:
            return ClipInputs(self.text_context, self.audio)
        return ClipInputs(torch.zeros_like(self.text_context), torch.zeros_like(self.audio))


def _seed(seed: int, step: int, phase: int, slot: int) -> int:
    """A 63-bit seed from (run seed, step, phase, sample slot) (splitmix64 of their combination)."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + phase * 0x94D049BB133111EB + slot) % (1 << 64)
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % (1 << 64)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % (1 << 64)
    return (x ^ (x >> 31)) >> 1


class SampleRandom:
    """One CPU generator per sample of a micro-batch (see the module docstring)."""

    def __init__(self, seed: int, step: int, phase: int, slots: Sequence[int], device: torch.device | str = "cpu"):
        self.generators = [torch.Generator().manual_seed(_seed(seed, step, phase, s)) for s in slots]
        self.key = (seed, step, phase, slots[0])
        self.device = device

    def shared(self) -> torch.Generator:
        """A generator of the draws the micro-batch shares (a rollout call's exit step), keyed by (seed, step,
        phase, first slot): the same micro-batch draws the same in any number of processes."""
        seed, step, phase, first = self.key
        return torch.Generator().manual_seed(_seed(seed, step, phase, first + (1 << 40)))

    def randn(self, shape: Sequence[int]) -> torch.Tensor:
        """[B, *shape] standard normal, sample b from its own generator."""
        return torch.stack([torch.randn(tuple(shape), generator=g) for g in self.generators]).to(self.device)

    def rand(self) -> torch.Tensor:
        """[B] uniform in [0, 1), float64."""
        return torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in self.generators])

    def choice(self, n: int, count: int) -> torch.Tensor:
        """[B, count] integers in [0, n)."""
        return torch.stack([torch.randint(n, (count,), generator=g) for g in self.generators])


def step_random(seed: int, step: int) -> torch.Generator:
    """The generator of draws shared by the whole step (every process): (window, sink), the exit step."""
    return torch.Generator().manual_seed(_seed(seed, step, 1 << 20, 1 << 30))
