"""Full-sequence self-attention: a whole clip in one call, as training calls the network.

The teacher and the critic are bidirectional; the stage-1 student is block-causal (each chunk sees the
frames a streaming chunk at the same place would see). Temporal RoPE positions are the absolute latent
frame indices (no dynamic RoPE, SPEC §9). It uses the reference attention math in PyTorch, so gradients
flow; the fused kernels are forward-only.

    ctx = FullSequenceAttention(model_cfg, stream_cfg, num_frames, block_causal=True, device="cpu")
    flow = model(x_in, t_per_frame, clip, ctx)            # x_in [B, 65, F, h, w], t [B, F]
"""

from __future__ import annotations

import torch

from ...kernels.rope import apply_rope, rope_angles
from .attention import sdpa
from .cache import visible_cached_frames
from .config import ModelConfig, StreamConfig


class FullSequenceAttention:
    """Self-attention over a whole clip; ``block_causal`` restricts each chunk to its streaming window."""

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
