"""Sink + rolling-window KV cache of the causal student (SPEC §5).

One buffer per K and V, allocated once: [num_layers, B, capacity, tokens_per_frame, H, D]. Slots are kept
in *window order*: slot i holds the i-th visible frame, so the dynamic-RoPE temporal position of a cached
key is simply its slot index. Keys are stored raw (after W_k and RMSNorm, before RoPE).

The cache holds only what a *next* chunk can see: ``capacity`` = the most cached frames any chunk attends
to (window - chunk = 4 for the released sink 1 + window 7 with 3-frame chunks), not the whole window. The
chunk being denoised is never staged in the cache: attention reads [cached slots, the chunk's live K/V].
The commit call (t = 0) writes the chunk's frames, per layer *after* that layer's attention has read the
old ones, straight into the slots the next chunk will read them from, and moves any kept older frame
left. So the layout is always ready for the next chunk, with no eviction pass in between, and the 14B
cache is 3.4 GB instead of 5.9 GB at 512x512 in bf16 (1.7 GB with ``kv_fp8``: e4m3 values and one float32
scale per layer, row, frame and head, set when the commit writes the frame).

    cache = SinkWindowCache(model_cfg, stream_cfg, batch=1, device=..., dtype=...)
    plan = cache.begin_chunk(start_frame)   # which frames are cached, and where the commit puts the chunk
    ... two denoising calls read the cache; the commit call writes it layer by layer ...
    cache.commit()                          # record the new layout

Nothing is allocated after construction, no tensor is concatenated and no host synchronisation happens:
the plan is pure host arithmetic on frame indices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig, StreamConfig, tokens_per_frame
from .fp8 import E4M3, quantize


@dataclass(frozen=True)
class ChunkPlan:
    """Which latent frames a chunk sees, at which positions, and how its commit rewrites the cache (host-side
    arithmetic on frame indices, no tensors)."""

    start: int
    """First absolute latent frame of the chunk."""
    cached_frames: tuple[int, ...]
    """Absolute latent frames visible from the cache, in window (slot) order."""
    chunk_frames: int
    """Frames in the chunk."""
    kept_slots: tuple[int, ...] = ()
    """Slots of the cached frames the next chunk still sees, in window order: the commit moves them to
    slots 0, 1, ... (never rightwards, so moves applied in order never overwrite a pending source)."""
    kept_chunk: tuple[int, int] = (0, 0)
    """(first chunk frame, count): the chunk's own frames the next chunk sees (its most recent ones); the
    commit stores them right after the kept cached frames."""

    @property
    def num_cached(self) -> int:
        return len(self.cached_frames)

    @property
    def key_frames(self) -> tuple[int, ...]:
        """Every frame the chunk attends to, in window order (cache then the chunk itself)."""
        return self.cached_frames + tuple(range(self.start, self.start + self.chunk_frames))

    @property
    def cache_positions(self) -> tuple[int, ...]:
        """Temporal RoPE positions of the cached frames: their slots, 0 .. num_cached - 1."""
        return tuple(range(self.num_cached))

    @property
    def query_positions(self) -> tuple[int, ...]:
        """Temporal RoPE positions of the chunk's frames (the slots right after the cached ones)."""
        return tuple(range(self.num_cached, self.num_cached + self.chunk_frames))

    @property
    def commit_moves(self) -> tuple[tuple[int, int], ...]:
        """(source slot, destination slot) of the kept cached frames that change slot."""
        return tuple((src, dst) for dst, src in enumerate(self.kept_slots) if src != dst)

    @property
    def shape_key(self) -> tuple:
        """Everything the device work of the chunk depends on besides data: equal keys, equal kernels
        (one CUDA graph or compiled call per key; three for the released window)."""
        return (self.num_cached, self.kept_slots, self.kept_chunk)


def visible_cached_frames(start: int, stream: StreamConfig) -> tuple[int, ...]:
    """Frames before ``start`` that a chunk starting at ``start`` attends to (SPEC §5).

    The first ``sink_frames`` frames of the clip are always visible; of the rest, the most recent ones
    are visible such that at most ``window_frames - sink_frames`` non-sink frames are seen, the chunk's
    own frames included.
    """
    sink, chunk = stream.sink_frames, stream.chunk_frames
    rolling_capacity = stream.window_frames - sink
    sinks = tuple(range(min(sink, start)))
    chunk_rolling = chunk - max(0, min(sink, start + chunk) - start)  # the chunk's own non-sink frames
    first_rolling = max(sink, start - (rolling_capacity - chunk_rolling))
    return sinks + tuple(range(first_rolling, start))


