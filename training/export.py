"""``lipforcing train export``: a training run's network as one checkpoint the engine loads.

    export_run("runs/stage2", "student.safetensors", dtype=torch.bfloat16)
    # then: lipforcing run VIDEO --model <preset> --ckpt student.safetensors -o out.mp4

The network is rebuilt from the run's recorded init weights, its trained parameters are read from the run's
latest checkpoint (torch.distributed.checkpoint, any number of shards, read in one process), every LoRA adapter
is merged into its base weight and the tensors are written under the released key names (SPEC §10) to a
temporary file that is renamed when complete.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..engine.errors import ConfigError
from ..engine.media.io import atomic_output
from .config import LoraConfig
from .networks import ADAPTER, released_state_dict, trainable_network

NETWORK_OF_STAGE = {"teacher": "teacher", "stage1": "student", "stage2": "student"}


def network_from_init(preset: str, init: str | None, lora: LoraConfig, *, seed: int,
                      device: torch.device | str = "cpu"):
    """The network a run trains, from ``init`` (a checkpoint or a training run folder). With LoRA and
    ``lora.init`` continue a run folder's network is taken as it trained, adapters unmerged, and its A/B (and its
    fully trained modules) train on; otherwise the run's latest weights are merged (``resolve_init``) and
    ``trainable_network`` builds on them."""
    from .trainer import resolve_init

    if not (lora.enabled and lora.init == "continue" and init is not None and (Path(init) / "run.json").exists()):
        return trainable_network(preset, resolve_init(init), lora, seed=seed, device=device)
    _, model = trained_network(init)
    if not any(ADAPTER in getattr(m, "lora_A", {}) for m in model.modules()):
        return trainable_network(preset, resolve_init(init), lora, seed=seed, device=device)
    ranks = {m.lora_A[ADAPTER].weight.shape[0] for m in model.modules() if ADAPTER in getattr(m, "lora_A", {})}
    if ranks != {lora.rank}:
        raise ConfigError(f"{init}: its adapter has rank {sorted(ranks)}, this run's lora.rank is {lora.rank}; set "
                          "lora.rank to the adapter's, or lora.init to fresh")
    model.requires_grad_(False)
    for name, p in model.named_parameters():
        if ".lora_" in name or name.split(".")[0] in lora.fully_trained:
            p.requires_grad_(True)
    return model.to(device).train()


def trained_network(run_dir: str | Path, network: str | None = None):
    """(network name, the run's network with its latest trained weights, on the CPU, fp32)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    from .trainer import Inits, latest_checkpoint, read_run

    run_dir = Path(run_dir)
    cfg, record = read_run(run_dir)
    own = NETWORK_OF_STAGE[cfg.stage]
    name = network or own
    if name not in (own, "critic") or (name == "critic" and cfg.stage != "stage2"):
        raise ConfigError(f"a {cfg.stage} run trains '{own}'" + (" and 'critic'" if cfg.stage == "stage2" else "")
                          + f", not {name!r}")
    folder = latest_checkpoint(run_dir)
    if folder is None:
        raise ConfigError(f"{run_dir}: the run has no checkpoint yet (it writes one every {cfg.save_every} steps "
                          "and at the end)")
    init, seed = Inits(**record["inits"]).source(cfg.stage, name, cfg.seed)
    model = network_from_init(cfg.preset, init, cfg.lora, seed=seed)
    # the trained tensors, loaded in place (frozen weights come from the init)
    state = {f"model.{name}": {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}}
    with warnings.catch_warnings():  # "loading in a single process": what is meant here
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(folder), no_dist=True)
    return name, model.eval()


def export_run(run_dir: str | Path, output: str | Path, *, dtype: torch.dtype | None = None,
               network: str | None = None) -> int:
    """Write the run's network (LoRA merged, released key names) to ``output`` (.safetensors); returns the number
    of tensors."""
    from safetensors.torch import save_file

    output = Path(output)
    if output.suffix != ".safetensors":
        raise ConfigError(f"{output}: the export is a .safetensors file")
    name, model = trained_network(run_dir, network)
    state = released_state_dict(model, dtype)
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(output) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "source": f"lipforcing train export ({name})"})
    return len(state)
