"""Stage 2: Self-Forcing DMD with the sync-window CFG and the SyncNet reward (SPEC §9).

    objective = SelfForcingDMD(cfg, student, teacher, critic, stream, reward)
    objective.begin_step(step)                             # the iteration's shared draws (exit_step_per="step")
    for phase in objective.phases_at(step):                # ("critic", "student") on student iterations
        loss, info = objective.loss(phase, batch, rng)     # per-sample loss [B]

Rollout: the student generates ``rollout_chunks`` chunks autoregressively with the streaming semantics of
inference (sink 1 + window 7 KV cache, dynamic RoPE, ``engine.dit`` streaming attention), each chunk with the
2-step schedule, from noise scaled by 0.999 (``rollout_noise_scale``). One exit step e in {0, 1} per rollout call
(the release's ``_sample_denoising_end_steps`` with ``same_step_across_blocks``), shared by every chunk and sample
of the call: the chunk's output is the x0 of its e-th call, the only call run with gradients; earlier calls and
the commit calls (t = 0, which write the cache) run without.

Generator (student phase): DMD time t = shift u / (1 + (shift - 1) u), u ~ U(0.001, 0.999), clamped to
[0.001, 0.999] (``dmd_t_clamp``); x_t from the detached
rollout and fresh noise; the frozen bidirectional teacher's x0 with guidance s = 4.5 inside the sync window
0.556 <= t <= 0.882 and 1.0 outside (unconditional branch: audio and text zeroed); the critic's x0;
w = 1 / (mean|gen - teacher| + 1e-6), g = (critic - teacher) w, loss = mean(0.5 (gen - stopgrad(gen - g))^2)
weighted by exp(2 r), r the SyncNet confidence of the decoded rollout (no gradient through r).
Critic phase: a rollout without gradients; the bidirectional critic predicts x0 from its noised copy (MSE).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..engine.dit.attention import RopeTable, StreamingAttention
from ..engine.dit.cache import SinkWindowCache
from ..engine.dit.config import StreamConfig
from ..engine.errors import ConfigError
from ..engine.runtime.sampler import flow_step
from .batch import SampleRandom, TrainBatch, step_random
from .config import TrainConfig
from .stage1 import full_sequence_attention, noised, shifted


class CacheSnapshot:
    """The cached K/V one chunk reads, copied out of the cache before its gradient call. Activation checkpointing
    recomputes that call in the backward pass, after later commits have rewritten the cache in place: the
    recompute must read what the chunk saw, not what the cache holds by then."""

    def __init__(self, cache: SinkWindowCache, plan, num_layers: int) -> None:
        self.kv = [tuple(t.clone() for t in cache.cached(layer, plan)) for layer in range(num_layers)]

    def cached(self, layer: int, plan) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kv[layer]


def guidance_scale(t: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """Per-sample teacher guidance: ``guidance_scale`` inside the sync window (band inclusive), 1.0 outside."""
    lo, hi = cfg.guidance_band
    inside = (t >= lo) & (t <= hi)
    return torch.where(inside, torch.full_like(t, cfg.guidance_scale), torch.ones_like(t))


def dmd_times(u: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """DMD times [B] float64 from uniforms u [B] in [0, 1): t = shift(lo + (hi - lo) u), (lo, hi) = ``dmd_u_range``,
    clamped to ``dmd_t_clamp`` (the release's ``sample_t`` with ``time_dist_type="shifted"``)."""
    lo, hi = cfg.dmd_u_range
    t = shifted(lo + (hi - lo) * u.double(), cfg.shift)
    if cfg.dmd_t_clamp is not None:
        t = t.clamp(*cfg.dmd_t_clamp)
    return t


def critic_loss(pred_x0: torch.Tensor, gen: torch.Tensor) -> torch.Tensor:
    """Per-sample critic loss [B]: the mean squared error of the critic's x0 [B, ...] to the (detached) rollout it
    was noised from (the release's ``denoising_score_matching_loss`` with ``fake_score_pred_type="x0"``)."""
    return (pred_x0 - gen.detach()).pow(2).flatten(1).mean(1)


def dmd_generator_loss(gen: torch.Tensor, teacher_x0: torch.Tensor, critic_x0: torch.Tensor,
                       reward: torch.Tensor | None, reward_scale: float) -> torch.Tensor:
    """Per-sample DMD loss [B]: gen [B, ...] (with grad), teacher / critic x0 [B, ...] (no grad), reward [B] or None.

    w = 1 / (mean|gen - teacher| + 1e-6); g = (critic - teacher) w; L = mean(0.5 (gen - stopgrad(gen - g))^2),
    times exp(reward_scale r)."""
    dims = tuple(range(1, gen.ndim))
    with torch.no_grad():
        w = 1.0 / ((gen - teacher_x0).abs().mean(dim=dims, keepdim=True) + 1e-6)
        g = (critic_x0 - teacher_x0) * w
        target = gen - g
    loss = 0.5 * (gen - target).pow(2).mean(dim=dims)
    if reward is not None:
        loss = loss * torch.exp(reward_scale * reward.to(loss.device, loss.dtype))
    return loss


class SelfForcingDMD:
    """Stage 2 with a trained student and critic and a frozen teacher (all ``CausalWanStudent``)."""

    phases = ("student", "critic")

    def __init__(self, cfg: TrainConfig, student: nn.Module, teacher: nn.Module, critic: nn.Module,
                 stream: StreamConfig, reward=None) -> None:
        self.cfg, self.student, self.teacher, self.critic = cfg, student, teacher, critic
        self.stream = stream.replace(sink_frames=1, window_frames=7)  # the streaming semantics of inference
        self.reward = reward
        self.trained = {"student": student, "critic": critic}
        self.step_exit: int | None = None

    def phases_at(self, step: int) -> tuple[str, ...]:
        """The critic first: on student iterations both phases' gradients are computed before either steps."""
        return ("critic", "student") if self.cfg.student_updates_at(step) else ("critic",)

    def begin_step(self, step: int) -> dict:
        if self.cfg.exit_step_per != "step":
            self.step_exit = None
            return {}
        g = step_random(self.cfg.seed, step)
        self.step_exit = int(torch.randint(len(self.stream.t_list), (), generator=g))
        return {"exit_step": self.step_exit}

    def exit_step(self, rng: SampleRandom) -> int:
        """The exit step of one rollout call: the iteration's (``exit_step_per`` step) or the call's own draw."""
        if self.step_exit is not None:
            return self.step_exit
        return int(torch.randint(len(self.stream.t_list), (), generator=rng.shared()))

    def frames(self, batch: TrainBatch) -> int:
        frames = self.cfg.rollout_chunks * self.stream.chunk_frames
        if batch.latents.shape[2] < frames:
            raise ConfigError(f"stage 2 rolls out {self.cfg.rollout_chunks} chunks = {frames} latent frames; the data "
                              f"has clips of {batch.latents.shape[2]} (prepare 81-frame clips)")
        return frames

    def rollout(self, batch: TrainBatch, rng: SampleRandom, *, grad: bool, exit_step: int) -> torch.Tensor:
        """The student's clip [B, 16, F, h, w], chunk by chunk against its cache, each chunk's output the x0 of its
        call ``exit_step``; with ``grad`` that call records gradients."""
        frames, c = self.frames(batch), self.stream.chunk_frames
        device = batch.latents.device
        model = self.student
        kv_dtype = torch.bfloat16 if self.cfg.compute_dtype == "bf16" else torch.float32  # the K/V the calls make
        cache = SinkWindowCache(model.cfg, self.stream, batch=batch.size, device=device, dtype=kv_dtype)
        rope = RopeTable(model.cfg, self.stream, device)
        clip = batch.clip()
        t_list = self.stream.t_list
        chunks = []
        for start in range(0, frames, c):
            plan = cache.begin_chunk(start)
            x = rng.randn((model.cfg.out_dim, c, *batch.latents.shape[-2:])) * self.cfg.rollout_noise_scale
            for i in range(exit_step + 1):
                last = i == exit_step
                t = t_list[i]
                source = CacheSnapshot(cache, plan, model.cfg.num_layers) if grad and last else cache
                ctx = StreamingAttention(source, plan, rope, write=False, backend="reference")
                with torch.set_grad_enabled(grad and last):
                    flow = model(batch.inputs(x, start), torch.tensor(t, dtype=torch.float64), clip, ctx,
                                 start_frame=start)
                eps = None if last else rng.randn(x.shape[1:])
                x0, x = flow_step(x, flow, t, None if last else t_list[i + 1], eps)  # the inference loop's update
            with torch.no_grad():
                ctx = StreamingAttention(cache, plan, rope, write=True, backend="reference")
                model(batch.inputs(x0.detach(), start), torch.tensor(self.stream.commit_t, dtype=torch.float64),
                      clip, ctx, start_frame=start)
            cache.commit()
            chunks.append(x0)
        return torch.cat(chunks, dim=2)

    def _noised(self, clean: torch.Tensor, rng: SampleRandom) -> tuple[torch.Tensor, torch.Tensor]:
        """(t [B] float64, x_t) with t = shift(u), u ~ U(dmd_u_range), clamped to ``dmd_t_clamp``; fresh noise."""
        t = dmd_times(rng.rand(), self.cfg).to(clean.device)
        return t, noised(clean, t[:, None, None, None, None], rng.randn(clean.shape[1:]))

    def _x0(self, net: nn.Module, batch: TrainBatch, x_t: torch.Tensor, t: torch.Tensor, conditional: bool = True):
        frames = x_t.shape[2]
        attention = full_sequence_attention(self.teacher.cfg, self.stream, frames, False, str(x_t.device))
        flow = net(batch.inputs(x_t), t, batch.clip(conditional), attention)
        return x_t - t[:, None, None, None, None].float() * flow

    def teacher_x0(self, batch: TrainBatch, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The guided teacher x0 = x0_c + (s - 1)(x0_c - x0_u), s per sample (``guidance_scale``)."""
        with torch.no_grad():
            x0_c = self._x0(self.teacher, batch, x_t, t)
            s = guidance_scale(t, self.cfg)
            if bool((s == 1.0).all()):
                return x0_c
            x0_u = self._x0(self.teacher, batch, x_t, t, conditional=False)
            return x0_c + (s - 1).float()[:, None, None, None, None] * (x0_c - x0_u)

    def loss(self, phase: str, batch: TrainBatch, rng: SampleRandom) -> tuple[torch.Tensor, dict]:
        exit_step = self.exit_step(rng)
        if phase == "critic":
            with torch.no_grad():
                gen = self.rollout(batch, rng, grad=False, exit_step=exit_step)
            t, x_t = self._noised(gen, rng)
            pred = self._x0(self.critic, batch, x_t, t)
            return critic_loss(pred, gen), {"critic_exit_step": float(exit_step)}
        gen = self.rollout(batch, rng, grad=True, exit_step=exit_step)
        t, x_t = self._noised(gen.detach(), rng)
        teacher = self.teacher_x0(batch, x_t, t)
        with torch.no_grad():
            critic = self._x0(self.critic, batch, x_t, t)
        reward = None
        info: dict = {"student_exit_step": float(exit_step), "dmd_t": t.float().mean().item(),
                      "guidance": guidance_scale(t, self.cfg).float().mean().item()}
        if self.cfg.reward and self.reward is not None:
            reward = self.reward(gen.detach(), batch.wav)
            info["reward"] = reward.mean().item()
            if not math.isfinite(info["reward"]):
                raise FloatingPointError("the SyncNet reward is not finite")
        return dmd_generator_loss(gen, teacher, critic, reward, self.cfg.reward_scale), info
