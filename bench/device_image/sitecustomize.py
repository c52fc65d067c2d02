"""Python started with this folder on PYTHONPATH behaves like the lent GPU machine's image: the packages that
image lacks cannot be imported, even where this machine has them.

    PYTHONPATH=bench/device_image python -m lipforcing.cli bench ...     # as bench/gpu_suite.sh does

The device image has Python 3.12, torch, triton, transformers, onnx, onnxruntime (no CUDA provider), numpy,
safetensors, scipy, opencv-python-headless, pillow and pytest (and what they depend on: tqdm, ...). Importing
one of ``MISSING`` raises ModuleNotFoundError and ``importlib.util.find_spec`` finds nothing, as on that image,
so ``bench/gpu_suite.sh --dry-run`` on a CPU proves that no step of the suite needs them. On the device itself
they are absent anyway.
"""

import sys

MISSING = (
    "av", "mediapipe", "tensorrt", "matplotlib", "onnxscript", "peft", "tensorboardX", "pynvml",
    "aiortc", "fastapi", "uvicorn", "websockets", "starlette", "ray",
    "flash_attn", "flash_attn_interface", "xformers", "pytest_benchmark",
)

# None in sys.modules is Python's own way to say "no such module": `import av` raises ModuleNotFoundError and
# importlib.util.find_spec("av") answers None, as where the package is not installed.
for _name in MISSING:
    sys.modules.setdefault(_name, None)
