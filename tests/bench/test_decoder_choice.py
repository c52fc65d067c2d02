"""The benchmark's "+decoder" variant takes the engine's rule: on CUDA, never onnxruntime without its CUDA
provider (it would decode on the host CPU); on the CPU, onnxruntime's CPU provider."""

from __future__ import annotations

import pytest
import torch

from lipforcing.bench.session import _best_decoder_backend


@pytest.fixture
def onnxruntime(monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    monkeypatch.setattr("lipforcing.compile.decoder.tensorrt_status", lambda: (False, "not installed"))
    return ort


def test_cuda_bench_without_the_cuda_provider_has_no_compiled_decoder(onnxruntime, monkeypatch):
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    backend, why = _best_decoder_backend(torch.device("cuda"))
    assert backend is None and "no CUDAExecutionProvider" in why and "TensorRT: not installed" in why


def test_cuda_bench_takes_onnxruntime_on_its_cuda_provider(onnxruntime, monkeypatch):
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert _best_decoder_backend(torch.device("cuda")) == ("onnxruntime", "TensorRT: not installed")


def test_cpu_bench_takes_onnxruntime_on_the_cpu(onnxruntime, monkeypatch):
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    backend, why = _best_decoder_backend(torch.device("cpu"))
    assert backend == "onnxruntime" and why.startswith("TensorRT:")
