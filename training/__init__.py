"""Training: the recipe that produces the student's weights (SPEC §9). See training/README.md.

    data.py        ``lipforcing prepare-data``: aligned 81-frame clips -> latents, audio features, text (shards)
    config.py      TrainConfig: the recipe's numbers per stage and preset, ``--config FILE``
    networks.py    the engine's CausalWanStudent as student / teacher / critic, LoRA (peft), merged export weights
    batch.py       a micro-batch on the device; per-sample random draws keyed by (seed, step, slot)
    stage1.py      diffusion forcing of the block-causal student; flow matching of the bidirectional teacher
    stage2.py      Self-Forcing DMD: the rollout, the sync-window guided teacher, the critic, the generator loss
    reward.py      the SyncNet reward of stage 2
    trainer.py     the loop: FSDP2 under torchrun (or one process), checkpoints (DCP), exact resume, log.jsonl
    export.py      ``lipforcing train export``: LoRA merged, released key names
    trajectory.py  ``lipforcing analyze-trajectory``: the teacher's 50-step trajectory, fidelity and sync per step
    memory.py      the memory arithmetic of 14B / 1.3B training (``python -m lipforcing.training.memory``)
    cli.py         the commands (``lipforcing train``, ``python -m lipforcing.training`` for torchrun)

It builds on the DiT core (the same ``CausalWanStudent``, called through ``engine.dit.full_sequence`` for the
block-causal and bidirectional full-sequence forwards, and through the streaming attention for stage 2's rollout),
the codecs, the media layer, the quality metrics and the tools; never on the application layer.
"""

import logging
from pathlib import Path


def kernels_shadowed() -> str | None:
    """A one-line diagnosis when the top-level name ``kernels`` resolves to this checkout's ``kernels/`` folder (the
    checkout's root is on sys.path: Python started there without PYTHONSAFEPATH), which hides the PyPI package
    ``kernels`` that peft's imports (through transformers) reach; None when it does not."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("kernels")
    except (ImportError, ValueError):
        return None
    ours = Path(__file__).resolve().parent.parent / "kernels"
    if spec is None or spec.origin is None or Path(spec.origin).resolve().parent != ours:
        return None
    return (f"the checkout's {ours}/ shadows the PyPI package 'kernels' that peft imports: run with "
            "PYTHONSAFEPATH=1, or from another folder")


if kernels_shadowed():  # said at import, before a LoRA run fails on it
    logging.getLogger("lipforcing").warning(kernels_shadowed())
