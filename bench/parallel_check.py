"""One stream on several ranks against the same stream in one process: equal x0, and what the ranks cost.

    python -m lipforcing.bench.parallel_check --ranks 2,4                       # tiny model, gloo on the CPU
    python -m lipforcing.bench.parallel_check --ranks 2 --model 14b --layers 1   # a 14B-wide block
    python -m lipforcing.bench.parallel_check --ranks 2 --device cuda            # NCCL, one GPU per rank
    python -m lipforcing.bench.parallel_check --ranks 2 --scheduler static       # static buffers (graphs on CUDA)

Each rank runs the streaming sampler with ``SequenceParallel`` (engine/dit/parallel.py) on the same seeded random
weights and inputs; rank 0's x0 of every chunk is compared with one process's (relative L2 error: fp32 rounding,
~1e-7, since the ranks compute the same sums in another order only inside attention). Reported per rank count:
the error and the mean seconds per chunk after the first (the timed region: ``denoise_chunk`` of chunks 1..,
warm-up excluded). The last stdout line is one JSON document; exit status 1 when an error exceeds ``BOUND``.
``fail_rank`` / ``fail_chunk`` make one rank vanish mid-stream (``os._exit``): the tests check that the others
stop with a clear error instead of hanging.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

BOUND = {torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 2e-2}


@dataclasses.dataclass(frozen=True)
class Spec:
    model: str = "tiny"
    layers: int | None = None
    """Blocks (None: the preset's); real presets are reduced in depth, never in width."""
    heads: int | None = None
    """Heads (None: the preset's; the tiny model's 2 are raised to 4 so that 4 ranks split them)."""
    latent: int = 8
    chunks: int = 3
    seed: int = 0
    device: str = "cpu"
    dtype: str = "fp32"
    backend: str = "reference"
    scheduler: str = "reference"
    """reference (the eager sampler) or static (static buffers; CUDA graphs on CUDA)."""
    fail_rank: int | None = None
    fail_chunk: int | None = None


def _config(spec: Spec):
    from ..engine.dit.config import ModelConfig

    cfg = ModelConfig.from_name(spec.model)
    changes = {}
    heads = spec.heads or (4 if spec.model == "tiny" else None)
    if heads:
        changes.update(num_heads=heads, rope_pairs_thw=None)
    if spec.layers:
        kept = tuple(b for b in cfg.audio_blocks if b < spec.layers) or (0,)
        changes.update(num_layers=spec.layers, audio_blocks=kept)
    return cfg.replace(**changes)


def stream_x0(rank: int, world: int, spec: Spec) -> dict:
    """Run the stream as rank ``rank`` of ``world`` (world 1: one process, no group); x0 per chunk on rank 0."""
    from ..engine.dit.build import random_student
    from ..engine.dit.config import StreamConfig
    from ..engine.dit.parallel import SequenceParallel
    from ..engine.numerics import parse_dtype
    from ..engine.runtime.sampler import StreamingSampler

    device = torch.device(f"cuda:{rank}" if spec.device == "cuda" else spec.device)
    cfg = _config(spec)
    stream = StreamConfig(latent_h=spec.latent, latent_w=spec.latent)
    model = random_student(cfg, device=device, dtype=parse_dtype(spec.dtype), seed=spec.seed)
    g = torch.Generator().manual_seed(spec.seed + 1)
    latents = 3 * spec.chunks
    hw = (spec.latent, spec.latent)
    text = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g)
    audio = torch.randn(1, 1 + cfg.audio_frames_per_latent * (latents - 1), cfg.audio_dim, generator=g)
    ref, mask = torch.randn(1, 16, 1, *hw, generator=g), (torch.rand(1, 1, 1, *hw, generator=g) > 0.5).float()
    masked, ref_seq = torch.randn(1, 16, latents, *hw, generator=g), torch.randn(1, 16, latents, *hw, generator=g)
    parallel = SequenceParallel() if world > 1 else None
    if spec.scheduler == "static":
        from ..engine.runtime.static import StaticStudent

        sampler = StaticStudent(model, stream, backend=spec.backend, seed=spec.seed, parallel=parallel)
        sampler.warm_up(text)
    else:
        sampler = StreamingSampler(model, stream, backend=spec.backend, seed=spec.seed, parallel=parallel)
    sampler.start_clip(text, audio, ref, mask)
    x0, seconds = [], []
    for c in range(spec.chunks):
        if rank == spec.fail_rank and c == spec.fail_chunk:
            os._exit(3)  # vanish mid-stream, as a crashed or killed rank does
        began = time.perf_counter()
        out = sampler.run_chunk(masked[:, :, 3 * c : 3 * c + 3], ref_seq[:, :, 3 * c : 3 * c + 3])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - began)
        x0.append(out.float().cpu())
    timed = seconds[1:] or seconds
    return {"x0": torch.cat(x0, 2) if rank == 0 else None, "chunk_s": sum(timed) / len(timed),
            "cache_heads": sampler.cache.k.shape[-2]}


def check(spec: Spec, ranks: list[int]) -> dict:
    """Every rank count against one process: error, seconds per chunk, KV-cache heads per rank."""
    from ..engine.numerics import parse_dtype, rel_error
    from ..engine.runtime.ranks import launch_ranks

    one = stream_x0(0, 1, spec)
    backend = "nccl" if spec.device == "cuda" else "gloo"
    document = {"spec": dataclasses.asdict(spec), "scheme": "sequence parallel (all-to-all over heads)",
                "one_process_chunk_s": round(one["chunk_s"], 4), "ranks": {}, "failures": []}
    bound = BOUND[parse_dtype(spec.dtype)]
    for n in ranks:
        results = launch_ranks(stream_x0, n, (spec,), backend=backend)
        err = rel_error(results[0]["x0"], one["x0"])
        document["ranks"][str(n)] = {"rel_err": float(f"{err:.3e}"), "chunk_s": round(results[0]["chunk_s"], 4),
                                     "cache_heads_per_rank": results[0]["cache_heads"],
                                     "vs_one_process": round(results[0]["chunk_s"] / one["chunk_s"], 3)}
        if not err <= bound:
            document["failures"].append(f"{n} ranks: x0 rel err {err:.3e} > {bound:.0e}")
    return document


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", default="2,4")
    p.add_argument("--model", default="tiny")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--latent", type=int, default=8, help="latent height and width")
    p.add_argument("--chunks", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default bf16 on CUDA, fp32 on a CPU")
    p.add_argument("--backend", default="reference")
    p.add_argument("--scheduler", default="reference", choices=["reference", "static"])
    args = p.parse_args(argv)
    spec = Spec(model=args.model, layers=args.layers, latent=args.latent, chunks=args.chunks, device=args.device,
                dtype=args.dtype or ("bf16" if args.device == "cuda" else "fp32"), backend=args.backend,
                scheduler=args.scheduler)
    document = check(spec, [int(n) for n in args.ranks.split(",")])
    print(json.dumps(document))
    return 1 if document["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
