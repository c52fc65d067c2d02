"""Streaming self-attention: one chunk's queries against [the sink+window cache, the chunk's own live K/V].

``StreamingAttention`` implements ``AttentionContext.self_attention(layer, q, k, v)`` (q, k, v [B, L, H, D]
after RMSNorm, before RoPE) for one call of one chunk; the commit call (``write=True``) stores the chunk's
raw K/V in the cache after the layer's attention has read it (``SinkWindowCache.write_layer``).

Backends (``resolve_backend``):
    reference  RoPE in float64, then PyTorch ``scaled_dot_product_attention`` over cache + live keys
    triton     the fused sink+window attention kernel with in-register dynamic RoPE (lipforcing.kernels):
               the cache is read in place, never rotated, copied or concatenated
    sdpa       the production alternative: each call rotates the window's keys once, in float32 from a
               precomputed cos/sin table, into a preallocated window buffer (the live keys written into their
               slots: no concatenation, no new buffer, CUDA-graph safe), then PyTorch SDPA (flash / cuDNN on
               Hopper), or flash-attn 3 / 2 when importable on CUDA
The override ``LIPFORCING_BACKEND=reference|triton|sdpa`` wins over the default, which is ``triton`` on CUDA
when Triton is importable and ``reference`` otherwise. The engine logs which one runs.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from ...kernels.rope import apply_rope, rope_angles
from ..errors import ConfigError
from .cache import ChunkPlan, SinkWindowCache
from .config import ModelConfig, StreamConfig

log = logging.getLogger("lipforcing")

BACKENDS = ("reference", "triton", "sdpa")


def resolve_backend(requested: str | None, device: torch.device | str, *, model: ModelConfig | None = None,
                    stream: StreamConfig | None = None, dtype: torch.dtype | None = None) -> str:
    """Pick the attention/kernel backend for a model on ``device``: explicit request > LIPFORCING_BACKEND >
    auto. ``auto`` takes what ``lipforcing kernels --tune`` measured fastest on this device for the model's
    shapes (``model``, ``stream`` and ``dtype`` given), else triton on CUDA when available, else reference.
    ``triton`` is checked against ``device`` (where the tensors are), not against the host: a CPU model on a
    host with a GPU cannot run the kernels (outside the interpreter)."""
    from ...kernels import triton_available

    name = requested or os.environ.get("LIPFORCING_BACKEND") or "auto"
    device = torch.device(device)
    if name == "auto" and None not in (model, stream, dtype) and device.type != "meta":
        from .tuning import tuned_backend

        measured = tuned_backend(model, stream, device, dtype)
        if measured is not None:
            log.info("lipforcing: attention backend %s, measured fastest here by lipforcing kernels --tune",
                     measured)
            name = measured
    if name == "auto":
        name = "reference"
        if device.type == "cuda":
            ok, why = triton_available(device)
            if ok:
                name = "triton"
            else:
                log.warning("Triton kernels unavailable (%s); using the reference backend", why)
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    if name == "triton" and device.type != "meta":  # the meta device only plans memory: no kernel runs
        ok, why = triton_available(device)
        if not ok:
            raise ConfigError(f"backend 'triton' requested for a model on {device} but unavailable: {why}")
    return name


class RopeTable:
    """Rotation angles for a whole window in slot order; any chunk's keys and queries are slices of it."""

    def __init__(self, model: ModelConfig, stream: StreamConfig, device: torch.device | str) -> None:
        _, ph, pw = model.patch_size
        self.rows, self.cols = stream.latent_h // ph, stream.latent_w // pw
        self.tokens = self.rows * self.cols
        self.pairs = model.rope_pairs_thw
        self.theta = model.rope_theta
        positions = torch.arange(stream.window_frames, device=device)
        self.angles = rope_angles(positions, self.rows, self.cols, self.pairs, self.theta)  # [W*T, D/2]
        self.cos = self.angles.cos().float()  # [W*T, D/2] float32: the sdpa backend's table
        self.sin = self.angles.sin().float()
        self._positions: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._windows: dict[tuple, WindowBuffers] = {}
        self.device = device

    def window_buffers(self, k: torch.Tensor) -> WindowBuffers:
        """The sdpa backend's buffers for live keys like ``k`` [B, Lq, H, D], made once per (B, H, D, dtype)."""
        b, _, h, d = k.shape
        key = (b, h, d, k.dtype)
        if key not in self._windows:
            self._windows[key] = WindowBuffers(b, self.angles.shape[0], h, d, k.dtype, k.device)
        return self._windows[key]

    def keys(self, plan: ChunkPlan) -> torch.Tensor:
        return self.angles[: (plan.num_cached + plan.chunk_frames) * self.tokens]

    def queries(self, plan: ChunkPlan) -> torch.Tensor:
        return self.angles[plan.num_cached * self.tokens : (plan.num_cached + plan.chunk_frames) * self.tokens]

    def positions(self, plan: ChunkPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """(query, cache) temporal positions as int32 device tensors, made once per window shape."""
        key = plan.num_cached
        if key not in self._positions:
            q = torch.tensor(plan.query_positions, dtype=torch.int32, device=self.device)
            c = torch.tensor(plan.cache_positions, dtype=torch.int32, device=self.device)
            self._positions[key] = (q, c)
        return self._positions[key]


class WindowBuffers:
    """Preallocated tensors of the sdpa backend for a whole window (the largest a call can see): rotated keys
    and values in window order [B, W*T, H, D], rotated queries [B, W*T, H, D] (a prefix is used), and float32
    scratch for the rotation [2, B, W*T, H, D/2]. Every call of every layer reuses them."""

    def __init__(self, batch: int, tokens: int, heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        shape = (batch, tokens, heads, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.q = torch.empty(shape, dtype=dtype, device=device)
        self.scratch = torch.empty((2, batch, tokens, heads, head_dim // 2), dtype=torch.float32, device=device)


def rotate_into(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor,
                scratch: torch.Tensor) -> None:
    """RoPE of pairs (2j, 2j+1) in float32 from a table, written into ``out`` (x's dtype); no new tensors.
    x, out: [B, L, H, D]; cos, sin: [L, D/2] float32; scratch: float32 [2, >=B, >=L, H, D/2]."""
    b, l = x.shape[:2]
    even, odd = x[..., 0::2], x[..., 1::2]
    c, s = cos[None, :, None], sin[None, :, None]
    re, im = scratch[0, :b, :l], scratch[1, :b, :l]
    torch.mul(even, c, out=re)
    re.addcmul_(odd, s, value=-1.0)  # x_e cos - x_o sin
    torch.mul(even, s, out=im)
    im.addcmul_(odd, c)  # x_e sin + x_o cos
    out[..., 0::2].copy_(re)
    out[..., 1::2].copy_(im)


def _flash_attention():
    """flash-attn 3's or 2's function on [B, L, H, D] inputs, or None when neither is importable."""
    for module in ("flash_attn_interface", "flash_attn"):
        try:
            return __import__(module).flash_attn_func
        except (ImportError, AttributeError):
            continue
    return None


class StreamingAttention:
    """Self-attention of one call of one chunk: cached frames + the chunk's own live K/V.

    ``write=True`` (the commit call) stores the chunk's raw K/V for the next chunk, layer by layer, after
    the layer's attention has read the cache.
    """

    def __init__(
        self, cache: SinkWindowCache, plan: ChunkPlan, rope: RopeTable, *, write: bool, backend: str
    ) -> None:
        self.cache, self.plan, self.rope, self.write, self.backend = cache, plan, rope, write, backend
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")

    def self_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.backend == "triton":  # reads the cache in place, an e4m3 one with its scales
            from ...kernels import ops

            q_pos, cache_pos = self.rope.positions(self.plan)
            raw = self.cache.raw(layer, self.plan)
            scales = raw[2:] if len(raw) == 4 else (None, None)
            out = ops.attention(
                q, k, v, raw[0], raw[1], q_pos, cache_pos,
                (self.rope.rows, self.rope.cols), self.rope.pairs, self.rope.theta, None, *scales,
            )
        elif self.backend == "sdpa":
            out = self._sdpa_window(layer, q, k, v)
        else:
            k_cached, v_cached = self.cache.cached(layer, self.plan)  # dequantised from an e4m3 cache
            keys = torch.cat([k_cached, k], dim=1)  # [B, Lk, H, D], window order
            values = torch.cat([v_cached, v], dim=1)
            out = sdpa(apply_rope(q, self.rope.queries(self.plan)), apply_rope(keys, self.rope.keys(self.plan)),
                       values)
        if self.write:
            self.cache.write_layer(layer, self.plan, k, v)
        return out

    def _sdpa_window(self, layer, q, k, v) -> torch.Tensor:
        """The sdpa backend: rotate the cached and live keys once into the window buffer, then attend."""
        buf = self.rope.window_buffers(k)
        n, lq = self.plan.num_cached * self.rope.tokens, q.shape[1]
        lk = n + lq
        rope = self.rope
        if self.cache.fp8:  # dequantised into the window buffer, then rotated there (rotate_into may alias)
            self.cache.read_into(layer, self.plan, buf.k[:, :n], buf.v[:, :n])
            rotate_into(buf.k[:, :n], rope.cos[:n], rope.sin[:n], buf.k[:, :n], buf.scratch)
        else:
            k_cached, v_cached = self.cache.cached(layer, self.plan)
            rotate_into(k_cached, rope.cos[:n], rope.sin[:n], buf.k[:, :n], buf.scratch)
            buf.v[:, :n].copy_(v_cached)
        rotate_into(k, rope.cos[n:lk], rope.sin[n:lk], buf.k[:, n:lk], buf.scratch)
        rotate_into(q, rope.cos[n:lk], rope.sin[n:lk], buf.q[:, :lq], buf.scratch)
        buf.v[:, n:lk].copy_(v)
        qr, kr, vr = buf.q[:, :lq], buf.k[:, :lk], buf.v[:, :lk]
        flash = _FLASH if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) else None
        if flash is not None:
            out = flash(qr, kr, vr)
            return out[0] if isinstance(out, tuple) else out  # flash-attn 3 also returns the softmax LSE
        return sdpa(qr, kr, vr)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, L, H, D] layout around PyTorch's scaled_dot_product_attention."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return o.transpose(1, 2)


_FLASH = _flash_attention()
