"""Compiled backends of the codecs: ONNX export, onnxruntime and TensorRT, and ``lipforcing compile``.

    onnx_export.py       TAEHV decoder/encoder as fixed-shape ONNX steps with explicit causal state;
                         OnnxStepRunner (onnxruntime, CUDA provider on CUDA, I/O binding)
    tensorrt_engine.py   TensorRT build (fp16, profile, timing cache), the engine cache, the runtime
    decoder.py           the decoder backend the engine runs (TensorRT | onnxruntime | PyTorch, loud
                         fallback), artefacts reused from ``lipforcing compile`` or the user cache
    stage.py             ``lipforcing compile``: export, onnxruntime parity, engines, compiled.json

Imports: the codecs (``engine.codecs``), ``engine.errors``, ``engine.numerics`` and ``engine.user_cache``.
The application layer picks a backend through ``decoder.make_decoder_backend``.
"""
