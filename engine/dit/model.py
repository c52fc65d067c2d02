"""The Lip Forcing causal student: a Wan 2.1 DiT with additive audio conditioning (SPEC §3-4).

Parameter names are exactly the released checkpoint's (SPEC §10), so ``lipforcing_14b.pth`` loads with
``load_state_dict(strict=True)`` and no renaming.

One set of blocks, two ways of calling it:

    clip = model.prepare_clip(text_context, audio_emb)        # text K/V and audio codes, once per clip
    flow = model(x_in, t, clip, StreamingAttention(...))      # one chunk against the sink+window cache
    flow = model(x_in, t, clip, FullSequenceAttention(...))   # whole clip, bidirectional or block-causal
    flow = model(x_in, t, ClipInputs(text, audio), ctx)       # training: the conditioning computed inside forward

``x_in`` is the 65-channel conditioning [B, 65, F, h, w]; the output is the flow [B, 16, F, h, w].
Norms, modulation and the residual stream are float32 whatever the weight dtype (as released); linear
layers run in the weight dtype (bf16 for the real models, fp32 for parity checks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ...kernels.patches import unpatchify
from .config import ModelConfig
from .fp8 import Fp8Linear, is_fp8


def timestep_sinusoid(freq_dim: int, t: torch.Tensor) -> torch.Tensor:
    """[cos(tau w), sin(tau w)] with tau = 1000 t and w_i = 10000^(-i / (freq_dim/2)), in float64.

    t: [...] -> [..., freq_dim].
    """
    half = freq_dim // 2
    omega = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angle = (t.to(torch.float64) * 1000.0)[..., None] * omega
    return torch.cat([torch.cos(angle), torch.sin(angle)], dim=-1)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim with a learned weight; statistics in float32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return y * self.weight.to(x.dtype)


def layer_norm_fp32(x: torch.Tensor, eps: float, weight=None, bias=None) -> torch.Tensor:
    """LayerNorm computed in float32; returns float32."""
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    return F.layer_norm(x.float(), (x.shape[-1],), w, b, eps)


def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Apply ``layer`` in its weight dtype (an fp8 layer quantises its input itself: fp8.Fp8Linear)."""
    if isinstance(layer, Fp8Linear):
        return layer(x)
    return layer(x.to(layer.weight.dtype))


def heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, L, H*D] -> [B, L, H, D]."""
    return x.unflatten(-1, (num_heads, -1))


class AttentionContext(Protocol):
    """How self-attention is computed for one call: against the cache, or over the whole sequence.

    ``backend`` is ``reference`` (plain PyTorch) or ``triton``: the latter also routes the blocks' norms,
    modulation and gated residuals through the fused kernels of ``lipforcing.kernels``.
    """

    backend: str

    def self_attention(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """q, k, v: [B, L, H, D] after RMSNorm, not rotated -> [B, L, H, D]."""
        ...


class _Projections(nn.Module):
    """q, k, v, o projections and the q/k RMSNorms shared by both attentions (released key names)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.num_heads = cfg.num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(d, cfg.eps), RMSNorm(d, cfg.eps)


class SelfAttention(_Projections):

    def forward(self, h: torch.Tensor, layer: int, ctx: AttentionContext) -> torch.Tensor:
        """h: [B, L, dim] float32 -> [B, L, dim] in the weight dtype."""
        n = self.num_heads
        q, k = linear(self.q, h), linear(self.k, h)
        if ctx.backend == "triton":
            from ...kernels import ops

            q = ops.rms_norm(q, self.norm_q.weight, self.norm_q.eps)
            k = ops.rms_norm(k, self.norm_k.weight, self.norm_k.eps)
        else:
            q, k = self.norm_q(q), self.norm_k(k)
        v = heads(linear(self.v, h), n)
        return linear(self.o, ctx.self_attention(layer, heads(q, n), heads(k, n), v).flatten(2))


