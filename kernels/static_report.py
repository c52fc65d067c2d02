"""Static proof of the Triton kernels on a GPU architecture, compiled on the CPU (no GPU, no driver).

    from lipforcing.kernels.static_report import ModelShapes, format_table, static_report
    rows = static_report([shapes_1_3b, shapes_14b], {"bf16": torch.bfloat16}, arch="sm_90a")
    print(format_table(rows))                      # or json.dumps([row.as_dict() for row in rows])
    # command line: lipforcing kernels --static [--arch sm_90a] [--json] [--dtypes bf16,fp16] [--model 1.3b,14b]

For every kernel of this package x every config it can run with x dtype x shape of ``ModelShapes``:

1. The launch is recorded: the kernel's own launcher is called on meta tensors of the real shapes with the
   kernel object swapped for a recorder, so arguments, constexprs and num_warps are the launcher's. The
   autotuned attention contributes every config its autotuner keeps after its own early prune.
2. The arguments are specialized as Triton's JIT specializes them at a launch (pointers and integers
   divisible by 16, integers equal to 1 become constants). Launches that differ only in runtime values
   (sequence lengths, head counts, strides of the same divisibility) specialize alike: they are one
   binary, compiled once and shared by their rows (the ``binary`` column).
3. Each distinct binary is compiled by ``triton.compile`` for ``GPUTarget("cuda", cc, 32)`` in spawned
   worker processes (TRITON_INTERPRET=0 there, so a caller that runs the interpreter can ask too).
   TRITON_CACHE_DIR applies; nothing here needs a warm cache.
4. The cubin is read with the tools bundled in Triton's wheel: registers, stack frame and static shared
   memory (``cuobjdump -res-usage``; ptxas -v is re-run on the PTX for the spill bytes when the stack frame
   is not empty: no stack, no spill), Triton's dynamic shared memory, and the SASS (``cuobjdump -sass``).
5. CTAs per SM follow from the architecture's limits (``SM_LIMITS``); ``Occupancy.arithmetic`` writes the
   arithmetic out.

SASS counts (``sass_facts``) are static instructions of the binary, each executed once per thread where it
sits, counted over the kernel and over the main loop's body: one iteration of the loop = one tile of keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import io
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from types import ModuleType

import torch
from tqdm import tqdm

from lipforcing.kernels.sass_facts import (
    SM_LIMITS,
    BinaryFacts,
    Occupancy,
    SmLimits,
    ToolchainMissing,
    check_toolchain,
    inspect_cubin,
    occupancy,
)

__all__ = ["KERNELS", "ModelShapes", "StaticRow", "ToolchainMissing", "parse_arch", "static_report", "format_table",
           "format_occupancy"]

KERNELS = ("sink_window_attention", "flow_update", "gated_residual", "modulated_layer_norm", "rms_norm")


@dataclass(frozen=True, kw_only=True)
class ModelShapes:
    """The sizes one model's kernels run at (built from the engine's configs by the command line)."""

    name: str
    """Preset name, e.g. ``1.3b``."""
    dim: int
    """Width of the residual stream (the norms and the gated residual run at this width)."""
    num_heads: int
    head_dim: int
    pairs_thw: tuple[int, int, int]
    """RoPE pairs per axis (temporal, row, column), summing to head_dim / 2."""
    ffn_dim: int
    """For the record: no Triton kernel runs at the FFN width (its GEMMs are PyTorch's)."""
    grid_hw: tuple[int, int]
    """Token grid of one latent frame (latent / patch), e.g. (32, 32)."""
    query_frames: int
    """Latent frames of a chunk (its queries and live keys)."""
    cache_frames: tuple[int, ...]
    """Cached frames a chunk can see, one entry per window shape, e.g. (0, 3, 4)."""
    latent_channels: int
    patch_hw: tuple[int, int]
    batch: int = 1

    @property
    def tokens_per_frame(self) -> int:
        return self.grid_hw[0] * self.grid_hw[1]

    @property
    def query_tokens(self) -> int:
        return self.query_frames * self.tokens_per_frame


@dataclass(frozen=True)
class _CompileJob:
    """One distinct binary: what ``triton.compile`` needs, in plain picklable values."""

    module: str
    function: str
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[tuple[int, ...], object], ...]
    attrs: tuple[tuple[tuple[int, ...], tuple], ...]
    options: tuple[tuple[str, int], ...]
    capability: int

    @property
    def binary_id(self) -> str:
        return hashlib.sha256(repr(self).encode()).hexdigest()[:10]


