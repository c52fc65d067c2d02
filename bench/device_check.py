"""Correctness of every fast path on the device itself, at the real widths, in the engine's dtype: no golden files.

    python -m lipforcing.bench.device_check --out check.json                 # 1.3B and 14B widths, 2 blocks, bf16
    python -m lipforcing.bench.device_check --models tiny --device cpu       # the same checks on a CPU (dry run)

The CPU ties the reference path to the original network (``lipforcing check-reference`` on the golden files);
this module ties each fast path to the reference path on the same device, on fresh random inputs:

- ``kernels``: the Triton backend (fused attention with RoPE, norms, modulation, residuals) against the reference
  backend (float64 RoPE + PyTorch SDPA), the streaming sampler over every window shape (chunk 0, chunk 1,
  steady state), per model width. Reported: relative L2 error of x0 per chunk (bf16 operands: ~1e-2 is
  rounding; what matters is that it stays flat across chunks, where a wrong cache or RoPE position would grow).
- ``sdpa``: the sdpa backend (the window rotated once per call, PyTorch SDPA or flash-attn) against the same
  reference, with the same bound.
- ``graphs``: the static scheduler replayed from CUDA graphs against the same scheduler run eagerly (the same
  kernels: equal up to autotuning picking another tile between the two), and against the reference sampler.
- ``streams``: the chunk pipeline on three device streams against the same pipeline run in turn, with the
  TAEHV encoder and decoder (random weights) at 512x512: the frames must be equal.
- ``fp8``: the same weights quantised (``--dtype fp8``): one block GEMM (``torch._scaled_mm`` on Hopper)
  against its dequantised product, the fp8 student against the unquantised one, and its Triton attention
  (reading the e4m3 cache directly) against its reference backend.

Models are reduced in depth (``--layers``, default 2 blocks) and kept at their full width, heads and token
counts: every kernel sees the real shapes, and a step costs seconds. Each check's figures are written to
``--out`` as soon as they exist (``complete`` false until the end); the last stdout line is the JSON document.
Exit status 1 when a check exceeds its bound (``BOUNDS``), 0 otherwise; a check that cannot run here (no CUDA:
no graphs, no streams; no Triton) is listed under ``skipped`` with the reason.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

BOUNDS = {
    # bf16 operands, fp32 accumulation: x0 of a 2-block model at full width differs by ~1e-2 between two
    # correct implementations; 5e-2 leaves room for that and still fails a wrong position or cache layout
    # (those give O(1) errors). fp32 (the CPU dry run): the kernels match to ~1e-6.
    "kernels": {torch.bfloat16: 5e-2, torch.float16: 2e-2, torch.float32: 1e-4},
    # the same kernels with and without graphs: equal up to the autotuner choosing another tile between runs
    "graphs": {torch.bfloat16: 5e-2, torch.float16: 2e-2, torch.float32: 1e-5},
    "streams": {torch.bfloat16: 0.0, torch.float16: 0.0, torch.float32: 0.0},
    # fp8 (e4m3) against the same model unquantised: one e4m3 GEMM is within 5.1% RMS (tests/dit/test_fp8.py
    # derives it), plus the dtype's own rounding
    "fp8": {torch.bfloat16: 0.1, torch.float16: 0.08, torch.float32: 0.051},
    # torch._scaled_mm against the same e4m3 values dequantised and multiplied in float32: the output's rounding
    "fp8_gemm": {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5},
}
CHUNKS = 3  # chunk 0, chunk 1, one steady-state chunk: every window shape


def _timed(device: torch.device, fn):
    """(result, milliseconds) of fn(), synchronised on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    began = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, 1e3 * (time.perf_counter() - began)


def _clip_inputs(cfg, stream, device: torch.device, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    h, w, latents = stream.latent_h, stream.latent_w, CHUNKS * stream.chunk_frames

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device)

    return dict(text=rand(1, cfg.text_len, cfg.text_dim), audio=rand(1, 1 + 4 * (latents - 1), cfg.audio_dim),
                ref=rand(1, 16, 1, h, w), mask=(torch.rand(1, 1, 1, h, w, generator=g) > 0.5).float().to(device),
                masked=rand(1, 16, latents, h, w), ref_seq=rand(1, 16, latents, h, w))


def _student_chunks(student, inp: dict, device: torch.device) -> tuple[list[torch.Tensor], list[float]]:
    """x0 of every chunk (copies) and each chunk's milliseconds, for a StreamingSampler or a StaticStudent."""
    student.start_clip(inp["text"], inp["audio"], inp["ref"], inp["mask"])
    outs, times = [], []
    for b in range(CHUNKS):
        sl = slice(3 * b, 3 * b + 3)
        x0, ms = _timed(device, lambda sl=sl: student.run_chunk(inp["masked"][:, :, sl], inp["ref_seq"][:, :, sl]))
        outs.append(x0.float().clone())
        times.append(round(ms, 3))
    return outs, times


def _errors(got: list[torch.Tensor], ref: list[torch.Tensor]) -> list[float]:
    from ..engine.numerics import rel_error

    return [float(f"{rel_error(g, r):.3e}") for g, r in zip(got, ref)]


