"""Load test of a running ``lipforcing serve``: N clients at once, each streaming speech in real time.

    report = load_test(LoadConfig(url="ws://127.0.0.1:8080", avatar="me", sessions=8, seconds=30))
    print(format_load(report))

Every client streams ``seconds`` of speech on the wall clock (20 ms pieces) and receives every frame of its
session; a session passes when all its frames arrived, in order, with their speech. Per session the report
gives FPS (frames received over the timed region), the time to the first frame and the chunk latency: from
the moment the client had sent the speech a chunk needs (its frames plus the look-ahead) to the arrival of the
chunk's last frame, p50 and p95. The timed region is each session's streaming, from its first speech sent to
its last frame received; connection set-up is outside it.

A load runs in real time when every session got all its frames and no session's p95 chunk latency exceeds
``max_latency_s``: the server kept pace with speech arriving at 25 frames per second. ``sweep`` runs loads
of growing size and reports the most sessions that ran in real time (sessions per GPU, with one replica).
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, replace

import numpy as np

from ..engine.app.server.client import ClientOptions, ServerRefused, stream_session
from ..engine.app.server.protocol import SAMPLES_PER_FRAME, to_pcm16
from ..engine.app.session import DEFAULT_LOOKAHEAD_S
from ..engine.errors import LipforcingError
from ..engine.media.length import clip_length_from_samples

SCHEMA = "lipforcing-serve-load/1"


@dataclass(frozen=True, kw_only=True)
class LoadConfig:
    url: str
    avatar: str
    """The name of an avatar the server holds."""
    sessions: int = 8
    seconds: float = 30.0
    token: str | None = None
    lookahead: float = DEFAULT_LOOKAHEAD_S
    speech: str | None = None
    """A speech file (repeated or cut to ``seconds``); default: synthesized speech."""
    stagger_s: float = 0.1
    """Sessions start this far apart (a crowd, not one instant)."""
    max_latency_s: float = 1.0
    """The p95 chunk latency under which a session counts as real time."""


def _speech(config: LoadConfig) -> np.ndarray:
    n = int(config.seconds * 16000)
    if config.speech:
        from ..engine.media.io import load_audio

        audio = load_audio(config.speech)
        audio = np.tile(audio, -(-n // max(1, audio.size)))[:n]
    else:
        from ..engine.app.demo import synth_speech

        audio = synth_speech(config.seconds)[:n]
    return to_pcm16(audio)


def server_stats(url: str, token: str | None) -> dict:
    """GET /v1/stats of the server behind a ws:// URL."""
    from urllib.parse import urlsplit

    parts = urlsplit(url if "://" in url else f"ws://{url}")
    scheme = "https" if parts.scheme in ("wss", "https") else "http"
    request = urllib.request.Request(f"{scheme}://{parts.netloc}/v1/stats")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        raise ServerRefused(f"the server answered HTTP {exc.code} to /v1/stats (token?)") from None
    except OSError as exc:
        raise LipforcingError(f"cannot reach the server at {url}: {exc}") from None


async def _run(config: LoadConfig, speech: np.ndarray) -> list[dict]:
    expected = clip_length_from_samples(speech.size).frames

    async def one(i: int) -> dict:
        await asyncio.sleep(i * config.stagger_s)
        options = ClientOptions(url=config.url, token=config.token, avatar=config.avatar, lookahead=config.lookahead,
                                timeout=max(120.0, 4 * config.seconds))
        try:
            r = await stream_session(options, speech)
        except (ServerRefused, LipforcingError) as exc:
            return {"session": i, "ok": False, "error": str(exc)}
        audio_ok = r.audio is not None and r.audio.size == r.frames * SAMPLES_PER_FRAME
        return {
            "session": i, "ok": r.frames == expected and audio_ok, "frames": r.frames, "expected_frames": expected,
            "audio_matches_frames": audio_ok, "fps": round(r.fps, 2), "first_frame_s": round(r.first_frame_s, 3),
            "chunk_latency_p50_s": round(r.chunk_latency_p50_s, 3),
            "chunk_latency_p95_s": round(r.chunk_latency_p95_s, 3), "duration_s": round(r.duration_s, 2),
            "replica": r.replica,
        }

    return list(await asyncio.gather(*(one(i) for i in range(config.sessions))))


def load_test(config: LoadConfig) -> dict:
    """Run the load (see the module docstring) and return its report."""
    if config.sessions < 1 or config.seconds <= 0:
        raise LipforcingError("a load test needs at least one session and a positive duration")
    speech = _speech(config)
    before = server_stats(config.url, config.token)
    began = time.monotonic()
    sessions = asyncio.run(_run(config, speech))
    wall = time.monotonic() - began
    ok = [s for s in sessions if s["ok"]]
    latencies = [s["chunk_latency_p50_s"] for s in ok]
    p95_max = max((s["chunk_latency_p95_s"] for s in ok), default=None)
    return {
        "schema": SCHEMA,
        "server": {k: before.get(k) for k in ("engine", "max_sessions", "replica")},
        "sessions": config.sessions, "speech_s": config.seconds, "lookahead_s": config.lookahead,
        "wall_s": round(wall, 2), "all_ok": len(ok) == config.sessions,
        "fps_per_session_min": min((s["fps"] for s in ok), default=0.0),
        "chunk_latency_p50_s_median": float(np.median(latencies)) if latencies else None,
        "chunk_latency_p95_s_max": p95_max,
        "max_latency_s": config.max_latency_s,
        "real_time": len(ok) == config.sessions and p95_max is not None and p95_max <= config.max_latency_s,
        "per_session": sessions,
    }


def sweep(config: LoadConfig, counts: list[int]) -> dict:
    """One load per session count (in the order given); ``sessions_at_real_time`` is the largest count whose
    load ran in real time (0: none did)."""
    loads = [load_test(replace(config, sessions=n)) for n in counts]
    return {
        "schema": SCHEMA, "sweep": counts,
        "sessions_at_real_time": max((r["sessions"] for r in loads if r["real_time"]), default=0),
        "all_ok": all(r["all_ok"] for r in loads), "loads": loads,
    }


def format_load(report: dict) -> str:
    lines = [f"{report['sessions']} sessions x {report['speech_s']:g} s of speech "
             f"(look-ahead {report['lookahead_s']:g} s), wall {report['wall_s']:.1f} s, "
             f"{'all complete' if report['all_ok'] else 'SOME FAILED'}, "
             f"{'real time' if report['real_time'] else 'not real time'} (p95 <= {report['max_latency_s']:g} s)",
             f"{'session':>7} {'frames':>9} {'FPS':>6} {'first':>7} {'p50 ms':>8} {'p95 ms':>8}"]
    for s in report["per_session"]:
        if not s["ok"] and "error" in s:
            lines.append(f"{s['session']:>7}  failed: {s['error']}")
            continue
        lines.append(f"{s['session']:>7} {s['frames']:>4}/{s['expected_frames']:<4} {s['fps']:>6.1f} "
                     f"{s['first_frame_s']:>6.2f}s {s['chunk_latency_p50_s'] * 1000:>8.0f} "
                     f"{s['chunk_latency_p95_s'] * 1000:>8.0f}")
    return "\n".join(lines)