@dataclass(frozen=True)
class _Planned:
    kernel: str
    config: str
    dtype: str
    shape: str
    pointers: str
    job: _CompileJob


@dataclass(frozen=True, kw_only=True)
class StaticRow:
    """One (kernel, config, dtype, shape) of the report; rows with the same ``binary`` share every fact."""

    kernel: str
    config: str
    """Launch config: tile constexprs, num_warps, num_stages."""
    dtype: str
    """The engine's compute dtype for this row (tensors the engine keeps in fp32 stay fp32: see pointers)."""
    shape: str
    pointers: str
    """Element types of the pointer arguments, in argument order."""
    binary: str
    """Id of the specialized binary (rows with equal ids compiled once)."""
    arch: str
    facts: BinaryFacts
    occupancy: Occupancy | None
    """None when the kernel did not compile."""

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_arch(arch: str) -> int:
    """Compute capability of ``sm_90a`` / ``sm_90`` / ``90`` (ValueError for one without limits here)."""
    digits = arch.lower().removeprefix("sm_").removesuffix("a")
    if not digits.isdigit() or int(digits) not in SM_LIMITS:
        known = ", ".join(limits.name for limits in SM_LIMITS.values())
        raise ValueError(f"--arch {arch!r}: not an architecture this report knows; use one of {known}")
    return int(digits)


# --- 1. recording the launchers' launches -----------------------------------------------------------------


@dataclass(frozen=True)
class _Launch:
    kernel: str
    module: ModuleType
    function: str
    args: tuple
    meta: dict
    options: dict
    config: str
    shape: str


@contextlib.contextmanager
def _recorded(module: ModuleType, name: str) -> Iterator[list[tuple[tuple, dict]]]:
    """Swap ``module.name`` (a kernel launched as ``kernel[grid](*args, **kwargs)``) for a recorder."""
    calls: list[tuple[tuple, dict]] = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((args, kwargs))

    original = getattr(module, name)
    setattr(module, name, Recorder())
    try:
        yield calls
    finally:
        setattr(module, name, original)


def _record_one(module: ModuleType, name: str, launcher: Callable, *args, **kwargs) -> tuple[tuple, dict]:
    """The (args, kwargs) ``launcher(*args, **kwargs)`` launches ``module.name`` with."""
    with _recorded(module, name) as calls:
        launcher(*args, **kwargs)
    if len(calls) != 1:
        raise RuntimeError(f"{module.__name__}.{name}: expected one launch, recorded {len(calls)}")
    return calls[0]


def _meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _dims(t: torch.Tensor) -> str:
    return "x".join(map(str, t.shape))


def _split_options(kwargs: dict) -> tuple[dict, dict]:
    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    return {k: v for k, v in kwargs.items() if k not in options}, options


def _describe(meta: dict, options: dict, names: Sequence[str]) -> str:
    tiles = " ".join(f"{n}={meta[n]}" for n in names if n in meta)
    return " ".join(filter(None, [tiles, *(f"{k.removeprefix('num_')}={v}" for k, v in sorted(options.items()))]))


def _attention_launches(s: ModelShapes, dtype: torch.dtype) -> list[_Launch]:
    from lipforcing.kernels import sink_window_attention as module

    tuner = module._sink_window_attention_fwd_tuned
    launches = []
    for cache_frames in s.cache_frames:
        lq, lc = s.query_tokens, cache_frames * s.tokens_per_frame
        q, k, v = (_meta(s.batch, lq, s.num_heads, s.head_dim, dtype=dtype) for _ in range(3))
        kc, vc = (_meta(s.batch, lc, s.num_heads, s.head_dim, dtype=dtype) for _ in range(2))
        q_pos, c_pos = _meta(s.query_frames, dtype=torch.int32), _meta(cache_frames, dtype=torch.int32)
        args, kwargs = _record_one(module, "_sink_window_attention_fwd_tuned", module.sink_window_attention,
                                   q, k, v, kc, vc, q_pos, c_pos, s.grid_hw, s.pairs_thw)
        # the configs the autotuner would benchmark for this call: its own early prune decides
        prune = tuner.early_config_prune
        configs = prune(tuner.configs, dict(zip(tuner.arg_names, args)), **kwargs) if prune else tuner.configs
        for config in configs:
            meta = {**kwargs, **config.kwargs}
            options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
            launches.append(_Launch("sink_window_attention", module, "_sink_window_attention_fwd_kernel", args, meta,
                                    options, _describe(meta, options, ("BLOCK_M", "BLOCK_N")),
                                    f"{s.name} B={s.batch} H={s.num_heads} D={s.head_dim} Lq={lq} Lc={lc}"))
    return launches


