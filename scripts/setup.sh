#!/usr/bin/env bash
# Set-up on a fresh machine (idempotent): a venv in .venv, torch, fastllm with its
# test dependencies, and the Debian packages the C++ tests and benches build against.
#   TORCH_SPEC   what to install when the venv has no torch (default torch==2.13.0, the
#                CPU wheel on this project's CI disk; on a GPU box pass your CUDA build)
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v apt-get >/dev/null && ! dpkg -s libgtest-dev libbenchmark-dev cmake ninja-build >/dev/null 2>&1; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends libgtest-dev libbenchmark-dev cmake ninja-build
fi
# Headless Chromium and its WebDriver: the chat page's browser test (tests/serve/test_chat_page.py).
if command -v apt-get >/dev/null && ! dpkg -s chromium chromium-driver >/dev/null 2>&1; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver
fi

[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
PY=.venv/bin/python
$PY -m pip install -q --upgrade pip
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
$PY -m pip install -q ".[test]"
$PY -c "import fastllm._C as C; print('fastllm installed; CUDA kernels built:', C.build_info()['cuda'], '| GPU usable:', C.cuda_available())"
