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
from .networks import released_state_dict, trainable_network

NETWORK_OF_STAGE = {"teacher": "teacher", "stage1": "student", "stage2": "student"}


def trained_network(run_dir: str | Path, network: str | None = None):
    """(network name, the run's network with its latest trained weights, on the CPU, fp32)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    from .trainer import Inits, latest_checkpoint, read_run, resolve_init

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
    model = trainable_network(cfg.preset, resolve_init(init), cfg.lora, seed=seed)
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
