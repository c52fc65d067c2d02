"""The user cache folder: what the engine builds once and reuses across processes.

    root = user_cache_dir()                 # $LIPFORCING_CACHE, $XDG_CACHE_HOME/lipforcing or ~/.cache/lipforcing
    engines = user_cache_dir("tensorrt")    # TensorRT engines and the timing cache
    persist_triton_autotuning()             # Triton kernels and autotune results under root/triton

Everything in it is derived data (keyed by what it depends on) and safe to delete.
"""

from __future__ import annotations

import os
from pathlib import Path


def user_cache_dir(*parts: str) -> Path:
    """The cache folder (or a subfolder of it), following the XDG convention; not created here."""
    base = os.environ.get("LIPFORCING_CACHE")
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = os.path.join(xdg, "lipforcing")
    return Path(base, *parts)


def persist_triton_autotuning() -> None:
    """Point Triton's cache (compiled kernels and autotune results) at the user cache, unless the user
    already chose a folder with TRITON_CACHE_DIR."""
    os.environ.setdefault("TRITON_CACHE_DIR", str(user_cache_dir("triton")))
