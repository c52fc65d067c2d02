"""Triton kernels vs the PyTorch paths they replace, on one CUDA GPU, at the real shapes.

    python -m lipforcing.bench.bench_kernels                     # both models, all windows
    python -m lipforcing.bench.bench_kernels --models 14b --out kernels.json

What is timed: GPU time of one call, from the first kernel launch to the end of the last one, measured by
``triton.testing.do_bench`` (CUDA events, L2 flushed before every run, warm-up runs excluded, median of
the runs over ``--rep-ms``). Every variant is called once before timing, so autotuning and
``torch.compile`` are excluded too. Inputs are bf16 (the engine's dtype) unless stated.

Attention (B=1, Lq=3072 = 3 latent frames of 32x32 tokens at 512x512, D=128, H=12 for 1.3B / 40 for 14B,
Lk = 3072 / 6144 / 7168 = windows of 3 / 6 / 7 frames), TFLOP/s from FLOPs = 4 B H Lq Lk D:
- triton_fused:   sink_window_attention: RoPE fused, the raw cache read in place (the engine's path).
- rope_cat_sdpa:  the unfused path it replaces: concatenate cache and live K/V, rotate q and k with
                  precomputed fp32 cos/sin, scaled_dot_product_attention with the fastest backend.
- sdpa_<backend>: SDPA alone on pre-rotated contiguous [B, H, L, D] inputs (a lower bound that ignores
                  RoPE and the concatenation), per backend (flash, efficient, cudnn).
- flex_attention: torch.compile(flex_attention) on the same pre-rotated inputs (no mask: full window).
- flash_attn:     flash_attn_func on pre-rotated [B, L, H, D] inputs, when the package is importable.

Elementwise ops (3072 tokens, width 1536 / 5120), GB/s = bytes the op must read and write / time, vs the
unfused PyTorch sequence of the released code (eager) and the same sequence under torch.compile.

The last stdout line is one JSON document (also written to ``--out``). Without CUDA it prints why and
exits 0 with {"cuda": false, ...}.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

MODELS = {"1.3b": {"heads": 12, "dim": 1536}, "14b": {"heads": 40, "dim": 5120}}
HEAD_DIM = 128
PAIRS_THW = (22, 21, 21)
GRID_HW = (32, 32)
CHUNK_FRAMES = 3
# Cached frames -> window: chunk 0 (3 frames), chunk 1 (6 frames), steady state (7 frames), SPEC §5.
WINDOWS = {3: ([], [0, 1, 2]), 6: ([0, 1, 2], [3, 4, 5]), 7: ([0, 1, 2, 3], [4, 5, 6])}
EPS = 1e-6


def median_ms(fn: Callable[[], object], rep_ms: int) -> float:
    from triton.testing import do_bench

    fn()  # autotuning, compilation, lazy init
    torch.cuda.synchronize()
    return float(do_bench(fn, warmup=max(10, rep_ms // 4), rep=rep_ms, return_mode="median"))


def try_variant(name: str, make: Callable[[], Callable[[], object]], rep_ms: int) -> tuple[dict, object]:
    """Build and time one variant; a failure is recorded in the result (and printed), not raised."""
    try:
        fn = make()
        out = fn()
        return {"variant": name, "ms": median_ms(fn, rep_ms)}, out
    except Exception as err:  # an unavailable backend or a compile failure must not stop the others
        message = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        print(f"  {name}: unavailable ({message})")
        return {"variant": name, "error": message}, None


# --- attention -----------------------------------------------------------------------------------------


def rope_tables(frame_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [1, L, 1, D/2] fp32 of the tokens of frames at ``frame_pos`` (host-side plan)."""
    from lipforcing.kernels.rope import rope_angles

    angles = rope_angles(frame_pos, *GRID_HW, PAIRS_THW).float()
    return angles.cos()[None, :, None], angles.sin()[None, :, None]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of x [B, L, H, D] with pairs (2j, 2j+1), fp32 math, result in x's dtype."""
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], -1).flatten(-2).to(x.dtype)


def sdpa_backends() -> dict[str, object]:
    from torch.nn.attention import SDPBackend

    return {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
    }


