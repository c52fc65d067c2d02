"""The ``lipforcing`` command line: the registry of subcommands and the engine's own commands.

    lipforcing check-reference GOLDEN.safetensors... [--device cpu|cuda] [--backend reference|triton|sdpa]
    lipforcing info --model 1.3b|14b [--height 512 --width 512] [--memory] [--json]
    lipforcing convert IN.pth OUT.safetensors
    lipforcing run VIDEO [--audio AUDIO] -o OUT.mp4 [--model 14b --ckpt ... --vae ... --taehv ...] [--report R.json]
    lipforcing demo [-o demo.mp4]
    lipforcing compile [--taehv taew2_1.pth] [-o DIR]
    lipforcing serve [--host 127.0.0.1 --port 8080 --token-file F --avatars DIR] [--ray --replicas N]
    lipforcing client --url ws://HOST:PORT (--avatar FILE|NAME | --video FILE) --speech WAV -o OUT.mp4 [--fast]

Other packages add their commands with ``@command`` (``lipforcing bench`` lives in ``lipforcing.bench``);
the ``lipforcing`` program (``lipforcing/cli.py``) gathers them and calls ``main``.

User errors (bad files, missing weights, bad options) print one ``error:`` line and exit with status 2.
Ctrl-C and SIGTERM stop a run the same way (exit 130 and 143): what was finished is kept.
Native libraries' log lines (MediaPipe, TensorFlow Lite, onnxruntime) are silenced unless ``-v`` is given.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Callable

from ..errors import ConfigError, LipforcingError

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {}


def command(name: str, help: str):
    """Register a subcommand; the decorated function adds its arguments and sets ``run(args) -> int``."""

    def register(add_arguments):
        COMMANDS[name] = (help, add_arguments)
        return add_arguments

    return register


@command("check-reference", "run the engine on golden files and report relative errors")
def _check_reference_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", help="golden .safetensors files: streaming (lipforcing-golden/1) or training "
                                            "(lipforcing-golden-train/1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--backend", default="reference", choices=["reference", "triton", "sdpa"])
    p.set_defaults(run=_check_reference)


def _check_reference(args: argparse.Namespace) -> int:
    from ..tools.golden import PASS_BOUND, attention_kind, check_golden, is_training

    worst = 0.0
    header = ("file", "first_call_flow", "x0_step0", "(worst chunk)", "x0", "(worst chunk)")
    streaming_header = "{:<28} {:>16} {:>10} {:>13} {:>10} {:>13}".format(*header)
    printed = None
    for path in args.files:
        r = check_golden(path, device=args.device, backend=args.backend)
        e = r.errors
        verdict = "ok" if r.ok else "FAIL"
        if not is_training(r.config):  # a streaming file: the sampler's outputs, whole clip and worst chunk
            if printed != "streaming":
                print(streaming_header)
                printed = "streaming"
            print(f"{r.path.name:<28} {e['first_call_flow']:>16.2e} {e['x0_step0']:>10.2e} "
                  f"{e['x0_step0/worst_chunk']:>13.2e} {e['x0']:>10.2e} {e['x0/worst_chunk']:>13.2e}  {verdict}")
        else:  # a training file (full-sequence forwards): every output it records
            kind = attention_kind(r.config)
            print(f"{r.path.name:<28} ({kind}) " + ", ".join(f"{k} {v:.2e}" for k, v in e.items()) + f"  {verdict}")
            printed = "training"
        worst = max(worst, *e.values())
    verdict = "pass" if worst <= PASS_BOUND else "FAIL"
    where = f"{args.device}, backend {args.backend}"
    print(f"worst relative error {worst:.2e} (bound {PASS_BOUND:.0e}, {where}): {verdict}")
    return 0 if worst <= PASS_BOUND else 1


@command("export-aot", "compile the student's calls with AOTInductor for C++ hosts without Python (lf_student)")
def _export_aot_args(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="tiny (seeded random weights, as the engine's), 1.3b or 14b (with --ckpt)")
    source.add_argument("--golden", metavar="FILE", help="a golden file: its configuration and weights")
    p.add_argument("--ckpt", default=None, help="student weights for --model 1.3b / 14b")
    p.add_argument("--height", type=int, default=None,
                   help="face crop height for --model (default: the model's, 512; tiny 256)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--device", default="cpu", help="where the packages run (default cpu)")
    p.add_argument("-o", "--output", required=True, metavar="DIR")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=_export_aot)


def _export_aot(args: argparse.Namespace) -> int:
    import time

    import torch

    from ..dit.config import ModelConfig
    from ..tools.aot import export_aot

    if args.golden:
        from ..tools.golden import golden_student, is_training

        cfg, student, _ = golden_student(args.golden, device=args.device)
        if is_training(cfg):
            raise ConfigError(f"{args.golden}: a training file; export-aot takes streaming golden files")
        stream = cfg.stream
    elif args.model == "tiny":
        from ..dit.build import random_student

        student = random_student(ModelConfig.from_name("tiny"), device=args.device, dtype=torch.float32, seed=0)
        stream = _stream_config(student.cfg, args.height, args.width)
    else:
        if not args.ckpt:
            raise ConfigError(f"--model {args.model} needs --ckpt (its student weights)")
        from ..dit.checkpoint import load_student

        student = load_student(args.ckpt, cfg=_model_config(args.model), device=args.device, dtype=torch.float32)
        stream = _stream_config(student.cfg, args.height, args.width)
    began = time.monotonic()
    say = None if args.quiet else (lambda name: print(f"compiling {name} ({time.monotonic() - began:.0f} s)"))
    description = export_aot(student, stream, args.output, progress=say)
    print(f"wrote {args.output}: text.pt2 and {len(description['shapes'])} window shapes "
          f"({', '.join(str(s['cached_frames']) for s in description['shapes'])} cached frames) in "
          f"{time.monotonic() - began:.0f} s")
    return 0


@command("info", "parameters, FLOPs, compute floors and the memory plan of a model at a resolution")
def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="1.3b", help="tiny, 1.3b or 14b")
    p.add_argument("--height", type=int, default=None, help="face crop height (default: the model's, 512; tiny 256)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32", "fp8"],
                   help="fp8: e4m3 block weights and KV cache (engine/dit/fp8.py)")
    p.add_argument("--encoder", default="wan", choices=["wan", "taehv"])
    p.add_argument("--decoder", default="taehv", choices=["taehv", "wan"])
    p.add_argument("--peak-tflops", type=float, default=None, help="matrix rate used for the compute floor")
    p.add_argument("--memory", action="store_true", help="the device-memory plan, item by item")
    p.add_argument("--sessions", type=int, default=None, help="the memory plan of this many sessions on one engine")
    p.add_argument("--gpus", type=int, default=None,
                   help="one stream on this many GPUs: the schemes' arithmetic and, with --memory, memory per GPU")
    p.add_argument("--avatar", action="store_true", help="the memory plan of sessions on prepared avatars")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    p.set_defaults(run=_info)


def _info(args: argparse.Namespace) -> int:
    from ..numerics import parse_precision

    cfg = _model_config(args.model)
    stream = _stream_config(cfg, args.height, args.width)
    dtype, fp8 = parse_precision(args.dtype)
    if args.sessions is not None and args.sessions < 1:
        raise ConfigError(f"--sessions must be at least 1, got {args.sessions}")
    if args.gpus is not None:
        return _info_gpus(args, cfg, stream, dtype, fp8)
    if args.memory or args.sessions or args.avatar:
        from ..tools.memory import format_plan, memory_plan

        plan = memory_plan(cfg, stream, dtype=dtype, fp8=fp8, encoder=args.encoder, decoder=args.decoder,
                           sessions=args.sessions or 1, avatar=args.avatar)
        print(json.dumps(plan) if args.json else format_plan(args.model, plan))
        return 0
    from ..tools.info import DEFAULT_PEAK_TFLOPS, format_info, info_dict, model_info

    info = model_info(cfg, stream, dtype_bytes=dtype.itemsize, peak_tflops=args.peak_tflops or DEFAULT_PEAK_TFLOPS,
                      encoder=args.encoder, decoder=args.decoder)
    print(json.dumps(info_dict(info)) if args.json else format_info(args.model, stream, info))
    return 0


def _info_gpus(args: argparse.Namespace, cfg, stream, dtype, fp8: bool) -> int:
    """``info --gpus N``: the chosen scheme's figures per GPU, the schemes compared, the memory per GPU."""
    from ..tools.parallel_plan import format_rank_plan, format_table, rank_plan, scheme_table, split_memory

    if args.gpus < 2:
        raise ConfigError(f"--gpus must be at least 2 (one stream on several GPUs), got {args.gpus}")
    plan = rank_plan(cfg, stream, args.gpus, name=args.model)
    table = scheme_table(cfg, stream, name=args.model, ranks=(args.gpus,))
    memory = None
    if args.memory:
        from ..tools.memory import memory_plan

        memory = split_memory(memory_plan(cfg, stream, dtype=dtype, fp8=fp8, encoder=args.encoder,
                                          decoder=args.decoder), args.gpus)
    if args.json:
        from dataclasses import asdict

        print(json.dumps({**plan, "schemes": [asdict(r) for r in table], "memory": memory}))
        return 0
    print(format_rank_plan(plan))
    if memory is not None:
        gib = 1 << 30
        print(f"  memory per GPU            rank 0 {memory['rank0_bytes'] / gib:.2f} GiB (codecs, frames and clip "
              f"start too), ranks 1-{args.gpus - 1} {memory['other_rank_bytes'] / gib:.2f} GiB "
              f"(one GPU: {memory['one_gpu_bytes'] / gib:.2f} GiB)")
    print(format_table(table))
    return 0


