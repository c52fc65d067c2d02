"""``lipforcing bench``: registered in the command line's registry (``engine.app.cli.command``).

    lipforcing bench [--model 1.3b] [--variants reference,+streams] [--out R.json] [--compare BASE.json]
    lipforcing bench-serve --url ws://HOST:PORT --avatar NAME [--sessions 1,2,4,8 --seconds 30] [--out R.json]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from ..engine.app.cli import add_token_options, command
from ..engine.errors import ConfigError
from .report import comparable, compare
from .session import ABLATION, COMPILED, BenchConfig, device_identity, dump, format_report, run_bench


@command("bench", "measure the session end to end (FPS, time to first frame, stages) with the ablation")
def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="tiny, 1.3b or 14b (default: 1.3b on CUDA, tiny on CPU)")
    p.add_argument("--ckpt", default=None, help="real student weights instead of random ones")
    p.add_argument("--frame-size", default="720x1280", help="source frames HxW (the face is a third of the height)")
    p.add_argument("--chunks", type=int, default=None, help="timed chunks (default 20 on CUDA, 2 on CPU)")
    p.add_argument("--variants", default=",".join(ABLATION),
                   help=f"any of {', '.join([*ABLATION, *COMPILED])} (comma-separated)")
    p.add_argument("--avatar", action="store_true", help="measure the prepared-avatar path instead of the ablation")
    p.add_argument("--sessions", default="1,2,4", help="with --avatar: numbers of concurrent sessions")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--encoder", default=None, choices=["wan", "taehv"], help="default wan on CUDA, taehv on CPU")
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.add_argument("--compare", default=None, help="baseline JSON report (same device and model) to gate against")
    p.add_argument("--max-regression", type=float, default=5.0, help="allowed FPS drop in percent")
    p.add_argument("--quality", action="store_true",
                   help="also compare each variant's frames with the reference path's (PSNR, SSIM, Sync-C)")
    p.add_argument("--quality-weights", default=None, metavar="DIR", help="a folder with syncnet_v2.model (Sync-C)")
    p.add_argument("--max-quality-drop", type=float, default=None, metavar="PERCENT",
                   help="with --quality: exit 1 when a variant's quality drop exceeds this (a gate for your CI)")
    p.add_argument("--gpus", type=int, default=1,
                   help="the student of each variant on this many ranks, one stream (sequence parallel; one GPU "
                        "each, or CPU processes): the report adds each rank's calls and seconds")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=_bench, rank_student=_rank_student)


def _bench_on_ranks(args: argparse.Namespace, cfg: BenchConfig) -> int:
    """``bench --gpus N``: N spawned ranks, rank 0 running this command; each rank's calls and seconds are added
    to the report (``ranks``)."""
    from ..engine.app.ranked import spawn_ranks

    values = spawn_ranks(args, cfg.gpus, cfg.device)
    status, workers = values[0], values[1:]
    for w in workers:
        kinds = ", ".join(f"{k} {w['calls'][k]} calls {w['seconds'][k]:.2f} s" for k in w["calls"])
        print(f"rank {w['rank']}: {kinds}")
    if args.out and status == 0:
        report = json.loads(Path(args.out).read_text())
        report["ranks"] = workers
        dump(report, args.out)
    return status


def _rank_student(args: argparse.Namespace, rank: int):
    """Ranks 1..N-1 of ``bench --gpus N``: every variant's student network, on the rank's device."""
    from .session import _networks_for, build_networks

    cfg = _bench_config(args)
    cfg = replace(cfg, device=f"cuda:{rank}" if cfg.device == "cuda" else cfg.device)
    networks, made = build_networks(cfg), {}
    return lambda config: _networks_for(config, networks, made).student


def _bench_config(args: argparse.Namespace) -> BenchConfig:
    """The BenchConfig of the command's options (every rank of ``--gpus`` builds the same one)."""
    import torch

    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but CUDA is not available")
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    unknown = set(variants) - {*ABLATION, *COMPILED}
    if unknown or not variants:
        raise ConfigError(f"--variants takes {', '.join([*ABLATION, *COMPILED])}, got {args.variants!r}")
    try:
        h, w = (int(v) for v in args.frame_size.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--frame-size must be HxW, got {args.frame_size!r}") from None
    chunks = args.chunks if args.chunks is not None else (20 if cuda else 2)
    if chunks < 1:
        raise ConfigError("--chunks must be at least 1")
    sessions = ()
    if args.avatar:
        try:
            sessions = tuple(int(v) for v in args.sessions.split(","))
        except ValueError:
            sessions = ()
        if not sessions or min(sessions) < 1:
            raise ConfigError(f"--sessions takes positive numbers separated by commas, got {args.sessions!r}")
        variants = ()
    if args.max_quality_drop is not None and (not args.quality or args.max_quality_drop < 0):
        raise ConfigError("--max-quality-drop PERCENT (>= 0) applies with --quality")
    if args.quality and args.avatar:
        raise ConfigError("--quality compares the ablation's variants; it does not apply with --avatar")
    if args.gpus < 1 or (args.gpus > 1 and args.avatar):
        raise ConfigError("--gpus takes a positive number and measures the ablation (one stream), not --avatar")
    return BenchConfig(
        model=args.model or ("1.3b" if cuda else "tiny"), ckpt=args.ckpt, device="cuda" if cuda else "cpu",
        dtype=args.dtype, encoder=args.encoder or ("wan" if cuda else "taehv"), frame_hw=(h, w), chunks=chunks,
        variants=variants, avatar_sessions=sessions, quality=args.quality, quality_weights=args.quality_weights,
        progress=not args.quiet, gpus=args.gpus,
    )


def _bench(args: argparse.Namespace) -> int:
    cfg = _bench_config(args)
    if cfg.gpus > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            return _bench_on_ranks(args, cfg)
    baseline = None
    if args.compare:
        try:
            baseline = json.loads(Path(args.compare).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{args.compare}: cannot read the baseline report ({exc})") from None
        comparable({"device": device_identity(cfg.device), "config": {"model": cfg.model}}, baseline)
    report = run_bench(cfg, out=args.out)
    print(format_report(report))
    status = 0
    if baseline is not None:
        failures, notes = compare(report, baseline, args.max_regression)
        for line in notes:
            print(f"compare: {line}")
        for line in failures:
            print(f"compare: FAIL {line}")
        status = 1 if failures else 0
        report["compare"] = {"baseline": args.compare, "failures": failures, "notes": notes}
    if args.max_quality_drop is not None:
        from ..engine.quality.compare import quality_gate

        failures = quality_gate({k: v["quality"] for k, v in report["results"].items() if "quality" in v},
                                args.max_quality_drop)
        for line in failures:
            print(f"quality: FAIL {line}")
        status = max(status, 1 if failures else 0)
        report["quality_gate"] = {"max_drop_pct": args.max_quality_drop, "failures": failures}
    if args.out:
        dump(report, args.out)
    print(json.dumps(report))
    return status


@command("bench-serve", "load-test a running server: N live sessions at once, latency and FPS per session")
def _bench_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="ws://127.0.0.1:8080")
    add_token_options(p)
    p.add_argument("--avatar", required=True, help="the name of an avatar the server holds")
    p.add_argument("--sessions", default="8", help="sessions at once; a list (1,2,4,8) runs one load per count and "
                                                   "reports the most that ran in real time")
    p.add_argument("--seconds", type=float, default=30.0, help="speech per session, streamed in real time")
    p.add_argument("--max-latency", type=float, default=1.0, metavar="SECONDS",
                   help="p95 chunk latency under which a load counts as real time (default 1.0)")
    p.add_argument("--speech", default=None, help="a speech file (default: synthesized speech)")
    p.add_argument("--lookahead", type=float, default=None, metavar="SECONDS")
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.set_defaults(run=_bench_serve)


def _bench_serve(args: argparse.Namespace) -> int:
    import os

    from ..engine.app.server.auth import client_token
    from ..engine.app.session import DEFAULT_LOOKAHEAD_S
    from .serve_load import LoadConfig, format_load, sweep

    try:
        counts = [int(n) for n in args.sessions.split(",")]
    except ValueError:
        raise ConfigError(f"--sessions {args.sessions}: give a count or a comma-separated list of counts") from None
    if not counts or min(counts) < 1 or args.seconds <= 0 or args.max_latency <= 0:
        raise ConfigError("--sessions counts must be >= 1, --seconds and --max-latency positive")
    report = sweep(LoadConfig(
        url=args.url, token=client_token(flag=args.token, file=args.token_file, environ=os.environ),
        avatar=args.avatar, sessions=counts[0], seconds=args.seconds,
        speech=args.speech, lookahead=DEFAULT_LOOKAHEAD_S if args.lookahead is None else args.lookahead,
        max_latency_s=args.max_latency,
    ), counts)
    print("\n\n".join(format_load(load) for load in report["loads"]))
    if len(counts) > 1:
        print(f"\nsessions in real time: {report['sessions_at_real_time']}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0 if report["all_ok"] else 1
