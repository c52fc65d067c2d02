"""TensorRT engines for the fixed-shape decoder/encoder: build (fp16, optimization profile, timing cache),
a content-addressed engine cache, and a runtime that executes on a given CUDA stream.

    key = engine_cache_key(onnx_bytes, shapes, gpu=gpu_signature(), trt_version=trt.__version__)
    plan = build_or_load_engine(onnx_path, shapes, cache_dir)       # bytes of a serialized engine
    runner = TensorRTRunner(plan)                                    # needs tensorrt + CUDA
    outputs = runner(inputs, stream=torch.cuda.current_stream())     # dict name -> torch tensor

Written against the TensorRT 10 Python API (``build_serialized_network``, ``set_tensor_address``,
``execute_async_v3``). ``tensorrt`` is imported lazily: importing this module never needs it, and
``tensorrt_status()`` says whether it can be used here and why not.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from ..engine.user_cache import user_cache_dir

log = logging.getLogger("lipforcing")


def tensorrt_status() -> tuple[bool, str]:
    """(usable, reason): TensorRT importable and a CUDA device present."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, "the tensorrt package is not installed (pip install 'lipforcing[trt]')"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return True, "ok"


def gpu_signature(device: int = 0) -> str:
    """Name and compute capability of a GPU: engines are only valid on the GPU model they were built for."""
    props = torch.cuda.get_device_properties(device)
    return f"{props.name} sm_{props.major}{props.minor}"


def engine_cache_key(
    onnx_bytes: bytes,
    shapes: Mapping[str, tuple[int, ...]],
    *,
    gpu: str,
    trt_version: str,
    precision: str = "fp16",
) -> str:
    """Hash of everything an engine depends on: the network and its weights (the ONNX bytes), input
    shapes, GPU model, TensorRT version and precision."""
    h = hashlib.sha256()
    h.update(hashlib.sha256(onnx_bytes).digest())
    h.update(json.dumps({k: list(v) for k, v in sorted(shapes.items())}).encode())
    h.update(f"{gpu}|{trt_version}|{precision}".encode())
    return h.hexdigest()[:32]


def build_engine(
    onnx_bytes: bytes,
    shapes: Mapping[str, tuple[int, ...]],
    *,
    fp16: bool = True,
    workspace_bytes: int = 4 << 30,
    timing_cache: bytes | None = None,
) -> tuple[bytes, bytes]:
    """Build a serialized engine with one optimization profile pinned at ``shapes``.

    Returns (engine bytes, timing cache bytes)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse the ONNX model: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, shape in shapes.items():
        profile.set_shape(name, shape, shape, shape)
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache or b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the engine (see the TensorRT log above)")
    return bytes(serialized), bytes(config.get_timing_cache().serialize())


def build_or_load_engine(
    onnx_path: str | Path,
    shapes: Mapping[str, tuple[int, ...]],
    cache_dir: str | Path | None = None,
    *,
    fp16: bool = True,
) -> bytes:
    """Return a serialized engine for ``onnx_path``, from the engine cache when one matches the key."""
    import tensorrt as trt

    cache_dir = Path(cache_dir) if cache_dir else user_cache_dir("tensorrt")
    cache_dir.mkdir(parents=True, exist_ok=True)
    onnx_bytes = Path(onnx_path).read_bytes()
    key = engine_cache_key(onnx_bytes, shapes, gpu=gpu_signature(), trt_version=trt.__version__,
                           precision="fp16" if fp16 else "fp32")
    engine_file = cache_dir / f"{key}.engine"
    if engine_file.is_file():
        log.info("lipforcing: TensorRT engine cache hit %s", engine_file.name)
        return engine_file.read_bytes()
    timing_file = cache_dir / "timing.cache"
    timing = timing_file.read_bytes() if timing_file.is_file() else None
    log.warning("lipforcing: building a TensorRT engine for %s (minutes, once per GPU/shape/weights)", onnx_path)
    plan, timing = build_engine(onnx_bytes, shapes, fp16=fp16, timing_cache=timing)
    for path, data in ((engine_file, plan), (timing_file, timing)):
        tmp = path.with_name(path.name + ".partial")
        tmp.write_bytes(data)
        tmp.replace(path)
    return plan


_TRT_TO_TORCH = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32}


class TensorRTRunner:
    """Executes a serialized engine on a CUDA stream with torch tensors as I/O (outputs preallocated once)."""

    def __init__(self, plan: bytes, device: torch.device | str = "cuda") -> None:
        import tensorrt as trt

        self._logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self._logger).deserialize_cuda_engine(plan)
        if self.engine is None:
            raise RuntimeError("TensorRT could not deserialize the engine (built by another version or GPU?)")
        self.context = self.engine.create_execution_context()
        self.inputs, self.outputs = [], {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            shape = tuple(self.engine.get_tensor_shape(name))
            dtype = _TRT_TO_TORCH[self.engine.get_tensor_dtype(name).name]
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self.inputs.append((name, shape, dtype))
            else:
                self.outputs[name] = torch.empty(shape, dtype=dtype, device=device)
                self.context.set_tensor_address(name, self.outputs[name].data_ptr())

    def __call__(self, inputs: Mapping[str, torch.Tensor], stream: torch.cuda.Stream | None = None):
        stream = stream or torch.cuda.current_stream()
        keep = []
        for name, shape, dtype in self.inputs:
            x = inputs[name].to(dtype).contiguous()
            if tuple(x.shape) != shape:
                raise ValueError(f"TensorRT input {name}: shape {tuple(x.shape)}, engine built for {shape}")
            keep.append(x)
            self.context.set_tensor_address(name, x.data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        return self.outputs
