"""Per-stage timing that costs no synchronisation: CUDA events on a GPU, the wall clock on a CPU.

    timer = StageTimer(enabled=True)
    with timer.stage("encode", stream=encode_stream):   # events recorded on that stream (GPU)
        ...
    timer.collect()                                     # resolve finished GPU intervals (never blocks)
    timer.seconds                                       # {"encode": 1.23, ...} summed over chunks
    timer.samples["encode"]                             # per-chunk seconds

On a GPU a stage's time is the device time between two events on its stream (the work of that stage, not
the host's view of it); intervals are resolved once their end event has completed, so nothing ever waits
for the device. Disabled, ``stage`` is a no-op. Thread-safe: stages may run in different threads.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict

import torch


class StageTimer:
    """Collects per-stage seconds (and per-chunk samples) from any thread."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.samples: dict[str, list[float]] = defaultdict(list)
        self._pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def stage(self, name: str, stream: torch.cuda.Stream | None = None):
        """Time the enclosed work as stage ``name``; ``stream`` is the CUDA stream it runs on (None: CPU work)."""
        if not self.enabled:
            yield
            return
        if stream is None:
            began = time.perf_counter()
            yield
            self.add(name, time.perf_counter() - began)
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        yield
        end.record(stream)
        with self._lock:
            self._pending.append((name, start, end))

    def add(self, name: str, seconds: float) -> None:
        """Record one sample of a stage measured elsewhere (host seconds)."""
        if not self.enabled:
            return
        with self._lock:
            self.samples[name].append(seconds)

    def collect(self, wait: bool = False) -> None:
        """Move finished GPU intervals into ``samples``; ``wait=True`` waits for the unfinished ones (end of run)."""
        with self._lock:
            pending, self._pending = self._pending, []
        keep = []
        for name, start, end in pending:
            if wait:
                end.synchronize()
            if end.query():
                self.add(name, start.elapsed_time(end) / 1e3)
            else:
                keep.append((name, start, end))
        with self._lock:
            self._pending.extend(keep)

    @property
    def seconds(self) -> dict[str, float]:
        """Total seconds per stage (finished intervals only; call ``collect(wait=True)`` at the end)."""
        with self._lock:
            return {name: sum(v) for name, v in self.samples.items()}
