"""The copy risk: how much the student leans on the reference-sequence channels, which hold the target clip itself.

During training (and at inference, SPEC §3) the reference sequence is the clip's own unmasked latents, so a student
can lower its loss by copying those channels into its output instead of generating the mouth from the speech. The
check compares the student's stage-1 loss on a batch three ways, with the same noise and times:

    own       the clip's own latents as the reference sequence (what training sees)
    swapped   another clip's latents (of the same speaker where the data has one: ``TrainData.other_clip``)
    zeroed    zeros

    losses = copy_losses(student, stream, batch, other.latents, cfg, rng)   # {"own", "swapped", "zeroed"}: [B] each

A student that generates from the masked frames and the speech loses little when the reference is swapped; one
that copies loses a lot. ``copy_gap`` = swapped - own is logged every ``copy_check_every`` iterations; the
mini-distillation (``bench/distill.py``) reports all three for every student it trains.

The loss is stage 1's: 0.5 MSE of x0 through the block-causal student, (window, sink) = (7, 1) as at inference,
a t per chunk from ``chunk_t``, absolute RoPE; no gradient.
"""

from __future__ import annotations

import torch
from torch import nn

from ..engine.dit.config import StreamConfig
from .batch import SampleRandom, TrainBatch
from .config import TrainConfig
from .stage1 import DiffusionForcing

COPY_PAIR = (7, 1)
"""The (window, sink) of the check: the streaming semantics of inference."""


@torch.no_grad()
def copy_losses(student: nn.Module, stream: StreamConfig, batch: TrainBatch, other_latents: torch.Tensor,
                cfg: TrainConfig, rng: SampleRandom) -> dict[str, torch.Tensor]:
    """Per-sample stage-1 losses [B] with the reference sequence the clip's own latents, ``other_latents``
    [B, 16, L, h, w] (another clip's), and zeros; every variant sees the same noise and chunk times."""
    objective = DiffusionForcing(cfg.replace(stage="stage1"), student, stream)
    objective.pair = COPY_PAIR
    state = [g.get_state() for g in rng.generators]
    out = {}
    for name, reference in (("own", None), ("swapped", other_latents), ("zeroed", torch.zeros_like(batch.latents))):
        for g, s in zip(rng.generators, state):
            g.set_state(s)
        variant = batch if reference is None else batch.with_reference(reference.to(batch.latents))
        out[name] = objective.loss("student", variant, rng)[0]
    return out