def check_model(name: str, layers: int, device: torch.device, dtype: torch.dtype, seed: int, size: int = 512) -> dict:
    """The ``kernels`` and ``graphs`` checks of one model width."""
    from ..engine.dit.build import random_student
    from ..engine.dit.config import ModelConfig, StreamConfig
    from ..engine.errors import ConfigError
    from ..engine.runtime.sampler import StreamingSampler
    from ..engine.runtime.static import StaticStudent

    full = ModelConfig.from_name(name)
    cfg = full if name == "tiny" else full.replace(num_layers=layers, audio_blocks=tuple(range(min(2, layers))))
    stream = StreamConfig.for_resolution(size, size)
    model = random_student(cfg, device=device, dtype=dtype, seed=seed)
    inp = _clip_inputs(cfg, stream, device, seed + 1)
    entry = {"model": name, "layers": cfg.num_layers, "dim": cfg.dim, "heads": cfg.num_heads,
             "dtype": str(dtype).removeprefix("torch."), "skipped": []}
    reference = StreamingSampler(model, stream, backend="reference", seed=seed)
    reference.warm_up(inp["text"])
    ref, entry["reference_chunk_ms"] = _student_chunks(reference, inp, device)
    try:
        triton = StreamingSampler(model, stream, backend="triton", seed=seed)
    except ConfigError as exc:
        entry["skipped"].append(f"kernels: {exc}")
        triton = None
    if triton is not None:
        triton.warm_up(inp["text"])
        got, entry["triton_chunk_ms"] = _student_chunks(triton, inp, device)
        entry["kernels_rel_err"] = _errors(got, ref)
    sdpa = StreamingSampler(model, stream, backend="sdpa", seed=seed)
    sdpa.warm_up(inp["text"])
    got, entry["sdpa_chunk_ms"] = _student_chunks(sdpa, inp, device)
    entry["sdpa_rel_err"] = _errors(got, ref)
    del sdpa
    _check_fp8(entry, model, stream, inp, ref, device, seed, triton is not None)
    backend = "triton" if triton is not None else "reference"
    eager = StaticStudent(model, stream, backend=backend, seed=seed, cuda_graphs=False)
    eager.warm_up(inp["text"])
    eager_out, entry["static_eager_chunk_ms"] = _student_chunks(eager, inp, device)
    entry["static_vs_reference_rel_err"] = _errors(eager_out, ref)
    if device.type != "cuda":
        entry["skipped"].append("graphs: no CUDA device")
        return entry
    graphs = StaticStudent(model, stream, backend=backend, seed=seed, cuda_graphs=True)
    entry["graph_warm_up_s"] = round(graphs.warm_up(inp["text"]), 3)
    got, entry["graphs_chunk_ms"] = _student_chunks(graphs, inp, device)
    entry["graphs_rel_err"] = _errors(got, eager_out)
    entry["graphs_captured"] = len(graphs.graphs)
    del graphs, eager, triton, reference, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return entry


def check_streams(device: torch.device, dtype: torch.dtype, seed: int) -> dict:
    """The ``streams`` check: the 1.3B-wide student (2 blocks) with the TAEHV codecs at 512x512, pipelined on
    three streams and in turn; frames must be equal."""
    from ..engine.codecs.latent import make_decoder, make_encoder
    from ..engine.codecs.taehv import TAEHV, TAEHVConfig
    from ..engine.dit.build import random_student
    from ..engine.dit.config import ModelConfig, StreamConfig
    from ..engine.numerics import built_in
    from ..engine.runtime.pipeline import ChunkPipeline, DeviceStreams
    from ..engine.runtime.static import StaticStudent

    if device.type != "cuda":
        return {"skipped": ["streams: no CUDA device (the pipeline runs its stages in turn on a CPU)"]}
    cfg = ModelConfig.from_name("1.3b").replace(num_layers=2, audio_blocks=(0, 1))
    stream = StreamConfig.for_resolution(512, 512)
    model = random_student(cfg, device=device, dtype=dtype, seed=seed)
    torch.manual_seed(seed)
    with built_in(dtype, device):
        taehv = TAEHV(TAEHVConfig()).eval()
    inp = _clip_inputs(cfg, stream, device, seed + 2)
    g = torch.Generator().manual_seed(seed + 3)
    crops = [torch.rand(9 if b == 0 else 12, 3, 512, 512, generator=g).to(device) * 2 - 1 for b in range(CHUNKS)]
    keep = torch.ones(512, 512, device=device)
    keep[300:450, 150:362] = 0
    runs, times = [], []
    for parallel in (False, True):
        student = StaticStudent(model, stream, seed=seed, cuda_graphs=True)
        student.warm_up(inp["text"])
        pipe = ChunkPipeline(student, make_encoder("taehv", taehv=taehv), make_decoder("taehv", taehv=taehv), keep,
                             streams=DeviceStreams(device, enabled=parallel))
        pipe.start_clip(inp["text"], inp["audio"], inp["mask"])

        def run(pipe=pipe):
            frames = []
            for chunk in crops:
                result = pipe.submit(chunk)
                if result.done is not None:
                    result.done.synchronize()
                frames.append(result.frames.float().clone())
            return torch.cat(frames)

        frames, ms = _timed(device, run)
        runs.append(frames)
        times.append(round(ms, 3))
    return {"frames": int(runs[0].shape[0]), "streams_rel_err": _errors([runs[1]], [runs[0]])[0],
            "sequential_ms": times[0], "streams_ms": times[1], "skipped": []}


