#!/usr/bin/env bash
# Everything that needs a GPU, in one call: GPU tests, golden parity on CUDA (reference and Triton),
# kernel benchmarks and engine benchmarks for 1.3B and 14B. Results go under $OUT (default gpu-results/).
#
#   LIPFORCING_SHARED=path/to/shared OUT=gpu-results bash bench/gpu_suite.sh
#
# It uses the machine's python3 (PyTorch + Triton preinstalled) and imports the package from this
# checkout without installing it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
pkg=$(mktemp -d)
ln -s "$PWD" "$pkg/lipforcing"
export PYTHONPATH="$pkg${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
echo "commit $commit" | tee "$OUT/commit.txt"
nvidia-smi | tee "$OUT/nvidia-smi.txt"

step() { echo "== $*"; "$@" 2>&1 | tee -a "$OUT/suite.log"; }

step python3 -m pytest -q -p no:cacheprovider tests/test_kernels_attention.py tests/test_kernels_elementwise.py \
    tests/test_scheduler.py tests/test_golden.py tests/test_model.py
golden=("${LIPFORCING_SHARED:-../shared}"/golden/*.safetensors)
step python3 -m lipforcing.engine.cli check-reference "${golden[@]}" --device cuda --backend reference
step python3 -m lipforcing.engine.cli check-reference "${golden[@]}" --device cuda --backend triton
step python3 -m lipforcing.bench.bench_kernels --out "$OUT/kernels.json"
step python3 -m lipforcing.engine.cli bench --model 1.3b --chunks 20 --quiet --out "$OUT/bench-1.3b.json"
step python3 -m lipforcing.engine.cli bench --model 14b --chunks 8 --quiet --out "$OUT/bench-14b.json"
