"""Speech that arrives as it is spoken: a growing 16 kHz buffer and wav2vec2 features over a sliding window.

    speech = SpeechBuffer()
    speech.push(samples, rate=48000)          # any rate and layout; resampled to 16 kHz mono as it streams
    speech.end()                              # no more speech: the last chunks use what there is
    window = WindowedFeatures(extractor, lookahead_s=0.32, context_s=4.0)
    if window.ready(speech, frame_stop):      # the chunk's audio and its look-ahead have arrived
        feats = window.features(speech, frame_start, frame_stop)    # [frames, audio_dim]

The released model runs wav2vec2 over the whole clip (its attention is global). Live, the features of a
chunk's frames come from one wav2vec2 pass over a window of the speech: ``context_s`` seconds before the
chunk (the past is known) and ``lookahead_s`` seconds after it (which the chunk has to wait for). Inside the
window the computation is the file mode's (SPEC §7: the window's waveform normalized, CNN features
interpolated to one step per video frame, then the transformer), so a window that spans the whole clip
gives the file mode's features exactly. ``lookahead_report`` measures how far shorter windows are from
them, layer by layer, and what each look-ahead adds to the latency.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import MediaError
from ..numerics import rel_error
from .audio_features import SAMPLES_PER_FRAME, Wav2Vec2Features
from .length import AUDIO_RATE, OUTPUT_FPS

DEFAULT_CONTEXT_S = 4.0
"""Seconds of past speech in every window."""


class SpeechBuffer:
    """Speech received so far, as 16 kHz mono float32; older samples than needed can be dropped."""

    def __init__(self) -> None:
        self._parts: list[np.ndarray] = []
        self._start = 0  # absolute index of the first kept sample
        self.samples = 0  # samples received (absolute)
        self.ended = False
        self._resampler = None
        self._rate: int | None = None

    def push(self, samples: np.ndarray, rate: int = AUDIO_RATE) -> None:
        """samples: float [S] mono, or [C, S] / [S, C] channels (averaged), at ``rate`` Hz."""
        if self.ended:
            raise MediaError("speech pushed after end(): start a new session")
        audio = np.asarray(samples, dtype=np.float32)
        if audio.ndim == 2:  # channels: whichever axis is the short one
            audio = audio.mean(axis=0 if audio.shape[0] <= audio.shape[1] else 1)
        if audio.ndim != 1:
            raise MediaError(f"speech must be [S] or [C, S] samples, got shape {audio.shape}")
        if not np.isfinite(audio).all():
            raise MediaError("speech holds NaN or infinite samples")
        if self._rate is not None and rate != self._rate:
            raise MediaError(f"speech rate changed from {self._rate} Hz to {rate} Hz within a session")
        self._rate = rate
        if rate != AUDIO_RATE:
            audio = self._resample(audio, rate)
        if audio.size:
            self._parts.append(audio)
            self.samples += audio.size

    def silence(self, samples: int) -> None:
        """Append ``samples`` samples of silence at 16 kHz, whatever rate the speech comes at (a stall of a
        live speaker filled in)."""
        if self.ended:
            raise MediaError("speech pushed after end(): start a new session")
        if samples > 0:
            self._parts.append(np.zeros(samples, np.float32))
            self.samples += samples

    def _resample(self, audio: np.ndarray, rate: int, flush: bool = False) -> np.ndarray:
        """Streaming resampling to 16 kHz (PyAV's libswresample keeps its filter state between pushes)."""
        import av

        if self._resampler is None:
            self._resampler = av.AudioResampler(format="flt", layout="mono", rate=AUDIO_RATE)
        frames = []
        if not flush:
            frame = av.AudioFrame.from_ndarray(audio[None], format="flt", layout="mono")
            frame.sample_rate = rate
            frames = self._resampler.resample(frame)
        else:
            frames = self._resampler.resample(None)
        out = [f.to_ndarray().reshape(-1) for f in frames]
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)

    def end(self) -> None:
        """No more speech will come."""
        if self.ended:
            return
        if self._resampler is not None:
            tail = self._resample(np.zeros(0, np.float32), self._rate, flush=True)
            if tail.size:
                self._parts.append(tail)
                self.samples += tail.size
        self.ended = True

    @property
    def frames(self) -> int:
        """Video frames (25 fps) whose audio has fully arrived."""
        return self.samples // SAMPLES_PER_FRAME

    def window(self, start: int, stop: int) -> np.ndarray:
        """Samples [start, stop) (absolute); what has not arrived (or was dropped) reads as silence."""
        if self._parts:
            self._parts = [np.concatenate(self._parts)]
        kept = self._parts[0] if self._parts else np.zeros(0, np.float32)
        out = np.zeros(max(0, stop - start), np.float32)
        lo, hi = max(start, self._start), min(stop, self._start + kept.size)
        if hi > lo:
            out[lo - start : hi - start] = kept[lo - self._start : hi - self._start]
        return out

    def drop_before(self, sample: int) -> None:
        """Forget samples before ``sample`` (a long session keeps only the window's context)."""
        if sample <= self._start or not self._parts:
            return
        kept = np.concatenate(self._parts)
        cut = min(sample - self._start, kept.size)
        self._parts, self._start = [kept[cut:]], self._start + cut


