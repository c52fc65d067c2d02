"""Wan 2.1 VAE: released key names/shapes, causal streaming == one-shot == the released 1-then-4s procedure."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from conftest import TOLERANCE
from lipforcing.engine.codecs.wan_vae import (
    LATENT_MEAN,
    LATENT_STD,
    WanVAE,
    WanVAEConfig,
    WanVAEStreamDecoder,
    WanVAEStreamEncoder,
    load_wan_vae,
    parameter_count,
)
from lipforcing.engine.errors import WeightsError
from lipforcing.engine.numerics import rel_error

TOL = TOLERANCE[torch.float32]

# Representative tensors of the released Wan2.1_VAE.pth (key -> shape).
RELEASED_KEYS = {
    "encoder.conv1.weight": (96, 3, 3, 3, 3),
    "encoder.downsamples.0.residual.0.gamma": (96, 1, 1, 1),
    "encoder.downsamples.0.residual.2.weight": (96, 96, 3, 3, 3),
    "encoder.downsamples.0.residual.6.bias": (96,),
    "encoder.downsamples.2.resample.1.weight": (96, 96, 3, 3),  # spatial-only downsample
    "encoder.downsamples.3.shortcut.weight": (192, 96, 1, 1, 1),
    "encoder.downsamples.5.time_conv.weight": (192, 192, 3, 1, 1),
    "encoder.downsamples.8.time_conv.weight": (384, 384, 3, 1, 1),
    "encoder.downsamples.10.residual.6.weight": (384, 384, 3, 3, 3),
    "encoder.middle.0.residual.3.gamma": (384, 1, 1, 1),
    "encoder.middle.1.norm.gamma": (384, 1, 1),
    "encoder.middle.1.to_qkv.weight": (1152, 384, 1, 1),
    "encoder.middle.1.proj.bias": (384,),
    "encoder.head.0.gamma": (384, 1, 1, 1),
    "encoder.head.2.weight": (32, 384, 3, 3, 3),
    "conv1.weight": (32, 32, 1, 1, 1),
    "conv2.weight": (16, 16, 1, 1, 1),
    "decoder.conv1.weight": (384, 16, 3, 3, 3),
    "decoder.middle.2.residual.2.weight": (384, 384, 3, 3, 3),
    "decoder.upsamples.3.time_conv.weight": (768, 384, 3, 1, 1),
    "decoder.upsamples.3.resample.1.weight": (192, 384, 3, 3),
    "decoder.upsamples.4.shortcut.weight": (384, 192, 1, 1, 1),
    "decoder.upsamples.7.time_conv.weight": (768, 384, 3, 1, 1),
    "decoder.upsamples.8.residual.2.weight": (192, 192, 3, 3, 3),
    "decoder.upsamples.11.resample.1.weight": (96, 192, 3, 3),
    "decoder.upsamples.14.residual.6.weight": (96, 96, 3, 3, 3),
    "decoder.head.0.gamma": (96, 1, 1, 1),
    "decoder.head.2.weight": (3, 96, 3, 3, 3),
}
ABSENT_KEYS = ["encoder.downsamples.2.time_conv.weight", "decoder.upsamples.11.time_conv.weight",
               "encoder.downsamples.0.shortcut.weight", "latent_mean"]


@pytest.fixture(scope="module")
def vae() -> WanVAE:
    torch.manual_seed(2)
    model = WanVAE(WanVAEConfig.from_name("tiny")).eval().requires_grad_(False)
    for p in model.parameters():
        if p.ndim == 1:  # non-zero biases so every path carries signal
            p.normal_(0.0, 0.1)
    return model


def _video(t: int, b: int = 1, h: int = 32, w: int = 48) -> torch.Tensor:
    return torch.rand(b, 3, t, h, w) * 2 - 1


def test_released_key_names_and_shapes() -> None:
    with torch.device("meta"):
        sd = WanVAE().state_dict()
    for key, shape in RELEASED_KEYS.items():
        assert tuple(sd[key].shape) == shape, key
    for key in ABSENT_KEYS:
        assert key not in sd
    assert len(sd) == 194
    n = parameter_count()
    assert abs(n - 127e6) / 127e6 < 0.02, n  # SPEC: ~127M


def test_stream_encode_engine_chunks(vae: WanVAE) -> None:
    """9 pixel frames (frame 0 + 2 groups), then 12s: 3 latents per push, equal to one-shot and to the
    released procedure (frame 0 alone, then groups of 4)."""
    x = _video(9 + 12 + 12)
    ref = vae.encode(x, group_frames=4)
    assert ref.shape == (1, 16, 9, 4, 6)
    assert rel_error(vae.encode(x), ref) < TOL
    enc = WanVAEStreamEncoder(vae)
    outs = []
    for start, stop in [(0, 9), (9, 21), (21, 33)]:
        outs.append(enc.push(x[:, :, start:stop]))
        assert outs[-1].shape[2] == 3 and enc.pending_frames == 0
    assert rel_error(torch.cat(outs, 2), ref) < TOL


def test_stream_encode_buffers_partial_groups(vae: WanVAE) -> None:
    x = _video(13, b=2, h=16, w=40)
    ref = vae.encode(x)
    enc = WanVAEStreamEncoder(vae)
    sizes = [enc.push(x[:, :, a:b]).shape[2] for a, b in [(0, 3), (3, 4), (4, 7), (7, 13)]]
    assert sizes == [1, 0, 1, 2]  # latent k is returned with frame 4k
    enc.reset()
    z = torch.cat([enc.push(x[:, :, a:b]) for a, b in [(0, 3), (3, 4), (4, 7), (7, 13)]], 2)
    assert rel_error(z, ref) < TOL


def test_latents_are_normalized(vae: WanVAE) -> None:
    x = _video(5, h=16, w=16)
    moments = []
    hook = vae.conv1.register_forward_hook(lambda m, args, out: moments.append(out))
    try:
        z = vae.encode(x)
    finally:
        hook.remove()
    mean = torch.tensor(LATENT_MEAN).view(1, 16, 1, 1, 1)
    std = torch.tensor(LATENT_STD).view(1, 16, 1, 1, 1)
    assert rel_error(z, (moments[0][:, :16] - mean) / std) < TOL


@pytest.mark.parametrize("chunks", [[1] * 5, [3, 2]])
def test_stream_decode_equals_oneshot(vae: WanVAE, chunks: list[int]) -> None:
    z = torch.randn(1, 16, sum(chunks), 4, 6)
    ref = vae.decode(z, group_latents=1)  # the released procedure: one latent per call
    assert ref.shape == (1, 3, 1 + 4 * (sum(chunks) - 1), 32, 48)
    assert float(ref.std()) > 0.1
    assert rel_error(vae.decode(z), ref) < TOL
    dec = WanVAEStreamDecoder(vae)
    outs, start = [], 0
    for i, n in enumerate(chunks):
        out = dec.push(z[:, :, start : start + n])
        assert out.shape[2] == 4 * n - (3 if i == 0 else 0)
        outs.append(out)
        start += n
    assert rel_error(torch.cat(outs, 2), ref) < TOL


def test_causality(vae: WanVAE) -> None:
    x = _video(9, h=16, w=16)
    y = x.clone()
    y[:, :, 6] = -y[:, :, 6]
    zx, zy = vae.encode(x), vae.encode(y)
    assert torch.equal(zx[:, :, :2], zy[:, :, :2]) and not torch.allclose(zx[:, :, 2], zy[:, :, 2])


def test_input_errors(vae: WanVAE) -> None:
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        vae.encode(_video(8, h=16, w=16))
    with pytest.raises(ValueError, match="multiple of 8"):
        vae.encode(_video(5, h=20, w=16))
    with pytest.raises(ValueError, match=r"\[B, 3, T, H, W\]"):
        vae.encode(torch.rand(1, 5, 3, 16, 16))
    with pytest.raises(ValueError, match="unknown VAE preset"):
        WanVAEConfig.from_name("wan9")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_loader_round_trip(vae: WanVAE, tmp_path, suffix: str) -> None:
    sd = {k: v.contiguous() for k, v in vae.state_dict().items()}
    path = tmp_path / f"Wan2.1_VAE{suffix}"
    if suffix == ".pth":
        torch.save(sd, path)
    else:
        save_file(sd, str(path))
    loaded = load_wan_vae(path, device="cpu", dtype=torch.float32, config=vae.config)
    assert not any(p.requires_grad for p in loaded.parameters())
    x = _video(5, h=16, w=16)
    assert torch.equal(loaded.encode(x), vae.encode(x))
    with pytest.raises(WeightsError, match=r"\(Wan 2.1 VAE\): checkpoint does not match the model"):
        load_wan_vae(path)  # full-size config vs tiny tensors