class CrossAttention(_Projections):

    def context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """context: [B, text_len, dim] -> K, V each [B, text_len, H, D] (computed once per clip)."""
        k = heads(self.norm_k(linear(self.k, context)), self.num_heads)
        return k, heads(linear(self.v, context), self.num_heads)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x: [B, L, dim] -> [B, L, dim]; kv from ``context_kv``."""
        q = heads(self.norm_q(linear(self.q, x)), self.num_heads)
        k, v = kv
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return linear(self.o, o.transpose(1, 2).flatten(2))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.eps = cfg.eps
        self.self_attn = SelfAttention(cfg)
        self.cross_attn = CrossAttention(cfg)
        self.norm3 = nn.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=True)
        self.ffn = nn.Sequential(
            nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, cfg.dim)
        )
        self.modulation = nn.Parameter(torch.zeros(1, 6, cfg.dim))

    def forward(
        self,
        x: torch.Tensor,  # [B, F, T, dim] float32 residual stream
        e: torch.Tensor,  # [B, F or 1, 6, dim] float32 time modulation
        layer: int,
        text_kv: tuple[torch.Tensor, torch.Tensor] | torch.Tensor,  # K, V; or the text context [B, text_len, dim]
        ctx: AttentionContext,
    ) -> torch.Tensor:
        if isinstance(text_kv, torch.Tensor):  # the embedded text context: this block computes its own K/V
            text_kv = self.cross_attn.context_kv(text_kv)
        b, f, t, d = x.shape
        mod = (self.modulation.float()[:, None] + e).unsqueeze(3)  # [B, F|1, 6, 1, dim]
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.unbind(2)  # each [B, F|1, 1, dim]
        if ctx.backend == "triton":
            return self._forward_fused(x, mod[:, :, :, 0], layer, text_kv, ctx)

        h = layer_norm_fp32(x, self.eps) * (1 + scale1) + shift1
        y = self.self_attn(h.reshape(b, f * t, d), layer, ctx).float().reshape(b, f, t, d)
        x = x + gate1 * y

        c = layer_norm_fp32(x, self.eps, self.norm3.weight, self.norm3.bias).reshape(b, f * t, d)
        x = x + self.cross_attn(c, text_kv).float().reshape(b, f, t, d)

        h = layer_norm_fp32(x, self.eps) * (1 + scale2) + shift2
        y = linear(self.ffn[2], self.ffn[1](linear(self.ffn[0], h)))
        return x + gate2 * y.float()

    def _forward_fused(self, x, mod, layer, text_kv, ctx) -> torch.Tensor:
        """The same block with the modulated norms and gated residuals as fused Triton kernels.

        x: [B, F, T, dim] float32; mod: [B, F|1, 6, dim] (shift1, scale1, gate1, shift2, scale2, gate2)."""
        from ...kernels import ops

        b, f, t, d = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.unbind(2)  # each [B, F|1, dim]
        x = x.reshape(b, f * t, d)
        h = ops.modulated_layer_norm(x, scale1, shift1, self.eps)
        x = ops.gated_residual(x, self.self_attn(h, layer, ctx), gate1)
        c = layer_norm_fp32(x, self.eps, self.norm3.weight, self.norm3.bias)
        x = x + self.cross_attn(c, text_kv).float()
        h = ops.modulated_layer_norm(x, scale2, shift2, self.eps)
        x = ops.gated_residual(x, linear(self.ffn[2], self.ffn[1](linear(self.ffn[0], h))), gate2)
        return x.reshape(b, f, t, d)


class Head(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.eps = cfg.eps
        self.head = nn.Linear(cfg.dim, cfg.patch_dim)
        self.modulation = nn.Parameter(torch.zeros(1, 2, cfg.dim))

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x: [B, F, T, dim], e: [B, F|1, dim] -> tokens [B, F, T, patch_dim] float32."""
        shift, scale = (self.modulation.float()[:, None] + e[:, :, None]).unsqueeze(3).unbind(2)
        return linear(self.head, layer_norm_fp32(x, self.eps) * (1 + scale) + shift).float()


