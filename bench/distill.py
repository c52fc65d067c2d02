"""``lipforcing bench-distill``: the mini-distillation, end to end on the tiny model, with one stated measure.

    lipforcing bench-distill --clips DIR_OR_VIDEOS... --work DIR [--out R.json]

1. Prepare the shared talking-head clips (tiny preset, 64 x 64 faces, 81-frame clips); the clips of the last
   video are held back for evaluation.
2. Train a tiny bidirectional teacher with plain flow matching (``lipforcing train teacher``).
3. Stage 1 (diffusion forcing) from the teacher's weights, then stage 2 (Self-Forcing DMD with the sync-window
   CFG) from stage 1, the frozen teacher and a critic initialised from the teacher.
4. On the held-back clips: the teacher's 50-step samples (Euler on SPEC §2's grid, guidance 4.5 inside the sync
   window, 1.0 outside, as stage 2's target) and each student's 2-step streaming samples through the engine's
   inference loop (``StreamingSampler``, the exported weights): a random-weight student, the teacher's weights run
   causally (stage 1's starting point), after stage 1, after stage 2.

Measure: latent MSE between a student's sample and the teacher's sample of the same clip, averaged over the held-back
clips and ``--seeds`` noise draws (the noises differ: DMD matches distributions, not noise-to-sample maps; the
conditioning fixes all but the mouth, so the conditional distribution is narrow and MSE is meaningful). Lower is
closer to the teacher. The MSE to the clean latents of the clip is reported beside it.

Distribution measures (MSE to one teacher sample rewards predicting the mean): per seed, every student's samples of
all held-back clips are pooled and compared with the teacher's pooled samples: the mean and standard deviation of
the latents and of their frame-to-frame differences, and the Fréchet distance between Gaussians fitted to the
16-channel latent vectors (every frame and position a vector); each figure is given as mean and standard deviation
over the seeds. A change smaller than that spread is not a change the run shows.

Copy risk: each student samples the clip with the reference-sequence channels swapped for the other held-back clip's
latents, and zeroed; the report gives the MSE of those samples to the clip's own clean latents and to the swapped-in
clip's (a student that copies the reference lands on the latter).

The SyncNet reward is off in the three runs (no SyncNet weights exist without downloads and a random SyncNet's
confidence is noise); ``--reward-steps N`` adds a short stage-2 run with the reward on (random SyncNet) from the same
stage 1, to show the reward's path running and its logged values. Everything runs on the CPU.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..engine.app.cli import command
from ..engine.errors import ConfigError


@command("bench-distill", "mini-distillation on the tiny model: teacher, stage 1, stage 2, then latent MSE to the "
                          "teacher's 50-step samples on held-back clips")
def _distill_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("videos", nargs="+", help="talking-head videos with speech; the last one is held back")
    p.add_argument("--work", required=True, help="folder for the data and the runs (resumes)")
    p.add_argument("--teacher-steps", type=int, default=300)
    p.add_argument("--stage1-steps", type=int, default=200)
    p.add_argument("--stage2-steps", type=int, default=100)
    p.add_argument("--seeds", type=int, default=3, help="noise draws per held-back clip")
    p.add_argument("--stride", type=int, default=40, help="frames between clip starts when preparing")
    p.add_argument("--reward-steps", type=int, default=0, help="a short stage-2 run with the reward on (0: none)")
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.set_defaults(run=_distill)


def _train(stage: str, work: Path, data: Path, steps: int, name: str | None = None, reward: bool = False,
           **inits) -> tuple[Path, list[dict]]:
    from ..training.config import train_config
    from ..training.trainer import Inits, TrainRun

    out = work / (name or stage)
    run = TrainRun(train_config(stage, "tiny", {"steps": steps, "reward": reward}), data, out, inits=Inits(**inits),
                   progress=True)
    try:
        records = run.train()
    finally:
        run.close()
    return out, records


def frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to the rows of a and b [N, C] (float64)."""
    a, b = a.double(), b.double()
    ma, mb = a.mean(0), b.mean(0)
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    root = torch.linalg.eigvals(ca @ cb).real.clamp(min=0).sqrt().sum()  # trace of sqrt(ca cb)
    return float((ma - mb).pow(2).sum() + ca.trace() + cb.trace() - 2 * root)


