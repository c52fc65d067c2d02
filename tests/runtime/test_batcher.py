"""Several sessions on one set of weights: batched calls equal the sessions run alone, sessions join and leave
at chunk boundaries, and the batcher serves sessions from several threads."""

from __future__ import annotations

import pytest
import torch

from conftest import gather_first_chunks, in_threads, random_clip
from lipforcing.engine.dit.build import random_student
from lipforcing.engine.dit.config import ModelConfig, StreamConfig
from lipforcing.engine.errors import ConfigError
from lipforcing.engine.numerics import rel_error
from lipforcing.engine.runtime.batcher import StudentBatcher
from lipforcing.engine.runtime.static import StaticStudent

CFG = ModelConfig(dim=64, ffn_dim=96, num_heads=2, num_layers=3, text_len=5, audio_dim=8)
STREAM = StreamConfig(latent_h=4, latent_w=6)
CHUNKS = 5


@pytest.fixture(scope="module")
def model():
    return random_student(CFG, seed=0, std=0.05)


def _clip(seed: int) -> dict:
    return random_clip(CFG, (4, 6), 3 * CHUNKS, seed)


def _start(student, slot, clip):
    student.start_clip(clip["text"], clip["audio"], clip["ref"], clip["mask"], slot=slot)


def _chunk(clip, b):
    return clip["masked"][:, :, 3 * b : 3 * b + 3], clip["ref_seq"][:, :, 3 * b : 3 * b + 3]


def _alone(model, clip) -> torch.Tensor:
    student = StaticStudent(model, STREAM, backend="reference", seed=5, cuda_graphs=False)
    _start(student, None, clip)
    return torch.cat([student.run_chunk(*_chunk(clip, b)).clone() for b in range(CHUNKS)], 2)


def test_batched_sessions_equal_the_sessions_alone_and_join_and_leave(model):
    """A runs alone for two chunks, B joins (its first two chunks run alone, then A and B form one batch), B
    leaves after three chunks and C takes its row: every session's latents equal its run alone."""
    clips = {name: _clip(seed) for name, seed in (("a", 1), ("b", 2), ("c", 3))}
    expected = {name: _alone(model, clip) for name, clip in clips.items()}
    student = StaticStudent(model, STREAM, slots=3, backend="reference", seed=5, cuda_graphs=False)
    slots, done, out = {}, {}, {name: [] for name in clips}
    batch_sizes = []

    def step(names):
        active = [slots[n] for n in names]
        for group in student.groups(active):
            names_in = [next(n for n in names if slots[n] is s) for s in group]
            masked = torch.cat([_chunk(clips[n], done[n])[0] for n in names_in])
            ref_seq = torch.cat([_chunk(clips[n], done[n])[1] for n in names_in])
            x0 = student.run_group(group, masked, ref_seq)
            batch_sizes.append(len(group))
            for i, n in enumerate(names_in):
                out[n].append(x0[i : i + 1].clone())
                done[n] += 1

    for name in ("b", "a"):  # b takes row 0, a row 1: a reaching the steady state moves to row 0
        slots[name], done[name] = student.open_slot(), 0
    _start(student, slots["a"], clips["a"])
    step(["a"])
    step(["a"])
    _start(student, slots["b"], clips["b"])
    step(["a", "b"])  # a steady, b chunk 0: two calls
    step(["a", "b"])  # b chunk 1
    step(["a", "b"])  # both steady: one batch of two
    student.close_slot(slots["b"])  # b leaves after three chunks
    slots["c"], done["c"] = student.open_slot(), 0
    _start(student, slots["c"], clips["c"])
    step(["c"])
    step(["c"])
    step(["c"])
    step(["c"])
    step(["c"])
    assert 2 in batch_sizes
    assert slots["a"].row == 0 and slots["c"].row == 1 and slots["c"].cache.frames[0] == 0
    assert done == {"a": 5, "b": 3, "c": 5}
    for name, chunks in out.items():
        got = torch.cat(chunks, 2)
        assert rel_error(got, expected[name][:, :, : got.shape[2]]) < 1e-5, name
    with pytest.raises(ConfigError, match="slots are in use"):
        for _ in range(3):
            student.open_slot()


def test_the_batcher_serves_sessions_from_several_threads(model, monkeypatch):
    """Three sessions in three threads: their first chunks are held until all three have asked (the threads'
    timing decides nothing), run as one call, and every session's latents equal its run alone."""
    clips = [_clip(seed) for seed in (4, 5, 6)]
    expected = [_alone(model, clip) for clip in clips]
    student = StaticStudent(model, STREAM, slots=3, backend="reference", seed=5, cuda_graphs=False)
    batcher = StudentBatcher(student, gather_s=0.05)
    gather_first_chunks(batcher, 3, monkeypatch)
    results = [None] * 3

    def session(i):
        s = batcher.session()
        clip = clips[i]
        s.start_clip(clip["text"], clip["audio"], clip["ref"], clip["mask"])
        results[i] = torch.cat([s.run_chunk(*_chunk(clip, b)) for b in range(CHUNKS)], 2)
        s.close()

    errors = in_threads(session, 3, timeout=120)
    batcher.shutdown()
    assert not errors
    for got, want in zip(results, expected):
        assert rel_error(got, want) < 1e-5
    assert batcher.batches[0] == 3  # the three first chunks ran as one call
    assert sum(batcher.batches) == 3 * CHUNKS


def test_a_round_gathers_for_its_whole_window():
    """Requests arriving one after another inside ``gather_s`` all join the round: each arrival wakes the batcher,
    which must go on waiting until the window ends (it once ran the round at the second request)."""
    import threading
    import time
    from types import SimpleNamespace

    from lipforcing.engine.runtime.batcher import StudentBatcher, _Request

    rounds = []
    batcher = StudentBatcher(SimpleNamespace(device=torch.device("cpu")), gather_s=1.0)
    batcher._run = lambda requests: (rounds.append(len(requests)), [r.done.set() for r in requests])

    def ask():
        batcher._call(_Request(slot=None, kind="chunk"))

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for thread in threads:  # 0.1 s apart: well inside the 1 s window, far apart for the scheduler
        thread.start()
        time.sleep(0.1)
    for thread in threads:
        thread.join(timeout=10)
    assert rounds == [3]
