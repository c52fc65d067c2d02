#!/usr/bin/env bash
# Everything a lent GPU should measure, in one call of at most 420 s on one H100, ordered by what each step
# teaches; every step has its own time cap and writes its JSON as soon as it has figures, so a kill keeps them.
#
#   OUT=gpu-results bash bench/gpu_suite.sh          # on the device (bare image: torch, triton, onnxruntime, ...)
#   bash bench/gpu_suite.sh --dry-run                # the same steps on a CPU, tiny model (part of `make test`)
#
# Needs only the device image (see bench/device_image/sitecustomize.py, which makes every step's Python refuse the
# packages that image lacks: PyAV, mediapipe, TensorRT, the serving stack, ...). The package is imported from this
# checkout without installing it. Caches (Triton, ONNX) go to a temporary folder, never to $OUT, so at most
# 8 files come back: suite.log, env.txt and six JSON documents named <device>-<step>.json (10 with 2 GPUs).
#
# Correctness on the device needs no golden files: the CPU ties the reference path to the original network
# (check-reference); here every fast path is compared with the reference path on the same device, at the real
# widths, in bf16 (steps 2, 3 and 7). Golden files are checked too when $LIPFORCING_SHARED/golden has them.
#
# Time plan on one H100 (random weights at real shapes; 1.3B: 36 TFLOP per chunk, 14B: 278 TFLOP per chunk,
# `lipforcing info`; Triton compiles ~2-4 s per kernel config, CUDA-graph capture ~0.1 s per (rows, shape)):
#   step                         expected  cap   what dominates
#   1 kernels at real shapes       ~30 s   40 s  6 attention configs + 4 elementwise kernels compiled, do_bench
#                                                 50 ms x ~5 variants x 6 shapes + 16 elementwise timings
#   1b attention backends (tune)   ~12 s   30 s  reference / sdpa / triton x 3 window shapes x 2 models x 11
#                                                 calls of ~1 ms (Triton tuned in step 1); the table is printed
#                                                 into suite.log and used by nothing after (variants name theirs)
#   2+3 triton / sdpa / graphs /   ~50 s   65 s  2-block models at 1.3B and 14B width: 3 chunks x 7 students
#       streams / fp8                             (2 of them fp8), 3 graph shapes each; TAEHV pipeline twice
#   4 session bench 1.3B           ~80 s   95 s  7 variants (+decoder: the same path as +streams without TensorRT)
#                                                 x (warm-up <= 10 s + 10 chunks x ~0.35 s); model build 5 s
#   5 session bench 14B            ~70 s   85 s  28.6 GB built in place (~2 s); 3 variants x (warm-up ~10 s +
#                                                 6 chunks x ~1 s at 278 TFLOP per chunk)
#   6 sessions per GPU (1.3B)      ~50 s   65 s  avatar of 33 frames; 1, 2, 4, 8 sessions: warm-up runs every
#                                                 (rows, shape) the sessions will (<= 45 graphs at 8), 8 chunks each
#   7 quality gate (1.3B)          ~45 s   55 s  reference twice + 5 fast variants, 3 chunks at 480x640
#   total                         ~340 s  435 s  (+ ~5 s of preamble) <= 440 s: room to rerun in 15 minutes
#   8 one stream on 2 GPUs         ~60 s   90 s  only where 2 GPUs are (NCCL refuses two ranks on one GPU; on one
#                                                 it is skipped, costing nothing): a 2-block 14B-wide model at
#                                                 512x512 on the static scheduler (CUDA graphs around NCCL's
#                                                 all-to-alls), sdpa, 2 ranks against one process (x0 error, seconds
#                                                 per chunk), then bench --gpus 2 at 1.3B (+streams: FPS, first frame)
set -uo pipefail
shopt -s nullglob
cd "$(dirname "$0")/.."

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
if [ $# -gt 0 ]; then echo "usage: bash bench/gpu_suite.sh [--dry-run]" >&2; exit 2; fi

PYTHON=${PYTHON:-python3}
OUT=${OUT:-$([ $DRY = 1 ] && mktemp -d || echo gpu-results)}
mkdir -p "$OUT"
LOG="$OUT/suite.log"
: > "$LOG"
pkg=$(mktemp -d)
cache=$(mktemp -d)
trap 'rm -rf "$pkg" "$cache"' EXIT
ln -s "$PWD" "$pkg/lipforcing"
# PYTHONSAFEPATH: the checkout stays off sys.path (its kernels/ would shadow the PyPI `kernels`); the package
# comes from $pkg, and bench/device_image blocks what the device image lacks.
export PYTHONPATH="$PWD/bench/device_image:$pkg" PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1
export LIPFORCING_CACHE="$cache" TRITON_CACHE_DIR="$cache/triton"

if [ $DRY = 1 ]; then
    device=cpu-dryrun
    cap() { echo 300; }  # a 2-core CPU running the tiny model; the device caps are in the plan above
    MODEL_SMALL=(--model tiny --device cpu --frame-size 240x320)
    MODEL_LARGE=("${MODEL_SMALL[@]}")
    CHECK=(--models tiny --size 64)
    CHUNKS_13=1 CHUNKS_14=1 CHUNKS_SESSIONS=1 SESSIONS=1,2 QUALITY_FRAME=240x320 TUNE_MODELS=tiny
    # Each step's command line and JSON are what the dry run checks; every variant costs ~2.5 s here (33 frames
    # through the tiny model's 256x256 crops), so each runs once across steps 4, 5 and 7: the ablation's steps up to
    # +decoder (+kernels and +decoder cost nothing: the same path as reference and +streams here), +sdpa as
    # step 5's one variant, +fp8 in the quality gate (the fast paths' equality with the reference has its own tests)
    VARIANTS_13=(--variants reference,+kernels,+graphs,+streams,+decoder)
    VARIANTS_14=+sdpa
    QUALITY_VARIANTS=reference,+fp8
else
    device=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))") || exit 2
    cap() { echo "$1"; }
    MODEL_SMALL=(--model 1.3b)
    MODEL_LARGE=(--model 14b)
    CHECK=(--models 1.3b,14b --layers 2)
    CHUNKS_13=8 CHUNKS_14=4 CHUNKS_SESSIONS=6 SESSIONS=1,2,4,8 QUALITY_FRAME=480x640 TUNE_MODELS=1.3b,14b
    VARIANTS_13=()  # every variant of the ablation (the default)
    VARIANTS_14=reference,+kernels,+streams
    QUALITY_VARIANTS=reference,+kernels,+graphs,+streams,+sdpa,+fp8
