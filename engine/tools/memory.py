"""The device-memory plan of a run, measured on the meta device (no memory, no GPU).

    plan = memory_plan(ModelConfig.from_name("14b"), StreamConfig.for_resolution(512, 512))
    plan["total_bytes"], plan["items"]            # the budget item by item (``lipforcing info --memory``)

    with LiveBytes() as live:                     # any code on meta tensors
        model(x)
    live.peak, live.live                          # bytes the code held at its peak and still holds

Every item is measured, not estimated: the engine's own objects (the student, the static scheduler with
its KV cache and buffers, the codecs) are built on the meta device in the run's dtype, and the transient
memory of a chunk is the peak of the live bytes the real code allocates while it runs on meta tensors
(``LiveBytes`` follows every tensor an operation creates until Python frees it). Attention is profiled
with the fused kernels' shapes (the CUDA path); the PyTorch fallback would add the score matrix.

Phases: what is resident (weights, caches, graph pools) is held throughout; on top of it come either the
clip-start phase (the audio encoder and, for a new text, the text weights; freed before the first chunk)
or the streaming phase, in which the encoder, the student and the decoder hold their memory at the same
time (three device streams). The total is resident + the larger of the two.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..codecs.latent import LatentDecoder, LatentEncoder
from ..codecs.taehv import TAEHV, TAEHVConfig
from ..codecs.wan_vae import WanVAE, WanVAEConfig
from ..dit.cache import plan_chunk
from ..dit.config import ModelConfig, StreamConfig
from ..dit.fp8 import to_fp8
from ..dit.model import CausalWanStudent
from ..runtime.static import StaticStudent

GIB = 1 << 30


class LiveBytes(TorchDispatchMode):
    """Tracks the bytes of every storage an operation creates inside the block, until it is freed.

    A storage counts once however many views share it; outputs that alias an input (views, in-place ops)
    add nothing. Tensors made before the block (weights, inputs) are not counted. ``device``: count only
    the storages on that device type (``"cpu"`` while the code also makes meta tensors); None counts all."""

    def __init__(self, device: str | None = None) -> None:
        super().__init__()
        self.device = device
        self.live = 0
        self.peak = 0
        self._storages: dict[int, int] = {}  # storage id -> bytes, while the storage lives

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t, inputs)
        return out

    def _track(self, t: torch.Tensor, inputs: set[int]) -> None:
        if self.device is not None and t.device.type != self.device:
            return
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._storages or key in inputs:
            return  # already counted, or a view of (an in-place result on) memory made outside the block
        self._storages[key] = storage.nbytes()
        self.live += self._storages[key]
        self.peak = max(self.peak, self.live)
        # The storage, not the tensor: a tensor re-wrapped (``param.data = t``, ``Parameter(t)``) dies while
        # its memory lives on.
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self.live -= self._storages.pop(key)


def _fused_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Stands in for ``scaled_dot_product_attention`` while profiling: the memory of a fused (flash) kernel,
    the output alone, which is what the CUDA path allocates (the math fallback would add the scores)."""
    return torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)


def profile(fn: Callable, *args, **kwargs) -> tuple[object, LiveBytes]:
    """Run ``fn`` for inference (no autograd, fused attention) under ``LiveBytes``; returns (its result, the
    tracker: peak and still-live bytes)."""
    import torch.nn.functional as F

    sdpa = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _fused_attention
    try:
        with torch.no_grad(), LiveBytes() as live:
            result = fn(*args, **kwargs)
    finally:
        F.scaled_dot_product_attention = sdpa
    return result, live


def tensor_bytes(*tensors) -> int:
    """Bytes of tensors (nested lists/tuples allowed)."""
    return sum(t.nbytes for t in tree_flatten(tensors)[0] if isinstance(t, torch.Tensor))


@dataclass(frozen=True)
class MemoryItem:
    name: str
    bytes: int
    phase: str
    """"resident" (held while the engine lives), "streaming" (while chunks run) or "clip start" (only while
    a clip's conditioning is computed, before its first chunk)."""
    note: str
    counted: bool = True
    """False for an item already inside another one (shown for information)."""
    sessions: int = 0
    """How many sessions' worth the item holds (0: shared by every session, like the weights)."""


