"""Latent codecs: pixels <-> the 16-channel normalized Wan 2.1 latent space, streamed with causal state.

    wan_vae.py   the Wan 2.1 VAE (released encoder; streaming encode/decode, causal history in place)
    taehv.py     TAEHV for Wan 2.1 (the released engine's decoder; a cheap encoder too)
    latent.py    LatentEncoder / LatentDecoder: one streaming interface over both families

Imports: the DiT core's checkpoint reader and ``engine.errors``. Compiled decoder backends (ONNX,
TensorRT) live in ``lipforcing.compile``, which builds on this package.
"""
