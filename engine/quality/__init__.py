"""Quality metrics of lip-synced video (``lipforcing eval``, ``lipforcing bench --quality``).

    image      SSIM and PSNR (whole frame and the mouth region), batched on torch
    faces      mouth landmarks and boxes, LMD, the 5-point crop for identity (the engine's face landmarks)
    syncnet    SyncNet v2: the network, its weights, the MFCC front end, the face crop, Sync-C / Sync-D / offset
    features   the feature networks of FID (Inception), FVD (I3D) and CSIM (ArcFace ONNX), the Frechet distance
    evaluate   pairing videos, decoding each once, every metric per video and in aggregate, the report and plot

Weights are supplied by the user (``--weights DIR``); a metric whose weights are missing is reported as
unavailable with the file it needs and where it comes from, and the others still run.
"""
