"""Attention backends measured on this device: ``lipforcing kernels --tune`` times every usable backend
(reference, sdpa, triton) at a model's real shapes and keeps the winner per shape in the user cache; the
``auto`` backend then takes the backend that wins on the model's shapes on this device.

    rows = measure_attention(ModelConfig.from_name("14b"), stream, "cuda", torch.bfloat16)
    save_measurements(rows)                                  # <cache>/tuning/attention.json
    tuned_backend(cfg, "cuda", torch.bfloat16)               # "sdpa", "triton", ... or None (never measured)

What is timed: one call of one layer's streaming self-attention (``StreamingAttention.self_attention``: the
rotation, the cache read, the attention; for triton the fused kernel), for every window shape of a chunk (0, 3
and 4 cached frames at sink 1 + window 7), after one untimed call (autotuning, first compiles), median of
``repeats`` calls, synchronised on CUDA. A table entry is keyed by the device's name and everything that moves
the winner: heads, head dim, dtype, query and cache tokens.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from pathlib import Path

import torch

from ..user_cache import user_cache_dir
from .config import ModelConfig, StreamConfig

log = logging.getLogger("lipforcing")

TABLE_FORMAT = "lipforcing-attention-tuning/1"


def table_path() -> Path:
    return user_cache_dir("tuning", "attention.json")


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def _shape_key(heads: int, head_dim: int, dtype: torch.dtype, lq: int, lc: int) -> str:
    return f"h{heads}-d{head_dim}-{str(dtype).removeprefix('torch.')}-q{lq}-c{lc}"


def usable_backends(device: torch.device | str) -> list[str]:
    """The backends that can run on ``device`` here (triton only where its kernels can)."""
    from ...kernels import triton_available

    backends = ["reference", "sdpa"]
    if triton_available(device)[0]:
        backends.append("triton")
    return backends


@torch.no_grad()
def measure_attention(cfg: ModelConfig, stream: StreamConfig, device: torch.device | str, dtype: torch.dtype, *,
                      backends: list[str] | None = None, repeats: int = 10, seed: int = 0) -> list[dict]:
    """One row per window shape: {"key", "lq", "lc", "ms": {backend: median ms}, "winner"} (see module doc)."""
    from .attention import RopeTable, StreamingAttention
    from .cache import SinkWindowCache, window_shape_plans

    device = torch.device(device)
    backends = backends or usable_backends(device)
    single = cfg.replace(num_layers=1, audio_blocks=(0,))
    cache = SinkWindowCache(single, stream, device=device, dtype=dtype)
    g = torch.Generator(device="cpu").manual_seed(seed)
    cache.k.copy_(torch.randn(cache.k.shape, generator=g).to(dtype))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g).to(dtype))
    rope = RopeTable(single, stream, device)
    rows = []
    for plan in window_shape_plans(stream):
        lq = plan.chunk_frames * rope.tokens
        q, k, v = (torch.randn(1, lq, cfg.num_heads, cfg.head_dim, generator=g).to(device, dtype) for _ in range(3))
        cache.plan = plan
        ms = {}
        for backend in backends:
            ctx = StreamingAttention(cache, plan, rope, write=False, backend=backend)
            ctx.self_attention(0, q, k, v)  # untimed: autotuning, compiles, buffers
            times = []
            for _ in range(repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                began = time.perf_counter()
                ctx.self_attention(0, q, k, v)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(1e3 * (time.perf_counter() - began))
            ms[backend] = round(statistics.median(times), 4)
        lc = plan.num_cached * rope.tokens
        rows.append({"key": _shape_key(cfg.num_heads, cfg.head_dim, dtype, lq, lc), "lq": lq, "lc": lc, "ms": ms,
                     "winner": min(ms, key=ms.get)})
    return rows


def _read_table() -> dict:
    path = table_path()
    try:
        table = json.loads(path.read_text())
    except FileNotFoundError:
        return {"format": TABLE_FORMAT, "devices": {}}
    except (OSError, ValueError) as exc:
        log.warning("lipforcing: ignoring the unreadable attention tuning table %s (%s)", path, exc)
        return {"format": TABLE_FORMAT, "devices": {}}
    if table.get("format") != TABLE_FORMAT:
        return {"format": TABLE_FORMAT, "devices": {}}
    return table


def save_measurements(rows: list[dict], device: torch.device | str) -> Path:
    """Merge ``rows`` into the device's entries of the table (atomically); returns its path."""
    table = _read_table()
    entries = table["devices"].setdefault(device_name(device), {})
    for row in rows:
        entries[row["key"]] = {"ms": row["ms"], "winner": row["winner"]}
    path = table_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    tmp.write_text(json.dumps(table, indent=1))
    tmp.replace(path)
    return path


def tuned_backend(cfg: ModelConfig, stream: StreamConfig, device: torch.device | str,
                  dtype: torch.dtype) -> str | None:
    """The backend with the least total time over this model's window shapes on this device, among those that
    can run here, or None when the table does not cover every shape."""
    from .cache import window_shape_plans

    entries = _read_table()["devices"].get(device_name(device), {})
    _, ph, pw = cfg.patch_size
    tokens = (stream.latent_h // ph) * (stream.latent_w // pw)
    usable = set(usable_backends(device))
    totals: dict[str, float] = {}
    for plan in window_shape_plans(stream):
        entry = entries.get(_shape_key(cfg.num_heads, cfg.head_dim, dtype, plan.chunk_frames * tokens,
                                       plan.num_cached * tokens))
        if entry is None:
            return None
        for backend, ms in entry["ms"].items():
            totals[backend] = totals.get(backend, 0.0) + ms
        totals = {b: t for b, t in totals.items() if b in entry["ms"]}
    candidates = {b: t for b, t in totals.items() if b in usable}
    return min(candidates, key=candidates.get) if candidates else None
