"""The static scheduler and the chunk pipeline compute exactly what the plain sequential sampler computes."""

from __future__ import annotations

import pytest
import torch

from lipforcing.engine.dit.build import random_student
from lipforcing.engine.dit.config import ModelConfig, StreamConfig
from lipforcing.engine.numerics import rel_error
from lipforcing.engine.runtime.pipeline import ChunkPipeline, DeviceStreams
from lipforcing.engine.runtime.sampler import StreamingSampler
from lipforcing.engine.runtime.static import StaticStudent

CFG = ModelConfig(dim=64, ffn_dim=96, num_heads=2, num_layers=4, text_len=5, audio_dim=8)
STREAM = StreamConfig(latent_h=4, latent_w=6)
L = 15  # 5 chunks: chunk 0, chunk 1 and three steady-state chunks


@pytest.fixture(scope="module")
def model():
    return random_student(CFG, seed=0, std=0.05)


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


def _static_clip(student, inp, chunks=L // 3):
    student.start_clip(inp["text"], inp["audio"], inp["ref"], inp["mask"])
    out = [student.run_chunk(inp["masked"][:, :, 3 * b : 3 * b + 3], inp["ref_seq"][:, :, 3 * b : 3 * b + 3]).clone()
           for b in range(chunks)]
    return torch.cat(out, dim=2)


def test_static_student_equals_sequential_loop(model, clip_inputs):
    ref = _sequential(model, clip_inputs)
    student = StaticStudent(model, STREAM, backend="reference", seed=11, cuda_graphs=False)
    ptrs = (student.x_in.data_ptr(), student.cache.k.data_ptr(), student.x0.data_ptr())
    outs = [_static_clip(student, clip_inputs) for _ in range(2)]  # a second clip reuses every buffer
    assert torch.equal(outs[0], ref) and torch.equal(outs[1], ref)  # the noise is reseeded per clip
    assert (student.x_in.data_ptr(), student.cache.k.data_ptr(), student.x0.data_ptr()) == ptrs


def test_warm_up_leaves_no_trace(model, clip_inputs, monkeypatch):
    """A warm-up on dummy data (every window shape) changes nothing the next clip computes."""
    ref = _sequential(model, clip_inputs)
    student = StaticStudent(model, STREAM, backend="reference", seed=11, cuda_graphs=False)
    assert [p.num_cached for p in student.window_shapes] == [0, 3, 4]
    shapes = []
    body = student._chunk_body
    monkeypatch.setattr(student, "_chunk_body", lambda plan, rows: shapes.append(plan.shape_key) or body(plan, rows))
    assert student.warm_up(clip_inputs["text"]) > 0
    assert shapes == [p.shape_key for p in student.window_shapes]  # every window shape, once each
    with pytest.raises(RuntimeError, match="start_clip"):
        _ = student.num_latent_frames
    assert torch.equal(_static_clip(student, clip_inputs), ref)


def test_text_kv_are_computed_once_per_text(model, clip_inputs, monkeypatch):
    student = StaticStudent(model, STREAM, backend="reference", seed=11, cuda_graphs=False)
    calls = []
    original = model.text_kv
    monkeypatch.setattr(model, "text_kv", lambda text: calls.append(1) or original(text))
    for _ in range(3):
        student.start_clip(clip_inputs["text"], clip_inputs["audio"], clip_inputs["ref"], clip_inputs["mask"])
    assert len(calls) == 1
    student.start_clip(clip_inputs["text"] + 1, clip_inputs["audio"], clip_inputs["ref"], clip_inputs["mask"])
    assert len(calls) == 2


def _pipeline_run(student, inp, decode_weight, streams):
    """The pipeline over stand-in codecs: the encoder hands out the test's latents for both streams of the batch,
    the decoder is a linear map of x0 [1, 16, 3, h, w] to frames [3, 3, h, w]."""
    class Encoder:
        def reset(self):
            self.b = 0

        def push(self, pixels):
            assert pixels.shape[0] == 2  # masked and unmasked streams as one batch
            s, self.b = 3 * self.b, self.b + 1
            return torch.cat([inp["masked"][:, :, s : s + 3], inp["ref_seq"][:, :, s : s + 3]])

    class Decoder:
        def reset(self):
            pass

        def push(self, x0):
            return torch.einsum("oc,bcfhw->bfohw", decode_weight, x0)[0]

    device = inp["text"].device
    pipe = ChunkPipeline(student, Encoder(), Decoder(), torch.ones(8, 8, device=device), streams=streams)
    pipe.start_clip(inp["text"], inp["audio"], inp["mask"])
    out = []
    for _ in range(L // 3):
        result = pipe.submit(torch.zeros(9, 3, 8, 8, device=device))
        if result.done is not None:
            result.done.synchronize()
        out.append(result.frames.clone())
    return out


def test_pipeline_equals_sequential_encode_student_decode(model, clip_inputs):
    """Pipelined encode | student | decode equals encode -> sample -> decode in order; the first chunk's
    encoded reference stream supplies the clip's reference latent."""
    inp = dict(clip_inputs, ref=clip_inputs["ref_seq"][:, :, :1])
    ref = _sequential(model, inp)
    weight = torch.randn(3, 16)
    student = StaticStudent(model, STREAM, backend="reference", seed=11, cuda_graphs=False)
    got = _pipeline_run(student, inp, weight, DeviceStreams("cpu"))
    expected = [torch.einsum("oc,bcfhw->bfohw", weight, ref[:, :, s : s + 3])[0] for s in range(0, L, 3)]
    assert len(got) == 5
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


def test_compile_per_window_shape_is_bounded_and_matches_eager(model, clip_inputs):
    """torch.compile (inductor, CPU) of each call per window shape: outputs match eager, each call (denoising and
    commit, per window shape) is one graph (no graph break), and the number of compilations stops growing once
    every window shape has run (no recompilation per chunk or per layer)."""
    import torch._dynamo

    model = random_student(CFG.replace(num_layers=2, audio_blocks=(1,)), seed=0, std=0.05)  # compiles faster
    ref = _static_clip(StaticStudent(model, STREAM, backend="reference", seed=11, cuda_graphs=False), clip_inputs)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    student = StaticStudent(model, STREAM, backend="reference", seed=11, cuda_graphs=False, compile=True)
    out = _static_clip(student, clip_inputs, chunks=3)  # chunk 0, chunk 1, steady state: every shape
    compiled = counters["stats"]["unique_graphs"]
    out = torch.cat([out, _static_clip(student, clip_inputs)[:, :, 9:]], dim=2)
    assert counters["stats"]["unique_graphs"] == compiled == 2 * len(student.window_shapes)
    assert len(student._compiled) == 2 * len(student.window_shapes)  # denoising and commit call per shape
    assert rel_error(out, ref) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replay_equals_eager(model, clip_inputs):
    m = random_student(CFG, seed=0, std=0.05, device="cuda")
    inp = {k: v.cuda() for k, v in clip_inputs.items()}
    eager = _static_clip(StaticStudent(m, STREAM, backend="reference", seed=11, cuda_graphs=False), inp)
    student = StaticStudent(m, STREAM, backend="reference", seed=11, cuda_graphs=True)
    student.warm_up(inp["text"])
    assert len(student.graphs) == 3
    torch.testing.assert_close(_static_clip(student, inp), eager, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_streams_pipeline_equals_sequential(model, clip_inputs):
    """The three-stream pipeline with graphs on CUDA equals the same pipeline run sequentially."""
    m = random_student(CFG, seed=0, std=0.05, device="cuda")
    inp = {k: v.cuda() for k, v in clip_inputs.items()}
    weight = torch.randn(3, 16, device="cuda")
    outs = []
    for parallel in (False, True):
        student = StaticStudent(m, STREAM, backend="reference", seed=11, cuda_graphs=parallel)
        student.warm_up(inp["text"])
        frames = _pipeline_run(student, inp, weight, DeviceStreams("cuda", enabled=parallel))
        outs.append(torch.stack(frames).cpu())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def test_static_student_with_triton_kernels_matches_reference(model, clip_inputs):
    """Triton backend (attention, norms, fused flow update) vs the plain loop, on the CPU model: in the Triton
    interpreter, skipped without it (a GPU on the host does not make the kernels run on CPU tensors)."""
    pytest.importorskip("triton")
    from lipforcing.kernels import triton_available

    ok, why = triton_available(model.patch_embedding.weight.device)
    if not ok:
        pytest.skip(why)
    ref = _sequential(model, clip_inputs)[:, :, :9]  # chunk 0, chunk 1 and one steady-state chunk
    student = StaticStudent(model, STREAM, backend="triton", seed=11, cuda_graphs=False)
    assert rel_error(_static_clip(student, clip_inputs, chunks=3), ref) < 1e-5
