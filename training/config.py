"""What a training run does: the recipe of SPEC §9 as frozen dataclasses with named presets.

    cfg = train_config("stage1", "1.3b")                  # the recipe's values for that model
    cfg = train_config("stage2", "tiny", overrides={"steps": 20})
    cfg = load_config_file("my.json", base=cfg)           # --config FILE: any field, by name

Stages:
    teacher   plain flow matching of the bidirectional network (the teacher of the mini-distillation; the released
              teacher is the 14B Lip Forcing teacher, trained outside this recipe)
    stage1    diffusion forcing of the block-causal student (SPEC §9 stage 1)
    stage2    Self-Forcing DMD with the sync-window CFG and the SyncNet reward (SPEC §9 stage 2)

The 1.3b and 14b presets use the recipe's numbers. The tiny preset (random-weight networks, CPU tests) keeps
every rule and only changes sizes that make a CPU run of a few dozen steps meaningful: a larger learning rate,
LoRA rank 16, batch 2.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..engine.errors import ConfigError

STAGES = ("teacher", "stage1", "stage2")
PRESETS = ("tiny", "1.3b", "14b")
LORA_INITS = ("continue", "fresh")
REWARD_SYNC_C = ("release", "syncnet_python")
WINDOW_SINK_PAIRS = ((7, 1), (10, 1), (13, 1), (9, 3), (12, 3))
"""The (window, sink) pairs stage 1 draws from (SPEC §9)."""


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """LoRA of the trained networks (peft), and what is trained in full beside it."""

    enabled: bool = True
    """False: every parameter is trained (the teacher, or a small model)."""
    rank: int = 128
    alpha: float = 64.0
    target_modules: tuple[str, ...] = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                                       "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o",
                                       "ffn.0", "ffn.2")
    """Linear layers of every block that get LoRA adapters (names inside a block)."""
    fully_trained: tuple[str, ...] = ("patch_embedding", "audio_proj", "audio_cond_projs")
    """Top-level modules trained in full (SPEC §9: the audio modules and the patch embedding)."""
    init: str = "continue"
    """continue (the release, ``merge_lora=False``): the init's adapter A/B are loaded and trained on (a training
    run folder as ``--init``, or a checkpoint holding ``<module>.lora_A.weight`` / ``lora_B.weight`` beside its base
    weights); an init without an adapter starts a fresh one, and the log says so. fresh: the init's weights are
    merged and a new adapter (B = 0) is injected."""

    def __post_init__(self) -> None:
        if self.init not in LORA_INITS:
            raise ConfigError(f"lora.init must be one of {LORA_INITS}, got {self.init!r}")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training run. Every field maps to a key of ``--config FILE``."""

    stage: str
    preset: str
    steps: int
    """Optimiser iterations (SPEC: 5000 for stage 1, 600 for stage 2)."""
    lr: float
    betas: tuple[float, float]
    weight_decay: float = 0.01
    grad_clip: float = 10.0
    batch: int = 16
    """Effective (global) batch: samples per iteration over all processes and accumulation steps."""
    micro_batch: int = 1
    """Samples per forward/backward on one process; batch / (micro_batch x processes) accumulation steps."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    compute_dtype: str = "bf16"
    """bf16 (weights kept in fp32 as master copies, FSDP2 casts for compute) or fp32."""
    activation_checkpointing: bool = True
    seed: int = 0
    release_iterations: bool = True
    """As the release's trainer: iterations are numbered from 1 and run while below ``steps`` (``steps`` - 1
    optimiser iterations: 599 for 600), so stage 2's first student update is at iteration ``critic_ratio`` after
    that many - 1 critic updates. False: ``steps`` iterations, the student also at the first."""
    save_every: int = 100
    """Write a resumable checkpoint every this many steps (and always at the end)."""
    # stage 1 (diffusion forcing)
    chunk_t: tuple[float, ...] = (0.999, 0.769, 0.0)
    """Per-chunk time drawn uniformly from these (SPEC §9)."""
    window_sink_pairs: tuple[tuple[int, int], ...] = WINDOW_SINK_PAIRS
    # stage 2 (Self-Forcing DMD)
    rollout_chunks: int = 7
    guidance_scale: float = 4.5
    guidance_band: tuple[float, float] = (0.556, 0.882)
    """DMD times t in this band get the teacher's guidance; outside it the scale is 1.0."""
    dmd_u_range: tuple[float, float] = (0.001, 0.999)
    """u ~ U(range), t = shift u / (1 + (shift - 1) u)."""
    dmd_t_clamp: tuple[float, float] | None = (0.001, 0.999)
    """The DMD t is clamped to this range after the shift (the release's ``safe_clamp``: 0.4 % of draws land on
    0.999); None: no clamp."""
    rollout_noise_scale: float = 0.999
    """The rollout's initial noise is scaled by this (the release: sigma(max_t) = 0.999); 1.0: plain noise."""
    exit_step_per: str = "rollout"
    """rollout (the release): every rollout call (one micro-batch of one phase) draws its exit step, shared by its
    chunks and samples; step: one draw per iteration for every rollout of both phases."""
    shift: float = 5.0
    """The Wan time shift of SPEC §2: DMD times (stage 2) and the teacher's training times."""
    critic_ratio: int = 5
    """The critic updates every iteration, the student at iterations divisible by ``critic_ratio``. On those the
    critic's gradients and the student's are computed before either network steps (the release's combined step):
    the critic trains on the rollout of the student before its update, the student's loss sees the critic before
    its update."""
    critic_grad_scale_on_student_steps: float = 4.0
    """The release does not divide the critic's backward by its 4 accumulation rounds on student iterations (its
    released checkpoints were trained so): the critic's gradient there is this times the batch mean. 1.0: the
    batch mean, as on the other iterations."""
    clip_critic: bool = False
    """The release clips only the student's gradient (``grad_clip``); True clips the critic's too."""
    reward_scale: float = 2.0
    """The generator loss is weighted by exp(reward_scale x r), r the SyncNet confidence of the rollout."""
    reward: bool = True
    """False: no SyncNet reward (weight 1)."""
    reward_sync_c: str = "release"
    """How the reward computes Sync-C: release (``sync_c_scorer``: speech x 32768 unrounded, distances averaged over
    the overlapping windows at each shift, frames truncated to uint8) or syncnet_python (``lipforcing eval``'s
    protocol: x 32767 rounded, zero-padded table)."""
    copy_check_every: int = 0
    """Every this many iterations (0: never) log ``copy_gap``: the student's loss on its batch with the reference
    channels taken from another clip, minus its loss with its own (see ``copy_risk``)."""
    # teacher (flow matching)
    cond_dropout: float = 0.1
    """Fraction of samples whose audio and text are zeroed, so that the unconditional branch is learned."""

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ConfigError(f"unknown stage {self.stage!r}; choose one of {STAGES}")
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; choose one of {PRESETS}")
        if self.steps < 1 or self.batch < 1 or self.micro_batch < 1:
            raise ConfigError(f"steps, batch and micro_batch must be positive (got {self.steps}, {self.batch}, "
                              f"{self.micro_batch})")
        if self.batch % self.micro_batch:
            raise ConfigError(f"batch {self.batch} is not a multiple of micro_batch {self.micro_batch}")
        if self.exit_step_per not in ("rollout", "step"):
            raise ConfigError(f"exit_step_per must be rollout or step, got {self.exit_step_per!r}")
        if self.reward_sync_c not in REWARD_SYNC_C:
            raise ConfigError(f"reward_sync_c must be one of {REWARD_SYNC_C}, got {self.reward_sync_c!r}")
        if self.release_iterations and self.steps < 2:
            raise ConfigError("steps counts as the release's max_iter (iterations 1 .. steps - 1): give at least 2, "
                              "or set release_iterations to false")
        if self.compute_dtype not in ("bf16", "fp32"):
            raise ConfigError(f"compute_dtype must be bf16 or fp32, got {self.compute_dtype!r}")

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def iterations(self) -> int:
        """Optimiser iterations a whole run makes (``steps`` - 1 with ``release_iterations``)."""
        return self.steps - 1 if self.release_iterations else self.steps

    def student_updates_at(self, step: int) -> bool:
        """Stage 2: whether 0-based step ``step`` updates the student (iteration ``step + 1`` divisible by
        ``critic_ratio`` with ``release_iterations``, else iterations 1, 1 + ratio, ...)."""
        iteration = step + 1
        return (iteration if self.release_iterations else iteration - 1) % self.critic_ratio == 0


