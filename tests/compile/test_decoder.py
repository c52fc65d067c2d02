"""Compiled decoder backends: engine-cache keys, selection with loud fallbacks, the backends agree, artefacts
are reused across processes and from ``lipforcing compile``, and the caller's modules are never touched."""

from __future__ import annotations

import logging

import pytest
import torch

from lipforcing.compile.decoder import (
    DecoderRuntimes,
    choose_decoder_backend,
    decoder_onnx,
    make_decoder_backend,
    select_decoder_backend,
    weights_digest,
)
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
    assert "decoder backend tensorrt asked for, torch runs (TensorRT: " in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lipforcing"):
        assert select_decoder_backend("auto", "cpu") == "torch"  # a CPU engine's auto: not a fallback
    assert caplog.text == ""
    assert select_decoder_backend("torch", "cpu") == "torch"
    with pytest.raises(ConfigError, match="unknown decoder backend"):
        select_decoder_backend("magic", "cpu")


CUDA_ORT = ("CUDAExecutionProvider", "CPUExecutionProvider")
CPU_ORT = ("CPUExecutionProvider",)


def _host(trt: bool, providers: tuple[str, ...] | None) -> DecoderRuntimes:
    """A host with or without TensorRT, and onnxruntime with these providers (None: not installed)."""
    ort = (False, "onnxruntime is not installed") if providers is None else (True, "ok")
    return DecoderRuntimes(tensorrt=(True, "ok") if trt else (False, "not installed"), onnxruntime=ort,
                           onnxruntime_providers=providers or ())


@pytest.mark.parametrize("requested, device, trt, providers, expected", [
    # a CUDA engine: TensorRT, else onnxruntime on its CUDA provider, else PyTorch; never the host CPU
    ("auto", "cuda", True, CUDA_ORT, "tensorrt"),
    ("auto", "cuda", True, None, "tensorrt"),
    ("auto", "cuda", False, CUDA_ORT, "onnxruntime"),
    ("auto", "cuda", False, CPU_ORT, "torch"),
    ("auto", "cuda", False, None, "torch"),
    ("onnxruntime", "cuda", True, CPU_ORT, "torch"),
    ("onnxruntime", "cuda", False, CUDA_ORT, "onnxruntime"),
    ("tensorrt", "cuda", False, CUDA_ORT, "torch"),
    ("torch", "cuda", True, CUDA_ORT, "torch"),
    # a CPU engine: auto stays on PyTorch; onnxruntime's CPU provider when asked for
    ("auto", "cpu", True, CUDA_ORT, "torch"),
    ("auto", "cpu", False, CPU_ORT, "torch"),
    ("onnxruntime", "cpu", False, CPU_ORT, "onnxruntime"),
    ("onnxruntime", "cpu", False, None, "torch"),
    ("tensorrt", "cpu", True, CUDA_ORT, "torch"),
])
def test_choose_decoder_backend(requested, device, trt, providers, expected):
    backend, why = choose_decoder_backend(requested, device, _host(trt, providers))
    assert backend == expected
    fastest = backend == requested or (requested == "auto" and backend == "tensorrt")
    assert (why == "") == fastest, why  # every fallback says why
    if device == "cuda" and providers == CPU_ORT and backend == "torch":
        assert "no CUDAExecutionProvider" in why and "host CPU" in why


def test_auto_on_a_cuda_engine_never_takes_onnxruntime_on_the_host(monkeypatch, caplog):
    """The host probed as it is (onnxruntime's provider list and TensorRT's status patched), no CUDA tensor made."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    monkeypatch.setattr("lipforcing.compile.decoder.tensorrt_status", lambda: (False, "not installed"))
    monkeypatch.setattr(ort, "get_available_providers", lambda: list(CPU_ORT))
    with caplog.at_level(logging.WARNING, logger="lipforcing"):
        assert select_decoder_backend("auto", "cuda") == "torch"
        assert select_decoder_backend("onnxruntime", "cuda") == "torch"
    assert caplog.text.count("no CUDAExecutionProvider") == 2
    assert select_decoder_backend("onnxruntime", "cpu") == "onnxruntime"
    monkeypatch.setattr(ort, "get_available_providers", lambda: list(CUDA_ORT))
    assert select_decoder_backend("auto", "cuda") == "onnxruntime"
    monkeypatch.setattr("lipforcing.compile.decoder.tensorrt_status", lambda: (True, "ok"))
    assert select_decoder_backend("auto", "cuda") == "tensorrt"


def test_onnxruntime_session_that_lands_on_the_host_falls_back_to_torch(monkeypatch, caplog, tmp_path):
    """The CUDA provider listed but not loaded (the session runs on the CPU provider): a CUDA engine gets the
    PyTorch decoder, and its ``backend`` says so."""
    import lipforcing.compile.onnx_export as onnx_export

    class HostSession:
        provider = "CPUExecutionProvider"

        def __init__(self, path, device=None, stream=None):
            pass

    monkeypatch.setattr("lipforcing.compile.decoder.probe_decoder_runtimes",
                        lambda: _host(False, CUDA_ORT))
    monkeypatch.setattr("lipforcing.compile.decoder.decoder_onnx", lambda *a, **k: tmp_path / "decoder.onnx")
    monkeypatch.setattr(onnx_export, "OnnxStepRunner", HostSession)
    with caplog.at_level(logging.WARNING, logger="lipforcing"):
        decoder = make_decoder_backend(TAEHV(SMALL).eval(), "auto", latent_hw=(4, 6), device="cuda")
    assert decoder.backend == "torch"
    assert "CUDA provider did not load" in caplog.text


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
