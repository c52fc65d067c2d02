"""The ``lipforcing`` command line.

    lipforcing check-reference GOLDEN.safetensors... [--device cpu|cuda] [--backend reference|triton]
    lipforcing info --model 1.3b|14b [--height 512 --width 512]
    lipforcing convert IN.pth OUT.safetensors
    lipforcing run VIDEO [--audio AUDIO] -o OUT.mp4 [--model 14b --ckpt ... --vae ... --taehv ...]
    lipforcing demo [-o demo.mp4]
    lipforcing compile [--taehv taew2_1.pth] [-o DIR]
    lipforcing bench [--model 1.3b] [--backends reference,optimized] [--out R.json] [--compare BASE.json]

User errors (bad files, missing weights, bad options) print one ``error:`` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable

from .errors import LipforcingError

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {}


def command(name: str, help: str):
    """Register a subcommand; the decorated function adds its arguments and sets ``run(args) -> int``."""

    def register(add_arguments):
        COMMANDS[name] = (help, add_arguments)
        return add_arguments

    return register


@command("check-reference", "run the engine on golden files and report relative errors")
def _check_reference_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", help="golden .safetensors files (lipforcing-golden/1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--backend", default="reference", choices=["reference", "triton"])
    p.set_defaults(run=_check_reference)


def _check_reference(args: argparse.Namespace) -> int:
    from .golden import PASS_BOUND, check_golden

    worst = 0.0
    header = ("file", "first_call_flow", "x0_step0", "(worst chunk)", "x0", "(worst chunk)")
    print("{:<28} {:>16} {:>10} {:>13} {:>10} {:>13}".format(*header))
    for path in args.files:
        r = check_golden(path, device=args.device, backend=args.backend)
        e = r.errors
        print(
            f"{r.path.name:<28} {e['first_call_flow']:>16.2e} {e['x0_step0']:>10.2e} {e['x0_step0/worst_chunk']:>13.2e}"
            f" {e['x0']:>10.2e} {e['x0/worst_chunk']:>13.2e}  {'ok' if r.ok else 'FAIL'}"
        )
        worst = max(worst, *e.values())
    verdict = "pass" if worst <= PASS_BOUND else "FAIL"
    where = f"{args.device}, backend {args.backend}"
    print(f"worst relative error {worst:.2e} (bound {PASS_BOUND:.0e}, {where}): {verdict}")
    return 0 if worst <= PASS_BOUND else 1


@command("info", "parameters, memory and FLOPs of a model at a resolution")
def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="1.3b", help="tiny, 1.3b or 14b")
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--peak-tflops", type=float, default=None, help="matrix rate used for the compute floor")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    p.set_defaults(run=_info)


def _info(args: argparse.Namespace) -> int:
    from .info import DEFAULT_PEAK_TFLOPS, format_info, info_dict, model_info

    cfg = _model_config(args.model)
    stream = _stream_config(args.height, args.width)
    info = model_info(cfg, stream, peak_tflops=args.peak_tflops or DEFAULT_PEAK_TFLOPS)
    print(json.dumps(info_dict(info)) if args.json else format_info(args.model, stream, info))
    return 0


@command("convert", "convert a checkpoint (.pth / .safetensors / sharded) to one .safetensors file")
def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--dtype", choices=["keep", "bf16", "fp16", "fp32"], default="keep")
    p.set_defaults(run=_convert)


def _convert(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import convert_checkpoint

    dtype = {"keep": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    n = convert_checkpoint(args.src, args.dst, dtype=dtype)
    print(f"wrote {n} tensors to {args.dst}")
    return 0


def _add_run_options(p: argparse.ArgumentParser) -> None:
    w = p.add_argument_group("weights (not needed for --model tiny)")
    w.add_argument("--ckpt", help="student checkpoint (.pth / .safetensors / sharded)")
    w.add_argument("--vae", help="Wan 2.1 VAE (Wan2.1_VAE.pth)")
    w.add_argument("--taehv", help="TAEHV for Wan 2.1 (taew2_1.pth)")
    w.add_argument("--wav2vec", help="directory with wav2vec2-base-960h (config.json + weights)")
    w.add_argument("--text-embeds", help="[1, 512, 4096] text embeddings (text_emb.pt)")
    p.add_argument("--model", default="14b", choices=["tiny", "1.3b", "14b"])
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--encoder", default="wan", choices=["wan", "taehv"])
    p.add_argument("--decoder", default="taehv", choices=["taehv", "wan"])
    p.add_argument("--backend", default=None, choices=["reference", "triton"], help="student attention backend")
    p.add_argument("--decoder-backend", default=None, choices=["auto", "tensorrt", "onnxruntime", "torch"],
                   help="TAEHV decoder backend (default: auto on CUDA, torch on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the student's blocks")
    p.add_argument("--face-box", default=None, help="x,y,w,h: use the face whose centre lies in this box")
    p.add_argument("--mask", default=None, help="mouth mask image (255 = keep) instead of the built-in one")
    p.add_argument("--require-face", action="store_true", help="fail when no face is found anywhere")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_config(args: argparse.Namespace):
    import torch

    from .pipeline import RunConfig, Weights

    box = None
    if args.face_box:
        try:
            box = tuple(float(v) for v in args.face_box.split(","))
        except ValueError:
            box = ()
        if len(box) != 4 or box[2] <= 0 or box[3] <= 0:
            raise LipforcingError(f"--face-box must be x,y,w,h with positive w and h, got {args.face_box!r}")
    cfg = RunConfig(
        model=args.model, device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        dtype=args.dtype, encoder=args.encoder, decoder=args.decoder, backend=args.backend, face_box=box,
        decoder_backend=args.decoder_backend, compile=args.compile,
        mask=args.mask, require_face=args.require_face, seed=args.seed,
    )
    weights = Weights(ckpt=args.ckpt, vae=args.vae, taehv=args.taehv, wav2vec=args.wav2vec,
                      text_embeds=args.text_embeds)
    return cfg, weights


@command("run", "lip-sync a talking-head video to speech and write an MP4")
def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("video", help="input video (any common container/codec)")
    p.add_argument("--audio", default=None, help="speech (wav/mp3/m4a/flac/...); default: the video's own audio")
    p.add_argument("-o", "--output", required=True, help="output .mp4")
    _add_run_options(p)
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    from .pipeline import build_components
    from .run import format_summary, run_video

    cfg, weights = _run_config(args)
    summary = run_video(args.video, args.audio, args.output, build_components(cfg, weights), progress=not args.quiet)
    print(format_summary(summary))
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

    import torch

    from .demo import make_demo_input
    from .pipeline import RunConfig, build_components
    from .run import format_summary, run_video

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.output)
    with tempfile.TemporaryDirectory(prefix="lipforcing-demo-") as tmp:
        source = make_demo_input(Path(tmp) / "input.mp4", seconds=args.seconds)
        print(f"demo input: Grace Hopper portrait (matplotlib sample data) with synthesized speech, "
              f"{args.seconds:.1f} s; tiny model with random weights on {device}")
        # the tiny Wan VAE is slow on a CPU at 512x512; the tiny TAEHV encodes the same streams
        parts = build_components(RunConfig(model="tiny", device=device, dtype="fp32", encoder="taehv"))
        summary = run_video(source, None, out, parts, progress=not args.quiet)
    print(format_summary(summary))
    timing = out.with_suffix(".timing.json")
    timing.write_text(json.dumps(summary, indent=2))
    print(f"timing summary: {timing}")
    return 0


@command("bench", "measure throughput, time to first frame and stage times (reference vs optimized)")
def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="tiny, 1.3b or 14b (default: 1.3b on CUDA, tiny on CPU)")
    p.add_argument("--ckpt", default=None, help="real weights instead of random ones")
    p.add_argument("--height", type=int, default=None, help="pixels (default 512 on CUDA, 128 on CPU)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--chunks", type=int, default=None, help="timed chunks (default 20 on CUDA, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=3, help="untimed chunks first (>= 3)")
    p.add_argument("--backends", default="reference,optimized", help="any of reference,optimized,compiled")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--encoder", default=None, choices=["wan", "taehv"], help="default wan on CUDA, taehv on CPU")
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.add_argument("--compare", default=None, help="baseline JSON report to gate against")
    p.add_argument("--max-regression", type=float, default=5.0, help="allowed FPS drop in percent")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=_bench)


def _bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from ..bench.pipeline import BenchConfig, dump, format_report, run_bench
    from ..bench.report import compare

    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise LipforcingError("--device cuda was asked for but CUDA is not available")
    backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    unknown = set(backends) - {"reference", "optimized", "compiled"}
    if unknown or not backends:
        raise LipforcingError(f"--backends takes reference, optimized and/or compiled, got {args.backends!r}")
    if args.warmup < 3:
        raise LipforcingError("--warmup must be at least 3 (chunk 0, chunk 1 and one steady-state chunk)")
    cfg = BenchConfig(
        model=args.model or ("1.3b" if cuda else "tiny"), height=args.height or (512 if cuda else 128),
        width=args.width or (512 if cuda else 128), chunks=args.chunks or (20 if cuda else 3), warmup=args.warmup,
        backends=backends, device="cuda" if cuda else "cpu", dtype=args.dtype,
        encoder=args.encoder or ("wan" if cuda else "taehv"), ckpt=args.ckpt, progress=not args.quiet,
    )
    baseline = None
    if args.compare:
        try:
            baseline = json.loads(Path(args.compare).read_text())
        except (OSError, ValueError) as exc:
            raise LipforcingError(f"{args.compare}: cannot read the baseline report ({exc})") from None
    report = run_bench(cfg)
    print(format_report(report))
    if args.out:
        dump(report, args.out)
    status = 0
    if baseline is not None:
        failures, notes = compare(report, baseline, args.max_regression)
        for line in notes:
            print(f"compare: {line}")
        for line in failures:
            print(f"compare: FAIL {line}")
        status = 1 if failures else 0
        report["compare"] = {"baseline": args.compare, "failures": failures, "notes": notes}
    print(json.dumps(report))
    return status


@command("compile", "export the TAEHV codec to ONNX, check it with onnxruntime, build TensorRT engines")
def _compile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--taehv", default=None, help="taew2_1.pth (default: random weights at the real size)")
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("-o", "--out", default="compiled", help="output directory")
    p.add_argument("--no-tensorrt", action="store_true", help="only export and check the ONNX graphs")
    p.set_defaults(run=_compile)


def _compile(args: argparse.Namespace) -> int:
    from ..compile.stage import compile_codecs
    from .taehv import TAEHV, load_taehv

    if args.taehv:
        taehv = load_taehv(args.taehv)
    else:
        print("no --taehv given: exporting a TAEHV with random weights (shapes and parity only)")
        taehv = TAEHV()
    try:
        report = compile_codecs(taehv, args.out, height=args.height, width=args.width, tensorrt=not args.no_tensorrt)
    except ValueError as exc:
        raise LipforcingError(str(exc)) from None
    for part in ("decoder", "encoder"):
        r = report[part]
        print(f"{part}: {r['onnx']} (onnxruntime vs PyTorch relative error {r['onnxruntime_rel_err']:.1e}); "
              f"TensorRT: {r['tensorrt']}")
    return 0


def _model_config(name: str):
    from .config import ModelConfig

    try:
        return ModelConfig.from_name(name)
    except ValueError as exc:
        raise LipforcingError(str(exc)) from None


def _stream_config(height: int, width: int):
    from .config import StreamConfig

    try:
        return StreamConfig.for_resolution(height, width)
    except ValueError as exc:
        raise LipforcingError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lipforcing", description="Real-time streaming lip synchronization.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine does")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("GLOG_minloglevel", "2")  # mediapipe's native logging
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.run(args)
    except LipforcingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