class AudioPack(nn.Module):
    """Groups the per-video-frame audio features by latent frame and projects them to a small code."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.group = cfg.audio_frames_per_latent
        self.proj = nn.Linear(cfg.audio_dim * self.group, cfg.audio_hidden)
        self.norm_out = nn.LayerNorm(cfg.audio_hidden, eps=cfg.audio_norm_eps)

    def forward(self, audio_emb: torch.Tensor, *, clip_start: bool = True) -> torch.Tensor:
        """audio_emb: [B, V, audio_dim] with V = 1 + 4(L-1) -> codes [B, L, audio_hidden] float32.

        Three copies of frame 0 are prepended, so latent frame 0 sees video frames {0,0,0,0} and latent
        frame k >= 1 sees {4k-3 .. 4k} (SPEC §4). ``clip_start=False`` packs frames from inside a clip
        (V = 4L: a later chunk's 12 frames, as live sessions feed them), with nothing prepended.
        """
        b, v, c = audio_emb.shape
        if clip_start and (v - 1) % self.group:
            raise ValueError(f"audio_emb has {v} frames; expected 1 + {self.group}(L-1)")
        if not clip_start and v % self.group:
            raise ValueError(f"audio_emb has {v} frames; expected a multiple of {self.group} inside a clip")
        padded = audio_emb
        if clip_start:
            padded = torch.cat([audio_emb[:, :1].expand(b, self.group - 1, c), audio_emb], dim=1)
        packed = padded.reshape(b, -1, self.group * c)  # frame-in-group major, channel minor
        y = linear(self.proj, packed)
        return F.layer_norm(y.float(), (y.shape[-1],), self.norm_out.weight.float(), self.norm_out.bias.float(),
                            self.norm_out.eps)


@dataclass
class ClipInputs:
    """The raw per-clip inputs, conditioned inside ``forward`` (training): every weight is then used inside the
    forward of the module that owns it, as FSDP2 needs (it gathers a block's weights only for that block's
    forward), and autograd sees the whole path."""

    text_context: torch.Tensor
    """[B, text_len, text_dim]"""
    audio_emb: torch.Tensor
    """[B, V, audio_dim], V = 1 + 4(L-1)"""


@dataclass
class ClipConditioning:
    """What depends only on the clip: per-layer text K/V and the packed audio codes."""

    text_kv: list[tuple[torch.Tensor, torch.Tensor]] | list[torch.Tensor]
    """Per layer: K, V each [B, text_len, H, D]; or (``ClipInputs``) the embedded text context [B, text_len, dim],
    from which each block computes its K/V."""
    audio_codes: torch.Tensor | None
    """[B, L, audio_hidden] float32, one code per latent frame (None: given per call, live audio)."""


class CausalWanStudent(nn.Module):
    """The streaming student. Call ``prepare_clip`` once, then ``forward`` per call."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.audio_proj = AudioPack(cfg)
        self.audio_cond_projs = nn.ModuleList(nn.Linear(cfg.audio_hidden, d) for _ in range(cfg.num_audio_projections))
        self._audio_slot = {blk: j for j, blk in enumerate(cfg.audio_blocks)}
        self.activation_checkpointing = False
        """Training: recompute each block in the backward pass instead of keeping its activations."""

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (of the activations; fp8 weights compute in it too)."""
        return self.patch_embedding.weight.dtype

    @property
    def fp8(self) -> bool:
        """Whether the blocks hold e4m3 weights (``fp8.to_fp8``); the KV cache is then e4m3 too."""
        return is_fp8(self)

    @torch.no_grad()
    def prepare_clip(self, text_context: torch.Tensor, audio_emb: torch.Tensor | None) -> ClipConditioning:
        """text_context: [B, text_len, text_dim]; audio_emb: [B, V, audio_dim]. Run once per clip."""
        return self.clip_conditioning(text_context, audio_emb)

    def clip_conditioning(self, text_context: torch.Tensor, audio_emb: torch.Tensor | None) -> ClipConditioning:
        """``prepare_clip`` with autograd left on (training). ``audio_emb=None``: the audio arrives chunk by chunk
        (live sessions), each call then gets its codes."""
        codes = None if audio_emb is None else self.audio_proj(audio_emb)
        return ClipConditioning(text_kv=self.text_kv(text_context), audio_codes=codes)

    def text_kv(self, text_context: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Cross-attention K/V of every layer: text_context [B, text_len, text_dim] -> per layer K, V each
        [B, text_len, H, D]. Text weights offloaded to the host are brought to the device for the computation
        and sent back after it."""
        device = self.patch_embedding.weight.device
        offloaded = self.text_embedding[0].weight.device != device
        modules = self.text_modules()
        if offloaded:
            for m in modules:
                m.to(device)
        try:
            context = self.embed_text(text_context.to(device))
            return [blk.cross_attn.context_kv(context) for blk in self.blocks]
        finally:
            if offloaded:
                for m in modules:
                    _to_host(m)

    def embed_text(self, text_context: torch.Tensor) -> torch.Tensor:
        """[B, text_len, text_dim] -> the text context every cross-attention reads, [B, text_len, dim]."""
        t = self.text_embedding
        return linear(t[2], t[1](linear(t[0], text_context)))

    def text_modules(self) -> list[nn.Module]:
        """The modules used only to compute the text K/V: the text embedding and every cross-attention's k, v
        and norm_k (4.3 GB of the 14B model in bf16)."""
        out: list[nn.Module] = [self.text_embedding]
        for blk in self.blocks:
            out += [blk.cross_attn.k, blk.cross_attn.v, blk.cross_attn.norm_k]
        return out

    def offload_text_weights(self) -> int:
        """Move the text-only weights to host memory (a streaming engine with its text K/V cached never needs
        them on the device); returns the device bytes freed. ``text_kv`` still works, at the cost of a copy."""
        if self.patch_embedding.weight.device.type == "cpu":
            return 0
        freed = 0
        for m in self.text_modules():
            freed += sum(p.nbytes for p in m.parameters())
            _to_host(m)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return freed


    def time_modulation(self, t: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """t: scalar, [B] or [B, F] -> e [B, F|1, dim] and the block modulation [B, F|1, 6, dim], float32."""
        t = torch.as_tensor(t, dtype=torch.float64, device=self.patch_embedding.weight.device)
        t = t.reshape(-1, 1) if t.dim() <= 1 else t
        t = t.expand(batch, t.shape[1])
        sinus = timestep_sinusoid(self.cfg.freq_dim, t).float()
        e = _mlp_fp32(self.time_embedding, sinus)
        e0 = _mlp_fp32(self.time_projection, e).unflatten(-1, (6, self.cfg.dim))
        return e, e0

    def forward(
        self,
        x_in: torch.Tensor,  # [B, in_dim, F, h, w]
        t: torch.Tensor | float,  # scalar, [B] or [B, F]
        clip: ClipConditioning | ClipInputs,
        ctx: AttentionContext,
        start_frame: int = 0,
        codes: torch.Tensor | None = None,  # [B, F, audio_hidden]: this call's audio codes (live audio)
    ) -> torch.Tensor:
        """One network call on frames start_frame .. start_frame + F - 1; returns the flow [B, out_dim, F, h, w].
        The audio codes are the clip's (sliced at start_frame) unless given."""
        f = x_in.shape[2]
        if isinstance(clip, ClipInputs):
            context = self.embed_text(clip.text_context)
            clip = ClipConditioning(text_kv=[context] * len(self.blocks), audio_codes=self.audio_proj(clip.audio_emb))
        e, e0 = self.time_modulation(t, x_in.shape[0])
        if codes is None:
            codes = clip.audio_codes[:, start_frame : start_frame + f]  # [B, F, audio_hidden]
            if codes.shape[1] != f:
                covered = clip.audio_codes.shape[1]
                raise ValueError(f"audio covers {covered} latent frames; call needs {start_frame + f}")
        return self.forward_static(x_in, e, e0, codes, clip.text_kv, ctx)

    def forward_static(
        self,
        x_in: torch.Tensor,  # [B, in_dim, F, h, w]
        e: torch.Tensor,  # [B, F|1, dim] time embedding (``time_modulation``)
        e0: torch.Tensor,  # [B, F|1, 6, dim] block modulation
        codes: torch.Tensor,  # [B, F, audio_hidden] audio codes of these frames
        text_kv: list[tuple[torch.Tensor, torch.Tensor]],
        ctx: AttentionContext,
        *,
        tokens: bool = False,
    ) -> torch.Tensor:
        """The call with every per-call input precomputed: no host work, no allocation from host data,
        so it can be captured in a CUDA graph. ``tokens=True`` returns the head's token-major output
        [B, F*T, patch_dim] instead of the unpatchified flow (for the fused flow-update kernel)."""
        b, _, f, h, w = x_in.shape
        pt, ph, pw = self.cfg.patch_size
        rows, cols = h // ph, w // pw
        x = self.patch_embedding(x_in.to(self.dtype)).float()  # [B, dim, F, rows, cols]
        x = x.flatten(3).permute(0, 2, 3, 1).contiguous()  # [B, F, T, dim], tokens (frame, row, col)
        parallel = getattr(ctx, "sequence_parallel", None)  # several ranks: this one's T / N tokens (parallel.py)
        if parallel is not None:
            x = parallel.scatter(x)
        for i, block in enumerate(self.blocks):
            j = self._audio_slot.get(i)
            if j is not None:
                x = x + linear(self.audio_cond_projs[j], codes).float()[:, :, None, :]
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, e0, i, text_kv[i], ctx, use_reentrant=False)
            else:
                x = block(x, e0, i, text_kv[i], ctx)
        out = self.head(x, e)  # [B, F, T, patch_dim]
        if parallel is not None:
            out = parallel.gather(out)
        if tokens:
            return out.flatten(1, 2)
        return unpatchify(out, (rows, cols), self.cfg.out_dim, (ph, pw))


def input_channels(x: torch.Tensor, ref_latent: torch.Tensor, mask_latent: torch.Tensor, masked: torch.Tensor,
                   ref_seq: torch.Tensor) -> torch.Tensor:
    """The 65 input channels [B, 65, F, h, w] (SPEC §3): the noisy latent x [B, 16, F], the reference latent
    [B, 16, 1] and the mask [B, 1, 1] repeated over the frames, the masked video and the reference sequence
    [B, 16, F]."""
    f = x.shape[2]
    return torch.cat([x.float(), ref_latent.float().expand(-1, -1, f, -1, -1),
                      mask_latent.float().expand(-1, -1, f, -1, -1), masked.float(), ref_seq.float()], dim=1)


def _mlp_fp32(mlp: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Run a small Linear/activation stack in float32 whatever its parameter dtype."""
    for layer in mlp:
        x = F.linear(x, layer.weight.float(), layer.bias.float()) if isinstance(layer, nn.Linear) else layer(x)
    return x


def count_parameters(cfg: ModelConfig) -> int:
    """Parameters of the student (computed on the meta device, no memory)."""
    with torch.device("meta"):
        model = CausalWanStudent(cfg)
    return sum(p.numel() for p in model.parameters())


def _to_host(module: nn.Module) -> None:
    """Move a module's parameters to pinned host memory (fast to bring back)."""
    module.to("cpu")
    if torch.cuda.is_available():
        for p in module.parameters():
            p.data = p.data.pin_memory()
