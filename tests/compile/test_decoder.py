"""Compiled decoder backends: engine-cache keys, selection with loud fallbacks, the backends agree, artefacts
are reused across processes and from ``lipforcing compile``, and the caller's modules are never touched."""

from __future__ import annotations

import logging

import pytest
import torch

from lipforcing.compile.decoder import decoder_onnx, make_decoder_backend, select_decoder_backend, weights_digest
from lipforcing.compile.tensorrt_engine import engine_cache_key, tensorrt_status
from lipforcing.engine.codecs.latent import make_decoder, make_encoder
from lipforcing.engine.codecs.taehv import TAEHV, TAEHVConfig
from lipforcing.engine.errors import ConfigError
from lipforcing.engine.numerics import rel_error

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
    with pytest.raises(ConfigError, match="unknown decoder backend"):
        select_decoder_backend("magic", "cpu")


@pytest.fixture
def user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIPFORCING_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


SMALL = TAEHVConfig(encoder_width=8, decoder_widths=(16, 8, 8, 8))


def test_onnxruntime_decoder_equals_torch_decoder(user_cache):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    taehv = TAEHV().eval()
    torch_dec = make_decoder_backend(taehv, "torch", latent_hw=(4, 4))
    ort_dec = make_decoder_backend(taehv, "onnxruntime", latent_hw=(4, 4))
    assert (torch_dec.backend, ort_dec.backend) == ("torch", "onnxruntime")
    z = torch.randn(1, 16, 9, 4, 4)
    for i in (0, 3, 6):
        a, b = torch_dec.push(z[:, :, i : i + 3]), ort_dec.push(z[:, :, i : i + 3])
        assert a.shape == b.shape == (9 if i == 0 else 12, 3, 32, 32)
        assert rel_error(b, a) < 1e-4
    ort_dec.reset()
    assert rel_error(ort_dec.push(z[:, :, :3]), make_decoder("taehv", taehv=taehv).push(z[:, :, :3])) < 1e-4


def test_backend_decoder_never_moves_or_casts_the_callers_module(user_cache):
    """Build an encoder, then a backend decoder on the same TAEHV, then encode: the module is where and what
    it was (the export works on a copy)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    taehv = TAEHV(SMALL).eval().to(torch.float64)
    before = {k: v.clone() for k, v in taehv.state_dict().items()}
    encoder = make_encoder("taehv", taehv=taehv)
    make_decoder_backend(taehv, "onnxruntime", latent_hw=(4, 6))
    assert all(v.dtype == torch.float64 and v.device.type == "cpu" for v in taehv.state_dict().values())
    assert all(torch.equal(before[k], v) for k, v in taehv.state_dict().items())
    z = encoder.push(torch.rand(1, 9, 3, 32, 48, dtype=torch.float64) * 2 - 1)
    assert z.shape == (1, 16, 3, 4, 6)


def test_onnx_export_is_cached_across_processes_by_weights(user_cache):
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    taehv = TAEHV(SMALL).eval()
    first = decoder_onnx(taehv, (4, 6))
    assert first.parent == user_cache / "onnx" and first.is_file()
    stamp = first.stat().st_mtime_ns
    assert decoder_onnx(taehv, (4, 6)) == first and first.stat().st_mtime_ns == stamp  # a hit: not exported again
    other = TAEHV(SMALL).eval()
    assert weights_digest(other) != weights_digest(taehv)
    assert decoder_onnx(other, (4, 6)) != first  # other weights, other artefact


def test_compiled_folder_is_used_only_with_its_weights(tmp_path, user_cache):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from lipforcing.compile.stage import compile_codecs

    torch.manual_seed(0)
    taehv = TAEHV(SMALL).eval()
    out = tmp_path / "compiled"
    compile_codecs(taehv, out, height=32, width=48, tensorrt=False)
    assert decoder_onnx(taehv, (4, 6), compiled_dir=out) == out / "taehv_decoder.onnx"
    assert not (user_cache / "onnx").exists()  # nothing exported again
    with pytest.raises(ConfigError, match="other TAEHV weights"):
        decoder_onnx(TAEHV(SMALL).eval(), (4, 6), compiled_dir=out)
    with pytest.raises(ConfigError, match="compiled for"):
        decoder_onnx(taehv, (8, 8), compiled_dir=out)
    with pytest.raises(ConfigError, match="not a folder written by"):
        decoder_onnx(taehv, (4, 6), compiled_dir=tmp_path)


def test_onnxruntime_uses_the_cuda_provider_on_cuda(monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    from lipforcing.compile.onnx_export import onnxruntime_providers

    assert onnxruntime_providers("cpu") == ["CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert onnxruntime_providers("cuda")[0] == "CUDAExecutionProvider"
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert onnxruntime_providers("cuda") == ["CPUExecutionProvider"]