@command("convert", "convert a checkpoint (.pth / .safetensors / sharded) to one .safetensors file")
def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--dtype", choices=["keep", "bf16", "fp16", "fp32", "fp8"], default="keep",
                   help="fp8: the blocks' linear weights in e4m3 with per-channel scales, the rest in bf16")
    p.set_defaults(run=_convert)


def _convert(args: argparse.Namespace) -> int:
    from ..dit.checkpoint import convert_checkpoint
    from ..numerics import parse_precision

    dtype, fp8 = (None, False) if args.dtype == "keep" else parse_precision(args.dtype)
    n = convert_checkpoint(args.src, args.dst, dtype=dtype, fp8=fp8)
    print(f"wrote {n} tensors to {args.dst}")
    return 0


def add_engine_options(p: argparse.ArgumentParser, *, model_default: str = "14b") -> None:
    """The options of an engine (``RunConfig`` and ``Weights``), shared by run and bench."""
    w = p.add_argument_group("weights (not needed for --model tiny; --ckpt there loads a trained tiny student)")
    w.add_argument("--ckpt", help="student checkpoint (.pth / .safetensors / sharded; lipforcing train export)")
    w.add_argument("--vae", help="Wan 2.1 VAE (Wan2.1_VAE.pth)")
    w.add_argument("--taehv", help="TAEHV for Wan 2.1 (taew2_1.pth)")
    w.add_argument("--wav2vec", help="directory with wav2vec2-base-960h (config.json + weights)")
    w.add_argument("--text-embeds", help="[1, 512, 4096] text embeddings (text_emb.pt)")
    p.add_argument("--model", default=model_default, choices=["tiny", "1.3b", "14b"])
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32", "fp8"],
                   help="fp8: the student's block weights and KV cache in e4m3 (fp8 GEMMs on Hopper), rest bf16")
    p.add_argument("--encoder", default="wan", choices=["wan", "taehv"])
    p.add_argument("--encoder-group-frames", type=int, default=4,
                   help="encode in groups of this many frames (default 4, the released procedure; 0: whole chunks)")
    p.add_argument("--decoder", default="taehv", choices=["taehv", "wan"])
    p.add_argument("--decoder-group-latents", type=int, default=1,
                   help="decode this many latents at a time (default 1, the released procedure; 0: whole chunks)")
    p.add_argument("--backend", default=None, choices=["reference", "triton", "sdpa"],
                   help="student attention and kernels: reference, triton (fused kernels) or sdpa (PyTorch SDPA / "
                        "flash-attn over a pre-rotated window)")
    p.add_argument("--scheduler", default="static", choices=["static", "reference"],
                   help="static buffers + CUDA graphs (default) or the plain reference loop")
    p.add_argument("--pipeline", default=None, choices=["streams", "sequential"],
                   help="device streams + worker threads (default on CUDA) or every stage in turn (default on CPU)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="run the static scheduler eagerly on CUDA")
    p.add_argument("--decoder-backend", default=None, choices=["auto", "tensorrt", "onnxruntime", "torch"],
                   help="TAEHV decoder backend (default: auto on CUDA, torch on CPU)")
    p.add_argument("--compiled", default=None, metavar="DIR", help="use what 'lipforcing compile' wrote to DIR")
    p.add_argument("--compile", action="store_true", help="torch.compile each student call per window shape")
    p.add_argument("--face-box", default=None, help="x,y,w,h: use the face whose centre lies in this box")
    p.add_argument("--face-backend", default="mediapipe", choices=["mediapipe", "box"],
                   help="mediapipe (detect and track the face) or box (the face is --face-box and does not move: "
                        "a fixed camera; needs no mediapipe)")
    p.add_argument("--mask", default=None, help="mouth mask image (255 = keep) instead of the built-in one")
    p.add_argument("--require-face", action="store_true", help="fail when no face is found anywhere")
    p.add_argument("--seed", type=int, default=0)


def engine_config(args: argparse.Namespace):
    """``RunConfig`` and ``Weights`` from the options of ``add_engine_options``."""
    from .engine import RunConfig, Weights

    box = None
    if args.face_box:
        try:
            box = tuple(float(v) for v in args.face_box.split(","))
        except ValueError:
            box = ()
        if len(box) != 4 or box[2] <= 0 or box[3] <= 0:
            raise ConfigError(f"--face-box must be x,y,w,h with positive w and h, got {args.face_box!r}")
    cfg = RunConfig(
        model=args.model, device=args.device or "", dtype=args.dtype, encoder=args.encoder,
        encoder_group_frames=args.encoder_group_frames or None, decoder=args.decoder,
        decoder_group_latents=args.decoder_group_latents or None, backend=args.backend,
        scheduler=args.scheduler, pipeline=args.pipeline or "", cuda_graphs=False if args.no_cuda_graphs else None,
        decoder_backend=args.decoder_backend, compiled=args.compiled, compile=args.compile, face_box=box,
        face_backend=args.face_backend, mask=args.mask, require_face=args.require_face, seed=args.seed,
        gpus=getattr(args, "gpus", 1),
    )
    weights = Weights(ckpt=args.ckpt, vae=args.vae, taehv=args.taehv, wav2vec=args.wav2vec,
                      text_embeds=args.text_embeds)
    return cfg, weights


@command("run", "lip-sync a talking-head video (or a prepared avatar) to speech and write an MP4")
def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("video", nargs="?", default=None, help="input video (any common container/codec)")
    p.add_argument("--avatar", default=None, metavar="NAME.lfa", help="a prepared avatar instead of a video")
    p.add_argument("--audio", default=None, help="speech (wav/mp3/m4a/flac/...); default: the video's own audio")
    p.add_argument("-o", "--output", required=True, help="output .mp4")
    p.add_argument("--audio-lookahead", type=float, default=None, metavar="SECONDS",
                   help="compute the audio features as live sessions do: each chunk from a window of the speech "
                        "reaching this far past it (default: the whole clip at once)")
    p.add_argument("--audio-context", type=float, default=None, metavar="SECONDS",
                   help="with --audio-lookahead: seconds of speech before each chunk in its window (default 4)")
    p.add_argument("--report", default=None, metavar="JSON", help="write the run summary (path, times) here")
    p.add_argument("--timing", action="store_true", help="measure the time of every stage (in the summary)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--gpus", type=int, default=1,
                   help="run the student on this many ranks, one stream (sequence parallel; one GPU each, or CPU "
                        "processes); see `lipforcing info --gpus N`")
    add_engine_options(p)
    p.set_defaults(run=_run, rank_student=_rank_student)


def _run(args: argparse.Namespace) -> int:
    from .avatar import Avatar
    from .engine import build_engine
    from .run import format_summary, run_video

    if (args.video is None) == (args.avatar is None):
        raise ConfigError("give a video or --avatar NAME.lfa (one of them)")
    if args.audio_context is not None and args.audio_lookahead is None:
        raise ConfigError("--audio-context applies with --audio-lookahead")
    avatar = Avatar.load(args.avatar) if args.avatar else None
    cfg, weights = engine_config(args)
    if cfg.gpus > 1:
        status = _as_ranks(args, cfg, weights)
        if status is not None:
            return status
        cfg = _rank_zero_config(cfg)
    engine = build_engine(cfg, weights)
    try:
        summary = run_video(args.video, args.audio, args.output, engine, avatar=avatar,
                            lookahead=args.audio_lookahead, context=args.audio_context, progress=not args.quiet,
                            timing=args.timing, report=args.report)
    finally:
        engine.close()
    print(format_summary(summary))
    return 0


def _as_ranks(args: argparse.Namespace, cfg, weights) -> int | None:
    """``--gpus N`` (run, serve): this command becomes rank 0 of N ranks, the others serving its student
    (ranked.py). Returns the command's exit status once the ranks are done; None when this process is rank 0
    already (torch.distributed is initialised): the command goes on here."""
    import torch.distributed as dist

    from ..runtime.ranks import init_from_env
    from .engine import require_device, require_weights
    from .ranked import run_rank, spawn_ranks

    if dist.is_initialized():
        return None
    require_weights(cfg, weights)  # said once, before any rank starts
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by torchrun: this process is one rank
        rank, world = init_from_env("nccl" if require_device(cfg).type == "cuda" else "gloo", timeout_s=600)
        if world != cfg.gpus:
            raise ConfigError(f"--gpus {cfg.gpus} but torchrun started {world} processes")
        result = run_rank(rank, world, args.argv)
        return result if rank == 0 else 0
    return spawn_ranks(args, cfg.gpus, str(require_device(cfg)))[0]  # this command goes on in rank 0


def _rank_student(args: argparse.Namespace, rank: int):
    """Ranks 1..N-1 of run and serve --gpus N: the student network alone, on the rank's device."""
    from .engine import load_student_network
    from .ranked import rank_config

    cfg, weights = engine_config(args)
    student = load_student_network(rank_config(cfg, rank), weights)
    return lambda config: student


def _rank_zero_config(cfg):
    import torch.distributed as dist

    from .ranked import rank_config

    return rank_config(cfg, dist.get_rank())


@command("prepare-avatar", "align and encode a talking-head video once, for sessions that skip both")
def _prepare_avatar_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("video", help="the avatar's video: a face in every frame")
    p.add_argument("-o", "--output", required=True, metavar="NAME.lfa")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_engine_options(p)
    p.set_defaults(run=_prepare_avatar)


def _prepare_avatar(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .avatar import SUFFIX, prepare_avatar
    from .engine import build_engine

    if Path(args.output).suffix != SUFFIX:
        raise ConfigError(f"the avatar file must end in {SUFFIX}, got {args.output}")
    cfg, weights = engine_config(args)
    avatar = prepare_avatar(args.video, build_engine(cfg, weights), progress=not args.quiet)
    path = avatar.save(args.output)
    c = avatar.config
    print(f"wrote {path}: {c['frames']} frames ({c['frames'] / 25:.2f} s), loops every {c['period_frames']} frames, "
          f"{c['stored_latents']} latents of each stream, {path.stat().st_size / 1e6:.1f} MB")
    return 0


@command("serve", "serve live sessions over WebSocket and WebRTC, with a web page (see the README)")
def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: loopback only; another one needs a token)")
    p.add_argument("--port", type=int, default=8080)
    token = p.add_mutually_exclusive_group()
    token.add_argument("--token", default=None,
                       help="clients must send this token (default: $LIPFORCING_TOKEN; none anywhere: no "
                            "authentication, loopback only). Other users of this machine can read it in the process "
                            "list (ps): prefer --token-file or $LIPFORCING_TOKEN")
    token.add_argument("--token-file", default=None, metavar="PATH",
                       help="read the token from this file (its text, blanks around it dropped)")
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="serve without a token on a --host other machines can reach (anyone who connects may use it)")
    p.add_argument("--avatars", default=None, metavar="DIR", help="a folder of prepared avatars (*.lfa) to offer")
    p.add_argument("--max-sessions", type=int, default=None,
                   help="sessions at once per engine (per replica); default: 1 on a CPU, on a GPU as many as the "
                        "memory plan fits in its free memory (at most 8)")
    p.add_argument("--max-message-kb", type=int, default=1024, help="largest client message accepted")
    p.add_argument("--max-upload-mb", type=int, default=512, help="largest avatar or video upload accepted")
    p.add_argument("--max-uploads-mb", type=int, default=1024, help="uploads in progress at once, together")
    p.add_argument("--max-connections", type=int, default=64, help="WebSocket connections and WebRTC peers at once")
    p.add_argument("--idle-timeout", type=float, default=30.0,
                   help="seconds without a message before a session ends (WebRTC: to connect)")
    p.add_argument("--max-lag", type=float, default=10.0, metavar="SECONDS",
                   help="a client that takes no frame for this long is dropped")
    p.add_argument("--lookahead", type=float, default=None, metavar="SECONDS",
                   help="speech each chunk waits for past its frames (default: the session default)")
    p.add_argument("--ray", action="store_true", help="deploy on Ray Serve (one replica per GPU)")
    p.add_argument("--replicas", type=int, default=1, help="with --ray: how many replicas")
    p.add_argument("--gpus", type=int, default=1,
                   help="run every session's student on this many ranks (sequence parallel; one GPU each, or CPU "
                        "processes): faster streams, not more of them; see `lipforcing info --gpus N`")
    add_engine_options(p)
    p.set_defaults(run=_serve, rank_student=_rank_student)


