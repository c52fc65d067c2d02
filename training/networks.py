"""The trained networks: the engine's ``CausalWanStudent``, with LoRA through peft, and back to released weights.

Student, teacher and critic are the same class, called block-causal (student) or bidirectional (teacher, critic);
training never defines a second copy of the model.

    model = build_network("tiny", init=None, seed=0)           # random weights (tiny) or a checkpoint (--init)
    add_lora(model, cfg.lora, seed=0)                           # peft adapters; sets what is trainable
    model = trainable_network("tiny", init, cfg.lora, seed=0)   # both, as the trainer and the export build it
    state = released_state_dict(model)                          # LoRA merged, released key names (SPEC §10)

``lora.init`` continue (the release's ``merge_lora=False``): an init checkpoint that carries an adapter
(``<module>.lora_A.weight`` / ``<module>.lora_B.weight``, optionally ``.lora_A.default.weight`` as peft names them,
beside the base weights under the released names) gives its A/B to the new adapter, which trains on from them; a
training run folder as init is continued by ``training.export.network_from_init``. fresh: a new adapter (B = 0) on
the merged weights.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import nn

from ..engine.dit.build import random_student
from ..engine.dit.checkpoint import load_student
from ..engine.dit.config import ModelConfig
from ..engine.dit.model import CausalWanStudent
from ..engine.errors import ConfigError
from . import kernels_shadowed
from .config import LoraConfig

ADAPTER = "default"
log = logging.getLogger("lipforcing")


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
    except ImportError as exc:
        if kernels_shadowed():
            raise ConfigError(f"peft failed to import ({exc}): {kernels_shadowed()}") from None
        if getattr(exc, "name", None) == "peft":
            raise ConfigError("LoRA training needs peft: pip install 'lipforcing[train]'") from None
        raise ConfigError(f"peft is installed but failed to import: {exc}") from None
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


def split_adapter(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(base weights, adapter) of a checkpoint's tensors: the adapter maps ``<module>.lora_A`` / ``.lora_B`` to
    their [r, in] / [out, r] weights (peft's ``.default`` dropped)."""
    base, adapter = {}, {}
    for key, value in state.items():
        m = re.fullmatch(r"(.+)\.(lora_[AB])(?:\.default)?\.weight", key)
        if m:
            adapter[f"{m.group(1)}.{m.group(2)}"] = value
        else:
            base[key] = value
    return base, adapter


def load_adapter(model: CausalWanStudent, adapter: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``split_adapter``'s A/B into the model's injected adapters (every target must be there, ranks equal)."""
    modules = dict(model.named_modules())
    wanted = {f"{name}.{ab}" for name, m in modules.items() if ADAPTER in getattr(m, "lora_A", {})
              for ab in ("lora_A", "lora_B")}
    if set(adapter) != wanted:
        missing, extra = sorted(wanted - set(adapter)), sorted(set(adapter) - wanted)
        raise ConfigError(f"{source}: its adapter does not cover the LoRA targets (missing {missing[:3]}, "
                          f"unexpected {extra[:3]}); train with lora.init fresh, or match lora.target_modules")
    with torch.no_grad():
        for key, value in adapter.items():
            name, ab = key.rsplit(".", 1)
            weight = getattr(modules[name], ab)[ADAPTER].weight
            if weight.shape != value.shape:
                raise ConfigError(f"{source}: adapter {key} is {tuple(value.shape)}, the run's LoRA (rank "
                                  f"{weight.shape[0] if ab == 'lora_A' else weight.shape[1]}) wants "
                                  f"{tuple(weight.shape)}; set lora.rank to the adapter's")
            weight.copy_(value.to(weight.dtype))


def _merged_network(preset: str, base: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor], lora: LoraConfig,
                    device, source: str) -> CausalWanStudent:
    """The network of base weights with an adapter merged in: W + (lora.alpha / r) B A, r the adapter's rank."""
    from ..engine.dit.checkpoint import load_into

    merged = dict(base)
    for key in adapter:
        if key.endswith(".lora_A"):
            name = key[: -len(".lora_A")]
            a, b = adapter[key].double(), adapter[f"{name}.lora_B"].double()  # [r, in], [out, r]
            w = merged[f"{name}.weight"]
            merged[f"{name}.weight"] = (w.double() + lora.alpha / a.shape[0] * (b @ a)).to(w.dtype)
    with torch.device("meta"):
        model = CausalWanStudent(ModelConfig.from_name(preset))
    return load_into(model, merged, device=device, dtype=torch.float32, source=source).train()


def trainable_network(preset: str, init: str | Path | None, lora: LoraConfig, *, seed: int,
                      device: torch.device | str = "cpu") -> CausalWanStudent:
    """A network as a run trains it: ``build_network`` then LoRA (``lora.enabled``) or every parameter trained.
    With ``lora.init`` continue and an init checkpoint that carries an adapter, the adapter starts from its A/B on
    the unmerged base weights. The trainer and the export build it the same way, so a checkpoint's trained tensors
    fit either."""
    if not lora.enabled:
        return build_network(preset, init, seed=seed, device=device).requires_grad_(True)
    if init is not None:
        from ..engine.dit.checkpoint import load_into, read_state_dict

        base, adapter = split_adapter(read_state_dict(init))
        if adapter and lora.init == "fresh":
            return add_lora(_merged_network(preset, base, adapter, lora, device, str(init)), lora, seed=seed)
        if adapter:
            with torch.device("meta"):
                model = CausalWanStudent(ModelConfig.from_name(preset))
            load_into(model, base, device=device, dtype=torch.float32, source=str(init))
            model = add_lora(model.train(), lora, seed=seed)
            load_adapter(model, adapter, str(init))
            return model
        if lora.init == "continue":
            log.info("%s carries no LoRA adapter: a fresh one (B = 0) starts on its weights", init)
    return add_lora(build_network(preset, init, seed=seed, device=device), lora, seed=seed)


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
