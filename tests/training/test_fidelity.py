"""Training as the release trains, checked against hand-written formulas (tests that fail on a wrong recipe, not only
on a broken one): the critic's x0-space loss, the DMD t and exit-step distributions, the order in which the
networks change over a 10-iteration run, adapters continued from a previous run, the released reward's Sync-C, the
copy check, and the diagnosis of a checkout that shadows peft's imports."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
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


def _local(p: torch.Tensor) -> torch.Tensor:
    """A parameter's tensor (FSDP2 shards it as a DTensor: one process holds all of it)."""
    return p.to_local() if hasattr(p, "to_local") else p


def _trained(net) -> dict[str, torch.Tensor]:
    return {n: _local(p.detach()).clone() for n, p in net.named_parameters() if p.requires_grad}


def _changed(before: dict, after: dict) -> bool:
    return any(not torch.equal(before[n], after[n]) for n in before)


# --- the critic's loss --------------------------------------------------------------------------------------------


class _LinearFlow(torch.nn.Module):
    """A stand-in critic whose flow is 0.3 x_t + 0.1 t: its x0 can be written by hand."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(self, inputs, t, clip, attention):
        return 0.3 * inputs[:, :16] + 0.1 * t.float()[:, None, None, None, None]


def test_critic_loss_is_the_x0_mse_to_the_rollout_written_by_hand(tiny_data, make_dmd):
    """Critic phase: t = shift(0.001 + 0.998 u) clamped to [0.001, 0.999], x_t = (1 - t) gen + t eps, the critic's
    x0 = x_t - t flow, loss = mean((x0 - gen)^2) over the sample; gen is the student's rollout, not the data."""
    from lipforcing.training.data import TrainData

    obj, data = make_dmd(tiny_data)
    obj.critic = _LinearFlow(obj.teacher.cfg)
    batch = TrainBatch.from_clips(TrainData(tiny_data).batch([0, 1]), data, "cpu")
    gen = torch.randn(2, 16, 21, 8, 8, generator=torch.Generator().manual_seed(4))
    obj.rollout = lambda batch, rng, grad, exit_step: gen  # noqa: ARG005 - the rollout is tested elsewhere
    loss, _ = obj.loss("critic", batch, SampleRandom(11, 3, 1, [0, 1]))

    draws = SampleRandom(11, 3, 1, [0, 1])
    expected = []
    for b, g in enumerate(draws.generators):
        u = float(torch.rand((), generator=g, dtype=torch.float64))
        eps = torch.randn((16, 21, 8, 8), generator=g).double()
        v = 0.001 + 0.998 * u
        t = min(max(5 * v / (1 + 4 * v), 0.001), 0.999)
        x_t = (1 - t) * gen[b].double() + t * eps
        x0 = x_t - t * (0.3 * x_t.float().double() + 0.1 * t)
        expected.append(float(((x0 - gen[b].double()) ** 2).mean()))
    assert loss.shape == (2,)
    assert loss.tolist() == pytest.approx(expected, rel=1e-5)
    assert expected != pytest.approx([float(((gen[b] - batch.latents[b]) ** 2).mean()) for b in range(2)], rel=0.1)


# --- distributions of the draws -----------------------------------------------------------------------------------


def _shifted_cdf(x: np.ndarray) -> np.ndarray:
    """P(t <= x) for t = 5 v / (1 + 4 v), v ~ U(0.001, 0.999), clamped to [0.001, 0.999] (exact, by inversion)."""
    v = x / (5 - 4 * x)
    cdf = np.clip((v - 0.001) / 0.998, 0, 1)
    return np.where(x >= 0.999, 1.0, cdf)


def test_dmd_times_follow_the_shifted_distribution_with_the_clamp(tiny_data, make_dmd):
    """A seeded histogram of the objective's DMD t (4000 draws) against the formula's bin probabilities, within 4.5
    binomial standard deviations per bin; the 0.4 % of draws beyond 0.999 sit on 0.999 (the release's clamp)."""
    obj, _ = make_dmd(tiny_data)
    n = 4000
    rng = SampleRandom(5, 7, 0, range(n))
    t, _ = obj._noised(torch.zeros(n, 1, 1, 1, 1), rng)
    t = t.numpy()
    edges = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.9989, 1.0])
    counts, _ = np.histogram(t, edges)
    p = np.diff(_shifted_cdf(edges))
    sd = np.sqrt(n * p * (1 - p))
    assert np.all(np.abs(counts - n * p) <= 4.5 * sd + 1), (counts.tolist(), (n * p).round(1).tolist())
    assert t.min() >= 0.001 and t.max() == pytest.approx(0.999, abs=1e-12)
    at_clamp = (t == 0.999).sum()
    assert 4 <= at_clamp <= 36  # expected n * 0.00498 = 20 draws


