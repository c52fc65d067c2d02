"""The static scheduler: the student's chunk over preallocated buffers, replayed from CUDA graphs.

    student = StaticStudent(model, stream)                        # every buffer allocated here, once
    student.warm_up()                                             # tune kernels, capture all window shapes
    student.start_clip(text_context, audio_emb, ref_latent, mask_latent)
    x0 = student.run_chunk(masked, ref_seq)                       # a static buffer, valid until the next call

``StaticStudent`` computes exactly what ``StreamingSampler`` computes (same noise order, same math) but
everything a chunk touches lives in buffers made at construction: the 65-channel input, the noise, the
x0 output, the audio codes of the chunk, the text K/V, the time modulations of the three calls (they
depend only on t, so they are computed once) and the KV cache. On CUDA the whole chunk (two denoising
calls, the x0/re-noise updates and the commit call) is captured as one CUDA graph per window shape
(chunk 0, chunk 1, steady state) after an eager run of that shape, then replayed.

``compile=True`` puts each call (the denoising calls and the commit call) under ``torch.compile``, once per
window shape: the layer loop, the plan and the cache slots are constants of the compiled function, so the
number of compilations is bounded by shapes x call kinds whatever the clip length.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from ..dit.attention import RopeTable, StreamingAttention, resolve_backend
from ..dit.cache import ChunkPlan, SinkWindowCache, plan_chunk
from ..dit.config import StreamConfig
from ..dit.model import CausalWanStudent
from .sampler import flow_step

log = logging.getLogger("lipforcing")


class StaticStudent:
    """The student's per-chunk work over static buffers, optionally replayed from CUDA graphs."""

    def __init__(
        self,
        model: CausalWanStudent,
        stream: StreamConfig,
        *,
        batch: int = 1,
        backend: str | None = None,
        seed: int | None = 0,
        cuda_graphs: bool | None = None,
        compile: bool = False,
        compile_backend: str = "inductor",
    ) -> None:
        cfg = model.cfg
        self.model, self.stream, self.batch = model, stream, batch
        self.device = model.patch_embedding.weight.device
        self.backend = resolve_backend(backend, self.device)
        self.cuda_graphs = (self.device.type == "cuda") if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.compile, self.compile_backend = compile, compile_backend
        log.info("lipforcing: static scheduler, backend %s, CUDA graphs %s, torch.compile %s", self.backend,
                 self.cuda_graphs, compile)
        c, h, w, dev = stream.chunk_frames, stream.latent_h, stream.latent_w, self.device
        lat = (batch, cfg.out_dim, c, h, w)
        self.cache = SinkWindowCache(cfg, stream, batch=batch, device=dev, dtype=model.dtype)
        self.rope = RopeTable(cfg, stream, dev)
        self.x_in = torch.zeros(batch, cfg.in_dim, c, h, w, device=dev)  # [B, 65, C, h, w]
        self.noise = torch.zeros(lat, device=dev)
        self.renoise = [torch.zeros(lat, device=dev) for _ in stream.t_list[1:]]
        self.x0 = torch.zeros(lat, device=dev)
        self.codes = torch.zeros(batch, c, cfg.audio_hidden, device=dev)
        self.text_kv = [
            (torch.zeros(batch, cfg.text_len, cfg.num_heads, cfg.head_dim, device=dev, dtype=model.dtype),
             torch.zeros(batch, cfg.text_len, cfg.num_heads, cfg.head_dim, device=dev, dtype=model.dtype))
            for _ in range(cfg.num_layers)
        ]
        with torch.no_grad():
            self.modulations = [model.time_modulation(t, batch) for t in (*stream.t_list, stream.commit_t)]
        self.seed = seed
        self.generator = torch.Generator(device=dev) if seed is not None and dev.type != "meta" else None
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._graph_pool = None
        self._compiled: dict[tuple, Callable] = {}
        self.audio_codes: torch.Tensor | None = None
        self._text: torch.Tensor | None = None  # the text whose K/V the buffers hold
        self.next_frame = 0

    @torch.no_grad()
    def start_clip(
        self,
        text_context: torch.Tensor,  # [B, text_len, text_dim]
        audio_emb: torch.Tensor,  # [B, V, audio_dim]
        ref_latent: torch.Tensor,  # [B, 16, 1, h, w]
        mask_latent: torch.Tensor,  # [B, 1, 1, h, w]
    ) -> None:
        """Per-clip conditioning into the static buffers; empties the cache and reseeds the noise. The text K/V
        are computed only when the text differs from the last clip's (the released model's never does)."""
        dev, dt = self.device, self.model.dtype
        self.set_text(text_context)
        self.audio_codes = self.model.audio_proj(audio_emb.to(dev, dt))  # [B, L, hidden], sliced per chunk
        o = self.model.cfg.out_dim
        self.x_in[:, o : 2 * o].copy_(ref_latent.to(dev).expand_as(self.x_in[:, o : 2 * o]))
        self.x_in[:, 2 * o : 2 * o + 1].copy_(mask_latent.to(dev).expand_as(self.x_in[:, 2 * o : 2 * o + 1]))
        self.cache.reset()
        self.next_frame = 0
        if self.generator is not None:
            self.generator.manual_seed(self.seed)

    @torch.no_grad()
    def set_text(self, text_context: torch.Tensor) -> None:
        """Compute the cross-attention K/V of ``text_context`` [B, text_len, text_dim] into the static buffers,
        unless they already hold this text's."""
        if self._text is not None and self._text.shape == text_context.shape and \
                torch.equal(self._text, text_context.detach().to(self._text.device, self._text.dtype)):
            return
        dev, dt = self.device, self.model.dtype
        for (k_static, v_static), (k, v) in zip(self.text_kv, self.model.text_kv(text_context.to(dev, dt))):
            if k.shape != k_static.shape:
                raise ValueError(f"text K/V {tuple(k.shape)} do not fit the scheduler's {tuple(k_static.shape)}")
            k_static.copy_(k)
            v_static.copy_(v)
        self._text = text_context.detach().clone()

    @property
    def num_latent_frames(self) -> int:
        if self.audio_codes is None:
            raise RuntimeError("start_clip() first")
        return self.audio_codes.shape[1]

    @property
    def window_shapes(self) -> list[ChunkPlan]:
        """One plan per distinct window shape, in clip order (chunk 0, chunk 1, steady state, ...)."""
        plans, seen, start = [], set(), 0
        c = self.stream.chunk_frames
        while start <= self.stream.window_frames + self.stream.sink_frames + 2 * c:
            plan = plan_chunk(start, self.stream)
            if plan.shape_key not in seen:
                seen.add(plan.shape_key)
                plans.append(plan)
            start += c
        return plans

    @torch.no_grad()
    def warm_up(self, text_context: torch.Tensor | None = None) -> float:
        """Run a dummy clip through every window shape: Triton autotuning, torch.compile and CUDA-graph capture
        happen here instead of on the first real chunks. ``text_context`` (the text real clips will use) has its
        K/V computed here too. Returns the seconds it took. The next ``start_clip`` resets everything the dummy
        clip touched (cache, noise)."""
        began = time.perf_counter()
        cfg, dev = self.model.cfg, self.device
        shapes = self.window_shapes
        chunks = len(shapes)
        latents = chunks * self.stream.chunk_frames
        h, w = self.stream.latent_h, self.stream.latent_w
        if text_context is None:
            text_context = torch.zeros(self.batch, cfg.text_len, cfg.text_dim, device=dev)
        self.start_clip(
            text_context,
            torch.zeros(self.batch, 1 + cfg.audio_frames_per_latent * (latents - 1), cfg.audio_dim, device=dev),
            torch.zeros(self.batch, cfg.out_dim, 1, h, w, device=dev),
            torch.zeros(self.batch, 1, 1, h, w, device=dev),
        )
        lat = torch.zeros(self.batch, cfg.out_dim, self.stream.chunk_frames, h, w, device=dev)
        for _ in range(chunks):
            self.run_chunk(lat, lat)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        self.cache.reset()
        self.audio_codes = None
        seconds = time.perf_counter() - began
        log.info("lipforcing: student warmed up in %.1f s (%d window shapes, %d CUDA graphs)", seconds, chunks,
                 len(self.graphs))
        return seconds

    def _call(self, plan: ChunkPlan, step: int, write: bool, tokens: bool = False) -> torch.Tensor:
        e, e0 = self.modulations[step]
        if self.compile:
            return self._compiled_call(plan, write, tokens)(self.x_in, e, e0, self.codes)
        ctx = StreamingAttention(self.cache, plan, self.rope, write=write, backend=self.backend)
        return self.model.forward_static(self.x_in, e, e0, self.codes, self.text_kv, ctx, tokens=tokens)

    def _compiled_call(self, plan: ChunkPlan, write: bool, tokens: bool) -> Callable:
        """The network call for this window shape and call kind under torch.compile (made once)."""
        key = (plan.shape_key, write, tokens)
        if key not in self._compiled:
            ctx = StreamingAttention(self.cache, plan, self.rope, write=write, backend=self.backend)
            model, text_kv = self.model, self.text_kv

            def call(x_in, e, e0, codes):
                return model.forward_static(x_in, e, e0, codes, text_kv, ctx, tokens=tokens)

            mode = "max-autotune-no-cudagraphs" if self.device.type == "cuda" else None
            self._compiled[key] = torch.compile(call, backend=self.compile_backend, mode=mode, dynamic=False)
            log.info("lipforcing: compiling the %s call for %d cached frames", "commit" if write else "denoising",
                     plan.num_cached)
        return self._compiled[key]

    def _flow_step(self, plan: ChunkPlan, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One denoising call and its update: (x0, the re-noised input of the next call or None)."""
        t_list = self.stream.t_list
        t_next = t_list[i + 1] if i + 1 < len(t_list) else None
        t = t_list[i]
        if self.backend == "triton":  # x0 and the re-noise read the head's tokens in one fused pass (fp32)
            from ...kernels import ops

            v_tok = self._call(plan, i, write=False, tokens=True)
            if t_next is None:
                return ops.flow_update(v_tok, x, t), None
            return ops.flow_update(v_tok, x, t, t_next, self.renoise[i])
        return flow_step(x, self._call(plan, i, write=False), t, t_next, None if t_next is None else self.renoise[i])

    def _chunk_body(self, plan: ChunkPlan) -> None:
        """All device work of one chunk; reads and writes static buffers only (graph-capturable)."""
        o = self.model.cfg.out_dim
        x = self.noise
        for i in range(len(self.stream.t_list)):
            self.x_in[:, :o].copy_(x)
            x0, x = self._flow_step(plan, i, x)
        self.x0.copy_(x0)
        self.x_in[:, :o].copy_(self.x0)
        self._call(plan, len(self.stream.t_list), write=True)

    @torch.no_grad()
    def run_chunk(
        self,
        masked_video: torch.Tensor,  # [B, 16, C, h, w]
        ref_sequence: torch.Tensor,  # [B, 16, C, h, w]
        noise: torch.Tensor | None = None,  # [B, 16, C, h, w]
        renoise: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Denoise and commit the next chunk; returns ``self.x0`` (overwritten by the next call)."""
        start, c, o = self.next_frame, self.stream.chunk_frames, self.model.cfg.out_dim
        if start + c > self.num_latent_frames:
            raise ValueError(f"the clip has {self.num_latent_frames} latent frames; chunk at {start} runs past it")
        plan = self.cache.begin_chunk(start)
        self.x_in[:, 2 * o + 1 : 3 * o + 1].copy_(masked_video, non_blocking=True)
        self.x_in[:, 3 * o + 1 : 4 * o + 1].copy_(ref_sequence, non_blocking=True)
        self.codes.copy_(self.audio_codes[:, start : start + c])
        self._fill(self.noise, noise)
        for i, buf in enumerate(self.renoise):
            self._fill(buf, None if renoise is None else renoise[i])
        key = plan.shape_key
        if not self.cuda_graphs:
            self._chunk_body(plan)
        elif key in self.graphs:
            self.graphs[key].replay()
        else:
            self._chunk_body(plan)  # eager run of this window shape (also compiles/tunes kernels)
            self._capture(plan)
        self.cache.commit()
        self.next_frame = start + c
        return self.x0

    def _fill(self, buf: torch.Tensor, given: torch.Tensor | None) -> None:
        if given is None:
            buf.normal_(generator=self.generator)
        else:
            buf.copy_(given, non_blocking=True)

    def _capture(self, plan: ChunkPlan) -> None:
        """Record the chunk body for this window shape. Capture records kernels without running them,
        so the cache and outputs are not touched."""
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads' CUDA calls (a session's paste-back) stay legal while this one captures
        with torch.cuda.graph(graph, pool=self._graph_pool, capture_error_mode="thread_local"):
            self._chunk_body(plan)
        self._graph_pool = graph.pool()
        self.graphs[plan.shape_key] = graph
        log.info("lipforcing: captured the chunk graph for %d cached frames", plan.num_cached)
