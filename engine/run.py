"""File in, file out: ``lipforcing run VIDEO [--audio AUDIO] -o OUT.mp4`` on top of the ``LipSync`` session.

    summary = run_video("talk.mp4", "speech.wav", "out.mp4", build_components(RunConfig(...), Weights(...)))

Frames are decoded, processed and written as they stream; the output is H.264 + AAC at the source
resolution and 25 fps, N / 25 s long (SPEC §6). An interrupted or failed run leaves a valid MP4 of the
frames finished so far, or no file; never a corrupt one.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from .errors import MediaError, NoFaceError
from .media import AUDIO_RATE, VideoWriter, load_audio, probe, read_frames
from .pipeline import Components, LipSync

log = logging.getLogger("lipforcing")


def _output_audio(path: str) -> tuple[np.ndarray, int]:
    """The speech at its own rate for muxing: [C, S] with 1 or 2 channels."""
    audio = load_audio(path, sr=None, mono=False)
    info = probe(path)
    rate = info.audio_rate or AUDIO_RATE
    if audio.shape[0] > 2:
        audio = audio.mean(axis=0, keepdims=True)
    return audio, rate


def run_video(
    video: str | Path,
    audio: str | Path | None,
    out: str | Path,
    parts: Components,
    *,
    progress: bool = True,
) -> dict:
    """Lip-sync ``video`` to ``audio`` (or to its own audio track) and write ``out``; returns a summary."""
    video, out = str(video), Path(out)
    audio = str(audio) if audio is not None else video
    info = probe(video)
    if not info.has_video:
        raise MediaError(f"{video}: has no video stream")
    if out.suffix.lower() != ".mp4":
        raise MediaError(f"{out}: the output must be an .mp4 file")
    start = time.perf_counter()
    speech = load_audio(audio)  # 16 kHz mono for the audio features
    mux_audio, mux_rate = _output_audio(audio)
    session = LipSync(parts, speech, timing=True)
    n = session.frames_needed
    bar = _progress(n, progress)
    writer = VideoWriter(out, info.width, info.height, audio=mux_audio, audio_rate=mux_rate)
    with writer:
        for frame in read_frames(video, n):
            for done in session.push(frame):
                writer.write(done)
                bar.update(1)
        for done in session.close():
            writer.write(done)
            bar.update(1)
        if session.faces_found == 0:
            if parts.config.require_face:
                writer.keep_partial = False
                raise NoFaceError(f"{video}: no face was found in any frame (--require-face)")
            log.warning("lipforcing: no face found in %s; the output is the input video", video)
    bar.close()
    elapsed = time.perf_counter() - start
    frames = session.frames_out
    return {
        "output": str(out),
        "frames": frames,
        "duration_s": frames / 25.0,
        "faces_found": session.faces_found,
        "seconds": round(elapsed, 3),
        "fps": round(frames / elapsed, 2) if elapsed > 0 else None,
        "stage_seconds": {k: round(v, 3) for k, v in session.times.seconds.items()},
        "student_backend": parts.student.backend,
        "cuda_graphs": parts.student.cuda_graphs,
        "encoder": parts.encoder_ref.kind,
        "decoder": parts.decoder.kind,
        "decoder_backend": parts.decoder.backend,
    }


def format_summary(summary: dict) -> str:
    lines = [
        f"wrote {summary['output']}: {summary['frames']} frames, {summary['duration_s']:.2f} s at 25 fps",
        f"  total {summary['seconds']:.2f} s ({summary['fps']} frames/s); faces found in "
        f"{summary['faces_found']} frames; student backend {summary['student_backend']}, "
        f"encoder {summary['encoder']}, decoder {summary['decoder']} ({summary['decoder_backend']})",
    ]
    for stage, secs in summary["stage_seconds"].items():
        per = secs / max(summary["frames"], 1) * 1e3
        lines.append(f"  {stage:<16} {secs:8.2f} s  ({per:6.1f} ms per frame)")
    return "\n".join(lines)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="frame", desc="lip-sync", dynamic_ncols=True)