def cache_capacity(stream: StreamConfig) -> int:
    """Most cached frames any chunk attends to (the visibility pattern is periodic once the window is full)."""
    c = stream.chunk_frames
    horizon = stream.window_frames + stream.sink_frames + 2 * c
    return max(len(visible_cached_frames(s, stream)) for s in range(0, horizon + 1, c))


def plan_chunk(start: int, stream: StreamConfig) -> ChunkPlan:
    """The plan of the chunk at ``start``: its cached frames and where its commit writes for the next chunk."""
    c = stream.chunk_frames
    cached = visible_cached_frames(start, stream)
    after = visible_cached_frames(start + c, stream)
    kept_slots = tuple(cached.index(f) for f in after if f < start)
    kept_new = [f - start for f in after if f >= start]
    return ChunkPlan(start=start, cached_frames=cached, chunk_frames=c, kept_slots=kept_slots,
                     kept_chunk=(kept_new[0] if kept_new else c, len(kept_new)))


def window_shape_plans(stream: StreamConfig) -> list[ChunkPlan]:
    """One plan per distinct window shape, in clip order (chunk 0, chunk 1, steady state, ...): the chunks a
    warm-up runs so that every shape's kernels are tuned and its graphs captured before real work."""
    plans, seen, start = [], set(), 0
    c = stream.chunk_frames
    while start <= stream.window_frames + stream.sink_frames + 2 * c:
        plan = plan_chunk(start, stream)
        if plan.shape_key not in seen:
            seen.add(plan.shape_key)
            plans.append(plan)
        start += c
    return plans