class WindowedFeatures:
    """wav2vec2 features of a run of video frames from a window of the speech around them."""

    def __init__(self, extractor, *, lookahead_s: float, context_s: float = DEFAULT_CONTEXT_S) -> None:
        if lookahead_s < 0 or context_s < 0:
            raise MediaError(f"look-ahead and context must be >= 0 s, got {lookahead_s} and {context_s}")
        self.extractor = extractor
        self.lookahead = math.ceil(lookahead_s * OUTPUT_FPS)  # frames
        self.context = math.ceil(context_s * OUTPUT_FPS)

    def ready(self, speech: SpeechBuffer, stop: int) -> bool:
        """Whether frames up to ``stop`` can be computed: their audio and the look-ahead are in (or the speech
        ended)."""
        return speech.ended or speech.frames >= stop + self.lookahead

    def window(self, speech: SpeechBuffer, start: int, stop: int) -> tuple[int, int]:
        """The frame window [w0, w1) whose speech gives the features of frames [start, stop)."""
        w1 = stop + self.lookahead
        if speech.ended:
            w1 = max(stop, min(w1, speech.frames))
        return max(0, start - self.context), w1

    def speech_for(self, speech: SpeechBuffer, start: int, stop: int) -> tuple[np.ndarray, int]:
        """(the window's samples, its first frame) for frames [start, stop): a copy, so the wav2vec2 pass can run
        while more speech arrives."""
        w0, w1 = self.window(speech, start, stop)
        end = w1 * SAMPLES_PER_FRAME
        if speech.ended and w1 >= speech.frames:  # the window reaches the end: all of it, as the file mode reads it
            end = max(end, speech.samples)
        return speech.window(w0 * SAMPLES_PER_FRAME, end), w0

    def features_of(self, audio: np.ndarray, w0: int, start: int, stop: int) -> torch.Tensor:
        """Features of frames [start, stop) from ``speech_for``'s window: [stop - start, audio_dim]."""
        return self.extractor(audio, audio.size // SAMPLES_PER_FRAME)[start - w0 : stop - w0]

    def features(self, speech: SpeechBuffer, start: int, stop: int) -> torch.Tensor:
        """Features of frames [start, stop): [stop - start, audio_dim]."""
        audio, w0 = self.speech_for(speech, start, stop)
        return self.features_of(audio, w0, start, stop)


@dataclass(frozen=True)
class LookaheadFigures:
    lookahead_s: float
    context_s: float
    rel_error_per_layer: list[float]
    """Relative L2 error of each of the extractor's feature blocks (last_hidden_state, hidden_states[0..L]),
    windowed vs the file mode's whole-clip features, over the clip."""
    rel_error: float
    """Over all feature channels."""
    rel_error_same_grid: float
    """Against whole-clip features of the speech cut to whole frames: the file mode interpolates the CNN
    features to max(ceil(n / 640), N) steps, a grid that drifts by up to one step against the frames' times;
    windows of whole frames sit on the frames' times. This figure leaves that drift out and measures what the
    limited context and look-ahead alone change."""
    added_latency_s: float
    """What the look-ahead adds to a chunk's latency: its audio must have arrived."""
    compute_ms_per_chunk: float
    """Wall time of one window's wav2vec2 pass on this machine."""


def lookahead_report(
    extractor: Wav2Vec2Features,
    speech: np.ndarray,
    lookaheads_s: tuple[float, ...] = (0.0, 0.16, 0.32, 0.64, 1.28),
    context_s: float = DEFAULT_CONTEXT_S,
) -> list[LookaheadFigures]:
    """Windowed features chunk by chunk (9 frames, then 12) against whole-clip features of the same speech."""
    frames = speech.size // SAMPLES_PER_FRAME
    full = extractor(speech, frames)  # [N, (L + 2) * H]
    same_grid = extractor(speech[: frames * SAMPLES_PER_FRAME], frames)
    blocks = extractor.num_layers + 2
    out = []
    for lookahead in lookaheads_s:
        buffer = SpeechBuffer()
        buffer.push(speech)
        buffer.end()
        window = WindowedFeatures(extractor, lookahead_s=lookahead, context_s=context_s)
        parts, started, times = [], 0, []
        while started < frames:
            stop = min(frames, started + (9 if started == 0 else 12))
            began = time.perf_counter()
            parts.append(window.features(buffer, started, stop))
            times.append(time.perf_counter() - began)
            started = stop
        got = torch.cat(parts)
        per_block = [rel_error(b1, b0) for b1, b0 in zip(got.chunk(blocks, dim=-1), full.chunk(blocks, dim=-1))]
        out.append(LookaheadFigures(lookahead_s=lookahead, context_s=context_s, rel_error_per_layer=per_block,
                                    rel_error=rel_error(got, full), rel_error_same_grid=rel_error(got, same_grid),
                                    added_latency_s=window.lookahead / OUTPUT_FPS,
                                    compute_ms_per_chunk=1e3 * float(np.median(times))))
    return out
