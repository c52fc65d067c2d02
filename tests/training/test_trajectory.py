"""Tests of ``lipforcing analyze-trajectory`` (training/trajectory.py) with the tiny preset on the CPU.

SyncNet at 224 x 224 dominates the cost (about 3 s per scored x0 on 2 cores), so the CLI runs once (4 steps, 2
scored) and the tests of the sampler itself call the tiny teacher without scoring.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch

from lipforcing.engine.dit.config import StreamConfig
from lipforcing.engine.dit.full_sequence import FullSequenceAttention
from lipforcing.engine.errors import ConfigError
from lipforcing.training.batch import TrainBatch
from lipforcing.training.data import TrainData
from lipforcing.training.networks import build_network
from lipforcing.training.trajectory import (
    METRICS,
    REFERENCE,
    RUNS,
    SYNC_WINDOW,
    GuidedVelocity,
    TrajectorySettings,
    analyze_trajectory,
    euler_trajectory,
    flow_grid,
    run_analyze_trajectory,
    scored_steps,
    trajectory_arguments,
)

CLI_STEPS, CLI_EVERY = 4, 3  # scores steps 0 and 3
KEYS = {"steps", "guidance", "clips", "step", "t", "without_cfg", "with_cfg", "reference_sync_c", "sync_window",
        "reference", "preset", "device", "seed"}


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lipforcing analyze-trajectory")
    trajectory_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def cli_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, Path]:
    """(exit code, stdout, JSON path) of one ``analyze-trajectory`` run through its argparse parser."""
    out = tmp_path_factory.mktemp("trajectory") / "trajectory.json"
    args = _parse(["--data", str(tiny_data), "--steps", str(CLI_STEPS), "--every", str(CLI_EVERY), "--device", "cpu",
                   "--seed", "3", "-o", str(out)])
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = args.run(args)
    return code, stdout.getvalue(), out


@pytest.fixture(scope="module")
def tiny_teacher_batch(tiny_data: Path):
    """(tiny random teacher, TrainBatch of clip 0, bidirectional attention over its frames)."""
    data = TrainData(tiny_data)
    teacher = build_network("tiny", None, seed=0).eval().requires_grad_(False)
    batch = TrainBatch.from_clips(data.batch([0]), data, "cpu")
    stream = StreamConfig(latent_h=data.settings["latent_h"], latent_w=data.settings["latent_w"])
    attention = FullSequenceAttention(teacher.cfg, stream, batch.latents.shape[2], block_causal=False, device="cpu")
    return teacher, batch, attention


# --- the grid and the sampler ---------------------------------------------------------------------------------


def test_grid_is_spec_section_2():
    t = flow_grid(50)
    assert t.dtype == torch.float64 and t.shape == (51,)
    assert float(t[0]) == 1.0 and float(t[50]) == 0.0
    assert bool((t[1:] < t[:-1]).all())
    for j, want in ((20, 0.8824), (30, 0.7692), (40, 0.5556)):  # SPEC §2's constants, to their 4 decimals
        assert float(t[j]) == pytest.approx(want, abs=5e-5)
    # the released 2-step schedule (0.999 ~ t_0, 0.769 = t_30) and the sync window [t_40, t_20] sit on this grid
    assert SYNC_WINDOW[0] == pytest.approx(float(t[40]), abs=5e-4)
    assert SYNC_WINDOW[1] == pytest.approx(float(t[20]), abs=5e-4)


def test_scored_steps_always_include_the_last():
    assert scored_steps(6, 2) == [0, 2, 4, 5]
    assert scored_steps(6, 1) == [0, 1, 2, 3, 4, 5]
    assert scored_steps(50, 50) == [0, 49]
    assert scored_steps(1, 3) == [0]


def test_euler_with_the_exact_flow_lands_on_x0():
    """With the true flow of a point mass at x0 (v = (x - x0) / t) every x0 prediction is x0, and so is the end."""
    gen = torch.Generator().manual_seed(11)
    x0 = torch.randn(2, 16, 3, 6, 10, generator=gen, dtype=torch.float64)
    noise = torch.randn(2, 16, 3, 6, 10, generator=gen)
    seen: list[tuple[int, float, torch.Tensor]] = []
    final = euler_trajectory(lambda x, t: (x.double() - x0) / t, noise, flow_grid(7),
                             lambda j, t, pred: seen.append((j, t, pred)))
    assert [j for j, _, _ in seen] == list(range(7))
    assert [t for _, t, _ in seen] == flow_grid(7)[:-1].tolist()
    for _, _, pred in seen:  # the velocity sees float32 x, hence float32-level agreement
        torch.testing.assert_close(pred, x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final, x0, rtol=1e-5, atol=1e-5)


def test_last_x0_prediction_is_the_sample(tiny_teacher_batch):
    """t_steps = 0: the last Euler step x + (0 - t) v is exactly the last call's x0 = x - t v."""
    teacher, batch, attention = tiny_teacher_batch
    noise = torch.randn(batch.latents.shape, generator=torch.Generator().manual_seed(5))
    preds: list[torch.Tensor] = []
    final = euler_trajectory(GuidedVelocity(teacher, batch, attention, 4.5), noise, flow_grid(6),
                             lambda j, t, x0: preds.append(x0))
    assert len(preds) == 6 and final.shape == batch.latents.shape
    assert torch.equal(final, preds[-1])
    assert not torch.equal(preds[0], preds[-1])  # the prediction did move along the trajectory


