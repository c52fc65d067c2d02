"""The clip-length rule of SPEC §6: frame counts, chunk ranges, ping-pong extension."""

from __future__ import annotations

import numpy as np
import pytest

from lipforcing.engine.errors import LipforcingError, MediaError
from lipforcing.engine.media.length import (
    ClipLength,
    chunk_frame_range,
    clip_length,
    clip_length_from_samples,
    ping_pong_indices,
)


@pytest.mark.parametrize(
    "duration, raw, latent, frames",
    [(0.36, 9, 3, 9), (0.5, 12, 3, 9), (0.68, 17, 3, 9), (0.84, 21, 6, 21), (1.0, 25, 6, 21),
     (3.24, 81, 21, 81), (3.4, 85, 21, 81), (5.0, 125, 30, 117), (5.0155, 125, 30, 117), (10.0, 250, 63, 249)],
)
def test_clip_length_table(duration: float, raw: int, latent: int, frames: int) -> None:
    length = clip_length(duration)
    assert (length.raw_frames, length.latent_frames, length.frames) == (raw, latent, frames)
    assert length.latent_frames % 3 == 0 and length.chunks == latent // 3
    assert length.duration_s == pytest.approx(frames / 25)


def test_clip_length_too_short_is_a_clear_error() -> None:
    with pytest.raises(MediaError, match=r"too short.*0\.36 s"):
        clip_length(0.35)
    with pytest.raises(MediaError, match="too short"):
        clip_length_from_samples(5759, 16000)  # 0.3599 s
    assert clip_length_from_samples(5760, 16000).frames == 9  # exactly 0.36 s
    assert issubclass(MediaError, LipforcingError)


def test_chunk_ranges_tile_the_clip() -> None:
    assert chunk_frame_range(0) == range(0, 9)
    assert chunk_frame_range(1) == range(9, 21)
    assert chunk_frame_range(3) == range(33, 45)
    length = ClipLength(raw_frames=125, latent_frames=30, frames=117)
    covered = [i for b in range(length.chunks) for i in length.chunk_frames(b)]
    assert covered == list(range(length.frames))
    with pytest.raises(IndexError, match=f"chunk {length.chunks} out of range"):
        length.chunk_frames(length.chunks)


@pytest.mark.parametrize(
    "n_src, n_out, expected",
    [(3, 8, [0, 1, 2, 1, 0, 1, 2, 1]), (1, 4, [0, 0, 0, 0]), (5, 3, [0, 1, 2]), (2, 5, [0, 1, 0, 1, 0]),
     (4, 4, [0, 1, 2, 3])],
)
def test_ping_pong_indices(n_src: int, n_out: int, expected: list[int]) -> None:
    assert ping_pong_indices(n_src, n_out).tolist() == expected


def test_ping_pong_steps_by_one() -> None:
    idx = ping_pong_indices(7, 100)
    assert np.all(np.abs(np.diff(idx)) == 1) and idx.min() == 0 and idx.max() == 6
