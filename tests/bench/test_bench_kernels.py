"""pytest-benchmark timings of the Triton kernels at the real shapes (CUDA only).

    pytest tests/bench/test_bench_kernels.py --benchmark-columns=median,iqr,rounds

Each timed round is one call followed by torch.cuda.synchronize() (host wall clock of the call, launch
overhead included); warm-up rounds (autotuning, first launch) are excluded. For GPU-only times and the
comparison against SDPA / FlexAttention / flash-attn, run ``python -m lipforcing.bench.bench_kernels``.
Without CUDA only the check that the script exits cleanly runs.
"""

import importlib.util
import json
import os

import pytest
import torch

from lipforcing.bench import bench_kernels

CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
HAS_BENCHMARK = importlib.util.find_spec("pytest_benchmark") is not None
ROUNDS, WARMUP_ROUNDS = 20, 3


def gpu_benchmark(test):
    """Skip without CUDA or without pytest-benchmark (whose ``benchmark`` fixture the test needs)."""
    test = pytest.mark.skipif(not CUDA, reason="needs CUDA (and TRITON_INTERPRET unset)")(test)
    test = pytest.mark.skipif(not HAS_BENCHMARK, reason="pytest-benchmark is not installed")(test)
    return pytest.mark.gpu(test)


def timed(benchmark, fn):
    def call():
        out = fn()
        torch.cuda.synchronize()
        return out

    return benchmark.pedantic(call, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA exit path")
def test_script_without_cuda_prints_json_and_exits_0(tmp_path, capsys):
    out = tmp_path / "kernels.json"
    assert bench_kernels.main(["--out", str(out)]) == 0
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last_line) == json.loads(out.read_text()) and json.loads(last_line)["cuda"] is False


@gpu_benchmark
@pytest.mark.parametrize("window", sorted(bench_kernels.WINDOWS))
@pytest.mark.parametrize("model", sorted(bench_kernels.MODELS))
def test_attention(benchmark, model, window):
    from lipforcing.kernels.sink_window_attention import sink_window_attention

    heads = bench_kernels.MODELS[model]["heads"]
    cache_pos, q_pos = bench_kernels.WINDOWS[window]
    tokens = bench_kernels.GRID_HW[0] * bench_kernels.GRID_HW[1]

    def rand(frames):
        return torch.randn(1, frames * tokens, heads, bench_kernels.HEAD_DIM, device="cuda", dtype=torch.bfloat16)

    q, k_live, v_live, k_cache, v_cache = rand(3), rand(3), rand(3), rand(len(cache_pos)), rand(len(cache_pos))
    q_frame_pos = torch.tensor(q_pos, dtype=torch.int32, device="cuda")
    cache_frame_pos = torch.tensor(cache_pos, dtype=torch.int32, device="cuda")
    out = timed(benchmark, lambda: sink_window_attention(
        q, k_live, v_live, k_cache, v_cache, q_frame_pos, cache_frame_pos, bench_kernels.GRID_HW,
        bench_kernels.PAIRS_THW))
    assert out.shape == q.shape and torch.isfinite(out).all()
    lk = (len(cache_pos) + 3) * tokens
    flops = 4 * heads * q.shape[1] * lk * bench_kernels.HEAD_DIM
    benchmark.extra_info["tflops"] = flops / benchmark.stats.stats.median / 1e12


@gpu_benchmark
@pytest.mark.parametrize("op", ["modulated_layer_norm", "gated_residual", "rms_norm", "flow_update_renoise"])
def test_elementwise_14b(benchmark, op):
    tokens = 3 * bench_kernels.GRID_HW[0] * bench_kernels.GRID_HW[1]
    cases = bench_kernels.elementwise_cases(bench_kernels.MODELS["14b"]["dim"], tokens)
    case = next(c for c in cases if c["name"] == op)
    out = timed(benchmark, case["fused"])
    want = case["unfused"](*case["args"])
    for got, expected in zip(out if isinstance(out, tuple) else (out,), want if isinstance(want, tuple) else (want,)):
        assert (got.double() - expected.double()).norm() / expected.double().norm() < 3e-2
    benchmark.extra_info["gbps"] = case["bytes"] / benchmark.stats.stats.median / 1e9
