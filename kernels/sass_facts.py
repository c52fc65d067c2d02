"""What a compiled cubin says about itself, and how many of its CTAs fit on one SM.

    facts = inspect_cubin(kernel.asm["cubin"], kernel.asm["ptx"], kernel.metadata, capability=90)
    occ = occupancy(facts, threads=256, limits=SM_LIMITS[90])
    print(facts.registers, facts.spill_stores, facts.tile_counts, occ.ctas_per_sm, occ.arithmetic)

Reads the binary with the CUDA tools bundled in Triton's wheel (no GPU, no driver):

- ``cuobjdump -res-usage``: registers per thread, stack frame, static shared memory (on sm_80+ the 1 KB
  the CUDA runtime reserves per CTA shows up here), local memory;
- ``ptxas -v`` re-run on the PTX with Triton's flags, only when the stack frame is not empty: spill stores
  and loads in bytes (spills live in the stack frame, so an empty frame means no spill);
- ``cuobjdump -sass``: static counts of HGMMA (wgmma) vs HMMA (mma.sync), MUFU.<op>, LDGSTS (cp.async) vs
  UTMALDG (TMA), global loads / stores, local (spill) loads / stores. Counted over the whole kernel and over
  the body of its main loop: the first loop (backward branch) that holds the matmuls, else the first loop.
  A static count in the loop body is what one thread executes per iteration, i.e. per tile.

Used by ``static_report``; the occupancy arithmetic is the CUDA occupancy calculator's, written out.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SmLimits", "SM_LIMITS", "BinaryFacts", "Occupancy", "ToolchainMissing", "check_toolchain",
           "inspect_cubin", "sass_counts", "occupancy"]


class ToolchainMissing(RuntimeError):
    """Triton's NVIDIA backend or one of the CUDA tools its wheel bundles (ptxas, cuobjdump) is not there."""


@dataclass(frozen=True, kw_only=True)
class SmLimits:
    """Per-SM resources of one architecture (CUDA programming guide, compute capability table)."""

    name: str
    registers: int = 65536
    """32-bit registers per SM, split evenly over ``subpartitions`` (a warp's registers sit in one)."""
    subpartitions: int = 4
    register_unit: int = 256
    """Registers are allocated per warp in units of 256 (8 per thread)."""
    shared_per_sm: int
    """Shared memory an SM can give its CTAs, bytes (the reservation per CTA included)."""
    shared_per_cta: int
    """The most shared memory one CTA may ask for besides the reserve, bytes (the opt-in maximum)."""
    reserved_shared_per_cta: int = 1024
    """Shared memory the CUDA runtime reserves per CTA (sm_80 and later)."""
    shared_unit: int = 128
    """Shared memory allocation granularity, bytes."""
    max_warps: int
    max_ctas: int


SM_LIMITS: dict[int, SmLimits] = {
    80: SmLimits(name="sm_80", shared_per_sm=164 * 1024, shared_per_cta=163 * 1024, max_warps=64, max_ctas=32),
    89: SmLimits(name="sm_89", shared_per_sm=100 * 1024, shared_per_cta=99 * 1024, max_warps=48, max_ctas=24),
    # H100: 228 KB of shared memory per SM, at most 227 KB per CTA; 64 warps (2048 threads), 32 CTAs.
    90: SmLimits(name="sm_90a", shared_per_sm=228 * 1024, shared_per_cta=227 * 1024, max_warps=64, max_ctas=32),
    100: SmLimits(name="sm_100a", shared_per_sm=228 * 1024, shared_per_cta=227 * 1024, max_warps=64, max_ctas=32),
}


@dataclass(frozen=True, kw_only=True)
class BinaryFacts:
    """Resources and instruction counts of one compiled kernel (zeros and ``error`` when it did not compile)."""

    compiled: bool
    error: str | None = None
    registers: int = 0
    """Registers per thread."""
    stack_frame: int = 0
    spill_stores: int = 0
    """Bytes of spill stores (ptxas -v)."""
    spill_loads: int = 0
    dynamic_shared: int = 0
    """Shared memory Triton asks for at launch, bytes (its pipeline buffers and layout conversions)."""
    static_shared: int = 0
    """Static shared memory in the cubin, bytes (the runtime's 1 KB reservation per CTA on sm_80+)."""
    kernel_counts: dict[str, int] | None = None
    """Static instruction counts over the whole kernel (HGMMA, HMMA, MUFU.<op>, LDGSTS, UTMALDG, ...)."""
    tile_counts: dict[str, int] | None = None
    """The same over the main loop's body (one tile per iteration); None when the kernel has no loop."""
    loops: int = 0
    """Outermost loops in the SASS (the attention has two: the cached keys, then the live keys)."""
    sass_instructions: int = 0
    compile_seconds: float = 0.0


