"""``lipforcing info``: FLOPs of the student and the codecs, and the two compute floors."""

from __future__ import annotations

import json

import pytest
import torch

from lipforcing.cli import main
from lipforcing.engine.dit.config import ModelConfig, StreamConfig
from lipforcing.engine.tools.info import codec_flops, model_info


def test_codec_flops_are_counted():
    stream = StreamConfig.for_resolution(512, 512)
    wan, taehv = codec_flops(stream, "wan", "taehv")
    assert 25e12 < wan < 40e12  # the Wan VAE encoder: ~1.3 TFLOP per frame, 12 frames x 2 streams
    assert 0.5e12 < taehv < 2e12
    taehv_enc, _ = codec_flops(stream, "taehv", "taehv")
    assert taehv_enc < wan / 10


def test_floors_with_and_without_the_encoder():
    info = model_info(ModelConfig.from_name("1.3b"), StreamConfig.for_resolution(512, 512), peak_tflops=800)
    total = info.flops_per_chunk_steady + info.encoder_flops_per_chunk + info.decoder_flops_per_chunk
    assert info.floor_ms_per_chunk == pytest.approx(total / 800e12 * 1e3)
    avatar = info.flops_per_chunk_steady + info.decoder_flops_per_chunk
    assert info.floor_ms_per_chunk_avatar == pytest.approx(avatar / 800e12 * 1e3)
    assert info.floor_fps < info.floor_fps_avatar
    assert info.flops_per_output_frame == pytest.approx(total / 12)


def test_info_cli_json_and_text(capsys):
    assert main(["info", "--model", "14b", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == 14_294_081_696 and info["encoder"] == "wan"
    assert info["kv_cache_bytes"] == 2 * 40 * 4 * 1024 * 5120 * torch.bfloat16.itemsize
    assert main(["info", "--model", "1.3b", "--encoder", "taehv"]) == 0
    out = capsys.readouterr().out
    assert "prepared avatar" in out and "taehv encoder" in out
    assert main(["info", "--model", "nope"]) == 2
    capsys.readouterr()
    assert main(["info", "--model", "tiny", "--height", "0", "--json"]) == 2  # not the default size in silence
    assert "positive multiple of 16" in capsys.readouterr().err
    assert main(["info", "--model", "tiny", "--json"]) == 0  # 4 layers, 256 tokens a frame (256x256 crops)
    assert json.loads(capsys.readouterr().out)["kv_cache_bytes"] == 2 * 4 * 4 * 256 * 128 * torch.bfloat16.itemsize
