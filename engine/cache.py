"""Sink + rolling-window KV cache of the causal student (SPEC §5).

One buffer per K and V, allocated once: [num_layers, B, window_frames * tokens_per_frame, H, D]. Slots
are kept in *window order*: slot i holds the i-th visible frame, so the dynamic-RoPE temporal position of
a cached key is simply its slot's frame index, and the chunk being denoised occupies the slots right
after the cached ones. Keys are stored raw (after W_k and RMSNorm, before RoPE).

    cache = SinkWindowCache(model_cfg, stream_cfg, batch=1, device=..., dtype=...)
    plan = cache.begin_chunk(start_frame)   # evicts (moves frames left, in place) and returns the plan
    ... denoising calls attend to cache prefix + live K/V; the commit call writes the live K/V ...
    cache.commit()                          # marks the chunk's frames as cached

Nothing is allocated after construction, no tensor is concatenated and no host synchronisation happens:
the plan is pure host arithmetic on frame indices, and eviction is a few in-place frame copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig, StreamConfig, tokens_per_frame


@dataclass(frozen=True)
class ChunkPlan:
    """Which latent frames a chunk sees and at which temporal positions (host-side, no tensors)."""

    start: int
    """First absolute latent frame of the chunk."""
    cached_frames: tuple[int, ...]
    """Absolute latent frames visible from the cache, in window (slot) order."""
    chunk_frames: int
    """Frames in the chunk."""

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
        """Temporal RoPE positions of the chunk's frames (its own slots)."""
        return tuple(range(self.num_cached, self.num_cached + self.chunk_frames))


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


class SinkWindowCache:
    """Preallocated raw-K / V cache for every layer, kept in window order."""

    def __init__(
        self,
        model: ModelConfig,
        stream: StreamConfig,
        *,
        batch: int = 1,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.model, self.stream = model, stream
        self.tokens_per_frame = tokens_per_frame(model, stream)
        shape = (model.num_layers, batch, stream.window_frames, self.tokens_per_frame, model.num_heads, model.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # [layers, B, W, tokens, H, D]
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.frames: tuple[int, ...] = ()  # absolute latent frame in each filled slot
        self.plan: ChunkPlan | None = None

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def reset(self) -> None:
        """Forget every cached frame (the buffers are kept)."""
        self.frames, self.plan = (), None

    def begin_chunk(self, start: int) -> ChunkPlan:
        """Evict what the chunk at ``start`` no longer sees and return its plan."""
        wanted = visible_cached_frames(start, self.stream)
        missing = [f for f in wanted if f not in self.frames]
        if missing:
            raise RuntimeError(f"chunk at frame {start} needs frames {missing} that were never committed")
        for dst, frame in enumerate(wanted):
            src = self.frames.index(frame)
            if src != dst:  # dst < src always: a left-to-right copy never overwrites a pending source
                self.k[:, :, dst].copy_(self.k[:, :, src])
                self.v[:, :, dst].copy_(self.v[:, :, src])
        self.frames = wanted
        self.plan = ChunkPlan(start=start, cached_frames=wanted, chunk_frames=self.stream.chunk_frames)
        return self.plan

    def commit(self) -> None:
        """Record that the commit call wrote the current chunk's frames into their slots."""
        if self.plan is None:
            raise RuntimeError("commit() without begin_chunk()")
        self.frames = self.plan.key_frames
        self.plan = None

    def layer_views(self, layer: int, plan: ChunkPlan) -> tuple[torch.Tensor, ...]:
        """(k_cached, v_cached, k_chunk, v_chunk) views of one layer, each [B, frames * tokens, H, D]."""
        n, c = plan.num_cached, plan.chunk_frames
        k, v = self.k[layer], self.v[layer]  # [B, W, tokens, H, D]

        def flat(t: torch.Tensor) -> torch.Tensor:
            return t.flatten(1, 2)

        return flat(k[:, :n]), flat(v[:, :n]), flat(k[:, n : n + c]), flat(v[:, n : n + c])
