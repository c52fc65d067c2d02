"""Sink+window cache: visibility (eviction), dynamic-RoPE positions, constant memory, general windows."""

from __future__ import annotations

import pytest
import torch

from lipforcing.engine.dit.attention import RopeTable
from lipforcing.engine.dit.cache import SinkWindowCache, cache_capacity, plan_chunk, visible_cached_frames
from lipforcing.engine.dit.config import ModelConfig, StreamConfig
from lipforcing.engine.dit.full_sequence import block_causal_frame_mask
from lipforcing.engine.dit.model import CausalWanStudent
from lipforcing.engine.runtime.sampler import StreamingSampler
from lipforcing.kernels.rope import rope_angles

STREAM = StreamConfig(latent_h=4, latent_w=6)
MICRO = ModelConfig(dim=64, ffn_dim=96, num_heads=2, num_layers=2, text_len=4, audio_dim=8)


def test_spec_window_table():
    """SPEC §5: chunk 0 sees itself, chunk 1 chunk 0 + itself, chunk b >= 2 sink + chunk b-1 + itself."""
    cache = SinkWindowCache(MICRO, STREAM)
    expected = {
        0: ((), (), (0, 1, 2)),
        1: ((0, 1, 2), (0, 1, 2), (3, 4, 5)),
    }
    for b in range(12):
        plan = cache.begin_chunk(3 * b)
        if b in expected:
            frames, cache_pos, q_pos = expected[b]
        else:
            frames, cache_pos, q_pos = (0, 3 * b - 3, 3 * b - 2, 3 * b - 1), (0, 1, 2, 3), (4, 5, 6)
        assert plan.cached_frames == frames, b
        assert plan.cache_positions == cache_pos and plan.query_positions == q_pos, b
        assert plan.key_frames == frames + (3 * b, 3 * b + 1, 3 * b + 2)
        cache.commit()
    # frames 1 .. 3b-4 are invisible from chunk b >= 2 on
    assert all(f not in visible_cached_frames(3 * 5, STREAM) for f in range(1, 3 * 5 - 3))


@pytest.mark.parametrize("window,sink", [(7, 1), (10, 1), (13, 1), (9, 3), (12, 3)])
def test_training_windows_keep_the_sink_and_the_budget(window, sink):
    stream = StreamConfig(latent_h=4, latent_w=6, window_frames=window, sink_frames=sink)
    for start in range(0, 60, 3):
        vis = visible_cached_frames(start, stream)
        assert vis[: min(sink, start)] == tuple(range(min(sink, start)))
        assert len(vis) + 3 == min(window, start + 3)  # the whole budget, once there are frames to fill it
        rolling = [f for f in vis if f >= sink] + [f for f in range(start, start + 3) if f >= sink]
        assert len(rolling) == min(window, start + 3) - min(sink, start + 3)  # all but the sink frames
        assert rolling == list(range(start + 3 - len(rolling), start + 3))  # the most recent ones


def test_rope_table_slices_match_window_positions():
    rope = RopeTable(MICRO, STREAM, "cpu")
    cache = SinkWindowCache(MICRO, STREAM)
    for b in range(4):
        plan = cache.begin_chunk(3 * b)
        direct_k = rope_angles(torch.tensor(plan.cache_positions + plan.query_positions), 2, 3, MICRO.rope_pairs_thw)
        direct_q = rope_angles(torch.tensor(plan.query_positions), 2, 3, MICRO.rope_pairs_thw)
        assert torch.equal(rope.keys(plan), direct_k)
        assert torch.equal(rope.queries(plan), direct_q)
        cache.commit()


def test_rope_axis_split_and_frequencies():
    """d = 128: 22 temporal / 21 row / 21 column pairs; axis with n pairs uses theta^(-2i/2n)."""
    assert ModelConfig.from_name("14b").rope_pairs_thw == (22, 21, 21)
    assert ModelConfig(dim=128, ffn_dim=8, num_heads=2, num_layers=1).rope_pairs_thw == (12, 10, 10)
    a = rope_angles(torch.tensor([0, 5]), rows=3, cols=4, pairs_thw=(22, 21, 21))
    assert a.shape == (2 * 3 * 4, 64)
    tok = 1 * 12 + 2 * 4 + 3  # frame 1 (position 5), row 2, col 3
    assert torch.allclose(a[tok, :22], 5 * 10000.0 ** (-torch.arange(22, dtype=torch.float64) / 22))
    assert torch.allclose(a[tok, 22:43], 2 * 10000.0 ** (-torch.arange(21, dtype=torch.float64) / 21))
    assert torch.allclose(a[tok, 43:], 3 * 10000.0 ** (-torch.arange(21, dtype=torch.float64) / 21))


def _sampler(num_latent: int, stream: StreamConfig = STREAM) -> StreamingSampler:
    model = CausalWanStudent(MICRO).eval()
    sampler = StreamingSampler(model, stream, backend="reference")
    h, w = stream.latent_h, stream.latent_w
    v = 1 + 4 * (num_latent - 1)
    sampler.start_clip(torch.randn(1, 4, 4096), torch.randn(1, v, 8), torch.randn(1, 16, 1, h, w),
                       (torch.rand(1, 1, 1, h, w) > 0.5).float())
    return sampler