def _flow_update_launches(s: ModelShapes, dtype: torch.dtype) -> list[_Launch]:
    # The engine steps fp32 latents with the head's fp32 tokens whatever the compute dtype.
    from lipforcing.kernels import flow_update as module

    ph, pw = s.patch_hw
    rows, cols = s.grid_hw
    x = _meta(s.batch, s.latent_channels, s.query_frames, rows * ph, cols * pw, dtype=torch.float32)
    v_tok = _meta(s.batch, s.query_tokens, s.latent_channels * ph * pw, dtype=torch.float32)
    steps = {"x0": (v_tok, x, 0.999), "x0+renoise": (v_tok, x, 0.999, 0.769, torch.empty_like(x))}
    launches = []
    for variant, step in steps.items():
        args, kwargs = _record_one(module, "_flow_update_fwd_kernel", module.flow_update, *step)
        meta, options = _split_options(kwargs)
        launches.append(_Launch("flow_update", module, "_flow_update_fwd_kernel", args, meta, options,
                                _describe(meta, options, ("BLOCK",)), f"{s.name} step={variant} x_t={_dims(x)}"))
    return launches


def _modulation(s: ModelShapes) -> list[torch.Tensor]:
    """The six per-frame rows [B, F, dim] of the blocks' fp32 modulation, views of one [B, F, 6, dim] table."""
    return list(_meta(s.batch, s.query_frames, 6, s.dim, dtype=torch.float32).unbind(2))


def _gated_residual_launches(s: ModelShapes, dtype: torch.dtype) -> list[_Launch]:
    # The residual stream and the gate are fp32 in the engine; the attention / FFN output is in the compute dtype.
    from lipforcing.kernels import gated_residual as module

    x = _meta(s.batch, s.query_tokens, s.dim, dtype=torch.float32)
    y = _meta(s.batch, s.query_tokens, s.dim, dtype=dtype)
    args, kwargs = _record_one(module, "_gated_residual_fwd_kernel", module.gated_residual, x, y, _modulation(s)[2])
    meta, options = _split_options(kwargs)
    return [_Launch("gated_residual", module, "_gated_residual_fwd_kernel", args, meta, options,
                    _describe(meta, options, ("BLOCK_D",)), f"{s.name} x={_dims(x)}")]


def _modulated_layer_norm_launches(s: ModelShapes, dtype: torch.dtype) -> list[_Launch]:
    # The engine normalizes the fp32 residual stream with the fp32 modulation whatever the compute dtype.
    from lipforcing.kernels import norm_modulation as module

    x = _meta(s.batch, s.query_tokens, s.dim, dtype=torch.float32)
    shift, scale = _modulation(s)[:2]
    args, kwargs = _record_one(module, "_modulated_layer_norm_fwd_kernel", module.modulated_layer_norm,
                               x, scale, shift)
    meta, options = _split_options(kwargs)
    return [_Launch("modulated_layer_norm", module, "_modulated_layer_norm_fwd_kernel", args, meta, options,
                    _describe(meta, options, ("BLOCK_D",)), f"{s.name} x={_dims(x)}")]


def _rms_norm_launches(s: ModelShapes, dtype: torch.dtype) -> list[_Launch]:
    # q and k come out of the projections in the compute dtype; the norm weight is a model weight.
    from lipforcing.kernels import rms_norm as module

    x = _meta(s.batch, s.query_tokens, s.dim, dtype=dtype)
    args, kwargs = _record_one(module, "_rms_norm_fwd_kernel", module.rms_norm, x, _meta(s.dim, dtype=dtype))
    meta, options = _split_options(kwargs)
    return [_Launch("rms_norm", module, "_rms_norm_fwd_kernel", args, meta, options,
                    _describe(meta, options, ("BLOCK_D",)), f"{s.name} x={_dims(x)}")]


_LAUNCHES: dict[str, Callable[[ModelShapes, torch.dtype], list[_Launch]]] = {
    "sink_window_attention": _attention_launches,
    "flow_update": _flow_update_launches,
    "gated_residual": _gated_residual_launches,
    "modulated_layer_norm": _modulated_layer_norm_launches,
    "rms_norm": _rms_norm_launches,
}


# --- 2. specializing them as the JIT does ---------------------------------------------------------------


