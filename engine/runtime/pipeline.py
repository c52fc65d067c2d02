"""The chunk pipeline: encode | student | decode of successive chunks on their own device streams.

    streams = DeviceStreams(device)                      # encode, student, decode, finish; no-ops on a CPU
    pipe = ChunkPipeline(student, encoder, decoder, keep_mask, streams=streams)
    pipe.start_clip(text_context, audio_emb, mask_latent)   # the reference latent comes from the first chunk
    out = pipe.submit(crops)                             # crops [T, 3, 512, 512] in [-1, 1] on the device
    streams.wait("finish", out.done); use(out.frames)    # frames [T, 3, 512, 512] in [0, 1]

``submit`` only enqueues work: on CUDA it returns at once, and the encode of chunk b+1, the student's
calls on chunk b and the decode of chunk b-1 overlap on three streams ordered by events (the student
stream waits for the chunk's latents, the decode stream for the student's x0, which is double-buffered
so the next chunk's student work never overwrites a latent still being decoded). Nothing is held back:
chunk b's frames are ready as soon as its ``done`` event has fired. The first chunk of a clip starts the
student's clip on the student stream, after the latents it takes the reference from and after the
caller's work on its own stream (the audio features), so no buffer is read before it is written.

``DeviceStreams(enabled=False)`` runs every stage on the caller's stream, one after another (the
sequential path); on a CPU everything is sequential anyway. Both paths compute the same values.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Protocol

import torch

from .timing import StageTimer

STREAM_NAMES = ("encode", "student", "decode", "finish")


class Student(Protocol):
    """What the pipeline needs of a scheduler (``StaticStudent`` or the reference ``StreamingSampler``)."""

    device: torch.device

    def start_clip(self, text_context, audio_emb, ref_latent, mask_latent) -> None: ...

    def run_chunk(self, masked_video: torch.Tensor, ref_sequence: torch.Tensor, codes=None) -> torch.Tensor: ...


class DeviceStreams:
    """Named CUDA streams ordered by events; every method is a no-op on a CPU or when disabled."""

    def __init__(self, device: torch.device | str, *, enabled: bool = True) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.parallel = self.cuda and enabled
        self._streams = {n: torch.cuda.Stream(self.device) for n in STREAM_NAMES} if self.parallel else {}

    def stream(self, name: str) -> torch.cuda.Stream | None:
        """The CUDA stream of a stage (the current stream when disabled; None on a CPU)."""
        if not self.cuda:
            return None
        return self._streams.get(name) or torch.cuda.current_stream(self.device)

    def on(self, name: str):
        """Context running the enclosed work on the stage's stream."""
        return torch.cuda.stream(self._streams[name]) if self.parallel else contextlib.nullcontext()

    def record(self, name: str) -> torch.cuda.Event | None:
        if not self.parallel:
            return None
        event = torch.cuda.Event()
        event.record(self._streams[name])
        return event

    def wait(self, name: str, event: torch.cuda.Event | None) -> None:
        """The stage's stream waits (on the device) for ``event``."""
        if self.parallel and event is not None:
            self._streams[name].wait_event(event)

    def wait_current(self, name: str) -> None:
        """The stage's stream waits for everything the caller enqueued on its current stream so far."""
        if self.parallel:
            self._streams[name].wait_stream(torch.cuda.current_stream(self.device))

    def keep(self, tensor: torch.Tensor, name: str) -> None:
        """Mark a tensor made on another stream as used by this stage (the allocator then waits for it)."""
        if self.parallel:
            tensor.record_stream(self._streams[name])


@dataclass
class ChunkOutput:
    """One decoded chunk: frames on the device and the event that says they are ready."""

    frames: torch.Tensor
    """[T, 3, H, W] in [0, 1] (9 frames for a clip's first chunk, 12 after)."""
    done: torch.cuda.Event | None
    """Recorded on the decode stream after the frames were written (None when sequential)."""


class ChunkPipeline:
    """encode | student | decode on the device streams, one ``submit`` per chunk."""

    def __init__(
        self,
        student: Student,
        encoder,  # LatentEncoder: push(pixels [N, T, 3, H, W] in [-1, 1]) -> z [N, 16, l, h, w]
        decoder,  # LatentDecoder: push(z [1, 16, l, h, w]) -> frames [T, 3, H, W] in [0, 1]
        keep_mask: torch.Tensor,  # [H, W] {0, 1}: 1 = keep, 0 = mouth (zeroed in the masked stream)
        *,
        streams: DeviceStreams,
    ) -> None:
        self.student, self.encoder, self.decoder = student, encoder, decoder
        self.keep_mask, self.streams = keep_mask, streams
        self._slots: list[torch.Tensor | None] = [None, None]  # double-buffered student output
        self._slot_free: list[torch.cuda.Event | None] = [None, None]
        self._clip: tuple | None = None
        self._chunk = 0

    def start_clip(
        self,
        text_context: torch.Tensor,  # [1, text_len, text_dim]
        audio_emb: torch.Tensor | None,  # [1, V, audio_dim]; None: codes come with every chunk (live)
        mask_latent: torch.Tensor,  # [1, 1, 1, h, w]
    ) -> None:
        """Begin a new clip: the codecs restart their causal state; the student starts on the next submit."""
        self.encoder.reset()
        self.decoder.reset()
        self._clip = (text_context, audio_emb, mask_latent)
        self._chunk = 0

    @torch.no_grad()
    def encode(self, crops: torch.Tensor) -> torch.Tensor:
        """The chunk's masked and unmasked streams as one batch: crops [T, 3, H, W] in [-1, 1] -> z
        [2, 16, l, h, w] (row 0 masked, row 1 unmasked), on the caller's stream, with the encoder's state."""
        return self.encoder.push(torch.stack([crops * self.keep_mask, crops]))

    @torch.no_grad()
    def submit(
        self,
        crops: torch.Tensor | None,
        timer: StageTimer | None = None,
        *,
        codes: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
    ) -> ChunkOutput:
        """Enqueue one chunk. crops: [T, 3, H, W] in [-1, 1] on the device, made on the caller's current stream;
        or ``latents`` [2, 16, 3, h, w] already encoded (a prepared avatar: no encoder runs). codes: [1, 3,
        audio_hidden], the chunk's audio codes when the clip was started without audio (live)."""
        s, timer = self.streams, timer or StageTimer(enabled=False)
        s.wait_current("encode")
        with s.on("encode"):
            if latents is None:
                with timer.stage("encode", s.stream("encode")):
                    latents = self.encode(crops)
            z = latents
            masked, ref_seq = z[:1], z[1:]
            encoded = s.record("encode")
        with s.on("student"):
            s.wait("student", encoded)
            s.keep(z, "student")
            if codes is not None:
                s.keep(codes, "student")
            with timer.stage("student", s.stream("student")):
                if self._clip is not None:
                    s.wait_current("student")
                    text, audio, mask = self._clip
                    self.student.start_clip(text, audio, ref_seq[:, :, :1], mask)
                    self._clip = None
                x0 = self.student.run_chunk(masked, ref_seq, codes=codes)
                b = self._chunk % 2
                s.wait("student", self._slot_free[b])
                if self._slots[b] is None:
                    self._slots[b] = torch.empty_like(x0)
                slot = self._slots[b]
                slot.copy_(x0)
            denoised = s.record("student")
        with s.on("decode"):
            s.wait("decode", denoised)
            with timer.stage("decode", s.stream("decode")):
                frames = self.decoder.push(slot)
            done = s.record("decode")
        self._slot_free[b] = done
        self._chunk += 1
        return ChunkOutput(frames=frames, done=done)
