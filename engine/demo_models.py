"""Random-weight networks for the ``tiny`` model: the whole pipeline runs with no downloads.

The student is the ``tiny`` preset; the Wan VAE, TAEHV and wav2vec2 are the real architectures at reduced
width. Their outputs are not meaningful images or features; they exercise every stage at real shapes
(512x512 faces, 64x64 latents) so that demos and tests run the same code paths as a real model.
"""

from __future__ import annotations

import torch

from .config import ModelConfig
from .model import CausalWanStudent
from .taehv import TAEHV, TAEHVConfig
from .wan_vae import WanVAE, WanVAEConfig

TINY_WAV2VEC = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                    conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)


class TinyWav2Vec2:
    """A randomly initialised wav2vec2 (transformers modules) wrapped like ``Wav2Vec2Features``."""

    def __new__(cls, seed: int = 0):
        from transformers import Wav2Vec2Config, Wav2Vec2Model

        from .audio_features import Wav2Vec2Features

        torch.manual_seed(seed)
        return Wav2Vec2Features(Wav2Vec2Model(Wav2Vec2Config(**TINY_WAV2VEC)))


def tiny_components(device: torch.device, seed: int = 0):
    """(student, wan_vae, taehv, audio_features, text_context) with random weights, float32."""
    cfg = ModelConfig.from_name("tiny")
    torch.manual_seed(seed)
    student = CausalWanStudent(cfg)
    with torch.no_grad():
        for p in student.parameters():  # zero-initialised modulations would make every block an identity
            if p.dim() >= 2 or p.shape[-1] == cfg.dim:
                p.normal_(0, 0.02)
    vae = WanVAE(WanVAEConfig.from_name("tiny")).eval()
    taehv = TAEHV(TAEHVConfig(encoder_width=16, decoder_widths=(32, 16, 16, 16))).eval()
    with torch.no_grad():  # centre the random decoder's output in [0, 1] so the painted region is visible
        taehv.decoder[-1].bias.fill_(0.5)
    audio = TinyWav2Vec2(seed)
    if audio.feature_dim != cfg.audio_dim:
        raise AssertionError(f"tiny wav2vec2 gives {audio.feature_dim} channels, tiny student expects {cfg.audio_dim}")
    text = torch.randn(1, cfg.text_len, cfg.text_dim, generator=torch.Generator().manual_seed(seed))
    text[:, cfg.text_len * 3 // 4 :] = 0  # padding positions are zero vectors, as in real embeddings
    return (student.eval().to(device), vae.to(device), taehv.to(device), audio.to(device), text)
