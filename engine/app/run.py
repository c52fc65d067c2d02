"""File in, file out: ``lipforcing run VIDEO [--audio AUDIO] -o OUT.mp4`` on top of the ``LipSync`` session.

    summary = run_video("talk.mp4", "speech.wav", "out.mp4", build_engine(RunConfig(...), Weights(...)))

Frames are decoded, processed and written as they stream; the output is H.264 + AAC at the source
resolution and 25 fps, N / 25 s long (SPEC §6). Muxing runs on its own thread. An interrupted or failed
run (Ctrl-C, SIGTERM, an error) leaves a valid MP4 of the frames finished so far, or no file; never a
corrupt one.

Before any model work a cheap pass decides whether the clip has a face at all (the detector alone, on
every ``detect_every``-th frame, stopping at the first face): a clip without one is copied through with
the speech (or refused at once with ``--require-face``) without running the networks.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from ..errors import MediaError, NoFaceError
from ..media.io import BackgroundWriter, VideoWriter, load_audio, probe, read_frames, write_json
from ..media.length import AUDIO_RATE, OUTPUT_FPS, clip_length_from_samples
from .engine import Engine

log = logging.getLogger("lipforcing")

SUMMARY_FIELDS = {
    "frames": "output video frames written",
    "seconds": "wall time of the whole run after the engine was built: warm-up, audio features, decode, "
               "lip-sync and muxing",
    "fps": "frames / (seconds - warm_up_seconds): the steady rate of the run itself",
    "warm_up_seconds": "kernel tuning, graph capture and codec warm-up before the first chunk (0 on a CPU)",
    "stage_seconds": "with --timing: summed seconds per stage (device time per stage on a GPU, wall time on a "
                     "CPU; stages overlap on the fast path, so they can add up to more than the run)",
    "path": "which path ran: scheduler (static | reference), pipeline (streams | sequential), device_streams, "
            "cuda_graphs, attention (triton | reference), compile, encoder, decoder, decoder_backend",
}


def _output_audio(path: str) -> tuple[np.ndarray, int]:
    """The speech at its own rate for muxing: [C, S] with 1 or 2 channels."""
    audio = load_audio(path, sr=None, mono=False)
    info = probe(path)
    rate = info.audio_rate or AUDIO_RATE
    if audio.shape[0] > 2:
        audio = audio.mean(axis=0, keepdims=True)
    return audio, rate


def clip_has_face(video: str, frames: int, engine: Engine) -> bool:
    """Whether the detector finds a face in any of the clip's first ``frames`` frames, looking at every
    ``detect_every``-th frame and stopping at the first face."""
    every = engine.config.detect_every
    frames_seen = enumerate(read_frames(video, frames))
    return any(engine.aligner.has_face(frame) for i, frame in frames_seen if i % every == 0)


def run_video(
    video: str | Path | None,
    audio: str | Path | None,
    out: str | Path,
    engine: Engine,
    *,
    avatar=None,
    lookahead: float | None = None,
    context: float | None = None,
    progress: bool = True,
    timing: bool = False,
    report: str | Path | None = None,
) -> dict:
    """Lip-sync ``video`` (or a prepared ``avatar``) to ``audio`` (or to the video's own audio track) and write
    ``out``; returns a summary. ``lookahead``: compute the audio features as a live session would, each chunk
    from a window of the speech reaching this many seconds past it."""
    out = Path(out)
    if (video is None) == (avatar is None):
        raise MediaError("give a video or a prepared avatar (--avatar), not both")
    if avatar is not None and audio is None:
        raise MediaError("an avatar needs speech: pass --audio")
    audio = str(audio) if audio is not None else str(video)
    if out.suffix.lower() != ".mp4":
        raise MediaError(f"{out}: the output must be an .mp4 file")
    info = None
    if video is not None:
        video = str(video)
        info = probe(video)
        if not info.has_video:
            raise MediaError(f"{video}: has no video stream")
    start = time.perf_counter()
    speech = load_audio(audio)  # 16 kHz mono for the audio features
    mux_audio, mux_rate = _output_audio(audio)
    n = clip_length_from_samples(speech.size).frames
    live = dict(lookahead=lookahead, context=context)  # the session's speech mode
    if avatar is not None:
        summary = _lip_sync_avatar(avatar, out, n, speech, mux_audio, mux_rate, engine, progress, timing, live)
    elif not clip_has_face(video, n, engine):
        if engine.config.require_face:
            raise NoFaceError(f"{video}: no face was found in the clip (--require-face)")
        log.warning("lipforcing: no face found in %s; the output is the input video with the speech", video)
        summary = _copy_through(video, out, n, info, mux_audio, mux_rate, progress)
    else:
        summary = _lip_sync(video, out, n, info, speech, mux_audio, mux_rate, engine, progress, timing, live)
    elapsed = time.perf_counter() - start
    steady = elapsed - summary.get("warm_up_seconds", 0.0)
    summary.update(output=str(out), duration_s=summary["frames"] / OUTPUT_FPS, seconds=round(elapsed, 3),
                   fps=round(summary["frames"] / steady, 2) if steady > 0 else None, path=engine.path,
                   fields=SUMMARY_FIELDS)
    if report is not None:
        write_json(Path(report), summary)
    return summary


def _lip_sync(video, out, n, info, speech, mux_audio, mux_rate, engine, progress, timing, live) -> dict:
    warm = engine.warm_up()
    session = engine.session(speech, timing=timing, **live)
    if live["lookahead"] is None:
        engine.release_audio_encoder()  # one clip per run: wav2vec2 is done with
    bar = _progress(n, progress)
    with VideoWriter(out, info.width, info.height, audio=mux_audio, audio_rate=mux_rate) as writer:
        background = BackgroundWriter(writer)
        try:
            for frame in read_frames(video, n):
                for done in session.push(frame):
                    background.write(done)
                    bar.update(1)
            for done in session.close():
                background.write(done)
                bar.update(1)
            background.close()
        except BaseException:
            session.abort()
            background.abort()
            raise
        if session.faces_found == 0 and engine.config.require_face:
            writer.keep_partial = False
            raise NoFaceError(f"{video}: no face was found in any frame (--require-face)")
    bar.close()
    return _session_summary(session, warm, timing)


def _session_summary(session, warm: float, timing: bool) -> dict:
    summary = session.summary()
    summary["warm_up_seconds"] = round(warm, 3)
    if not timing:
        summary.pop("stage_seconds")
    return summary


def _lip_sync_avatar(avatar, out, n, speech, mux_audio, mux_rate, engine, progress, timing, live) -> dict:
    """A prepared avatar: no frames to read; the session runs chunk by chunk as the speech allows."""
    warm = engine.warm_up()
    session = engine.session(speech, timing=timing, avatar=avatar, **live)
    if live["lookahead"] is None:
        engine.release_audio_encoder()
    bar = _progress(n, progress)
    h, w = avatar.config["frame_hw"]
    with VideoWriter(out, w, h, audio=mux_audio, audio_rate=mux_rate) as writer:
        background = BackgroundWriter(writer)
        try:
            while session.frames_out < n:
                for done in session.pop(timeout=0.1):
                    background.write(done)
                    bar.update(1)
            for done in session.close():
                background.write(done)
                bar.update(1)
            background.close()
        except BaseException:
            session.abort()
            background.abort()
            raise
    bar.close()
    return _session_summary(session, warm, timing)


def _copy_through(video, out, n, info, mux_audio, mux_rate, progress) -> dict:
    bar = _progress(n, progress)
    frames = 0
    with VideoWriter(out, info.width, info.height, audio=mux_audio, audio_rate=mux_rate) as writer:
        for frame in read_frames(video, n):
            writer.write(frame)
            frames += 1
            bar.update(1)
    bar.close()
    return {"frames": frames, "chunks": 0, "frames_passed_through": frames, "faces_found": 0,
            "warm_up_seconds": 0.0}


def format_summary(summary: dict) -> str:
    path = summary["path"]
    lines = [
        f"wrote {summary['output']}: {summary['frames']} frames, {summary['duration_s']:.2f} s at 25 fps",
        f"  total {summary['seconds']:.2f} s ({summary['fps']} frames/s after a {summary['warm_up_seconds']:.1f} s "
        f"warm-up); faces found in {summary['faces_found']} frames, {summary['frames_passed_through']} frames "
        "passed through",
        f"  path: {path['scheduler']} scheduler, {path['pipeline']} pipeline, attention {path['attention']}, "
        f"CUDA graphs {'on' if path['cuda_graphs'] else 'off'}, encoder {path['encoder']}, decoder {path['decoder']} "
        f"({path['decoder_backend']})",
    ]
    for stage, secs in summary.get("stage_seconds", {}).items():
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
