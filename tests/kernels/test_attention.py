"""Sink + window attention with fused dynamic RoPE: Triton kernel vs the PyTorch reference.

Without CUDA the kernel runs in the Triton interpreter (TRITON_INTERPRET=1 is set before the kernels are
imported), with small shapes in fp32 and fp16 (the interpreter's bf16 dot is not exact). The GPU tests (skipped
without CUDA) run bf16 at the real shapes and bound the kernel's error against an fp64 reference by twice
the error of a same-precision PyTorch path (bf16 RoPE + SDPA).
"""

import math
import os

import pytest
import torch

# Without a GPU the kernels run in the Triton interpreter; the switch must precede the kernels' import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from conftest import OPCHECKS, TOLERANCE  # noqa: E402
from lipforcing.engine.numerics import rel_error  # noqa: E402
from lipforcing.kernels import ops  # noqa: E402
from lipforcing.kernels.rope import apply_rope, rope_angles  # noqa: E402
from lipforcing.kernels.sink_window_attention import (  # noqa: E402
    sink_window_attention,
    sink_window_attention_ref,
)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)

PAIRS = {64: (12, 10, 10), 128: (22, 21, 21)}
# (cache frame positions, query frame positions) of the three windows of SPEC §5 with 3-frame chunks.
WINDOWS = {
    "chunk0_3frames": ([], [0, 1, 2]),
    "chunk1_6frames": ([0, 1, 2], [3, 4, 5]),
    "steady_7frames": ([0, 1, 2, 3], [4, 5, 6]),
}


def make_inputs(batch, heads, head_dim, grid_hw, cache_pos, q_pos, dtype, device=DEVICE):
    rows, cols = grid_hw
    tokens = rows * cols
    lq, lc = len(q_pos) * tokens, len(cache_pos) * tokens

    def rand(length):
        return torch.randn(batch, length, heads, head_dim, device=device).to(dtype)

    return dict(
        q=rand(lq), k_live=rand(lq), v_live=rand(lq), k_cache=rand(lc), v_cache=rand(lc),
        q_frame_pos=torch.tensor(q_pos, dtype=torch.int32, device=device),
        cache_frame_pos=torch.tensor(cache_pos, dtype=torch.int32, device=device),
        grid_hw=grid_hw, pairs_thw=PAIRS[head_dim],
    )