def _student_items(cfg: ModelConfig, stream: StreamConfig, dtype: torch.dtype,
                   sessions: int, fp8: bool = False) -> tuple[list[MemoryItem], int]:
    with torch.device("meta"):
        model = CausalWanStudent(cfg).to(dtype)
        if fp8:  # e4m3 block weights with their scales, and an e4m3 KV cache with its scales
            to_fp8(model, dtype)
    text_only = {id(p) for m in model.text_modules() for p in m.parameters()}
    resident = [p for p in model.parameters() if id(p) not in text_only]
    text = [p for p in model.parameters() if id(p) in text_only]
    items = [
        MemoryItem("student weights", tensor_bytes(resident), "resident",
                   f"{sum(p.numel() for p in resident):,} parameters (all but the text-only ones)"
                   + ("; block linear layers in e4m3 with a float32 scale per output channel" if fp8 else "")),
        MemoryItem("student text weights", tensor_bytes(text), "clip start",
                   f"{sum(p.numel() for p in text):,} parameters (text embedding, cross-attention k/v): on the "
                   "device only while a new text's K/V are computed, then in host memory"),
    ]
    student = StaticStudent(model, stream, slots=sessions, backend="triton", seed=None, cuda_graphs=False)
    n = sessions
    kv = "e4m3 with per-frame, per-head scales" if fp8 else "K and V"
    items.append(MemoryItem("KV cache", student.cache.nbytes, "resident",
                            f"{student.cache.capacity} frames (sink + what the next chunk sees), {kv}, "
                            f"{cfg.num_layers} layers, per session", sessions=n))
    items.append(MemoryItem("text K/V", tensor_bytes(student.text_kv), "resident",
                            "cross-attention keys and values of the clip's text, every layer, per session", sessions=n))
    static = tensor_bytes(student.x_in, student.noise, student.renoise, student.x0, student.codes)
    items.append(MemoryItem("scheduler buffers", static, "resident",
                            "65-channel input, noise, x0 and audio codes, per session", sessions=n))
    items.append(MemoryItem("time and RoPE tables", tensor_bytes(student.modulations, student.rope.angles), "resident",
                            "the three calls' time modulations and the window's rotation angles"))
    h, w = stream.latent_h, stream.latent_w
    latents = 3 * stream.chunk_frames
    text = torch.zeros(1, cfg.text_len, cfg.text_dim, device="meta")
    audio = torch.zeros(1, 1 + cfg.audio_frames_per_latent * (latents - 1), cfg.audio_dim, device="meta")
    slot = student.open_slot() if n > 1 else None
    _, start = profile(student.start_clip, text, audio, torch.zeros(1, cfg.out_dim, 1, h, w, device="meta"),
                       torch.zeros(1, 1, 1, h, w, device="meta"), slot=slot)
    steady = plan_chunk(10 * stream.chunk_frames, stream)
    rows = student._view(0, n)  # every session in one steady-state batch: the largest call
    _, call = profile(student._call, steady, rows, 0, False, True)
    _, body = profile(student._chunk_body, steady, rows)
    batch = f", {n} sessions in one batch" if n > 1 else ""
    items.append(MemoryItem("activations per call", call.peak, "resident",
                            f"peak transient memory of one steady-state call{batch} (inside the graph pool below)",
                            counted=False, sessions=n))
    items.append(MemoryItem("graph pool", body.peak, "resident",
                            "transient memory of a chunk's two denoising calls, updates and commit call: what "
                            f"the CUDA graphs' private pool holds{batch}", sessions=n))
    return items, start.peak