def _check_port_free(host: str, port: int) -> None:
    import socket

    if not 0 < port < 65536:
        raise ConfigError(f"--port {port}: not a TCP port")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror} (is another server running?)") from None


def _serve(args: argparse.Namespace) -> int:
    from dataclasses import replace
    from pathlib import Path

    from .server.app import ServerOptions
    from .server.auth import check_exposure, server_token
    from .session import DEFAULT_LOOKAHEAD_S

    token = server_token(flag=args.token, file=args.token_file, environ=os.environ)  # none given: no token
    check_exposure(args.host, token, insecure_no_auth=args.insecure_no_auth)
    if args.avatars and not Path(args.avatars).is_dir():
        raise ConfigError(f"--avatars {args.avatars}: not a folder")
    if args.replicas < 1 or (args.replicas > 1 and not args.ray):
        raise ConfigError("--replicas N (N >= 1) applies with --ray")
    if args.gpus > 1 and args.ray:
        raise ConfigError("--gpus N runs one server on N ranks; Ray replicas take one GPU each (drop --ray or --gpus)")
    for name in ("max_message_kb", "max_upload_mb", "max_uploads_mb", "max_connections", "idle_timeout", "max_lag",
                 "max_sessions"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive")
    cfg, weights = engine_config(args)
    _require_server_packages(ray=args.ray)
    _check_port_free(args.host, args.port)  # before the warm-up, not after it
    if cfg.gpus > 1:  # the launcher ends here, when the ranks do; rank 0 goes on below, on its own device
        status = _as_ranks(args, cfg, weights)
        if status is not None:
            return status
        cfg = _rank_zero_config(cfg)
    if args.max_sessions is None:  # sized on the device that serves (no CUDA context in a --gpus launcher)
        from .server.serve import default_sessions

        sessions, why = default_sessions(cfg)
        logging.getLogger("lipforcing").warning("lipforcing serve: %d session(s) per engine (%s; --max-sessions "
                                                "sets it)", sessions, why)
    else:
        sessions = args.max_sessions
    options = ServerOptions(
        run_config=replace(cfg, max_sessions=sessions), weights=weights, token=token,
        avatars=args.avatars, max_message_bytes=args.max_message_kb << 10, max_upload_bytes=args.max_upload_mb << 20,
        max_uploads_bytes=args.max_uploads_mb << 20, max_connections=args.max_connections,
        idle_timeout=args.idle_timeout, max_lag=args.max_lag,
        lookahead=DEFAULT_LOOKAHEAD_S if args.lookahead is None else args.lookahead,
    )
    if args.ray:
        from .server.serve import run_ray

        run_ray(options, replicas=args.replicas, host=args.host, port=args.port)
    else:
        from .server.serve import run_server

        run_server(options, host=args.host, port=args.port)
    return 0


def _require_server_packages(*, ray: bool) -> None:
    import importlib.util

    names = ["fastapi", "uvicorn", "websockets", "aiortc"] + (["ray"] if ray else [])
    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if missing:
        extra = "serve,ray" if ray else "serve"
        raise ConfigError(f"the server needs {', '.join(missing)}: pip install 'lipforcing[{extra}]'")


@command("client", "stream speech to a lipforcing server and write what comes back as an MP4")
def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="ws://127.0.0.1:8080", help="the server (ws://HOST:PORT)")
    add_token_options(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--avatar", metavar="FILE|NAME", help="a prepared avatar (.lfa) to upload, or the bare name "
                                                              "of one the server holds (no other file is sent)")
    source.add_argument("--video", metavar="FILE", help="a talking-head video the server prepares as the avatar")
    p.add_argument("--speech", required=True, help="speech (wav/mp3/m4a/flac/...)")
    p.add_argument("-o", "--output", required=True, help="output .mp4")
    p.add_argument("--fast", action="store_true", help="send the speech as fast as possible, not in real time")
    p.add_argument("--lookahead", type=float, default=None, metavar="SECONDS",
                   help="speech each chunk waits for past its frames (default: the session default)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds of silence from the server before giving up")
    p.add_argument("--report", default=None, metavar="JSON", help="write the latency figures here")
    p.set_defaults(run=_client)


