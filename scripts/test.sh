#!/usr/bin/env bash
# The whole test suite on a fresh machine: set-up, C++ tests (CTest), Python tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

# C++: GoogleTest binaries (+ bench binaries, built not run), CUDA sources too when nvcc is present.
cmake -S . -B build/cpp -G Ninja -DCMAKE_BUILD_TYPE=Release -DFASTLLM_BUILD_TESTS=ON -DFASTLLM_BUILD_BENCH=ON \
  -DFASTLLM_BUILD_MODULE=OFF
cmake --build build/cpp -j "$(nproc)"
ctest --test-dir build/cpp --output-on-failure

# Python: against the installed package (with its compiled fastllm._C).
.venv/bin/python -m pytest -q -ra tests "$@"