def sdpa_with(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    return run


def bench_attention(model: str, window: int, rep_ms: int, device: str = "cuda", compiled: bool = True) -> dict:
    from lipforcing.kernels.sink_window_attention import sink_window_attention

    heads = MODELS[model]["heads"]
    cache_pos, q_pos = WINDOWS[window]
    tokens = GRID_HW[0] * GRID_HW[1]
    lq, lc = len(q_pos) * tokens, len(cache_pos) * tokens
    lk = lq + lc
    dev, dtype = torch.device(device), torch.bfloat16

    def rand(length):
        return torch.randn(1, length, heads, HEAD_DIM, device=dev, dtype=dtype)

    q, k_live, v_live = rand(lq), rand(lq), rand(lq)
    # The cache is a view of a preallocated 7-frame buffer, as in the engine.
    k_buf, v_buf = rand(7 * tokens), rand(7 * tokens)
    k_cache, v_cache = k_buf[:, :lc], v_buf[:, :lc]
    q_frame_pos = torch.tensor(q_pos, dtype=torch.int32, device=dev)
    cache_frame_pos = torch.tensor(cache_pos, dtype=torch.int32, device=dev)
    key_pos = torch.cat([cache_frame_pos, q_frame_pos])
    q_cos, q_sin = rope_tables(q_frame_pos)
    k_cos, k_sin = rope_tables(key_pos)

    # Pre-rotated contiguous [B, H, L, D] inputs for the attention-only variants.
    q_rot = rotate(q, q_cos, q_sin).transpose(1, 2).contiguous()
    k_rot = rotate(torch.cat([k_cache, k_live], 1), k_cos, k_sin).transpose(1, 2).contiguous()
    v_all = torch.cat([v_cache, v_live], 1).transpose(1, 2).contiguous()

    flops = 4 * heads * lq * lk * HEAD_DIM
    results, outputs = [], {}

    def record(name, make):
        result, out = try_variant(name, make, rep_ms)
        if "ms" in result:
            result["tflops"] = flops / (result["ms"] * 1e-3) / 1e12
        results.append(result)
        if out is not None:
            outputs[name] = out

    out_buf = torch.empty_like(q)
    record("triton_fused", lambda: lambda: sink_window_attention(
        q, k_live, v_live, k_cache, v_cache, q_frame_pos, cache_frame_pos, GRID_HW, PAIRS_THW, out=out_buf))

    sdpa_ms = {}
    for name, backend in sdpa_backends().items():
        run = sdpa_with(backend)
        record(f"sdpa_{name}", lambda run=run: lambda: run(q_rot, k_rot, v_all))
        if "ms" in results[-1]:
            sdpa_ms[name] = results[-1]["ms"]
    best = min(sdpa_ms, key=sdpa_ms.get) if sdpa_ms else None

    def unfused():
        run = sdpa_with(sdpa_backends()[best]) if best else torch.nn.functional.scaled_dot_product_attention

        def call():
            k = rotate(torch.cat([k_cache, k_live], 1), k_cos, k_sin)
            v = torch.cat([v_cache, v_live], 1)
            qr = rotate(q, q_cos, q_sin)
            return run(qr.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

        return call

    record(f"rope_cat_sdpa_{best or 'default'}", unfused)

    def flex():
        from torch.nn.attention.flex_attention import flex_attention

        compiled = torch.compile(flex_attention, dynamic=False)
        return lambda: compiled(q_rot, k_rot, v_all)

    if compiled:
        record("flex_attention", flex)

    def flash_attn():
        from flash_attn import flash_attn_func

        q_, k_, v_ = (t.transpose(1, 2).contiguous() for t in (q_rot, k_rot, v_all))
        return lambda: flash_attn_func(q_, k_, v_)

    record("flash_attn", flash_attn)

    entry = {"model": model, "heads": heads, "window_frames": window, "lq": lq, "lk": lk, "head_dim": HEAD_DIM,
             "dtype": "bfloat16", "gflop": flops / 1e9, "variants": results}
    if "triton_fused" in outputs and best and f"sdpa_{best}" in outputs:
        ref = outputs[f"sdpa_{best}"].transpose(1, 2).float()
        got = outputs["triton_fused"].float()
        entry["triton_rel_err_vs_sdpa"] = float((got - ref).norm() / ref.norm())
    return entry


# --- elementwise ---------------------------------------------------------------------------------------


def elementwise_cases(dim: int, tokens: int, device: str = "cuda") -> list[dict]:
    """(name, bytes moved, fused call, unfused eager call) per op at one width."""
    from lipforcing.kernels.flow_update import flow_update
    from lipforcing.kernels.gated_residual import gated_residual
    from lipforcing.kernels.norm_modulation import modulated_layer_norm
    from lipforcing.kernels.rms_norm import rms_norm

    dev, act = torch.device(device), torch.bfloat16
    frames = CHUNK_FRAMES
    x = torch.randn(1, tokens, dim, device=dev, dtype=act)
    y = torch.randn(1, tokens, dim, device=dev, dtype=act)
    table = torch.randn(1, frames, 6, dim, device=dev) * 0.1     # fp32 modulation, as released
    shift, scale, gate = table[:, :, 0], table[:, :, 1], table[:, :, 2]
    weight = torch.randn(dim, device=dev, dtype=act)
    per_frame = (1, frames, tokens // frames, dim)

    def mln_unfused(x, scale, shift):
        normed = torch.nn.functional.layer_norm(x.float(), (dim,), eps=EPS).type_as(x)
        out = normed.float().reshape(per_frame) * (1 + scale[:, :, None]) + shift[:, :, None]
        return out.reshape(x.shape).to(x.dtype)

    def residual_unfused(x, y, gate):
        return (x.float().reshape(per_frame) + y.float().reshape(per_frame) * gate[:, :, None]).reshape(x.shape).to(
            x.dtype
        )

    def rms_unfused(x, weight):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).type_as(x) * weight

    latent = (1, 16, frames, 2 * GRID_HW[0], 2 * GRID_HW[1])
    v_tok = torch.randn(1, tokens, 64, device=dev, dtype=act)
    x_t = torch.randn(latent, device=dev)
    noise = torch.randn(latent, device=dev)

    def flow_unfused(v_tok, x_t, noise):
        b, c, f, h, w = x_t.shape
        v = v_tok.reshape(b, f, h // 2, w // 2, 2, 2, c).permute(0, 6, 1, 2, 4, 3, 5).reshape(x_t.shape)
        x0 = (x_t.double() - 0.999 * v.double()).to(x_t.dtype)
        return x0, ((1 - 0.769) * x0 + 0.769 * noise).to(x_t.dtype)

    act_bytes = tokens * dim * x.element_size()
    return [
        dict(name="modulated_layer_norm", bytes=2 * act_bytes + 2 * frames * dim * 4,
             fused=lambda: modulated_layer_norm(x, scale, shift, EPS), unfused=mln_unfused, args=(x, scale, shift)),
        dict(name="gated_residual", bytes=3 * act_bytes + frames * dim * 4,
             fused=lambda: gated_residual(x, y, gate), unfused=residual_unfused, args=(x, y, gate)),
        dict(name="rms_norm", bytes=2 * act_bytes + dim * weight.element_size(),
             fused=lambda: rms_norm(x, weight, EPS), unfused=rms_unfused, args=(x, weight)),
        dict(name="flow_update_renoise", bytes=v_tok.numel() * 2 + 4 * x_t.numel() * 4,
             fused=lambda: flow_update(v_tok, x_t, 0.999, 0.769, noise), unfused=flow_unfused,
             args=(v_tok, x_t, noise)),
    ]


def bind(fn: Callable, args: tuple) -> Callable[[], object]:
    return lambda: fn(*args)


def bench_elementwise(model: str, tokens: int, rep_ms: int, device: str = "cuda", compiled: bool = True) -> list[dict]:
    dim = MODELS[model]["dim"]
    entries = []
    for case in elementwise_cases(dim, tokens, device):
        variants = []
        makers = {
            "triton_fused": lambda case=case: case["fused"],
            "torch_eager": lambda case=case: bind(case["unfused"], case["args"]),
        }
        if compiled:
            makers["torch_compile"] = lambda case=case: bind(torch.compile(case["unfused"], dynamic=False),
                                                             case["args"])
        for name, make in makers.items():
            result, _ = try_variant(name, make, rep_ms)
            if "ms" in result:
                result["gbps"] = case["bytes"] / (result["ms"] * 1e-3) / 1e9
            variants.append(result)
        entries.append({"op": case["name"], "model": model, "dim": dim, "tokens": tokens, "bytes": case["bytes"],
                        "variants": variants})
    return entries


# --- main ----------------------------------------------------------------------------------------------


def summary_line(entry: dict, unit: str) -> str:
    cells = []
    for v in entry["variants"]:
        cells.append(f"{v['variant']} {v['ms']:.3f} ms {v[unit]:.1f}" if "ms" in v else f"{v['variant']} n/a")
    return " | ".join(cells)


def save(document: dict, out: Path | None) -> None:
    """Write the document as it stands (atomically: a kill never leaves half a file)."""
    if out is not None:
        tmp = out.with_name(f".{out.name}.partial")
        tmp.write_text(json.dumps(document) + "\n")
        tmp.replace(out)


def write(document: dict, out: Path | None) -> None:
    save(document, out)
    print(json.dumps(document))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="1.3b,14b", help="comma-separated presets: 1.3b, 14b")
    parser.add_argument("--windows", default="3,6,7", help="comma-separated window sizes in frames: 3, 6, 7")
    parser.add_argument("--rep-ms", type=int, default=200, help="timed milliseconds per variant (do_bench rep)")
    parser.add_argument("--skip-elementwise", action="store_true", help="attention only")
    parser.add_argument("--no-compile", action="store_true",
                        help="leave out the torch.compile variants (flex_attention, compiled elementwise): their "
                             "compiles cost most of the run")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON document here (rewritten after "
                                                               "every shape, so a killed run keeps what it timed)")
    args = parser.parse_args(argv)
    models = [m.strip().lower() for m in args.models.split(",") if m.strip()]
    windows = [int(w) for w in args.windows.split(",") if w.strip()]
    unknown = [m for m in models if m not in MODELS] + [str(w) for w in windows if w not in WINDOWS]
    if unknown:
        parser.error(f"unknown model or window {unknown}; models {sorted(MODELS)}, windows {sorted(WINDOWS)}")

    if not torch.cuda.is_available():
        print("bench_kernels: CUDA is not available; the kernel benchmarks need a CUDA GPU. Nothing was timed.")
        write({"benchmark": "kernels", "cuda": False, "reason": "cuda unavailable"}, args.out)
        return 0
    from lipforcing.kernels import triton_available

    usable, reason = triton_available(torch.device("cuda"))
    if not usable:
        print(f"bench_kernels: Triton is not usable ({reason}). Nothing was timed.")
        write({"benchmark": "kernels", "cuda": True, "triton": False, "reason": reason}, args.out)
        return 0

    import triton

    document = {
        "benchmark": "kernels", "cuda": True, "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "triton": triton.__version__, "timing": "do_bench median, L2 flushed, ms",
        "attention": [], "elementwise": [],
    }
    print(f"device {document['device']}, torch {torch.__version__}, triton {triton.__version__}")
    compiled = not args.no_compile
    document["complete"] = False
    for model in models:
        for window in windows:
            entry = bench_attention(model, window, args.rep_ms, compiled=compiled)
            document["attention"].append(entry)
            print(f"attention {model} H={entry['heads']} Lk={entry['lk']}: {summary_line(entry, 'tflops')} TFLOP/s")
            save(document, args.out)
        if not args.skip_elementwise:
            for entry in bench_elementwise(model, CHUNK_FRAMES * GRID_HW[0] * GRID_HW[1], args.rep_ms,
                                           compiled=compiled):
                document["elementwise"].append(entry)
                print(f"{entry['op']} {model} dim={entry['dim']}: {summary_line(entry, 'gbps')} GB/s")
            save(document, args.out)
    document["complete"] = True
    write(document, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
