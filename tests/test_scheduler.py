"""The static-buffer scheduler computes exactly what the plain sequential sampler computes."""

from __future__ import annotations

import pytest
import torch

from lipforcing.engine.config import ModelConfig, StreamConfig
from lipforcing.engine.model import CausalWanStudent
from lipforcing.engine.sampler import StreamingSampler
from lipforcing.engine.scheduler import ChunkPipeline, StaticStudent

CFG = ModelConfig(dim=64, ffn_dim=96, num_heads=2, num_layers=4, text_len=5, audio_dim=8)
STREAM = StreamConfig(latent_h=4, latent_w=6)
L = 15  # 5 chunks: chunk 0, chunk 1 and three steady-state chunks


@pytest.fixture(scope="module")
def model() -> CausalWanStudent:
    torch.manual_seed(0)
    m = CausalWanStudent(CFG).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)
    return m


@pytest.fixture(scope="module")
def clip_inputs():
    g = torch.Generator().manual_seed(7)
    return dict(
        text=torch.randn(1, CFG.text_len, 4096, generator=g),
        audio=torch.randn(1, 1 + 4 * (L - 1), CFG.audio_dim, generator=g),
        ref=torch.randn(1, 16, 1, 4, 6, generator=g),
        mask=(torch.rand(1, 1, 1, 4, 6, generator=g) > 0.5).float(),
        masked=torch.randn(1, 16, L, 4, 6, generator=g),
        ref_seq=torch.randn(1, 16, L, 4, 6, generator=g),
    )


def _sequential(model, inp, seed=11):
    sampler = StreamingSampler(model, STREAM, backend="reference", seed=seed)
    sampler.start_clip(inp["text"], inp["audio"], inp["ref"], inp["mask"])
    return torch.cat([c.x0 for c in sampler.run_clip(inp["masked"], inp["ref_seq"])], dim=2)


def test_static_student_equals_sequential_loop(model, clip_inputs):
    ref = _sequential(model, clip_inputs)
    student = StaticStudent(model, STREAM, backend="reference", seed=11, cuda_graphs=False)
    ptrs = (student.x_in.data_ptr(), student.cache.k.data_ptr(), student.x0.data_ptr())
    outs = []
    for run in range(2):  # a second clip reuses every buffer
        student.start_clip(clip_inputs["text"], clip_inputs["audio"], clip_inputs["ref"], clip_inputs["mask"])
        if run:
            student.generator.manual_seed(11)
        chunks = []
        for s in range(0, L, 3):
            chunks.append(student.run_chunk(clip_inputs["masked"][:, :, s : s + 3],
                                            clip_inputs["ref_seq"][:, :, s : s + 3]).clone())
        outs.append(torch.cat(chunks, dim=2))
    assert torch.equal(outs[0], ref) and torch.equal(outs[1], ref)
    assert (student.x_in.data_ptr(), student.cache.k.data_ptr(), student.x0.data_ptr()) == ptrs


def test_pipeline_equals_sequential_encode_student_decode(model, clip_inputs):
    """Pipelined (encode b+1 | student b | decode b-1) output equals encode -> sample -> decode in order."""
    ref = _sequential(model, clip_inputs)
    weight = torch.randn(3, 16)

    def decode(x0):  # stands in for the VAE decoder: [1, 16, 3, h, w] -> frames [3, 3, h, w]
        return torch.einsum("oc,bcfhw->bfohw", weight, x0)[0]

    pixel_chunks = [torch.cat([clip_inputs["masked"], clip_inputs["ref_seq"]], dim=1)[:, :, s : s + 3]
                    for s in range(0, L, 3)]

    def encode(pixels):  # stands in for the two VAE encoder streams
        return pixels[:, :16], pixels[:, 16:]

    student = StaticStudent(model, STREAM, backend="reference", seed=11, cuda_graphs=False)
    student.start_clip(clip_inputs["text"], clip_inputs["audio"], clip_inputs["ref"], clip_inputs["mask"])
    pipe = ChunkPipeline(student, encode, decode)
    got = list(pipe.run(pixel_chunks))
    assert len(got) == 5 and pipe.stats.chunks == 5
    expected = [decode(ref[:, :, s : s + 3]) for s in range(0, L, 3)]
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replay_equals_eager(model, clip_inputs):
    m = model.to("cuda")
    ref = _sequential(m, clip_inputs)
    student = StaticStudent(m, STREAM, backend="reference", seed=11, cuda_graphs=True)
    student.start_clip(clip_inputs["text"], clip_inputs["audio"], clip_inputs["ref"], clip_inputs["mask"])
    chunks = [student.run_chunk(clip_inputs["masked"][:, :, s : s + 3].cuda(),
                                clip_inputs["ref_seq"][:, :, s : s + 3].cuda()).clone() for s in range(0, L, 3)]
    assert len(student.graphs) == 3
    torch.testing.assert_close(torch.cat(chunks, dim=2).cpu(), ref.cpu(), rtol=1e-5, atol=1e-5)


def test_static_student_with_triton_kernels_matches_reference(model, clip_inputs):
    """Triton backend (attention, norms, fused flow update; the CPU interpreter here) vs the plain loop."""
    pytest.importorskip("triton")
    from lipforcing.kernels import triton_available

    ok, why = triton_available()
    if not ok:
        pytest.skip(why)
    ref = _sequential(model, clip_inputs)[:, :, :9]  # chunk 0, chunk 1 and one steady-state chunk
    student = StaticStudent(model, STREAM, backend="triton", seed=11, cuda_graphs=False)
    student.start_clip(clip_inputs["text"], clip_inputs["audio"], clip_inputs["ref"], clip_inputs["mask"])
    out = torch.cat([student.run_chunk(clip_inputs["masked"][:, :, s : s + 3],
                                       clip_inputs["ref_seq"][:, :, s : s + 3]).clone() for s in range(0, 9, 3)], 2)
    from conftest import rel_err

    assert rel_err(out, ref) < 1e-5
