"""Per-video-frame wav2vec2 audio features (SPEC §7), computed once per clip.

    extractor = Wav2Vec2Features.from_dir("weights/wav2vec2-base-960h", device="cuda")
    feats = extractor(audio, n_frames)        # audio: float32 [S] 16 kHz mono -> [N, 10752]

The local directory holds a Hugging Face `Wav2Vec2Model` checkpoint: config.json and
model.safetensors (or pytorch_model.bin). Nothing is downloaded.

Computation, per clip:
1. waveform normalized to zero mean / unit variance: (x - mean) / sqrt(var + 1e-7), as the
   wav2vec2-base-960h feature extractor does;
2. CNN feature encoder (~50 Hz, 320-sample hop);
3. CNN features linearly interpolated (align_corners=True) over time to exactly
   T = max(ceil(S / 640), N) steps (640 samples = one 25 fps video frame at 16 kHz);
4. feature projection, then the transformer encoder run layer by layer:
   hidden_states[0] = encoder input after the positional convolution (and the encoder LayerNorm for
   post-norm models such as base-960h), hidden_states[i] = output of layer i (for pre-norm "stable
   layer norm" models the last one is the final LayerNorm output, as transformers 4 reported it);
5. per step concat[last_hidden_state, hidden_states[0], ..., hidden_states[L]]: (L + 2) x hidden
   channels, 14 x 768 = 10752 for base-960h; the first N steps are kept.

The attention is global over the clip: memory grows with the square of the clip length.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import WeightsError

SAMPLES_PER_FRAME = 640  # 16000 Hz / 25 fps
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def feature_steps(n_samples: int, n_frames: int) -> int:
    """Encoder steps T = max(ceil(n_samples / 640), n_frames)."""
    return max(math.ceil(n_samples / SAMPLES_PER_FRAME), n_frames)


def normalize_waveform(audio: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance over the last axis: (x - mean) / sqrt(var + 1e-7) (population var)."""
    mean = audio.mean(-1, keepdim=True)
    var = audio.var(-1, keepdim=True, unbiased=False)
    return (audio - mean) / torch.sqrt(var + 1e-7)


def interpolate_steps(features: torch.Tensor, steps: int) -> torch.Tensor:
    """Linear resampling over time with align_corners=True: [B, T_in, C] -> [B, steps, C]."""
    return F.interpolate(features.transpose(1, 2), size=steps, mode="linear", align_corners=True).transpose(1, 2)


class Wav2Vec2Features(torch.nn.Module):
    """Runs a transformers `Wav2Vec2Model` with the SPEC §7 interpolation before the transformer."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model.eval()
        self.num_layers = model.config.num_hidden_layers
        self.hidden_size = model.config.hidden_size

    @property
    def feature_dim(self) -> int:
        """(num_layers + 2) * hidden: 14 * 768 = 10752 for wav2vec2-base."""
        return (self.num_layers + 2) * self.hidden_size

    @classmethod
    def from_dir(
        cls, path: str | os.PathLike[str], *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> Wav2Vec2Features:
        """Load config.json + model.safetensors / pytorch_model.bin from a local directory."""
        folder = Path(path)
        if not (folder / "config.json").is_file() or not any((folder / f).is_file() for f in WEIGHT_FILES):
            raise WeightsError(
                f"wav2vec2 weights not found in {folder}: it needs config.json and model.safetensors "
                "(or pytorch_model.bin) of facebook/wav2vec2-base-960h; download them once and point "
                "the audio-encoder option at that directory"
            )
        try:
            from transformers import Wav2Vec2Model
        except ImportError as err:
            raise WeightsError("the wav2vec2 audio encoder needs transformers: pip install transformers") from err
        try:
            model = Wav2Vec2Model.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, RuntimeError) as err:
            raise WeightsError(f"cannot load wav2vec2 from {folder}: {err}") from err
        return cls(model.to(device=device, dtype=dtype))

    @torch.no_grad()
    def hidden_states(self, audio: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Encoder states of a normalized waveform: audio [B, S] -> (last [B, T, H], [L + 1] x [B, T, H])."""
        model = self.model
        cnn = model.feature_extractor(audio).transpose(1, 2)  # [B, T_cnn, C]
        cnn = interpolate_steps(cnn, steps)
        x, _ = model.feature_projection(cnn)  # [B, T, H]
        encoder = model.encoder
        x = x + encoder.pos_conv_embed(x)
        stable = bool(model.config.do_stable_layer_norm)
        if not stable:  # post-norm models normalize before the first layer, pre-norm ones after the last
            x = encoder.layer_norm(x)
        states = [x]
        for layer in encoder.layers:
            out = layer(x, attention_mask=None)
            x = out[0] if isinstance(out, tuple) else out
            states.append(x)
        if stable:
            x = encoder.layer_norm(x)
            states[-1] = x
        return x, states

    @torch.no_grad()
    def forward(self, audio: np.ndarray | torch.Tensor, n_frames: int) -> torch.Tensor:
        """audio: float [S] at 16 kHz mono -> features float [n_frames, (L + 2) * hidden].

        n_frames is the clip's video frame count N (SPEC §6).
        """
        param = next(self.model.parameters())
        wave = torch.as_tensor(np.asarray(audio) if not isinstance(audio, torch.Tensor) else audio)
        wave = normalize_waveform(wave.to(param.device, torch.float32).reshape(1, -1)).to(param.dtype)
        steps = feature_steps(wave.shape[-1], n_frames)
        last, states = self.hidden_states(wave, steps)
        feats = torch.cat([last, *states], dim=-1)  # [1, T, (L + 2) * H]
        return feats[0, :n_frames]
