"""Parity with the original network: every golden file, through the plain engine and the CLI."""

from __future__ import annotations

import pytest

from lipforcing.cli import main
from lipforcing.engine.tools.golden import PASS_BOUND, check_golden, load_golden


def test_every_golden_file_matches(golden_files):
    for path in golden_files:
        report = check_golden(path, backend="reference")
        assert set(report.errors) == {"first_call_flow", "x0_step0", "x0_step0/worst_chunk", "x0", "x0/worst_chunk"}
        for name, err in report.errors.items():
            # a correct float32 engine lands near 1e-6; 1e-4 is the contract's bound
            assert err < 1e-5, f"{path.name}: {name} relative error {err:.2e}"
        assert report.ok


def test_golden_configs_are_read_from_the_file(golden_files):
    for path in golden_files:
        cfg, tensors = load_golden(path)
        assert tensors["inputs/noise"].shape[2] == cfg.num_latent_frames
        assert tensors["inputs/noise"].shape[-2:] == (cfg.stream.latent_h, cfg.stream.latent_w)
        assert cfg.model.audio_blocks == tuple(cfg.extra["audio_blocks"])


def test_check_reference_cli_passes(golden_files, capsys):
    assert main(["check-reference", *map(str, golden_files)]) == 0
    out = capsys.readouterr().out
    assert "pass" in out and all(p.name in out for p in golden_files)


def test_check_reference_fails_on_perturbed_weights(golden_files, tmp_path):
    """The check can fail: perturbing one weight tensor moves x0 past the bound."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    src = golden_files[0]
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(src))
    key = "weights/blocks.0.self_attn.q.weight"
    tensors[key] = tensors[key] + 0.01 * __import__("torch").randn_like(tensors[key])
    bad = tmp_path / "perturbed.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    report = check_golden(bad)
    assert not report.ok and report.errors["x0"] > PASS_BOUND
    assert main(["check-reference", str(bad)]) == 1


def test_check_reference_bad_file_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "junk.safetensors"
    bad.write_bytes(b"not a safetensors file")
    assert main(["check-reference", str(bad)]) == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_golden_on_cuda(golden_files):
    for path in golden_files:
        assert check_golden(path, device="cuda", backend="reference").ok


def _triton_or_skip() -> str:
    pytest.importorskip("triton")
    from lipforcing.kernels import triton_available

    ok, why = triton_available()
    if not ok:
        pytest.skip(why)
    return "cuda" if __import__("torch").cuda.is_available() else "cpu"


def test_check_reference_with_triton_kernels(golden_files, capsys):
    """The whole engine on the Triton backend (the CPU interpreter without CUDA) passes the golden check. In the
    interpreter the smallest file runs by default (every window shape; ~20 s), every file with ``-m slow``."""
    device = _triton_or_skip()
    files = golden_files if device == "cuda" else [min(golden_files, key=lambda p: p.stat().st_size)]
    assert main(["check-reference", *map(str, files), "--backend", "triton", "--device", device]) == 0
    assert "backend triton): pass" in capsys.readouterr().out


@pytest.mark.slow
def test_check_reference_with_triton_kernels_every_file(golden_files, capsys):
    device = _triton_or_skip()
    assert main(["check-reference", *map(str, golden_files), "--backend", "triton", "--device", device]) == 0
    assert "backend triton): pass" in capsys.readouterr().out
