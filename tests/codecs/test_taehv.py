"""TAEHV (Wan 2.1 tiny autoencoder): released key names/shapes, streaming == one-shot, loader."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from conftest import TOLERANCE
from lipforcing.engine.codecs.taehv import TAEHV, TAEHVStreamDecoder, TAEHVStreamEncoder, load_taehv
from lipforcing.engine.errors import WeightsError
from lipforcing.engine.numerics import rel_error

TOL = TOLERANCE[torch.float32]

# Representative tensors of the released taew2_1.pth (key -> shape).
RELEASED_KEYS = {
    "encoder.0.weight": (64, 3, 3, 3),
    "encoder.0.bias": (64,),
    "encoder.2.conv.weight": (64, 128, 1, 1),  # TPool stride 2
    "encoder.3.weight": (64, 64, 3, 3),  # stride-2 conv, no bias
    "encoder.4.conv.0.weight": (64, 128, 3, 3),  # MemBlock: cat[x, past]
    "encoder.4.conv.4.bias": (64,),
    "encoder.12.conv.weight": (64, 64, 1, 1),  # TPool stride 1
    "encoder.16.conv.2.weight": (64, 64, 3, 3),
    "encoder.17.weight": (16, 64, 3, 3),
    "decoder.1.weight": (256, 16, 3, 3),
    "decoder.3.conv.0.weight": (256, 512, 3, 3),
    "decoder.7.conv.weight": (256, 256, 1, 1),  # TGrow stride 1
    "decoder.8.weight": (128, 256, 3, 3),
    "decoder.9.conv.0.weight": (128, 256, 3, 3),
    "decoder.13.conv.weight": (256, 128, 1, 1),  # TGrow stride 2
    "decoder.14.weight": (64, 128, 3, 3),
    "decoder.19.conv.weight": (128, 64, 1, 1),
    "decoder.20.weight": (64, 64, 3, 3),
    "decoder.22.weight": (3, 64, 3, 3),
    "decoder.22.bias": (3,),
}
ABSENT_KEYS = ["encoder.3.bias", "decoder.8.bias", "encoder.4.skip.weight", "decoder.0.weight"]


@pytest.fixture(scope="module")
def tae() -> TAEHV:
    torch.manual_seed(1)
    model = TAEHV().eval().requires_grad_(False)
    # Default init decodes to ~0 everywhere, which the [0, 1] clamp would flatten: centre the output.
    model.decoder[-1].bias.fill_(0.5)
    model.decoder[-1].weight.mul_(20.0)
    return model


def test_released_key_names_and_shapes() -> None:
    sd = TAEHV().state_dict()
    for key, shape in RELEASED_KEYS.items():
        assert tuple(sd[key].shape) == shape, key
    for key in ABSENT_KEYS:
        assert key not in sd
    assert len(sd) == 128
    model = TAEHV()
    assert sum(p.numel() for p in model.encoder.parameters()) == 1_470_928  # SPEC: ~1.47M
    assert sum(p.numel() for p in model.decoder.parameters()) == 9_844_611  # SPEC: ~9.84M


def test_decode_frame_count_and_range(tae: TAEHV) -> None:
    z = torch.randn(2, 5, 16, 3, 5)
    video = tae.decode_video(z)
    assert video.shape == (2, 4 * 5 - 3, 3, 24, 40)
    assert float(video.min()) >= 0.0 and float(video.max()) <= 1.0
    inside = ((video > 0) & (video < 1)).float().mean()
    assert inside > 0.5, "test weights saturate the clamp; the comparison would be vacuous"


@pytest.mark.parametrize("chunks", [[1] * 7, [3, 3, 1], [2, 5]])
def test_stream_decode_equals_parallel(tae: TAEHV, chunks: list[int]) -> None:
    z = torch.randn(1, sum(chunks), 16, 3, 5)
    ref = tae.decode_video(z)
    dec = TAEHVStreamDecoder(tae)
    outs, start = [], 0
    for i, n in enumerate(chunks):
        out = dec.push(z[:, start : start + n])
        assert out.shape[1] == 4 * n - (3 if i == 0 else 0)  # no frame is held back
        outs.append(out)
        start += n
    assert dec.flush().shape[1] == 0
    assert rel_error(torch.cat(outs, 1), ref) < TOL


def test_stream_encode_engine_chunks(tae: TAEHV) -> None:
    """Engine chunking: 9 pixel frames, then 12s -> exactly 3 latents per push, nothing buffered."""
    x = torch.rand(1, 9 + 12 + 12, 3, 16, 24)
    ref = tae.encode_video(x)
    assert ref.shape == (1, 9, 16, 2, 3)
    enc = TAEHVStreamEncoder(tae)
    outs = []
    for start, stop in [(0, 9), (9, 21), (21, 33)]:
        outs.append(enc.push(x[:, start:stop]))
        assert outs[-1].shape[1] == 3 and enc.pending_frames == 0
    assert enc.flush().shape[1] == 0
    assert rel_error(torch.cat(outs, 1), ref) < TOL


@pytest.mark.parametrize("wan_alignment", [True, False])
def test_stream_encode_any_chunking(tae: TAEHV, wan_alignment: bool) -> None:
    x = torch.rand(2, 23, 3, 16, 40)
    ref = tae.encode_video(x, wan_alignment=wan_alignment)
    assert ref.shape[1] == ((23 + 3) // 4 + 1 if wan_alignment else 6)
    enc = TAEHVStreamEncoder(tae, wan_alignment=wan_alignment)
    outs = [enc.push(x[:, a:b]) for a, b in [(0, 5), (5, 6), (6, 13), (13, 23)]]
    outs.append(enc.flush())
    assert rel_error(torch.cat(outs, 1), ref) < TOL
    with pytest.raises(RuntimeError, match="reset"):
        enc.push(x[:, :4])


def test_wan_alignment_semantics(tae: TAEHV) -> None:
    """Latent 0 sees frame 0 four times; latent k sees frames 4k-3 .. 4k (the Wan VAE grouping)."""
    x = torch.rand(1, 9, 3, 16, 24)
    z = tae.encode_video(x)
    upstream = tae.encode_video(torch.cat([x[:, :1].expand(-1, 3, -1, -1, -1), x], 1), wan_alignment=False)
    assert rel_error(z, upstream) < TOL
    # Causality: changing frame 5 leaves latent 0 and 1 (frames 0 .. 4) unchanged.
    y = x.clone()
    y[:, 5] = torch.rand_like(y[:, 5])
    z2 = tae.encode_video(y)
    assert torch.equal(z2[:, :2], z[:, :2]) and not torch.allclose(z2[:, 2], z[:, 2])


def test_shape_errors(tae: TAEHV) -> None:
    with pytest.raises(ValueError, match="NTCHW"):
        tae.encode_video(torch.rand(1, 3, 9, 16, 16))
    with pytest.raises(ValueError, match="NTCHW"):
        TAEHVStreamDecoder(tae).push(torch.randn(1, 16, 2, 4, 4))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_loader_round_trip(tae: TAEHV, tmp_path, suffix: str) -> None:
    sd = {k: v.contiguous() for k, v in tae.state_dict().items()}
    path = tmp_path / f"taew2_1{suffix}"
    if suffix == ".pth":
        torch.save(sd, path)
    else:
        save_file(sd, str(path))
    loaded = load_taehv(path, device="cpu", dtype=torch.float32)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, sd[key]), key
    z = torch.randn(1, 2, 16, 4, 4)
    assert torch.equal(loaded.decode_video(z), tae.decode_video(z))


def test_loader_errors(tmp_path) -> None:
    with pytest.raises(WeightsError, match="no such checkpoint file"):
        load_taehv(tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"encoder.0.weight": torch.zeros(1)}, bad)
    with pytest.raises(WeightsError, match=r"\(TAEHV for Wan 2.1\): checkpoint does not match the model"):
        load_taehv(bad)
