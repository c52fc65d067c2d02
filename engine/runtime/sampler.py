"""The reference scheduler: the plain 2-step streaming loop, per chunk two denoising calls and one commit
call (SPEC §2, §5, §6), eager, allocating as it goes. ``StaticStudent`` (static.py) computes the same thing
over static buffers and CUDA graphs; tests hold the two equal.

    sampler = StreamingSampler(model, StreamConfig(latent_h=64, latent_w=64))
    sampler.start_clip(text_context, audio_emb, ref_latent, mask_latent)
    for masked, ref_seq in chunks:                  # each [B, 16, 3, h, w]
        out = sampler.denoise_chunk(masked, ref_seq)  # out.x0: [B, 16, 3, h, w] clean latents
        ...

Noise is drawn from a generator seeded at every ``start_clip`` (the same clip gives the same output, however
many clips ran before) unless injected (``noise`` / ``renoise``) for parity checks.
The x0 update and the re-noise are done in float64, as in the released code.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from ..dit.attention import RopeTable, StreamingAttention, resolve_backend
from ..dit.cache import SinkWindowCache, window_shape_plans
from ..dit.config import StreamConfig, tokens_per_frame
from ..dit.model import CausalWanStudent, ClipConditioning, input_channels
from ..dit.parallel import SequenceParallel, SequenceParallelAttention

log = logging.getLogger("lipforcing")


def flow_step(
    x: torch.Tensor,  # [B, C, F, h, w] input of the call
    flow: torch.Tensor,  # [B, C, F, h, w] network output
    t: float,
    t_next: float | None = None,
    eps: torch.Tensor | None = None,  # [B, C, F, h, w] noise of the re-noise step
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x0 = x - t * flow and, for a following call, x' = (1 - t_next) x0 + t_next eps; in float64 like the
    released code, returned in float32. Returns (x0, x' or None)."""
    x0 = (x.double() - t * flow.double()).float()
    if t_next is None:
        return x0, None
    return x0, ((1 - t_next) * x0.double() + t_next * eps.double()).float()


@dataclass
class ChunkOutput:
    """Everything one chunk produced; every latent is [B, out_dim, chunk_frames, h, w]."""

    start: int
    """First absolute latent frame of the chunk."""
    x0: torch.Tensor
    """Final clean latent (x0 of the last denoising call)."""
    x0_steps: list[torch.Tensor]
    """x0 of each denoising call."""
    xt_steps: list[torch.Tensor]
    """Input latent of each denoising call."""
    flows: list[torch.Tensor]
    """Raw network output of each denoising call."""


