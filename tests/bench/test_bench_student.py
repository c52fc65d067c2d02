"""pytest-benchmark timings of the student's chunk: the reference scheduler vs the static scheduler.

    pytest tests/bench/test_bench_student.py --benchmark-columns=median,iqr,rounds

One round = one steady-state chunk (two denoising calls and the commit call) followed by a device
synchronisation; warm-up rounds (graph capture, kernel tuning, chunks 0 and 1) are excluded. On CUDA the
1.3B model at 512x512 with random weights; on a CPU the tiny model at 64x64 and a few rounds (CPU figures, in
the default run). The two timed schedulers compute the same chunks (checked here on the benchmark's inputs).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import TOLERANCE
from lipforcing.engine.dit.build import random_student
from lipforcing.engine.dit.config import ModelConfig, StreamConfig
from lipforcing.engine.numerics import rel_error
from lipforcing.engine.runtime.sampler import StreamingSampler
from lipforcing.engine.runtime.static import StaticStudent

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(importlib.util.find_spec("pytest_benchmark") is None,
                                reason="pytest-benchmark is not installed")
ROUNDS, WARMUP = (10, 3) if CUDA else (3, 1)  # a CPU run is the default suite's: a few rounds


@pytest.fixture(scope="module")
def setup():
    device = torch.device("cuda" if CUDA else "cpu")
    name, size, dtype = ("1.3b", 512, torch.bfloat16) if CUDA else ("tiny", 64, torch.float32)
    model = random_student(ModelConfig.from_name(name), device=device, dtype=dtype)
    stream = StreamConfig.for_resolution(size, size)
    n = 3 * (ROUNDS + WARMUP + 3)
    g = torch.Generator().manual_seed(0)
    clip = (torch.randn(1, model.cfg.text_len, model.cfg.text_dim, generator=g),
            torch.randn(1, 1 + 4 * (n - 1), model.cfg.audio_dim, generator=g),
            torch.randn(1, 16, 1, stream.latent_h, stream.latent_w, generator=g),
            (torch.rand(1, 1, 1, stream.latent_h, stream.latent_w, generator=g) > 0.6).float())
    lat = torch.randn(1, 16, 3, stream.latent_h, stream.latent_w, generator=g).to(device)
    return model, stream, clip, lat, device


def _bench(benchmark, step, device) -> torch.Tensor:
    def call():
        out = step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    for _ in range(3):  # chunk 0, chunk 1, first steady-state chunk: untimed
        call()
    return benchmark.pedantic(call, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)


def _reference_sampler(setup) -> StreamingSampler:
    model, stream, clip, _, _ = setup
    sampler = StreamingSampler(model, stream, backend="reference")
    sampler.start_clip(*clip)
    return sampler


def _static_scheduler(setup) -> StaticStudent:
    model, stream, clip, _, _ = setup
    student = StaticStudent(model, stream)
    student.start_clip(*clip)
    return student


def test_chunk_reference_sampler(benchmark, setup):
    lat, device = setup[3], setup[4]
    sampler = _reference_sampler(setup)
    x0 = _bench(benchmark, lambda: sampler.denoise_chunk(lat, lat).x0, device)
    assert x0.shape == lat.shape and torch.isfinite(x0).all()


def test_chunk_static_scheduler(benchmark, setup):
    lat, device = setup[3], setup[4]
    student = _static_scheduler(setup)
    x0 = _bench(benchmark, lambda: student.run_chunk(lat, lat), device)
    assert x0.shape == lat.shape and torch.isfinite(x0).all()


def test_the_timed_schedulers_compute_the_same_chunks(setup):
    """Chunk 0, chunk 1 and a steady-state chunk of the benchmark's clip: the static scheduler's x0 equals the
    reference sampler's (one seed), so the two timings compare the same work."""
    lat, device = setup[3], setup[4]
    tolerance = TOLERANCE[torch.bfloat16 if device.type == "cuda" else torch.float32]
    sampler, student = _reference_sampler(setup), _static_scheduler(setup)
    for chunk in range(3):
        expected = sampler.denoise_chunk(lat, lat).x0
        assert rel_error(student.run_chunk(lat, lat).float(), expected.float()) < tolerance, chunk
