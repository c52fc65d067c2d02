"""The static scheduler: the student's chunks over preallocated buffers, replayed from CUDA graphs, for one
session or several sharing the weights.

    student = StaticStudent(model, stream)                        # one session: every buffer made here, once
    student.warm_up(text_context)                                 # tune kernels, capture all window shapes
    student.start_clip(text_context, audio_emb, ref_latent, mask_latent)
    x0 = student.run_chunk(masked, ref_seq)                       # a static buffer, valid until the next call

    student = StaticStudent(model, stream, slots=4)               # up to four sessions
    a, b = student.open_slot(), student.open_slot()
    student.start_clip(..., slot=a); student.start_clip(..., slot=b)
    x0 = student.run_group([a, b], masked, ref_seq, codes)        # both sessions in one batched call

``StaticStudent`` computes exactly what ``StreamingSampler`` computes (same noise, same math) but everything
a chunk touches lives in buffers made at construction, one row per session ("slot"): the 65-channel input,
the noise, the x0 output, the chunk's audio codes, the text K/V and the KV cache. The time modulations of
the three calls depend only on t and are computed once. On CUDA a chunk (two denoising calls, the x0 /
re-noise updates and the commit call) is captured as one CUDA graph per (rows, window shape) after an eager
run of it, then replayed.

Several sessions: each has its own row, cache, noise generator and clip. Sessions whose next chunks have
the same window shape run as one batch when their rows are consecutive; the scheduler keeps the sessions in
the steady state (every chunk after the second) in rows 0 .. s-1, moving a session's row once when it
reaches the steady state or when a steady session closes, so the steady sessions always form one batch.
A new session's first two chunks run alone. Sessions join and leave at chunk boundaries.

Audio: ``start_clip`` takes the whole clip's features (file mode), or None, and then every chunk gets its
own codes (live audio).

``compile=True`` puts each call (the denoising calls and the commit call) under ``torch.compile``, once per
(rows, window shape): the layer loop, the plan and the cache rows are constants of the compiled function.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..dit.attention import RopeTable, StreamingAttention, resolve_backend
from ..dit.cache import ChunkPlan, SinkWindowCache, plan_chunk, window_shape_plans
from ..dit.config import StreamConfig, tokens_per_frame
from ..dit.model import CausalWanStudent
from ..dit.parallel import SequenceParallel, SequenceParallelAttention
from ..errors import ConfigError
from .sampler import flow_step

log = logging.getLogger("lipforcing")


@dataclass(eq=False)
class Slot:
    """One session's place in the scheduler. ``row`` (its row of every buffer) can change between chunks."""

    row: int
    cache: SinkWindowCache
    """Bookkeeping of the session's cached frames (the tensors are the scheduler's, at ``row``)."""
    generator: torch.Generator | None
    audio_codes: torch.Tensor | None = None
    """[1, L, hidden] codes of the whole clip (file mode), or None (live: codes come with each chunk)."""
    next_frame: int = 0
    started: bool = False
    open: bool = True
    text: torch.Tensor | None = field(default=None, repr=False)
    """The text whose K/V the slot's rows hold."""


@dataclass(eq=False)
class _Rows:
    """Views of every per-session buffer over rows [start, start + count)."""

    start: int
    count: int
    x_in: torch.Tensor
    noise: torch.Tensor
    renoise: list[torch.Tensor]
    x0: torch.Tensor
    codes: torch.Tensor
    text_kv: list[tuple[torch.Tensor, torch.Tensor]]
    cache: SinkWindowCache


