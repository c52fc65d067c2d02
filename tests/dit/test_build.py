"""Building the student: straight in its target dtype (no fp32 copy of the weights at any moment), and a
checkpoint cast tensor by tensor."""

from __future__ import annotations

import torch

from lipforcing.engine.dit.build import random_student
from lipforcing.engine.dit.checkpoint import load_into
from lipforcing.engine.dit.config import ModelConfig, StreamConfig
from lipforcing.engine.dit.model import CausalWanStudent
from lipforcing.engine.tools.memory import LiveBytes, memory_plan

# 1.3B's width (its largest tensors: the 8960 x 1536 feed-forward matrices) at two blocks, so the test builds
# 241 MB instead of 2.8 GB; the peak's arithmetic is the same at any depth.
WIDE = ModelConfig.from_name("1.3b").replace(num_layers=2, audio_blocks=(1,))


def _planned_weight_bytes(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """The weights figure of ``lipforcing info --memory`` for ``cfg``: resident plus text-only weights."""
    plan = memory_plan(cfg, StreamConfig.for_resolution(512, 512), dtype=dtype)
    return sum(i["bytes"] for i in plan["items"] if i["name"] in ("student weights", "student text weights"))


def _largest_tensor_bytes(cfg: ModelConfig, dtype: torch.dtype) -> int:
    with torch.device("meta"):
        model = CausalWanStudent(cfg).to(dtype)
    return max(p.nbytes for p in model.parameters())


def test_random_student_peak_is_the_planned_weights_in_the_target_dtype():
    weights = _planned_weight_bytes(WIDE, torch.bfloat16)
    with LiveBytes(device="cpu") as live:
        model = random_student(WIDE, dtype=torch.bfloat16, seed=0)
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in model.parameters())
    assert live.live == sum(p.nbytes for p in model.parameters()) == weights
    # At most one tensor beyond the finished weights; an fp32 copy would be twice the weights.
    assert live.peak <= weights + _largest_tensor_bytes(WIDE, torch.bfloat16), (live.peak, weights)


def test_load_into_casts_a_checkpoint_tensor_by_tensor():
    cfg = ModelConfig.from_name("tiny")
    state = random_student(cfg, dtype=torch.float32, seed=1).state_dict()  # an fp32 checkpoint, read before
    with torch.device("meta"):
        model = CausalWanStudent(cfg)
    with LiveBytes(device="cpu") as live:
        load_into(model, state, dtype=torch.bfloat16)
    weights = sum(p.nbytes for p in model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert live.live == weights and live.peak <= weights + _largest_tensor_bytes(cfg, torch.bfloat16)
    for name, p in model.named_parameters():
        assert torch.equal(p, state[name].to(torch.bfloat16)), name


def test_codecs_built_in_the_target_dtype_have_no_fp32_copy():
    """``numerics.built_in`` (the benchmark's and device check's codecs): TAEHV is born bf16, its peak is its
    bf16 weights plus at most one tensor's initialisation workspace, never the fp32 model."""
    from lipforcing.engine.codecs.taehv import TAEHV, TAEHVConfig
    from lipforcing.engine.numerics import built_in

    with LiveBytes(device="cpu") as live, built_in(torch.bfloat16, "cpu"):
        taehv = TAEHV(TAEHVConfig())
    weights = sum(p.nbytes for p in taehv.parameters()) + sum(b.nbytes for b in taehv.buffers())
    largest = max(p.numel() for p in taehv.parameters()) * 4
    assert {p.dtype for p in taehv.parameters()} == {torch.bfloat16} and torch.get_default_dtype() == torch.float32
    assert live.peak <= weights + largest < 2 * weights, (live.peak, weights)
