"""``lipforcing analyze-trajectory`` (paper §4.2): where along the teacher's sampling trajectory lip sync is decided.

The frozen bidirectional teacher samples each prepared clip from pure noise with the 50-step Euler sampler of
SPEC §2, once without classifier-free guidance (s = 1) and once with it (s = ``--guidance``, 4.5, at every step),
from the same seeded noise. At every scored step j the x0 prediction x0_j = x_j - t_j v_j (the guided one in the
CFG run) is decoded by TAEHV and scored: PSNR and SSIM against the reference frames, and the SyncNet confidence
(Sync-C) against the clip's speech. The stretch of t where guidance moves Sync-C while the fidelity is still being
formed is the sync window of stage 2 (0.556 <= t <= 0.882, SPEC §9).

    lipforcing analyze-trajectory --data DATA --teacher teacher.safetensors --preset 14b --taehv taew2_1.pth \\
        --syncnet syncnet_v2.model --clips 8 --every 2 -o trajectory.json      # also writes trajectory.png
    result = analyze_trajectory(TrajectorySettings(data="DATA", preset="tiny", steps=6, every=2))
    write_report(result, "trajectory.json")                                    # JSON + PNG plot, both atomic

Reference frames: the prepared data keeps latents, not pixels, so the reference is the TAEHV decode of the clip's
clean latents (what the decoder makes of the ground truth); PSNR / SSIM then measure the latent trajectory alone,
not the decoder's own loss. Frames are compared as uint8 RGB (``engine.quality.image``).

Sampler: grid u_j = 1 - j / steps, t_j = 5 u_j / (1 + 4 u_j), j = 0..steps (t_0 = 1 exactly, t_steps = 0); the
network is called at the grid's own t in float64, t_0 = 1.0 included (timestep 1000, as Wan's sampler; the student's
clamp to 0.999 is an inference detail of the 2-step schedule, and the time embedding is smooth there). Euler steps
x_{j+1} = x_j + (t_{j+1} - t_j) v_j run in float64; the last step lands on x0 of the last call exactly (t_steps = 0).
With guidance s: v = v_u + s (v_c - v_u), the unconditional branch with text and audio zeroed (``TrainBatch.clip``).

Networks: the teacher in the recipe's compute dtype (fp32 for tiny, bf16 for 1.3b / 14b) on full-sequence
bidirectional attention; the tiny preset without ``--teacher``, ``--taehv`` or ``--syncnet`` uses seeded random
networks (the numbers then test the plumbing, not the model). Clips are sampled one at a time; the metrics are
averaged over the first ``--clips`` clips.

JSON: {"steps", "guidance", "clips": [ids], "step": [scored j], "t": [t_j], "without_cfg": {"psnr", "ssim",
"sync_c"}, "with_cfg": {...}, "reference_sync_c", "sync_window": [0.556, 0.882], "reference", "preset", "device",
"seed"}; every list of a run has one value per scored step.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..engine.dit.config import StreamConfig
from ..engine.dit.full_sequence import FullSequenceAttention
from ..engine.errors import ConfigError, MediaError
from ..engine.media.io import atomic_output, write_json
from ..engine.quality.image import psnr, ssim_per_frame
from .batch import SampleRandom, TrainBatch
from .config import PRESETS, train_config
from .data import TrainData
from .networks import build_network
from .reward import SyncReward, load_reward
from .stage1 import shifted

_STAGE2 = train_config("stage2", "14b")
GUIDANCE: float = _STAGE2.guidance_scale
"""The teacher's guidance scale in stage 2 (4.5): the CFG run's default."""
SYNC_WINDOW: tuple[float, float] = _STAGE2.guidance_band
"""Stage 2's sync window (0.556, 0.882): shaded in the plot."""
SHIFT: float = _STAGE2.shift
REFERENCE = "taehv decode of the clean latents"
RUNS = ("without_cfg", "with_cfg")
METRICS = ("psnr", "ssim", "sync_c")


