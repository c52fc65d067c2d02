#!/usr/bin/env bash
# Everything that needs a GPU, in one call: the GPU tests (Triton kernels in bf16 at real shapes, CUDA graphs,
# the three-stream pipeline against the sequential path, the fast session against the reference session),
# golden parity on CUDA (reference and Triton), the memory plan against what the engine allocates, kernel
# benchmarks, the session benchmark with its ablation for 1.3B and 14B, sessions per GPU and the quality gate.
# Results go under $OUT (default gpu-results/) and, for the session benchmarks, bench/results/<device>-<model>.json.
#
#   LIPFORCING_SHARED=path/to/shared OUT=gpu-results bash bench/gpu_suite.sh
#
# It uses the machine's python3 (PyTorch + Triton preinstalled) and imports the package from this checkout
# without installing it. Each step's failure is logged and the suite goes on, so one call reports everything.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT" bench/results
pkg=$(mktemp -d)
ln -s "$PWD" "$pkg/lipforcing"
# PYTHONSAFEPATH: the checkout itself stays off sys.path (its kernels/ would shadow the PyPI `kernels` that
# transformers imports); the package comes from $pkg
export PYTHONPATH="$pkg${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1
export LIPFORCING_CACHE=${LIPFORCING_CACHE:-$OUT/cache}
commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
echo "commit $commit" | tee "$OUT/commit.txt"
nvidia-smi | tee "$OUT/nvidia-smi.txt"
device=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")

step() { echo "== $*" | tee -a "$OUT/suite.log"; "$@" 2>&1 | tee -a "$OUT/suite.log"; }

step python3 -m pytest -q -p no:cacheprovider -k "cuda or gpu or graph" tests/kernels tests/runtime tests/tools \
    tests/training/test_attention.py \
    tests/media/test_face.py
step python3 -m pytest -q -p no:cacheprovider tests/runtime tests/app/test_session.py tests/tools/test_golden.py
golden=("${LIPFORCING_SHARED:-../shared}"/golden/*.safetensors "${LIPFORCING_SHARED:-../shared}"/golden/train/*.safetensors)
step python3 -m lipforcing.cli check-reference "${golden[@]}" --device cuda --backend reference
step python3 -m lipforcing.cli check-reference "${golden[@]}" --device cuda --backend triton
step python3 -m lipforcing.cli info --model 14b --memory --json
step python3 -m lipforcing.bench.bench_kernels --out "$OUT/kernels.json"
for model in 1.3b 14b; do
    chunks=$([ "$model" = 14b ] && echo 8 || echo 20)
    step python3 -m lipforcing.cli bench --model "$model" --chunks "$chunks" --quiet \
        --out "bench/results/$device-$model.json"
    cp "bench/results/$device-$model.json" "$OUT/" 2>/dev/null
done
# sessions at once on one GPU (prepared avatars, random weights at 1.3B shapes): FPS per session, for the
# sessions-per-GPU figure at 25 FPS each
step python3 -m lipforcing.cli bench --model 1.3b --avatar --sessions 1,2,4,8 --chunks 12 --quiet \
    --out "$OUT/$device-1.3b-sessions.json"
# every fast path's frames against the reference path's on the GPU (bf16 kernels, graphs, streams, TensorRT or
# onnxruntime): the quality gate users run in CI
step python3 -m lipforcing.cli bench --model 1.3b --chunks 4 --quality --max-quality-drop 1 --quiet \
    --out "$OUT/$device-1.3b-quality.json"
