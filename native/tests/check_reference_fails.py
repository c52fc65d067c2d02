"""lf_check_reference can fail (ctest case student_check_fails): on a golden file whose expected output is moved
it exits 1 and prints FAIL; on a file that cannot be read, that is not a golden file or that belongs to other
packages it exits 2 with exactly one line on stderr (no libtorch stack).

    check_reference_fails.py LF_CHECK_REFERENCE AOT_DIR GOLDEN [OTHER_GOLDEN]"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file


def perturbed(golden: Path, out: Path) -> Path:
    """The golden file with outputs/x0 moved by 1e-3 of its norm: well past the 1e-4 bound."""
    with safe_open(str(golden), "np") as f:
        metadata = f.metadata()
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    x0 = tensors["outputs/x0"]
    noise = np.random.default_rng(5).standard_normal(x0.shape).astype(np.float32)
    tensors["outputs/x0"] = x0 + 1e-3 * np.linalg.norm(x0) / np.linalg.norm(noise) * noise
    save_file(tensors, str(out), metadata=metadata)
    return out


def main(checker: str, aot: str, golden: str, other: str | None = None) -> int:
    failures = []
    with tempfile.TemporaryDirectory(prefix="check_fails_") as folder:
        folder = Path(folder)
        garbage = folder / "garbage.safetensors"
        garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
        cases = [("perturbed", perturbed(Path(golden), folder / "perturbed.safetensors"), 1),
                 ("missing", folder / "missing.safetensors", 2), ("garbage", garbage, 2)]
        if other:
            cases.append(("other packages' golden file", Path(other), 2))
        for name, path, code in cases:
            done = subprocess.run([checker, aot, str(path)], capture_output=True, text=True, timeout=300)
            lines = done.stderr.strip().splitlines()
            print(f"{name}: exit {done.returncode}: {(lines or done.stdout.strip().splitlines() or [''])[-1]}")
            if done.returncode != code:
                failures.append(f"{name}: exit {done.returncode}, expected {code}\n{done.stdout}{done.stderr}")
            elif code == 1 and "FAIL" not in done.stdout:
                failures.append(f"{name}: no FAIL in\n{done.stdout}")
            elif code == 2 and (len(lines) != 1 or str(path) not in lines[0]):
                failures.append(f"{name}: {len(lines)} lines on stderr, expected one naming the file:\n{done.stderr}")
    for failure in failures:
        print("FAIL", failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