fi

{
    echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown) ($(git status --porcelain 2>/dev/null | wc -l) files changed)"
    echo "command: bash bench/gpu_suite.sh $([ $DRY = 1 ] && echo --dry-run)"
    echo "date $(date -u +%FT%TZ)"
    "$PYTHON" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__)"
    "$PYTHON" -c "import triton; print('triton', triton.__version__)" 2>&1
    command -v nvidia-smi >/dev/null && nvidia-smi
} > "$OUT/env.txt" 2>&1

declare -a SUMMARY=()
FAILED=0
step() {  # step NAME CAP_S COMMAND...: run with a time cap, log everything, remember the exit status
    local name=$1 limit
    limit=$(cap "$2")
    shift 2
    echo "== $name (cap ${limit} s): $*" | tee -a "$LOG"
    local began=$SECONDS
    timeout --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$LOG" | tail -c 600
    local rc=${PIPESTATUS[0]}
    [ $rc -ne 0 ] && FAILED=1
    SUMMARY+=("$(printf '%-34s exit %3d  %4d s' "$name" "$rc" $((SECONDS - began)))")
    echo "== $name: exit $rc in $((SECONDS - began)) s" | tee -a "$LOG"
}
LF=("$PYTHON" -m lipforcing.cli)

step "1 kernels at real shapes" 40 "$PYTHON" -m lipforcing.bench.bench_kernels --rep-ms 50 --no-compile \
    --out "$OUT/$device-kernels.json"
step "1b attention backends measured" 30 "${LF[@]}" kernels --tune --model "$TUNE_MODELS" --repeats 10 --json
step "2+3 triton, graphs, streams" 65 "$PYTHON" -m lipforcing.bench.device_check "${CHECK[@]}" \
    --out "$OUT/$device-device-check.json"
step "4 session bench 1.3B" 95 "${LF[@]}" bench "${MODEL_SMALL[@]}" --chunks "$CHUNKS_13" --quiet \
    ${VARIANTS_13[@]+"${VARIANTS_13[@]}"} \
    --out "$OUT/$device-bench-1.3b.json"
step "5 session bench 14B" 85 "${LF[@]}" bench "${MODEL_LARGE[@]}" --chunks "$CHUNKS_14" --quiet \
    --variants "$VARIANTS_14" --out "$OUT/$device-bench-14b.json"
step "6 sessions per GPU" 65 "${LF[@]}" bench "${MODEL_SMALL[@]}" --avatar --sessions "$SESSIONS" \
    --chunks "$CHUNKS_SESSIONS" --quiet --out "$OUT/$device-sessions-1.3b.json"
step "7 quality gate" 55 "${LF[@]}" bench "${MODEL_SMALL[@]}" --chunks 1 --quality --max-quality-drop 1 \
    --variants "$QUALITY_VARIANTS" --quiet --frame-size "$QUALITY_FRAME" --out "$OUT/$device-quality-1.3b.json"
if [ $DRY = 1 ]; then
    GPUS=2  # gloo processes on the CPU: the step's command line and JSON
    PARALLEL=(--ranks 2 --chunks 2)
else
    GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
    PARALLEL=(--ranks 2 --device cuda --model 14b --layers 2 --latent 64 --chunks 4 --backend sdpa --scheduler static)
fi
if [ "$GPUS" -ge 2 ]; then
    step "8 one stream on 2 GPUs" 60 "$PYTHON" -m lipforcing.bench.parallel_check "${PARALLEL[@]}" \
        --out "$OUT/$device-parallel.json"
    [ $DRY = 0 ] && step "8b bench on 2 GPUs" 30 "${LF[@]}" bench "${MODEL_SMALL[@]}" --gpus 2 --variants +streams \
        --chunks "$CHUNKS_14" --quiet --out "$OUT/$device-bench-2gpus.json"
else
    echo "== 8 one stream on 2 GPUs: skipped ($GPUS GPU here; NCCL needs one GPU per rank)" | tee -a "$LOG"
    SUMMARY+=("$(printf '%-34s skipped: %s GPU' "8 one stream on 2 GPUs" "$GPUS")")
fi
golden=("${LIPFORCING_SHARED:-../shared}"/golden/*.safetensors)
if [ ${#golden[@]} -gt 0 ]; then
    dev=$([ $DRY = 1 ] && echo cpu || echo cuda)
    step "golden files (reference)" 60 "${LF[@]}" check-reference "${golden[@]}" --device "$dev" --backend reference
fi

echo "== summary ($device, results in $OUT)" | tee -a "$LOG"
printf '%s\n' "${SUMMARY[@]}" | tee -a "$LOG"
exit $FAILED