@dataclass(frozen=True, kw_only=True)
class TrajectorySettings:
    """What to analyse; the ``analyze-trajectory`` flags map onto these one to one."""

    data: str
    """A folder written by ``lipforcing prepare-data``."""
    teacher: str | None = None
    """The bidirectional teacher: a checkpoint or a training run folder (required unless the preset is tiny)."""
    preset: str = "tiny"
    """Model size: tiny, 1.3b or 14b."""
    taehv: str | None = None
    """taew2_1.pth, decodes the x0 predictions (required unless the preset is tiny)."""
    syncnet: str | None = None
    """syncnet_v2.model (required unless the preset is tiny)."""
    guidance: float = GUIDANCE
    """The CFG run's scale s, used at every step."""
    steps: int = 50
    """Size of the sampling grid (network calls per run)."""
    every: int = 1
    """Score every this many steps (the last step always)."""
    clips: int = 1
    """Analyse the first this many clips of the data and average."""
    device: str = ""
    """cuda or cpu (default: cuda when available)."""
    seed: int = 0
    """Seed of the noise (and of the tiny preset's random networks)."""

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; choose one of {PRESETS}")
        if self.steps < 1 or self.every < 1 or self.clips < 1:
            raise ConfigError(f"--steps, --every and --clips must be positive (got {self.steps}, {self.every}, "
                              f"{self.clips})")
        if not math.isfinite(self.guidance):
            raise ConfigError(f"--guidance must be a finite number, got {self.guidance}")
        if self.preset != "tiny":
            missing = [f"{flag} ({what})" for flag, value, what in (
                ("--teacher", self.teacher, "the bidirectional teacher checkpoint or run folder"),
                ("--taehv", self.taehv, "taew2_1.pth"), ("--syncnet", self.syncnet, "syncnet_v2.model"))
                if not value]
            if missing:
                raise ConfigError(f"analyze-trajectory with --preset {self.preset} needs {', '.join(missing)}")
        if not self.device:
            object.__setattr__(self, "device", "cuda" if torch.cuda.is_available() else "cpu")
        if torch.device(self.device).type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but CUDA is not available; use --device cpu")


# ---------------------------------------------------------------------------------------------------
# The sampler


def flow_grid(steps: int = 50, shift: float = SHIFT) -> torch.Tensor:
    """The sampling times [steps + 1] float64: t_j = shift u / (1 + (shift - 1) u), u = 1 - j / steps (SPEC §2)."""
    u = 1 - torch.arange(steps + 1, dtype=torch.float64) / steps
    return shifted(u, shift)


def scored_steps(steps: int, every: int) -> list[int]:
    """The steps j whose x0 prediction is scored: every ``every``-th from 0, and the last (steps - 1)."""
    return sorted(set(range(0, steps, every)) | {steps - 1})


Velocity = Callable[[torch.Tensor, float], torch.Tensor]
"""(x_t [B, 16, L, h, w] float32, t) -> flow v, same shape."""


