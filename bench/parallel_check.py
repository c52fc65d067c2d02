"""One stream on several ranks against the same stream in one process: equal x0, and what the ranks cost.

    python -m lipforcing.bench.parallel_check --ranks 2,4                       # tiny model, gloo on the CPU
    python -m lipforcing.bench.parallel_check --ranks 2 --model 14b --layers 1   # a 14B-wide block
    python -m lipforcing.bench.parallel_check --ranks 2 --device cuda            # NCCL, one GPU per rank
    python -m lipforcing.bench.parallel_check --ranks 2 --scheduler static       # static buffers (graphs on CUDA)
    python -m lipforcing.bench.parallel_check --ranks 2,4 --sessions 3          # 3 sessions batched on the ranks

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
    text_len: int | None = None
    """Text tokens (None: the preset's; 512 for the real ones). A sequence length, not a weight shape: a short text
    keeps a real preset's widths while its text path (the embedding, every block's cross-attention K/V) costs a
    CPU test little."""
    chunks: int = 3
    seed: int = 0
    device: str = "cpu"
    dtype: str = "fp32"
    backend: str = "reference"
    scheduler: str = "reference"
    """reference (the eager sampler) or static (static buffers; CUDA graphs on CUDA)."""
    sessions: int = 1
    """Above 1: this many sessions of the engine's batcher share the ranks (``sessions_x0``; static scheduler)."""
    fail_rank: int | None = None
    fail_chunk: int | None = None


def _config(spec: Spec):
    from ..engine.dit.config import ModelConfig

    cfg = ModelConfig.from_name(spec.model)
    changes = {}
    heads = spec.heads or (4 if spec.model == "tiny" else None)
    if heads:
        changes.update(num_heads=heads, rope_pairs_thw=None)
    if spec.text_len:
        changes.update(text_len=spec.text_len)
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
    clip = _clip(cfg, spec, 3 * spec.chunks, spec.seed + 1)
    text, audio, ref, mask, masked, ref_seq = (clip[k] for k in ("text", "audio", "ref", "mask", "masked", "ref_seq"))
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


