"""One stream's student across the ranks of a ``torch.distributed`` group: sequence parallelism over the
chunk's tokens with head-parallel attention (the all-to-all scheme; the arithmetic that picks it is in
engine/tools/parallel_plan.py and the README).

Every rank holds the whole network. After the patch embedding each rank keeps 1/N of every frame's tokens
(rows of the token grid, so a frame's tokens split evenly for N dividing its token count); norms, modulation,
the projections, cross-attention (the text K/V are every rank's, whole) and the FFN run on those tokens
alone. Self-attention needs every token: an all-to-all turns [tokens / N, all heads] into [all tokens, heads /
N], the engine's attention runs unchanged on those heads (its window RoPE sees the whole token grid, its KV
cache holds only this rank's heads: 1/N of the cache per rank), and a second all-to-all turns the output back.
The head's tokens are gathered at the end, so every rank computes the same flow and the same x0: the sampler
around the model does not change.

    sp = SequenceParallel()                                       # the default process group
    sampler = StreamingSampler(model, stream, parallel=sp)        # its cache: num_heads / N heads per rank
    ctx = SequenceParallelAttention(StreamingAttention(...), sp)  # what the sampler builds per call

Per call of a block this moves, per rank, 4 x (N - 1) / N^2 of the [tokens, dim] activations (q, k, v out, the
output back) instead of tensor parallelism's 2 x 2 (N - 1) / N of all of them per block.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..errors import ConfigError


class SequenceParallel:
    """The ranks one stream runs on (a ``torch.distributed`` group: gloo on CPUs, NCCL on GPUs)."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        if not dist.is_initialized():
            raise ConfigError("sequence parallelism needs torch.distributed initialised (torchrun, or --gpus N)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    def check(self, num_heads: int, tokens_per_frame: int) -> None:
        """Raise ConfigError unless heads and each frame's tokens split evenly over the ranks."""
        if num_heads % self.size or tokens_per_frame % self.size:
            raise ConfigError(f"{self.size} ranks must divide the model's {num_heads} heads and the "
                              f"{tokens_per_frame} tokens of a latent frame")

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        """[B, F, T, d] -> this rank's tokens of every frame [B, F, T / N, d]."""
        t = x.shape[2] // self.size
        return x[:, :, self.rank * t : (self.rank + 1) * t].contiguous()

    def gather(self, y: torch.Tensor) -> torch.Tensor:
        """[B, F, T / N, p] of every rank -> [B, F, T, p] in token order."""
        parts = [torch.empty_like(y) for _ in range(self.size)]
        dist.all_gather(parts, y.contiguous(), group=self.group)
        return torch.cat(parts, dim=2)

    def _exchange(self, x: torch.Tensor) -> torch.Tensor:
        """all-to-all over dim 0 ([N, ...]: block j goes to rank j, block i of the result came from rank i)."""
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=self.group)
        return out

    def to_heads(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        """[B, F * T/N, H, D] (this rank's tokens, all heads) -> [B, F * T, H/N, D] (all tokens in (frame, row,
        col) order, this rank's heads)."""
        b, _, h, d = x.shape
        n = self.size
        blocks = x.reshape(b, frames, -1, n, h // n, d).permute(3, 0, 1, 2, 4, 5).contiguous()
        got = self._exchange(blocks)  # [N (source rank = token block), B, F, T/N, H/N, D]
        return got.permute(1, 2, 0, 3, 4, 5).reshape(b, -1, h // n, d)

    def to_tokens(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        """The inverse of ``to_heads``: [B, F * T, H/N, D] -> [B, F * T/N, H, D]."""
        b, _, hl, d = x.shape
        n = self.size
        blocks = x.reshape(b, frames, n, -1, hl, d).permute(2, 0, 1, 3, 4, 5).contiguous()
        got = self._exchange(blocks)  # [N (source rank = head group), B, F, T/N, H/N, D]
        return got.permute(1, 2, 3, 0, 4, 5).reshape(b, -1, n * hl, d)


class SequenceParallelAttention:
    """An ``AttentionContext`` that runs ``inner`` (the engine's streaming attention over this rank's heads)
    inside the two all-to-alls; ``sequence_parallel`` tells the model to keep 1/N of the tokens."""

    def __init__(self, inner, parallel: SequenceParallel, tokens_per_frame: int) -> None:
        self.inner, self.sequence_parallel = inner, parallel
        self.local_tokens = tokens_per_frame // parallel.size
        self.backend = inner.backend

    def self_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        sp, frames = self.sequence_parallel, q.shape[1] // self.local_tokens
        out = self.inner.self_attention(layer, sp.to_heads(q, frames), sp.to_heads(k, frames),
                                        sp.to_heads(v, frames))
        return sp.to_tokens(out, frames)
