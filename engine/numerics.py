"""Numeric conventions every layer shares: dtype names and the relative error of parity checks.

    dtype = parse_dtype("bf16")              # bf16 | fp16 | fp32 -> torch dtype (ConfigError otherwise)
    dtype_name(torch.bfloat16)               # "bf16"
    err = rel_error(out, ref)                # ||out - ref|| / ||ref|| in float64 (golden checks, tests)
"""

from __future__ import annotations

import torch

from .errors import ConfigError

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_dtype(name: str) -> torch.dtype:
    """The torch dtype of a short name (bf16, fp16, fp32)."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


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
