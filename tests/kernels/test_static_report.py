"""The kernels compiled for sm_90a on the CPU (``lipforcing kernels --static``): every config compiles, none
spills, shared memory fits a CTA, the attention's matmuls are wgmma.

One report over both models and all three dtypes is built once per session in a fresh TRITON_CACHE_DIR:
its 132 rows specialize into 30 distinct binaries, compiled by two worker processes (about 50 s on two
idle CPU cores; the attention's 17 configs are most of it). The SASS and occupancy helpers are also checked
on hand-written inputs, without compiling.
"""

import json
import sys

import pytest
import torch

pytest.importorskip("triton")

from lipforcing.bench.kernels_command import model_shapes  # noqa: E402
from lipforcing.engine.app.cli import main  # noqa: E402
from lipforcing.engine.dit.config import StreamConfig  # noqa: E402
from lipforcing.kernels import sink_window_attention  # noqa: E402
from lipforcing.kernels.sass_facts import SM_LIMITS, BinaryFacts, occupancy, sass_counts  # noqa: E402
from lipforcing.kernels.static_report import static_report  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
H100 = SM_LIMITS[90]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("triton_cache"))


@pytest.fixture(scope="module")
def rows(cache_dir):
    stream = StreamConfig.for_resolution(512, 512)
    models = [model_shapes("1.3b", stream), model_shapes("14b", stream)]
    return static_report(models, DTYPES, arch="sm_90a", workers=2, cache_dir=cache_dir)


def _attention(rows, dtype):
    return [r for r in rows if r.kernel == "sink_window_attention" and r.dtype == dtype]


def test_shapes_are_the_engines():
    s = model_shapes("14b", StreamConfig.for_resolution(512, 512))
    assert (s.dim, s.num_heads, s.head_dim, s.ffn_dim) == (5120, 40, 128, 13824)
    assert (s.grid_hw, s.query_tokens, s.cache_frames, s.tokens_per_frame) == ((32, 32), 3072, (0, 3, 4), 1024)


def test_every_config_compiles(rows):
    failed = [(r.kernel, r.config, r.dtype, r.facts.error) for r in rows if not r.facts.compiled]
    assert not failed, failed
    # every kernel, model and dtype is there, and the attention brings each config its prune keeps
    assert {r.kernel for r in rows} == {"sink_window_attention", "flow_update", "gated_residual",
                                        "modulated_layer_norm", "rms_norm"}
    assert {r.shape.split()[0] for r in rows} == {"1.3b", "14b"}
    for dtype, tiles in (("bf16", sink_window_attention._TILES), ("fp32", sink_window_attention._TILES_FP32)):
        configs = {r.config for r in _attention(rows, dtype)}
        assert len(configs) == len(tiles[128]), configs


def test_rows_differing_in_runtime_values_share_a_binary(rows):
    # 2 models x 3 cache lengths of one (config, dtype) are one binary: lengths and head counts are runtime
    per_binary = {}
    for r in _attention(rows, "bf16"):
        per_binary.setdefault(r.binary, set()).add(r.shape)
    assert all(len(shapes) == 6 for shapes in per_binary.values()), per_binary
    assert len({r.binary for r in rows}) < len(rows)


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_no_config_spills(rows, dtype):
    spilling = [(r.kernel, r.config, r.facts.spill_stores, r.facts.spill_loads, r.facts.stack_frame)
                for r in rows if r.dtype == dtype]
    spilling = [entry for entry in spilling if any(entry[2:])]
    assert not spilling, spilling


def test_shared_memory_fits_one_cta_and_every_kernel_is_resident(rows):
    for r in rows:
        # 227 KB: the most a CTA may ask for on H100 (Triton compares its dynamic shared memory with it at launch)
        assert r.facts.dynamic_shared <= 227 * 1024, (r.kernel, r.config, r.dtype)
        assert r.occupancy.ctas_per_sm >= 1, (r.kernel, r.config, r.dtype, r.occupancy.arithmetic)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_attention_matmuls_are_wgmma_at_head_dim_128(rows, dtype):
    for r in _attention(rows, dtype):
        assert "D=128" in r.shape
        tile = r.facts.tile_counts
        assert tile is not None and tile.get("HGMMA", 0) > 0 and tile.get("HMMA", 0) == 0, (r.config, tile)
        # the rotation of the key tile reads cos / sin from the RoPE table: no transcendental in the key loop, whose
        # MUFU pipe serves the softmax (one EX2 per score this thread holds, and the row rescale)
        keys = int(r.config.split("BLOCK_N=")[1].split()[0])
        rows = int(r.config.split("BLOCK_M=")[1].split()[0])
        threads = int(r.config.split("warps=")[1].split()[0]) * 32
        assert not {"MUFU.COS", "MUFU.SIN"} & set(tile), (r.config, tile)
        assert tile["MUFU.EX2"] >= keys * rows // threads, (r.config, tile)