def test_guided_velocity_is_cfg_of_the_two_branches(tiny_teacher_batch):
    teacher, batch, attention = tiny_teacher_batch
    x = torch.randn(batch.latents.shape, generator=torch.Generator().manual_seed(7))
    t = torch.tensor([0.7], dtype=torch.float64)
    with torch.no_grad():
        v_c = teacher(batch.inputs(x), t, batch.clip(True), attention).double()
        v_u = teacher(batch.inputs(x), t, batch.clip(False), attention).double()
        plain = GuidedVelocity(teacher, batch, attention, 1.0)(x, 0.7)
        guided = GuidedVelocity(teacher, batch, attention, 4.5)(x, 0.7)
    assert torch.equal(plain, v_c)
    torch.testing.assert_close(guided, v_u + 4.5 * (v_c - v_u), rtol=1e-12, atol=1e-12)
    assert (guided - plain).abs().max() > 1e-4  # zeroing text and audio changes the tiny teacher's flow


# --- the analysis and the command line ------------------------------------------------------------------------


def test_cli_writes_json_plot_and_table(cli_run, tiny_data: Path):
    code, stdout, out = cli_run
    assert code == 0
    result = json.loads(out.read_text())
    assert set(result) == KEYS
    assert result["steps"] == CLI_STEPS and result["guidance"] == 4.5 and result["preset"] == "tiny"
    assert result["clips"] == [TrainData(tiny_data).clips[0]["id"]]
    assert result["step"] == scored_steps(CLI_STEPS, CLI_EVERY) == [0, 3]
    assert result["t"] == pytest.approx(flow_grid(CLI_STEPS)[[0, 3]].tolist())
    assert result["sync_window"] == pytest.approx(list(SYNC_WINDOW))
    assert result["reference"] == REFERENCE and result["device"] == "cpu" and result["seed"] == 3
    assert math.isfinite(result["reference_sync_c"])
    for run in RUNS:
        assert set(result[run]) == set(METRICS)
        for metric in METRICS:
            values = result[run][metric]
            assert len(values) == 2 and all(math.isfinite(v) for v in values), (run, metric, values)
        assert all(-1 <= v <= 1 for v in result[run]["ssim"])
        assert all(v > 0 for v in result[run]["psnr"])
    assert result["with_cfg"]["psnr"] != result["without_cfg"]["psnr"]  # s = 4.5 changes the samples
    png = out.with_suffix(".png")
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(out) in stdout and str(png) in stdout
    assert len([line for line in stdout.splitlines() if line.strip().startswith(("0 ", "3 "))]) == 2


def test_guidance_one_gives_identical_runs(tiny_data: Path):
    result = analyze_trajectory(TrajectorySettings(data=str(tiny_data), guidance=1.0, steps=1, device="cpu"))
    assert result["step"] == [0] and result["t"] == [1.0]
    assert result["with_cfg"] == result["without_cfg"]
    assert all(math.isfinite(v) for m in METRICS for v in result["with_cfg"][m])


def test_non_tiny_preset_needs_teacher_and_scorers(tiny_data: Path):
    with pytest.raises(ConfigError, match="--teacher"):
        TrajectorySettings(data=str(tiny_data), preset="1.3b", taehv="taew2_1.pth", syncnet="syncnet_v2.model")
    with pytest.raises(ConfigError, match="--taehv.*--syncnet"):
        TrajectorySettings(data=str(tiny_data), preset="14b", teacher="teacher.safetensors")
    args = _parse(["--data", str(tiny_data), "--preset", "14b", "-o", "x.json"])
    with pytest.raises(ConfigError, match="--teacher"):
        run_analyze_trajectory(args)


def test_bad_options_fail_before_sampling(tiny_data: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match="--steps"):
        TrajectorySettings(data=str(tiny_data), steps=0)
    with pytest.raises(ConfigError, match=".json"):
        run_analyze_trajectory(_parse(["--data", str(tiny_data), "--device", "cpu", "-o", str(tmp_path / "x.png")]))
    with pytest.raises(ConfigError, match="holds 3 clip"):
        analyze_trajectory(TrajectorySettings(data=str(tiny_data), clips=4, steps=1, device="cpu"))
    assert not list(tmp_path.iterdir())