def _specialize(launch: _Launch, capability: int) -> tuple[_CompileJob, str]:
    """The compile job Triton's JIT would make of this launch, and the pointer arguments' element types.

    Uses the JIT's own binder and argument packing (``JITFunction.run`` calls the same two, Triton 3.x):
    they are private, but they are the definition of "the binary this launch gets".
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = getattr(launch.module, launch.function)
    backend = make_backend(GPUTarget("cuda", capability, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, parsed = binder(*launch.args, **launch.meta, **launch.options)
    _, signature, constexprs, attrs = fn._pack_args(backend, {**launch.meta, **launch.options}, bound,
                                                    specialization, parsed)
    job = _CompileJob(
        module=launch.module.__name__, function=launch.function, signature=tuple(signature.items()),
        constexprs=tuple(sorted(constexprs.items())),
        attrs=tuple(sorted((k, tuple(tuple(a) for a in v)) for k, v in attrs.items())),
        options=tuple(sorted(launch.options.items())), capability=capability,
    )
    pointers = ",".join(t.removeprefix("*") for t in signature.values() if t.startswith("*"))
    return job, pointers


def _plan(models: Sequence[ModelShapes], dtypes: Mapping[str, torch.dtype], kernels: Sequence[str],
          capability: int) -> list[_Planned]:
    check_toolchain(capability)
    planned = []
    for kernel in kernels:
        for dtype_name, dtype in dtypes.items():
            for shapes in models:
                for launch in _LAUNCHES[kernel](shapes, dtype):
                    job, pointers = _specialize(launch, capability)
                    planned.append(_Planned(kernel, launch.config, dtype_name, launch.shape, pointers, job))
    return planned


# --- 3. compiling each distinct binary ------------------------------------------------------------------


def _worker_setup(cache_dir: str | None) -> None:
    """Runs first in every worker, before Triton is imported there: compile, never interpret."""
    os.environ["TRITON_INTERPRET"] = "0"
    if cache_dir is not None:
        os.environ["TRITON_CACHE_DIR"] = cache_dir
    # Triton 3.9 warns that fp fusion's default will change; the engine runs with today's default (fused).
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")


def _compile(job: _CompileJob) -> BinaryFacts:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(job.module), job.function)
    source = ASTSource(fn, dict(job.signature), dict(job.constexprs),
                       {k: [list(a) for a in v] for k, v in job.attrs})
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # a ptxas failure prints the whole PTX
            kernel = triton.compile(source, target=GPUTarget("cuda", job.capability, 32), options=dict(job.options))
    except Exception as err:  # reported in the row: a config that does not compile is a finding
        message = " ".join(str(err).split())[:300]
        return BinaryFacts(compiled=False, error=f"{type(err).__name__}: {message}",
                           compile_seconds=time.perf_counter() - start)
    return inspect_cubin(kernel.asm["cubin"], kernel.asm["ptx"], kernel.metadata, job.capability,
                         compile_seconds=time.perf_counter() - start)


def static_report(
    models: Sequence[ModelShapes],
    dtypes: Mapping[str, torch.dtype],
    *,
    arch: str = "sm_90a",
    kernels: Sequence[str] = KERNELS,
    workers: int | None = None,
    cache_dir: str | None = None,
    progress: bool = False,
) -> list[StaticRow]:
    """One row per (kernel, config, dtype, shape); each distinct binary compiled once.

    models: the shapes of each model. dtypes: name -> torch dtype, the compute dtypes to report.
    workers: compile processes (default: the CPU count, at most 8). cache_dir: TRITON_CACHE_DIR for the workers
    (default: the caller's environment). progress: a tqdm bar over the binaries on stderr.
    Raises ImportError without Triton, ToolchainMissing without its CUDA tools, ValueError for an unknown
    arch or kernel. A config that fails to compile is a row with ``facts.compiled`` False, not an error.
    """
    capability = parse_arch(arch)
    unknown = set(kernels) - set(KERNELS)
    if unknown:
        raise ValueError(f"unknown kernels {sorted(unknown)}; choose from {', '.join(KERNELS)}")
    try:
        import triton  # noqa: F401  (compiled in the workers; here only to fail early and clearly)
    except ImportError as err:
        raise ImportError(f"triton is not installed ({err}); pip install 'lipforcing[gpu]'") from None
    context = get_context("spawn")  # a fresh interpreter: no CUDA state, no interpreter-mode Triton
    # each worker imports torch and Triton (~0.5 GB); a few dozen binaries do not need more than 8
    count = max(1, workers or min(os.cpu_count() or 1, 8))
    facts: dict[_CompileJob, BinaryFacts] = {}
    with ProcessPoolExecutor(count, mp_context=context, initializer=_worker_setup, initargs=(cache_dir,)) as pool:
        planned = pool.submit(_plan, list(models), dict(dtypes), list(kernels), capability).result()
        jobs = list(dict.fromkeys(p.job for p in planned))
        futures = {pool.submit(_compile, job): job for job in jobs}
        with tqdm(total=len(jobs), desc="compile", unit="binary", disable=not progress, dynamic_ncols=True) as bar:
            for future in as_completed(futures):
                facts[futures[future]] = future.result()
                bar.update(1)
    limits = SM_LIMITS[capability]
    return [_row(p, facts[p.job], limits) for p in planned]


def _row(p: _Planned, facts: BinaryFacts, limits: SmLimits) -> StaticRow:
    threads = dict(p.job.options).get("num_warps", 4) * 32
    occ = occupancy(facts, threads, limits) if facts.compiled else None
    return StaticRow(kernel=p.kernel, config=p.config, dtype=p.dtype, shape=p.shape, pointers=p.pointers,
                     binary=p.job.binary_id, arch=limits.name, facts=facts, occupancy=occ)


# --- the table ----------------------------------------------------------------------------------------------


def _counts(counts: Mapping[str, int], names: Sequence[str]) -> str:
    return "/".join(str(counts.get(n, 0)) for n in names)


def _mufu(counts: Mapping[str, int]) -> str:
    return " ".join(f"{k.removeprefix('MUFU.')}:{v}" for k, v in sorted(counts.items()) if k.startswith("MUFU.")) or "-"


def _summarize(shapes: Sequence[str]) -> str:
    """``["1.3b H=12 Lc=0", "14b H=40 Lc=0"]`` -> ``"1.3b/14b H=12/40 Lc=0"`` (word by word, values joined)."""
    split = [shape.split() for shape in dict.fromkeys(shapes)]
    if len({len(words) for words in split}) != 1:
        return "; ".join(shapes)
    words = []
    for column in zip(*split):
        values = list(dict.fromkeys(column))
        keys = {word.partition("=")[0] for word in values}
        if len(keys) == 1 and all("=" in word for word in values):
            words.append(f"{keys.pop()}=" + "/".join(word.partition("=")[2] for word in values))
        else:
            words.append("/".join(values))
    return " ".join(words)


def format_table(rows: Sequence[StaticRow]) -> str:
    """A markdown table, one line per binary and (kernel, config, dtype); its shapes listed together."""
    groups: dict[tuple, list[StaticRow]] = {}
    for row in rows:
        groups.setdefault((row.kernel, row.config, row.dtype, row.binary), []).append(row)
    header = ["kernel", "config", "dtype", "shapes", "regs", "spill st/ld B", "stack B", "smem B", "CTAs/SM",
              "HGMMA/HMMA", "MUFU", "LDG/LDGSTS/UTMALDG", "counted over", "binary"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (kernel, config, dtype, binary), group in groups.items():
        f, occ = group[0].facts, group[0].occupancy
        shapes = _summarize([r.shape for r in group])
        if not f.compiled:
            cells = [kernel, config, dtype, shapes, f"not compiled: {f.error}", *[""] * 8, binary]
        else:
            scope = f.tile_counts if f.tile_counts is not None else f.kernel_counts
            cells = [
                kernel, config, dtype, shapes, str(f.registers), f"{f.spill_stores}/{f.spill_loads}",
                str(f.stack_frame), str(f.dynamic_shared), f"{occ.ctas_per_sm} ({occ.limited_by})",
                _counts(scope, ("HGMMA", "HMMA")), _mufu(scope), _counts(scope, ("LDG", "LDGSTS", "UTMALDG")),
                "loop body (1 tile)" if f.tile_counts is not None else "whole kernel", binary,
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_occupancy(rows: Sequence[StaticRow]) -> str:
    """The CTAs-per-SM arithmetic of each compiled binary, one line per (kernel, config, dtype)."""
    seen: dict[tuple, str] = {}
    for row in rows:
        if row.occupancy is not None:
            seen.setdefault((row.kernel, row.config, row.dtype, row.binary), row.occupancy.arithmetic)
    return "\n".join(f"- {kernel} {config} {dtype}: {text}" for (kernel, config, dtype, _), text in seen.items())