def add_token_options(p: argparse.ArgumentParser) -> None:
    """A client's token options (``lipforcing client``, ``bench-serve``): --token, --token-file or the environment."""
    token = p.add_mutually_exclusive_group()
    token.add_argument("--token", default=None, help="the server's token (default: --token-file, then "
                                                     "$LIPFORCING_TOKEN); visible to other users in ps")
    token.add_argument("--token-file", default=None, metavar="PATH", help="read the token from this file")


def _client(args: argparse.Namespace) -> int:
    from .server.auth import client_token
    from .server.client import ClientOptions, run_client
    from .session import DEFAULT_LOOKAHEAD_S

    _require_server_packages(ray=False)
    result = run_client(ClientOptions(
        url=args.url, token=client_token(flag=args.token, file=args.token_file, environ=os.environ),
        avatar=args.avatar, video=args.video, speech=args.speech,
        output=args.output, fast=args.fast, timeout=args.timeout,
        lookahead=DEFAULT_LOOKAHEAD_S if args.lookahead is None else args.lookahead,
    ))
    print(f"wrote {args.output}: {result.summary()}")
    if args.report:
        from ..media.io import write_json

        write_json(args.report, result.to_json())
    return 0


@command("measure-lookahead", "how far live (windowed) audio features are from whole-clip ones, per look-ahead")
def _measure_lookahead_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("speech", nargs="+", help="speech files")
    p.add_argument("--wav2vec", default=None, help="wav2vec2-base-960h directory (default: random weights at its size)")
    p.add_argument("--lookaheads", default="0,0.16,0.32,0.64,1.28", help="seconds, comma-separated")
    p.add_argument("--context", type=float, default=4.0, help="seconds of speech before each chunk")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(run=_measure_lookahead)


