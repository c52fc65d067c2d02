"""Work that runs in several threads at once (sessions of one engine, in the benchmarks and checks)."""

from __future__ import annotations

import threading
from collections.abc import Callable


def run_in_threads(work: Callable[[int], None], count: int, *,
                   on_error: Callable[[BaseException], None] | None = None) -> None:
    """``work(i)`` for i in 0..count-1, each in its own thread, all at once; raises the first exception any of them
    raised, once all have ended. ``on_error`` is called in the failing thread (to release the others' waits)."""
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            work(i)
        except BaseException as exc:  # re-raised in the caller
            errors.append(exc)
            if on_error is not None:
                on_error(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
