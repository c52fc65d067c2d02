"""Compile stage: engine-cache keys, backend selection with loud fallbacks, the decoder backends agree,
and torch.compile of the student matches eager."""

from __future__ import annotations

import logging

import pytest
import torch

from conftest import rel_err
from lipforcing.compile.backends import ChunkDecoder, compile_student, select_decoder_backend
from lipforcing.compile.tensorrt_engine import engine_cache_key, tensorrt_status
from lipforcing.engine.attention import FullSequenceAttention
from lipforcing.engine.config import ModelConfig, StreamConfig
from lipforcing.engine.model import CausalWanStudent
from lipforcing.engine.taehv import TAEHV

SHAPES = {"x": (1, 3, 16, 64, 64), "state_0": (1, 1, 256, 64, 64)}


def test_engine_cache_key_changes_with_shapes_gpu_weights_and_version():
    base = engine_cache_key(b"onnx-bytes", SHAPES, gpu="NVIDIA H100 sm_90", trt_version="10.3")
    assert base == engine_cache_key(b"onnx-bytes", dict(reversed(SHAPES.items())), gpu="NVIDIA H100 sm_90",
                                    trt_version="10.3")  # key order does not matter
    variants = [
        engine_cache_key(b"onnx-bytes", {**SHAPES, "x": (1, 3, 16, 64, 96)}, gpu="NVIDIA H100 sm_90",
                         trt_version="10.3"),
        engine_cache_key(b"onnx-bytes", SHAPES, gpu="NVIDIA H200 sm_90", trt_version="10.3"),
        engine_cache_key(b"onnx-bytez", SHAPES, gpu="NVIDIA H100 sm_90", trt_version="10.3"),
        engine_cache_key(b"onnx-bytes", SHAPES, gpu="NVIDIA H100 sm_90", trt_version="10.4"),
        engine_cache_key(b"onnx-bytes", SHAPES, gpu="NVIDIA H100 sm_90", trt_version="10.3", precision="fp32"),
    ]
    assert len({base, *variants}) == 6


def test_missing_tensorrt_falls_back_loudly(caplog):
    ok, why = tensorrt_status()
    if ok:
        pytest.skip("TensorRT is usable here")
    with caplog.at_level(logging.WARNING, logger="lipforcing"):
        assert select_decoder_backend("tensorrt", "cpu") == "torch"
        assert select_decoder_backend("auto", "cpu") == "torch"
    assert caplog.text.count("TensorRT decoder unavailable") == 2
    assert select_decoder_backend("torch", "cpu") == "torch"
    with pytest.raises(ValueError, match="unknown decoder backend"):
        select_decoder_backend("magic", "cpu")


def test_onnxruntime_decoder_equals_torch_decoder(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    taehv = TAEHV().eval()
    torch_dec = ChunkDecoder.create(taehv, backend="torch", latent_hw=(4, 4))
    ort_dec = ChunkDecoder.create(taehv, backend="onnxruntime", latent_hw=(4, 4), cache_dir=tmp_path)
    assert (torch_dec.backend, ort_dec.backend) == ("torch", "onnxruntime")
    z = torch.randn(1, 9, 16, 4, 4)
    for i in (0, 3, 6):
        with torch.no_grad():
            a, b = torch_dec(z[:, i : i + 3]), ort_dec(z[:, i : i + 3])
        assert a.shape == b.shape == (1, 9 if i == 0 else 12, 3, 32, 32)
        assert rel_err(b, a) < 1e-4


def test_compiled_student_blocks_match_eager():
    cfg = ModelConfig(dim=64, ffn_dim=96, num_heads=2, num_layers=2, text_len=4, audio_dim=8)
    stream = StreamConfig(latent_h=4, latent_w=6)
    torch.manual_seed(0)
    model = CausalWanStudent(cfg).eval()
    clip = model.prepare_clip(torch.randn(1, 4, 4096), torch.randn(1, 9, 8))
    x = torch.randn(1, 65, 3, 4, 6)
    ctx = FullSequenceAttention(cfg, stream, 3, block_causal=False, device="cpu")
    with torch.no_grad():
        eager = model(x, 0.5, clip, ctx)
        compiled = compile_student(model, mode=None, backend="aot_eager")(x, 0.5, clip, ctx)
    assert rel_err(compiled, eager) < 1e-6