def distribution(samples: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pooled statistics of samples [1, 16, L, h, w]: the 16-channel vectors, their frame differences."""
    x = torch.cat([s[0].flatten(1).T for s in samples])  # [N, 16]
    d = torch.cat([(s[0, :, 1:] - s[0, :, :-1]).flatten(1).T for s in samples])
    return {"vectors": x, "diffs": d}


def _spread(values: list[float]) -> dict[str, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return {"mean": round(float(t.mean()), 5), "std": round(float(t.std()) if len(values) > 1 else 0.0, 5)}


def teacher_sample(teacher, batch, stream, seed: int) -> torch.Tensor:
    """The teacher's 50-step sample [1, 16, L, h, w] with stage 2's guidance (4.5 in the sync window)."""
    from ..engine.dit.full_sequence import FullSequenceAttention
    from ..training.config import train_config
    from ..training.stage2 import guidance_scale
    from ..training.trajectory import GuidedVelocity, euler_trajectory, flow_grid

    cfg = train_config("stage2", "tiny")
    ctx = FullSequenceAttention(teacher.cfg, stream, batch.latents.shape[2], block_causal=False, device="cpu")
    velocity = GuidedVelocity(teacher, batch, ctx,
                              lambda t: float(guidance_scale(torch.tensor([t], dtype=torch.float64), cfg)[0]))
    noise = torch.randn(batch.latents.shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return euler_trajectory(velocity, noise, flow_grid(50)).float()


def student_sample(student, batch, stream, seed: int, reference: torch.Tensor | None = None) -> torch.Tensor:
    """The engine's 2-step streaming sample [1, 16, L, h, w] (the inference loop users run); ``reference`` replaces
    the reference-sequence channels (the copy-risk check)."""
    from ..engine.runtime.sampler import StreamingSampler

    sampler = StreamingSampler(student, stream, backend="reference", seed=seed)
    sampler.start_clip(batch.text_context, batch.audio, batch.ref_latent, batch.mask_latent)
    chunks = sampler.run_clip(batch.masked_latents, batch.latents if reference is None else reference)
    return torch.cat([c.x0 for c in chunks], dim=2)


def _distill(args: argparse.Namespace) -> int:
    from ..engine.dit.build import random_student
    from ..engine.dit.checkpoint import load_student
    from ..engine.dit.config import ModelConfig, StreamConfig
    from ..training.batch import TrainBatch
    from ..training.data import PrepareSettings, TrainData, prepare_data
    from ..training.export import export_run

    if len(args.videos) < 2:
        raise ConfigError("give at least two videos: the last one is held back for evaluation")
    work = Path(args.work)
    started = time.perf_counter()
    settings = PrepareSettings(preset="tiny", codec="taehv", size=64, clip_frames=81, stride=args.stride,
                               device="cpu")
    prepare_data(args.videos[:-1], work / "data-train", settings)
    prepare_data(args.videos[-1:], work / "data-heldout", settings)
    data, held = work / "data-train", TrainData(work / "data-heldout")
    timings = {}
    t0 = time.perf_counter()
    teacher_run, _ = _train("teacher", work, data, args.teacher_steps)
    timings["teacher_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    stage1_run, _ = _train("stage1", work, data, args.stage1_steps, init=str(teacher_run))
    timings["stage1_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    stage2_run, _ = _train("stage2", work, data, args.stage2_steps, init=str(stage1_run), teacher=str(teacher_run))
    timings["stage2_s"] = time.perf_counter() - t0
    reward_run = None
    if args.reward_steps:
        t0 = time.perf_counter()
        _, reward_log = _train("stage2", work, data, args.reward_steps, name="stage2-reward", reward=True,
                               init=str(stage1_run), teacher=str(teacher_run))
        timings["stage2_reward_s"] = time.perf_counter() - t0
        rewards = [r["reward"] for r in reward_log if "reward" in r]
        reward_run = {"steps": args.reward_steps, "syncnet": "random weights", "student_updates": len(rewards),
                      "reward_logged": [round(r, 5) for r in rewards],
                      "generator_loss": [round(r["student_loss"], 6) for r in reward_log if "student_loss" in r]}

    files = {}
    for name, run in (("teacher", teacher_run), ("stage1", stage1_run), ("stage2", stage2_run)):
        files[name] = work / f"{name}.safetensors"
        export_run(run, files[name])
    tiny = ModelConfig.from_name("tiny")
    teacher = load_student(files["teacher"], cfg=tiny, dtype=torch.float32)
    students = {
        "untrained (random weights)": random_student(tiny, seed=0),
        "untrained (teacher weights, causal)": teacher,
        "after stage 1": load_student(files["stage1"], cfg=tiny, dtype=torch.float32),
        "after stage 1 + stage 2": load_student(files["stage2"], cfg=tiny, dtype=torch.float32),
    }
    stream = StreamConfig(latent_h=held.settings["latent_h"], latent_w=held.settings["latent_w"])
    mse_teacher = {k: [] for k in students}
    mse_clean = {k: [] for k in ["teacher 50 steps", *students]}
    pooled = {k: {seed: [] for seed in range(args.seeds)} for k in ["teacher 50 steps", *students]}
    copy = {k: {"swapped_to_own": [], "swapped_to_swapped_in": [], "zeroed_to_own": []} for k in students}
    for i in range(len(held)):
        batch = TrainBatch.from_clips(held.batch([i]), held, "cpu")
        other = TrainBatch.from_clips(held.batch([held.other_clip(i)]), held, "cpu").latents
        for seed in range(args.seeds):
            reference = teacher_sample(teacher, batch, stream, 1000 + seed)
            mse_clean["teacher 50 steps"].append(float((reference - batch.latents).pow(2).mean()))
            pooled["teacher 50 steps"][seed].append(reference)
            for name, model in students.items():
                sample = student_sample(model, batch, stream, seed)
                mse_teacher[name].append(float((sample - reference).pow(2).mean()))
                mse_clean[name].append(float((sample - batch.latents).pow(2).mean()))
                pooled[name][seed].append(sample)
                if seed == 0:
                    swapped = student_sample(model, batch, stream, seed, reference=other)
                    zeroed = student_sample(model, batch, stream, seed, reference=torch.zeros_like(other))
                    copy[name]["swapped_to_own"].append(float((swapped - batch.latents).pow(2).mean()))
                    copy[name]["swapped_to_swapped_in"].append(float((swapped - other).pow(2).mean()))
                    copy[name]["zeroed_to_own"].append(float((zeroed - batch.latents).pow(2).mean()))
    measures = {}
    for name in pooled:
        per_seed = {"mean": [], "std": [], "diff_mean": [], "diff_std": [], "frechet_to_teacher": [],
                    "diff_frechet_to_teacher": []}
        for seed in range(args.seeds):
            ours, theirs = distribution(pooled[name][seed]), distribution(pooled["teacher 50 steps"][seed])
            per_seed["mean"].append(float(ours["vectors"].mean()))
            per_seed["std"].append(float(ours["vectors"].std()))
            per_seed["diff_mean"].append(float(ours["diffs"].mean()))
            per_seed["diff_std"].append(float(ours["diffs"].std()))
            # the teacher against itself: another seed's samples (the floor of the measure)
            if name == "teacher 50 steps":
                theirs = distribution(pooled[name][(seed + 1) % args.seeds])
            per_seed["frechet_to_teacher"].append(frechet(ours["vectors"], theirs["vectors"]))
            per_seed["diff_frechet_to_teacher"].append(frechet(ours["diffs"], theirs["diffs"]))
        measures[name] = {k: _spread(v) for k, v in per_seed.items()}
    report = {
        "what": "2-step causal student samples against the tiny teacher's 50-step samples (guidance 4.5 in the sync "
                "window) on held-back clips: per-sample latent MSE, distribution moments and Fréchet distance with "
                "their spread over seeds, and the copy risk",
        # the videos by file name and the scratch folder as WORK: the report is committed, this machine's paths are not
        "command": " ".join(["lipforcing bench-distill", *(Path(v).name for v in args.videos), "--work", "WORK",
                             "--teacher-steps",
                             str(args.teacher_steps), "--stage1-steps", str(args.stage1_steps), "--stage2-steps",
                             str(args.stage2_steps), "--seeds", str(args.seeds), "--reward-steps",
                             str(args.reward_steps)]),
        "device": "cpu",
        "held_back_clips": [c["id"] for c in held.clips],
        "seeds": args.seeds,
        "steps": {"teacher": args.teacher_steps, "stage1": args.stage1_steps, "stage2": args.stage2_steps},
        "reward": "off (no SyncNet weights without downloads)",
        "mse_to_teacher": {k: sum(v) / len(v) for k, v in mse_teacher.items()},
        "mse_to_clean_latents": {k: sum(v) / len(v) for k, v in mse_clean.items()},
        "distribution": measures,
        "distribution_note": "per seed over the pooled held-back samples; mean and std over the seeds; the teacher's "
                             "row compares it with its own samples of the next seed (the measure's floor)",
        "copy_risk": {k: {m: round(sum(v) / len(v), 5) for m, v in d.items()} for k, d in copy.items()},
        "reward_run": reward_run,
        "timings_s": {**{k: round(v, 1) for k, v in timings.items()},
                      "total_s": round(time.perf_counter() - started, 1)},
    }
    for name, value in report["mse_to_teacher"].items():
        fd = measures[name]["frechet_to_teacher"]
        print(f"{name:<40} MSE to teacher {value:.5f}   to clean latents {report['mse_to_clean_latents'][name]:.5f}"
              f"   FD {fd['mean']:.4f} +- {fd['std']:.4f}")
    if args.out:
        from ..engine.media.io import write_json

        write_json(args.out, report)
    print(json.dumps(report))
    return 0
