"""Flow update, modulated LayerNorm, gated residual and RMSNorm: Triton kernels vs PyTorch references.

Without CUDA the kernels run in the Triton interpreter (TRITON_INTERPRET=1 is set before the kernels are
imported); the GPU tests (skipped without CUDA) run bf16 at the real 14B widths.
"""

import os

import pytest
import torch

# Without a GPU the kernels run in the Triton interpreter; the switch must precede the kernels' import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from conftest import OPCHECKS, TOLERANCE  # noqa: E402
from lipforcing.engine.numerics import rel_error  # noqa: E402
from lipforcing.kernels import ops, triton_available  # noqa: E402
from lipforcing.kernels.flow_update import flow_update, flow_update_ref  # noqa: E402
from lipforcing.kernels.gated_residual import gated_residual, gated_residual_ref  # noqa: E402
from lipforcing.kernels.norm_modulation import modulated_layer_norm, modulated_layer_norm_ref  # noqa: E402
from lipforcing.kernels.rms_norm import rms_norm, rms_norm_ref  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)
DTYPES = [torch.float32, torch.float16]


def randn(*shape, dtype=torch.float32, device=DEVICE, mean=0.0, std=1.0):
    return (torch.randn(*shape, device=device) * std + mean).to(dtype)


# --- flow update ---------------------------------------------------------------------------------------


def flow_inputs(batch, channels, frames, grid_hw, patch_hw, dtype):
    rows, cols = grid_hw
    ph, pw = patch_hw
    v_tok = randn(batch, frames * rows * cols, ph * pw * channels, dtype=dtype)
    x_t = randn(batch, channels, frames, rows * ph, cols * pw, dtype=dtype)
    eps = randn(batch, channels, frames, rows * ph, cols * pw, dtype=dtype)
    return v_tok, x_t, eps


@pytest.mark.parametrize("dtype", DTYPES)
def test_flow_x0_matches_reference(dtype):
    v_tok, x_t, _ = flow_inputs(2, 16, 3, (3, 5), (2, 2), dtype)
    x0 = flow_update(v_tok, x_t, 0.999)
    assert x0.shape == x_t.shape and x0.dtype == dtype and x0.is_contiguous()
    assert rel_error(x0, flow_update_ref(v_tok, x_t, 0.999)) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("times_as_tensors", [False, True])
def test_flow_x0_and_renoise_match_reference(dtype, times_as_tensors):
    v_tok, x_t, eps = flow_inputs(1, 16, 3, (5, 3), (2, 2), dtype)
    t, t_next = 0.999, 0.769
    if times_as_tensors:
        t, t_next = torch.tensor(t, device=DEVICE), torch.tensor([t_next], device=DEVICE)
    x0, x_next = flow_update(v_tok, x_t, t, t_next, eps)
    ref_x0, ref_next = flow_update_ref(v_tok, x_t, t, t_next, eps)
    assert rel_error(x0, ref_x0) < TOLERANCE[dtype]
    assert rel_error(x_next, ref_next) < TOLERANCE[dtype]


def test_flow_update_follows_the_spec_layout():
    # out[c, f, 2r + a, 2q + b] = token(f, r, q)[(2a + b) * C + c], checked element by element.
    v_tok, x_t, _ = flow_inputs(1, 4, 2, (3, 5), (2, 2), torch.float32)
    x0 = flow_update(v_tok, x_t, 1.0)
    v = x_t - x0
    for c, f, y, x in [(0, 0, 0, 0), (3, 1, 5, 9), (2, 0, 3, 4), (1, 1, 4, 1)]:
        r, a, q, b = y // 2, y % 2, x // 2, x % 2
        expected = v_tok[0, (f * 3 + r) * 5 + q, (2 * a + b) * 4 + c]
        assert torch.allclose(v[0, c, f, y, x], expected, atol=1e-6)


def test_flow_update_on_strided_latents_and_other_patch_sizes():
    base = randn(2, 16, 7, 6, 10)
    x_t = base[:, :, 2:5]                            # a frame slice of a longer latent
    v_tok = randn(2, 3 * 3 * 5, 64)
    assert rel_error(flow_update(v_tok, x_t, 0.5), flow_update_ref(v_tok, x_t, 0.5)) < TOLERANCE[torch.float32]
    v_wide, x_wide, eps = flow_inputs(1, 8, 2, (6, 5), (1, 2), torch.float32)   # patch (1, 1, 2), C = 8
    got = flow_update(v_wide, x_wide, 0.3, 0.2, eps, patch_hw=(1, 2))
    want = flow_update_ref(v_wide, x_wide, 0.3, 0.2, eps, patch_hw=(1, 2))
    assert all(rel_error(g, w) < TOLERANCE[torch.float32] for g, w in zip(got, want))


