"""The sdpa attention backend: the window's keys rotated once per call from a float32 table into preallocated
buffers, then PyTorch SDPA. It computes what the reference backend computes (golden files: tests/tools), reuses
its buffers on every call and layer, and rotates exactly as the float64 reference RoPE."""

from __future__ import annotations

import torch

from lipforcing.engine.dit.attention import RopeTable, WindowBuffers, rotate_into
from lipforcing.engine.dit.build import random_student
from lipforcing.engine.dit.config import ModelConfig, StreamConfig
from lipforcing.engine.numerics import rel_error
from lipforcing.engine.runtime.sampler import StreamingSampler
from lipforcing.engine.runtime.static import StaticStudent
from lipforcing.kernels.rope import apply_rope

CFG = ModelConfig(dim=96, ffn_dim=64, num_heads=3, num_layers=2, text_len=5, audio_dim=8, audio_blocks=(1,))
STREAM = StreamConfig(latent_h=6, latent_w=10)  # a non-square 3x5 token grid


def _clip(seed: int, chunks: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    latents = 3 * chunks
    return dict(text=torch.randn(1, CFG.text_len, 4096, generator=g),
                audio=torch.randn(1, 1 + 4 * (latents - 1), CFG.audio_dim, generator=g),
                ref=torch.randn(1, 16, 1, 6, 10, generator=g),
                mask=(torch.rand(1, 1, 1, 6, 10, generator=g) > 0.5).float(),
                masked=torch.randn(1, 16, latents, 6, 10, generator=g),
                ref_seq=torch.randn(1, 16, latents, 6, 10, generator=g))


def test_rotate_into_equals_the_float64_reference_rope():
    table = RopeTable(CFG, STREAM, "cpu")
    x = torch.randn(2, table.angles.shape[0], CFG.num_heads, CFG.head_dim)
    out = torch.full_like(x, float("nan"))
    buffers = WindowBuffers(2, table.angles.shape[0], CFG.num_heads, CFG.head_dim, x.dtype, x.device)
    rotate_into(x, table.cos, table.sin, out, buffers.scratch)
    assert rel_error(out, apply_rope(x, table.angles)) < 1e-6


def test_sdpa_backend_equals_the_reference_over_every_window_shape():
    model = random_student(CFG, seed=2, std=0.05)
    clip = _clip(4, chunks=5)  # chunk 0, chunk 1 and three steady-state chunks (the cache wraps)
    outs = {}
    for backend in ("reference", "sdpa"):
        sampler = StreamingSampler(model, STREAM, backend=backend, seed=7)
        sampler.start_clip(clip["text"], clip["audio"], clip["ref"], clip["mask"])
        outs[backend] = torch.cat([c.x0 for c in sampler.run_clip(clip["masked"], clip["ref_seq"])], 2)
    assert rel_error(outs["sdpa"], outs["reference"]) < 1e-5


def test_static_scheduler_on_sdpa_reuses_one_set_of_buffers():
    """After the warm-up no buffer is made: every call of every layer and chunk writes the same window buffers
    (what lets a CUDA graph replay them)."""
    model = random_student(CFG, seed=2, std=0.05)
    clip = _clip(5, chunks=4)
    student = StaticStudent(model, STREAM, backend="sdpa", seed=7, cuda_graphs=False)
    student.warm_up(clip["text"])
    buffers = dict(student.rope._windows)
    assert len(buffers) == 1
    pointers = {k: (b.k.data_ptr(), b.v.data_ptr(), b.q.data_ptr()) for k, b in buffers.items()}
    student.start_clip(clip["text"], clip["audio"], clip["ref"], clip["mask"])
    got = torch.cat([student.run_chunk(clip["masked"][:, :, 3 * b : 3 * b + 3],
                                       clip["ref_seq"][:, :, 3 * b : 3 * b + 3]).clone() for b in range(4)], 2)
    assert {k: (b.k.data_ptr(), b.v.data_ptr(), b.q.data_ptr()) for k, b in student.rope._windows.items()} == pointers
    reference = StreamingSampler(model, STREAM, backend="reference", seed=7)
    reference.start_clip(clip["text"], clip["audio"], clip["ref"], clip["mask"])
    expected = torch.cat([c.x0 for c in reference.run_clip(clip["masked"], clip["ref_seq"])], 2)
    assert rel_error(got, expected) < 1e-5
