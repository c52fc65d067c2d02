"""The full-sequence attention training uses: the FlexAttention block mask equals the dense statement of SPEC §9
for every (window, sink) of the recipe, and its backends (flex, chunked) equal dense masked attention, values and
gradients."""

from __future__ import annotations

import pytest
import torch

from conftest import TOLERANCE
from lipforcing.engine.dit.config import ModelConfig, StreamConfig
from lipforcing.engine.dit.full_sequence import (
    FullSequenceAttention,
    block_causal_frame_mask,
    block_mask,
    frame_mask_mod,
)
from lipforcing.engine.numerics import rel_error
from lipforcing.training.config import WINDOW_SINK_PAIRS

PAIRS = list(WINDOW_SINK_PAIRS)


def spec_frame_mask(frames: int, window: int, sink: int, chunk: int = 3) -> torch.Tensor:
    """SPEC §9 in its own words: chunk b sees [max(0, 3b + 3 - (window - sink)), 3b + 3) plus [0, sink)."""
    mask = torch.zeros(frames, frames, dtype=torch.bool)
    for q in range(frames):
        b = q // chunk
        for k in range(frames):
            mask[q, k] = (max(0, chunk * b + chunk - (window - sink)) <= k < chunk * b + chunk) or k < sink
            mask[q, k] &= k < chunk * b + chunk
    return mask


@pytest.mark.parametrize("window,sink", PAIRS)
def test_block_mask_equals_dense_reference(window, sink):
    frames, tokens = 21, 5  # odd token count: blocks of the BlockMask straddle frames
    stream = StreamConfig(window_frames=window, sink_frames=sink, latent_h=4, latent_w=4)
    dense = spec_frame_mask(frames, window, sink)
    assert torch.equal(block_causal_frame_mask(frames, stream), dense)
    # the BlockMask, expanded to tokens, equals the dense token mask: its mask_mod on every (q, kv) pair ...
    length = frames * tokens
    q_idx = torch.arange(length)[:, None].expand(length, length)
    kv_idx = torch.arange(length)[None, :].expand(length, length)
    token_mask = frame_mask_mod(tokens, stream)(0, 0, q_idx, kv_idx)
    expected = dense.repeat_interleave(tokens, 0).repeat_interleave(tokens, 1)
    assert torch.equal(token_mask, expected)
    # ... and the block structure PyTorch built from it
    mask = block_mask(frames, tokens, stream, "cpu")
    assert torch.equal(mask.to_dense()[0, 0].bool(), _block_reduce(expected, mask.BLOCK_SIZE))


def _block_reduce(token_mask: torch.Tensor, block_size) -> torch.Tensor:
    """[L, L] -> [ceil(L/bq), ceil(L/bk)]: blocks holding any visible pair."""
    bq, bk = block_size if isinstance(block_size, tuple) else (block_size, block_size)
    length = token_mask.shape[0]
    nq, nk = -(-length // bq), -(-length // bk)
    padded = torch.zeros(nq * bq, nk * bk, dtype=torch.bool)
    padded[:length, :length] = token_mask
    return padded.reshape(nq, bq, nk, bk).any(dim=3).any(dim=1)


def _dense_attention(q, k, v, frame_mask, tokens):
    mask = frame_mask.repeat_interleave(tokens, 0).repeat_interleave(tokens, 1)
    o = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                         attn_mask=mask)
    return o.transpose(1, 2)


@pytest.mark.parametrize("window,sink", [(7, 1), (12, 3)])
def test_backends_equal_dense_attention_with_gradients(window, sink):
    cfg = ModelConfig(dim=64, ffn_dim=32, num_heads=2, num_layers=1, text_len=4)
    stream = StreamConfig(window_frames=window, sink_frames=sink, latent_h=6, latent_w=4)  # 3 x 2 tokens
    frames, tokens = 14, 6  # a last chunk of 2 frames
    g = torch.Generator().manual_seed(window * 10 + sink)
    q, k, v = (torch.randn(1, frames * tokens, 2, 32, generator=g) for _ in range(3))
    ctx = FullSequenceAttention(cfg, stream, frames, block_causal=True, device="cpu")
    from lipforcing.kernels.rope import apply_rope

    rq, rk = apply_rope(q, ctx.angles), apply_rope(k, ctx.angles)
    dense = _dense_attention(rq, rk, v, block_causal_frame_mask(frames, stream), tokens)
    with torch.no_grad():
        assert ctx.resolve(q) == "flex"
        flex = ctx.self_attention(0, q, k, v)
    assert rel_error(flex, dense) < TOLERANCE[torch.float32]

    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    assert ctx.resolve(leaves[0]) == "chunked"  # the CPU has no FlexAttention backward
    chunked = ctx.self_attention(0, *leaves)
    assert rel_error(chunked.detach(), dense) < TOLERANCE[torch.float32]
    weight = torch.randn(chunked.shape, generator=g)
    (chunked * weight).sum().backward()
    ref_leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    rq, rk = apply_rope(ref_leaves[0], ctx.angles), apply_rope(ref_leaves[1], ctx.angles)
    (_dense_attention(rq, rk, ref_leaves[2], block_causal_frame_mask(frames, stream), tokens) * weight).sum().backward()
    for ours, ref in zip(leaves, ref_leaves):
        assert rel_error(ours.grad, ref.grad) < TOLERANCE[torch.float32]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_flex_attention_on_cuda_equals_chunked_with_gradients():
    cfg = ModelConfig(dim=256, ffn_dim=32, num_heads=2, num_layers=1, text_len=4)
    stream = StreamConfig(window_frames=10, sink_frames=1, latent_h=16, latent_w=12)  # 8 x 6 tokens
    frames = 21
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, frames * 48, 2, 128, generator=g, device="cuda") for _ in range(3))
    weight = torch.randn(1, frames * 48, 2, 128, generator=g, device="cuda")
    outs, grads = [], []
    for backend in ("flex", "chunked"):
        ctx = FullSequenceAttention(cfg, stream, frames, block_causal=True, device="cuda", attention_backend=backend)
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
        out = ctx.self_attention(0, *leaves)
        (out * weight).sum().backward()
        outs.append(out.detach())
        grads.append([x.grad for x in leaves])
    assert rel_error(outs[0], outs[1]) < 1e-4
    for a, b in zip(*grads):
        assert rel_error(a, b) < 1e-4