def test_flow_update_rejects_mismatched_shapes():
    v_tok, x_t, eps = flow_inputs(1, 16, 3, (3, 5), (2, 2), torch.float32)
    with pytest.raises(ValueError, match="cannot be unpatchified"):
        flow_update(v_tok[:, :-1], x_t, 0.5)
    with pytest.raises(ValueError, match="together"):
        flow_update(v_tok, x_t, 0.5, eps=eps)


# --- modulated LayerNorm -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("frames_in_table", [3, 1])
def test_modulated_layer_norm_matches_reference(dtype, frames_in_table):
    batch, frames, tokens, dim = 2, 3, 15, 200
    x = randn(batch, frames * tokens, dim, dtype=dtype, mean=0.7, std=3.0)
    modulation = randn(batch, frames_in_table, 6, dim, std=0.5)      # fp32 like the released e
    shift, scale = modulation[:, :, 0], modulation[:, :, 1]          # strided views of one table
    y = modulated_layer_norm(x, scale, shift, eps=1e-6)
    assert y.shape == x.shape and y.dtype == dtype
    assert rel_error(y, modulated_layer_norm_ref(x, scale, shift, eps=1e-6)) < TOLERANCE[dtype]


def test_modulated_layer_norm_broadcasts_batch_and_reads_strided_rows():
    x_wide = randn(2, 45, 300)
    x = x_wide[:, :, 50:250]                                         # row stride 300, dim 200
    scale, shift = randn(1, 3, 200), randn(1, 3, 200)
    y = modulated_layer_norm(x, scale, shift, eps=1e-5)
    assert rel_error(y, modulated_layer_norm_ref(x, scale, shift, eps=1e-5)) < TOLERANCE[torch.float32]
    with pytest.raises(ValueError, match="frame rows"):
        modulated_layer_norm(x, randn(2, 4, 200), randn(2, 4, 200))


# --- gated residual ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("frames_in_table", [3, 1])
def test_gated_residual_matches_reference(dtype, frames_in_table):
    x = randn(2, 3 * 15, 1300, dtype=dtype)                          # two dim blocks, the last partial
    y = randn(2, 3 * 15, 1300, dtype=dtype)
    gate = randn(2, frames_in_table, 6, 1300)[:, :, 2]
    out = gated_residual(x, y, gate)
    assert out.dtype == dtype and rel_error(out, gated_residual_ref(x, y, gate)) < TOLERANCE[dtype]


def test_gated_residual_in_place_and_poisoned_out():
    x, y, gate = randn(1, 30, 96), randn(1, 30, 96), randn(1, 2, 96)
    want = gated_residual_ref(x, y, gate)
    poisoned = torch.full_like(x, float("nan"))
    assert gated_residual(x, y, gate, out=poisoned) is poisoned
    assert torch.isfinite(poisoned).all() and rel_error(poisoned, want) < TOLERANCE[torch.float32]
    gated_residual(x, y, gate, out=x)
    assert rel_error(x, want) < TOLERANCE[torch.float32]


# --- RMSNorm -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_reference(dtype):
    x = randn(2, 45, 200, dtype=dtype, std=4.0)
    w = randn(200, dtype=dtype, mean=1.0, std=0.2)
    y = rms_norm(x, w, eps=1e-6)
    assert y.shape == x.shape and y.dtype == dtype
    assert rel_error(y, rms_norm_ref(x, w, eps=1e-6)) < TOLERANCE[dtype]


def test_rms_norm_reads_a_row_slice_and_rejects_unviewable_input():
    x = randn(60, 320)[:, :256]                                      # rows of stride 320
    w = randn(256)
    assert rel_error(rms_norm(x, w), rms_norm_ref(x, w)) < TOLERANCE[torch.float32]
    with pytest.raises(ValueError, match="contiguous"):
        rms_norm(randn(4, 6, 32).transpose(0, 1), w[:32])


# --- custom ops ----------------------------------------------------------------------------------------


