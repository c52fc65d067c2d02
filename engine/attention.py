"""Self-attention contexts: one chunk against the sink+window cache, or a whole clip at once.

Both implement ``AttentionContext.self_attention(layer, q, k, v)`` with q, k, v [B, L, H, D] after RMSNorm
and before RoPE, so the model's blocks are the same for streaming inference and full-sequence training.

Backends (``resolve_backend``):
    reference  RoPE in float64 then PyTorch ``scaled_dot_product_attention`` (any device)
    triton     the fused sink+window attention kernel with in-register dynamic RoPE (lipforcing.kernels)
The override ``LIPFORCING_BACKEND=reference|triton`` wins over the default, which is ``triton`` on CUDA
when Triton is importable and ``reference`` otherwise. The engine logs which one runs.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from .cache import ChunkPlan, SinkWindowCache, visible_cached_frames
from .config import ModelConfig, StreamConfig
from .errors import ConfigError
from .rope import apply_rope, rope_angles

log = logging.getLogger("lipforcing")

BACKENDS = ("reference", "triton")


def resolve_backend(requested: str | None, device: torch.device | str) -> str:
    """Pick the attention/kernel backend: explicit request > LIPFORCING_BACKEND > device default."""
    name = requested or os.environ.get("LIPFORCING_BACKEND") or "auto"
    device = torch.device(device)
    if name == "auto":
        name = "reference"
        if device.type == "cuda":
            from ..kernels import triton_available

            ok, why = triton_available()
            if ok:
                name = "triton"
            else:
                log.warning("Triton kernels unavailable (%s); using the reference backend", why)
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    if name == "triton":
        from ..kernels import triton_available

        ok, why = triton_available()
        if not ok:
            raise ConfigError(f"backend 'triton' requested but unavailable: {why}")
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

    ``write=True`` (the commit call) stores the chunk's raw K/V in its cache slots. The reference backend
    also stages the live K/V in those (uncommitted) slots during denoising calls, so that the window is one
    contiguous prefix of the buffer; the committed frames are never touched.
    """

    def __init__(
        self, cache: SinkWindowCache, plan: ChunkPlan, rope: RopeTable, *, write: bool, backend: str
    ) -> None:
        self.cache, self.plan, self.rope, self.write, self.backend = cache, plan, rope, write, backend
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")

    def self_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_cached, v_cached, k_slot, v_slot = self.cache.layer_views(layer, self.plan)
        if self.backend == "triton":
            from ..kernels import ops

            if self.write:
                k_slot.copy_(k)
                v_slot.copy_(v)
            q_pos, cache_pos = self.rope.positions(self.plan)
            return ops.attention(
                q, k, v, k_cached, v_cached, q_pos, cache_pos,
                (self.rope.rows, self.rope.cols), self.rope.pairs, self.rope.theta,
            )
        k_slot.copy_(k)
        v_slot.copy_(v)
        n = (self.plan.num_cached + self.plan.chunk_frames) * self.rope.tokens
        keys = self.cache.k[layer].flatten(1, 2)[:, :n]  # [B, Lk, H, D], window order
        values = self.cache.v[layer].flatten(1, 2)[:, :n]
        return sdpa(apply_rope(q, self.rope.queries(self.plan)), apply_rope(keys, self.rope.keys(self.plan)), values)


class FullSequenceAttention:
    """Self-attention over a whole clip in one call (training; teacher and critic are bidirectional).

    Temporal RoPE positions are the absolute latent frame indices. ``block_causal`` restricts each chunk
    to the frames a streaming chunk at the same place would see (sink + rolling window, itself included);
    with absolute positions this equals streaming exactly while nothing has been evicted. It always uses the
    reference backend: the fused kernels are forward-only and training needs gradients.
    """

    backend = "reference"

    def __init__(
        self,
        model: ModelConfig,
        stream: StreamConfig,
        num_frames: int,
        *,
        block_causal: bool,
        device: torch.device | str,
    ) -> None:
        _, ph, pw = model.patch_size
        rows, cols = stream.latent_h // ph, stream.latent_w // pw
        tokens = rows * cols
        self.angles = rope_angles(torch.arange(num_frames, device=device), rows, cols, model.rope_pairs_thw,
                                  model.rope_theta)
        self.mask = None
        if block_causal:
            frame_mask = block_causal_frame_mask(num_frames, stream).to(device)
            self.mask = frame_mask.repeat_interleave(tokens, 0).repeat_interleave(tokens, 1)  # [L, L] bool

    def self_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return sdpa(apply_rope(q, self.angles), apply_rope(k, self.angles), v, self.mask)


def block_causal_frame_mask(num_frames: int, stream: StreamConfig) -> torch.Tensor:
    """[F, F] bool: query frame i may attend key frame j (streaming visibility, chunk-bidirectional)."""
    mask = torch.zeros(num_frames, num_frames, dtype=torch.bool)
    c = stream.chunk_frames
    for start in range(0, num_frames, c):
        stop = min(start + c, num_frames)
        visible = list(visible_cached_frames(start, stream)) + list(range(start, stop))
        mask[start:stop, visible] = True
    return mask


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, L, H, D] layout around PyTorch's scaled_dot_product_attention."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return o.transpose(1, 2)
