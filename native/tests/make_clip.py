"""Writes a shared clip's first 9 frames at 320x320 (raw RGB24: one chunk), their speech (raw float32, 16 kHz)
and meta.txt ("width height frames expected_output_frames") for the C tests. Exit 77 (ctest: skipped) without
the shared clips."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main(out: str, source_dir: str) -> int:
    shared = Path(os.environ.get("LIPFORCING_SHARED") or Path(source_dir).parent / "shared")
    clip = shared / "assets/clips/face3.mp4"
    if not clip.is_file():
        print(f"skip: {clip} is absent", file=sys.stderr)
        return 77
    import cv2
    import numpy as np

    from lipforcing.engine.media.io import load_audio, read_frames
    from lipforcing.engine.media.length import clip_length_from_samples

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    frames = np.stack([cv2.resize(f, (320, 320), interpolation=cv2.INTER_AREA) for f in read_frames(clip, 9)])
    speech = load_audio(clip)[: 9 * 640].astype(np.float32)
    (folder / "frames.rgb").write_bytes(frames.tobytes())
    (folder / "speech.f32").write_bytes(speech.tobytes())
    expected = min(clip_length_from_samples(speech.size).frames, len(frames))
    (folder / "meta.txt").write_text(f"{frames.shape[2]} {frames.shape[1]} {len(frames)} {expected}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
