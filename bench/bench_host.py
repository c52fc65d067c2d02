"""Host-side face path throughput: alignment warp, full alignment (MediaPipe) and paste-back.

    python -m lipforcing.bench.bench_host               # CPU, 512x512 frames
    python -m lipforcing.bench.bench_host --device cuda --frame 1080x1920

What is timed (each: warm-up calls excluded, median of --repeats timed runs, frames per second =
frames in a call / median seconds of the call):
- warp_cv2:     cv2.warpAffine of one uint8 frame [H, W, 3] to the 512x512 crop (CPU only).
- warp_torch_bB: warp_affine_torch of B frames (float [B, 3, H, W] already on the device) to 512x512.
- align_mediapipe: FaceAligner.align on successive frames (detection every 5th frame, tracking
  between, cv2 warp): a real clip frame from ../shared resized to the frame size when present,
  else skipped (no face in synthetic data).
- paste_back_bB: paste_back of B generated 512x512 faces into B frames (uint8 frames on the device,
  float faces, soft mask), the whole call including the uint8 result.
Synchronizes CUDA before reading the clock. The last stdout line is one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

from lipforcing.engine.media.face import FACE_SIZE, FaceAligner, invert_affine, warp_affine_cv2, warp_affine_torch
from lipforcing.engine.media.paste_back import paste_back

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def timed_fps(fn: Callable[[], object], frames: int, device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return frames / statistics.median(times)


def test_frame(height: int, width: int) -> tuple[np.ndarray, bool]:
    """A real face frame resized to (height, width) when the shared clips exist, else smooth noise."""
    clip = SHARED / "assets" / "clips" / "face3.mp4"
    import cv2

    if clip.exists():
        from lipforcing.engine.media.io import VideoReader

        with VideoReader(clip, max_frames=1) as reader:
            frame = next(iter(reader))
        return cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA), True
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (height // 16 + 2, width // 16 + 2, 3)).astype(np.uint8)
    return cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC), False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--frame", default="512x512", help="frame size HxW")
    parser.add_argument("--batch", type=int, default=12, help="frames per batched call (12 = one chunk)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    height, width = (int(v) for v in args.frame.split("x"))
    frame, real = test_frame(height, width)

    scale = 1.6 * FACE_SIZE / max(height, width)
    matrix = np.array([[scale, 0, FACE_SIZE / 2 - scale * width / 2], [0, scale, FACE_SIZE / 2 - scale * height / 2]])
    results: dict[str, float] = {}
    run = dict(device=device, warmup=args.warmup, repeats=args.repeats)
    if device.type == "cpu":
        results["warp_cv2"] = timed_fps(lambda: warp_affine_cv2(frame, matrix, (FACE_SIZE, FACE_SIZE)), 1, **run)
    for batch in (1, args.batch):
        images = torch.from_numpy(frame).to(device).permute(2, 0, 1)[None].float().repeat(batch, 1, 1, 1)
        mats = np.repeat(matrix[None], batch, 0)
        warp = partial(warp_affine_torch, images, mats, (FACE_SIZE, FACE_SIZE))
        results[f"warp_torch_b{batch}"] = timed_fps(warp, batch, **run)
        frames = torch.from_numpy(frame).to(device)[None].repeat(batch, 1, 1, 1)
        faces = torch.rand(batch, 3, FACE_SIZE, FACE_SIZE, device=device)
        mask = torch.rand(FACE_SIZE, FACE_SIZE, device=device)
        inverse = np.repeat(invert_affine(matrix)[None], batch, 0)
        paste = partial(paste_back, frames, faces, faces, mask, inverse)
        results[f"paste_back_b{batch}"] = timed_fps(paste, batch, **run)
    if real:
        with FaceAligner() as aligner:
            n = 20
            results["align_mediapipe"] = timed_fps(lambda: [aligner.align(frame) for _ in range(n)], n, **run)

    print(f"host face path on {device} ({torch.get_num_threads()} threads), frames {height}x{width}, fps:")
    for name, fps in results.items():
        print(f"  {name:<20} {fps:9.1f}")
    load = round(os.getloadavg()[0], 2)  # other processes on the machine skew CPU timings
    print(f"  (1-minute load average {load}, {os.cpu_count()} cores)")
    summary = {"bench": "host", "device": str(device), "frame": [height, width], "threads": torch.get_num_threads(),
               "load_avg": load, "fps": {k: round(v, 1) for k, v in results.items()}}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
