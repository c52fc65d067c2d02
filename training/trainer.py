"""The training loop: one entry point for one process and for ``torchrun`` (FSDP2), with exact resume.

    run = TrainRun(cfg, data_dir, out_dir, inits=Inits(init="teacher.safetensors"))
    run.train()                       # resumes from OUT's latest checkpoint when there is one

Processes: under ``torchrun`` (WORLD_SIZE set) the process group is NCCL on CUDA and gloo on the CPU; a single
process runs the same code with a group of one. Every network is sharded with FSDP2 (``fully_shard`` per block,
then the root): parameters, gradients and optimiser states live in shards, a block's weights are gathered only
for its own forward; with ``compute_dtype`` bf16 the trained parameters keep fp32 master copies and FSDP2 casts
them to bf16 for compute (gradients reduced in fp32), frozen weights are stored in bf16. Activation
checkpointing recomputes each block in the backward pass.

A step consumes ``batch`` samples (global slots step x batch ...), split over the processes and, inside each,
into micro-batches of ``micro_batch`` (gradient accumulation). Every random draw is a function of (seed, step,
slot) (training.batch), so one process and N processes compute the same step.

Checkpoints (``OUT/checkpoints/step-NNNNNNNN``, torch.distributed.checkpoint, sharded): the trained parameters
(frozen weights are rebuilt from the recorded init), the optimisers, the step (which fixes the data position)
and every process's RNG state; written under a temporary name and renamed, ``OUT/latest`` names the newest.
``OUT/log.jsonl`` gets one JSON object per step (``step``, ``loss``, ...); ``OUT/run.json`` records the config,
the data and the init weights.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..engine.dit.config import ModelConfig, StreamConfig
from ..engine.errors import ConfigError
from ..engine.media.io import atomic_output, write_json
from .batch import SampleRandom, TrainBatch
from .config import TrainConfig, from_json
from .data import TrainData
from .networks import build_network

log = logging.getLogger("lipforcing")

RUN_FORMAT = "lipforcing-train-run/1"
PHASE_INDEX = {"student": 0, "critic": 1, "teacher": 2}


@dataclass(frozen=True)
class Inits:
    """Where the networks' weights come from (any checkpoint the engine reads, or a training run folder)."""

    init: str | None = None
    """The trained network: the teacher for stage 1 (or a student), the stage-1 run or export for stage 2."""
    teacher: str | None = None
    """Stage 2: the frozen bidirectional teacher."""
    critic: str | None = None
    """Stage 2: the critic's starting weights (default: the teacher's)."""
    taehv: str | None = None
    """Stage 2: TAEHV weights for the reward's decoding (tiny preset: random)."""
    syncnet: str | None = None
    """Stage 2: ``syncnet_v2.model`` for the reward (tiny preset: random)."""

    def source(self, stage: str, network: str, seed: int) -> tuple[str | None, int]:
        """(init weights, seed of random weights and LoRA) of ``network`` in a ``stage`` run: the network a stage
        trains starts from ``init``; stage 2's frozen teacher from ``teacher`` and its critic from ``critic`` (else
        the teacher), both with seed + 1 (so a tiny run's random critic starts as its random teacher)."""
        if stage != "stage2" or network == "student":
            return self.init, seed
        return (self.critic or self.teacher if network == "critic" else self.teacher), seed + 1


@dataclass(frozen=True)
class Processes:
    rank: int
    world: int
    device: torch.device
    owns_group: bool


def start_processes(device: str | None) -> Processes:
    """Join torchrun's process group (or make a group of one); pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but CUDA is not available")
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if world > 1:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        owns = True
    return Processes(rank=dist.get_rank(), world=dist.get_world_size(), device=dev, owns_group=owns)


def shard(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """FSDP2: each block, then the root; bf16 compute with fp32 reduction when ``compute_dtype`` is bf16."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy()
    if cfg.compute_dtype == "bf16":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    model.activation_checkpointing = cfg.activation_checkpointing
    return model


