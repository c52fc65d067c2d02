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
from .networks import add_lora, build_network, released_state_dict

NETWORK_OF_STAGE = {"teacher": "teacher", "stage1": "student", "stage2": "student"}


def trained_network(run_dir: str | Path, network: str | None = None):
    """(network name, the run's network with its latest trained weights, on the CPU, fp32)."""
    import torch.distributed.checkpoint as dcp

    from .trainer import latest_checkpoint, read_run, resolve_init

    run_dir = Path(run_dir)
    cfg, record = read_run(run_dir)
    name = network or NETWORK_OF_STAGE[cfg.stage]
    folder = latest_checkpoint(run_dir)
    if folder is None:
        raise ConfigError(f"{run_dir}: the run has no checkpoint yet (it writes one every {cfg.save_every} steps "
                          "and at the end)")
    inits = record["inits"]
    init, seed = inits.get("init"), cfg.seed
    if name == "critic":
        init, seed = inits.get("critic") or inits.get("teacher"), cfg.seed + 1
    elif name != NETWORK_OF_STAGE[cfg.stage]:
        raise ConfigError(f"a {cfg.stage} run trains '{NETWORK_OF_STAGE[cfg.stage]}'"
                          + (" and 'critic'" if cfg.stage == "stage2" else "") + f", not {name!r}")
    model = build_network(cfg.preset, resolve_init(init, torch.device("cpu")), seed=seed)
    if cfg.lora.enabled:
        add_lora(model, cfg.lora, seed=seed)
    else:
        model.requires_grad_(True)
    trained = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    state = {f"model.{name}": trained}
    dcp.load(state, checkpoint_id=str(folder), no_dist=True)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in trained:
                p.copy_(state[f"model.{name}"][n])
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
    tmp = output.with_name(output.name + ".partial")
    try:
        save_file(state, str(tmp), metadata={"format": "pt", "source": f"lipforcing train export ({name})"})
        tmp.replace(output)
    finally:
        tmp.unlink(missing_ok=True)
    return len(state)