def _measure_lookahead(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    import torch

    from ..media.audio_features import Wav2Vec2Features
    from ..media.io import load_audio
    from ..media.live_audio import lookahead_report

    try:
        lookaheads = tuple(float(v) for v in args.lookaheads.split(","))
    except ValueError:
        raise ConfigError(f"--lookaheads takes seconds separated by commas, got {args.lookaheads!r}") from None
    if args.wav2vec:
        extractor, weights = Wav2Vec2Features.from_dir(args.wav2vec), args.wav2vec
    else:
        from transformers import Wav2Vec2Config, Wav2Vec2Model

        torch.manual_seed(0)
        extractor, weights = Wav2Vec2Features(Wav2Vec2Model(Wav2Vec2Config())), "random weights (wav2vec2-base sizes)"
    results = {path: [asdict(r) for r in lookahead_report(extractor, load_audio(path), lookaheads, args.context)]
               for path in args.speech}
    if args.json:
        print(json.dumps({"weights": weights, "context_s": args.context, "results": results}))
        return 0
    print(f"wav2vec2: {weights}; context {args.context:g} s")
    for path, rows in results.items():
        print(path)
        for r in rows:
            layers = " ".join(f"{e:.3f}" for e in r["rel_error_per_layer"])
            print(f"  look-ahead {r['lookahead_s']:.2f} s (+{r['added_latency_s']:.2f} s latency): relative error "
                  f"{r['rel_error']:.3f}, on the frames' time grid {r['rel_error_same_grid']:.3f}; per layer {layers}")
    return 0


@command("eval", "quality metrics of predicted videos against references (SSIM, PSNR, LMD, Sync-C/D, FID, FVD, CSIM)")
def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pred", required=True, metavar="FILE|DIR", help="the video(s) to score")
    p.add_argument("--ref", required=True, metavar="FILE|DIR", help="the reference video(s), paired by file name")
    p.add_argument("--audio", default=None, help="speech for Sync-C/D (default: the videos' own audio track)")
    p.add_argument("--weights", default=None, metavar="DIR",
                   help="syncnet_v2.model, inception-2015-12-05.pt, i3d_torchscript.pt, arcface.onnx (any subset; "
                        "a metric whose file is missing is reported as unavailable)")
    p.add_argument("-o", "--output", required=True, help="the JSON report")
    p.add_argument("--plot", default=None, metavar="PNG", help="per-frame SSIM and the aggregate table as a PNG")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--random-features", action="store_true",
                   help="random-weight networks in place of missing weights (to try the pipeline; meaningless numbers)")
    p.add_argument("--psnr", default="pooled", choices=["pooled", "per-frame"],
                   help="PSNR of the MSE over all frames (default), or the mean of the frames' PSNRs")
    p.add_argument("--fid-resize", default="network", choices=["network", "clean"],
                   help="frames resized to 299 by the FID Inception itself (default), or clean-fid's clean resize")
    p.add_argument("--fvd-clips", default="every", choices=["every", "first"],
                   help="every 16-frame clip of each video (default), or the first only (StyleGAN-V)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_eval)


def _eval(args: argparse.Namespace) -> int:
    import torch

    from ..media.io import write_json
    from ..quality.evaluate import EvalConfig, evaluate, write_plot

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    report = evaluate(args.pred, args.ref, EvalConfig(weights=args.weights, audio=args.audio, device=device,
                                                      random_features=args.random_features,
                                                      progress=not args.quiet, psnr=args.psnr,
                                                      fid_resize=args.fid_resize, fvd_clips=args.fvd_clips))
    write_json(args.output, report)
    if args.plot:
        write_plot(report, args.plot)
    agg = report["aggregate"]
    print(f"{len(report['videos'])} video(s): " + ", ".join(f"{k} {v}" for k, v in agg.items()
                                                          if not k.endswith(("_note", "_clips"))))
    for metric, why in report["unavailable"].items():
        print(f"{metric}: unavailable, needs {why['needs']} ({why['what']}; from {why['from']})")
    if report["note"]:
        print(f"note: {report['note']}")
    print(f"wrote {args.output}" + (f" and {args.plot}" if args.plot else ""))
    return 0


@command("demo", "run the whole pipeline on a locally built input (tiny model, no downloads)")
def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", default="demo.mp4")
    p.add_argument("--seconds", type=float, default=2.0, help="length of the generated input")
    p.add_argument("--device", default=None)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=_demo)