@dataclass(frozen=True, kw_only=True)
class Occupancy:
    """Resident CTAs per SM and what bounds them."""

    ctas_per_sm: int
    limited_by: str
    """registers, shared memory, warps or CTA slots (the first of the tied limits)."""
    by_registers: int
    by_shared: int
    by_warps: int
    by_slots: int
    warps_per_sm: int
    arithmetic: str
    """The computation in words, for the report."""


_RES_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
# "/*b530*/   @!P3 HGMMA.64x64x16.F32.BF16 R88, R136, gdesc[UR24], RZ, !UPT ;"
_SASS_LINE = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(?:@!?U?P(?:T|\d+)\s+)?([A-Z][A-Z0-9_]*)((?:\.[\w]+)*)([^;]*);")
_COUNTED = ("HGMMA", "HMMA", "LDGSTS", "UTMALDG", "LDG", "STG", "LDL", "STL")
_MATMULS = ("HGMMA", "HMMA")


def _tool(name: str) -> str:
    from triton import knobs

    return getattr(knobs.nvidia, name).path


def check_toolchain(capability: int) -> None:
    """Raise ToolchainMissing unless Triton can compile for ``capability`` and cuobjdump can read the result."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        tools = {"ptxas": get_ptxas(capability).path, "cuobjdump": _tool("cuobjdump")}
    except Exception as err:  # an install without the NVIDIA backend fails in several ways
        raise ToolchainMissing(f"Triton's NVIDIA backend is not usable here: {err}") from None
    missing = [name for name, path in tools.items() if not path or not Path(path).is_file()]
    if missing:
        raise ToolchainMissing(f"Triton's wheel lacks {', '.join(missing)} (its TRITON_<TOOL>_PATH variables, "
                               "e.g. TRITON_CUOBJDUMP_PATH, can point at a CUDA toolkit's)")


def _run(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{Path(command[0]).name} failed ({done.returncode}): {done.stderr.strip()[:500]}")
    return done.stdout + done.stderr


def _ptxas_spills(ptx: str, capability: int, fp_fusion: bool, registers: int) -> tuple[int, int, int]:
    """(stack frame, spill stores, spill loads) from ``ptxas -v`` with the flags Triton's make_cubin uses."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as folder:
        src = Path(folder) / "kernel.ptx"
        src.write_text(ptx)
        fmad = [] if fp_fusion else ["--fmad=false"]
        log = _run([get_ptxas(capability).path, "-lineinfo", *fmad, "-v", "--regAllocOptLevel=2",
                    f"--gpu-name={sm_arch_from_capability(capability)}", str(src), "-o", str(src.with_suffix(".o"))])
    spills, used = _PTXAS_SPILLS.search(log), _PTXAS_REGISTERS.search(log)
    if spills is None or used is None:
        raise RuntimeError(f"ptxas -v printed no resource usage:\n{log[:500]}")
    if int(used.group(1)) != registers:  # the re-run must describe the cubin we read
        raise RuntimeError(f"ptxas -v re-run used {used.group(1)} registers, the cubin {registers}")
    return int(spills.group(1)), int(spills.group(2)), int(spills.group(3))


def sass_counts(sass: str) -> tuple[dict[str, int], dict[str, int] | None, int, int]:
    """(kernel counts, main-loop body counts or None, outermost loops, instructions) of ``cuobjdump -sass`` text."""
    instructions: list[tuple[int, str, str]] = []   # (address, counted name or "", branch target operand)
    for line in sass.splitlines():
        m = _SASS_LINE.match(line)
        if m is None:
            continue
        address, opcode, modifiers, operands = int(m.group(1), 16), m.group(2), m.group(3), m.group(4)
        if opcode == "MUFU":
            name = "MUFU." + modifiers.lstrip(".").split(".")[0]   # MUFU.EX2, MUFU.SIN, MUFU.RCP, ...
        else:
            name = opcode if opcode in _COUNTED else ""
        instructions.append((address, name, operands.strip() if opcode == "BRA" else ""))
    loops = []
    for address, _, target in instructions:
        if target.startswith("0x") and int(target, 16) < address:
            loops.append((int(target, 16), address))
    outermost = [(lo, hi) for lo, hi in loops if not any(a <= lo and hi <= b and (a, b) != (lo, hi) for a, b in loops)]
    outermost.sort()
    kernel = Counter(name for _, name, _ in instructions if name)

    def body(lo: int, hi: int) -> Counter:
        return Counter(name for address, name, _ in instructions if name and lo <= address <= hi)

    bodies = [body(lo, hi) for lo, hi in outermost]
    main = next((b for b in bodies if any(b[n] for n in _MATMULS)), bodies[0] if bodies else None)
    return dict(kernel), (dict(main) if main is not None else None), len(outermost), len(instructions)