def test_exit_step_is_drawn_per_rollout_call_uniformly(tiny_data, make_dmd):
    """One draw per rollout call (the release's ``_sample_denoising_end_steps``): each of {0, 1} half of the time,
    the critic's and the student's calls of one iteration independent, the samples of a call sharing theirs; with
    ``exit_step_per="step"`` every call of the iteration takes the iteration's draw."""
    obj, _ = make_dmd(tiny_data)
    obj.begin_step(0)
    calls = 1000
    critic = np.array([obj.exit_step(SampleRandom(0, s, 1, [2 * s])) for s in range(calls)])
    student = np.array([obj.exit_step(SampleRandom(0, s, 0, [2 * s])) for s in range(calls)])
    sd = math.sqrt(calls * 0.25)
    for draws in (critic, student):
        assert set(draws.tolist()) == {0, 1} and abs(draws.sum() - calls / 2) <= 4.5 * sd
    assert abs((critic == student).sum() - calls / 2) <= 4.5 * sd  # independent calls, not one draw per iteration
    assert obj.exit_step(SampleRandom(0, 3, 0, [6, 7])) == obj.exit_step(SampleRandom(0, 3, 0, [6, 7]))

    obj.cfg = obj.cfg.replace(exit_step_per="step")
    shared = [obj.begin_step(s)["exit_step"] for s in range(200)]
    assert all(obj.exit_step(SampleRandom(0, 199, ph, [k])) == shared[-1] for ph in (0, 1) for k in range(4))
    assert 60 <= sum(shared) <= 140


# --- the order of the updates -------------------------------------------------------------------------------------


def test_ten_iterations_change_the_networks_on_the_release_schedule(tiny_data, tmp_path):
    """steps=11 runs iterations 1..10 (the release's ``range(1, max_iter)``): the critic changes at every iteration,
    the student at 5 and 10 only; at 5 and 10 the critic's loss saw the student before its update, and the
    student's loss the critic before its update; the critic's gradient there is 4x its loss's and unclipped."""
    run = _run("stage2", tiny_data, tmp_path / "run", steps=11, reward=False, save_every=1000)
    obj = run.objective
    seen: list[tuple[int, str, dict, dict]] = []
    loss = obj.loss

    def recording_loss(phase, batch, rng):
        seen.append((rng.key[1] + 1, phase, _trained(obj.student), _trained(obj.critic)))
        return loss(phase, batch, rng)

    obj.loss = recording_loss
    changes = []
    try:
        for step in range(run.cfg.iterations):
            student, critic = _trained(obj.student), _trained(obj.critic)
            record = run.train_step(step)
            changes.append((record["step"], _changed(student, _trained(obj.student)),
                            _changed(critic, _trained(obj.critic))))
            for it, phase, s, c in seen:
                if it == record["step"]:
                    assert not _changed(student, s) and not _changed(critic, c), (it, phase)
    finally:
        run.close()
    assert run.cfg.iterations == 10
    assert [c[0] for c in changes] == list(range(1, 11))
    assert [it for it, s, _ in changes if s] == [5, 10]
    assert all(c for _, _, c in changes)
    assert [(it, phase) for it, phase, _, _ in seen if it in (5, 10)] == [(5, "critic"), (5, "student"),
                                                                         (10, "critic"), (10, "student")]