@pytest.mark.parametrize("window", list(WINDOWS))
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference_on_the_three_windows(window, head_dim, dtype):
    cache_pos, q_pos = WINDOWS[window]
    inputs = make_inputs(1, 2, head_dim, (3, 5), cache_pos, q_pos, dtype)
    out = sink_window_attention(**inputs)
    ref = sink_window_attention_ref(**inputs)
    assert out.shape == inputs["q"].shape and out.dtype == dtype
    assert rel_error(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("grid_hw", [(1, 7), (5, 3), (4, 4)])
def test_odd_grids_batch_and_custom_scale_theta(grid_hw):
    inputs = make_inputs(2, 3, 64, grid_hw, [0, 1, 2, 3], [4, 5, 6], torch.float32)
    out = sink_window_attention(**inputs, theta=500.0, scale=0.3)
    ref = sink_window_attention_ref(**inputs, theta=500.0, scale=0.3)
    assert rel_error(out, ref) < TOLERANCE[torch.float32]


def test_rope_is_applied_per_axis():
    # The same keys at other temporal positions must change the output; otherwise RoPE was skipped.
    inputs = make_inputs(1, 2, 64, (3, 5), [0, 1, 2], [3, 4, 5], torch.float32)
    moved = dict(inputs, cache_frame_pos=torch.tensor([0, 2, 4], dtype=torch.int32, device=DEVICE))
    out, out_moved = sink_window_attention(**inputs), sink_window_attention(**moved)
    assert rel_error(out_moved, sink_window_attention_ref(**moved)) < TOLERANCE[torch.float32]
    assert rel_error(out, out_moved) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_strided_cache_and_fused_qkv_views(dtype):
    batch, heads, head_dim, grid_hw = 2, 2, 128, (3, 5)
    tokens = grid_hw[0] * grid_hw[1]
    # A preallocated cache [B, 7 frames + slack, H + 1, D] read in place: offset, frame and head slices.
    k_buf = torch.randn(batch, 8 * tokens, heads + 1, head_dim, device=DEVICE).to(dtype)
    v_buf = torch.randn(batch, 8 * tokens, heads + 1, head_dim, device=DEVICE).to(dtype)
    k_cache = k_buf[:, tokens : 5 * tokens, 1:]
    v_cache = v_buf[:, 2 * tokens : 6 * tokens, :heads]
    qkv = torch.randn(batch, 3 * tokens, 3, heads, head_dim, device=DEVICE).to(dtype)   # fused projection
    q, k_live, v_live = qkv.unbind(2)
    assert not k_cache.is_contiguous() and not q.is_contiguous()
    inputs = dict(
        q=q, k_live=k_live, v_live=v_live, k_cache=k_cache, v_cache=v_cache,
        q_frame_pos=torch.tensor([4, 5, 6], dtype=torch.int32, device=DEVICE),
        cache_frame_pos=torch.tensor([0, 1, 2, 3], dtype=torch.int64, device=DEVICE),
        grid_hw=grid_hw, pairs_thw=PAIRS[head_dim],
    )
    out = sink_window_attention(**inputs)
    ref = sink_window_attention_ref(**inputs)
    assert rel_error(out, ref) < TOLERANCE[dtype]


def test_writes_every_element_of_a_poisoned_out_buffer():
    inputs = make_inputs(1, 2, 64, (3, 5), [0, 1, 2, 3], [4, 5, 6], torch.float32)
    out = torch.full_like(inputs["q"], float("nan"))
    result = sink_window_attention(**inputs, out=out)
    assert result.data_ptr() == out.data_ptr()
    assert torch.isfinite(out).all()
    assert rel_error(out, sink_window_attention_ref(**inputs)) < TOLERANCE[torch.float32]


def test_reference_agrees_with_float64_rope_then_sdpa():
    inputs = make_inputs(1, 2, 64, (3, 5), [0, 1, 2], [3, 4, 5], torch.float64, device="cpu")
    rows, cols = inputs["grid_hw"]
    key_pos = torch.cat([inputs["cache_frame_pos"], inputs["q_frame_pos"]])
    q = apply_rope(inputs["q"], rope_angles(inputs["q_frame_pos"], rows, cols, PAIRS[64]))
    k = apply_rope(torch.cat([inputs["k_cache"], inputs["k_live"]], 1), rope_angles(key_pos, rows, cols, PAIRS[64]))
    v = torch.cat([inputs["v_cache"], inputs["v_live"]], 1)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    ref = sink_window_attention_ref(**inputs, compute_dtype=torch.float64)
    assert rel_error(ref, sdpa.transpose(1, 2)) < TOLERANCE[torch.float64]


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(pairs_thw=(20, 21, 21)), "pairs_thw"),
        (dict(grid_hw=(5, 3)), "frames of 5x3 tokens"),
        (dict(q_frame_pos=torch.tensor([4, 5], dtype=torch.int32)), "q_frame_pos"),
        (dict(cache_frame_pos=torch.tensor([0.0, 1.0, 2.0, 3.0])), "cache_frame_pos"),
    ],
)
def test_rejects_inconsistent_inputs(change, message):
    inputs = make_inputs(1, 2, 128, (3, 4), [0, 1, 2, 3], [4, 5, 6], torch.float32)
    inputs.update({k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in change.items()})
    with pytest.raises((ValueError, TypeError), match=message):
        sink_window_attention(**inputs)


def test_custom_op_matches_launcher_and_fake_shapes():
    inputs = make_inputs(1, 2, 64, (3, 5), [0, 1, 2], [3, 4, 5], torch.float16)
    out = ops.attention(**inputs)
    assert torch.equal(out, sink_window_attention(**inputs))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        fake_out = ops.attention(**fake)
    assert fake_out.shape == out.shape and fake_out.dtype == out.dtype and fake_out.stride() == out.stride()