@torch.no_grad()
def euler_trajectory(velocity: Velocity, noise: torch.Tensor, grid: torch.Tensor,
                     on_step: Callable[[int, float, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Integrate the flow from x = noise at t = grid[0] to grid[-1]; returns the final sample (float64, the shape
    of ``noise`` [B, 16, L, h, w]). ``on_step(j, t_j, x0_j)`` sees each call's x0 prediction x_j - t_j v_j (float64).
    The state is kept in float64 so that 50 small steps add no rounding drift; the network sees float32."""
    x = noise.double()
    for j in range(len(grid) - 1):
        t, t_next = float(grid[j]), float(grid[j + 1])
        v = velocity(x.float(), t).double()
        if on_step is not None:
            on_step(j, t, x - t * v)
        x = x + (t_next - t) * v
    return x


class GuidedVelocity:
    """The teacher's flow on one batch: v_u + s (v_c - v_u); with s = 1 only the conditional branch runs.
    ``guidance``: s, or a function of t giving it (stage 2's sync window: 4.5 inside, 1.0 outside)."""

    def __init__(self, model: nn.Module, batch: TrainBatch, attention: FullSequenceAttention,
                 guidance: float | Callable[[float], float]):
        self.model, self.batch, self.attention = model, batch, attention
        self.guidance = guidance if callable(guidance) else (lambda t: guidance)
        self.conditional, self.unconditional = batch.clip(True), batch.clip(False)

    def __call__(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """x [B, 16, L, h, w] float32 -> v, float64 of the same shape."""
        tt = torch.full((x.shape[0],), t, dtype=torch.float64, device=x.device)
        inputs = self.batch.inputs(x)  # [B, 65, L, h, w]
        v_c = self.model(inputs, tt, self.conditional, self.attention).double()
        s = float(self.guidance(t))
        if s == 1.0:
            return v_c
        v_u = self.model(inputs, tt, self.unconditional, self.attention).double()
        return v_u + s * (v_c - v_u)


# ---------------------------------------------------------------------------------------------------
# Scoring


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """frames [N, 3, H, W] RGB in [0, 1] -> uint8 [N, H, W, 3] (the format of ``engine.quality.image``)."""
    return (frames.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class FrameScores:
    """PSNR, SSIM and Sync-C of one clip's decoded x0 predictions against its reference frames and speech."""

    def __init__(self, reward: SyncReward, latents: torch.Tensor, wav: torch.Tensor) -> None:
        """latents [1, 16, L, h, w] the clip's clean latents; wav [1, S] its 16 kHz speech."""
        self.reward, self.wav = reward, wav
        frames = reward.frames(latents)
        self.reference = to_uint8(frames[0])  # [4L - 3, H, W, 3]
        self.reference_sync_c = float(reward.confidence(frames, wav)[0])

    def __call__(self, x0: torch.Tensor) -> dict[str, float]:
        """x0 [1, 16, L, h, w] -> {"psnr", "ssim", "sync_c"} (one decode for the three)."""
        frames = self.reward.frames(x0.float())
        pred = to_uint8(frames[0])
        return {"psnr": psnr(pred, self.reference),
                "ssim": float(ssim_per_frame(pred, self.reference, device=self.reward.device).mean()),
                "sync_c": float(self.reward.confidence(frames, self.wav)[0])}


def load_networks(settings: TrajectorySettings, device: torch.device) -> tuple[nn.Module, SyncReward]:
    """(frozen teacher in the recipe's compute dtype, SyncReward with TAEHV and SyncNet) on ``device``."""
    from .trainer import resolve_init

    dtype = torch.float32 if train_config("stage2", settings.preset).compute_dtype == "fp32" else torch.bfloat16
    teacher = build_network(settings.preset, resolve_init(settings.teacher), seed=settings.seed,
                            device=device, dtype=dtype)
    teacher.requires_grad_(False).eval()
    return teacher, load_reward(settings.preset, settings.taehv, settings.syncnet, device, seed=settings.seed,
                               formula="syncnet_python")  # the paper's metric, as lipforcing eval


# ---------------------------------------------------------------------------------------------------
# The analysis


def score_trajectory(velocity: Velocity, noise: torch.Tensor, grid: torch.Tensor, steps: list[int],
                     score: FrameScores, bar: Any = None) -> dict[str, list[float]]:
    """One sampling run; {"psnr", "ssim", "sync_c"}: one value per step of ``steps`` (scored x0 predictions).
    ``bar``: a tqdm bar advanced once per network step, or None."""
    out: dict[str, list[float]] = {m: [] for m in METRICS}

    def on_step(j: int, t: float, x0: torch.Tensor) -> None:
        if bar is not None:
            bar.update(1)
        if j in steps:
            for metric, value in score(x0).items():
                out[metric].append(value)

    euler_trajectory(velocity, noise, grid, on_step)
    return out


@torch.no_grad()
def analyze_trajectory(settings: TrajectorySettings, *, progress: bool = False) -> dict:
    """Sample and score the first ``settings.clips`` clips with and without CFG; returns the JSON document (see the
    module docstring), metrics averaged over the clips. ``progress``: a progress bar on a terminal."""
    from tqdm import tqdm

    device = torch.device(settings.device)
    data = TrainData(settings.data)
    teacher, reward = load_networks(settings, device)
    data.check_model(teacher.cfg, settings.preset)
    if settings.clips > len(data):
        raise ConfigError(f"--clips {settings.clips}: {settings.data} holds {len(data)} clip(s)")
    grid, steps = flow_grid(settings.steps), scored_steps(settings.steps, settings.every)
    stream = StreamConfig(latent_h=data.settings["latent_h"], latent_w=data.settings["latent_w"])
    runs = {"without_cfg": 1.0, "with_cfg": settings.guidance}
    per_clip: dict[str, list[dict[str, list[float]]]] = {run: [] for run in runs}
    ids, reference_sync_c = [], []
    with tqdm(total=settings.clips * len(runs) * settings.steps, desc="trajectory", unit="step",
              disable=None if progress else True) as bar:
        for i in range(settings.clips):
            batch = TrainBatch.from_clips(data.batch([i]), data, device)
            ids.append(data.clips[i]["id"])
            attention = FullSequenceAttention(teacher.cfg, stream, batch.latents.shape[2], block_causal=False,
                                              device=device)
            noise = SampleRandom(settings.seed, 0, 0, slots=[i], device=device).randn(batch.latents.shape[1:])
            score = FrameScores(reward, batch.latents, batch.wav)
            reference_sync_c.append(score.reference_sync_c)
            for run, guidance in runs.items():  # the same noise for both runs
                velocity = GuidedVelocity(teacher, batch, attention, guidance)
                per_clip[run].append(score_trajectory(velocity, noise, grid, steps, score, bar))
    mean = {run: {m: [float(v) for v in np.mean([clip[m] for clip in per_clip[run]], axis=0)] for m in METRICS}
            for run in runs}
    return {"steps": settings.steps, "guidance": settings.guidance, "clips": ids, "step": steps,
            "t": [float(grid[j]) for j in steps], **mean, "reference_sync_c": float(np.mean(reference_sync_c)),
            "sync_window": list(SYNC_WINDOW), "reference": REFERENCE, "preset": settings.preset,
            "device": str(device), "seed": settings.seed}


# ---------------------------------------------------------------------------------------------------
# Report


def plot_trajectory(result: dict, path: str | Path) -> None:
    """Three panels (PSNR, SSIM, Sync-C) over t from 1 to 0, both runs, the sync window shaded; written atomically.
    Uses matplotlib's Agg canvas directly: no global backend switch, no display needed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, 1, sharex=True)
    labels = {"without_cfg": "without CFG", "with_cfg": f"with CFG (s = {result['guidance']:g})"}
    titles = {"psnr": "PSNR of x0 (dB)", "ssim": "SSIM of x0", "sync_c": "Sync-C of x0"}
    lo, hi = result["sync_window"]
    for ax, metric in zip(axes, METRICS):
        ax.axvspan(lo, hi, color="tab:orange", alpha=0.15, label=f"sync window {lo:g} <= t <= {hi:g}")
        for run, style in zip(RUNS, ("o-", "s--")):
            ax.plot(result["t"], result[run][metric], style, markersize=3, label=labels[run])
        if metric == "sync_c":
            line = ax.axhline(result["reference_sync_c"], color="gray", linestyle=":",
                              label="Sync-C of the reference frames")
            ax.legend(handles=[line], fontsize=8)
        ax.set_ylabel(titles[metric])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[-1].set_xlim(1.0, 0.0)
    axes[-1].set_xlabel("t (sampling runs from 1 to 0)")
    axes[0].set_title(f"teacher trajectory, {result['steps']} steps, {len(result['clips'])} clip(s), "
                      f"{result['preset']}")
    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    except OSError as exc:
        raise MediaError(f"{path}: cannot write ({exc})") from None


def report_paths(output: str | Path) -> tuple[Path, Path]:
    """(the JSON, the plot next to it): OUT.json -> OUT.png."""
    output = Path(output)
    if output.suffix != ".json":
        raise ConfigError(f"-o {output}: give a .json path (the plot goes next to it as .png)")
    return output, output.with_suffix(".png")


def write_report(result: dict, output: str | Path) -> tuple[Path, Path]:
    """Write the JSON to ``output`` and the plot next to it; returns both paths."""
    json_path, png_path = report_paths(output)
    write_json(json_path, result)
    plot_trajectory(result, png_path)
    return json_path, png_path


def format_table(result: dict) -> str:
    """A short fixed-width table: one row per scored step, both runs."""
    lines = [f"{'step':>4} {'t':>6}  {'PSNR':>6} {'SSIM':>6} {'Sync-C':>6} | {'PSNR':>6} {'SSIM':>6} {'Sync-C':>6}",
             f"{'':>11}  {'without CFG':^20} | {'with CFG s = ' + format(result['guidance'], 'g'):^20}"]
    for k, (j, t) in enumerate(zip(result["step"], result["t"])):
        cells = [f"{result[run][m][k]:6.3f}" if m == "ssim" else f"{result[run][m][k]:6.2f}"
                 for run in RUNS for m in METRICS]
        lines.append(f"{j:>4} {t:6.4f}  {' '.join(cells[:3])} | {' '.join(cells[3:])}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Command line

def trajectory_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``lipforcing analyze-trajectory`` (one per ``TrajectorySettings`` field, and -o)."""
    p.add_argument("--data", required=True, metavar="DIR", help="a folder written by lipforcing prepare-data")
    p.add_argument("--teacher", default=None, metavar="CKPT|RUN",
                   help="the bidirectional teacher (required unless --preset tiny, which may use random weights)")
    p.add_argument("--preset", default="tiny", choices=list(PRESETS), help="model size (default tiny)")
    p.add_argument("--taehv", default=None, help="taew2_1.pth, decodes the x0 predictions")
    p.add_argument("--syncnet", default=None, help="syncnet_v2.model, scores lip sync")
    p.add_argument("--guidance", type=float, default=GUIDANCE, help=f"CFG scale of the guided run (default {GUIDANCE})")
    p.add_argument("--steps", type=int, default=50, help="sampling grid size (default 50)")
    p.add_argument("--every", type=int, default=1, help="score every K-th step, and the last (default 1)")
    p.add_argument("--clips", type=int, default=1, help="average over the first N clips (default 1)")
    p.add_argument("--device", default="", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("-o", "--output", required=True, metavar="OUT.json", help="the JSON; the plot goes to OUT.png")
    p.set_defaults(run=run_analyze_trajectory)


def settings_from_args(args: argparse.Namespace) -> TrajectorySettings:
    return TrajectorySettings(data=args.data, teacher=args.teacher, preset=args.preset, taehv=args.taehv,
                              syncnet=args.syncnet, guidance=args.guidance, steps=args.steps, every=args.every,
                              clips=args.clips, device=args.device, seed=args.seed)


def run_analyze_trajectory(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    report_paths(args.output)  # a bad -o fails before the sampling, not after
    result = analyze_trajectory(settings, progress=True)
    json_path, png_path = write_report(result, args.output)
    print(format_table(result))
    print(f"reference Sync-C {result['reference_sync_c']:.2f} ({REFERENCE}); sync window "
          f"{SYNC_WINDOW[0]:g} <= t <= {SYNC_WINDOW[1]:g}")
    print(f"wrote {json_path} and {png_path}")
    return 0