def test_the_critic_gradient_on_student_iterations_is_scaled_and_unclipped(tiny_data, tmp_path):
    run = _run("stage2", tiny_data, tmp_path / "run", steps=6, reward=False, grad_clip=1e-6)
    obj = run.objective
    run.clip_index = lambda slot: 0  # the same clip at both iterations
    try:
        norms = {}
        loss = obj.loss
        # the same draws at both iterations (phase, slot and seed fixed): only the iteration's role differs
        obj.loss = lambda phase, batch, rng: loss(phase, batch, SampleRandom(9, 0, 1 if phase == "critic" else 0, [0]))
        for step in (3, 4):  # iteration 4: the critic alone; iteration 5: critic and student
            critic = _trained(obj.critic)
            record = run.train_step(step)
            norms[step + 1] = record["critic_grad_norm"]
            # undo the update so that both iterations start from the same critic
            with torch.no_grad():
                for n, p in obj.critic.named_parameters():
                    if p.requires_grad:
                        _local(p).copy_(critic[n])
        assert norms[5] == pytest.approx(4 * norms[4], rel=1e-4)
        assert norms[4] > 1e-3  # far above grad_clip: the critic is not clipped
        assert record["student_grad_norm"] > 1e-6  # the student is clipped (grad_clip) ...
        clipped = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(_local(p.grad)) for p in
                                                        obj.student.parameters() if p.grad is not None]))
        assert clipped <= 1.01e-6  # ... to grad_clip
    finally:
        run.close()


# --- adapters ----------------------------------------------------------------------------------------------------


def test_stage2_continues_the_stage1_adapter_and_exports_the_merged_network(tiny_data, tmp_path):
    """lora.init continue: stage 2's student starts from stage 1's A/B (unmerged), trains them, and its export
    equals the unmerged network; fresh: a new adapter with B = 0 on the merged weights."""
    from lipforcing.training.config import LoraConfig
    from lipforcing.training.export import export_run, trained_network

    stage1 = _run("stage1", tiny_data, tmp_path / "s1", steps=3, lr=5e-3)
    try:
        stage1.train()
    finally:
        stage1.close()
    _, s1 = trained_network(tmp_path / "s1")
    s1_adapter = {n: p.detach() for n, p in s1.named_parameters() if ".lora_" in n}
    assert any(".lora_B." in n and p.abs().sum() > 0 for n, p in s1_adapter.items())

    run = _run("stage2", tiny_data, tmp_path / "s2", inits=Inits(init=str(tmp_path / "s1")), steps=6, reward=False)
    try:
        start = {n: p for n, p in run.objective.student.named_parameters()}
        assert s1_adapter.keys() <= start.keys()
        assert all(torch.equal(_local(start[n].detach()), p) and start[n].requires_grad for n, p in s1_adapter.items())
        before = _trained(run.objective.student)
        run.train()
        after = _trained(run.objective.student)
        assert any(not torch.equal(before[n], after[n]) for n in s1_adapter)  # the continued A/B trained
        batch = TrainBatch.from_clips(run.data.batch([0]), run.data, "cpu")
    finally:
        run.close()
    out = tmp_path / "s2.safetensors"
    export_run(tmp_path / "s2", out)
    _, s2 = trained_network(tmp_path / "s2")
    conftest.assert_export_computes_the_trained_network(out, s2, run.stream, batch)

    fresh = _run("stage2", tiny_data, tmp_path / "fresh", inits=Inits(init=str(tmp_path / "s1")), steps=2,
                 reward=False, lora=LoraConfig(rank=16, alpha=16.0, init="fresh"))
    try:
        adapter = {n: _local(p.detach()) for n, p in fresh.objective.student.named_parameters() if ".lora_B." in n}
        assert adapter.keys() == {n for n in s1_adapter if ".lora_B." in n}
        assert all(p.abs().sum() == 0 for p in adapter.values())
    finally:
        fresh.close()


def test_an_adapter_in_a_checkpoint_file_is_continued(tiny_data, tmp_path):
    """A checkpoint holding base weights and ``<module>.lora_A/B.weight`` (OmniAvatar's layout) gives its A/B."""
    from safetensors.torch import save_file

    from lipforcing.training.config import LoraConfig
    from lipforcing.training.networks import add_lora, build_network, released_state_dict, trainable_network

    lora = LoraConfig(rank=4, alpha=4.0)
    source = add_lora(build_network("tiny", None, seed=3), lora, seed=3)
    with torch.no_grad():
        for n, p in source.named_parameters():
            if ".lora_B." in n:
                p.normal_(generator=torch.Generator().manual_seed(len(n)))
    state = {k.replace(".base_layer.", ".").replace(".default.", "."): v.contiguous()
             for k, v in source.state_dict().items()}
    path = tmp_path / "omni.safetensors"
    save_file(state, str(path))
    model = trainable_network("tiny", str(path), lora, seed=0)
    ours, theirs = dict(model.named_parameters()), dict(source.named_parameters())
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)
    assert {n for n, p in ours.items() if p.requires_grad} == {n for n, p in theirs.items() if p.requires_grad}
    fresh = trainable_network("tiny", str(path), LoraConfig(rank=4, alpha=4.0, init="fresh"), seed=0)
    assert all(p.abs().sum() == 0 for n, p in fresh.named_parameters() if ".lora_B." in n)
    merged, expected = released_state_dict(fresh), released_state_dict(source)  # the adapter merged in
    assert merged.keys() == expected.keys()
    assert all(rel_error(merged[k], expected[k]) < TOLERANCE[torch.float32] for k in merged)


