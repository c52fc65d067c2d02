"""The DiT core: the Lip Forcing causal student and what it needs to run a call.

    config.py          ModelConfig (tiny / 1.3b / 14b presets) and StreamConfig (chunk, sink, window, t)
    model.py           CausalWanStudent: the network, released key names, one set of blocks for every caller
    cache.py           SinkWindowCache and ChunkPlan: the sink + rolling-window KV cache (SPEC §5)
    attention.py       StreamingAttention (one chunk against the cache), RopeTable, backend resolution
    full_sequence.py   FullSequenceAttention: whole-clip calls (bidirectional or block-causal) for training
    checkpoint.py      reading, strict loading and converting checkpoints
    build.py           random_student: seeded random weights at any preset's real shapes, in the target dtype

Imports: ``lipforcing.kernels`` and ``lipforcing.engine.errors`` only. The runtime, the codecs, the tools
and training build on this package.
"""
