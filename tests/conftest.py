"""Shared test fixtures: the location of the shared test data and the dtype tolerance table. (The relative
error of parity checks is the project's own, ``lipforcing.engine.numerics.rel_error``.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in the CPU interpreter; the flag is read when kernels are defined, so it is set
    # before any test module imports Triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")

SERVER_PACKAGES = ("fastapi", "uvicorn", "websockets", "av", "mediapipe", "transformers")
"""What a test of ``lipforcing serve`` with the tiny model needs (``require(*SERVER_PACKAGES)``)."""


def require(*packages: str) -> None:
    """Skip the calling test module unless every one of ``packages`` imports."""
    for name in packages:
        pytest.importorskip(name)


REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LIPFORCING_SHARED", REPO_ROOT.parent / "shared"))


def in_threads(work, count: int, timeout: float) -> list[BaseException]:
    """Run ``work(i)`` for i in 0..count-1, each in its own thread, at once; the exceptions they raised."""
    import threading

    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            work(i)
        except BaseException as exc:  # reported to the caller
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    return errors

def gather_first_chunks(batcher, sessions: int, monkeypatch, timeout: float = 60.0) -> None:
    """Make a ``StudentBatcher``'s first round of chunks one call: the first batch that holds a chunk waits until
    ``sessions`` chunk requests have arrived (running any other request meanwhile), so that the test sees the
    sessions batched whatever the threads' timing."""
    import time

    run = batcher._run
    gathered = []

    def gathering_run(batch):
        if gathered or not any(r.kind == "chunk" for r in batch):
            return run(batch)
        deadline = time.monotonic() + timeout
        chunks, arrived = [], batch
        while True:
            others = [r for r in arrived if r.kind != "chunk"]  # opens and starts the other sessions wait for
            chunks += [r for r in arrived if r.kind == "chunk"]
            if others:
                run(others)
            if len(chunks) >= sessions or time.monotonic() > deadline:
                break
            time.sleep(0.002)
            with batcher._cond:
                arrived, batcher._pending = batcher._pending, []
        gathered.append(len(chunks))
        run(chunks)

    monkeypatch.setattr(batcher, "_run", gathering_run)


def random_clip(cfg, latent_hw: tuple[int, int], latents: int, seed: int, text_seed: int = 99) -> dict:
    """Random inputs of one clip for the student's schedulers: text [1, text_len, 4096] (from ``text_seed``: one
    text shared by clips), audio [1, 1 + 4 (latents - 1), audio_dim], ref [1, 16, 1, h, w], mask [1, 1, 1, h, w]
    in {0, 1}, masked and ref_seq [1, 16, latents, h, w]."""
    g = torch.Generator().manual_seed(seed)
    h, w = latent_hw
    return dict(
        text=torch.randn(1, cfg.text_len, 4096, generator=torch.Generator().manual_seed(text_seed)),
        audio=torch.randn(1, 1 + 4 * (latents - 1), cfg.audio_dim, generator=g),
        ref=torch.randn(1, 16, 1, h, w, generator=g),
        mask=(torch.rand(1, 1, 1, h, w, generator=g) > 0.5).float(),
        masked=torch.randn(1, 16, latents, h, w, generator=g),
        ref_seq=torch.randn(1, 16, latents, h, w, generator=g),
    )


# The checks torch.library.opcheck runs by default; a custom-op test asserts that each ran and passed.
OPCHECKS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")

# Relative-error tolerances keyed by dtype. fp32 arithmetic on the tested sizes lands near 1e-6;
# fp16 keeps 11 mantissa bits (~5e-4 per op); bf16 keeps 8 (~4e-3 per op). Bounds leave ~10x headroom.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip("shared test data (../shared) is not present")
    return SHARED


def _safetensors_in(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pytest.skip(f"no golden files in {folder}")
    return files


@pytest.fixture(scope="session")
def golden_files(shared_dir: Path) -> list[Path]:
    """Streaming golden files, ``lipforcing-golden/1``."""
    return _safetensors_in(shared_dir / "golden")


@pytest.fixture(scope="session")
def train_golden_files(shared_dir: Path) -> list[Path]:
    """Full-sequence (training) golden files, ``lipforcing-golden-train/1``."""
    return _safetensors_in(shared_dir / "golden/train")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def assert_export_computes_the_trained_network(export_path: Path, network, stream, batch) -> None:
    """The student loaded from an exported file (adapters merged) computes what the trained network (adapters
    apart) computes: the block-causal flow of one random input, to fp32 rounding."""
    import torch

    from lipforcing.engine.dit.checkpoint import load_student
    from lipforcing.engine.dit.full_sequence import FullSequenceAttention
    from lipforcing.engine.numerics import rel_error

    engine_model = load_student(export_path, dtype=torch.float32)
    x = torch.randn(1, 16, 21, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.full((1, 21), 0.769, dtype=torch.float64)
    ctx = FullSequenceAttention(network.cfg, stream, 21, block_causal=True, device="cpu")
    with torch.no_grad():
        merged = engine_model(batch.inputs(x), t, engine_model.prepare_clip(batch.text_context, batch.audio), ctx)
        unmerged = network(batch.inputs(x), t, batch.clip(), ctx)
    assert rel_error(merged, unmerged) < TOLERANCE[torch.float32]
