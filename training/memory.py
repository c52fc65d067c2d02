"""Device memory of one training step, per GPU, from the real module shapes (SPEC §9): no GPU, no weights.

    mem = training_memory(ModelConfig.from_name("14b"), stage=2, gpus=4)
    mem.total, mem.activations                       # bytes per GPU
    print(format_training_memory({"14B stage 2": mem}, usable_gib=139))
    python -m lipforcing.training.memory             # the tables of training/README.md

The set-up (our assumptions where SPEC §9 is silent): every network is a ``CausalWanStudent`` wrapped with
FSDP2 (``fully_shard`` per block, then the root) over ``gpus`` GPUs, mixed precision bf16 compute / fp32
gradient reduction. LoRA (rank r) on q, k, v, o of both attentions and ffn.0 / ffn.2 of every block, plus the
fully trained ``patch_embedding``, ``audio_proj`` and ``audio_cond_projs``; ``lora_rank=0`` trains everything.
Stage 1 holds one network; stage 2 three (student and critic trained, teacher frozen, each with its own
frozen base) plus the reward's TAEHV decoder (bf16) and SyncNet (fp32), both without gradients.

Items, per GPU:
- sharded by FSDP2 (divided by ``gpus``): frozen weights in bf16; trainable weights as fp32 masters, their
  fp32 gradients (one network's at a time: each optimizer step frees them) and AdamW's two fp32 states;
- unsharded: two blocks gathered in bf16 (the running one and the prefetched next one) with one block's
  unsharded gradients (bf16, and fp32 for the reduce-scatter); each network's root group (everything outside
  the blocks), which FSDP2 keeps gathered from forward to backward;
- activations of the network being trained, over all ``latent_frames x tokens_per_frame`` tokens. With
  activation checkpointing per block, the fp32 residual stream at the num_layers + 1 block boundaries is kept,
  plus one block's recompute working set during backward. That working set is measured: one real ``Block``
  runs forward and backward on meta tensors under ``LiveBytes``, the LoRA targets' weights requiring grad
  (a LoRA A saves the same input the frozen weight would), attention stood in for by a flash-style kernel
  that keeps q, k, v, out and the log-sum-exp (FlexAttention / flash: no L x L scores); the LoRA
  intermediates (r values per token and target) are added. Without checkpointing every block keeps its
  saved tensors. The embedded text context is held; each block computes its cross-attention K/V from it
  inside its own forward (``ClipInputs``), so one block's K/V are live with checkpointing, all without;
- stage 2 peaks in one of two phases. Student step: the graph of the 7 chunk calls' exit steps, plus the
  K/V the rollout committed, frames 0 .. latent_frames - chunk - 1 of all layers in bf16 (a chunk's recompute
  must read them as that chunk saw them: recomputing against a cache that later commits rolled in place gives
  wrong gradients), while the teacher and the critic run no-grad full-clip forwards (one branch at a time)
  and the reward decodes the clip and embeds it with SyncNet. Critic step: the critic's graph over the clip.
Not counted: the CUDA context, NCCL and cuBLAS workspaces, allocator fragmentation, data (under 0.1 GiB).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.codecs.latent import LatentDecoder
from ..engine.codecs.taehv import TAEHV, TAEHVConfig
from ..engine.dit.config import ModelConfig, StreamConfig
from ..engine.dit.full_sequence import FullSequenceAttention
from ..engine.dit.model import Block, CausalWanStudent
from ..engine.quality.syncnet import SyncNet
from ..engine.tools.memory import GIB, LiveBytes, profile, tensor_bytes
from .config import LoraConfig

LORA_TARGETS = LoraConfig().target_modules
"""Linear layers of every block with adapters (the recipe's: q, k, v, o of both attentions, ffn.0 and ffn.2)."""
FULLY_TRAINED = LoraConfig().fully_trained
"""Top-level modules trained in full beside the adapters (patch embedding and audio modules)."""
TEXT_ONLY_TARGETS = ("cross_attn.k", "cross_attn.v")  # act on the 512 text positions, not the video tokens
BF16, FP32 = 2, 4
ITEMS = ("student_frozen", "teacher_weights", "critic_frozen", "master_weights", "gradients", "optimizer_states",
         "root_unsharded", "gathered_blocks", "reward_models",
         "saved_activations", "text_conditioning", "rollout_cache", "working_set")
"""The byte items of ``TrainingMemory``, in table order."""


@dataclass(frozen=True, kw_only=True)
class TrainingMemory:
    """Bytes per GPU of one training step, item by item; ``total`` is their sum."""

    student_frozen: int
    """The student's frozen parameters (base weights) in bf16, sharded."""
    teacher_weights: int
    """Stage 2: the frozen bidirectional teacher in bf16, sharded."""
    critic_frozen: int
    """Stage 2: the critic's frozen base in bf16, sharded."""
    master_weights: int
    """Trainable parameters as fp32 masters (student, and the critic in stage 2), sharded."""
    gradients: int
    """fp32 gradients of one network's trainable parameters, sharded."""
    optimizer_states: int
    """AdamW exp_avg and exp_avg_sq in fp32 for every trained network, sharded."""
    root_unsharded: int
    """bf16 compute copies of each network's parameters outside the blocks, gathered for the whole step."""
    gathered_blocks: int
    """Two blocks gathered in bf16 (running + prefetched) and one block's unsharded gradients."""
    reward_models: int
    """Stage 2: TAEHV decoder (bf16) and SyncNet (fp32) weights, not sharded."""
    saved_activations: int
    """Held until backward: the block boundaries (checkpointing) or every block's saved tensors."""
    text_conditioning: int
    """The trained network's text context (bf16) and the cross-attention K/V live at once (one block's or all)."""
    rollout_cache: int
    """Stage 2, student step: the K/V the rollout committed, kept for the chunk calls' backward."""
    working_set: int
    """The largest transient on top: one block's recompute and backward, or a no-grad forward, or the reward."""
    peak_phase: str
    """The phase of the step the activation items describe."""
    network_params: int
    """Parameters of one network (``count_parameters``)."""
    trainable_params: int
    """Trained parameters of one network (LoRA adapters and the fully trained modules)."""
    tokens: int
    """Tokens of one clip: latent frames x tokens per frame."""
    accumulation_steps: int
    """Micro-batches per optimizer step: effective batch / (gpus x micro-batch)."""

    @property
    def activations(self) -> int:
        return self.saved_activations + self.text_conditioning + self.rollout_cache + self.working_set

    @property
    def total(self) -> int:
        return sum(getattr(self, name) for name in ITEMS)


def lora_targets(model: CausalWanStudent) -> dict[str, nn.Linear]:
    """The Linear layers LoRA adapts: ``blocks.i.<target>`` for every target of LORA_TARGETS."""
    return {f"blocks.{i}.{t}": block.get_submodule(t) for i, block in enumerate(model.blocks) for t in LORA_TARGETS}


def lora_parameters(model: CausalWanStudent, rank: int) -> int:
    """Parameters of the LoRA adapters: A [r, in] and B [out, r] per target, r (in + out) each."""
    return sum(rank * (m.in_features + m.out_features) for m in lora_targets(model).values())


@dataclass(frozen=True)
class _Counts:
    network: int
    trainable: int
    frozen: int
    block: int  # the largest block with its adapters
    block_trainable: int
    root: int  # parameters outside the blocks


@functools.cache
def _counts(cfg: ModelConfig, rank: int) -> _Counts:
    """Parameter counts of one network with rank-``rank`` adapters (0: everything trained)."""
    with torch.device("meta"):
        model = CausalWanStudent(cfg)
    network = sum(p.numel() for p in model.parameters())
    blocks = [sum(p.numel() for p in b.parameters()) for b in model.blocks]
    adapters = [0] * len(blocks)
    for name, m in lora_targets(model).items():
        adapters[int(name.split(".")[1])] += rank * (m.in_features + m.out_features)
    i = max(range(len(blocks)), key=lambda j: blocks[j] + adapters[j])
    if rank == 0:
        return _Counts(network, network, 0, blocks[i], blocks[i], network - sum(blocks))
    full = sum(p.numel() for n, p in model.named_parameters() if n.split(".")[0] in FULLY_TRAINED)
    return _Counts(network, full + sum(adapters), network - full, blocks[i] + adapters[i], adapters[i],
                   network - sum(blocks))


class _FlashStandIn(torch.autograd.Function):
    """The memory of a flash / FlexAttention kernel: keeps q, k, v, out and the log-sum-exp; no L x L scores."""

    @staticmethod
    def forward(ctx, q, k, v):  # [B, H, L, D]
        out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        ctx.save_for_backward(q, k, v, out, torch.empty(q.shape[:-1], device=q.device))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@functools.cache
def _block_bytes(cfg: ModelConfig, frames: int, tokens_per_frame: int, full: bool) -> tuple[int, int, int]:
    """One block over frames x tokens_per_frame tokens, batch 1, on meta tensors: (bytes autograd saves,
    its output included; peak of forward and backward; peak of a no-grad forward)."""
    _, ph, pw = cfg.patch_size
    stream = StreamConfig(latent_h=ph, latent_w=pw * tokens_per_frame)  # one row of tokens: any count works
    ctx = FullSequenceAttention(cfg, stream, frames, block_causal=False, device="meta")
    with torch.device("meta"):
        block = Block(cfg).to(torch.bfloat16)
        x = torch.zeros(1, frames, tokens_per_frame, cfg.dim)  # fp32 residual stream
        e = torch.zeros(1, frames, 6, cfg.dim)  # per-frame time modulation
        text_kv = (torch.zeros(1, cfg.text_len, cfg.num_heads, cfg.head_dim, dtype=torch.bfloat16),) * 2
    for name, p in block.named_parameters():
        p.requires_grad_(full or (name.endswith(".weight") and name.removesuffix(".weight") in LORA_TARGETS))
    sdpa = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = lambda q, k, v, **_: _FlashStandIn.apply(q, k, v)
    try:
        with torch.no_grad(), LiveBytes() as no_grad:
            block(x, e, 0, text_kv, ctx)
        x.requires_grad_(True)
        with LiveBytes() as live:
            out = block(x, e, 0, text_kv, ctx)
            saved = live.live
            out.backward(torch.zeros_like(out))
    finally:
        F.scaled_dot_product_attention = sdpa
    return saved, live.peak, no_grad.peak


@functools.cache
def _reward_bytes(latent_frames: int, tokens_per_frame: int, chunk: int) -> tuple[int, int]:
    """(weights, peak transient) of the reward: TAEHV decoding the clip chunk by chunk, one latent at a time,
    then SyncNet embedding every 5-frame window of 224 x 224 crops. Square frames are assumed."""
    side = 2 * round(tokens_per_frame ** 0.5)
    with torch.device("meta"):
        taehv, syncnet = TAEHV(TAEHVConfig()).to(torch.bfloat16), SyncNet().eval()
        z = torch.zeros(1, 16, chunk, side, side)
        windows = torch.zeros(1 + 4 * (latent_frames - 1) - 4, 3, 5, 224, 224)
    decoder = LatentDecoder("taehv", taehv, group_latents=1)
    _, decode = profile(lambda: [decoder.push(z) for _ in range(latent_frames // chunk)])
    _, embed = profile(syncnet.forward_lip, windows)
    weights = tensor_bytes(list(taehv.decoder.parameters()), list(syncnet.parameters()))
    return weights, max(decode.peak, decode.live + tensor_bytes(windows) + embed.peak)


def training_memory(model: ModelConfig, *, stage: int, gpus: int, lora_rank: int = 128, micro_batch: int = 1,
                    latent_frames: int = 21, tokens_per_frame: int = 1024, checkpointing: bool = True,
                    effective_batch: int = 16) -> TrainingMemory:
    """Bytes per GPU of one stage-1 or stage-2 step (see the module docstring for the model and its assumptions).

    ``lora_rank=0``: full fine-tuning. ``micro_batch``: clips per GPU per forward; gradients accumulate over
    effective_batch / (gpus x micro_batch) of them."""
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage}")
    if lora_rank < 0:
        raise ValueError(f"lora_rank must be positive (or 0: full fine-tuning), got {lora_rank}")
    if gpus < 1 or micro_batch < 1 or effective_batch % (gpus * micro_batch):
        raise ValueError(f"effective batch {effective_batch} is not a multiple of gpus {gpus} x micro-batch "
                         f"{micro_batch}")
    n = _counts(model, lora_rank)
    trained, networks = (1, 1) if stage == 1 else (2, 3)
    chunk = StreamConfig().chunk_frames
    tokens, b, layers, full = latent_frames * tokens_per_frame, micro_batch, model.num_layers, lora_rank == 0
    video_targets = set(LORA_TARGETS) - set(TEXT_ONLY_TARGETS)

    def sharded(params: int, nbytes: int) -> int:
        return -(-params * nbytes // gpus)

    def block_graph(frames: int) -> tuple[int, int, int]:
        """(saved per block without its output, transient on top of it, no-grad forward peak), batch b."""
        saved, peak, no_grad = _block_bytes(model, frames, tokens_per_frame, full)
        adapters = 0 if full else lora_rank * BF16 * frames * tokens_per_frame * len(video_targets)
        boundary = frames * tokens_per_frame * model.dim * FP32
        return b * (saved - boundary + adapters), b * (peak - saved), b * no_grad

    boundary = b * tokens * model.dim * FP32
    saved, transient, no_grad = block_graph(latent_frames)
    held = (layers + 1) * boundary + (0 if checkpointing else layers * saved)
    working = transient + (saved if checkpointing else 0)  # the trained network's backward, block by block
    text_tensor = b * model.text_len * model.dim * BF16  # the context, or one block's K or V
    text = text_tensor * (1 + 2 * (1 if checkpointing else layers))
    reward_weights, cache, phase = 0, 0, "stage-1 step"
    if stage == 2:  # the critic step holds `working` on top of the graph; the student step this instead:
        reward_weights, reward_peak = _reward_bytes(latent_frames, tokens_per_frame, chunk)
        chunk_saved, chunk_transient, _ = block_graph(chunk)
        student_working = max(chunk_transient + (chunk_saved if checkpointing else 0),  # a chunk call's backward
                              boundary + 3 * text_tensor + no_grad,  # the teacher's or the critic's no-grad forward
                              b * reward_peak)
        committed = b * (latent_frames - chunk) * tokens_per_frame * model.dim * 2 * layers * BF16  # K and V
        phase = "critic step"
        if committed + student_working >= working:
            cache, working, phase = committed, student_working, "student step"
    return TrainingMemory(
        student_frozen=sharded(n.frozen, BF16),
        teacher_weights=sharded(n.network, BF16) if stage == 2 else 0,
        critic_frozen=sharded(n.frozen, BF16) if stage == 2 else 0,
        master_weights=sharded(trained * n.trainable, FP32),
        gradients=sharded(n.trainable, FP32),
        optimizer_states=sharded(trained * n.trainable, 2 * FP32),
        root_unsharded=networks * n.root * BF16,
        gathered_blocks=2 * n.block * BF16 + n.block_trainable * (BF16 + FP32),
        reward_models=reward_weights,
        saved_activations=held, text_conditioning=text, rollout_cache=cache, working_set=working, peak_phase=phase,
        network_params=n.network, trainable_params=n.trainable, tokens=tokens,
        accumulation_steps=effective_batch // (gpus * micro_batch),
    )


def format_training_memory(results: Mapping[str, TrainingMemory], *, usable_gib: float | None = None) -> str:
    """A table in GiB per GPU, one column per named result; ``usable_gib`` adds the headroom row."""
    width = max(14, *(len(name) + 1 for name in results))
    columns = list(results.values())

    def row(label: str, cells) -> str:
        return f"{label:<26}" + "".join(f"{c:>{width}}" for c in cells)

    lines = [row("GiB per GPU", results)]
    lines.append(row("  parameters / trainable", (f"{m.network_params / 1e9:.2f}B/{m.trainable_params / 1e6:.0f}M"
                                                  for m in columns)))
    lines.append(row("  tokens x accumulation", (f"{m.tokens} x{m.accumulation_steps}" for m in columns)))
    lines += [row(name, (f"{getattr(m, name) / GIB:.2f}" for m in columns)) for name in ITEMS]
    lines.append(row("  (activations)", (f"{m.activations / GIB:.2f}" for m in columns)))
    lines.append(row("  (peak phase)", (m.peak_phase for m in columns)))
    lines.append(row("total", (f"{m.total / GIB:.2f}" for m in columns)))
    if usable_gib is not None:
        lines.append(row(f"headroom of {usable_gib:g} GiB", (f"{usable_gib - m.total / GIB:.2f}" for m in columns)))
    return "\n".join(lines)


if __name__ == "__main__":
    big, small = ModelConfig.from_name("14b"), ModelConfig.from_name("1.3b")
    print("The recipe: 14B on 4 GPUs, 1.3B on 1 GPU, micro-batch 1, activation checkpointing, LoRA r128")
    print(format_training_memory({
        "14B s1 4 GPU": training_memory(big, stage=1, gpus=4),
        "14B s2 4 GPU": training_memory(big, stage=2, gpus=4),
        "1.3B s1 1 GPU": training_memory(small, stage=1, gpus=1),
        "1.3B s2 1 GPU": training_memory(small, stage=2, gpus=1),
    }, usable_gib=139))
    print("\nVariants: no activation checkpointing, micro-batch 2, full fine-tuning (lora_rank=0)")
    print(format_training_memory({
        "14B s1 no ckpt": training_memory(big, stage=1, gpus=4, checkpointing=False),
        "14B s2 no ckpt": training_memory(big, stage=2, gpus=4, checkpointing=False),
        "14B s2 mb 2": training_memory(big, stage=2, gpus=4, micro_batch=2),
        "14B s1 full": training_memory(big, stage=1, gpus=4, lora_rank=0),
        "1.3B s2 full": training_memory(small, stage=2, gpus=1, lora_rank=0),
    }, usable_gib=139))
