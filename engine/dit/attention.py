"""Streaming self-attention: one chunk's queries against [the sink+window cache, the chunk's own live K/V].

``StreamingAttention`` implements ``AttentionContext.self_attention(layer, q, k, v)`` (q, k, v [B, L, H, D]
after RMSNorm, before RoPE) for one call of one chunk; the commit call (``write=True``) stores the chunk's
raw K/V in the cache after the layer's attention has read it (``SinkWindowCache.write_layer``).

Backends (``resolve_backend``):
    reference  RoPE in float64, then PyTorch ``scaled_dot_product_attention`` over cache + live keys
    triton     the fused sink+window attention kernel with in-register dynamic RoPE (lipforcing.kernels):
               the cache is read in place, never rotated, copied or concatenated
The override ``LIPFORCING_BACKEND=reference|triton`` wins over the default, which is ``triton`` on CUDA
when Triton is importable and ``reference`` otherwise. The engine logs which one runs.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from ...kernels.rope import apply_rope, rope_angles
from ..errors import ConfigError
from .cache import ChunkPlan, SinkWindowCache
from .config import ModelConfig, StreamConfig

log = logging.getLogger("lipforcing")

BACKENDS = ("reference", "triton")


def resolve_backend(requested: str | None, device: torch.device | str) -> str:
    """Pick the attention/kernel backend for a model on ``device``: explicit request > LIPFORCING_BACKEND >
    device default. ``triton`` is checked against ``device`` (where the tensors are), not against the host:
    a CPU model on a host with a GPU cannot run the kernels (outside the interpreter)."""
    from ...kernels import triton_available

    name = requested or os.environ.get("LIPFORCING_BACKEND") or "auto"
    device = torch.device(device)
    if name == "auto":
        name = "reference"
        if device.type == "cuda":
            ok, why = triton_available(device)
            if ok:
                name = "triton"
            else:
                log.warning("Triton kernels unavailable (%s); using the reference backend", why)
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    if name == "triton" and device.type != "meta":  # the meta device only plans memory: no kernel runs
        ok, why = triton_available(device)
        if not ok:
            raise ConfigError(f"backend 'triton' requested for a model on {device} but unavailable: {why}")
    return name


class RopeTable:
    """Rotation angles for a whole window in slot order; any chunk's keys and queries are slices of it."""

    def __init__(self, model: ModelConfig, stream: StreamConfig, device: torch.device | str) -> None:
        _, ph, pw = model.patch_size
        self.rows, self.cols = stream.latent_h // ph, stream.latent_w // pw
        self.tokens = self.rows * self.cols
        self.pairs = model.rope_pairs_thw
        self.theta = model.rope_theta
        positions = torch.arange(stream.window_frames, device=device)
        self.angles = rope_angles(positions, self.rows, self.cols, self.pairs, self.theta)  # [W*T, D/2]
        self._positions: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.device = device

    def keys(self, plan: ChunkPlan) -> torch.Tensor:
        return self.angles[: (plan.num_cached + plan.chunk_frames) * self.tokens]

    def queries(self, plan: ChunkPlan) -> torch.Tensor:
        return self.angles[plan.num_cached * self.tokens : (plan.num_cached + plan.chunk_frames) * self.tokens]

    def positions(self, plan: ChunkPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """(query, cache) temporal positions as int32 device tensors, made once per window shape."""
        key = plan.num_cached
        if key not in self._positions:
            q = torch.tensor(plan.query_positions, dtype=torch.int32, device=self.device)
            c = torch.tensor(plan.cache_positions, dtype=torch.int32, device=self.device)
            self._positions[key] = (q, c)
        return self._positions[key]


class StreamingAttention:
    """Self-attention of one call of one chunk: cached frames + the chunk's own live K/V.

    ``write=True`` (the commit call) stores the chunk's raw K/V for the next chunk, layer by layer, after
    the layer's attention has read the cache.
    """

    def __init__(
        self, cache: SinkWindowCache, plan: ChunkPlan, rope: RopeTable, *, write: bool, backend: str
    ) -> None:
        self.cache, self.plan, self.rope, self.write, self.backend = cache, plan, rope, write, backend
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")

    def self_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_cached, v_cached = self.cache.cached(layer, self.plan)
        if self.backend == "triton":
            from ...kernels import ops

            q_pos, cache_pos = self.rope.positions(self.plan)
            out = ops.attention(
                q, k, v, k_cached, v_cached, q_pos, cache_pos,
                (self.rope.rows, self.rope.cols), self.rope.pairs, self.rope.theta,
            )
        else:
            keys = torch.cat([k_cached, k], dim=1)  # [B, Lk, H, D], window order
            values = torch.cat([v_cached, v], dim=1)
            out = sdpa(apply_rope(q, self.rope.queries(self.plan)), apply_rope(keys, self.rope.keys(self.plan)),
                       values)
        if self.write:
            self.cache.write_layer(layer, self.plan, k, v)
        return out


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, L, H, D] layout around PyTorch's scaled_dot_product_attention."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return o.transpose(1, 2)