def test_cache_memory_is_constant_over_100_chunks():
    sampler = _sampler(300)
    k_ptr, v_ptr, nbytes = sampler.cache.k.data_ptr(), sampler.cache.v.data_ptr(), sampler.cache.nbytes
    lat = torch.randn(1, 16, 3, 4, 6)
    for b in range(100):
        out = sampler.denoise_chunk(lat, lat)
        assert out.start == 3 * b and torch.isfinite(out.x0).all()
        assert len(sampler.cache.frames) <= sampler.cache.capacity
    assert sampler.cache.k.data_ptr() == k_ptr and sampler.cache.v.data_ptr() == v_ptr
    # sink + the 3 frames the next chunk sees: 2 x layers x 4 frames x tokens x dim x fp32
    assert sampler.cache.nbytes == nbytes == 2 * 2 * 1 * 4 * 6 * 64 * 4
    assert sampler.cache.frames == (0, 297, 298, 299)


@pytest.mark.parametrize("window,sink", [(7, 1), (10, 1), (13, 1), (9, 3), (12, 3)])
def test_commit_lays_out_exactly_what_the_next_chunk_sees(window, sink):
    """After every commit the slots hold the next chunk's visible frames in window order; the capacity is the
    largest such set (4 for the released window, not 7)."""
    stream = StreamConfig(latent_h=4, latent_w=6, window_frames=window, sink_frames=sink)
    cache = SinkWindowCache(MICRO, stream)
    assert cache.capacity == max(len(visible_cached_frames(s, stream)) for s in range(0, 90, 3))
    for b in range(25):
        plan = cache.begin_chunk(3 * b)
        assert all(dst < src for src, dst in plan.commit_moves)
        cache.commit()
        assert cache.frames == visible_cached_frames(3 * b + 3, stream)
    assert cache_capacity(StreamConfig(latent_h=4, latent_w=6)) == 4


def test_window_shapes_are_few():
    """Chunk 0, chunk 1 and the steady state: three distinct shapes for the released window."""
    keys = {plan_chunk(3 * b, STREAM).shape_key for b in range(50)}
    assert len(keys) == 3


def test_commit_writes_after_the_layer_reads_the_cache():
    """The commit call's attention must see the previous chunk's frames even though it overwrites their slots:
    a commit call attends exactly like a denoising call on the same input."""
    torch.manual_seed(2)
    sampler = _sampler(9)
    lat = torch.randn(1, 16, 3, 4, 6)
    for _ in range(2):
        sampler.denoise_chunk(lat, lat)
    plan = sampler.cache.begin_chunk(6)
    assert plan.kept_chunk == (0, 3) and plan.kept_slots == (0,)  # chunk 2 overwrites chunk 1's slots 1..3
    x_in = torch.randn(1, 65, 3, 4, 6)
    k_before = sampler.cache.k.clone()
    read = sampler._call(x_in, 0.0, 6, plan, write=False)
    written = sampler._call(x_in, 0.0, 6, plan, write=True)
    assert torch.equal(read, written)
    assert not torch.equal(sampler.cache.k[:, :, 1:4], k_before[:, :, 1:4])  # chunk 2 is now in slots 1..3
    assert torch.equal(sampler.cache.k[:, :, 0], k_before[:, :, 0])  # the sink stays


def test_evicted_frames_do_not_influence_later_chunks():
    """After chunk 2 (frames 6..8) is committed the cache holds frames 0, 6..8. Chunk 3 must not depend on
    frames 3..5 (overwritten), but must depend on the sink (frame 0) and on chunk 2."""
    torch.manual_seed(1)
    lat = [torch.randn(1, 16, 3, 4, 6) for _ in range(4)]
    noise = [torch.randn(1, 16, 3, 4, 6) for _ in range(4)]
    renoise = [torch.randn(1, 16, 3, 4, 6) for _ in range(4)]

    def chunk3(corrupt_frames: tuple[int, ...]) -> torch.Tensor:
        torch.manual_seed(0)
        sampler = _sampler(12)
        for b in range(3):
            sampler.denoise_chunk(lat[b], lat[b], noise[b], [renoise[b]])
        assert sampler.cache.frames == (0, 6, 7, 8)
        for f in corrupt_frames:
            slot = sampler.cache.frames.index(f)
            sampler.cache.k[:, :, slot].normal_()
            sampler.cache.v[:, :, slot].normal_()
        return sampler.denoise_chunk(lat[3], lat[3], noise[3], [renoise[3]]).x0

    clean = chunk3(())
    assert not torch.allclose(chunk3((0,)), clean)
    assert not torch.allclose(chunk3((8,)), clean)


def test_block_causal_mask_follows_the_window():
    m = block_causal_frame_mask(12, STREAM)
    assert m[0:3, 0:3].all() and not m[0:3, 3:].any()
    assert m[3:6, 0:6].all() and not m[3:6, 6:].any()
    assert m[9:12, [0, 6, 7, 8, 9, 10, 11]].all() and not m[9:12, 1:6].any()


def test_commit_without_plan_and_missing_frames_are_errors():
    cache = SinkWindowCache(MICRO, STREAM)
    with pytest.raises(RuntimeError, match=r"commit\(\) without begin_chunk\(\)"):
        cache.commit()
    with pytest.raises(RuntimeError, match="never committed"):
        cache.begin_chunk(6)
    cache.begin_chunk(0)
    cache.commit()
    with pytest.raises(RuntimeError, match="in order"):
        cache.begin_chunk(6)  # skips chunk 1