def _demo(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from .demo import make_demo_input
    from .engine import RunConfig, build_engine
    from .run import format_summary, run_video

    out = Path(args.output)
    # the tiny Wan VAE is slow on a CPU at 512x512; the tiny TAEHV encodes the same streams
    engine = build_engine(RunConfig(model="tiny", device=args.device or "", dtype="fp32", encoder="taehv"))
    with tempfile.TemporaryDirectory(prefix="lipforcing-demo-") as tmp:
        source = make_demo_input(Path(tmp) / "input.mp4", seconds=args.seconds)
        print(f"demo input: Grace Hopper portrait (matplotlib sample data) with synthesized speech, "
              f"{args.seconds:.1f} s; tiny model with random weights on {engine.device}")
        timing = out.with_suffix(".timing.json")
        summary = run_video(source, None, out, engine, progress=not args.quiet, timing=True, report=timing)
    print(format_summary(summary))
    print(f"timing summary: {timing}")
    return 0


@command("compile", "export the TAEHV codec to ONNX, check it with onnxruntime, build TensorRT engines")
def _compile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--taehv", default=None, help="taew2_1.pth (default: random weights at the real size)")
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("-o", "--out", default="compiled", help="output directory")
    p.add_argument("--no-tensorrt", action="store_true", help="only export and check the ONNX graphs")
    p.set_defaults(run=_compile)


def _compile(args: argparse.Namespace) -> int:
    from ...compile.stage import compile_codecs
    from ..codecs.taehv import TAEHV, load_taehv

    if args.taehv:
        taehv = load_taehv(args.taehv)
    else:
        print("no --taehv given: exporting a TAEHV with random weights (shapes and parity only)")
        taehv = TAEHV()
    try:
        report = compile_codecs(taehv, args.out, height=args.height, width=args.width, tensorrt=not args.no_tensorrt)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    for part in ("decoder", "encoder"):
        r = report[part]
        print(f"{part}: {r['onnx']} (onnxruntime vs PyTorch relative error {r['onnxruntime_rel_err']:.1e}); "
              f"TensorRT: {r['tensorrt']}")
    print(f"manifest: {report['manifest']} (use the folder with 'lipforcing run --compiled {args.out}')")
    return 0


def _model_config(name: str):
    from ..dit.config import ModelConfig

    try:
        return ModelConfig.from_name(name)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _stream_config(cfg, height: int | None, width: int | None):
    """``cfg``'s stream at height x width (default its face crops), a bad size said in one line."""
    try:
        return cfg.face_stream(height, width)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lipforcing", description="Real-time streaming lip synchronization.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine does")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (a service manager, ``docker stop``): stops a run exactly like Ctrl-C."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def _quiet_third_parties(verbose: bool) -> None:
    """Keep the console to our own lines: native and library log chatter only with -v."""
    if verbose:
        return
    os.environ.setdefault("GLOG_minloglevel", "2")  # MediaPipe (glog)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow Lite
    os.environ.setdefault("ORT_LOG_SEVERITY_LEVEL", "3")  # onnxruntime: errors only
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("transformers", "torch._dynamo", "torch._inductor", "onnxscript", "absl"):
        logging.getLogger(name).setLevel(logging.ERROR)


def configure_logging(verbose: bool) -> None:
    """Our lines at INFO with -v (else WARNING), third parties quiet (also in each spawned rank)."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    logging.getLogger("lipforcing").setLevel(logging.INFO if verbose else logging.WARNING)
    _quiet_third_parties(verbose)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what spawned ranks parse again (--gpus N)
    configure_logging(args.verbose)
    return run_command(args)


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed command; its exit status (errors, SIGTERM and Ctrl-C said in one line). Rank 0 of ``--gpus N``
    runs its command here too."""
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    try:
        return args.run(args)
    except LipforcingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        print("terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        _interrupt_handled()
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _interrupt_handled() -> None:
    """Keep Ctrl-C's exit status 130. CPython run with ``-m`` kills itself with SIGINT at exit (status -2) when a
    KeyboardInterrupt last left code run from a string (``exec``: dataclasses, namedtuples, lazy imports), even one
    handled since; a string run that succeeds clears that mark."""
    exec("pass")


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
