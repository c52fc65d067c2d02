"""Build the student straight in its target dtype on its device: on the meta device first, so no fp32 or
host copy of the weights ever exists (28.6 GB for 14B in bf16 is all a GPU holds of it).

    model = random_student(ModelConfig.from_name("14b"), device="cuda", dtype=torch.bfloat16, seed=0)
    model = load_student("lipforcing_14b.pth", device="cuda", dtype=torch.bfloat16)   # (checkpoint.py)

Random weights are for benchmarks, demos and tests: every parameter is drawn from N(0, std), norm
weights from 1 + N(0, std), so every block, norm and modulation acts (a zero-initialised modulation would
make a block an identity).
"""

from __future__ import annotations

import torch

from .config import ModelConfig
from .fp8 import E4M3, to_fp8
from .model import CausalWanStudent

_NORM_WEIGHTS = ("norm_q.weight", "norm_k.weight", "norm3.weight", "norm_out.weight")


@torch.no_grad()
def random_student(
    cfg: ModelConfig,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    std: float = 0.02,
    fp8: bool = False,
) -> CausalWanStudent:
    """A student with seeded random weights, materialized directly in ``dtype`` on ``device``; eval mode.

    The meta model is cast first (free: meta tensors hold no data), so ``to_empty`` allocates each parameter
    once, in ``dtype``: the peak is the weights in ``dtype``, with no fp32 copy of them at any time.
    ``fp8``: the blocks' linear weights quantised (fp8.py) from the values the unquantised student draws with
    the same seed, one layer at a time: the fp8 student is the quantised ``dtype`` one."""
    with torch.device("meta"):
        model = CausalWanStudent(cfg).to(dtype)
        if fp8:
            to_fp8(model, dtype)
    model = model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith(".weight_scale"):
            continue  # set with its weight
        if p.dtype == E4M3:  # drawn in ``dtype`` exactly as the unquantised student's, then quantised
            layer = model.get_submodule(name.rpartition(".")[0])
            layer.set_weight(torch.empty(p.shape, dtype=dtype, device=device).normal_(0.0, std, generator=generator))
            continue
        p.normal_(0.0, std, generator=generator)
        if name.endswith(_NORM_WEIGHTS):
            p.add_(1.0)
    return model.eval()
