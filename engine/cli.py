"""The ``lipforcing`` command line.

    lipforcing check-reference GOLDEN.safetensors... [--device cpu|cuda] [--backend reference|triton]
    lipforcing info --model 1.3b|14b [--height 512 --width 512]
    lipforcing convert IN.pth OUT.safetensors

User errors (bad files, missing weights, bad options) print one ``error:`` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
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
