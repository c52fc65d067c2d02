"""Static-buffer scheduler: the student's chunk over preallocated buffers, CUDA graphs, stream pipelining.

    student = StaticStudent(model, stream, cuda_graphs=True)     # every buffer allocated here, once
    student.start_clip(text_context, audio_emb, ref_latent, mask_latent)
    x0 = student.run_chunk(masked, ref_seq)                       # a static buffer, valid until the next call

    pipe = ChunkPipeline(student, encode=..., decode=...)
    for frames in pipe.run(pixel_chunks): ...                    # encode b+1 | DiT b | decode b-1 overlap

``StaticStudent`` computes exactly what ``StreamingSampler`` computes (same noise order, same math) but
everything a chunk touches lives in buffers made at construction: the 65-channel input, the noise, the
x0 output, the audio codes of the chunk, the text K/V, the time modulations of the three calls (they
depend only on t, so they are computed once) and the KV cache. On CUDA the whole chunk (two denoising
calls, the x0/re-noise updates and the commit call) is captured as one CUDA graph per window shape
(chunk 0, chunk 1, steady state) after an eager warm-up run of that shape, then replayed.

``ChunkPipeline`` runs the encoder, the student and the decoder on three CUDA streams ordered by events,
so that encoding chunk b+1 and decoding chunk b-1 overlap the student's work on chunk b. The only host
synchronisation is waiting for a decoded chunk before handing its frames to the caller, one chunk behind
the GPU. On a CPU the same code runs sequentially.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from .attention import RopeTable, StreamingAttention, resolve_backend
from .cache import ChunkPlan, SinkWindowCache
from .config import StreamConfig
from .model import CausalWanStudent
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
    ) -> None:
        cfg = model.cfg
        self.model, self.stream, self.batch = model, stream, batch
        self.device = model.patch_embedding.weight.device
        self.backend = resolve_backend(backend, self.device)
        self.cuda_graphs = (self.device.type == "cuda") if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        log.info("lipforcing: static scheduler, backend %s, CUDA graphs %s", self.backend, self.cuda_graphs)
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
        self.generator = torch.Generator(device=dev).manual_seed(seed) if seed is not None else None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._graph_pool = None
        self.audio_codes: torch.Tensor | None = None
        self.next_frame = 0

    @torch.no_grad()
    def start_clip(
        self,
        text_context: torch.Tensor,  # [B, text_len, text_dim]
        audio_emb: torch.Tensor,  # [B, V, audio_dim]
        ref_latent: torch.Tensor,  # [B, 16, 1, h, w]
        mask_latent: torch.Tensor,  # [B, 1, 1, h, w]
    ) -> None:
        dev, dt = self.device, self.model.dtype
        clip = self.model.prepare_clip(text_context.to(dev, dt), audio_emb.to(dev, dt))
        for (k_static, v_static), (k, v) in zip(self.text_kv, clip.text_kv):
            if k.shape != k_static.shape:
                raise ValueError(f"text K/V {tuple(k.shape)} do not fit the scheduler's {tuple(k_static.shape)}")
            k_static.copy_(k)
            v_static.copy_(v)
        self.audio_codes = clip.audio_codes  # [B, L, hidden]: small, sliced into self.codes per chunk
        o = self.model.cfg.out_dim
        self.x_in[:, o : 2 * o].copy_(ref_latent.to(dev).expand_as(self.x_in[:, o : 2 * o]))
        self.x_in[:, 2 * o : 2 * o + 1].copy_(mask_latent.to(dev).expand_as(self.x_in[:, 2 * o : 2 * o + 1]))
        self.cache.reset()
        self.next_frame = 0

    @property
    def num_latent_frames(self) -> int:
        if self.audio_codes is None:
            raise RuntimeError("start_clip() first")
        return self.audio_codes.shape[1]

    def _call(self, plan: ChunkPlan, step: int, write: bool, tokens: bool = False) -> torch.Tensor:
        e, e0 = self.modulations[step]
        ctx = StreamingAttention(self.cache, plan, self.rope, write=write, backend=self.backend)
        return self.model.forward_static(self.x_in, e, e0, self.codes, self.text_kv, ctx, tokens=tokens)

    def _flow_step(self, plan: ChunkPlan, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One denoising call and its update: (x0, the re-noised input of the next call or None)."""
        t_list = self.stream.t_list
        t_next = t_list[i + 1] if i + 1 < len(t_list) else None
        t = t_list[i]
        if self.backend == "triton":  # x0 and the re-noise read the head's tokens in one fused pass (fp32)
            from ..kernels import ops

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
        if not self.cuda_graphs:
            self._chunk_body(plan)
        elif plan.num_cached in self.graphs:
            self.graphs[plan.num_cached].replay()
        else:
            self._chunk_body(plan)  # eager warm-up of this window shape (also compiles/tunes kernels)
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
        with torch.cuda.graph(graph, pool=self._graph_pool):
            self._chunk_body(plan)
        self._graph_pool = graph.pool()
        self.graphs[plan.num_cached] = graph
        log.info("lipforcing: captured the chunk graph for %d cached frames", plan.num_cached)