def _codec_items(stream: StreamConfig, dtype: torch.dtype, encoder: str | None, decoder: str,
                 group_frames: int | None, group_latents: int | None, sessions: int) -> list[MemoryItem]:
    """Codec weights (shared) and each session's codec state and transient memory (``encoder=None``: a prepared
    avatar, no encoder runs)."""
    items = []
    h, w = stream.latent_h * 8, stream.latent_w * 8
    with torch.device("meta"):
        vae = WanVAE(WanVAEConfig()).to(dtype) if "wan" in (encoder, decoder) else None
        taehv = TAEHV(TAEHVConfig()).to(dtype) if "taehv" in (encoder, decoder) else None
    dec_model = vae if decoder == "wan" else taehv
    dec_weights = tensor_bytes(list(dec_model.decoder.parameters()))
    if decoder == "wan":
        dec_weights += tensor_bytes(list(vae.conv2.parameters()))
    each = f" per session x {sessions}" if sessions > 1 else ""
    if encoder is not None:
        enc_model = vae if encoder == "wan" else taehv
        enc_weights = tensor_bytes(list(enc_model.encoder.parameters()))
        if encoder == "wan":
            enc_weights += tensor_bytes(list(vae.conv1.parameters()))
        items.append(MemoryItem(f"{encoder} encoder weights", enc_weights, "resident", "the part of the codec in use"))
        enc = LatentEncoder(encoder, enc_model, group_frames=group_frames)

        def encode_two_chunks():
            first = enc.push(torch.zeros(2, 9, 3, h, w, device="meta"))
            return first, enc.push(torch.zeros(2, 12, 3, h, w, device="meta"))

        _, live = profile(encode_two_chunks)
        groups = f", in groups of {group_frames} frames" if group_frames else ""
        items.append(MemoryItem(f"{encoder} encoder peak", live.peak * sessions, "streaming",
                                f"causal state and transient memory of encoding a chunk's masked and unmasked "
                                f"streams (batch of two{groups}){each}", sessions=sessions))
    items.append(MemoryItem(f"{decoder} decoder weights", dec_weights, "resident", "the part of the codec in use"))
    dec = LatentDecoder(decoder, dec_model, group_latents=group_latents)
    z = torch.zeros(1, 16, stream.chunk_frames, stream.latent_h, stream.latent_w, device="meta")
    _, live = profile(lambda: (dec.push(z), dec.push(z)))
    one = f", {group_latents} latent(s) at a time" if group_latents else ""
    items.append(MemoryItem(f"{decoder} decoder peak", live.peak * sessions, "streaming",
                            f"causal state and transient memory of decoding a chunk{one}{each}", sessions=sessions))
    return items


def _media_items(stream: StreamConfig, frame_hw: tuple[int, int], chunks_in_flight: int,
                 sessions: int) -> list[MemoryItem]:
    """Source frames, crops and decoded faces of the chunks in flight, and paste-back's working memory
    (profiled: a face of a third of the frame height, slightly rotated)."""
    import numpy as np

    from ..media.mask import mouth_mask01, soft_mask
    from ..media.paste_back import paste_back

    frames, (h, w) = 12, frame_hw
    size = stream.latent_h * 8
    held = frames * h * w * 3 + 2 * frames * 3 * size * size * 4  # uint8 frames; crops and faces in float32
    scale = h / 3 / size
    a = np.deg2rad(5.0)
    inverse = np.array([[scale * np.cos(a), -scale * np.sin(a), w / 3], [scale * np.sin(a), scale * np.cos(a), h / 4]])
    source = torch.zeros(frames, h, w, 3, dtype=torch.uint8, device="meta")
    faces = torch.zeros(frames, 3, size, size, device="meta")
    mask = soft_mask(mouth_mask01(), size).to("meta")
    _, live = profile(paste_back, source, faces, faces, mask, np.repeat(inverse[None], frames, 0))
    each = f", per session x {sessions}" if sessions > 1 else ""
    return [MemoryItem("frames in flight", (held * chunks_in_flight + live.peak) * sessions, "streaming",
                       f"{chunks_in_flight} chunks of {w}x{h} source frames, crops and decoded faces, and one "
                       f"chunk's paste-back{each}", sessions=sessions)]


