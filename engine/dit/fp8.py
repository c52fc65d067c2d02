"""FP8 (e4m3) weights for the student's blocks and e4m3 values for its KV cache (``--dtype fp8``).

What is quantised, and how:
    every linear layer inside the blocks (self- and cross-attention q, k, v, o; the FFN's two layers)
        weights e4m3 with one float32 scale per output channel (absmax / 448); the activations entering
        them e4m3 with one scale per token, computed on the fly. The text embedding, time embedding,
        patch embedding, audio projections and head stay in the compute dtype (bf16), as do norms,
        modulation and the float32 residual stream.
    the KV cache (``SinkWindowCache(kv_fp8=True)``)
        raw K and V e4m3 with one float32 scale per (layer, session, frame, head): each frame is quantised
        when the commit call writes it.

    model = to_fp8(model)                          # in place: nn.Linear -> Fp8Linear in every block
    fp8 = quantized_copy(model)                    # beside it, sharing every other parameter
    state = quantize_state(read_state_dict(path))  # the same, on a checkpoint (what ``convert --dtype fp8`` writes)
    q, scale = quantize(x, dim=-1)                 # e4m3 values and float32 scales, x ~= q * scale

The GEMMs run ``torch._scaled_mm`` (fp8 tensor cores, float32 accumulation, both scales applied to the
accumulator) on CUDA devices of compute capability 9.0 and later (Hopper). Elsewhere (the CPU, Ada and older
GPUs) the same quantised values are dequantised and multiplied in float32, so the CPU tests measure the
accuracy of exactly what the GPU computes, up to the order of the fp32 accumulation.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("lipforcing")

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
"""The largest finite e4m3 value: a scale maps each row's absolute maximum onto it."""
_TINY = 1e-12  # the scale of an all-zero row (any positive value reproduces the zeros)

BLOCK_LINEAR = re.compile(r"^blocks\.\d+\.(self_attn\.[qkvo]|cross_attn\.[qkvo]|ffn\.[02])$")
"""Module names of the linear layers that run in fp8 (the released checkpoint's names)."""


def quantize(x: torch.Tensor, dim: int | tuple[int, ...] = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 values and float32 scales of ``x`` with one scale per slice reduced over ``dim`` (absmax / 448):
    ``x ~= q.float() * scale``. The scale keeps the reduced dims (size 1) so it broadcasts against ``q``."""
    xf = x.float()
    scale = (xf.abs().amax(dim=dim, keepdim=True) / E4M3_MAX).clamp_min(_TINY)
    return (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def fp8_gemm_available(device: torch.device) -> bool:
    """Whether the fp8 GEMM runs on ``device``: ``torch._scaled_mm`` with a scale per token and per output
    channel (rowwise), which PyTorch implements for compute capability 9.0 and later (Hopper, Blackwell); True on
    the meta device, where the memory plan profiles the CUDA path. Ada (8.9) keeps the e4m3 weights in memory
    (what makes 14B fit a 24 GB card) and multiplies them dequantised until its rowwise GEMM is measured."""
    if device.type == "meta":
        return True
    return device.type == "cuda" and hasattr(torch, "_scaled_mm") and torch.cuda.get_device_capability(device) >= (9, 0)


class Fp8Linear(nn.Module):
    """A linear layer with e4m3 weights [out, in] and a float32 scale per output channel; its input is
    quantised per token. Output in ``compute_dtype``; the bias stays in ``compute_dtype``."""

    def __init__(self, in_features: int, out_features: int, compute_dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.compute_dtype = in_features, out_features, compute_dtype
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=E4M3, device=device),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device=device), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones(out_features, dtype=torch.float32, device=device),
                                         requires_grad=False)

    @classmethod
    def from_linear(cls, layer: nn.Linear, compute_dtype: torch.dtype) -> Fp8Linear:
        """The quantised copy of ``layer`` (its weights read in float32: no double rounding)."""
        out = cls(layer.in_features, layer.out_features, compute_dtype, device=layer.weight.device)
        out.set_weight(layer.weight.detach())
        out.bias.data = layer.bias.detach().to(compute_dtype)
        return out

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Quantise ``weight`` [out, in] (any float dtype) into this layer, one scale per output channel."""
        if weight.device.type == "meta":
            return
        q, scale = quantize(weight, dim=1)
        self.weight.data.copy_(q)
        self.weight_scale.data.copy_(scale[:, 0])

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the layer computes with, [out, in] float32."""
        return self.weight.float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in] any float dtype -> [..., out] in ``compute_dtype``."""
        lead = x.shape[:-1]
        q, scale = quantize(x.reshape(-1, self.in_features), dim=-1)  # [M, in] e4m3, [M, 1] float32
        if fp8_gemm_available(x.device) and self.in_features % 16 == 0 and self.out_features % 16 == 0:
            y = torch._scaled_mm(q, self.weight.t(), scale_a=scale, scale_b=self.weight_scale[None],
                                 out_dtype=self.compute_dtype)
            y = y + self.bias
        else:
            y = F.linear(q.float() * scale, self.dequantized_weight(), self.bias.float()).to(self.compute_dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3, {self.compute_dtype}"


def to_fp8(model: nn.Module, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every block linear layer of the student by its ``Fp8Linear`` (in place; returns ``model``).
    ``compute_dtype``: of the activations and outputs (default: the model's dtype). A meta model stays
    meta (the structure only, for loading a quantised checkpoint or planning memory)."""
    compute_dtype = compute_dtype or model.dtype
    for name, layer in list(model.named_modules()):
        if BLOCK_LINEAR.match(name) and isinstance(layer, nn.Linear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, Fp8Linear.from_linear(layer, compute_dtype))
    return model


def quantized_copy(model: nn.Module, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """An fp8 student beside ``model``: it shares every parameter of ``model`` except the block linear layers,
    which it holds quantised (the bench's +fp8 variant: the fp8 weights are all the memory it adds)."""
    import copy

    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return to_fp8(copy.deepcopy(model, shared), compute_dtype)


def is_fp8(model: nn.Module) -> bool:
    """Whether the student's blocks hold fp8 weights."""
    return any(isinstance(m, Fp8Linear) for m in model.modules())


def is_quantized_state(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether a checkpoint holds fp8 block weights (``convert --dtype fp8``)."""
    return any(k.endswith(".weight_scale") for k in state)


def quantize_state(state: Mapping[str, torch.Tensor], compute_dtype: torch.dtype = torch.bfloat16
                   ) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors with the block linear weights quantised (``<layer>.weight`` e4m3 plus
    ``<layer>.weight_scale`` float32) and every other floating tensor in ``compute_dtype``. Tensors are
    quantised one at a time on the CPU. A checkpoint already quantised is returned as it is."""
    if is_quantized_state(state):
        return dict(state)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        layer, _, leaf = key.rpartition(".")
        if leaf == "weight" and BLOCK_LINEAR.match(layer):
            q, scale = quantize(value, dim=1)
            out[key], out[f"{layer}.weight_scale"] = q.contiguous(), scale[:, 0].contiguous()
        else:
            out[key] = value.to(compute_dtype) if value.is_floating_point() else value
    return out