def test_sass_counts_the_loop_body_as_one_tile():
    sass = "\n".join([
        "        /*0000*/                   LDG.E R2, desc[UR4][R2.64] ;",
        "        /*0010*/                   MUFU.EX2 R3, R3 ;",
        "        /*0020*/                   HGMMA.64x64x16.F32.BF16 R88, R136, gdesc[UR24], RZ, !UPT ;",
        "        /*0030*/              @!P0 LDGSTS.E.BYPASS.128 [R155], desc[UR24][R2.64], !P6 ;",
        "        /*0040*/                   MUFU.SIN R4, R4 ;",
        "        /*0050*/              @!P3 BRA 0x20 ;",
        "        /*0060*/                   MUFU.RCP R5, R5 ;",
        "        /*0070*/                   EXIT ;",
        "        /*0080*/                   BRA 0x80;",
    ])
    kernel, tile, loops, instructions = sass_counts(sass)
    assert kernel == {"LDG": 1, "MUFU.EX2": 1, "HGMMA": 1, "LDGSTS": 1, "MUFU.SIN": 1, "MUFU.RCP": 1}
    assert tile == {"HGMMA": 1, "LDGSTS": 1, "MUFU.SIN": 1} and loops == 1 and instructions == 9


def test_occupancy_arithmetic_on_hopper():
    # 252 registers round to 256: 8192 per warp, 2 warps per sub-partition, 8 per SM: one 8-warp CTA
    big = occupancy(BinaryFacts(compiled=True, registers=252, dynamic_shared=82176, static_shared=1024), 256, H100)
    assert (big.ctas_per_sm, big.limited_by, big.by_shared, big.warps_per_sm) == (1, "registers", 2, 8)
    # 128 registers: 4 x floor(16384 / 4096) = 16 warps = two 8-warp CTAs; 120 KB of shared memory allows one
    smem = occupancy(BinaryFacts(compiled=True, registers=128, dynamic_shared=120 * 1024), 256, H100)
    assert (smem.ctas_per_sm, smem.limited_by, smem.by_registers) == (1, "shared memory", 2)
    # 32 registers and 4 warps: 16 CTAs by warps (64 / 4), 16 by registers
    small = occupancy(BinaryFacts(compiled=True, registers=32), 128, H100)
    assert (small.ctas_per_sm, small.by_warps, small.by_registers) == (16, 16, 16)
    # 227 KB asked for + the 1 KB reserve fill the 228 KB of one SM exactly; 1 KB more cannot launch
    edge = occupancy(BinaryFacts(compiled=True, registers=32, dynamic_shared=227 * 1024, static_shared=1024), 128, H100)
    assert (edge.ctas_per_sm, edge.limited_by) == (1, "shared memory")
    too_big = occupancy(BinaryFacts(compiled=True, registers=32, dynamic_shared=228 * 1024), 128, H100)
    assert too_big.ctas_per_sm == 0 and too_big.limited_by == "shared memory"


def test_command_prints_json_from_the_warm_cache(rows, cache_dir, monkeypatch, capsys):
    monkeypatch.setenv("TRITON_CACHE_DIR", cache_dir)   # the workers inherit it: the binary is already there
    assert main(["kernels", "--static", "--model", "1.3b", "--dtypes", "bf16", "--kernels", "rms_norm", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["arch"] == "sm_90a" and report["binaries"] == 1 and len(report["rows"]) == 1
    row = report["rows"][0]
    assert row["facts"]["compiled"] and row["occupancy"]["ctas_per_sm"] >= 1
    assert row["binary"] in {r.binary for r in rows}


@pytest.mark.parametrize("argv, message", [
    (["kernels"], "one of --static"),
    (["kernels", "--static", "--arch", "sm_75"], "sm_75"),
    (["kernels", "--static", "--kernels", "softmax"], "softmax"),
    (["kernels", "--static", "--dtypes", "fp8"], "fp8"),
])
def test_command_user_errors(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_command_without_triton_says_so(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "triton", None)   # import triton raises ImportError
    assert main(["kernels", "--static", "--kernels", "rms_norm", "--model", "1.3b"]) == 2
    assert "error: lipforcing kernels --static needs Triton" in capsys.readouterr().err
