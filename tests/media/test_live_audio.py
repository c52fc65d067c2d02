"""Live speech: the growing 16 kHz buffer and windowed wav2vec2 features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lipforcing.engine.errors import MediaError
from lipforcing.engine.media.live_audio import SpeechBuffer, WindowedFeatures, lookahead_report

pytest.importorskip("transformers")
pytest.importorskip("av")


@pytest.fixture(scope="module")
def extractor():
    from lipforcing.engine.tools.tiny import tiny_wav2vec2

    return tiny_wav2vec2(seed=0)


def _speech(seconds: float, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(0)
    return (0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t)) + 0.05 * rng.standard_normal(t.size)
            ).astype(np.float32)


def test_buffer_resamples_mixes_and_forgets():
    buffer = SpeechBuffer()
    stereo = np.stack([_speech(0.5, 48000), _speech(0.5, 48000)])  # [C, S] at 48 kHz
    for part in np.array_split(stereo, 5, axis=1):
        buffer.push(part, 48000)
    buffer.end()
    assert abs(buffer.samples - 8000) <= 32  # 0.5 s at 16 kHz, streamed in pieces
    assert buffer.frames == buffer.samples // 640
    window = buffer.window(7000, 9000)
    assert window.shape == (2000,) and not window[buffer.samples - 7000 :].any()  # beyond the end: silence
    buffer.drop_before(4000)
    assert not buffer.window(0, 4000).any() and buffer.window(4000, 4100).any()
    with pytest.raises(MediaError, match="after end"):
        buffer.push(np.zeros(10, np.float32))
    other = SpeechBuffer()
    other.push(np.zeros(100, np.float32), 22050)
    with pytest.raises(MediaError, match="rate changed"):
        other.push(np.zeros(100, np.float32), 16000)
    with pytest.raises(MediaError, match="NaN"):
        SpeechBuffer().push(np.array([np.nan], np.float32))


def test_a_window_spanning_the_clip_gives_the_file_modes_features(extractor):
    speech = _speech(2.3)
    frames = speech.size // 640
    whole = extractor(speech, frames)
    buffer = SpeechBuffer()
    buffer.push(speech)
    buffer.end()
    window = WindowedFeatures(extractor, lookahead_s=10.0, context_s=10.0)
    got = torch.cat([window.features(buffer, s, min(frames, s + 12)) for s in range(0, frames, 12)])
    assert torch.equal(got, whole)


def test_readiness_waits_for_the_lookahead(extractor):
    window = WindowedFeatures(extractor, lookahead_s=0.32, context_s=1.0)
    assert window.lookahead == 8 and window.context == 25
    buffer = SpeechBuffer()
    buffer.push(_speech(0.6))  # 15 frames
    assert window.ready(buffer, 7) and not window.ready(buffer, 8)
    assert window.window(buffer, 30, 42) == (5, 50)
    buffer.end()
    assert window.ready(buffer, 100)  # the speech ended: nothing more to wait for
    feats = window.features(buffer, 9, 21)  # frames past the end read silence
    assert feats.shape == (12, extractor.feature_dim) and torch.isfinite(feats).all()


def test_lookahead_report(extractor):
    report = lookahead_report(extractor, _speech(2.0), lookaheads_s=(0.0, 0.32, 5.0), context_s=5.0)
    assert [r.lookahead_s for r in report] == [0.0, 0.32, 5.0]
    assert [r.added_latency_s for r in report] == [0.0, 0.32, 5.0]
    assert all(len(r.rel_error_per_layer) == extractor.num_layers + 2 for r in report)
    assert report[-1].rel_error == 0.0 and report[0].rel_error > 0  # a window over the whole clip is exact
