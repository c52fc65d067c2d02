"""Random-weight networks for the ``tiny`` model: the whole pipeline runs with no downloads.

The student is the ``tiny`` preset; the Wan VAE, TAEHV and wav2vec2 are the real architectures at reduced
width. Their outputs are not meaningful images or features; they exercise every stage at real shapes
(512x512 faces, 64x64 latents) so that demos and tests run the same code paths as a real model.

    student, vae, taehv, text = tiny_networks(device, seed=0)
    audio = tiny_wav2vec2(seed=0)                 # a Wav2Vec2Features with random weights
"""

from __future__ import annotations

import torch

from ..codecs.taehv import TAEHV, TAEHVConfig
from ..codecs.wan_vae import WanVAE, WanVAEConfig
from ..dit.build import random_student
from ..dit.config import ModelConfig
from ..media.audio_features import Wav2Vec2Features

TINY_WAV2VEC = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                    conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
TINY_TAEHV = TAEHVConfig(encoder_width=16, decoder_widths=(32, 16, 16, 16))


def tiny_wav2vec2(seed: int = 0) -> Wav2Vec2Features:
    """A randomly initialised wav2vec2 (transformers modules, 4 x 64 = 256 feature channels)."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    torch.manual_seed(seed)
    return Wav2Vec2Features(Wav2Vec2Model(Wav2Vec2Config(**TINY_WAV2VEC)))


def tiny_networks(device: torch.device | str, seed: int = 0):
    """(student, wan_vae, taehv, text_context) with random weights, float32, on ``device``."""
    cfg = ModelConfig.from_name("tiny")
    student = random_student(cfg, device=device, dtype=torch.float32, seed=seed)
    torch.manual_seed(seed)
    vae = WanVAE(WanVAEConfig.from_name("tiny")).eval()
    taehv = TAEHV(TINY_TAEHV).eval()
    with torch.no_grad():  # centre the random decoder's output in [0, 1] so the painted region is visible
        taehv.decoder[-1].bias.fill_(0.5)
    text = torch.randn(1, cfg.text_len, cfg.text_dim, generator=torch.Generator().manual_seed(seed))
    text[:, cfg.text_len * 3 // 4 :] = 0  # padding positions are zero vectors, as in real embeddings
    return student, vae.to(device), taehv.to(device), text
