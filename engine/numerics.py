"""Numeric conventions every layer shares: dtype names and the relative error of parity checks.

    dtype = parse_dtype("bf16")              # bf16 | fp16 | fp32 -> torch dtype (ConfigError otherwise)
    dtype_name(torch.bfloat16)               # "bf16"
    dtype, fp8 = parse_precision("fp8")      # a --dtype: the compute dtype, and e4m3 block weights + KV cache
    with built_in(torch.bfloat16, "cuda"):   # modules made here are born bf16 on the GPU (no fp32 copy)
        vae = WanVAE(WanVAEConfig())
    err = rel_error(out, ref)                # ||out - ref|| / ||ref|| in float64 (golden checks, tests)
"""

from __future__ import annotations

import contextlib

import torch

from .errors import ConfigError

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_dtype(name: str) -> torch.dtype:
    """The torch dtype of a short name (bf16, fp16, fp32)."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


PRECISIONS = (*DTYPES, "fp8")
"""What ``--dtype`` accepts: a compute dtype, or fp8 (e4m3 block weights and KV cache computing in bf16)."""


def parse_precision(name: str) -> tuple[torch.dtype, bool]:
    """(compute dtype, fp8) of a ``--dtype`` name: fp8 is (bfloat16, True), see engine/dit/fp8.py."""
    if name == "fp8":
        return torch.bfloat16, True
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; choose one of {', '.join(PRECISIONS)}")
    return DTYPES[name], False


@contextlib.contextmanager
def built_in(dtype: torch.dtype, device: torch.device | str):
    """Modules constructed inside are created directly in ``dtype`` on ``device`` (their default initialisation
    runs there): no float32 copy on the host first. Restores the default dtype on exit."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def dtype_name(dtype: torch.dtype) -> str:
    """Short name of a torch dtype (bf16, fp16, fp32, or torch's own name for others)."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    return str(dtype).removeprefix("torch.")


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 error ||out - ref|| / ||ref||, computed in float64 on the CPU."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))
