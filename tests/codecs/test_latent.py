"""The streaming codec interface: both families, batches of streams, the released groups, causal state kept in
preallocated buffers."""

from __future__ import annotations

import pytest
import torch

from lipforcing.engine.codecs.latent import make_decoder, make_encoder
from lipforcing.engine.codecs.taehv import TAEHV, TAEHVConfig
from lipforcing.engine.codecs.wan_vae import CausalConv3d, WanVAE, WanVAEConfig
from lipforcing.engine.numerics import rel_error


def _models(kind):
    torch.manual_seed(0)
    vae = WanVAE(WanVAEConfig.from_name("tiny")).eval() if kind == "wan" else None
    taehv = TAEHV(TAEHVConfig(encoder_width=8, decoder_widths=(8, 8, 8, 8))).eval() if kind == "taehv" else None
    return dict(vae=vae, taehv=taehv)


@pytest.mark.parametrize("kind", ["wan", "taehv"])
def test_codec_adapters_stream_chunks(kind):
    """9 then 12 pixel frames -> 3 latents each; 3 latents -> 9 then 12 frames, for both codec families."""
    models = _models(kind)
    enc, dec = make_encoder(kind, **models), make_decoder(kind, **models)
    pixels = torch.rand(1, 21, 3, 32, 48) * 2 - 1
    z = [enc.push(pixels[:, :9]), enc.push(pixels[:, 9:])]
    assert [tuple(x.shape) for x in z] == [(1, 16, 3, 4, 6)] * 2
    frames = [dec.push(z[0]), dec.push(z[1])]
    assert [f.shape[0] for f in frames] == [9, 12]
    assert all(f.min() >= 0 and f.max() <= 1 for f in frames)
    enc.reset()
    assert rel_error(enc.push(pixels[:, :9]), z[0]) < 1e-6  # reset starts a new clip


@pytest.mark.parametrize("kind", ["wan", "taehv"])
def test_batch_of_two_streams_equals_the_two_streams_alone(kind):
    """The masked and unmasked streams as one batch with stacked causal state equal two separate encoders."""
    models = _models(kind)
    pixels = torch.rand(2, 21, 3, 32, 48) * 2 - 1
    pair = make_encoder(kind, **models)
    together = [pair.push(pixels[:, :9]), pair.push(pixels[:, 9:])]
    for i in range(2):
        alone = make_encoder(kind, **models)
        separate = [alone.push(pixels[i : i + 1, :9]), alone.push(pixels[i : i + 1, 9:])]
        for t, s in zip(together, separate):
            assert rel_error(t[i : i + 1], s) < 1e-6


@pytest.mark.parametrize("kind", ["wan", "taehv"])
def test_released_groups_equal_whole_chunks(kind):
    """Frame 0 alone then groups of 4 (encoder) and one latent at a time (decoder) give the same results."""
    models = _models(kind)
    pixels = torch.rand(1, 21, 3, 32, 48) * 2 - 1
    whole, grouped = make_encoder(kind, **models), make_encoder(kind, **models, group_frames=4)
    z = [whole.push(pixels[:, :9]), whole.push(pixels[:, 9:])]
    zg = [grouped.push(pixels[:, :9]), grouped.push(pixels[:, 9:])]
    for a, b in zip(z, zg):
        assert rel_error(b, a) < 1e-6
    dec, dec1 = make_decoder(kind, **models), make_decoder(kind, **models, group_latents=1)
    for chunk in z:
        assert rel_error(dec1.push(chunk), dec.push(chunk)) < 1e-6
    with pytest.raises(ValueError, match="multiple of 4"):
        make_encoder(kind, **models, group_frames=3)


def test_causal_history_lives_in_preallocated_buffers():
    """Each causal convolution keeps its history in one buffer, written in place every chunk, and assembles
    its input in the stream's shared arena: no new history tensor per chunk."""
    models = _models("wan")
    enc = make_encoder("wan", **models, group_frames=4)
    pixels = torch.rand(1, 33, 3, 32, 48) * 2 - 1
    enc.push(pixels[:, :9])
    cache = enc._stream._cache
    convs = [m for m in models["vae"].modules() if isinstance(m, CausalConv3d) and m.context and m in cache]
    assert convs
    before = {id(c): cache[c].data_ptr() for c in convs}
    arena = cache._arena.data_ptr()
    enc.push(pixels[:, 9:21])
    enc.push(pixels[:, 21:])
    assert {id(c): cache[c].data_ptr() for c in convs} == before
    assert cache._arena.data_ptr() == arena
