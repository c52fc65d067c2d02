"""lipforcing_host never reports output it did not write (ctest case host_output).

    host_output.py LIPFORCING_HOST

Cases: stdout on /dev/full and a pipe whose reader is gone (SIGPIPE ignored, as a host process might) exit 1
with the error and no "frames out" line; truncated input, sizes that are not numbers and a speech "file" that is
a folder exit 2 with a message. (That a whole run writes exactly its frames to stdout, and nothing the engine
prints, is tests/app/test_native.py's.) Small noise frames (no face: passed through) keep the runs short."""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

SIDE, FRAMES = 64, 9


def main(host: str) -> int:
    with tempfile.TemporaryDirectory(prefix="host_output_") as folder:
        return check(host, Path(folder))


def check(host: str, folder: Path) -> int:
    rng = random.Random(7)
    speech = folder / "speech.f32"
    speech.write_bytes(struct.pack(f"<{FRAMES * 640}f", *(rng.uniform(-0.1, 0.1) for _ in range(FRAMES * 640))))
    frame_bytes = SIDE * SIDE * 3
    frames = bytes(rng.randrange(256) for _ in range(frame_bytes * FRAMES))
    args = [host, "--model", "tiny", "--device", "cpu", "--encoder", "taehv", "--width", str(SIDE), "--height",
            str(SIDE), "--speech", str(speech)]

    def start(stdin: bytes, stdout, extra: list[str] | None = None, argv: list[str] | None = None):
        process = subprocess.Popen(argv or args + (extra or []), stdin=subprocess.PIPE, stdout=stdout,
                                   stderr=subprocess.PIPE, restore_signals=False)  # SIGPIPE stays ignored
        return process, stdin

    reader, writer = os.pipe()
    os.close(reader)  # nobody will read: writes fail with EPIPE
    with open("/dev/full", "wb") as full:
        runs = {
            "/dev/full": start(frames, full),
            "closed pipe": start(frames, writer),
            "truncated": start(frames[:100], subprocess.PIPE),
            "width 2e9": start(b"", subprocess.PIPE, argv=args[:8] + ["2e9"] + args[9:]),
            "speech folder": start(b"", subprocess.PIPE, argv=args[:-1] + [str(folder)]),
        }
    os.close(writer)
    results = {}
    for name, (process, stdin) in runs.items():
        out, err = process.communicate(stdin, timeout=300)
        results[name] = (process.returncode, out or b"", err.decode(errors="replace"))

    failures = []

    def expect(name: str, code: int, message: str) -> None:
        rc, out, err = results[name]
        lines = err.strip().splitlines()
        print(f"{name}: exit {rc}: {lines[-1] if lines else ''}")
        if rc != code or message not in err or (code and "frames out" in err) or (code and out):
            failures.append(f"{name}: exit {rc} (expected {code}, '{message}'), {len(out)} bytes out:\n{err}")

    expect("/dev/full", 1, "No space left on device")
    expect("closed pipe", 1, "Broken pipe")
    expect("truncated", 2, f"truncated input: the last frame has 100 of {frame_bytes} bytes")
    expect("width 2e9", 2, "--width '2e9'")
    expect("speech folder", 2, "not a regular file")
    for failure in failures:
        print("FAIL", failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
