"""Stage 1, diffusion forcing of the block-causal student (SPEC §9), and plain flow matching of the teacher.

    objective = DiffusionForcing(cfg, student, stream)
    objective.begin_step(step)                          # draws this step's (window, sink)
    loss, info = objective.loss("student", batch, rng)  # per-sample loss [B]

Diffusion forcing: each 3-frame chunk gets its own t from {0.999, 0.769, 0}; x_t = (1 - t) x0 + t eps; the
student sees the whole clip in one full-sequence call, block-causal with a (window, sink) pair drawn per step
from the recipe's set (a FlexAttention block mask, ``engine.dit.full_sequence``), absolute RoPE positions; the
loss is 0.5 MSE of x0 = x_t - t v against the clean latents. Chunks drawn at t = 0 are clean context: their x0
is x_t, so they add nothing to the loss (their frames still count in the mean).

Flow matching (the teacher): one t per sample, t = shift u / (1 + (shift - 1) u), u ~ U(0, 1); the
bidirectional network's flow is regressed on eps - x0 (MSE); the conditioning (audio and text) is dropped to
zeros for a fraction of the samples so that the unconditional branch of the guidance is learned.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..engine.dit.config import ModelConfig, StreamConfig
from ..engine.dit.full_sequence import FullSequenceAttention
from ..engine.dit.model import ClipInputs
from .batch import SampleRandom, TrainBatch, step_random
from .config import TrainConfig


def shifted(u: torch.Tensor, shift: float) -> torch.Tensor:
    """The Wan time shift: t = shift u / (1 + (shift - 1) u)."""
    return shift * u / (1 + (shift - 1) * u)


def noised(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps in float64 (as the released code), float32 out; t broadcasts against x0
    ([B, 1, F|1, 1, 1])."""
    return ((1 - t) * x0.double() + t * eps.double()).float()


@functools.lru_cache(maxsize=32)
def full_sequence_attention(model: ModelConfig, stream: StreamConfig, frames: int, block_causal: bool,
                            device: str) -> FullSequenceAttention:
    """The full-sequence attention context of one clip shape, built once (its RoPE table and block mask) and shared
    by every call and every network of that shape."""
    return FullSequenceAttention(model, stream, frames, block_causal=block_causal, device=device)


class DiffusionForcing:
    """Stage 1: the block-causal student on whole clips with per-chunk times."""

    phases = ("student",)

    def __init__(self, cfg: TrainConfig, student: nn.Module, stream: StreamConfig) -> None:
        self.cfg, self.student, self.stream = cfg, student, stream
        self.trained = {"student": student}
        self.pair = cfg.window_sink_pairs[0]

    def phases_at(self, step: int) -> tuple[str, ...]:
        return self.phases

    def begin_step(self, step: int) -> dict:
        g = step_random(self.cfg.seed, step)
        self.pair = self.cfg.window_sink_pairs[int(torch.randint(len(self.cfg.window_sink_pairs), (), generator=g))]
        return {"window": self.pair[0], "sink": self.pair[1]}

    def attention(self, frames: int, device) -> FullSequenceAttention:
        """Block-causal with this step's (window, sink)."""
        window, sink = self.pair
        stream = self.stream.replace(window_frames=window, sink_frames=sink)
        return full_sequence_attention(self.student.cfg, stream, frames, True, str(device))

    def chunk_times(self, rng: SampleRandom, frames: int) -> torch.Tensor:
        """[B, F] float64: one t per chunk from ``chunk_t``, repeated over the chunk's frames."""
        c = self.stream.chunk_frames
        chunks = -(-frames // c)
        table = torch.tensor(self.cfg.chunk_t, dtype=torch.float64)
        return table[rng.choice(len(table), chunks)].repeat_interleave(c, dim=1)[:, :frames]

    def loss(self, phase: str, batch: TrainBatch, rng: SampleRandom) -> tuple[torch.Tensor, dict]:
        x0 = batch.latents
        frames = x0.shape[2]
        t = self.chunk_times(rng, frames).to(x0.device)  # [B, F]
        eps = rng.randn(x0.shape[1:])
        tb = t[:, None, :, None, None]
        x_t = noised(x0, tb, eps)
        flow = self.student(batch.inputs(x_t), t, batch.clip(), self.attention(frames, x0.device))
        x0_pred = x_t - tb.float() * flow
        return 0.5 * (x0_pred - x0).pow(2).flatten(1).mean(1), {}


class FlowMatching:
    """The bidirectional teacher: plain flow matching with conditioning dropout."""

    phases = ("teacher",)

    def __init__(self, cfg: TrainConfig, teacher: nn.Module, stream: StreamConfig) -> None:
        self.cfg, self.teacher, self.stream = cfg, teacher, stream
        self.trained = {"teacher": teacher}

    def phases_at(self, step: int) -> tuple[str, ...]:
        return self.phases

    def begin_step(self, step: int) -> dict:
        return {}

    def loss(self, phase: str, batch: TrainBatch, rng: SampleRandom) -> tuple[torch.Tensor, dict]:
        x0 = batch.latents
        t = shifted(rng.rand(), self.cfg.shift).clamp(1e-3, 0.999).to(x0.device)  # [B]
        keep = (rng.rand() >= self.cfg.cond_dropout).to(x0.device, torch.float32)  # [B]
        eps = rng.randn(x0.shape[1:])
        x_t = noised(x0, t[:, None, None, None, None], eps)
        clip = ClipInputs(batch.text_context * keep[:, None, None], batch.audio * keep[:, None, None])
        attention = full_sequence_attention(self.teacher.cfg, self.stream, x0.shape[2], False, str(x0.device))
        flow = self.teacher(batch.inputs(x_t), t, clip, attention)
        return (flow - (eps - x0)).pow(2).flatten(1).mean(1), {}
