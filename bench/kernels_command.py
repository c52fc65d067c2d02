"""``lipforcing kernels --static``: every Triton kernel x config x dtype compiled for a GPU architecture on the
CPU, at the engine's real shapes, with registers, spills, shared memory, CTAs per SM and the tensor-core,
MUFU and copy instructions of its SASS (``lipforcing.kernels.static_report``).

    lipforcing kernels --static [--arch sm_90a] [--json] [--dtypes bf16,fp16,fp32] [--model 1.3b,14b]
    lipforcing kernels --tune [--model 1.3b,14b] [--device cuda] [--dtype bf16] [--json]

The shapes come from the engine's presets (``ModelConfig``, ``StreamConfig`` at --height x --width): one
chunk's queries and every window shape's cached keys. No GPU is needed; Triton's wheel brings ptxas and
cuobjdump. Compiled binaries land in TRITON_CACHE_DIR, so a second run is quick; a fresh cache works too.

``--tune`` times the attention backends (reference, sdpa and, where its kernels run, triton) on this device at
the same shapes and stores the winner per shape in the user cache (``engine.dit.tuning``); ``--backend auto``
(the default) then runs what won here.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
from dataclasses import asdict

from ..engine.app.cli import command
from ..engine.dit.cache import visible_cached_frames
from ..engine.dit.config import ModelConfig, StreamConfig
from ..engine.errors import ConfigError
from ..engine.numerics import parse_dtype
from ..kernels.sass_facts import SM_LIMITS
from ..kernels.static_report import (
    KERNELS,
    ModelShapes,
    ToolchainMissing,
    format_occupancy,
    format_table,
    parse_arch,
    static_report,
)


def _stream(name: str, args: argparse.Namespace) -> StreamConfig:
    """Preset ``name``'s stream at --height x --width (default: its face crops); bad names and sizes in one line."""
    try:
        return ModelConfig.from_name(name).face_stream(args.height, args.width)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def model_shapes(name: str, stream: StreamConfig) -> ModelShapes:
    """The sizes the kernels of preset ``name`` run at, streaming at ``stream``'s resolution."""
    try:
        cfg = ModelConfig.from_name(name)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    _, ph, pw = cfg.patch_size
    c = stream.chunk_frames
    # Every chunk start until the window is full (the visibility pattern repeats after), as cache_capacity.
    starts = range(0, stream.window_frames + stream.sink_frames + 2 * c + 1, c)
    cached = tuple(sorted({len(visible_cached_frames(start, stream)) for start in starts}))
    return ModelShapes(
        name=name, dim=cfg.dim, num_heads=cfg.num_heads, head_dim=cfg.head_dim, pairs_thw=cfg.rope_pairs_thw,
        ffn_dim=cfg.ffn_dim, grid_hw=(stream.latent_h // ph, stream.latent_w // pw), query_frames=c,
        cache_frames=cached, latent_channels=cfg.out_dim, patch_hw=(ph, pw),
    )


def _names(text: str, option: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ConfigError(f"{option} takes names separated by commas, got {text!r}")
    return names


@command("kernels", "compile every Triton kernel for a GPU architecture on the CPU and report its resources (--static)")
def _kernels_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--static", action="store_true",
                   help="registers, spills, shared memory, CTAs/SM, wgmma / MUFU / cp.async / TMA counts, no GPU")
    p.add_argument("--tune", action="store_true",
                   help="time the attention backends on this device at the model's shapes; auto then uses the winner")
    p.add_argument("--device", default=None, help="with --tune: default cuda when available, else cpu")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                   help="with --tune: default bf16 on CUDA, fp32 on a CPU")
    p.add_argument("--repeats", type=int, default=20, help="with --tune: timed calls per backend and shape")
    p.add_argument("--arch", default="sm_90a", help=f"one of {', '.join(l.name for l in SM_LIMITS.values())}")
    p.add_argument("--model", default="1.3b,14b", help="presets, comma-separated")
    p.add_argument("--dtypes", default="bf16,fp16,fp32", help="compute dtypes, comma-separated")
    p.add_argument("--kernels", default=",".join(KERNELS), help="comma-separated (default: all)")
    p.add_argument("--height", type=int, default=None,
                   help="face crop height in pixels (default: each model's, 512; tiny 256)")
    p.add_argument("--width", type=int, default=None, help="face crop width in pixels")
    p.add_argument("--jobs", type=int, default=None, help="compile processes (default: the CPU count, at most 8)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    p.set_defaults(run=_kernels)


def _kernels(args: argparse.Namespace) -> int:
    if args.static == args.tune:
        raise ConfigError("lipforcing kernels takes one of --static (compile and read the binaries, no GPU) or "
                          "--tune (time the attention backends on this device)")
    if args.tune:
        return _tune(args)
    try:
        parse_arch(args.arch)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    models = [model_shapes(name, _stream(name, args)) for name in _names(args.model, "--model")]
    dtypes = {name: parse_dtype(name) for name in _names(args.dtypes, "--dtypes")}
    kernels = _names(args.kernels, "--kernels")
    unknown = sorted(set(kernels) - set(KERNELS))
    if unknown:
        raise ConfigError(f"--kernels {', '.join(unknown)}: not a kernel; choose from {', '.join(KERNELS)}")
    if args.jobs is not None and args.jobs < 1:
        raise ConfigError("--jobs must be at least 1")
    try:
        rows = static_report(models, dtypes, arch=args.arch, kernels=kernels, workers=args.jobs,
                             progress=not args.json)
    except ImportError as exc:
        raise ConfigError(f"lipforcing kernels --static needs Triton: {exc}") from None
    except ToolchainMissing as exc:
        raise ConfigError(str(exc)) from None
    triton_version = importlib.metadata.version("triton")
    binaries = len({row.binary for row in rows})
    if args.json:
        print(json.dumps({"command": "kernels --static", "arch": rows[0].arch if rows else args.arch,
                          "triton": triton_version, "models": [asdict(m) for m in models], "dtypes": list(dtypes),
                          "binaries": binaries, "rows": [row.as_dict() for row in rows]}))
        return 0 if all(row.facts.compiled for row in rows) else 1
    limits = SM_LIMITS[parse_arch(args.arch)]
    print(f"Triton {triton_version}, compiled for {limits.name} on the CPU; {len(rows)} rows (kernel x config x "
          f"dtype x shape), {binaries} distinct binaries (rows that specialize alike share one: column 'binary')")
    print(f"{limits.name}: {limits.registers} registers, {limits.shared_per_sm} B shared memory per SM "
          f"({limits.shared_per_cta} B per CTA at most, {limits.reserved_shared_per_cta} B reserved per CTA), "
          f"{limits.max_warps} warps, {limits.max_ctas} CTAs")
    for m in models:
        print(f"{m.name}: dim {m.dim}, {m.num_heads} heads x {m.head_dim}, ffn {m.ffn_dim} (no kernel at that "
              f"width); {m.grid_hw[0]}x{m.grid_hw[1]} tokens per latent frame, {m.query_tokens} queries per chunk, "
              f"cached keys {', '.join(str(f * m.tokens_per_frame) for f in m.cache_frames)}")
    print("counts are static SASS instructions per thread: over one iteration of the main loop (one tile of keys) "
          "where there is one, else over the whole kernel\n")
    print(format_table(rows))
    print("\nCTAs per SM:")
    print(format_occupancy(rows))
    return 0 if all(row.facts.compiled for row in rows) else 1


def _tune(args: argparse.Namespace) -> int:
    import torch

    from ..engine.dit.tuning import measure_attention, save_measurements

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but CUDA is not available")
    if args.repeats < 1:
        raise ConfigError("--repeats must be at least 1")
    dtype = parse_dtype(args.dtype or ("bf16" if device.type == "cuda" else "fp32"))
    document = {"command": "kernels --tune", "device": str(device), "dtype": str(dtype).removeprefix("torch."),
                "timing": "median ms of one layer's streaming self-attention call, after one untimed call",
                "models": {}}
    for name in _names(args.model, "--model"):
        stream = _stream(name, args)
        rows = measure_attention(ModelConfig.from_name(name), stream, device, dtype, repeats=args.repeats)
        document["models"][name] = rows
        if not args.json:
            for row in rows:
                cells = ", ".join(f"{b} {ms:.3f} ms" for b, ms in row["ms"].items())
                print(f"{name} Lq {row['lq']} Lc {row['lc']}: {cells} -> {row['winner']}")
        document["table"] = str(save_measurements(rows, device))
    if args.json:
        print(json.dumps(document))
    else:
        print(f"stored in {document['table']}: --backend auto now takes the fastest on these shapes here")
    return 0