class SinkWindowCache:
    """Preallocated raw-K / V cache for every layer, kept in window order for the next chunk."""

    def __init__(
        self,
        model: ModelConfig,
        stream: StreamConfig,
        *,
        batch: int = 1,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        kv_fp8: bool = False,
        heads: int | None = None,
    ) -> None:
        self.model, self.stream = model, stream
        self.dtype = dtype  # of the K/V the model makes and reads (the stored values are e4m3 with kv_fp8)
        self.tokens_per_frame = tokens_per_frame(model, stream)
        self.capacity = cache_capacity(stream)
        heads = model.num_heads if heads is None else heads  # fewer: this rank's heads (parallel.py)
        shape = (model.num_layers, batch, self.capacity, self.tokens_per_frame, heads, model.head_dim)
        stored = E4M3 if kv_fp8 else dtype
        self.k = torch.zeros(shape, device=device, dtype=stored)  # [layers, B, capacity, tokens, H, D]
        self.v = torch.zeros(shape, device=device, dtype=stored)
        # kv_fp8: one float32 scale per (layer, row, slot, head) for K and for V: [2, layers, B, capacity, H]
        self.scales = torch.ones((2, *shape[:3], shape[4]), device=device) if kv_fp8 else None
        self.frames: tuple[int, ...] = ()  # absolute latent frame in each filled slot
        self.plan: ChunkPlan | None = None

    @property
    def fp8(self) -> bool:
        """Whether K and V are stored in e4m3 with per-frame, per-head scales."""
        return self.scales is not None

    def rows(self, start: int, stop: int) -> SinkWindowCache:
        """A cache over batch rows [start, stop) of this one: the same memory, its own bookkeeping (the static
        scheduler gives every session a row and runs sessions with equal plans as one batch)."""
        view = object.__new__(SinkWindowCache)
        view.model, view.stream = self.model, self.stream
        view.tokens_per_frame, view.capacity, view.dtype = self.tokens_per_frame, self.capacity, self.dtype
        view.k, view.v = self.k[:, start:stop], self.v[:, start:stop]
        view.scales = None if self.scales is None else self.scales[:, :, start:stop]
        view.frames, view.plan = (), None
        return view

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + (0 if self.scales is None else self.scales.nbytes)

    def reset(self) -> None:
        """Forget every cached frame (the buffers are kept)."""
        self.frames, self.plan = (), None

    def begin_chunk(self, start: int) -> ChunkPlan:
        """The plan of the chunk at ``start``; the previous commit already put its frames in place."""
        plan = plan_chunk(start, self.stream)
        if self.frames != plan.cached_frames:
            missing = [f for f in plan.cached_frames if f not in self.frames]
            detail = f"needs frames {missing} that were never committed" if missing else \
                f"expects the cache to hold {plan.cached_frames}, it holds {self.frames}"
            raise RuntimeError(f"chunk at frame {start} {detail} (chunks must be run in order)")
        self.plan = plan
        return plan

    def commit(self) -> None:
        """Record that the commit call wrote the current chunk's frames into the slots of the next plan."""
        if self.plan is None:
            raise RuntimeError("commit() without begin_chunk()")
        plan = self.plan
        first, count = plan.kept_chunk
        kept_old = tuple(plan.cached_frames[src] for src in plan.kept_slots)
        self.frames = kept_old + tuple(range(plan.start + first, plan.start + first + count))
        self.plan = None

    def cached(self, layer: int, plan: ChunkPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) of one layer's cached frames, each [B, num_cached * tokens, H, D] in ``dtype``: views of the
        cache, or with kv_fp8 new dequantised tensors (``read_into`` fills preallocated ones instead)."""
        n = plan.num_cached
        if self.scales is None:
            return self.k[layer][:, :n].flatten(1, 2), self.v[layer][:, :n].flatten(1, 2)
        k = torch.empty(self.k[layer][:, :n].shape, dtype=self.dtype, device=self.k.device)
        v = torch.empty_like(k)
        self.read_into(layer, plan, k.flatten(1, 2), v.flatten(1, 2))
        return k.flatten(1, 2), v.flatten(1, 2)

    def raw(self, layer: int, plan: ChunkPlan) -> tuple[torch.Tensor, ...]:
        """What the fused attention kernel reads in place: (k, v) views [B, num_cached * tokens, H, D] as stored,
        and with kv_fp8 their scales [B, num_cached, H] (K's, V's)."""
        n = plan.num_cached
        views = (self.k[layer][:, :n].flatten(1, 2), self.v[layer][:, :n].flatten(1, 2))
        if self.scales is None:
            return views
        return (*views, self.scales[0, layer][:, :n], self.scales[1, layer][:, :n])

    def read_into(self, layer: int, plan: ChunkPlan, k_out: torch.Tensor, v_out: torch.Tensor) -> None:
        """Copy one layer's cached frames, dequantised to ``dtype``, into k_out / v_out [B, num_cached * tokens,
        H, D] (no new tensor: graph-safe)."""
        n, t = plan.num_cached, self.tokens_per_frame
        for which, (stored, out) in enumerate(((self.k, k_out), (self.v, v_out))):
            frames = out.unflatten(1, (n, t))  # [B, n, tokens, H, D]
            frames.copy_(stored[layer][:, :n])
            if self.scales is not None:
                frames.mul_(self.scales[which, layer][:, :n, None, :, None])

    def write_layer(self, layer: int, plan: ChunkPlan, k: torch.Tensor, v: torch.Tensor) -> None:
        """The commit of one layer, after its attention read the old layout: move the kept cached frames left
        and store the chunk's kept frames. k, v: [B, chunk_frames * tokens, H, D], the chunk's raw K/V."""
        for which, (cache, live) in enumerate(((self.k[layer], k), (self.v[layer], v))):  # [B, capacity, tokens, H, D]
            scales = None if self.scales is None else self.scales[which, layer]  # [B, capacity, H]
            for src, dst in plan.commit_moves:
                cache[:, dst].copy_(cache[:, src])
                if scales is not None:
                    scales[:, dst].copy_(scales[:, src])
            first, count = plan.kept_chunk
            slot = len(plan.kept_slots)
            if count:
                t = self.tokens_per_frame
                frames = live[:, first * t : (first + count) * t].unflatten(1, (count, t))
                if scales is None:
                    cache[:, slot : slot + count].copy_(frames)
                else:  # one scale per frame and head: absmax over the frame's tokens and the head dim
                    q, scale = quantize(frames, dim=(2, 4))  # [B, count, tokens, H, D], [B, count, 1, H, 1]
                    cache[:, slot : slot + count].copy_(q)
                    scales[:, slot : slot + count].copy_(scale[:, :, 0, :, 0])