# --- the reward's Sync-C ------------------------------------------------------------------------------------------


def test_release_sync_c_averages_only_the_overlapping_windows():
    """A hand-computed example of the released scorer's ``_offset_search``: at shift s the mean distance of the
    pairs (video i, audio i + s) that both exist; Sync-C = median - min, and it differs from the zero-padded
    protocol of ``lipforcing eval``."""
    from lipforcing.engine.quality.syncnet import distance_table, release_sync_scores, sync_scores

    video = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 1.0], [1.0, 1.0]])
    audio = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0], [1.0, 1.0], [2.0, 2.0]])  # video shifted by one
    table = distance_table(video, audio, vshift=2)
    means = []
    for s in range(-2, 3):
        pairs = [(i, i + s) for i in range(5) if 0 <= i + s < 5]
        means.append(sum(math.dist((video[i] + 1e-6).tolist(), audio[j].tolist()) for i, j in pairs) / len(pairs))
    result = release_sync_scores(table)
    assert result.sync_d == pytest.approx(min(means), abs=1e-6)
    assert result.sync_c == pytest.approx(sorted(means)[2] - min(means), abs=1e-6)
    assert result.offset == 2 - int(np.argmin(means)) == 1  # audio window i - 1 matches video window i
    assert means[1] == pytest.approx(0, abs=1e-5)  # the 4 pairs of shift -1 are exact
    assert sync_scores(table).sync_c != pytest.approx(result.sync_c, abs=1e-3)


def test_release_audio_scale_is_32768_unrounded():
    from lipforcing.engine.quality.syncnet import int16_scale, scale_32768

    x = np.array([0.5, -1.0, 1e-5, 1.2], np.float32)
    assert scale_32768(x).tolist() == [16384.0, -32768.0, pytest.approx(0.32768, rel=1e-6), pytest.approx(39321.6)]
    assert int16_scale(x).tolist() == [16384.0, -32767.0, 0.0, 32767.0]


# --- the copy check and the shadowed import -----------------------------------------------------------------------


def test_copy_check_is_logged_every_n_iterations(tiny_data, tmp_path):
    run = _run("stage1", tiny_data, tmp_path / "run", steps=5, copy_check_every=2)
    try:
        records = run.train()
    finally:
        run.close()
    checked = [r for r in records if "copy_gap" in r]
    assert [r["step"] for r in checked] == [2, 4]
    for r in checked:
        assert r["copy_gap"] == pytest.approx(r["copy_swapped"] - r["copy_own"])
        assert r["copy_own"] != r["copy_swapped"] and r["copy_own"] != r["copy_zeroed"]


def test_a_checkout_that_shadows_peft_imports_says_so(tmp_path):
    """From the checkout's root without PYTHONSAFEPATH the top-level name ``kernels`` is the checkout's folder: the
    import of lipforcing.training says so in one line, and LoRA names that cause instead of a missing peft."""
    root = Path(__file__).resolve().parents[2]
    code = ("from lipforcing.training.networks import add_lora, build_network\n"
            "from lipforcing.training.config import LoraConfig\n"
            "from lipforcing.engine.errors import ConfigError\n"
            "try:\n    add_lora(build_network('tiny', None), LoraConfig(rank=2))\n"
            "except ConfigError as exc:\n    print('ERROR', exc)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    shadowed = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                              timeout=120)
    assert "shadows the PyPI package 'kernels'" in shadowed.stderr and "PYTHONSAFEPATH=1" in shadowed.stderr
    assert "ERROR peft failed to import" in shadowed.stdout and "needs peft" not in shadowed.stdout
    clean = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=120)
    assert clean.returncode == 0 and "ERROR" not in clean.stdout and "shadows" not in clean.stderr
