"""The trained networks: the engine's ``CausalWanStudent``, with LoRA through peft, and back to released weights.

Student, teacher and critic are the same class, called block-causal (student) or bidirectional (teacher, critic);
training never defines a second copy of the model.

    model = build_network("tiny", init=None, seed=0)           # random weights (tiny) or a checkpoint (--init)
    add_lora(model, cfg.lora, seed=0)                           # peft adapters; sets what is trainable
    model = trainable_network("tiny", init, cfg.lora, seed=0)   # both, as the trainer and the export build it
    state = released_state_dict(model)                          # LoRA merged, released key names (SPEC §10)
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from ..engine.dit.build import random_student
from ..engine.dit.checkpoint import load_student
from ..engine.dit.config import ModelConfig
from ..engine.dit.model import CausalWanStudent
from ..engine.errors import ConfigError
from .config import LoraConfig

ADAPTER = "default"


def build_network(preset: str, init: str | Path | None, *, seed: int = 0, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> CausalWanStudent:
    """The network of ``preset`` with the weights of ``init`` (any checkpoint the engine reads), or seeded random
    weights for the tiny preset. Larger presets need ``init``: their recipe fine-tunes a trained network."""
    cfg = ModelConfig.from_name(preset)
    if init is None:
        if preset != "tiny":
            raise ConfigError(f"--preset {preset} starts from trained weights: give --init CHECKPOINT "
                              "(the teacher for stage 1, the stage-1 student for stage 2)")
        return random_student(cfg, device=device, dtype=dtype, seed=seed).train()
    return load_student(init, cfg=cfg, device=device, dtype=dtype).train()


def _target_regex(lora: LoraConfig) -> str:
    names = "|".join(re.escape(t) for t in lora.target_modules)
    return rf"blocks\.\d+\.({names})"


def add_lora(model: CausalWanStudent, lora: LoraConfig, *, seed: int = 0) -> CausalWanStudent:
    """Inject LoRA adapters (rank, alpha, target modules of ``lora``) in place and mark what trains: the adapters
    and ``lora.fully_trained``; everything else is frozen. With ``lora.enabled`` False every parameter trains.
    The adapters' initial values come from ``seed`` (not from the global RNG), so every process and every
    rebuild of a run starts from the same ones."""
    if not lora.enabled:
        return model.requires_grad_(True)
    try:
        from peft import LoraConfig as PeftLoraConfig
        from peft import inject_adapter_in_model
    except ImportError:
        raise ConfigError("LoRA training needs peft: pip install 'lipforcing[train]'") from None
    config = PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=0.0,
                            target_modules=_target_regex(lora), bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    model.requires_grad_(False)
    for name, p in model.named_parameters():
        if ".lora_" in name or name.split(".")[0] in lora.fully_trained:
            p.requires_grad_(True)
    return model


def trainable_network(preset: str, init: str | Path | None, lora: LoraConfig, *, seed: int,
                      device: torch.device | str = "cpu") -> CausalWanStudent:
    """A network as a run trains it: ``build_network`` then LoRA (``lora.enabled``) or every parameter trained.
    The trainer and the export build it the same way, so a checkpoint's trained tensors fit either."""
    model = build_network(preset, init, seed=seed, device=device)
    if lora.enabled:
        return add_lora(model, lora, seed=seed)
    return model.requires_grad_(True)


@torch.no_grad()
def released_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The network's weights under the released key names: every LoRA adapter merged into its base weight
    (W + (alpha / r) B A), adapter tensors dropped. The model is left unchanged."""
    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if ADAPTER in getattr(module, "lora_A", {}):
            a = module.lora_A[ADAPTER].weight.float()  # [r, in]
            b = module.lora_B[ADAPTER].weight.float()  # [out, r]
            base = module.base_layer
            merged = base.weight.float() + module.scaling[ADAPTER] * (b @ a)
            out[f"{name}.weight"] = merged.to(base.weight.dtype)
            if base.bias is not None:
                out[f"{name}.bias"] = base.bias.detach().clone()
    for key, value in model.state_dict().items():
        if ".lora_" in key:
            continue
        plain = key.replace(".base_layer.", ".")
        out.setdefault(plain, value.detach().clone())
    if dtype is not None:
        out = {k: v.to(dtype) for k, v in out.items()}
    return {k: v.contiguous() for k, v in out.items()}