_RECIPE = {
    "teacher": dict(steps=2000, lr=1e-4, betas=(0.9, 0.999), lora=LoraConfig(enabled=False)),
    "stage1": dict(steps=5000, lr=1e-5, betas=(0.9, 0.999)),
    "stage2": dict(steps=600, lr=2e-6, betas=(0.0, 0.999)),
}
_TINY = {
    "teacher": dict(steps=200, lr=2e-3, batch=2),
    "stage1": dict(steps=40, lr=1e-3, batch=2, lora=LoraConfig(rank=16, alpha=16.0)),
    "stage2": dict(steps=10, lr=2e-4, batch=1, lora=LoraConfig(rank=16, alpha=16.0)),
}


def train_config(stage: str, preset: str, overrides: dict | None = None) -> TrainConfig:
    """The recipe's config for ``stage`` and ``preset``, with ``overrides`` (field -> value) applied."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; choose one of {STAGES}")
    values = dict(_RECIPE[stage])
    if preset == "tiny":
        values.update(_TINY[stage], compute_dtype="fp32", activation_checkpointing=False, save_every=20)
    values.update(overrides or {})
    return TrainConfig(stage=stage, preset=preset, **values)


def from_json(data: dict) -> TrainConfig:
    """A config from its ``to_json`` form (lists become tuples, the LoRA block a LoraConfig)."""
    data = dict(data)
    lora = data.pop("lora", None)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown training config keys {unknown}; known: {sorted(known)}")
    values = {k: _tuples(v) for k, v in data.items()}
    if lora is not None:
        lora_known = {f.name for f in dataclasses.fields(LoraConfig)}
        bad = sorted(set(lora) - lora_known)
        if bad:
            raise ConfigError(f"unknown lora keys {bad}; known: {sorted(lora_known)}")
        values["lora"] = LoraConfig(**{k: _tuples(v) for k, v in lora.items()})
    return TrainConfig(**values)


def load_config_file(path: str | Path, base: TrainConfig) -> TrainConfig:
    """``--config FILE``: a JSON object of fields (``lora`` as an object) laid over ``base``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a training config is a JSON object of fields")
    merged = base.to_json()
    lora = merged.pop("lora")
    lora.update(data.pop("lora", {}) or {})
    merged.update(data)
    merged["lora"] = lora
    return from_json(merged)


def _tuples(value):
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value