def _audio_items(num_frames: int) -> list[MemoryItem]:
    """wav2vec2-base (the released audio encoder) in fp32, profiled on a clip of ``num_frames`` frames."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from ..media.audio_features import SAMPLES_PER_FRAME, Wav2Vec2Features

    with torch.device("meta"):
        model = Wav2Vec2Model(Wav2Vec2Config()).to("meta")  # the sizes of wav2vec2-base-960h
    features = Wav2Vec2Features(model)
    _, live = profile(features, torch.zeros(num_frames * SAMPLES_PER_FRAME, device="meta"), num_frames)
    weights = tensor_bytes(list(model.parameters()))
    return [MemoryItem("audio encoder", weights + live.peak, "clip start",
                       f"wav2vec2-base in fp32 and its activations for {num_frames} frames ({num_frames / 25:.0f} s); "
                       "freed before the first chunk")]


def memory_plan(
    cfg: ModelConfig,
    stream: StreamConfig,
    *,
    dtype: torch.dtype = torch.bfloat16,
    fp8: bool = False,
    encoder: str = "wan",
    decoder: str = "taehv",
    encoder_group_frames: int | None = 4,
    decoder_group_latents: int | None = 1,
    frame_hw: tuple[int, int] = (1080, 1920),
    chunks_in_flight: int = 3,
    clip_seconds: float = 60.0,
    sessions: int = 1,
    avatar: bool = False,
) -> dict:
    """The device-memory budget of ``sessions`` sessions on one engine, item by item (bytes), with
    ``total_bytes`` and ``per_session_bytes`` (what each session adds). ``avatar``: prepared avatars, no
    encoder. The defaults are the engine's (codecs in the released procedure's groups, 1080p frames, three
    chunks in flight)."""
    if sessions < 1:
        raise ValueError(f"sessions must be at least 1, got {sessions}")
    items, start_peak = _student_items(cfg, stream, dtype, sessions, fp8)
    items += _codec_items(stream, dtype, None if avatar else encoder, decoder, encoder_group_frames,
                          decoder_group_latents, sessions)
    items += _media_items(stream, frame_hw, chunks_in_flight, sessions)
    items.append(MemoryItem("clip conditioning", start_peak, "clip start",
                            "text embedding and text K/V computed once per clip"))
    items += _audio_items(int(clip_seconds * 25))

    def phase(name: str) -> int:
        return sum(i.bytes for i in items if i.phase == name and i.counted)

    resident, streaming, clip_start = phase("resident"), phase("streaming"), phase("clip start")
    total = resident + max(streaming, clip_start)
    per_session = sum(i.bytes for i in items if i.sessions and i.counted) // sessions
    return {
        "dtype": "fp8" if fp8 else str(dtype).removeprefix("torch."),
        "compute_dtype": str(dtype).removeprefix("torch."),
        "latent_hw": [stream.latent_h, stream.latent_w],
        "encoder": None if avatar else encoder,
        "decoder": decoder,
        "sessions": sessions,
        "per_session_bytes": per_session,
        "items": [asdict(i) for i in items],
        "resident_bytes": resident,
        "streaming_bytes": streaming,
        "clip_start_bytes": clip_start,
        "total_bytes": total,
        "note": "total = resident + the larger of the streaming and clip-start phases (they never overlap); "
                "items with counted=false are inside another item",
    }


def format_plan(name: str, plan: dict) -> str:
    encoder = f"{plan['encoder']} encoder" if plan["encoder"] else "prepared avatars (no encoder)"
    lines = [f"memory plan of model {name} ({plan['dtype']}, {plan['latent_hw'][0] * 8}x{plan['latent_hw'][1] * 8}, "
             f"{encoder}, {plan['decoder']} decoder, {plan['sessions']} session(s))"]
    for item in plan["items"]:
        lines.append(f"  {item['name']:<24} {item['bytes'] / GIB:8.3f} GiB  [{item['phase']}] {item['note']}")
    lines.append(f"  {'resident':<24} {plan['resident_bytes'] / GIB:8.3f} GiB")
    lines.append(f"  {'+ streaming phase':<24} {plan['streaming_bytes'] / GIB:8.3f} GiB")
    lines.append(f"  {'| clip-start phase':<24} {plan['clip_start_bytes'] / GIB:8.3f} GiB")
    lines.append(f"  {'total':<24} {plan['total_bytes'] / GIB:8.3f} GiB ({plan['total_bytes'] / 1e9:.2f} GB)")
    lines.append(f"  {'each session adds':<24} {plan['per_session_bytes'] / GIB:8.3f} GiB")
    return "\n".join(lines)
