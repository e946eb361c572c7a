#!/usr/bin/env bash
# Run HERE (x86-64 with nvcc, GoogleTest and PyPI; no GPU needed) before a device call of
# scripts/gpu_check.sh: builds and fetches what the GPU machine cannot (it has no
# GoogleTest and no package registry) into .gpu/ (git-ignored; name it in the call's `carry`):
#   .gpu/bin/fastllm_tests   the GoogleTest binary, CUDA tests included, sm_90, static cudart
#   .gpu/whl/*.whl           what the GPU image lacks of pyproject's dependencies, for its
#                            CPython 3.12 (scripts/gpu_deps.py; today gguf and nvtx)
#   .gpu/commit              the commit (+ -dirty) it was built at: the tree travels without .git
#   .gpu/source_hash         gpu_check.sh --source-hash of the C++/CUDA sources it was built from
# Needs cmake, ninja, nvcc, libgtest-dev and a Python >= 3.11 with pip (PYTHON, default
# .venv/bin/python or python3); scripts/setup.sh installs the Debian ones. About 9 MB
# (the test binary 5.7 MB, the nvtx wheel 3 MB); the carry limit is 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
for tool in cmake ninja nvcc; do
  command -v "$tool" >/dev/null || { echo "gpu_prepare.sh: $tool not found (scripts/setup.sh installs cmake and ninja)" >&2; exit 1; }
done

cmake -S . -B build/gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DFASTLLM_CUDA=ON -DFASTLLM_CUDA_ARCHS=90 \
  -DFASTLLM_BUILD_TESTS=ON -DFASTLLM_BUILD_BENCH=OFF -DFASTLLM_BUILD_MODULE=OFF >/dev/null
cmake --build build/gpu -j "$(nproc)" --target fastllm_tests
rm -rf .gpu && mkdir -p .gpu/bin .gpu/whl
cp build/gpu/fastllm_tests .gpu/bin/
# Every dependency of pyproject.toml (and theirs) that the GPU image lacks, for its
# CPython 3.12 (today gguf and nvtx: their own needs are all in the image).
"$PY" scripts/gpu_deps.py download .gpu/whl
commit=$(git rev-parse HEAD)
git diff --quiet HEAD -- || commit="$commit-dirty"
echo "$commit" >.gpu/commit
bash scripts/gpu_check.sh --source-hash >.gpu/source_hash
ls -l .gpu/bin .gpu/whl
echo "prepared .gpu/ at $commit: $(du -sh .gpu | cut -f1)"
