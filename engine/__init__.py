"""The engine, by concern. Dependencies run one way, downwards in this list:

    app/       the session users embed (LipSync), the engine builder, run, demo, the command line
    tools/     golden parity, info (FLOPs, floors), the memory plan
    runtime/   schedulers (reference loop, static buffers + CUDA graphs) and the device-stream pipeline
    codecs/    Wan 2.1 VAE and TAEHV behind one streaming interface
    media/     video/audio I/O, face alignment, mouth mask, paste-back, audio features
    dit/       the causal student, its cache, attention contexts, checkpoints
    errors.py, numerics.py, user_cache.py   shared by every layer

``lipforcing.kernels`` (below ``dit``) imports nothing from here; ``lipforcing.compile`` builds on the
codecs and is used by ``app``; ``lipforcing.bench`` builds on ``app``.
"""
