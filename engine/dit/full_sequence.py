"""Full-sequence self-attention: a whole clip in one call, as training calls the network.

The teacher and the critic are bidirectional; the stage-1 student is block-causal with a (window, sink)
pair (SPEC §9): a query in chunk b sees key frames [max(0, c(b+1) - (window - sink)), c(b+1)) plus the first
``sink`` frames, bidirectionally inside its chunk. Temporal RoPE positions are the absolute latent frame
indices (no dynamic RoPE).

    ctx = FullSequenceAttention(model_cfg, stream_cfg, num_frames, block_causal=True, device="cpu")
    flow = model(x_in, t_per_frame, clip, ctx)            # x_in [B, 65, F, h, w], t [B, F]

The block-causal mask is a FlexAttention ``BlockMask`` built from ``frame_mask_mod`` (never a dense L x L
mask). Backends, chosen per call (``attention_backend``):
    flex      ``flex_attention`` with the block mask: compiled on CUDA (forward and backward); eager on the CPU,
              where PyTorch implements its forward only
    chunked   the same visibility computed chunk by chunk: each chunk's queries against the key frames it sees,
              gathered (sink frames + its window), through ``scaled_dot_product_attention``; exact, with autograd
              on every device. The CPU uses it whenever gradients are needed.
Bidirectional calls need no mask and use ``scaled_dot_product_attention`` directly.
"""

from __future__ import annotations

import logging
import warnings

import torch

from ...kernels.rope import apply_rope, rope_angles
from .attention import sdpa
from .config import ModelConfig, StreamConfig

log = logging.getLogger("lipforcing")

FULL_SEQUENCE_BACKENDS = ("flex", "chunked")


def visible_frame_range(chunk_index: int, stream: StreamConfig, num_frames: int) -> tuple[range, range]:
    """(sink frames, window frames) a query of chunk ``chunk_index`` sees: [0, sink) and
    [max(0, end - (window - sink)), end) with end = c (b + 1) clipped to the clip (SPEC §9)."""
    c = stream.chunk_frames
    end = min(num_frames, c * (chunk_index + 1))
    first = max(0, c * (chunk_index + 1) - (stream.window_frames - stream.sink_frames))
    sinks = range(0, min(stream.sink_frames, first))
    return sinks, range(first, end)


def block_causal_frame_mask(num_frames: int, stream: StreamConfig) -> torch.Tensor:
    """[F, F] bool: query frame i may attend key frame j. A frame-level statement of the mask (F x F, not L x L),
    for checks against golden files and tests of the block mask."""
    mask = torch.zeros(num_frames, num_frames, dtype=torch.bool)
    c = stream.chunk_frames
    for b in range(-(-num_frames // c)):
        sinks, window = visible_frame_range(b, stream, num_frames)
        rows = slice(b * c, min(num_frames, (b + 1) * c))
        mask[rows, list(sinks) + list(window)] = True
    return mask


def frame_mask_mod(tokens_per_frame: int, stream: StreamConfig):
    """FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` of the block-causal (window, sink) mask on token indices
    (tokens ordered frame-major, ``tokens_per_frame`` per latent frame)."""
    c, sink, rolling = stream.chunk_frames, stream.sink_frames, stream.window_frames - stream.sink_frames

    def mask_mod(b, h, q_idx, kv_idx):
        end = (q_idx // tokens_per_frame // c + 1) * c
        key = kv_idx // tokens_per_frame
        return (key < end) & ((key >= end - rolling) | (key < sink))

    return mask_mod


def block_mask(num_frames: int, tokens_per_frame: int, stream: StreamConfig, device: torch.device | str):
    """The FlexAttention ``BlockMask`` of the block-causal mask over num_frames x tokens_per_frame tokens."""
    from torch.nn.attention.flex_attention import create_block_mask

    length = num_frames * tokens_per_frame
    return create_block_mask(frame_mask_mod(tokens_per_frame, stream), None, None, length, length,
                             device=str(device))


_compiled_flex = None


def _flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    """q, k, v: [B, H, L, D] -> [B, H, L, D]; compiled on CUDA (the fused kernel), eager elsewhere."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if q.device.type == "cuda":
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        return _compiled_flex(q, k, v, block_mask=mask)
    with warnings.catch_warnings():  # the eager CPU form is the unfused reference: the warning says so
        warnings.simplefilter("ignore")
        return flex_attention(q, k, v, block_mask=mask)


class FullSequenceAttention:
    """Self-attention over a whole clip; ``block_causal`` restricts each chunk to its streaming window.

    ``attention_backend``: ``flex`` or ``chunked``; None picks ``flex`` except on the CPU with autograd
    recording (FlexAttention has no CPU backward), where ``chunked`` computes the same mask exactly."""

    backend = "reference"

    def __init__(
        self,
        model: ModelConfig,
        stream: StreamConfig,
        num_frames: int,
        *,
        block_causal: bool,
        device: torch.device | str,
        attention_backend: str | None = None,
    ) -> None:
        if attention_backend not in (None, *FULL_SEQUENCE_BACKENDS):
            raise ValueError(f"unknown full-sequence attention backend {attention_backend!r}; "
                             f"choose one of {FULL_SEQUENCE_BACKENDS}")
        _, ph, pw = model.patch_size
        rows, cols = stream.latent_h // ph, stream.latent_w // pw
        self.tokens = rows * cols
        self.num_frames = num_frames
        self.stream = stream
        self.attention_backend = attention_backend
        self.angles = rope_angles(torch.arange(num_frames, device=device), rows, cols, model.rope_pairs_thw,
                                  model.rope_theta)
        self.block_mask = block_mask(num_frames, self.tokens, stream, device) if block_causal else None

    def resolve(self, q: torch.Tensor) -> str:
        """The backend this call uses (see the class docstring)."""
        if self.attention_backend is not None:
            return self.attention_backend
        needs_grad = torch.is_grad_enabled() and q.requires_grad
        return "chunked" if q.device.type != "cuda" and needs_grad else "flex"

    def self_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: [B, L, H, D] after RMSNorm, not rotated -> [B, L, H, D]."""
        q, k = apply_rope(q, self.angles), apply_rope(k, self.angles)
        if self.block_mask is None:
            return sdpa(q, k, v)
        if self.resolve(q) == "chunked":
            return self._chunked(q, k, v)
        out = _flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.block_mask)
        return out.transpose(1, 2)

    def _chunked(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Each chunk's queries against the key frames it sees (sink frames, then its window)."""
        n, c = self.tokens, self.stream.chunk_frames
        outs = []
        for b in range(-(-self.num_frames // c)):
            sinks, window = visible_frame_range(b, self.stream, self.num_frames)
            keys = [slice(window.start * n, window.stop * n)]
            if len(sinks):
                keys.insert(0, slice(sinks.start * n, sinks.stop * n))
            kb = torch.cat([k[:, s] for s in keys], dim=1) if len(keys) > 1 else k[:, keys[0]]
            vb = torch.cat([v[:, s] for s in keys], dim=1) if len(keys) > 1 else v[:, keys[0]]
            rows = slice(b * c * n, min(self.num_frames, (b + 1) * c) * n)
            outs.append(sdpa(q[:, rows], kb, vb))
        return torch.cat(outs, dim=1)
