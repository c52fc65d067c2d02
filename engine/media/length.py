"""The clip-length rule of SPEC §6: how many frames, latent frames and chunks a clip of speech makes.

    length = clip_length_from_samples(audio.size, 16000)   # N frames, L latent frames, chunks
    chunk_frame_range(b)                                   # pixel frames of chunk b: [0, 9), [9, 21), ...
    ping_pong_indices(n_src, n_out)                        # a short video extended forwards and back

N_raw = floor(25 d) frames for d seconds of audio; L = max(3, 3 floor(L_raw / 3)) latent frames with
L_raw = 1 + (N_raw - 1) // 4; the output has N = 1 + 4 (L - 1) frames (up to ~0.5 s shorter than the
audio), in chunks of 9 frames (the first) and 12.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import MediaError

OUTPUT_FPS = 25
AUDIO_RATE = 16000
MIN_FRAMES = 9  # 3 latent frames = 1 + 4 * 2 pixel frames: the shortest clip the sampler can make


@dataclass(frozen=True)
class ClipLength:
    """Frame counts of a clip driven by audio of a given duration (SPEC §6)."""

    raw_frames: int
    """N_raw = floor(25 d): video frames the audio would cover."""
    latent_frames: int
    """L = max(3, 3 floor(L_raw / 3)) with L_raw = 1 + (N_raw - 1) // 4; always a multiple of 3."""
    frames: int
    """N = 1 + 4 (L - 1): output video frames (up to ~0.5 s shorter than the audio)."""

    @property
    def chunks(self) -> int:
        """Number of 3-latent-frame chunks."""
        return self.latent_frames // 3

    @property
    def duration_s(self) -> float:
        """Output duration N / 25 seconds."""
        return self.frames / OUTPUT_FPS

    def chunk_frames(self, b: int) -> range:
        """Pixel frames of chunk b: [0, 9) for b = 0, [9 + 12 (b - 1), 9 + 12 b) after."""
        if not 0 <= b < self.chunks:
            raise IndexError(f"chunk {b} out of range 0..{self.chunks - 1}")
        return chunk_frame_range(b)


def chunk_frame_range(b: int) -> range:
    """Pixel frames decoded by chunk b (latent frames 3b .. 3b+2)."""
    if b < 0:
        raise IndexError(f"chunk index must be >= 0, got {b}")
    return range(0, 9) if b == 0 else range(9 + 12 * (b - 1), 9 + 12 * b)


def clip_length_from_frames(raw_frames: int) -> ClipLength:
    """SPEC §6 rule from N_raw (video frames the audio covers); MediaError when N_raw < 9."""
    if raw_frames < MIN_FRAMES:
        raise MediaError(
            f"the audio is too short: it covers {raw_frames} video frames ({raw_frames / OUTPUT_FPS:.2f} s) "
            f"but at least {MIN_FRAMES} frames ({MIN_FRAMES / OUTPUT_FPS:.2f} s) are needed; use longer audio"
        )
    latent_raw = 1 + (raw_frames - 1) // 4
    latent = max(3, 3 * (latent_raw // 3))
    return ClipLength(raw_frames=raw_frames, latent_frames=latent, frames=1 + 4 * (latent - 1))


def clip_length(duration_s: float) -> ClipLength:
    """SPEC §6 rule from an audio duration in seconds.

    N_raw = floor(25 d) is computed as floor(25 d + 1e-9) so that durations written in decimal
    (0.36 s) are not pushed one frame down by binary rounding. Prefer `clip_length_from_samples`
    when the sample count is known (exact integer arithmetic).
    """
    if not math.isfinite(duration_s) or duration_s < 0:
        raise MediaError(f"invalid audio duration {duration_s!r} s")
    return clip_length_from_frames(math.floor(OUTPUT_FPS * duration_s + 1e-9))


def clip_length_from_samples(n_samples: int, sample_rate: int = AUDIO_RATE) -> ClipLength:
    """SPEC §6 rule from an audio length in samples: N_raw = floor(25 n / sr), exactly."""
    return clip_length_from_frames((n_samples * OUTPUT_FPS) // sample_rate)


def ping_pong_indices(n_src: int, n_out: int) -> np.ndarray:
    """Source frame index for each of n_out output frames: int64 [n_out].

    Truncates a long source (0 .. n_out-1) and extends a short one by ping-pong:
    0 .. n-1, n-2 .. 1, 0 .. n-1, ... (the end frames are not repeated). n_src = 1 repeats frame 0.
    """
    if n_src < 1:
        raise MediaError("the source video has no frames")
    k = np.arange(n_out, dtype=np.int64)
    if n_src == 1:
        return np.zeros(n_out, dtype=np.int64)
    period = 2 * (n_src - 1)
    r = k % period
    return np.where(r < n_src, r, period - r)