class StaticStudent:
    """The student's per-chunk work over static buffers, optionally replayed from CUDA graphs."""

    def __init__(
        self,
        model: CausalWanStudent,
        stream: StreamConfig,
        *,
        slots: int = 1,
        backend: str | None = None,
        seed: int | None = 0,
        cuda_graphs: bool | None = None,
        compile: bool = False,
        compile_backend: str = "inductor",
        parallel: SequenceParallel | None = None,
    ) -> None:
        cfg = model.cfg
        if slots < 1:
            raise ConfigError(f"the scheduler needs at least one session slot, got {slots}")
        self.model, self.stream, self.slots = model, stream, slots
        self.device = model.patch_embedding.weight.device
        self.backend = resolve_backend(backend, self.device, model=model.cfg, stream=stream, dtype=model.dtype)
        self.cuda_graphs = (self.device.type == "cuda") if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.compile, self.compile_backend = compile, compile_backend
        log.info("lipforcing: static scheduler, %d slot(s), backend %s, CUDA graphs %s, torch.compile %s", slots,
                 self.backend, self.cuda_graphs, compile)
        c, h, w, dev = stream.chunk_frames, stream.latent_h, stream.latent_w, self.device
        lat = (slots, cfg.out_dim, c, h, w)
        # parallel: this process is one rank of the streams; its cache holds num_heads / N heads (dit/parallel.py)
        self.parallel = parallel
        heads = cfg.num_heads
        if parallel is not None:
            parallel.check(cfg.num_heads, tokens_per_frame(cfg, stream))
            heads //= parallel.size
        self.cache = SinkWindowCache(cfg, stream, batch=slots, device=dev, dtype=model.dtype, kv_fp8=model.fp8,
                                     heads=heads)
        self.rope = RopeTable(cfg, stream, dev)
        self.x_in = torch.zeros(slots, cfg.in_dim, c, h, w, device=dev)  # [S, 65, C, h, w]
        self.noise = torch.zeros(lat, device=dev)
        self.renoise = [torch.zeros(lat, device=dev) for _ in stream.t_list[1:]]
        self.x0 = torch.zeros(lat, device=dev)
        self.codes = torch.zeros(slots, c, cfg.audio_hidden, device=dev)
        self.text_kv = [
            (torch.zeros(slots, cfg.text_len, cfg.num_heads, cfg.head_dim, device=dev, dtype=model.dtype),
             torch.zeros(slots, cfg.text_len, cfg.num_heads, cfg.head_dim, device=dev, dtype=model.dtype))
            for _ in range(cfg.num_layers)
        ]
        with torch.no_grad():  # batch 1: the modulations broadcast over any number of rows
            self.modulations = [model.time_modulation(t, 1) for t in (*stream.t_list, stream.commit_t)]
        self.seed = seed
        self._rows: list[Slot | None] = [None] * slots
        self._steady_key = plan_chunk(stream.window_frames + stream.sink_frames + 2 * c, stream).shape_key
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._graph_pool = None
        self._compiled: dict[tuple, Callable] = {}
        self._views: dict[tuple[int, int], _Rows] = {}
        self._default: Slot | None = self.open_slot() if slots == 1 else None

    # --- sessions --------------------------------------------------------------------------------------

    def open_slot(self) -> Slot:
        """A row for a new session (ConfigError when every row is taken)."""
        free = [i for i, s in enumerate(self._rows) if s is None]
        if not free:
            raise ConfigError(f"all {self.slots} session slots are in use; close a session or raise max_sessions")
        row = free[0]
        generator = None
        if self.seed is not None and self.device.type != "meta":
            generator = torch.Generator(device=self.device)
        slot = Slot(row=row, cache=self.cache.rows(row, row + 1), generator=generator)
        self._rows[row] = slot
        return slot

    def close_slot(self, slot: Slot) -> None:
        """Free a session's row (a steady session's row is filled by the last steady one, keeping them together)."""
        if not slot.open:
            return
        if self._is_steady(slot):
            last = self._steady_count() - 1
            self._swap(slot.row, last)
        self._rows[slot.row] = None
        slot.open = False

    def slot_at(self, row: int) -> Slot:
        """The open session whose rows start at ``row`` (another rank's scheduler names its sessions so)."""
        slot = self._rows[row] if 0 <= row < self.slots else None
        if slot is None:
            raise ValueError(f"no session holds row {row}")
        return slot

    def _slot(self, slot: Slot | None) -> Slot:
        slot = slot or self._default
        if slot is None:
            raise ValueError("this scheduler has several slots: pass the session's slot")
        if not slot.open:
            raise ValueError("the session's slot was closed")
        return slot

    def _is_steady(self, slot: Slot) -> bool:
        return slot.started and plan_chunk(slot.next_frame, self.stream).shape_key == self._steady_key

    def _steady_count(self) -> int:
        count = 0
        while count < self.slots and self._rows[count] is not None and self._is_steady(self._rows[count]):
            count += 1
        return count

    def _compact(self) -> None:
        """Move every session in the steady state to rows 0 .. s-1 (a row moves once per session lifetime)."""
        front = 0
        for row in range(self.slots):
            slot = self._rows[row]
            if slot is not None and self._is_steady(slot):
                self._swap(row, front)
                front += 1

    def _swap(self, a: int, b: int) -> None:
        """Exchange two rows of every per-session buffer (the KV cache one layer at a time)."""
        if a == b:
            return
        tensors = [self.x_in, self.noise, self.x0, self.codes, *self.renoise]
        tensors += [t for kv in self.text_kv for t in kv]
        tensors += [self.cache.k[layer] for layer in range(self.cache.k.shape[0])]
        tensors += [self.cache.v[layer] for layer in range(self.cache.v.shape[0])]
        if self.cache.scales is not None:  # [2, layers, B, capacity, H]
            tensors += [kv_layer for kv in self.cache.scales for kv_layer in kv]
        for t in tensors:
            tmp = t[a].clone()
            t[a].copy_(t[b])
            t[b].copy_(tmp)
        sa, sb = self._rows[a], self._rows[b]
        self._rows[a], self._rows[b] = sb, sa
        for row, slot in ((b, sa), (a, sb)):
            if slot is not None:
                frames, plan = slot.cache.frames, slot.cache.plan
                slot.row, slot.cache = row, self.cache.rows(row, row + 1)
                slot.cache.frames, slot.cache.plan = frames, plan

    def _view(self, start: int, count: int) -> _Rows:
        key = (start, count)
        if key not in self._views:
            rows = slice(start, start + count)
            self._views[key] = _Rows(
                start=start, count=count, x_in=self.x_in[rows], noise=self.noise[rows],
                renoise=[r[rows] for r in self.renoise], x0=self.x0[rows], codes=self.codes[rows],
                text_kv=[(k[rows], v[rows]) for k, v in self.text_kv], cache=self.cache.rows(start, start + count),
            )
        return self._views[key]

    # --- clips -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def start_clip(
        self,
        text_context: torch.Tensor,  # [1, text_len, text_dim]
        audio_emb: torch.Tensor | None,  # [1, V, audio_dim] for the whole clip, or None (live: codes per chunk)
        ref_latent: torch.Tensor,  # [1, 16, 1, h, w]
        mask_latent: torch.Tensor,  # [1, 1, 1, h, w]
        *,
        slot: Slot | None = None,
    ) -> None:
        """Per-clip conditioning into the session's rows; empties its cache and reseeds its noise. The text K/V
        are computed only when the text differs from the last clip's (the released model's never does)."""
        slot = self._slot(slot)
        if self._is_steady(slot):  # leaving the steady rows: the steady sessions stay together
            self._swap(slot.row, self._steady_count() - 1)
        dev, dt, row = self.device, self.model.dtype, slot.row
        self._set_text(slot, text_context)
        slot.audio_codes = None if audio_emb is None else self.model.audio_proj(audio_emb.to(dev, dt))
        o = self.model.cfg.out_dim
        x_in = self.x_in[row : row + 1]
        x_in[:, o : 2 * o].copy_(ref_latent.to(dev).expand_as(x_in[:, o : 2 * o]))
        x_in[:, 2 * o : 2 * o + 1].copy_(mask_latent.to(dev).expand_as(x_in[:, 2 * o : 2 * o + 1]))
        slot.cache.reset()
        slot.next_frame, slot.started = 0, True
        if slot.generator is not None:
            slot.generator.manual_seed(self.seed)

    def _set_text(self, slot: Slot, text_context: torch.Tensor) -> None:
        """The text's cross-attention K/V into the slot's rows, computed only for a text no row holds yet."""
        text = text_context.detach()
        if slot.text is not None and _same(slot.text, text):
            return
        source = next((s for s in self._rows if s is not None and s.text is not None and _same(s.text, text)), None)
        row = slot.row
        if source is not None:
            for k, v in self.text_kv:
                k[row].copy_(k[source.row])
                v[row].copy_(v[source.row])
        else:
            dev, dt = self.device, self.model.dtype
            for (k_static, v_static), (k, v) in zip(self.text_kv, self.model.text_kv(text.to(dev, dt))):
                if k.shape[1:] != k_static.shape[1:]:
                    raise ValueError(f"text K/V {tuple(k.shape)} do not fit the scheduler's {tuple(k_static.shape)}")
                k_static[row].copy_(k[0])
                v_static[row].copy_(v[0])
        slot.text = text.clone()

    def set_text(self, text_context: torch.Tensor, *, slot: Slot | None = None) -> None:
        """Compute the cross-attention K/V of ``text_context`` [1, text_len, text_dim] into the session's rows."""
        self._set_text(self._slot(slot), text_context)

    @property
    def num_latent_frames(self) -> int | None:
        """Latent frames the single session's clip covers (None: live audio)."""
        slot = self._slot(None)
        if not slot.started:
            raise RuntimeError("start_clip() first")
        return None if slot.audio_codes is None else slot.audio_codes.shape[1]

    @property
    def next_frame(self) -> int:
        return self._slot(None).next_frame

    @property
    def window_shapes(self) -> list[ChunkPlan]:
        """One plan per distinct window shape, in clip order (chunk 0, chunk 1, steady state, ...)."""
        return window_shape_plans(self.stream)

    @torch.no_grad()
    def warm_up(self, text_context: torch.Tensor | None = None) -> float:
        """Run dummy clips through every window shape, so that Triton autotuning, torch.compile and CUDA-graph
        capture happen here instead of in real chunks: sessions that start together (rows 0 .. k-1 batched, for
        every k up to the free rows) and a session that starts alone in any other row, through every shape.
        ``text_context`` (the text real clips will use) has its K/V computed here too. Returns the seconds it
        took. Everything the dummy clips touched is reset by the next ``start_clip``; call it before sessions
        open (rows in use are left alone)."""
        began = time.perf_counter()
        free = sum(r is None for r in self._rows) + (self._default is not None)
        shapes = len(self.window_shapes)
        if text_context is None:
            text_context = torch.zeros(1, self.model.cfg.text_len, self.model.cfg.text_dim, device=self.device)
        for k in range(free, 0, -1):  # k sessions started together: rows 0 .. k-1 in one batch per chunk
            self._dummy_chunks(text_context, together=k, alone_row=None, chunks=shapes)
        for row in range(1, free):  # one session started alone in row `row` (the others run their own chunks)
            self._dummy_chunks(text_context, together=0, alone_row=row, chunks=shapes)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - began
        log.info("lipforcing: student warmed up in %.1f s (%d window shapes, %d rows, %d CUDA graphs)", seconds,
                 shapes, free, len(self.graphs))
        return seconds

    def _dummy_chunks(self, text: torch.Tensor, *, together: int, alone_row: int | None, chunks: int) -> None:
        """Zeros through ``chunks`` chunks: ``together`` sessions in rows 0 .. together-1 as one batch, or one
        session in row ``alone_row``; the rows are handed back (the default slot reset) afterwards."""
        cfg, dev = self.model.cfg, self.device
        c, h, w = self.stream.chunk_frames, self.stream.latent_h, self.stream.latent_w
        if self._default is not None:
            opened = [self._default]
        else:
            opened = [self.open_slot() for _ in range(together if alone_row is None else alone_row + 1)]
        slots = opened if alone_row is None else opened[-1:]
        for slot in slots:
            self.start_clip(
                text, torch.zeros(1, 1 + cfg.audio_frames_per_latent * (chunks * c - 1), cfg.audio_dim, device=dev),
                torch.zeros(1, cfg.out_dim, 1, h, w, device=dev), torch.zeros(1, 1, 1, h, w, device=dev), slot=slot,
            )
        lat = torch.zeros(len(slots), cfg.out_dim, c, h, w, device=dev)
        for _ in range(chunks):
            self.run_group(slots, lat, lat)
        for slot in opened:
            if slot is self._default:
                slot.cache.reset()
                slot.started, slot.audio_codes, slot.next_frame = False, None, 0
            else:
                self.close_slot(slot)

    # --- chunks ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def run_chunk(
        self,
        masked_video: torch.Tensor,  # [1, 16, C, h, w]
        ref_sequence: torch.Tensor,  # [1, 16, C, h, w]
        noise: torch.Tensor | None = None,  # [1, 16, C, h, w]
        renoise: list[torch.Tensor] | None = None,
        *,
        slot: Slot | None = None,
        codes: torch.Tensor | None = None,  # [1, C, audio_hidden] (live audio)
    ) -> torch.Tensor:
        """Denoise and commit one session's next chunk; returns its x0 rows (overwritten by the next call)."""
        slot = self._slot(slot)
        return self.run_group([slot], masked_video, ref_sequence, codes, noise=noise, renoise=renoise)

    @torch.no_grad()
    def run_group(
        self,
        slots: Sequence[Slot],
        masked_video: torch.Tensor,  # [b, 16, C, h, w], one row per slot
        ref_sequence: torch.Tensor,  # [b, 16, C, h, w]
        codes: torch.Tensor | None = None,  # [b, C, audio_hidden]; None: sliced from each clip's codes
        *,
        noise: torch.Tensor | None = None,
        renoise: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """One batched chunk for sessions in consecutive rows whose chunks have the same window shape (see
        ``groups``); returns their x0 rows [b, 16, C, h, w] (overwritten by the next call on these rows)."""
        c, o = self.stream.chunk_frames, self.model.cfg.out_dim
        plans = []
        for i, slot in enumerate(slots):
            if not slot.started:
                raise RuntimeError("start_clip() before run_chunk()")
            if slot.row != slots[0].row + i:
                raise ValueError("run_group needs sessions in consecutive rows (use groups())")
            start = slot.next_frame
            if codes is None:
                if slot.audio_codes is None:
                    raise ValueError("the clip has no audio codes (live audio): pass each chunk's codes")
                if start + c > slot.audio_codes.shape[1]:
                    raise ValueError(f"the clip has {slot.audio_codes.shape[1]} latent frames; chunk at {start} "
                                     "runs past it")
            plans.append(slot.cache.begin_chunk(start))
        if len({p.shape_key for p in plans}) != 1:
            raise ValueError("run_group needs sessions whose chunks have the same window shape (use groups())")
        rows = self._view(slots[0].row, len(slots))
        rows.x_in[:, 2 * o + 1 : 3 * o + 1].copy_(masked_video, non_blocking=True)
        rows.x_in[:, 3 * o + 1 : 4 * o + 1].copy_(ref_sequence, non_blocking=True)
        for i, slot in enumerate(slots):
            if codes is None:
                rows.codes[i].copy_(slot.audio_codes[0, slot.next_frame : slot.next_frame + c])
            self._fill(rows.noise[i], None if noise is None else noise[i], slot.generator)
            for j, buf in enumerate(rows.renoise):
                self._fill(buf[i], None if renoise is None else renoise[j][i], slot.generator)
        if codes is not None:
            rows.codes.copy_(codes, non_blocking=True)
        plan = plans[0]
        key = (rows.start, rows.count, plan.shape_key)
        if not self.cuda_graphs:
            self._chunk_body(plan, rows)
        elif key in self.graphs:
            self.graphs[key].replay()
        else:
            self._chunk_body(plan, rows)  # eager run of this shape (also compiles/tunes kernels)
            self._capture(plan, rows, key)
        for slot in slots:
            slot.cache.commit()
            slot.next_frame += c
        return rows.x0

    def groups(self, slots: Sequence[Slot]) -> list[list[Slot]]:
        """Split sessions with a chunk to run into batches ``run_group`` takes: consecutive rows, same shape.
        First moves sessions that reached the steady state to the front rows, so the steady ones form one batch."""
        self._compact()
        ordered = sorted(slots, key=lambda s: s.row)
        out: list[list[Slot]] = []
        for slot in ordered:
            key = plan_chunk(slot.next_frame, self.stream).shape_key
            last = out[-1] if out else None
            if last and last[-1].row + 1 == slot.row and \
                    plan_chunk(last[-1].next_frame, self.stream).shape_key == key:
                last.append(slot)
            else:
                out.append([slot])
        return out

    def _call(self, plan: ChunkPlan, rows: _Rows, step: int, write: bool, tokens: bool = False) -> torch.Tensor:
        e, e0 = self.modulations[step]
        if self.compile:
            return self._compiled_call(plan, rows, write, tokens)(rows.x_in, e, e0, rows.codes)
        return self.model.forward_static(rows.x_in, e, e0, rows.codes, rows.text_kv, self._context(rows, plan, write),
                                         tokens=tokens)

    def _context(self, rows: _Rows, plan: ChunkPlan, write: bool):
        ctx = StreamingAttention(rows.cache, plan, self.rope, write=write, backend=self.backend)
        if self.parallel is not None:
            ctx = SequenceParallelAttention(ctx, self.parallel, self.cache.tokens_per_frame)
        return ctx

    def _compiled_call(self, plan: ChunkPlan, rows: _Rows, write: bool, tokens: bool) -> Callable:
        """The network call for these rows, window shape and call kind under torch.compile (made once)."""
        key = (rows.start, rows.count, plan.shape_key, write, tokens)
        if key not in self._compiled:
            ctx = self._context(rows, plan, write)
            model, text_kv = self.model, rows.text_kv

            def call(x_in, e, e0, codes):
                return model.forward_static(x_in, e, e0, codes, text_kv, ctx, tokens=tokens)

            mode = "max-autotune-no-cudagraphs" if self.device.type == "cuda" else None
            self._compiled[key] = torch.compile(call, backend=self.compile_backend, mode=mode, dynamic=False)
            log.info("lipforcing: compiling the %s call for %d cached frames (%d rows)",
                     "commit" if write else "denoising", plan.num_cached, rows.count)
        return self._compiled[key]

    def _flow_step(self, plan: ChunkPlan, rows: _Rows, i: int, x: torch.Tensor):
        """One denoising call and its update: (x0, the re-noised input of the next call or None)."""
        t_list = self.stream.t_list
        t_next = t_list[i + 1] if i + 1 < len(t_list) else None
        t = t_list[i]
        eps = None if t_next is None else rows.renoise[i]
        if self.backend == "triton":  # x0 and the re-noise read the head's tokens in one fused pass (fp32)
            from ...kernels import ops

            v_tok = self._call(plan, rows, i, write=False, tokens=True)
            if t_next is None:
                return ops.flow_update(v_tok, x, t), None
            return ops.flow_update(v_tok, x, t, t_next, eps)
        return flow_step(x, self._call(plan, rows, i, write=False), t, t_next, eps)

    def _chunk_body(self, plan: ChunkPlan, rows: _Rows) -> None:
        """All device work of one chunk on these rows; reads and writes static buffers only (graph-capturable)."""
        o = self.model.cfg.out_dim
        x = rows.noise
        for i in range(len(self.stream.t_list)):
            rows.x_in[:, :o].copy_(x)
            x0, x = self._flow_step(plan, rows, i, x)
        rows.x0.copy_(x0)
        rows.x_in[:, :o].copy_(rows.x0)
        self._call(plan, rows, len(self.stream.t_list), write=True)

    def _fill(self, buf: torch.Tensor, given: torch.Tensor | None, generator: torch.Generator | None) -> None:
        if given is None:
            buf.normal_(generator=generator)
        else:
            buf.copy_(given, non_blocking=True)

    def _capture(self, plan: ChunkPlan, rows: _Rows, key: tuple) -> None:
        """Record the chunk body for these rows and this window shape. Capture records kernels without running
        them, so the cache and outputs are not touched."""
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads' CUDA calls (a session's paste-back) stay legal while this one captures
        with torch.cuda.graph(graph, pool=self._graph_pool, capture_error_mode="thread_local"):
            self._chunk_body(plan, rows)
        self._graph_pool = graph.pool()
        self.graphs[key] = graph
        log.info("lipforcing: captured the chunk graph for %d cached frames, rows %d..%d", plan.num_cached,
                 rows.start, rows.start + rows.count - 1)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a, b.to(a.device, a.dtype))
