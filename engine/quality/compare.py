"""How far a fast path's output is from the reference path's, for ``lipforcing bench --quality`` and its gate.

    results = compare_outputs(reference_frames, {"+graphs": frames}, speech=speech, syncnet=net)
    failures = quality_gate(results, max_drop=1.0)        # [] when every path is within 1 %

Per path: PSNR and SSIM against the reference output (frame by frame, the whole frame), and Sync-C of both
when SyncNet weights are given. The *quality drop* in percent is the larger of 100 (1 - SSIM) and the relative
fall of Sync-C from the reference's; 0 means the path reproduces the reference.
"""

from __future__ import annotations

import math

import numpy as np

from . import image, syncnet


def _sync_c(net, frames: np.ndarray, speech: np.ndarray, aligner) -> float | None:
    from .faces import track_faces

    track = track_faces(frames, aligner)
    if not track.found.any():
        return None
    return syncnet.score(net, frames, track.face_boxes(), speech).sync_c


def compare_outputs(reference: np.ndarray, outputs: dict[str, np.ndarray], *, speech: np.ndarray | None = None,
                    syncnet_net=None) -> dict[str, dict]:
    """reference, outputs: uint8 [N, H, W, 3] of the same clip; speech (16 kHz float) for Sync-C."""
    aligner = None
    ref_sync = None
    if syncnet_net is not None and speech is not None:
        from ..media.face import FaceAligner

        aligner = FaceAligner("mediapipe")
        ref_sync = _sync_c(syncnet_net, reference, speech, aligner)
    results = {}
    try:
        for name, frames in outputs.items():
            if frames.shape != reference.shape:
                results[name] = {"error": f"{len(frames)} frames of {frames.shape[1:3]}, the reference has "
                                          f"{len(reference)} of {reference.shape[1:3]}", "drop_pct": math.inf}
                continue
            ssim = float(image.ssim_per_frame(frames, reference).mean())
            psnr = image.psnr(frames, reference)
            drop = max(0.0, 100 * (1 - ssim))
            entry = {"psnr": "inf" if math.isinf(psnr) else round(psnr, 3), "ssim": round(ssim, 6)}
            if ref_sync is not None:
                sync = _sync_c(syncnet_net, frames, speech, aligner)
                entry.update(sync_c=None if sync is None else round(sync, 4), sync_c_reference=round(ref_sync, 4))
                if sync is not None and ref_sync > 0:
                    drop = max(drop, 100 * (ref_sync - sync) / ref_sync)
            entry["drop_pct"] = round(drop, 4)
            results[name] = entry
    finally:
        if aligner is not None:
            aligner.close()
    return results


def quality_gate(results: dict[str, dict], max_drop: float) -> list[str]:
    """One line per path whose quality drop exceeds ``max_drop`` percent."""
    return [f"{name}: quality drop {r['drop_pct']:.3f} % > {max_drop:g} % (PSNR {r.get('psnr')}, SSIM {r.get('ssim')})"
            for name, r in results.items() if r["drop_pct"] > max_drop]
