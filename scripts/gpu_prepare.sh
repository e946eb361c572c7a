#!/usr/bin/env bash
# Run HERE (x86-64, nvcc, no GPU) before a device session: builds what the GPU machine
# cannot (it has no GoogleTest / Google Benchmark / package registry) into .gpu/
# (git-ignored), to be named in the device run's `carry`:
#   .gpu/bin/fastllm_tests, .gpu/bin/bench_cuda_kernels   (sm_90, static cudart)
#   .gpu/whl/*.whl                                         (gguf, nvtx for Python 3.12)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
cmake -S . -B build/gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DFASTLLM_CUDA=ON -DFASTLLM_CUDA_ARCHS=90 \
  -DFASTLLM_BUILD_TESTS=ON -DFASTLLM_BUILD_BENCH=ON -DFASTLLM_BUILD_MODULE=OFF >/dev/null
cmake --build build/gpu -j "$(nproc)" --target fastllm_tests bench_cuda_kernels
rm -rf .gpu && mkdir -p .gpu/bin .gpu/whl
cp build/gpu/fastllm_tests build/gpu/bench_cuda_kernels .gpu/bin/
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu/whl gguf nvtx
du -sh .gpu
