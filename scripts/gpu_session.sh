#!/usr/bin/env bash
# The GPU checks of issue 5, run ON the device machine from the repository root, one
# phase per call (a call may land on a fresh machine, so each phase builds first):
#   bash scripts/gpu_session.sh test     # cuda-marked pytest + C++ tests      (~6 min)
#   bash scripts/gpu_session.sh kernels  # bench kernels + C++ CUDA benches     (~4 min)
#   bash scripts/gpu_session.sh e2e      # latency + 1000x256/256 throughput, Llama-3-8B shape, bf16
#   bash scripts/gpu_session.sh mixed    # mixed lengths vs transformers static + continuous batching
# Prepare .gpu/ here first (scripts/gpu_prepare.sh) and carry it. Logs and JSON go to $OUT.
set -uo pipefail
phase=${1:?usage: gpu_session.sh test|kernels|e2e|mixed}
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if compgen -G ".gpu/whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
git rev-parse --short HEAD 2>/dev/null | tee -a "$OUT/gpu.txt"
# sm_90 only: the H100/H200 this runs on; halves the build.
$PY -m pip install -q --no-build-isolation --no-deps -C cmake.define.FASTLLM_CUDA_ARCHS=90 . \
  >"$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
cd /tmp  # import the installed package, not the source tree

case "$phase" in
  test)
    [ -x "$OLDPWD/.gpu/bin/fastllm_tests" ] && "$OLDPWD/.gpu/bin/fastllm_tests" 2>&1 | tail -30 | tee "$OUT/ctest.log"
    $PY -m pytest -q -ra -m cuda --timeout 300 -p no:cacheprovider "$OLDPWD/tests" 2>&1 | tee "$OUT/pytest-cuda.log" | tail -60
    ;;
  kernels)
    $PY -m fastllm.bench kernels --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log"
    [ -x "$OLDPWD/.gpu/bin/bench_cuda_kernels" ] && "$OLDPWD/.gpu/bin/bench_cuda_kernels" \
      --benchmark_min_time=0.2s 2>&1 | tee "$OUT/bench_cuda_kernels.log"
    ;;
  e2e)
    $PY -m fastllm.bench latency --random-weights --config llama3-8b --input-len 512 --output-len 128 \
      --num-requests 10 --concurrency 32 --json "$OUT/latency.json" 2>&1 | tail -30 | tee "$OUT/latency.log"
    $PY -m fastllm.bench throughput --random-weights --config llama3-8b --num-prompts 1000 --input-len 256 \
      --output-len 256 --hf-modes static --hf-batch-size 256 --json "$OUT/throughput-1000x256.json" 2>&1 \
      | tail -30 | tee "$OUT/throughput.log"
    ;;
  mixed)
    $PY -m fastllm.bench throughput --random-weights --config llama3-8b --num-prompts 300 --random-lengths \
      --input-range 32,1024 --output-range 32,512 --seed 0 --hf-modes static,continuous --hf-batch-size 64 \
      --json "$OUT/throughput-mixed.json" 2>&1 | tail -30 | tee "$OUT/throughput-mixed.log"
    ;;
  *) echo "unknown phase $phase"; exit 2 ;;
esac
