"""Warm-ups: every shape a real chunk will run is run first (so kernel tuning, compiles and graph captures happen
before the timed work), and a warm-up leaves nothing behind that changes what the next clip computes."""

from __future__ import annotations

import pytest
import torch

from conftest import random_clip
from lipforcing.engine.dit.build import random_student
from lipforcing.engine.dit.config import ModelConfig, StreamConfig
from lipforcing.engine.runtime.sampler import StreamingSampler
from lipforcing.engine.runtime.static import StaticStudent

CFG = ModelConfig(dim=64, ffn_dim=96, num_heads=2, num_layers=2, text_len=5, audio_dim=8, audio_blocks=(1,))
STREAM = StreamConfig(latent_h=4, latent_w=6)
CHUNKS = 4  # chunk 0, chunk 1 and two steady-state chunks


@pytest.fixture(scope="module")
def model():
    return random_student(CFG, seed=0, std=0.05)


def _clip(seed: int) -> dict:
    return random_clip(CFG, (4, 6), 3 * CHUNKS, seed)


def _sampler_clip(sampler: StreamingSampler, clip: dict) -> torch.Tensor:
    sampler.start_clip(clip["text"], clip["audio"], clip["ref"], clip["mask"])
    return torch.cat([c.x0 for c in sampler.run_clip(clip["masked"], clip["ref_seq"])], dim=2)


def test_reference_sampler_warm_up_runs_every_shape_and_leaves_no_trace(model, monkeypatch):
    clip = _clip(1)
    expected = _sampler_clip(StreamingSampler(model, STREAM, backend="reference", seed=3), clip)
    sampler = StreamingSampler(model, STREAM, backend="reference", seed=3)
    shapes = []
    begin = sampler.cache.begin_chunk
    monkeypatch.setattr(sampler.cache, "begin_chunk", lambda start: shapes.append(begin(start).shape_key) or
                        sampler.cache.plan)
    assert sampler.warm_up(clip["text"]) > 0
    assert len(set(shapes)) == 3 == len(shapes)  # chunk 0, chunk 1, steady state: each once
    assert sampler.clip is None and sampler.next_frame == 0
    warm = set(shapes)
    assert torch.equal(_sampler_clip(sampler, clip), expected)
    assert set(shapes) == warm  # the real clip ran no shape the warm-up had not run


def test_static_warm_up_runs_every_row_and_batch_the_sessions_will_run(model, monkeypatch):
    """With three session rows the warm-up runs 1, 2 and 3 sessions started together (rows 0 .. k-1 batched) and
    one session alone in row 1 and in row 2, through every window shape; two sessions afterwards run only those
    (rows, shape) keys, and compute what they compute without a warm-up."""
    clips = [_clip(1), _clip(2)]
    student = StaticStudent(model, STREAM, slots=3, backend="reference", seed=5, cuda_graphs=False)
    keys = []
    body = student._chunk_body
    monkeypatch.setattr(student, "_chunk_body", lambda plan, rows: keys.append(
        (rows.start, rows.count, plan.shape_key)) or body(plan, rows))
    student.warm_up(clips[0]["text"])
    shapes = [p.shape_key for p in student.window_shapes]
    warm = set(keys)
    assert warm == {(0, k, s) for k in (1, 2, 3) for s in shapes} | {(r, 1, s) for r in (1, 2) for s in shapes}
    assert all(r is None for r in student._rows)  # every row handed back

    def run(student):
        slots = [student.open_slot() for _ in clips]
        for slot, clip in zip(slots, clips):
            student.start_clip(clip["text"], clip["audio"], clip["ref"], clip["mask"], slot=slot)
        out = [[] for _ in clips]
        for b in range(CHUNKS):
            for group in student.groups(slots):
                idx = [slots.index(s) for s in group]
                sl = slice(3 * b, 3 * b + 3)
                x0 = student.run_group(group, torch.cat([clips[i]["masked"][:, :, sl] for i in idx]),
                                       torch.cat([clips[i]["ref_seq"][:, :, sl] for i in idx]))
                for j, i in enumerate(idx):
                    out[i].append(x0[j : j + 1].clone())
        return [torch.cat(o, 2) for o in out]

    keys.clear()
    got = run(student)
    assert set(keys) <= warm and (0, 2, shapes[-1]) in keys  # batched, and nothing new after the warm-up
    expected = run(StaticStudent(model, STREAM, slots=3, backend="reference", seed=5, cuda_graphs=False))
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


def test_no_kernel_tuning_inside_the_clip_after_a_warm_up():
    """The Triton backend (the CPU interpreter here; the same autotuning keys as on a GPU): each scheduler's
    warm-up launches every attention key its clips will launch, so a clip after it tunes nothing. Shapes of their
    own (4 heads, a 2x4 latent: 2 tokens a frame) make the keys new to this process; the interpreter runs every
    program in Python, so the tokens are few (each kernel's rows and query blocks are its programs)."""
    pytest.importorskip("triton")
    from lipforcing.kernels import triton_available

    ok, why = triton_available(torch.device("cpu"))
    if not ok:
        pytest.skip(why)
    from lipforcing.kernels.sink_window_attention import tuning_events

    cfg = CFG.replace(num_heads=4, dim=128, num_layers=1, audio_blocks=(0,))  # head_dim 32 as CFG
    stream = StreamConfig(latent_h=2, latent_w=4)
    model = random_student(cfg, seed=1, std=0.05)
    clip = _clip(3)
    clip = dict(clip, ref=torch.randn(1, 16, 1, 2, 4), mask=torch.ones(1, 1, 1, 2, 4),
                masked=torch.randn(1, 16, 12, 2, 4), ref_seq=torch.randn(1, 16, 12, 2, 4))
    start = tuning_events()
    for student in (StreamingSampler(model, stream, backend="triton", seed=3),
                    StaticStudent(model, stream, backend="triton", seed=3, cuda_graphs=False)):
        student.warm_up(clip["text"])
        tuned = tuning_events()
        assert tuned - start == 3  # one key per window shape (0, 3 and 4 cached frames), tuned by the first
        student.start_clip(clip["text"], clip["audio"], clip["ref"], clip["mask"])
        for b in range(3):  # chunk 0, chunk 1, steady state
            student.run_chunk(clip["masked"][:, :, 3 * b : 3 * b + 3], clip["ref_seq"][:, :, 3 * b : 3 * b + 3])
        assert tuning_events() == tuned  # nothing tuned inside the clip