def inspect_cubin(cubin: bytes, ptx: str, metadata, capability: int, *, compile_seconds: float = 0.0) -> BinaryFacts:
    """Facts of a Triton-compiled kernel: its cubin, its PTX and Triton's metadata (``shared``, fp fusion)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)
        usage = _RES_USAGE.search(_run([_tool("cuobjdump"), "-res-usage", str(path)]))
        sass = _run([_tool("cuobjdump"), "-sass", str(path)])
    if usage is None:
        raise RuntimeError("cuobjdump -res-usage printed no REG/STACK/SHARED line")
    registers, stack, static_shared, _ = (int(g) for g in usage.groups())
    stack_frame, stores, loads = (
        _ptxas_spills(ptx, capability, metadata.enable_fp_fusion, registers) if stack else (0, 0, 0))
    kernel, tile, loops, count = sass_counts(sass)
    return BinaryFacts(
        compiled=True, registers=registers, stack_frame=stack_frame, spill_stores=stores, spill_loads=loads,
        dynamic_shared=int(metadata.shared), static_shared=static_shared, kernel_counts=kernel,
        tile_counts=tile, loops=loops, sass_instructions=count, compile_seconds=compile_seconds,
    )


def _ctas(n: int) -> str:
    return f"{n} CTA" if n == 1 else f"{n} CTAs"


def occupancy(facts: BinaryFacts, threads: int, limits: SmLimits) -> Occupancy:
    """CTAs of ``threads`` threads resident on one SM, from registers, shared memory, warps and CTA slots."""
    warps = -(-threads // 32)
    per_warp = -(-max(facts.registers, 1) * 32 // limits.register_unit) * limits.register_unit
    per_subpartition = limits.registers // limits.subpartitions
    warps_by_registers = limits.subpartitions * (per_subpartition // per_warp)
    by_registers = warps_by_registers // warps
    static = max(facts.static_shared, limits.reserved_shared_per_cta)   # the cubin's static part holds the reserve
    cta_shared = -(-(facts.dynamic_shared + static) // limits.shared_unit) * limits.shared_unit
    # the per-CTA limit is what a kernel may ask for on top of the reserve (Triton checks its dynamic part)
    fits = facts.dynamic_shared + static - limits.reserved_shared_per_cta <= limits.shared_per_cta
    by_shared = limits.shared_per_sm // cta_shared if fits else 0
    by_warps = limits.max_warps // warps
    by_slots = limits.max_ctas
    bounds = {"registers": by_registers, "shared memory": by_shared, "warps": by_warps, "CTA slots": by_slots}
    ctas = min(bounds.values())
    limited_by = next(name for name, value in bounds.items() if value == ctas)
    shared = (f"floor({limits.shared_per_sm} / {cta_shared}) = {_ctas(by_shared)}" if fits
              else f"over the {limits.shared_per_cta} B one CTA may have: 0 CTAs")
    arithmetic = (
        f"registers: {facts.registers}/thread x 32 = {facts.registers * 32} -> {per_warp}/warp "
        f"({limits.register_unit}-register units), {limits.subpartitions} sub-partitions x floor({per_subpartition} / "
        f"{per_warp}) = {warps_by_registers} warps -> floor({warps_by_registers} / {warps}) = {_ctas(by_registers)} | "
        f"shared: {facts.dynamic_shared} dynamic + {static} static (the runtime's "
        f"{limits.reserved_shared_per_cta} B reserve) -> {cta_shared} B ({limits.shared_unit} B units), {shared} | "
        f"warps: floor({limits.max_warps} / {warps}) = {_ctas(by_warps)} | CTA slots: {by_slots} "
        f"=> {_ctas(ctas)}/SM = {ctas * warps} of {limits.max_warps} warps, bound by {limited_by}"
    )
    return Occupancy(ctas_per_sm=ctas, limited_by=limited_by, by_registers=by_registers, by_shared=by_shared,
                     by_warps=by_warps, by_slots=by_slots, warps_per_sm=ctas * warps, arithmetic=arithmetic)
