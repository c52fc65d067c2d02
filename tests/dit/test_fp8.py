"""FP8 (e4m3) block weights and KV cache (``--dtype fp8``, engine/dit/fp8.py).

The bound. e4m3 keeps 3 mantissa bits: rounding to nearest moves a value by at most 2^-4 of itself, and by
2^-4 / sqrt(3) = 3.6% RMS (the error is uniform over the half-ulp, whose relative size is between 2^-5 and
2^-4 within a binade). A product of two quantised operands carries sqrt(2) x 3.6% = 5.1% RMS, and a sum of
products with independent errors carries at most that relative to the sum's RMS: so one fp8 GEMM is within
``GEMM_BOUND`` = 5.1% of the exact product. The student's x0 passes its blocks' outputs through gated
residuals into a float32 stream and mixes in the unquantised noisy latent, so its error cannot exceed one
GEMM's: ``GEMM_BOUND`` is the bound for x0 too. The lower bounds prove the quantisation actually ran.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from conftest import random_clip
from lipforcing.engine.dit.build import random_student
from lipforcing.engine.dit.cache import SinkWindowCache
from lipforcing.engine.dit.checkpoint import load_student
from lipforcing.engine.dit.config import ModelConfig, StreamConfig
from lipforcing.engine.dit.fp8 import BLOCK_LINEAR, E4M3, E4M3_MAX, Fp8Linear, quantize, to_fp8
from lipforcing.engine.errors import WeightsError
from lipforcing.engine.numerics import parse_precision, rel_error
from lipforcing.engine.runtime.sampler import StreamingSampler
from lipforcing.engine.runtime.static import StaticStudent

GEMM_BOUND = 2**0.5 * 2**-4 / 3**0.5  # 5.1%: see the module docstring
CFG = ModelConfig(dim=96, ffn_dim=64, num_heads=3, num_layers=2, text_len=5, audio_dim=8, audio_blocks=(1,))
STREAM = StreamConfig(latent_h=6, latent_w=10)


def _x0(model, stream, clip, backend="reference"):
    sampler = StreamingSampler(model, stream, backend=backend, seed=7)
    sampler.start_clip(clip["text"], clip["audio"], clip["ref"], clip["mask"])
    return torch.cat([c.x0 for c in sampler.run_clip(clip["masked"], clip["ref_seq"])], 2)


def test_quantize_maps_each_slices_absmax_onto_the_largest_e4m3_value():
    w = torch.randn(6, 40) * torch.logspace(-3, 2, 6)[:, None]
    w[2] = 0.0
    q, scale = quantize(w, dim=1)
    assert q.dtype == E4M3 and scale.shape == (6, 1)
    assert torch.equal(q.float().abs().amax(1)[[0, 1, 3, 4, 5]], torch.full((5,), E4M3_MAX))
    assert torch.equal(q[2].float(), torch.zeros(40))
    assert (q.float() * scale - w).abs().le(w.abs().amax(1, keepdim=True) * 2**-4 + 1e-12).all()


def test_fp8_linear_is_the_dequantised_product_within_the_gemm_bound():
    layer = torch.nn.Linear(256, 128).double()
    x = torch.randn(3, 64, 256, dtype=torch.float64)
    fp8 = Fp8Linear.from_linear(layer, torch.float32)
    got = fp8(x)
    assert got.dtype == torch.float32 and got.shape == (3, 64, 128)
    xq, xs = quantize(x.reshape(-1, 256), dim=-1)  # what _scaled_mm multiplies, written out
    by_hand = (xq.double() * xs) @ (fp8.weight.double() * fp8.weight_scale.double()[:, None]).T + layer.bias
    assert rel_error(got, by_hand.reshape(3, 64, 128)) < 1e-6
    exact = F.linear(x, layer.weight, layer.bias)
    assert 1e-3 < rel_error(got, exact) < GEMM_BOUND


@pytest.mark.parametrize("name", ["tiny", "1.3b"])
def test_fp8_student_x0_is_within_the_bound_of_the_unquantised_one(name):
    """The tiny model over every window shape (chunk 0, chunk 1, the steady state), and one 1.3B block (dim
    1536, 12 heads, FFN 8960) on a small latent over chunks 0 and 1."""
    cfg = ModelConfig.from_name(name)
    latents = 9
    if name != "tiny":
        cfg, latents = dataclasses.replace(cfg, num_layers=1, audio_blocks=(0,)), 6
    stream = StreamConfig(latent_h=8, latent_w=8)
    clip = random_clip(cfg, (8, 8), latents, seed=3)
    exact = _x0(random_student(cfg, seed=1), stream, clip)
    fp8 = random_student(cfg, seed=1, fp8=True)
    assert fp8.fp8 and isinstance(fp8.blocks[0].ffn[0], Fp8Linear)
    assert not isinstance(fp8.head.head, Fp8Linear) and fp8.patch_embedding.weight.dtype == torch.float32
    err = rel_error(_x0(fp8, stream, clip), exact)
    assert 1e-4 < err < GEMM_BOUND, err


def test_the_random_fp8_student_is_the_quantised_random_student():
    a = random_student(CFG, seed=3, fp8=True).state_dict()
    b = to_fp8(random_student(CFG, seed=3)).state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k].float(), b[k].float()) for k in a)


def test_the_e4m3_cache_stores_one_scale_per_frame_and_head():
    cfg = CFG
    cache = SinkWindowCache(cfg, STREAM, batch=2, dtype=torch.float32, kv_fp8=True)
    assert cache.k.dtype == E4M3 and cache.scales.shape == (2, cfg.num_layers, 2, cache.capacity, cfg.num_heads)
    plan = cache.begin_chunk(0)
    tokens = cache.tokens_per_frame
    k = torch.randn(2, 3 * tokens, cfg.num_heads, cfg.head_dim) * torch.tensor([0.1, 1.0, 30.0])[None, None, :, None]
    v = torch.randn_like(k)
    cache.write_layer(1, plan, k, v)
    cache.commit()
    plan = cache.begin_chunk(3)
    got_k, got_v = cache.cached(1, plan)
    n = plan.num_cached
    expected_k = torch.cat([k[:, f * tokens : (f + 1) * tokens] for f in plan.cached_frames], 1)
    expected_v = torch.cat([v[:, f * tokens : (f + 1) * tokens] for f in plan.cached_frames], 1)
    assert n == 3 and got_k.dtype == torch.float32
    assert 1e-3 < rel_error(got_k, expected_k) < GEMM_BOUND and 1e-3 < rel_error(got_v, expected_v) < GEMM_BOUND
    frame0 = k[:, :tokens].abs().amax(dim=(1, 3))  # [B, H]
    assert torch.allclose(cache.scales[0, 1, :, 0], frame0 / E4M3_MAX)
    raw = cache.raw(1, plan)
    assert len(raw) == 4 and raw[0].dtype == E4M3 and raw[2].shape == (2, n, cfg.num_heads)


def test_every_backend_reads_the_e4m3_cache_alike():
    """reference (dequantised copies), sdpa (dequantised into the window buffer) and triton (e4m3 read in the
    kernel, the Triton interpreter here) over every window shape."""
    pytest.importorskip("triton")
    cfg = ModelConfig(dim=64, ffn_dim=32, num_heads=2, num_layers=1, text_len=5, audio_dim=8, audio_blocks=(0,))
    stream = StreamConfig(latent_h=4, latent_w=6)  # the interpreter runs every program in Python: 6 tokens a frame
    model = random_student(cfg, seed=2, std=0.05, fp8=True)
    clip = random_clip(cfg, (4, 6), 6, seed=4)  # chunk 0 and chunk 1, which reads the e4m3 cache
    reference = _x0(model, stream, clip)
    assert rel_error(_x0(model, stream, clip, "sdpa"), reference) < 1e-5
    assert rel_error(_x0(model, stream, clip, "triton"), reference) < 1e-5


def test_the_static_scheduler_runs_fp8_as_the_reference_sampler():
    model = random_student(CFG, seed=2, std=0.05, fp8=True)
    clip = random_clip(CFG, (6, 10), 9, seed=5)
    student = StaticStudent(model, STREAM, backend="reference", seed=7, cuda_graphs=False)
    assert student.cache.fp8
    student.start_clip(clip["text"], clip["audio"], clip["ref"], clip["mask"])
    got = torch.cat([student.run_chunk(clip["masked"][:, :, 3 * b : 3 * b + 3],
                                       clip["ref_seq"][:, :, 3 * b : 3 * b + 3]).clone() for b in range(3)], 2)
    assert rel_error(got, _x0(model, STREAM, clip)) < 1e-6


def test_convert_writes_the_checkpoint_fp8_loads(tmp_path):
    from safetensors.torch import save_file

    from lipforcing.cli import main

    model = random_student(CFG, seed=6)
    src = tmp_path / "student.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(src))
    dst = tmp_path / "student-fp8.safetensors"
    assert main(["convert", str(src), str(dst), "--dtype", "fp8"]) == 0
    converted = load_student(dst, cfg=CFG, dtype=torch.bfloat16, fp8=True).state_dict()
    on_the_fly = load_student(src, cfg=CFG, dtype=torch.bfloat16, fp8=True).state_dict()
    assert converted["blocks.0.ffn.0.weight"].dtype == E4M3
    assert converted["blocks.0.ffn.0.weight_scale"].dtype == torch.float32
    assert converted.keys() == on_the_fly.keys()
    assert all(torch.equal(converted[k].view(torch.uint8), on_the_fly[k].view(torch.uint8)) for k in converted)
    with pytest.raises(WeightsError, match="--dtype fp8"):
        load_student(dst, cfg=CFG, dtype=torch.bfloat16)
    assert parse_precision("fp8") == (torch.bfloat16, True)


def test_14b_in_fp8_fits_a_24_gb_card_and_its_plan_is_the_meta_arithmetic():
    """The plan's total at 512x512 (``info --model 14b --dtype fp8 --memory``) and its two largest items
    recomputed from the shapes of the meta model: block linear weights 1 byte + a float32 scale per output
    channel, every other parameter bf16; the cache 1 byte per K / V value + a float32 per frame, head, layer."""
    from lipforcing.engine.dit.model import CausalWanStudent
    from lipforcing.engine.tools.memory import memory_plan

    cfg = ModelConfig.from_name("14b")
    stream = StreamConfig.for_resolution(512, 512)
    plan = memory_plan(cfg, stream, dtype=torch.bfloat16, fp8=True)
    assert plan["dtype"] == "fp8" and plan["total_bytes"] <= 24e9
    items = {i["name"]: i["bytes"] for i in plan["items"]}
    with torch.device("meta"):
        model = CausalWanStudent(cfg)
    text = {id(p) for m in model.text_modules() for p in m.parameters()}
    expected = 0
    for name, p in model.named_parameters():
        if id(p) in text:
            continue
        layer, _, leaf = name.rpartition(".")
        if leaf == "weight" and BLOCK_LINEAR.match(layer):
            expected += p.numel() + 4 * p.shape[0]  # e4m3 values + one float32 scale per output channel
        else:
            expected += 2 * p.numel()  # bf16
    assert items["student weights"] == expected
    tokens = (stream.latent_h // 2) * (stream.latent_w // 2)
    capacity = 4
    values = 2 * cfg.num_layers * capacity * tokens * cfg.num_heads * cfg.head_dim
    assert items["KV cache"] == values + 4 * 2 * cfg.num_layers * capacity * cfg.num_heads
    bf16_weights = 2 * sum(p.numel() for p in model.parameters() if id(p) not in text)
    assert bf16_weights > 24e9  # what fp8 makes fit: the bf16 weights alone would not


def test_swapping_two_sessions_rows_moves_their_e4m3_values_and_scales():
    """The static scheduler keeps steady sessions in the front rows by swapping rows: an e4m3 cache's scales
    must travel with its values."""
    student = StaticStudent(random_student(CFG, seed=2, fp8=True), STREAM, slots=2, backend="reference", seed=7,
                            cuda_graphs=False)
    cache = student.cache
    for row, value in ((0, 1.0), (1, 2.0)):
        cache.k[:, row] = torch.full_like(cache.k[:, row], value, dtype=torch.float32).to(E4M3)
        cache.scales[:, :, row] = value * 10
    student._swap(0, 1)
    assert torch.equal(cache.k[:, 0].float(), torch.full(cache.k[:, 0].shape, 2.0))
    assert (cache.scales[:, :, 0] == 20).all() and (cache.scales[:, :, 1] == 10).all()
