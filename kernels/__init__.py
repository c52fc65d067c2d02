"""lipforcing.kernels: Triton kernels of the engine's hot path, each beside its PyTorch reference.

Ops (registered as ``torch.library`` custom ops ``torch.ops.lipforcing.*`` with fake implementations, so
``torch.compile`` / CUDA graphs trace them; Python API in ``lipforcing.kernels.ops``):

    attention             sink + window self-attention with the 3-axis dynamic RoPE fused in registers
                          (sink_window_attention.py; op ``sink_window_attention``)
    flow_update           unpatchify the head output and step the latent: x0 = x_t - t v, optional
                          re-noising (flow_update.py; ops ``flow_x0``, ``flow_x0_renoise``)
    modulated_layer_norm  LayerNorm without affine fused with LN(x)(1 + scale) + shift per frame
                          (norm_modulation.py)
    gated_residual        x + gate * y with a per-frame gate (gated_residual.py)
    rms_norm              RMSNorm over the full width with a learned weight (rms_norm.py)

Pure-PyTorch pieces the kernels' references share with the engine (no Triton needed): ``rope`` (3-axis
RoPE angles and rotation in float64) and ``patches`` (token <-> latent layout of the DiT's patches).
This package imports nothing from ``lipforcing.engine``: the engine builds on it, never the reverse.

Every kernel module holds a private ``_<op>_fwd_kernel``, a validating launcher ``<op>`` and a plain
PyTorch reference ``<op>_ref``. Kernel modules import Triton at the top; this package and ``ops`` do not,
so ``import lipforcing.kernels`` works without Triton. Check ``triton_available(device)`` for the device the
tensors live on before choosing the Triton backend: CUDA tensors need CUDA; CPU tensors run only in the Triton
interpreter (``TRITON_INTERPRET=1``, tests), also on a host that has a GPU.
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# The Python API lives in ``lipforcing.kernels.ops`` (not re-exported here: three of its function names
# are also submodule names, and the package attribute would change meaning once a submodule is imported).
__all__ = ["triton_available"]


def triton_available(device: torch.device | str) -> tuple[bool, str]:
    """(usable, reason): the kernels can run on tensors on ``device``: Triton is importable, and the device is
    a CUDA device with CUDA present, or the CPU under TRITON_INTERPRET=1. The host's GPU does not make CPU
    tensors usable."""
    import torch

    device = torch.device(device)
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install 'lipforcing[gpu]')"
    try:
        import triton  # noqa: F401
    except Exception as err:  # a broken install raises more than ImportError
        return False, f"triton failed to import: {err}"
    interpreter = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device.type == "cpu":
        if interpreter:
            return True, "triton interpreter on CPU tensors (TRITON_INTERPRET=1)"
        return False, ("the tensors are on the CPU and the kernels run on CUDA tensors (set TRITON_INTERPRET=1 to "
                       "run them in the CPU interpreter, for tests; else use the reference backend)")
    if device.type != "cuda":
        return False, f"the kernels run on CUDA tensors, not on {device.type} tensors"
    if not torch.cuda.is_available():
        return False, f"the tensors are on {device} but CUDA is not available"
    return True, f"CUDA device {torch.cuda.get_device_name(device)}"
