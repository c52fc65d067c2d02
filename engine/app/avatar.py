"""Prepared avatars: a talking-head video whose face detection, alignment and encoding are done once.

    avatar = prepare_avatar("presenter.mp4", engine)      # aligns every frame, encodes both latent streams
    avatar.save("presenter.lfa")
    avatar = Avatar.load("presenter.lfa")
    session = engine.session(speech, avatar=avatar)        # no detection, no alignment, no encoder per chunk

The avatar plays forward and back (ping-pong: 0 .. n-1, n-2 .. 1, 0 ..) for any length of speech. Its
latents are those of that played sequence, encoded as one causal stream in the session's chunks (9 frames,
then 12), so for speech no longer than the video a session on the avatar computes exactly what a session
on the video computes. The played sequence repeats every 2(n - 1) frames; the latents stored cover one
such period after a first pass, and the session wraps around inside that second period, so a loop of any
length is seamless.

Every frame must show a face (the aligner's reuse of the last alignment for short gaps included):
``prepare_avatar`` names the first frame without one.

File format (``.lfa``, version 1): one safetensors file. Metadata ``format`` = ``lipforcing-avatar``,
``version`` = ``1`` and ``config`` (JSON: frames, frame size, the ping-pong period in frames and in latents,
stored latents, encoder kind and SHA-256 of its weights, latent size, the encoder's frame grouping).
Tensors: ``frames_png`` / ``frames_offsets`` (each source frame as a PNG, lossless), ``crops_png`` /
``crops_offsets`` (the aligned crops at the model's face size, PNG), ``matrices`` and ``inverses`` (float64
[n, 2, 3]: frame -> crop and crop -> frame pixels), ``masked_latents`` and ``ref_latents`` (float32
[1, 16, K, h, w], latent k of the played sequence; the clip's reference latent is ``ref_latents[:, :, :1]``,
the latent of frame 0), ``keep_mask`` (float32 [H, W], 1 = keep). A file
of another version, a truncated one or one prepared for other encoder weights or mask is refused with an
error that says so.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, MediaError, NoFaceError
from ..media.face import frames_and_crops, invert_affine
from ..media.io import VideoReader
from ..media.length import ping_pong_indices
from .session import CHUNK_FRAMES, FIRST_CHUNK_FRAMES

AVATAR_FORMAT = "lipforcing-avatar"
AVATAR_VERSION = 1
SUFFIX = ".lfa"


@dataclass
class Avatar:
    """A prepared avatar (see the module docstring); ``frame`` / ``crop`` / ``latents`` index the played
    sequence."""

    frames_png: list[bytes]
    crops_png: list[bytes]
    matrices: np.ndarray  # float64 [n, 2, 3] frame -> crop
    inverses: np.ndarray  # float64 [n, 2, 3] crop -> frame
    masked_latents: torch.Tensor  # float32 [1, 16, K, h, w]
    ref_latents: torch.Tensor  # float32 [1, 16, K, h, w]
    keep_mask: torch.Tensor  # float32 [H, W], 1 = keep
    config: dict

    @property
    def n_frames(self) -> int:
        return len(self.frames_png)

    @property
    def ref_latent(self) -> torch.Tensor:
        """[1, 16, 1, h, w]: the latent of the played sequence's frame 0 (unmasked)."""
        return self.ref_latents[:, :, :1]

    def source(self, played: int) -> int:
        """Source frame shown at played frame ``played`` (ping-pong)."""
        return int(ping_pong_indices(self.n_frames, played + 1)[played])

    def frame(self, played: int) -> np.ndarray:
        """np.uint8 [H, W, 3] RGB source frame at played frame ``played``."""
        return _decode(self.frames_png[self.source(played)])

    def crop(self, played: int) -> np.ndarray:
        """np.uint8 [S, S, 3] RGB aligned crop (S: the engine's face size) at played frame ``played``."""
        return _decode(self.crops_png[self.source(played)])

    def latent_index(self, k: int) -> int:
        """Stored latent of played latent ``k``: itself, or its place in the last stored period."""
        stored, period = self.masked_latents.shape[2], self.config["latent_period"]
        if k < stored:
            return k
        base = stored - period
        return base + (k - base) % period

    def latents(self, start: int, stop: int) -> torch.Tensor:
        """[2, 16, stop - start, h, w]: masked (row 0) and unmasked (row 1) latents of played latents."""
        idx = torch.tensor([self.latent_index(k) for k in range(start, stop)])
        return torch.cat([self.masked_latents[:, :, idx], self.ref_latents[:, :, idx]])

    def save(self, path: str | Path) -> Path:
        """Write the avatar (atomically: a temporary file renamed into place)."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.suffix != SUFFIX:
            raise MediaError(f"{path}: an avatar file ends in {SUFFIX}")
        frames, frame_offsets = _pack(self.frames_png)
        crops, crop_offsets = _pack(self.crops_png)
        tensors = {
            "frames_png": frames, "frames_offsets": frame_offsets, "crops_png": crops, "crops_offsets": crop_offsets,
            "matrices": torch.from_numpy(self.matrices), "inverses": torch.from_numpy(self.inverses),
            "masked_latents": self.masked_latents.contiguous(), "ref_latents": self.ref_latents.contiguous(),
            "keep_mask": self.keep_mask.contiguous(),
        }
        meta = {"format": AVATAR_FORMAT, "version": str(AVATAR_VERSION), "config": json.dumps(self.config)}
        tmp = path.with_name(f".{path.name}.partial")
        try:
            save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @staticmethod
    def load(path: str | Path) -> Avatar:
        """Read an avatar file; a missing, truncated or foreign file or another version is a MediaError."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise MediaError(f"{path}: no such avatar file (make one with 'lipforcing prepare-avatar')")
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != AVATAR_FORMAT:
                    raise MediaError(f"{path}: not a lipforcing avatar (format {meta.get('format')!r})")
                if meta.get("version") != str(AVATAR_VERSION):
                    raise MediaError(f"{path}: avatar format version {meta.get('version')}, this engine reads "
                                     f"version {AVATAR_VERSION}; prepare it again with 'lipforcing prepare-avatar'")
                t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
            config = json.loads(meta["config"])
        except (SafetensorError, OSError, ValueError, KeyError) as exc:
            raise MediaError(f"{path}: unreadable avatar file, perhaps truncated ({exc})") from None
        return Avatar(
            frames_png=_unpack(t["frames_png"], t["frames_offsets"]),
            crops_png=_unpack(t["crops_png"], t["crops_offsets"]),
            matrices=t["matrices"].numpy(), inverses=t["inverses"].numpy(), masked_latents=t["masked_latents"],
            ref_latents=t["ref_latents"], keep_mask=t["keep_mask"], config=config,
        )

    def check_engine(self, engine) -> None:
        """Refuse an engine whose encoder weights, latent size or mask differ from the ones it was prepared with."""
        from ...compile.decoder import weights_digest

        cfg = self.config
        if cfg["encoder"] != engine.config.encoder or cfg["encoder_sha256"] != weights_digest(engine.encoder.model):
            raise ConfigError(f"this avatar was prepared with other {cfg['encoder']} encoder weights than the "
                              "engine's; prepare it again with this engine's options")
        if tuple(cfg["latent_hw"]) != (engine.stream.latent_h, engine.stream.latent_w):
            raise ConfigError(f"this avatar has {cfg['latent_hw']} latents, the engine {engine.stream.latent_h}x"
                              f"{engine.stream.latent_w}")
        if not torch.equal(self.keep_mask.cpu(), engine.keep_mask.cpu()):
            raise ConfigError("this avatar was prepared with another mouth mask than the engine's (--mask)")


