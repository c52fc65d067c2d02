"""Pieces of the media pipeline that need no media: text embeddings, the weights check, codec adapters."""

from __future__ import annotations

import pytest
import torch

from conftest import rel_err
from lipforcing.engine.codecs import make_decoder, make_encoder
from lipforcing.engine.config import ModelConfig
from lipforcing.engine.errors import WeightsError
from lipforcing.engine.pipeline import RunConfig, Weights, load_text_embeds, missing_weights
from lipforcing.engine.taehv import TAEHV, TAEHVConfig
from lipforcing.engine.wan_vae import WanVAE, WanVAEConfig

CFG = ModelConfig.from_name("tiny")


def test_text_embeds_accept_tensor_2d_and_dict(tmp_path):
    emb = torch.randn(1, 16, 4096)
    for name, obj in (("a.pt", emb), ("b.pt", emb[0]), ("c.pt", {"context": emb})):
        torch.save(obj, tmp_path / name)
        assert torch.equal(load_text_embeds(str(tmp_path / name), CFG), emb)
    torch.save(torch.randn(1, 16, 512), tmp_path / "bad.pt")
    with pytest.raises(WeightsError, match=r"\[1, text_len, 4096\]"):
        load_text_embeds(str(tmp_path / "bad.pt"), CFG)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(WeightsError, match="cannot read"):
        load_text_embeds(str(tmp_path / "junk.pt"), CFG)


def test_missing_weights_depend_on_the_codecs(tmp_path):
    assert missing_weights(RunConfig(model="tiny"), Weights()) == []
    lines = missing_weights(RunConfig(model="14b", encoder="taehv", decoder="taehv"), Weights())
    flags = {line.split()[0] for line in lines}
    assert flags == {"--ckpt", "--taehv", "--wav2vec", "--text-embeds"}  # no Wan VAE needed
    present = tmp_path / "x.pth"
    present.write_bytes(b"")
    lines = missing_weights(RunConfig(model="1.3b"), Weights(ckpt=str(present), vae=str(tmp_path / "nope")))
    assert not any(line.startswith("--ckpt") for line in lines)
    assert any(line.startswith("--vae") and "does not exist" in line for line in lines)


@pytest.mark.parametrize("kind", ["wan", "taehv"])
def test_codec_adapters_stream_chunks(kind):
    """9 then 12 pixel frames -> 3 latents each; 3 latents -> 9 then 12 frames, for both codec families."""
    torch.manual_seed(0)
    vae = WanVAE(WanVAEConfig.from_name("tiny")).eval() if kind == "wan" else None
    taehv = TAEHV(TAEHVConfig(encoder_width=8, decoder_widths=(8, 8, 8, 8))).eval() if kind == "taehv" else None
    enc, dec = make_encoder(kind, vae=vae, taehv=taehv), make_decoder(kind, vae=vae, taehv=taehv)
    pixels = torch.rand(21, 3, 32, 48) * 2 - 1
    z = [enc.push(pixels[:9]), enc.push(pixels[9:])]
    assert [tuple(x.shape) for x in z] == [(1, 16, 3, 4, 6)] * 2
    frames = [dec.push(z[0]), dec.push(z[1])]
    assert [f.shape[0] for f in frames] == [9, 12]
    assert all(f.min() >= 0 and f.max() <= 1 for f in frames)
    enc.reset()
    assert rel_err(enc.push(pixels[:9]), z[0]) < 1e-6  # reset starts a new clip