def op_cases():
    v_tok, x_t, eps = flow_inputs(1, 4, 2, (3, 5), (2, 2), torch.float32)
    x, y = randn(2, 6, 40), randn(2, 6, 40)
    table = randn(2, 3, 40)
    return {
        "flow_x0": (torch.ops.lipforcing.flow_x0.default, (v_tok, x_t, 0.9, 2, 2)),
        "flow_x0_renoise": (torch.ops.lipforcing.flow_x0_renoise.default, (v_tok, x_t, eps, 0.9, 0.7, 2, 2)),
        "modulated_layer_norm": (torch.ops.lipforcing.modulated_layer_norm.default, (x, table, table * 0.5, 1e-6)),
        "gated_residual": (torch.ops.lipforcing.gated_residual.default, (x, y, table)),
        "rms_norm": (torch.ops.lipforcing.rms_norm.default, (x, randn(40), 1e-6)),
    }


@pytest.mark.parametrize("name", list(op_cases()))
def test_custom_ops_pass_opcheck(name):
    op, args = op_cases()[name]
    results = torch.library.opcheck(op, args)  # raises on a failed check; every check ran
    assert results == dict.fromkeys(OPCHECKS, "SUCCESS")


def test_python_api_matches_launchers_and_fake_shapes():
    v_tok, x_t, eps = flow_inputs(1, 16, 3, (3, 5), (2, 2), torch.float16)
    x, y, table, w = randn(2, 45, 72), randn(2, 45, 72), randn(2, 3, 72), randn(72)
    pairs = [
        (ops.flow_update(v_tok, x_t, 0.9), flow_update(v_tok, x_t, 0.9)),
        (ops.flow_update(v_tok, x_t, 0.9, 0.7, eps)[1], flow_update(v_tok, x_t, 0.9, 0.7, eps)[1]),
        (ops.modulated_layer_norm(x, table, table, 1e-6), modulated_layer_norm(x, table, table, 1e-6)),
        (ops.gated_residual(x, y, table), gated_residual(x, y, table)),
        (ops.rms_norm(x, w, 1e-6), rms_norm(x, w, 1e-6)),
    ]
    for got, want in pairs:
        assert torch.equal(got, want)

    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fv, fx, fe = (mode.from_tensor(t) for t in (v_tok, x_t, eps))
        x0, x_next = ops.flow_update(fv, fx, 0.9, 0.7, fe)
        h = ops.modulated_layer_norm(mode.from_tensor(x), mode.from_tensor(table), mode.from_tensor(table))
    assert x0.shape == x_next.shape == x_t.shape and x0.dtype == torch.float16
    assert h.shape == x.shape


def test_ops_refuse_cpu_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        ops.rms_norm(torch.randn(3, 8), torch.randn(8))
    assert triton_available(torch.device("cpu"))[0] is False  # with or without a GPU on the host


def test_triton_available_where_these_tests_run():
    usable, reason = triton_available(DEVICE)
    assert usable and reason


# --- GPU: bf16 at the 14B widths -----------------------------------------------------------------------

gpu = pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs CUDA (and TRITON_INTERPRET unset)")


@gpu
@pytest.mark.gpu
def test_gpu_bf16_real_shapes():
    dtype, dim, frames, tokens = torch.bfloat16, 5120, 3, 1024
    x = randn(1, frames * tokens, dim, dtype=dtype, device="cuda")
    y = randn(1, frames * tokens, dim, dtype=dtype, device="cuda")
    table = randn(1, frames, 6, dim, device="cuda") * 0.3
    assert rel_error(modulated_layer_norm(x, table[:, :, 1], table[:, :, 0]),
                   modulated_layer_norm_ref(x, table[:, :, 1], table[:, :, 0])) < TOLERANCE[dtype]
    assert rel_error(gated_residual(x, y, table[:, :, 2]), gated_residual_ref(x, y, table[:, :, 2])) < TOLERANCE[dtype]
    w = randn(dim, dtype=dtype, device="cuda", mean=1.0, std=0.1)
    assert rel_error(rms_norm(x, w), rms_norm_ref(x, w)) < TOLERANCE[dtype]
    v_tok = randn(1, frames * tokens, 64, dtype=dtype, device="cuda")
    x_t, eps = randn(1, 16, frames, 64, 64, device="cuda"), randn(1, 16, frames, 64, 64, device="cuda")
    got = flow_update(v_tok, x_t, 0.999, 0.769, eps)
    want = flow_update_ref(v_tok, x_t, 0.999, 0.769, eps)
    assert all(rel_error(g, w) < TOLERANCE[torch.float32] for g, w in zip(got, want))