class TrainRun:
    """One run folder: builds the networks of ``cfg.stage``, trains ``cfg.iterations`` steps, checkpoints,
    resumes."""

    def __init__(self, cfg: TrainConfig, data_dir: str | Path, out_dir: str | Path, *, inits: Inits = Inits(),
                 device: str | None = None, tensorboard: bool = False, progress: bool = True) -> None:
        self.cfg, self.out = cfg, Path(out_dir)
        self.data_dir = Path(data_dir)
        self.inits = inits
        self.tensorboard, self.progress = tensorboard, progress
        self.data = TrainData(self.data_dir)
        self.data.check_model(ModelConfig.from_name(cfg.preset), cfg.preset)
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"{self.out} exists and is not a folder")
        self.procs = start_processes(device)
        self._check_batch()
        self._permutation: tuple[int, torch.Tensor] | None = None
        s = self.data.settings
        self.stream = StreamConfig(latent_h=s["latent_h"], latent_w=s["latent_w"])
        self._check_run_record()
        self.objective = self._build_objective()
        self.optimizers = {
            name: torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=cfg.lr, betas=cfg.betas,
                                    weight_decay=cfg.weight_decay)
            for name, net in self.objective.trained.items()
        }

    # --- set-up ---------------------------------------------------------------------------------------------

    def _check_batch(self) -> None:
        world = self.procs.world
        c = self.cfg
        if c.batch % world or (c.batch // world) % c.micro_batch:
            raise ConfigError(f"batch {c.batch} must split into {world} processes x micro-batches of {c.micro_batch}")

    def _run_record(self) -> dict:
        return {"format": RUN_FORMAT, "config": self.cfg.to_json(), "data": str(self.data_dir.resolve()),
                "inits": {k: (str(Path(v).resolve()) if v else None) for k, v in vars(self.inits).items()}}

    def _check_run_record(self) -> None:
        """A new folder gets run.json; an existing run must be the same run (then it resumes). Process 0 decides
        and every process gets its verdict (no process is left waiting for one that stopped)."""
        problem = None
        if self.procs.rank == 0:
            path = self.out / "run.json"
            record = json.loads(json.dumps(self._run_record()))  # as it reads back (tuples become lists)
            if path.exists():
                old = json.loads(path.read_text())
                mine = dict(record, config={**record["config"], "steps": None})
                theirs = dict(old, config={**old["config"], "steps": None})
                if mine != theirs:
                    problem = (f"{self.out} holds a different run (its run.json differs); choose another --out or "
                               "remove it")
            if problem is None:
                self.out.mkdir(parents=True, exist_ok=True)
                write_json(path, record)
        verdict = [problem]
        dist.broadcast_object_list(verdict, src=0)
        if verdict[0] is not None:
            raise ConfigError(verdict[0])

    def _trained(self, network: str) -> nn.Module:
        init, seed = self.inits.source(self.cfg.stage, network, self.cfg.seed)
        from .export import network_from_init

        model = network_from_init(self.cfg.preset, init, self.cfg.lora, seed=seed, device=self.procs.device)
        return shard(model, self.cfg)

    def _build_objective(self):
        cfg, inits = self.cfg, self.inits
        if cfg.stage == "teacher":
            from .stage1 import FlowMatching

            return FlowMatching(cfg, self._trained("teacher"), self.stream)
        if cfg.stage == "stage1":
            from .stage1 import DiffusionForcing

            return DiffusionForcing(cfg, self._trained("student"), self.stream)
        from .reward import load_reward
        from .stage2 import SelfForcingDMD

        if cfg.preset != "tiny" and not inits.teacher:
            raise ConfigError("stage 2 needs the frozen teacher: --teacher CHECKPOINT")
        init, seed = inits.source(cfg.stage, "teacher", cfg.seed)
        teacher = build_network(cfg.preset, resolve_init(init), seed=seed, device=self.procs.device)
        teacher = shard(teacher.requires_grad_(False), cfg).eval()
        reward = None
        if cfg.reward:
            try:
                reward = load_reward(cfg.preset, inits.taehv, inits.syncnet, self.procs.device,
                                     formula=cfg.reward_sync_c)
            except ConfigError as exc:
                raise ConfigError(f"{exc}; or train without it: --no-reward") from None
        return SelfForcingDMD(cfg, self._trained("student"), teacher, self._trained("critic"), self.stream, reward)

    # --- data -----------------------------------------------------------------------------------------------

    def clip_index(self, slot: int) -> int:
        """The data set's clip at global sample slot ``slot``: epochs of seeded permutations (the current epoch's
        is kept)."""
        n = len(self.data)
        epoch, i = divmod(slot, n)
        if self._permutation is None or self._permutation[0] != epoch:
            generator = torch.Generator().manual_seed(self.cfg.seed * 7919 + epoch)
            self._permutation = (epoch, torch.randperm(n, generator=generator))
        return int(self._permutation[1][i])

    def micro_batches(self, step: int) -> list[range]:
        """This process's micro-batches of step ``step``: ranges of global sample slots."""
        per_rank = self.cfg.batch // self.procs.world
        first = step * self.cfg.batch + self.procs.rank * per_rank
        m = self.cfg.micro_batch
        return [range(s, s + m) for s in range(first, first + per_rank, m)]

    # --- the loop -------------------------------------------------------------------------------------------

    def train_step(self, step: int) -> dict:
        """Run step ``step`` (0-based; iteration ``step + 1``): every phase of the objective computes its gradients
        over its micro-batches, then each phase's network is clipped (the critic only with ``clip_critic``) and
        steps. No network steps before every phase has its gradients (the release's combined step). Returns the
        logged record (losses averaged over the global batch)."""
        cfg = self.cfg
        record: dict = {"step": step + 1}
        record.update(self.objective.begin_step(step))
        phases = self.objective.phases_at(step)
        for phase in phases:
            net, opt = self.objective.trained[phase], self.optimizers[phase]
            opt.zero_grad(set_to_none=True)
            scale = self.procs.world / cfg.batch  # FSDP averages over processes: the global batch mean
            if phase == "critic" and "student" in phases:
                scale *= cfg.critic_grad_scale_on_student_steps
            total = torch.zeros((), dtype=torch.float64)
            infos: dict[str, float] = {}  # per-sample means of what the loss reports, summed over this process
            for slots in self.micro_batches(step):
                clips = self.data.batch([self.clip_index(s) for s in slots])
                batch = TrainBatch.from_clips(clips, self.data, self.procs.device)
                rng = SampleRandom(cfg.seed, step, PHASE_INDEX[phase], slots, self.procs.device)
                per_sample, info = self.objective.loss(phase, batch, rng)
                (per_sample.sum() * scale).backward()
                total += per_sample.detach().double().sum().cpu()
                for k, v in info.items():
                    infos[k] = infos.get(k, 0.0) + v * len(slots)
            sums = torch.tensor([float(total), *infos.values()], dtype=torch.float64)
            dist.all_reduce(sums)  # every process's samples: the global batch
            loss = float(sums[0]) / cfg.batch
            if not math.isfinite(loss):
                raise FloatingPointError(f"step {step + 1}: the {phase} loss is {loss}")
            record[f"{phase}_loss"] = loss
            record.update({k: float(v) / cfg.batch for k, v in zip(infos, sums[1:])})
        for phase in phases:
            net = self.objective.trained[phase]
            # FSDP2 leaves a root group unsharded after a forward without backward (the student phase's no-grad
            # critic call): its module then lists the unsharded parameters, not the sharded ones that hold the
            # gradients and that the optimiser steps, and clipping would miss them
            net.reshard()
            clip = cfg.grad_clip if phase != "critic" or cfg.clip_critic else math.inf
            norm = torch.nn.utils.clip_grad_norm_([p for p in net.parameters() if p.requires_grad], clip)
            record[f"{phase}_grad_norm"] = float(_full(norm))
            self.optimizers[phase].step()
        # "loss" is the student's (the generator's in stage 2) where it trained this step, else the phase's
        record["loss"] = record.get("student_loss", record[f"{phases[-1]}_loss"])
        if cfg.copy_check_every and (step + 1) % cfg.copy_check_every == 0:
            record.update(self.copy_check(step))
        return record

    def copy_check(self, step: int) -> dict:
        """The copy-risk metric (``training.copy_risk``) on this step's first micro-batch of this process, averaged
        over the processes."""
        from .copy_risk import copy_losses

        slots = self.micro_batches(step)[0]
        indices = [self.clip_index(s) for s in slots]
        batch = TrainBatch.from_clips(self.data.batch(indices), self.data, self.procs.device)
        others = [self.data.other_clip(i) for i in indices]
        other = TrainBatch.from_clips(self.data.batch(others), self.data, self.procs.device)
        student = self.objective.trained.get("student") or self.objective.trained["teacher"]
        losses = copy_losses(student, self.stream, batch, other.latents, self.cfg,
                             SampleRandom(self.cfg.seed, step, 3, slots, self.procs.device))
        student.reshard()  # as after the phases: the sharded parameters registered again
        values = torch.tensor([float(v.mean()) for v in losses.values()], dtype=torch.float64)
        dist.all_reduce(values)
        values /= self.procs.world
        out = {f"copy_{k}": float(v) for k, v in zip(losses, values)}
        out["copy_gap"] = out["copy_swapped"] - out["copy_own"]
        return out

    def train(self) -> list[dict]:
        """Train from the latest checkpoint (or the start) through ``cfg.iterations`` iterations (as the release counts
        them with ``release_iterations``: 1 .. steps - 1); returns this call's log records."""
        start = self.resume()
        rank0 = self.procs.rank == 0
        writer = self._tensorboard() if rank0 and self.tensorboard else None
        bar = None
        if rank0 and self.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.cfg.iterations, initial=start, desc=f"train {self.cfg.stage}", unit="step",
                       file=sys.stderr, dynamic_ncols=True)
        records = []
        try:
            for step in range(start, self.cfg.iterations):
                t0 = time.perf_counter()
                record = self.train_step(step)
                record["seconds"] = round(time.perf_counter() - t0, 4)
                records.append(record)
                if rank0:
                    with open(self.out / "log.jsonl", "a") as f:
                        f.write(json.dumps(record) + "\n")
                    if writer is not None:
                        for k, v in record.items():
                            if k != "step" and isinstance(v, (int, float)):
                                writer.add_scalar(k, v, step + 1)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{record['loss']:.4g}")
                if (step + 1) % self.cfg.save_every == 0 or step + 1 == self.cfg.iterations:
                    self.save(step + 1)
        finally:
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
        return records

    def _tensorboard(self):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise ConfigError("--tensorboard needs tensorboardX: pip install 'lipforcing[train]'") from None
        return SummaryWriter(str(self.out / "tensorboard"))

    # --- checkpoints ----------------------------------------------------------------------------------------

    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        options = StateDictOptions(ignore_frozen_params=True)
        state = {}
        for name, net in self.objective.trained.items():
            model_sd, optim_sd = get_state_dict(net, self.optimizers[name], options=options)
            state[f"model.{name}"] = model_sd
            state[f"optim.{name}"] = optim_sd
        return state

    def save(self, steps_done: int) -> Path:
        """A sharded checkpoint of everything a resume needs after ``steps_done`` steps."""
        import torch.distributed.checkpoint as dcp

        folder = self.out / "checkpoints" / f"step-{steps_done:08d}"
        tmp = folder.with_name(folder.name + ".partial")
        if self.procs.rank == 0 and tmp.exists():
            shutil.rmtree(tmp)
        dist.barrier()
        dcp.save(self._state(), checkpoint_id=str(tmp))
        torch.save({"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state() if self.procs.device.type == "cuda" else None},
                   tmp / f"rng-rank{self.procs.rank}.pt")
        dist.barrier()
        if self.procs.rank == 0:
            (tmp / "trainer.json").write_text(json.dumps({"step": steps_done, "world": self.procs.world,
                                                          "samples_seen": steps_done * self.cfg.batch}))
            if folder.exists():
                shutil.rmtree(folder)
            tmp.rename(folder)
            with atomic_output(self.out / "latest") as pointer:
                pointer.write_text(folder.name)
        dist.barrier()
        return folder

    def resume(self) -> int:
        """Load OUT's latest checkpoint, if any; returns the number of steps already done. The log keeps only the
        steps up to the checkpoint (a crash after it leaves records the resumed run writes again)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        folder = latest_checkpoint(self.out)
        if folder is None:
            if self.procs.rank == 0:
                (self.out / "log.jsonl").unlink(missing_ok=True)
            dist.barrier()
            return 0
        state = self._state()
        dcp.load(state, checkpoint_id=str(folder))  # fails when the checkpoint lacks a trained tensor
        options = StateDictOptions(ignore_frozen_params=True, strict=False)  # frozen weights come from the init
        for name, net in self.objective.trained.items():
            set_state_dict(net, self.optimizers[name], model_state_dict=state[f"model.{name}"],
                           optim_state_dict=state[f"optim.{name}"], options=options)
        meta = json.loads((folder / "trainer.json").read_text())
        rng = folder / f"rng-rank{self.procs.rank}.pt"
        if rng.exists():
            saved = torch.load(rng, weights_only=True)
            torch.set_rng_state(saved["cpu"])
            if saved["cuda"] is not None and self.procs.device.type == "cuda":
                torch.cuda.set_rng_state(saved["cuda"])
        steps = int(meta["step"])
        if self.procs.rank == 0:
            _truncate_log(self.out / "log.jsonl", steps)
            log.warning("resuming %s from step %d (%s)", self.out, steps, folder.name)
        dist.barrier()
        return steps

    def close(self) -> None:
        if self.procs.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def latest_checkpoint(out: Path) -> Path | None:
    pointer = out / "latest"
    if not pointer.exists():
        return None
    folder = out / "checkpoints" / pointer.read_text().strip()
    return folder if (folder / "trainer.json").exists() else None


def read_run(run_dir: str | Path) -> tuple[TrainConfig, dict]:
    """(config, run record) of a training run folder."""
    path = Path(run_dir) / "run.json"
    if not path.exists():
        raise ConfigError(f"{run_dir}: not a training run (no run.json)")
    record = json.loads(path.read_text())
    if record.get("format") != RUN_FORMAT:
        raise ConfigError(f"{path}: format {record.get('format')!r}, expected {RUN_FORMAT!r}")
    return from_json(record["config"]), record


def resolve_init(init: str | None) -> str | None:
    """A training run folder as --init: its trained network at its latest checkpoint, exported once into the run
    folder (``export/step-N.safetensors``: a run that trained further exports again)."""
    if init is None or not (Path(init) / "run.json").exists():
        return init
    from .export import export_run

    folder = latest_checkpoint(Path(init))
    if folder is None:
        raise ConfigError(f"{init}: the run has no checkpoint yet to start from")
    target = Path(init) / "export" / f"{folder.name}.safetensors"
    if not target.exists() and (not dist.is_initialized() or dist.get_rank() == 0):
        export_run(init, target)
    if dist.is_initialized():
        dist.barrier()
    return str(target)


def _truncate_log(path: Path, steps: int) -> None:
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= steps]
    with atomic_output(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept))


def _full(x) -> torch.Tensor:
    """A DTensor's full value (clip_grad_norm_ of sharded parameters returns one)."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x