class StreamingSampler:
    """Runs the causal student chunk by chunk against its sink+window cache."""

    def __init__(
        self,
        model: CausalWanStudent,
        stream: StreamConfig,
        *,
        batch: int = 1,
        backend: str | None = None,
        seed: int | None = 0,
        keep_intermediates: bool = False,
        parallel: SequenceParallel | None = None,
    ) -> None:
        self.model, self.stream = model, stream
        cfg = model.cfg
        self.device = model.patch_embedding.weight.device
        self.backend = resolve_backend(backend, self.device, model=model.cfg, stream=stream, dtype=model.dtype)
        log.info("lipforcing: attention backend %s on %s (%s)", self.backend, self.device, model.dtype)
        # parallel: this process is one rank of the stream; its cache holds num_heads / N heads (dit/parallel.py)
        self.parallel = parallel
        heads = cfg.num_heads
        if parallel is not None:
            parallel.check(cfg.num_heads, tokens_per_frame(cfg, stream))
            heads //= parallel.size
        self.cache = SinkWindowCache(cfg, stream, batch=batch, device=self.device, dtype=model.dtype,
                                     kv_fp8=model.fp8, heads=heads)
        self.rope = RopeTable(cfg, stream, self.device)
        self.seed = seed
        self.generator = torch.Generator(device=self.device) if seed is not None else None
        self.cuda_graphs = False
        self.keep_intermediates = keep_intermediates
        self.clip: ClipConditioning | None = None
        self.batch = batch

    def start_clip(
        self,
        text_context: torch.Tensor,  # [B, text_len, text_dim]
        audio_emb: torch.Tensor | None,  # [B, V, audio_dim], V = 1 + 4(L-1); None: codes given per chunk (live)
        ref_latent: torch.Tensor,  # [B, 16, 1, h, w]
        mask_latent: torch.Tensor,  # [B, 1, 1, h, w], 1 = mouth
    ) -> None:
        """Compute the per-clip conditioning and empty the cache."""
        h, w = self.stream.latent_h, self.stream.latent_w
        for name, x in (("ref_latent", ref_latent), ("mask_latent", mask_latent)):
            if tuple(x.shape[-2:]) != (h, w):
                raise ValueError(f"{name} is {tuple(x.shape[-2:])} latents; the stream is configured for {(h, w)}")
        dev = self.device
        audio = None if audio_emb is None else audio_emb.to(dev, self.model.dtype)
        self.clip = self.model.prepare_clip(text_context.to(dev, self.model.dtype), audio)
        self.ref_latent = ref_latent.to(dev, torch.float32)
        self.mask_latent = mask_latent.to(dev, torch.float32)
        self.cache.reset()
        self.next_frame = 0
        if self.generator is not None:
            self.generator.manual_seed(self.seed)

    @torch.no_grad()
    def warm_up(self, text_context: torch.Tensor | None = None) -> float:
        """Run a dummy clip through every window shape (the same API as ``StaticStudent``): the Triton backend's
        autotuning and first compiles happen here, not in the first real chunks. The clip and cache are reset
        after it (``start_clip`` before the next chunk). Returns the seconds it took."""
        began = time.perf_counter()
        cfg, dev = self.model.cfg, self.device
        c = self.stream.chunk_frames
        latents = len(window_shape_plans(self.stream)) * c
        h, w = self.stream.latent_h, self.stream.latent_w
        if text_context is None:
            text_context = torch.zeros(1, cfg.text_len, cfg.text_dim, device=dev)
        b = self.batch
        self.start_clip(
            text_context.expand(b, -1, -1),
            torch.zeros(b, 1 + cfg.audio_frames_per_latent * (latents - 1), cfg.audio_dim, device=dev),
            torch.zeros(b, cfg.out_dim, 1, h, w, device=dev), torch.zeros(b, 1, 1, h, w, device=dev),
        )
        lat = torch.zeros(b, cfg.out_dim, c, h, w, device=dev)
        for _ in range(latents // c):
            self.denoise_chunk(lat, lat)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        self.clip = None
        self.cache.reset()
        self.next_frame = 0
        return time.perf_counter() - began

    @torch.no_grad()
    def run_chunk(
        self, masked_video: torch.Tensor, ref_sequence: torch.Tensor, codes: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Denoise and commit the next chunk; returns its clean latent [B, 16, C, h, w] (the static student's
        interface). codes: [B, C, audio_hidden], the chunk's audio codes when the clip has none (live audio)."""
        return self.denoise_chunk(masked_video, ref_sequence, codes=codes).x0

    @property
    def num_latent_frames(self) -> int | None:
        """Latent frames the clip's audio covers (None: live audio, unbounded)."""
        if self.clip is None:
            raise RuntimeError("start_clip() first")
        return None if self.clip.audio_codes is None else self.clip.audio_codes.shape[1]

    def _inputs(self, x: torch.Tensor, masked: torch.Tensor, ref_seq: torch.Tensor) -> torch.Tensor:
        """The 65 input channels [B, 65, C, h, w] (SPEC §3)."""
        return input_channels(x, self.ref_latent, self.mask_latent, masked, ref_seq)

    def _call(self, x_in: torch.Tensor, t: float, start: int, plan, write: bool, codes=None) -> torch.Tensor:
        ctx = StreamingAttention(self.cache, plan, self.rope, write=write, backend=self.backend)
        if self.parallel is not None:
            ctx = SequenceParallelAttention(ctx, self.parallel, self.cache.tokens_per_frame)
        return self.model(x_in, torch.tensor(t, dtype=torch.float64), self.clip, ctx, start_frame=start, codes=codes)

    @torch.no_grad()
    def denoise_chunk(
        self,
        masked_video: torch.Tensor,  # [B, 16, C, h, w] masked-video latents of the chunk's frames
        ref_sequence: torch.Tensor,  # [B, 16, C, h, w] unmasked source latents of the chunk's frames
        noise: torch.Tensor | None = None,  # [B, 16, C, h, w] initial noise
        renoise: list[torch.Tensor] | None = None,  # one [B, 16, C, h, w] per re-noise step
        codes: torch.Tensor | None = None,  # [B, C, audio_hidden] the chunk's audio codes (live audio)
    ) -> ChunkOutput:
        """Denoise the next chunk (two calls), commit it to the cache and return its clean latent."""
        if self.clip is None:
            raise RuntimeError("start_clip() before denoise_chunk()")
        start, c = self.next_frame, self.stream.chunk_frames
        total = self.num_latent_frames
        if codes is None and total is None:
            raise ValueError("the clip has no audio codes (live audio): pass each chunk's codes")
        if codes is None and start + c > total:
            raise ValueError(f"the clip has {total} latent frames; chunk at {start} runs past it")
        if codes is not None:
            codes = codes.to(self.device, torch.float32)
        if masked_video.shape[2] != c or ref_sequence.shape[2] != c:
            raise ValueError(f"a chunk is {c} latent frames; got {masked_video.shape[2]} and {ref_sequence.shape[2]}")
        masked = masked_video.to(self.device)
        ref_seq = ref_sequence.to(self.device)
        shape = (self.batch, self.model.cfg.out_dim, c, self.stream.latent_h, self.stream.latent_w)
        x = self._noise(shape) if noise is None else noise.to(self.device, torch.float32)
        plan = self.cache.begin_chunk(start)
        t_list = self.stream.t_list
        x0_steps, xt_steps, flows = [], [], []
        for i, t in enumerate(t_list):
            flow = self._call(self._inputs(x, masked, ref_seq), t, start, plan, write=False, codes=codes)
            last = i + 1 == len(t_list)
            eps = None
            if not last:
                eps = self._noise(shape) if renoise is None else renoise[i].to(self.device, torch.float32)
            if self.keep_intermediates:
                xt_steps.append(x)
                flows.append(flow)
            x0, x = flow_step(x, flow, t, None if last else t_list[i + 1], eps)
            if self.keep_intermediates:
                x0_steps.append(x0)
        self._call(self._inputs(x0, masked, ref_seq), self.stream.commit_t, start, plan, write=True, codes=codes)
        self.cache.commit()
        self.next_frame = start + c
        return ChunkOutput(start=start, x0=x0, x0_steps=x0_steps, xt_steps=xt_steps, flows=flows)

    def _noise(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator, device=self.device, dtype=torch.float32)

    def run_clip(
        self,
        masked_video: torch.Tensor,  # [B, 16, L, h, w]
        ref_sequence: torch.Tensor,  # [B, 16, L, h, w]
        noise: torch.Tensor | None = None,  # [B, 16, L, h, w]
        renoise: list[torch.Tensor] | None = None,  # per step, [B, 16, L, h, w]
    ) -> list[ChunkOutput]:
        """Convenience loop over a whole clip of latents; ``start_clip`` first."""
        c = self.stream.chunk_frames
        outs = []
        for s in range(0, self.num_latent_frames, c):
            sl = slice(s, s + c)
            outs.append(
                self.denoise_chunk(
                    masked_video[:, :, sl], ref_sequence[:, :, sl],
                    None if noise is None else noise[:, :, sl],
                    None if renoise is None else [r[:, :, sl] for r in renoise],
                )
            )
        return outs
