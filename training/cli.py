"""The training commands: ``lipforcing train``, ``lipforcing prepare-data``, ``lipforcing analyze-trajectory``.

    lipforcing prepare-data VIDEOS... -o DATA [--preset tiny|real ...]
    lipforcing train teacher|stage1|stage2 --preset tiny|1.3b|14b --data DATA --out RUN [--steps N] [--config FILE]
    lipforcing train export RUN -o student.safetensors [--dtype bf16]
    lipforcing analyze-trajectory --data DATA --teacher CKPT|RUN -o trajectory.json   # paper §4.2
    torchrun --nproc-per-node 2 -m lipforcing.training stage1 ...     # the same flags, FSDP2 over the processes

The ``lipforcing`` program registers these (``lipforcing/cli.py``); ``python -m lipforcing.training ARGS`` is
``lipforcing train ARGS``. User errors print one ``error:`` line and exit 2.
"""

from __future__ import annotations

import argparse

TRAIN_HELP = "train the teacher, stage 1 (diffusion forcing) or stage 2 (Self-Forcing DMD); export a run"


def train_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="train_command", required=True, metavar="STAGE")
    for stage, text in (("teacher", "flow matching of the bidirectional teacher"),
                        ("stage1", "diffusion forcing of the block-causal student (SPEC §9)"),
                        ("stage2", "Self-Forcing DMD with sync-window CFG and the SyncNet reward (SPEC §9)")):
        s = sub.add_parser(stage, help=text, description=text)
        _stage_arguments(s, stage)
        s.set_defaults(run=run_train, stage=stage)
    e = sub.add_parser("export", help="merge LoRA and write the released key names",
                       description="merge LoRA and write the released key names (loads with lipforcing run --ckpt)")
    e.add_argument("run_dir", help="a training run folder (--out of lipforcing train)")
    e.add_argument("-o", "--output", required=True, help="output .safetensors")
    e.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default: as trained (fp32)")
    e.add_argument("--network", default=None, choices=["student", "critic", "teacher"],
                   help="which trained network (default: the stage's own)")
    e.set_defaults(run=run_export)
    p.set_defaults(run=None)


def _stage_arguments(s: argparse.ArgumentParser, stage: str) -> None:
    s.add_argument("--preset", default="tiny", choices=["tiny", "1.3b", "14b"], help="model size (default tiny)")
    s.add_argument("--config", default=None, metavar="FILE", help="JSON object of training config fields")
    s.add_argument("--data", required=True, metavar="DIR", help="a folder written by lipforcing prepare-data")
    s.add_argument("--out", required=True, metavar="DIR", help="run folder: log.jsonl, checkpoints (resumes)")
    s.add_argument("--steps", type=int, default=None, help="total optimiser steps (default: the recipe's)")
    s.add_argument("--batch", type=int, default=None, help="effective batch (default: the recipe's)")
    s.add_argument("--micro-batch", type=int, default=None, help="samples per forward on one process")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--init", default=None, metavar="CKPT|RUN",
                   help="starting weights (checkpoint or run folder); the tiny preset may start from random weights")
    if stage == "stage2":
        s.add_argument("--teacher", default=None, metavar="CKPT|RUN", help="the frozen bidirectional teacher")
        s.add_argument("--critic", default=None, metavar="CKPT|RUN", help="the critic's start (default: --teacher)")
        s.add_argument("--taehv", default=None, help="taew2_1.pth, decodes the rollout for the reward")
        s.add_argument("--syncnet", default=None, help="syncnet_v2.model, the reward's SyncNet")
        s.add_argument("--no-reward", action="store_true", help="no SyncNet reward (generator weight 1)")
    else:  # stage 2's networks and reward do not apply
        s.set_defaults(teacher=None, critic=None, taehv=None, syncnet=None, no_reward=False)
    s.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    s.add_argument("--tensorboard", action="store_true", help="also write TensorBoard events to OUT/tensorboard")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace):
    from .config import load_config_file, train_config

    cfg = train_config(args.stage, args.preset)
    if args.config:
        cfg = load_config_file(args.config, cfg)
    changes = {k: v for k, v in (("steps", args.steps), ("batch", args.batch), ("micro_batch", args.micro_batch),
                                 ("seed", args.seed)) if v is not None}
    if args.no_reward:
        changes["reward"] = False
    return cfg.replace(**changes) if changes else cfg


def run_train(args: argparse.Namespace) -> int:
    from .trainer import Inits, TrainRun

    cfg = config_from_args(args)
    inits = Inits(init=args.init, teacher=args.teacher, critic=args.critic, taehv=args.taehv, syncnet=args.syncnet)
    run = TrainRun(cfg, args.data, args.out, inits=inits, device=args.device, tensorboard=args.tensorboard,
                   progress=not args.no_progress)
    try:
        records = run.train()
        if run.procs.rank == 0:
            last = records[-1] if records else None
            done = f"step {last['step']}, loss {last['loss']:.5g}" if last else "nothing to do"
            print(f"{cfg.stage}: {done}; log {run.out / 'log.jsonl'}, checkpoints {run.out / 'checkpoints'}")
    finally:
        run.close()
    return 0


def run_export(args: argparse.Namespace) -> int:
    from ..engine.numerics import parse_dtype
    from .export import export_run

    dtype = parse_dtype(args.dtype) if args.dtype else None
    n = export_run(args.run_dir, args.output, dtype=dtype, network=args.network)
    print(f"wrote {args.output}: {n} tensors (LoRA merged, released key names)")
    return 0


PREPARE_HELP = "cut talking-head videos into aligned training clips: latents, audio features, text (safetensors shards)"


def prepare_data_arguments(p: argparse.ArgumentParser) -> None:
    from .data import add_prepare_data_arguments, run_prepare_data

    add_prepare_data_arguments(p)
    p.set_defaults(run=run_prepare_data)


def trajectory_arguments(p: argparse.ArgumentParser) -> None:
    from .trajectory import trajectory_arguments as add

    add(p)


TRAJECTORY_HELP = "score the teacher's x0 predictions along its 50-step trajectory, with and without CFG (paper §4.2)"

