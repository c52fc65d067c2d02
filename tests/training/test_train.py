"""Training on a tiny prepared data set (the shared clips): stage 1 learns and trains only what the recipe trains,
stage 2's rollout is the inference loop, its losses, exit step, guidance band and reward weight hold, a resumed
run continues exactly, two gloo processes under torchrun compute what one does, and the export loads in the
engine with the trained network's output."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import conftest
from conftest import TOLERANCE
from lipforcing.engine.numerics import rel_error

pytest.importorskip("peft")

from lipforcing.training.batch import SampleRandom, TrainBatch  # noqa: E402
from lipforcing.training.config import train_config  # noqa: E402
from lipforcing.training.trainer import Inits, TrainRun  # noqa: E402


def _run(stage: str, data: Path, out: Path, inits: Inits | None = None, **overrides) -> TrainRun:
    return TrainRun(train_config(stage, "tiny", overrides), data, out, inits=inits or Inits(), progress=False)


def _held_out_loss(run: TrainRun) -> float:
    """Stage-1 loss on every clip with fixed draws and the streaming (7, 1) mask."""
    obj = run.objective
    obj.pair = (7, 1)
    total = 0.0
    with torch.no_grad():
        for i in range(len(run.data)):
            batch = TrainBatch.from_clips(run.data.batch([i]), run.data, "cpu")
            total += float(obj.loss("student", batch, SampleRandom(1234, 0, 9, [i]))[0].sum())
    return total / len(run.data)


def _grads(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            g = p.grad
            out[name] = g.full_tensor() if hasattr(g, "full_tensor") else g
    return out


def test_stage1_loss_falls_and_only_lora_and_listed_modules_train(tiny_data, tmp_path):
    run = _run("stage1", tiny_data, tmp_path / "run", steps=25, save_every=1000)  # iterations 1..24
    try:
        before = _held_out_loss(run)
        run.train_step(0)
        grads = _grads(run.objective.student)
        trainable = {n for n, p in run.objective.student.named_parameters() if p.requires_grad}
        assert set(grads) == trainable
        listed = ("patch_embedding.", "audio_proj.", "audio_cond_projs.")
        assert all(".lora_" in n or n.startswith(listed) for n in trainable)
        assert any(n.startswith("audio_cond_projs.") for n in trainable) and any(".lora_B." in n for n in trainable)
        assert all(grads[n].abs().sum() > 0 for n in trainable if ".lora_B." in n or n.startswith(listed))
        records = run.train()
        after = _held_out_loss(run)
    finally:
        run.close()
    log = [json.loads(line) for line in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 25)) and all(math.isfinite(r["loss"]) for r in log)
    assert {(r["window"], r["sink"]) for r in records} <= {(7, 1), (10, 1), (13, 1), (9, 3), (12, 3)}
    assert after < 0.85 * before, (before, after)


def test_resume_gives_the_next_loss_of_an_uninterrupted_run(tiny_data, tmp_path):
    whole = _run("stage1", tiny_data, tmp_path / "whole", steps=5, save_every=2)  # iterations 1..4
    try:
        uninterrupted = [r["loss"] for r in whole.train()]
    finally:
        whole.close()
    first = _run("stage1", tiny_data, tmp_path / "resumed", steps=3, save_every=2)
    try:
        first.train()
    finally:
        first.close()
    resumed = _run("stage1", tiny_data, tmp_path / "resumed", steps=5, save_every=2)
    try:
        later = [r["loss"] for r in resumed.train()]
    finally:
        resumed.close()
    assert len(later) == 2
    for a, b in zip(later, uninterrupted[2:]):
        assert abs(a - b) <= 1e-6 * abs(b), (later, uninterrupted)
    log = [json.loads(line)["step"] for line in (tmp_path / "resumed/log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4]


def test_a_different_run_in_the_same_folder_is_refused(tiny_data, tmp_path):
    from lipforcing.engine.errors import ConfigError

    run = _run("stage1", tiny_data, tmp_path / "run", steps=2)
    run.close()
    with pytest.raises(ConfigError, match="different run"):
        _run("stage1", tiny_data, tmp_path / "run", steps=2, lr=0.5)


def test_stage2_rollout_is_the_inference_loop(tiny_data, make_dmd):
    """With exit step 1 the rollout is the 2-step streaming sampler of inference (same noise)."""
    from lipforcing.engine.runtime.sampler import StreamingSampler

    obj, data = make_dmd(tiny_data)
    batch = TrainBatch.from_clips(data.batch([0]), data, "cpu")
    with torch.no_grad():
        rolled = obj.rollout(batch, SampleRandom(7, 0, 0, [0]), grad=False, exit_step=1)
    draw = SampleRandom(7, 0, 0, [0])
    shape = (16, 3, *batch.latents.shape[-2:])
    noise, renoise = [], []
    for _ in range(7):
        noise.append(draw.randn(shape) * 0.999)  # the release's sigma(max_t) scaling of the initial noise
        renoise.append(draw.randn(shape))
    sampler = StreamingSampler(obj.student, obj.stream, backend="reference")
    sampler.start_clip(batch.text_context, batch.audio[:, :81], batch.ref_latent, batch.mask_latent)
    chunks = sampler.run_clip(batch.masked_latents[:, :, :21], batch.latents[:, :, :21], torch.cat(noise, 2),
                              [torch.cat(renoise, 2)])
    reference = torch.cat([c.x0 for c in chunks], dim=2)
    assert rel_error(rolled, reference) < TOLERANCE[torch.float32]


class _FixedReward:
    def __init__(self, value: float) -> None:
        self.value = value

    def __call__(self, latents, wav):
        return torch.full((latents.shape[0],), self.value)


def test_stage2_generator_and_critic_steps(tiny_data, tmp_path):
    run = _run("stage2", tiny_data, tmp_path / "run", steps=2)
    try:
        obj = run.objective
        run.train_step(1)  # a critic update: the critic starts as the teacher, where the DMD gradient is zero
        obj.critic.zero_grad(set_to_none=True)
        batch = TrainBatch.from_clips(run.data.batch([1]), run.data, "cpu")
        losses = {}
        for exit_step in (0, 1):
            obj.step_exit = exit_step
            for r in (0.0, 0.3):
                obj.reward = _FixedReward(r)
                loss, info = obj.loss("student", batch, SampleRandom(3, 0, 0, [1]))
                losses[exit_step, r] = loss
                assert float(loss.detach().sum()) > 0
                assert info["reward"] == pytest.approx(r)
            # the reward weights the generator loss by exp(2 r) and nothing else changes
            ratio = float((losses[exit_step, 0.3] / losses[exit_step, 0.0]).detach())
            assert ratio == pytest.approx(math.exp(0.6), rel=1e-5)
            student = obj.student
            student.zero_grad(set_to_none=True)
            losses[exit_step, 0.0].sum().backward()
            assert any(g.abs().sum() > 0 for g in _grads(student).values())
            assert not _grads(obj.teacher) and not _grads(obj.critic)  # the frozen teacher, the idle critic
        critic_loss, _ = obj.loss("critic", batch, SampleRandom(3, 0, 1, [1]))
        obj.student.zero_grad(set_to_none=True)
        critic_loss.sum().backward()
        assert _grads(obj.critic) and not _grads(obj.student)
        obj.reward = _FixedReward(0.1)
        obj.step_exit = None
        record = run.train_step(4)  # iteration 5: one critic and one generator step, through the optimisers
    finally:
        run.close()
    for key in ("student_loss", "critic_loss", "reward", "dmd_t", "guidance"):
        assert math.isfinite(record[key]), record
    assert record["student_exit_step"] in (0, 1) and record["critic_exit_step"] in (0, 1)


def test_guidance_band_and_teacher_target():
    from lipforcing.training.stage2 import dmd_generator_loss, guidance_scale

    cfg = train_config("stage2", "tiny")
    t = torch.tensor([0.5, 0.556, 0.7, 0.882, 0.9], dtype=torch.float64)
    assert guidance_scale(t, cfg).tolist() == [1.0, 4.5, 4.5, 4.5, 1.0]
    g = torch.Generator().manual_seed(0)
    gen = torch.randn(2, 16, 3, 4, 4, generator=g, requires_grad=True)
    teacher, critic = torch.randn(2, 16, 3, 4, 4, generator=g), torch.randn(2, 16, 3, 4, 4, generator=g)
    loss = dmd_generator_loss(gen, teacher, critic, torch.tensor([0.0, 0.5]), 2.0)
    loss.sum().backward()
    # d/dgen of 0.5 (gen - stopgrad(gen - g))^2 averaged = g / n: the DMD gradient, normalised by mean|gen - teacher|
    with torch.no_grad():
        w = 1 / ((gen - teacher).abs().flatten(1).mean(1) + 1e-6)
        expected = (critic - teacher) * w[:, None, None, None, None] / gen[0].numel()
        expected[1] *= math.exp(1.0)
    assert rel_error(gen.grad, expected) < TOLERANCE[torch.float32]


def test_teacher_guidance_uses_the_unconditional_branch_inside_the_band(tiny_data, make_dmd):
    obj, data = make_dmd(tiny_data)
    batch = TrainBatch.from_clips(data.batch([0]), data, "cpu")
    x_t = torch.randn(1, 16, 21, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        inside, outside = torch.tensor([0.7], dtype=torch.float64), torch.tensor([0.95], dtype=torch.float64)
        cond = obj._x0(obj.teacher, batch, x_t, inside)
        uncond = obj._x0(obj.teacher, batch, x_t, inside, conditional=False)
        assert rel_error(uncond, cond) > 1e-3  # zeroed audio and text change the prediction
        assert rel_error(obj.teacher_x0(batch, x_t, inside), cond + 3.5 * (cond - uncond)) < 1e-5
        assert torch.equal(obj.teacher_x0(batch, x_t, outside), obj._x0(obj.teacher, batch, x_t, outside))


def test_stage2_gradients_with_checkpointing_equal_without(tiny_data, make_dmd):
    """Activation checkpointing recomputes a chunk's call after later commits rewrote the cache: the call must read
    the cache as the chunk saw it."""
    obj, data = make_dmd(tiny_data)
    batch = TrainBatch.from_clips(data.batch([0]), data, "cpu")
    grads = []
    for checkpointing in (False, True):
        obj.student.activation_checkpointing = checkpointing
        obj.student.zero_grad(set_to_none=True)
        gen = obj.rollout(batch, SampleRandom(5, 0, 0, [0]), grad=True, exit_step=1)
        (gen * torch.linspace(-1, 1, gen.numel()).reshape(gen.shape)).sum().backward()
        grads.append(_grads(obj.student))
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert rel_error(grads[1][name], grads[0][name]) < 1e-4, name


def test_sync_reward_is_finite_without_gradient():
    from lipforcing.engine.quality.syncnet import random_syncnet
    from lipforcing.engine.tools.tiny import tiny_networks
    from lipforcing.training.reward import SyncReward, face_crops_bgr

    for formula, latent_frames in (("syncnet_python", 3), ("release", 6)):  # the release needs > 15 windows
        reward = SyncReward(tiny_networks("cpu")[2], random_syncnet(0), formula=formula)
        latents = torch.randn(1, 16, latent_frames, 4, 4, requires_grad=True)
        wav = torch.randn(1, (4 * latent_frames - 3) * 640) * 0.1
        r = reward(latents, wav)
        assert r.shape == (1,) and torch.isfinite(r).all() and not r.requires_grad
    crops = face_crops_bgr(torch.stack([torch.zeros(3, 8, 8), torch.ones(3, 8, 8)]) * torch.tensor([1.0, 0.5, 0.0])
                           [None, :, None, None])
    assert crops.shape == (2, 224, 224, 3) and crops.dtype.name == "uint8"
    assert crops[1, 0, 0].tolist() == [0, 128, 255]  # RGB (1, .5, 0) -> BGR 0..255


def test_export_loads_in_the_engine_with_the_trained_output(tiny_data, tmp_path):
    from lipforcing.training.export import export_run, trained_network

    run = _run("stage1", tiny_data, tmp_path / "run", steps=3, lr=5e-3)
    try:
        run.train()
    finally:
        run.close()
    out = tmp_path / "student.safetensors"
    assert export_run(tmp_path / "run", out) == 129
    _, trained = trained_network(tmp_path / "run")
    assert any(".lora_B." in n and p.abs().sum() > 0 for n, p in trained.named_parameters())
    batch = TrainBatch.from_clips(run.data.batch([0]), run.data, "cpu")
    conftest.assert_export_computes_the_trained_network(out, trained, run.stream, batch)


def test_torchrun_two_gloo_processes_match_one(tiny_data, tmp_path):
    env = dict(os.environ, PYTHONSAFEPATH="1", OMP_NUM_THREADS="1")
    args = ["stage1", "--preset", "tiny", "--data", str(tiny_data), "--steps", "3", "--no-progress"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    two = subprocess.run([*torchrun, "-m", "lipforcing.training", *args, "--out", str(tmp_path / "two")],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "lipforcing.training", *args, "--out", str(tmp_path / "one")],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    logs = [[json.loads(x) for x in (tmp_path / name / "log.jsonl").read_text().splitlines()]
            for name in ("one", "two")]
    assert [r["step"] for r in logs[0]] == [r["step"] for r in logs[1]] == [1, 2]
    for a, b in zip(*logs):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(a["loss"]), (a, b)
    # the weights after the steps, not only the losses: every trained tensor of the two runs' checkpoints
    from lipforcing.training.export import network_from_init, trained_network

    nets = {name: dict(trained_network(tmp_path / name)[1].named_parameters()) for name in ("one", "two")}
    trained = [n for n, p in nets["one"].items() if p.requires_grad]
    assert trained and nets["one"].keys() == nets["two"].keys()
    start = dict(network_from_init("tiny", None, train_config("stage1", "tiny").lora, seed=0).named_parameters())
    moved = 0
    for n in trained:
        one, two = nets["one"][n].detach(), nets["two"][n].detach()
        assert rel_error(two, one) < 1e-5, n
        moved += not torch.equal(one, start[n])
    assert moved > len(trained) // 2  # the steps changed the weights the comparison covers


def test_command_line_trains_logs_and_reports_user_errors(tiny_data, tmp_path, capsys):
    from lipforcing.cli import main

    out = tmp_path / "run"
    assert main(["train", "stage1", "--data", str(tiny_data), "--out", str(out), "--steps", "2", "--tensorboard",
                 "--no-progress"]) == 0
    assert "stage1: step 1" in capsys.readouterr().out
    record = json.loads((out / "log.jsonl").read_text())
    assert record["step"] == 1 and math.isfinite(record["loss"])
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tensorboard").iterdir())
    cases = [
        (["train", "stage1", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "x")], "no prepared data"),
        (["train", "stage2", "--preset", "1.3b", "--data", str(tiny_data), "--out", str(tmp_path / "y")], "1.3b"),
        (["train", "stage1", "--data", str(tiny_data), "--out", str(tmp_path / "z"), "--config",
          str(tmp_path / "missing.json")], "no such config file"),
        (["train", "export", str(tmp_path / "none"), "-o", str(tmp_path / "s.safetensors")], "not a training run"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error:") and needle in err, err
    assert not (tmp_path / "s.safetensors").exists()


def test_bf16_compute_keeps_fp32_master_weights(tiny_data, tmp_path):
    """FSDP2 mixed precision with activation checkpointing: trained parameters stay fp32, frozen ones are stored in
    bf16, and the loss is the fp32 run's up to bf16 rounding."""
    losses = {}
    for dtype in ("fp32", "bf16"):
        run = _run("stage1", tiny_data, tmp_path / dtype, steps=2, compute_dtype=dtype, activation_checkpointing=True)
        try:
            params = list(run.objective.student.named_parameters())
            if dtype == "bf16":
                assert {p.dtype for _, p in params if p.requires_grad} == {torch.float32}
                assert {p.dtype for _, p in params if not p.requires_grad} == {torch.bfloat16}
            losses[dtype] = run.train()[0]["loss"]
        finally:
            run.close()
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=TOLERANCE[torch.bfloat16])
