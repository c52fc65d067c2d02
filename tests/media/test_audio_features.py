"""wav2vec2 features (SPEC §7) on a tiny random Wav2Vec2 config: shapes, the step rule, the
interpolation before the transformer, agreement with the transformers forward, loading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TOLERANCE
from lipforcing.engine.errors import WeightsError
from lipforcing.engine.media.audio_features import (
    Wav2Vec2Features,
    feature_steps,
    interpolate_steps,
    normalize_waveform,
)
from lipforcing.engine.media.length import clip_length_from_samples
from lipforcing.engine.numerics import rel_error

transformers = pytest.importorskip("transformers")

HIDDEN, LAYERS = 32, 2


def tiny_model(stable: bool = False) -> object:
    config = transformers.Wav2Vec2Config(
        hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        do_stable_layer_norm=stable, feat_extract_norm="layer" if stable else "group",
    )
    torch.manual_seed(0)
    return transformers.Wav2Vec2Model(config).eval()


@pytest.fixture(scope="module")
def extractor() -> Wav2Vec2Features:
    return Wav2Vec2Features(tiny_model())


def speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.2 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t)) + 0.05 * rng.standard_normal(t.size)
            ).astype(np.float32)


@pytest.mark.parametrize("samples, frames, steps", [(16000, 20, 25), (16000, 30, 30), (16001, 0, 26), (640, 1, 1)])
def test_feature_steps_rule(samples: int, frames: int, steps: int) -> None:
    assert feature_steps(samples, frames) == steps


def test_output_shape_and_layout(extractor: Wav2Vec2Features) -> None:
    audio = speech_like(1.3)
    n = clip_length_from_samples(audio.size).frames  # 1.3 s -> 32 raw -> L 6 -> N 21
    feats = extractor(audio, n)
    assert feats.shape == (n, (LAYERS + 2) * HIDDEN) == (21, 128)
    assert extractor.feature_dim == 128
    # Post-norm model: last_hidden_state is also hidden_states[L] (the final slot).
    torch.testing.assert_close(feats[:, :HIDDEN], feats[:, -HIDDEN:], rtol=0, atol=0)


def test_interpolation_length_rule(extractor: Wav2Vec2Features) -> None:
    audio = torch.from_numpy(speech_like(1.0))
    wave = normalize_waveform(audio[None])
    # N below ceil(S / 640) = 25: the run uses 25 steps and keeps the first N.
    last, states = extractor.hidden_states(wave, 25)
    torch.testing.assert_close(extractor(audio, 20), torch.cat([last, *states], -1)[0, :20])
    # N above it: N steps, all kept.
    assert extractor(audio, 40).shape[0] == 40
    assert extractor.hidden_states(wave, 40)[0].shape == (1, 40, HIDDEN)


def test_hidden_state_zero_is_interpolated_encoder_input(extractor: Wav2Vec2Features) -> None:
    model = extractor.model
    audio = speech_like(0.9, seed=3)
    n, steps = 21, feature_steps(audio.size, 21)  # 23 CNN-steps rule vs 21 frames -> 23 steps
    feats = extractor(audio, n)
    with torch.no_grad():
        wave = torch.from_numpy((audio - audio.mean()) / np.sqrt(audio.var() + 1e-7))[None]
        cnn = model.feature_extractor(wave)[0].T.double().numpy()  # [T_cnn, C], ~50 Hz
        # Independent linear interpolation with align_corners=True: step j samples position j (T_cnn-1)/(T-1).
        pos = np.arange(steps) * (cnn.shape[0] - 1) / (steps - 1)
        interp = np.stack([np.interp(pos, np.arange(cnn.shape[0]), cnn[:, c]) for c in range(cnn.shape[1])], -1)
        x, _ = model.feature_projection(torch.from_numpy(interp).float()[None])
        h0 = model.encoder.layer_norm(x + model.encoder.pos_conv_embed(x))[0, :n]
    assert cnn.shape[0] != steps  # the interpolation really resamples
    assert rel_error(feats[:, HIDDEN : 2 * HIDDEN], h0) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("stable", [False, True])
def test_matches_transformers_forward_without_resampling(stable: bool) -> None:
    model = tiny_model(stable)
    extractor = Wav2Vec2Features(model)
    wave = normalize_waveform(torch.from_numpy(speech_like(0.8))[None])
    t_cnn = model.feature_extractor(wave).shape[-1]
    last, states = extractor.hidden_states(wave, t_cnn)  # same length: interpolation is the identity
    with torch.no_grad():
        ref = model(wave, output_hidden_states=True)
    assert rel_error(last, ref.last_hidden_state) < TOLERANCE[torch.float32]
    # transformers >= 5 records the last layer's raw output for pre-norm models; we keep the
    # transformers 4 convention (the final LayerNorm output) there, so compare the others.
    for ours, theirs in list(zip(states, ref.hidden_states))[: LAYERS if stable else LAYERS + 1]:
        assert rel_error(ours, theirs) < TOLERANCE[torch.float32]


def test_waveform_normalization_makes_features_gain_invariant(extractor: Wav2Vec2Features) -> None:
    audio = speech_like(0.6)
    a, b = extractor(audio, 9), extractor(3.0 * audio + 0.1, 9)
    assert rel_error(b, a) < 1e-4


def test_loading_from_a_local_directory(tmp_path: Path, extractor: Wav2Vec2Features) -> None:
    with pytest.raises(WeightsError, match=r"config\.json and model\.safetensors"):
        Wav2Vec2Features.from_dir(tmp_path)
    extractor.model.save_pretrained(tmp_path)
    loaded = Wav2Vec2Features.from_dir(tmp_path)
    audio = speech_like(0.5)
    torch.testing.assert_close(loaded(audio, 9), extractor(audio, 9))


def test_interpolate_steps_endpoints() -> None:
    x = torch.randn(1, 7, 5)
    y = interpolate_steps(x, 13)
    torch.testing.assert_close(y[:, 0], x[:, 0])
    torch.testing.assert_close(y[:, -1], x[:, -1])
    torch.testing.assert_close(y[:, 6], (x[:, 3]))  # position 6 * 6 / 12 = 3
