"""Parity with the original network: every golden file, through the plain engine and the CLI."""

from __future__ import annotations

import pytest

from lipforcing.cli import main
from lipforcing.engine.tools.golden import PASS_BOUND, check_golden, load_golden


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_every_golden_file_matches(golden_files, backend):
    for path in golden_files:
        report = check_golden(path, backend=backend)
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


def test_every_training_golden_file_matches(train_golden_files):
    """The full-sequence forwards training uses: bidirectional (conditional, unconditional, guided) and
    block-causal with per-frame timesteps, absolute RoPE and the file's (window, sink)."""
    for path in train_golden_files:
        report = check_golden(path)
        kind = report.config.extra["attention"]
        expected = ({"flow", "x0"} if kind == "block_causal"
                    else {"flow_cond", "flow_uncond", "x0_cond", "x0_uncond", "x0_guided"})
        assert set(report.errors) == expected, report.errors
        for name, err in report.errors.items():
            assert err < 1e-5, f"{path.name}: {name} relative error {err:.2e}"


def test_check_reference_takes_streaming_and_training_files_together(golden_files, train_golden_files, capsys):
    assert main(["check-reference", *map(str, golden_files + train_golden_files)]) == 0
    out = capsys.readouterr().out
    assert "pass" in out and all(p.name in out for p in golden_files + train_golden_files)


def test_a_training_file_with_one_timestep_for_every_frame_fails(train_golden_files, tmp_path):
    """The check can fail on a training file: one t for all frames (a semantic the files pin down) moves the
    flow far past the bound."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    src = next((p for p in train_golden_files if "bcausal" in p.name), None)
    if src is None:
        pytest.skip("no block-causal training file")
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
    cfg = json.loads(meta["config"])
    cfg["t_frames"] = [max(cfg["t_frames"])] * len(cfg["t_frames"])
    meta["config"] = json.dumps(cfg)
    bad = tmp_path / "one_t.safetensors"
    save_file(load_file(str(src)), str(bad), metadata=meta)
    assert not check_golden(bad).ok
    assert main(["check-reference", str(bad)]) == 1


@pytest.mark.parametrize("window, sink", [(7, 1), (10, 1), (13, 1), (9, 3), (12, 3)])
def test_the_block_causal_mask_is_the_specs(window, sink):
    """SPEC §9: chunk b sees [max(0, 3b + 3 - (window - sink)), 3b + 3) plus the first ``sink`` frames, and
    nothing of a later chunk, for every (window, sink) of the training recipe."""
    import torch

    from lipforcing.engine.dit.config import StreamConfig
    from lipforcing.engine.dit.full_sequence import block_causal_frame_mask

    frames = 30
    mask = block_causal_frame_mask(frames, StreamConfig(window_frames=window, sink_frames=sink, latent_h=4,
                                                        latent_w=4))
    expected = torch.zeros(frames, frames, dtype=torch.bool)
    for b in range(frames // 3):
        keys = set(range(max(0, 3 * b + 3 - (window - sink)), 3 * b + 3)) | set(range(sink))
        expected[3 * b : 3 * b + 3, sorted(keys)] = True
    assert torch.equal(mask, expected)


def test_export_aot_refuses_what_it_cannot_package(train_golden_files, tmp_path, capsys):
    """``export-aot`` (packages for the C++ student; ctest checks their parity): a real preset without weights
    and a training file are clear errors, and nothing is written."""
    out = tmp_path / "aot"
    assert main(["export-aot", "--model", "14b", "-o", str(out)]) == 2
    assert "needs --ckpt" in capsys.readouterr().err
    assert main(["export-aot", "--golden", str(train_golden_files[0]), "-o", str(out)]) == 2
    assert "training file" in capsys.readouterr().err and not out.exists()


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

    device = "cuda" if __import__("torch").cuda.is_available() else "cpu"
    ok, why = triton_available(device)
    if not ok:
        pytest.skip(why)
    return device


def test_check_reference_with_triton_kernels(golden_files, capsys):
    """The whole engine on the Triton backend (the CPU interpreter without CUDA) passes the golden check: every file
    on CUDA; in the interpreter the smallest (every window shape, ~20 s: the others repeat its shapes at the
    interpreter's cost of minutes each, and the kernels' parity is checked per shape in tests/kernels)."""
    device = _triton_or_skip()
    files = golden_files if device == "cuda" else [min(golden_files, key=lambda p: p.stat().st_size)]
    assert main(["check-reference", *map(str, files), "--backend", "triton", "--device", device]) == 0
    assert "backend triton): pass" in capsys.readouterr().out
