"""The training memory arithmetic (meta device only): parameter and LoRA counts from the real modules, FSDP2
sharding, the stages, activation checkpointing, and the 14B recipe on 4 x H200."""

from __future__ import annotations

import re
from dataclasses import fields

import pytest
import torch
from torch import nn

from lipforcing.engine.dit.config import ModelConfig
from lipforcing.engine.dit.model import CausalWanStudent, count_parameters
from lipforcing.training.memory import (
    GIB,
    ITEMS,
    TrainingMemory,
    format_training_memory,
    lora_parameters,
    training_memory,
)

BIG, SMALL = ModelConfig.from_name("14b"), ModelConfig.from_name("1.3b")
# the released targets, spelled independently of the module under test: q, k, v, o of both attentions, ffn.0/2
TARGET = re.compile(r"blocks\.\d+\.((self|cross)_attn\.[qkvo]|ffn\.[02])")
SHARDED = ("student_frozen", "teacher_weights", "critic_frozen", "master_weights", "gradients", "optimizer_states")
USABLE_H200_GIB = 139  # what torch reports usable on the device machines' H200 (141 GB HBM3e)


def _meta_student(cfg: ModelConfig) -> CausalWanStudent:
    with torch.device("meta"):
        return CausalWanStudent(cfg)


@pytest.mark.parametrize("name", ["1.3b", "14b"])
def test_parameter_counts_come_from_the_model(name):
    cfg = ModelConfig.from_name(name)
    model = _meta_student(cfg)
    mem = training_memory(cfg, stage=1, gpus=4)
    assert mem.network_params == count_parameters(cfg)
    fully_trained = sum(p.numel() for n, p in model.named_parameters()
                        if n.split(".")[0] in ("patch_embedding", "audio_proj", "audio_cond_projs"))
    assert mem.trainable_params == lora_parameters(model, 128) + fully_trained
    frozen = mem.network_params - fully_trained
    assert mem.student_frozen == -(-frozen * 2 // 4)  # bf16, a quarter per GPU


@pytest.mark.parametrize("name,rank", [("1.3b", 128), ("14b", 128), ("14b", 16), ("tiny", 4)])
def test_lora_parameters_are_rank_times_in_plus_out_of_the_targets(name, rank):
    model = _meta_student(ModelConfig.from_name(name))
    targets = [m for n, m in model.named_modules() if TARGET.fullmatch(n)]
    assert all(isinstance(m, nn.Linear) for m in targets)
    assert len(targets) == 10 * len(model.blocks)
    assert lora_parameters(model, rank) == sum(rank * (m.weight.shape[0] + m.weight.shape[1]) for m in targets)


def test_lora_parameters_match_peft():
    """An independent implementation: peft's adapters on the same targets of a meta model."""
    peft = pytest.importorskip("peft")
    cfg = ModelConfig.from_name("1.3b")
    model = peft.inject_adapter_in_model(peft.LoraConfig(r=128, lora_alpha=64, target_modules=TARGET.pattern),
                                         _meta_student(cfg))
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) == lora_parameters(
        _meta_student(cfg), 128)


@pytest.mark.parametrize("stage", [1, 2])
def test_fsdp_divides_the_sharded_items_by_the_gpu_count(stage):
    one, four = training_memory(BIG, stage=stage, gpus=1), training_memory(BIG, stage=stage, gpus=4)
    for name in ITEMS:
        a, b = getattr(one, name), getattr(four, name)
        assert b == (-(-a // 4) if name in SHARDED else a), name  # bytes are multiples of 4 here: exact
    assert one.accumulation_steps == 4 * four.accumulation_steps == 16


@pytest.mark.parametrize("cfg,gpus", [(BIG, 4), (SMALL, 1)])
def test_stage_2_needs_more_than_stage_1(cfg, gpus):
    one, two = training_memory(cfg, stage=1, gpus=gpus), training_memory(cfg, stage=2, gpus=gpus)
    assert two.total > one.total
    assert two.teacher_weights > 0 and two.critic_frozen == one.student_frozen and one.teacher_weights == 0
    assert two.optimizer_states == 2 * one.optimizer_states  # student and critic both trained


@pytest.mark.parametrize("stage", [1, 2])
def test_checkpointing_off_keeps_every_blocks_activations(stage):
    on = training_memory(BIG, stage=stage, gpus=4)
    off = training_memory(BIG, stage=stage, gpus=4, checkpointing=False)
    assert off.activations > 5 * on.activations
    assert off.saved_activations > BIG.num_layers * on.saved_activations / (BIG.num_layers + 1)


def test_activations_are_linear_in_tokens_and_micro_batch():
    """Flash-style attention keeps no L x L scores: twice the frames or twice the clips, twice the activations
    (the text conditioning excepted: 512 positions per clip whatever its length)."""
    short, long = (training_memory(SMALL, stage=1, gpus=1, latent_frames=f) for f in (6, 12))
    assert long.text_conditioning == short.text_conditioning
    ratio = (long.activations - long.text_conditioning) / (short.activations - short.text_conditioning)
    assert ratio == pytest.approx(2, rel=0.02)
    single, double = (training_memory(SMALL, stage=2, gpus=1, micro_batch=m) for m in (1, 2))
    assert double.activations == 2 * single.activations
    assert double.accumulation_steps == 8


def test_14b_stage_2_fits_four_h200():
    mem = training_memory(BIG, stage=2, gpus=4)
    assert mem.peak_phase == "student step"
    assert mem.total / GIB < USABLE_H200_GIB


def test_table_and_validation():
    mem = training_memory(SMALL, stage=2, gpus=1)
    table = format_training_memory({"1.3B stage 2": mem}, usable_gib=USABLE_H200_GIB)
    assert "1.3B stage 2" in table and f"{mem.total / GIB:.2f}" in table
    assert {f.name for f in fields(TrainingMemory)} >= set(ITEMS)
    with pytest.raises(ValueError, match="stage"):
        training_memory(SMALL, stage=3, gpus=1)
    with pytest.raises(ValueError, match="effective batch"):
        training_memory(SMALL, stage=1, gpus=3)
