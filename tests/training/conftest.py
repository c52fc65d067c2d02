"""Fixtures of the training tests: a small data set prepared with the tiny preset, once per run.

    def test_something(tiny_data):                  # Path of a directory written by prepare_data
        data = TrainData(tiny_data)                  # 3 clips of 81 frames, 64x64 faces, TAEHV latents [16, 21, 8, 8]
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_data_sources(shared_dir: Path) -> list[Path]:
    """The videos ``tiny_data`` is prepared from: shared clips of 125 and 166 frames at 25 fps (1 + 2 clips)."""
    return [shared_dir / "assets/clips" / name for name in ("face3.mp4", "face4.mp4")]


@pytest.fixture(scope="session")
def tiny_data_settings():
    """The ``PrepareSettings`` of ``tiny_data``: tiny preset, TAEHV, 64x64 faces, 81-frame clips, on the CPU."""
    for module in ("av", "mediapipe", "transformers", "safetensors"):
        pytest.importorskip(module)
    from lipforcing.training.data import PrepareSettings

    return PrepareSettings(preset="tiny", codec="taehv", size=64, clip_frames=81, device="cpu", seed=0)


@pytest.fixture(scope="session")
def tiny_data(tiny_data_sources: list[Path], tiny_data_settings, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data set of 3 clips (face3: 1, face4: 2) prepared with ``tiny_data_settings``: the directory holding
    manifest.json, common.safetensors and the shards. Shared by the session: treat it as read-only."""
    from lipforcing.training.data import prepare_data

    out = tmp_path_factory.mktemp("train-data") / "tiny"
    prepare_data(tiny_data_sources, out, tiny_data_settings, progress=False)
    return out


@pytest.fixture
def make_dmd():
    """A factory of stage 2's objective on plain (unsharded) tiny networks: ``make_dmd(data_dir, **overrides)`` ->
    (SelfForcingDMD with a LoRA student and critic and a frozen teacher, TrainData)."""
    pytest.importorskip("peft")
    from lipforcing.engine.dit.config import StreamConfig
    from lipforcing.training.config import train_config
    from lipforcing.training.data import TrainData
    from lipforcing.training.networks import add_lora, build_network
    from lipforcing.training.stage2 import SelfForcingDMD

    def make(data_dir: Path, **overrides):
        cfg = train_config("stage2", "tiny", overrides)
        data = TrainData(data_dir)
        stream = StreamConfig(latent_h=data.settings["latent_h"], latent_w=data.settings["latent_w"])
        student = add_lora(build_network("tiny", None, seed=0), cfg.lora)
        teacher = build_network("tiny", None, seed=1).requires_grad_(False)
        critic = add_lora(build_network("tiny", None, seed=1), cfg.lora)
        return SelfForcingDMD(cfg, student, teacher, critic, stream), data

    return make

