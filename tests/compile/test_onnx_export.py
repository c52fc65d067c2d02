"""ONNX export of the TAEHV chunk steps: onnxruntime output equals the streaming PyTorch modules."""

from __future__ import annotations

import pytest
import torch

from lipforcing.compile.onnx_export import OnnxStepRunner, TAEHVDecoderStep, export_decoder, export_encoder
from lipforcing.engine.codecs.taehv import TAEHV, TAEHVStreamDecoder, TAEHVStreamEncoder
from lipforcing.engine.numerics import rel_error

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def taehv() -> TAEHV:
    torch.manual_seed(0)
    model = TAEHV().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)  # random init, scaled so activations are not tiny
    return model


def test_decoder_step_equals_streaming_decoder(taehv, tmp_path):
    h, w = 4, 6  # non-square, small
    path = export_decoder(taehv, tmp_path / "dec.onnx", latent_hw=(h, w))
    runner = OnnxStepRunner(path)
    stream = TAEHVStreamDecoder(taehv)
    z = torch.randn(1, 9, 16, h, w)
    with torch.no_grad():
        expected = stream.push(z[:, :3]), stream.push(z[:, 3:6]), stream.push(z[:, 6:9])
    got = [runner.step(z[:, i : i + 3]) for i in (0, 3, 6)]
    assert got[0].shape == (1, 12, 3, 8 * h, 8 * w)
    got[0] = got[0][:, 3:]  # the stream's first 3 frames are trimmed by the caller
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        assert rel_error(g, e) < 1e-4  # fp32 graph vs eager: reassociation only
    runner.reset()
    again = runner.step(z[:, :3])[:, 3:]
    assert rel_error(again, expected[0]) < 1e-4  # reset() starts a new stream


def test_encoder_step_equals_streaming_encoder(taehv, tmp_path):
    hw = (32, 48)
    path = export_encoder(taehv, tmp_path / "enc.onnx", frame_hw=hw)
    runner = OnnxStepRunner(path)
    stream = TAEHVStreamEncoder(taehv)
    frames = torch.rand(1, 21, 3, *hw)
    with torch.no_grad():
        expected = stream.push(frames[:, :9]), stream.push(frames[:, 9:21])
    first = torch.cat([frames[:, :1].expand(-1, 3, -1, -1, -1), frames[:, :9]], dim=1)  # alignment copies
    got = runner.step(first), runner.step(frames[:, 9:21])
    for g, e in zip(got, expected):
        assert g.shape == e.shape == (1, 3, 16, 4, 6)
        assert rel_error(g, e) < 1e-4


def test_decoder_state_layout_covers_every_memblock(taehv):
    step = TAEHVDecoderStep(taehv, latent_hw=(4, 6))
    assert len(step.state_layout) == 9  # 3 stages x 3 MemBlocks
    channels = [shape[2] for _, shape in step.state_layout]
    assert channels == [256] * 3 + [128] * 3 + [64] * 3