@dataclass
class PipelineStats:
    chunks: int = 0
    frames: int = 0


class _Streams:
    """Three CUDA streams and per-chunk events; no-ops on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.encode, self.dit, self.decode = (torch.cuda.Stream(device) for _ in range(3))

    def on(self, name: str):
        return torch.cuda.stream(getattr(self, name)) if self.cuda else contextlib.nullcontext()

    def event(self, name: str):
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(getattr(self, name))
        return ev

    def wait(self, name: str, event) -> None:
        if event is not None:
            getattr(self, name).wait_event(event)


class ChunkPipeline:
    """encode(b+1) | student(b) | decode(b-1) on separate CUDA streams, ordered by events.

    ``encode(pixels) -> (masked_latents, ref_latents)`` each [B, 16, C, h, w], ``decode(x0) -> frames``
    (any tensor); both keep their own causal state and run on their streams. Yields each chunk's decoded
    output moved to the host, in order.
    """

    def __init__(
        self,
        student: StaticStudent,
        encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
        decode: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        self.student, self.encode, self.decode = student, encode, decode
        self.streams = _Streams(student.device)
        self.x0_slots = [torch.zeros_like(student.x0) for _ in range(2)]  # double-buffered student output
        self.stats = PipelineStats()

    @torch.no_grad()
    def run(self, pixel_chunks: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        s, dev = self.streams, self.student.device
        pending: list[tuple[torch.Tensor, object]] = []  # decoded chunks not yet handed to the host
        slot_free = [None, None]  # event: decode of the chunk that last used this x0 slot is done
        for b, pixels in enumerate(pixel_chunks):
            with s.on("encode"):
                masked, ref_seq = self.encode(pixels.to(dev, non_blocking=True))
                encoded = s.event("encode")
            with s.on("dit"):
                s.wait("dit", encoded)
                if s.cuda:
                    masked.record_stream(s.dit)
                    ref_seq.record_stream(s.dit)
                x0 = self.student.run_chunk(masked, ref_seq)
                s.wait("dit", slot_free[b % 2])
                slot = self.x0_slots[b % 2]
                slot.copy_(x0)
                denoised = s.event("dit")
            with s.on("decode"):
                s.wait("decode", denoised)
                frames = self.decode(slot)
                host = frames.to("cpu", non_blocking=s.cuda)
                done = s.event("decode")
                slot_free[b % 2] = done
            pending.append((host, done))
            if len(pending) > 1:  # hand over chunk b-1 while the GPU works on chunk b
                yield self._finish(*pending.pop(0))
        for item in pending:
            yield self._finish(*item)

    def _finish(self, host: torch.Tensor, done) -> torch.Tensor:
        if done is not None:
            done.synchronize()
        self.stats.chunks += 1
        self.stats.frames += host.shape[0] if host.dim() == 4 else host.shape[1]
        return host
