"""The runtime: how the student's calls are scheduled and how a chunk moves through the device.

    sampler.py    StreamingSampler: the reference scheduler (the plain eager loop) and flow_step
    static.py     StaticStudent: the static scheduler (static buffers with a row per session, CUDA graphs
                  per rows and window shape, optional torch.compile per call, explicit warm-up)
    pipeline.py   ChunkPipeline and DeviceStreams: encode | student | decode on device streams
    batcher.py    StudentBatcher: several sessions' chunks in batched student calls
    timing.py     StageTimer: per-stage times without synchronisation

Imports: the DiT core (``engine.dit``), ``lipforcing.kernels`` and ``engine.errors``. The application
layer (``engine.app``) builds sessions on it.
"""