def test_custom_op_passes_opcheck():
    inputs = make_inputs(1, 1, 64, (2, 3), [0], [1, 2], torch.float32)
    args = (
        inputs["q"], inputs["k_live"], inputs["v_live"], inputs["k_cache"], inputs["v_cache"],
        inputs["q_frame_pos"], inputs["cache_frame_pos"], 2, 3, *PAIRS[64], 10000.0, 0.125,
    )
    results = torch.library.opcheck(torch.ops.lipforcing.sink_window_attention.default, args)
    assert results == dict.fromkeys(OPCHECKS, "SUCCESS")  # (it raises on a failed check) every check ran


# --- GPU: bf16 at the real shapes ----------------------------------------------------------------------

gpu = pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs CUDA (and TRITON_INTERPRET unset)")


def float64_reference(inputs, head_chunk=4):
    """fp64 attention of the same inputs, a few heads at a time to bound memory."""
    rows, cols = inputs["grid_hw"]
    pairs = inputs["pairs_thw"]
    key_pos = torch.cat([inputs["cache_frame_pos"], inputs["q_frame_pos"]])
    q = apply_rope(inputs["q"].double(), rope_angles(inputs["q_frame_pos"], rows, cols, pairs))
    k = torch.cat([inputs["k_cache"], inputs["k_live"]], 1).double()
    k = apply_rope(k, rope_angles(key_pos, rows, cols, pairs))
    v = torch.cat([inputs["v_cache"], inputs["v_live"]], 1).double()
    scale = 1.0 / math.sqrt(q.shape[-1])
    outs = []
    for h in range(0, q.shape[2], head_chunk):
        hs = slice(h, h + head_chunk)
        scores = torch.einsum("bqhd,bkhd->bhqk", q[:, :, hs], k[:, :, hs]) * scale
        outs.append(torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v[:, :, hs]))
    return torch.cat(outs, 2)


def bf16_rope_sdpa(inputs):
    """The same-precision PyTorch path: RoPE rounded to bf16, then SDPA in bf16."""
    rows, cols = inputs["grid_hw"]
    pairs = inputs["pairs_thw"]
    key_pos = torch.cat([inputs["cache_frame_pos"], inputs["q_frame_pos"]])
    q = apply_rope(inputs["q"], rope_angles(inputs["q_frame_pos"], rows, cols, pairs))
    k = apply_rope(torch.cat([inputs["k_cache"], inputs["k_live"]], 1), rope_angles(key_pos, rows, cols, pairs))
    v = torch.cat([inputs["v_cache"], inputs["v_live"]], 1)
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("heads", [12, 40])
@pytest.mark.parametrize("window", list(WINDOWS))
def test_gpu_bf16_real_shapes_within_twice_sdpa_error(heads, window):
    cache_pos, q_pos = WINDOWS[window]   # Lk = 3072, 6144, 7168 at 32x32 tokens per frame
    inputs = make_inputs(1, heads, 128, (32, 32), cache_pos, q_pos, torch.bfloat16, device="cuda")
    out = sink_window_attention(**inputs)
    exact = float64_reference(inputs)
    baseline_err = rel_error(bf16_rope_sdpa(inputs), exact)
    kernel_err = rel_error(out, exact)
    assert kernel_err <= 2 * baseline_err, (kernel_err, baseline_err)
    assert kernel_err < TOLERANCE[torch.bfloat16]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_matches_reference(dtype, head_dim):
    inputs = make_inputs(2, 3, head_dim, (12, 20), [0, 1, 2, 3], [4, 5, 6], dtype, device="cuda")
    out = sink_window_attention(**inputs)
    assert rel_error(out, sink_window_attention_ref(**inputs)) < TOLERANCE[dtype]


@gpu
@pytest.mark.gpu
def test_gpu_custom_op_compiles_fullgraph():
    inputs = make_inputs(1, 12, 128, (16, 16), [0, 1, 2, 3], [4, 5, 6], torch.bfloat16, device="cuda")

    @torch.compile(fullgraph=True)
    def attend(q, k_live, v_live, k_cache, v_cache, q_frame_pos, cache_frame_pos):
        return ops.attention(q, k_live, v_live, k_cache, v_cache, q_frame_pos, cache_frame_pos, (16, 16), PAIRS[128])

    tensors = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    assert torch.equal(attend(**tensors), sink_window_attention(**inputs))