def _check_fp8(entry: dict, model, stream, inp: dict, ref: list, device: torch.device, seed: int,
               triton: bool) -> None:
    """The ``fp8`` checks (see the module docstring), written into ``entry``."""
    import torch.nn.functional as F

    from ..engine.dit.fp8 import fp8_gemm_available, quantize, quantized_copy
    from ..engine.runtime.sampler import StreamingSampler

    fp8 = quantized_copy(model)
    layer = fp8.blocks[0].ffn[0]
    x = torch.randn(3072, layer.in_features, device=device, generator=torch.Generator(device).manual_seed(seed))
    xq, xs = quantize(x.to(fp8.dtype), dim=-1)
    by_hand = F.linear(xq.float() * xs, layer.dequantized_weight(), layer.bias.float())
    entry["fp8_gemm"] = "torch._scaled_mm" if fp8_gemm_available(device) else "dequantised fp32 matmul"
    entry["fp8_gemm_rel_err"] = _errors([layer(x)], [by_hand])
    f8_ref = StreamingSampler(fp8, stream, backend="reference", seed=seed)
    f8_ref.warm_up(inp["text"])
    got_ref, entry["fp8_reference_chunk_ms"] = _student_chunks(f8_ref, inp, device)
    entry["fp8_vs_unquantised_rel_err"] = _errors(got_ref, ref)
    if triton:
        f8_triton = StreamingSampler(fp8, stream, backend="triton", seed=seed)
        f8_triton.warm_up(inp["text"])
        got, entry["fp8_triton_chunk_ms"] = _student_chunks(f8_triton, inp, device)
        entry["fp8_kernels_rel_err"] = _errors(got, got_ref)


def _failures(document: dict, dtype: torch.dtype) -> list[str]:
    failures = []
    for entry in document["models"]:
        for key, bound_key in (("kernels_rel_err", "kernels"), ("sdpa_rel_err", "kernels"),
                               ("graphs_rel_err", "graphs"), ("static_vs_reference_rel_err", "kernels"),
                               ("fp8_gemm_rel_err", "fp8_gemm"), ("fp8_vs_unquantised_rel_err", "fp8"),
                               ("fp8_kernels_rel_err", "kernels")):
            worst = max(entry.get(key, [0.0]))
            if not worst <= BOUNDS[bound_key][dtype]:  # NaN fails too
                failures.append(f"{entry['model']}: {key} {worst:.3e} > {BOUNDS[bound_key][dtype]:.0e}")
    err = document.get("streams", {}).get("streams_rel_err")
    if err is not None and not err <= BOUNDS["streams"][dtype]:
        failures.append(f"streams_rel_err {err:.3e} > {BOUNDS['streams'][dtype]:.0e}")
    return failures


def _write(document: dict, out: Path | None) -> None:
    if out is not None:
        tmp = out.with_name(f".{out.name}.partial")
        tmp.write_text(json.dumps(document, indent=1))
        tmp.replace(out)


def main(argv: list[str] | None = None) -> int:
    from ..engine.numerics import parse_dtype

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="1.3b,14b", help="comma-separated presets at full width: tiny, 1.3b, 14b")
    parser.add_argument("--layers", type=int, default=2, help="blocks of each model (the width stays real)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                        help="default: bf16 on CUDA, fp32 on a CPU")
    parser.add_argument("--size", type=int, default=512, help="face crop in pixels (the latent grid is size / 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the JSON document here (after every check)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = parse_dtype(args.dtype or ("bf16" if device.type == "cuda" else "fp32"))
    if args.layers < 1:
        parser.error("--layers must be at least 1")
    models = [m.strip().lower() for m in args.models.split(",") if m.strip()]
    document = {"check": "device", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."), "bounds": {
                    k: v[dtype] for k, v in BOUNDS.items()}, "complete": False, "models": []}
    for name in models:
        entry = check_model(name, args.layers, device, dtype, args.seed, args.size)
        document["models"].append(entry)
        _write(document, args.out)
        times = {k: statistics.median(v) for k, v in entry.items() if k.endswith("_chunk_ms")}
        print(f"{name}: kernels {entry.get('kernels_rel_err')} sdpa {entry['sdpa_rel_err']} "
              f"graphs {entry.get('graphs_rel_err')} "
              f"static {entry['static_vs_reference_rel_err']} | median ms/chunk "
              + ", ".join(f"{k.removesuffix('_chunk_ms')} {v:.1f}" for k, v in times.items()), flush=True)
    document["streams"] = check_streams(device, dtype, args.seed)
    document["failures"] = _failures(document, dtype)
    document["complete"] = True
    _write(document, args.out)
    for line in document["failures"]:
        print(f"FAIL {line}")
    print(json.dumps(document))
    return 1 if document["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