def _clip(cfg, spec: Spec, latents: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    hw = (spec.latent, spec.latent)
    return {"text": torch.randn(1, cfg.text_len, cfg.text_dim, generator=g),
            "audio": torch.randn(1, 1 + cfg.audio_frames_per_latent * (latents - 1), cfg.audio_dim, generator=g),
            "ref": torch.randn(1, 16, 1, *hw, generator=g),
            "mask": (torch.rand(1, 1, 1, *hw, generator=g) > 0.5).float(),
            "masked": torch.randn(1, 16, latents, *hw, generator=g),
            "ref_seq": torch.randn(1, 16, latents, *hw, generator=g)}


def sessions_x0(rank: int, world: int, spec: Spec) -> dict:
    """``spec.sessions`` sessions through the engine's own parts (``make_student``, ``RankedStudent`` on rank 0,
    ``StudentBatcher``), as ``serve --gpus N --max-sessions S`` runs them. Session i holds row i; the last two
    sessions start at round 0, each earlier one a round after the next, and each runs ``spec.chunks`` chunks. All
    sessions' chunks of a round run at once from their threads (batched when their window shapes agree), so the
    sessions that reach the steady state first move to the front rows, and the last session ends one round early,
    which moves another's rows again: every rank must make the same moves. Rank 0 returns each session's x0 and the
    batch sizes; the other ranks serve its calls (``serve_students``)."""
    import threading

    from ..engine.app.engine import RunConfig, make_student
    from ..engine.app.ranked import RankedStudent, end_ranks, serve_students
    from ..engine.dit.build import random_student
    from ..engine.dit.config import StreamConfig
    from ..engine.numerics import parse_dtype
    from ..engine.runtime.batcher import StudentBatcher
    from ..engine.runtime.threads import run_in_threads

    device = torch.device(f"cuda:{rank}" if spec.device == "cuda" else spec.device)
    cfg = _config(spec)
    model = random_student(cfg, device=device, dtype=parse_dtype(spec.dtype), seed=spec.seed)
    config = RunConfig(model=spec.model, device=str(device), scheduler="static", backend=spec.backend,
                       max_sessions=spec.sessions, gpus=world, seed=spec.seed)
    if rank > 0:
        return serve_students(rank, lambda _: model)
    stream = StreamConfig(latent_h=spec.latent, latent_w=spec.latent)
    student = make_student(config, model, stream)
    if world > 1:
        student = RankedStudent(student, config)
    batcher = StudentBatcher(student, gather_s=0.05)
    try:
        clips = [_clip(cfg, spec, 3 * spec.chunks, spec.seed + 1 + i) for i in range(spec.sessions)]
        views = [batcher.session() for _ in clips]
        start = [max(0, spec.sessions - 2 - i) for i in range(spec.sessions)]
        last = [start[i] + spec.chunks - (i == spec.sessions - 1) for i in range(spec.sessions)]  # last round + 1
        rounds = max(last)
        barrier = threading.Barrier(spec.sessions)
        out: list[list[torch.Tensor]] = [[] for _ in clips]

        def session(i: int) -> None:
            view, clip = views[i], clips[i]
            for r in range(rounds):
                barrier.wait()
                c = r - start[i]
                if c == 0:
                    view.start_clip(clip["text"].to(device), clip["audio"].to(device),
                                    clip["ref"].to(device), clip["mask"].to(device))
                if c >= 0 and r < last[i]:
                    x0 = view.run_chunk(clip["masked"][:, :, 3 * c : 3 * c + 3].to(device),
                                        clip["ref_seq"][:, :, 3 * c : 3 * c + 3].to(device))
                    out[i].append(x0.float().cpu())
                if r + 1 == last[i]:
                    view.close()

        run_in_threads(session, spec.sessions, on_error=lambda _: barrier.abort())  # a failure frees the others
    finally:
        batcher.shutdown()
        if world > 1:
            student.stop()
            end_ranks()
    return {"x0": torch.cat([torch.cat(x, 2) for x in out], 2), "batches": list(batcher.batches),
            "chunk_s": None, "cache_heads": student.cache.k.shape[-2]}


def check(spec: Spec, ranks: list[int]) -> dict:
    """Every rank count against one process: error, seconds per chunk, KV-cache heads per rank."""
    from ..engine.numerics import parse_dtype, rel_error
    from ..engine.runtime.ranks import launch_ranks

    target = sessions_x0 if spec.sessions > 1 else stream_x0
    one = target(0, 1, spec)
    backend = "nccl" if spec.device == "cuda" else "gloo"
    document = {"spec": dataclasses.asdict(spec), "scheme": "sequence parallel (all-to-all over heads)",
                "one_process_chunk_s": one["chunk_s"] and round(one["chunk_s"], 4), "ranks": {}, "failures": []}
    bound = BOUND[parse_dtype(spec.dtype)]
    for n in ranks:
        results = launch_ranks(target, n, (spec,), backend=backend)
        err = rel_error(results[0]["x0"], one["x0"])
        document["ranks"][str(n)] = {"rel_err": float(f"{err:.3e}"), "cache_heads_per_rank": results[0]["cache_heads"]}
        if spec.sessions > 1:  # the batch sizes of rank 0's batcher, and the calls each other rank served
            document["ranks"][str(n)].update(batches=results[0]["batches"], served=[r["calls"] for r in results[1:]])
        else:
            document["ranks"][str(n)].update(chunk_s=round(results[0]["chunk_s"], 4),
                                             vs_one_process=round(results[0]["chunk_s"] / one["chunk_s"], 3))
        if not err <= bound:
            document["failures"].append(f"{n} ranks: x0 rel err {err:.3e} > {bound:.0e}")
    return document


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", default="2,4")
    p.add_argument("--model", default="tiny")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--latent", type=int, default=8, help="latent height and width")
    p.add_argument("--text-len", type=int, default=None, help="text tokens (default: the preset's)")
    p.add_argument("--chunks", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default bf16 on CUDA, fp32 on a CPU")
    p.add_argument("--backend", default="reference")
    p.add_argument("--scheduler", default="reference", choices=["reference", "static"])
    p.add_argument("--out", default=None, help="also write the JSON document here")
    p.add_argument("--sessions", type=int, default=1,
                   help="above 1: this many sessions batched on the ranks (the static scheduler, as serve runs them)")
    args = p.parse_args(argv)
    spec = Spec(model=args.model, layers=args.layers, latent=args.latent, text_len=args.text_len, chunks=args.chunks,
                device=args.device,
                dtype=args.dtype or ("bf16" if args.device == "cuda" else "fp32"), backend=args.backend,
                scheduler="static" if args.sessions > 1 else args.scheduler, sessions=args.sessions)
    document = check(spec, [int(n) for n in args.ranks.split(",")])
    print(json.dumps(document))
    if args.out:
        from pathlib import Path

        Path(args.out).write_text(json.dumps(document, indent=1) + "\n")
    return 1 if document["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