def latent_period(frames: int) -> int:
    """Latents after which the ping-pong played sequence of ``frames`` source frames repeats."""
    period = 2 * (frames - 1) if frames > 1 else 1
    return math.lcm(period, 4) // 4


@torch.no_grad()
def prepare_avatar(video: str | Path | Sequence[np.ndarray], engine, *, progress: bool = True) -> Avatar:
    """Align every frame of ``video`` (a file, read at 25 fps, or frames in memory: np.uint8 [H, W, 3] RGB at
    25 fps), encode the played sequence's latents; nothing is written."""
    parts = engine.acquire_parts()  # an aligner, an encoder and the pipeline's batch-of-two encode
    try:
        return _prepare(video, engine, parts, progress)
    finally:
        engine.release_parts(parts)


def _prepare(video, engine, parts, progress: bool) -> Avatar:
    parts.aligner.reset()
    frames_png, crops_png, matrices = [], [], []
    in_memory = not isinstance(video, (str, Path))
    name = "the avatar's frames" if in_memory else str(video)
    with contextlib.nullcontext(video) if in_memory else VideoReader(video) as reader:
        for i, frame in enumerate(_bar(reader, progress, "align")):
            where = parts.aligner.locate(frame)
            if where is None:
                raise NoFaceError(f"{name}: no face in frame {i} ({i / 25:.2f} s); every frame of an avatar needs "
                                  "one: trim the video")
            frames_png.append(_encode(frame))
            _, crop = frames_and_crops([frame], [where.matrix], engine.device, engine.face_size)  # the session's warp
            crops_png.append(_encode((crop[0].permute(1, 2, 0) * 255).round().to(torch.uint8).cpu().numpy()))
            matrices.append(where.matrix)
    n = len(frames_png)
    period = latent_period(n)
    stored = 3 * math.ceil((period + 3) / 3)  # one pass, then one period to wrap around in
    played = ping_pong_indices(n, 1 + 4 * (stored - 1))
    parts.encoder.reset()
    masked, ref, start = [], [], 0
    chunks = range(stored // 3)
    for b in _bar(chunks, progress, "encode"):
        size = FIRST_CHUNK_FRAMES if b == 0 else CHUNK_FRAMES
        idx = played[start : start + size]
        crops = torch.stack([torch.from_numpy(_decode(crops_png[i])) for i in idx]).permute(0, 3, 1, 2)
        crops = crops.to(engine.device).float().div_(255.0)
        z = parts.pipeline.encode(crops * 2 - 1).float().cpu()  # [2, 16, 3, h, w]
        masked.append(z[:1])
        ref.append(z[1:])
        start += size
    parts.encoder.reset()
    from ...compile.decoder import weights_digest

    matrices_np = np.stack(matrices)
    inverses = np.stack([invert_affine(m) for m in matrices_np])
    h, w = _decode(frames_png[0]).shape[:2]
    config = {
        "frames": n, "frame_hw": [h, w], "period_frames": 2 * (n - 1) if n > 1 else 1, "latent_period": period,
        "stored_latents": stored, "encoder": engine.config.encoder,
        "encoder_sha256": weights_digest(engine.encoder.model),
        "encoder_group_frames": engine.config.encoder_group_frames,
        "latent_hw": [engine.stream.latent_h, engine.stream.latent_w],
        "source": "frames in memory" if in_memory else Path(video).name,
    }
    return Avatar(frames_png=frames_png, crops_png=crops_png, matrices=matrices_np, inverses=inverses,
                  masked_latents=torch.cat(masked, 2), ref_latents=torch.cat(ref, 2),
                  keep_mask=engine.keep_mask.float().cpu(), config=config)


def _encode(image: np.ndarray) -> bytes:
    import cv2

    ok, data = cv2.imencode(".png", np.ascontiguousarray(image[..., ::-1]), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise MediaError("could not encode a frame as PNG")
    return data.tobytes()


def _decode(data: bytes) -> np.ndarray:
    import cv2

    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise MediaError("the avatar file holds a corrupt frame")
    return np.ascontiguousarray(image[..., ::-1])


def _pack(items: list[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = np.cumsum([0] + [len(b) for b in items])
    flat = np.frombuffer(b"".join(items), np.uint8).copy()
    return torch.from_numpy(flat), torch.from_numpy(offsets.astype(np.int64))


def _unpack(flat: torch.Tensor, offsets: torch.Tensor) -> list[bytes]:
    data, off = flat.numpy().tobytes(), offsets.tolist()
    return [data[a:b] for a, b in zip(off[:-1], off[1:])]


def _bar(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="frame" if desc == "align" else "chunk", dynamic_ncols=True)
