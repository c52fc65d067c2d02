"""``lipforcing demo``: the whole pipeline on an input built locally, with no downloads.

The input video is the Grace Hopper portrait that ships with matplotlib (a public-domain photograph), with
a slow, slight head motion added, and speech-like audio made by a small vowel synthesizer (a harmonic
voice source shaped by the formants of a, e, i, o, u, in syllables of about 200 ms). It runs with the tiny
model (random weights), so the mouth it paints is not meaningful: the point is that every stage (decode,
face alignment, both encoders, the student's calls, decode, paste-back, muxing) runs end to end.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..media.io import VideoWriter
from ..media.length import AUDIO_RATE, OUTPUT_FPS

VOWEL_FORMANTS = {  # Hz, (F1, F2, F3) of an adult voice
    "a": (730, 1090, 2440), "e": (530, 1840, 2480), "i": (270, 2290, 3010),
    "o": (570, 840, 2410), "u": (300, 870, 2240),
}


def synth_speech(seconds: float, rate: int = AUDIO_RATE, seed: int = 0) -> np.ndarray:
    """Speech-like audio: float32 [rate * seconds] in [-1, 1]."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    t = np.arange(n) / rate
    syllable = 0.2
    vowels = rng.choice(list(VOWEL_FORMANTS), size=int(math.ceil(seconds / syllable)) + 1)
    f0 = 120 + 15 * np.sin(2 * np.pi * 0.7 * t) + 5 * rng.standard_normal(n).cumsum() / math.sqrt(n)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    out = np.zeros(n)
    idx = np.minimum((t / syllable).astype(int), len(vowels) - 1)
    for k in range(1, 30):  # harmonics of the voice source, 1/k spectral tilt
        fk = k * f0
        gain = np.zeros(n)
        for v, formants in VOWEL_FORMANTS.items():
            sel = vowels[idx] == v
            if sel.any():
                g = sum(1.0 / (1 + ((fk[sel] - f) / (60 + 0.08 * f)) ** 2) for f in formants)
                gain[sel] = g
        out += gain / k * np.sin(k * phase)
    env = np.clip(np.sin(np.pi * ((t / syllable) % 1.0)), 0, None) ** 0.6  # syllable envelope
    out *= env * (rng.random(len(vowels))[idx] > 0.15)  # a few pauses
    out += 0.003 * rng.standard_normal(n)
    return (0.8 * out / (np.abs(out).max() + 1e-9)).astype(np.float32)


def portrait() -> np.ndarray:
    """The portrait photograph shipped with matplotlib: uint8 [600, 512, 3] RGB."""
    import matplotlib.cbook as cbook
    from PIL import Image

    path = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    return np.asarray(Image.open(path).convert("RGB"))


def moving_frames(image: np.ndarray, n: int) -> list[np.ndarray]:
    """n frames of a slow, slight head motion (shift and zoom) of a still image."""
    import cv2

    h, w = image.shape[:2]
    frames = []
    for i in range(n):
        s = 1.0 + 0.02 * math.sin(2 * math.pi * i / 50)
        dx, dy = 6 * math.sin(2 * math.pi * i / 37), 4 * math.sin(2 * math.pi * i / 29)
        m = np.array([[s, 0, (1 - s) * w / 2 + dx], [0, s, (1 - s) * h / 2 + dy]], np.float32)
        frames.append(cv2.warpAffine(image, m, (w, h), borderMode=cv2.BORDER_REFLECT))
    return frames


def make_demo_input(path: str | Path, seconds: float = 2.0, seed: int = 0) -> Path:
    """Write the demo's input talking-head MP4 (video + speech) to ``path``."""
    speech = synth_speech(seconds, seed=seed)
    frames = moving_frames(portrait(), int(seconds * OUTPUT_FPS))
    h, w = frames[0].shape[:2]
    with VideoWriter(path, w, h, audio=speech, audio_rate=AUDIO_RATE) as writer:
        for f in frames:
            writer.write(f)
    return Path(path)
