"""``lipforcing kernels --tune`` and the ``auto`` backend: measurements stored per device and shape in the user
cache, auto taking the backend with the least total time on the model's shapes among those that run here."""

from __future__ import annotations

import json

import pytest
import torch

from lipforcing.cli import main
from lipforcing.engine.dit.build import random_student
from lipforcing.engine.dit.config import ModelConfig, StreamConfig
from lipforcing.engine.dit.tuning import measure_attention, save_measurements, table_path, tuned_backend
from lipforcing.engine.runtime.sampler import StreamingSampler

CFG = ModelConfig(dim=64, ffn_dim=96, num_heads=2, num_layers=2, text_len=5, audio_dim=8, audio_blocks=(1,))
STREAM = StreamConfig(latent_h=4, latent_w=6)


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIPFORCING_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LIPFORCING_BACKEND", raising=False)


def test_measurements_cover_every_window_shape_and_name_the_winner():
    rows = measure_attention(CFG, STREAM, "cpu", torch.float32, backends=["reference", "sdpa"], repeats=2)
    assert [(r["lq"], r["lc"]) for r in rows] == [(18, 0), (18, 18), (18, 24)]  # 3 frames of 2x3 tokens
    for row in rows:
        assert set(row["ms"]) == {"reference", "sdpa"} and min(row["ms"].values()) > 0
        assert row["winner"] == min(row["ms"], key=row["ms"].get)
    path = save_measurements(rows, "cpu")
    assert path == table_path() and len(json.loads(path.read_text())["devices"]["cpu"]) == 3


def _fake_rows(ms_by_backend: dict[str, float]) -> list[dict]:
    rows = measure_attention(CFG, STREAM, "cpu", torch.float32, backends=["reference"], repeats=1)
    return [dict(row, ms=dict(ms_by_backend), winner=min(ms_by_backend, key=ms_by_backend.get)) for row in rows]


def test_auto_runs_what_was_measured_fastest_here():
    model = random_student(CFG, seed=0)
    assert tuned_backend(CFG, STREAM, "cpu", torch.float32) is None  # never measured: the device default
    assert StreamingSampler(model, STREAM).backend == "reference"
    save_measurements(_fake_rows({"reference": 2.0, "sdpa": 1.0}), "cpu")
    assert tuned_backend(CFG, STREAM, "cpu", torch.float32) == "sdpa"
    assert StreamingSampler(model, STREAM).backend == "sdpa"
    assert StreamingSampler(model, STREAM, backend="reference").backend == "reference"  # a request wins
    assert tuned_backend(CFG.replace(num_heads=4, dim=128), STREAM, "cpu", torch.float32) is None  # other shapes
    assert tuned_backend(CFG, STREAM, "cpu", torch.bfloat16) is None  # another dtype


def test_auto_skips_a_winner_that_cannot_run_here(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the kernels cannot run on CPU tensors now
    save_measurements(_fake_rows({"reference": 3.0, "sdpa": 2.0, "triton": 1.0}), "cpu")
    assert tuned_backend(CFG, STREAM, "cpu", torch.float32) == "sdpa"


def test_kernels_command_options(capsys):
    assert main(["kernels"]) == 2
    assert main(["kernels", "--static", "--tune"]) == 2
    assert main(["kernels", "--tune", "--repeats", "0"]) == 2
    assert "error:" in capsys.readouterr().err
