#!/usr/bin/env bash
# Everything the GPU must show, in ONE bounded device call: one sm_90 build, then each
# phase under its own `timeout`, a failure in one never stopping the next, every phase's
# status and duration logged, and one JSON summary of every figure.
#
#   bash scripts/gpu_check.sh                          # on the GPU machine, repository root
#   bash scripts/gpu_check.sh --phases cpptest,pytest  # rerun some phases (the build is implied)
#   bash scripts/gpu_check.sh --dry-run                # a CPU machine: GPU parts skipped, the rest real
#
# Before the device call, here: `bash scripts/gpu_prepare.sh` (fills .gpu/: the C++ test
# binary for sm_90 and the wheels the GPU machine lacks), then carry `.gpu`. The exact
# device call is in bench/RESULTS.md ("Awaiting a GPU").
#
# Options:
#   --phases LIST   comma-separated subset of the phases below (default: all)
#   --no-build      use the fastllm already installed (a rerun on the same warm machine)
#   --budget P=S    phase P's budget in seconds (repeatable; P=total for the whole run)
#   --dry-run       no GPU: the build step only checks the installed fastllm._C, the C++
#                   tests run on the CPU (their CUDA cases skip themselves), pytest -m cuda
#                   collects and skips, and each bench runs at a tiny size on the CPU so its
#                   JSON and the summary are real; budgets 3x (a CPU may be shared). CI runs
#                   this (tests/scripts/test_gpu_check.py).
# Environment: OUT (default build/gpu-check), PYTHON (default python3), FASTLLM_TESTS_BIN.
# Output in $OUT, at most 8 files of at most 16 MiB (the device tool's limits):
#   gpu_check.log  everything the phases printed, with a header per phase and its status
#   summary.json   commit, GPU, torch, each phase's status/duration/limit, every figure
#                  the phases produced, and each target of issue 10 beside its value
#   build.log      the full pip/CMake/nvcc output of the build
# Exit status: 0 when every selected phase passed, 1 when one did not, 2 for bad arguments.
set -uo pipefail
cd "$(dirname "$0")/.."

# -- budgets (seconds) -----------------------------------------------------------------------
# Each is a cap, not a forecast: a phase gets min(its budget, what is left of TOTAL); with
# under MIN_START_S left of TOTAL, a phase is skipped, not started. Typical H200 times in brackets
# are estimates until the first run replaces them.
PHASES=(build cpptest pytest kernels latency throughput mixed)
declare -A BUDGET=(
  [build]=90        # pip install, sm_90 only, all cores                        [~30 s]
  [cpptest]=30      # .gpu/bin/fastllm_tests (GoogleTest, CUDA kernels vs CPU)  [~5 s]
  [pytest]=150      # pytest -m cuda, 90 s per test, no -x                      [~90 s]
  [kernels]=45      # bench kernels --quick                                     [~30 s]
  [latency]=50      # Llama-3-8B shape, bf16, batch 1 (+ 32 in flight)          [~35 s]
  [throughput]=170  # 1000 x 256/256 vs transformers static, one batch of 256   [~90 s]
  [mixed]=150       # mixed lengths vs transformers continuous: what time is left
)
TOTAL_BUDGET=450    # the whole run, set-up included (+ <= 60 s summary): 7.5 min, so that a rerun fits the 15-min lease
MIN_START_S=20
PYTEST_PER_TEST_S=90
MIXED_HF_SHARE_S=70 # of the mixed phase's limit, kept for fastllm's own run and the JSON

# What gpu_prepare.sh built .gpu/bin from (it stores this), compared with the tree that
# travelled (which has no .git): the sources of the C++ test binary.
source_hash() { find cpp cuda tests/cpp CMakeLists.txt -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16; }

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; }
die_usage() { echo "gpu_check.sh: $*" >&2; echo "phases: ${PHASES[*]}" >&2; exit 2; }

DRY_RUN=0 NO_BUILD=0 SELECTED="" BUDGET_ARGS=()
while (($#)); do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --source-hash) source_hash; exit 0 ;;   # for gpu_prepare.sh
    --no-build) NO_BUILD=1 ;;
    --phases) [ $# -ge 2 ] || die_usage "--phases needs a list"; SELECTED=$2; shift ;;
    --phases=*) SELECTED=${1#--phases=} ;;
    --budget) [ $# -ge 2 ] || die_usage "--budget needs PHASE=SECONDS"; BUDGET_ARGS+=("$2"); shift ;;
    --budget=*) BUDGET_ARGS+=("${1#--budget=}") ;;
    -h|--help) usage; exit 0 ;;
    *) die_usage "unknown argument '$1'" ;;
  esac
  shift
done

# A dry run's CPU is no GPU and may be shared: its budgets are 3x (not those given with --budget), so that the plumbing,
# not the machine's load, decides whether it passes.
if ((DRY_RUN)); then
  for p in "${PHASES[@]}"; do BUDGET[$p]=$((3 * BUDGET[$p])); done
  TOTAL_BUDGET=$((3 * TOTAL_BUDGET))
fi

is_phase() { local p; for p in "${PHASES[@]}"; do [ "$p" = "$1" ] && return 0; done; return 1; }
for spec in "${BUDGET_ARGS[@]+"${BUDGET_ARGS[@]}"}"; do
  name=${spec%%=*} secs=${spec#*=}
  [[ $spec == *=* && $secs =~ ^[0-9]+$ && $secs -gt 0 ]] || die_usage "--budget '$spec': expected PHASE=SECONDS"
  if [ "$name" = total ]; then TOTAL_BUDGET=$secs
  elif is_phase "$name"; then BUDGET[$name]=$secs
  else die_usage "--budget '$spec': unknown phase '$name'"; fi
done
declare -A WANT=()
if [ -z "$SELECTED" ]; then
  for p in "${PHASES[@]}"; do WANT[$p]=1; done
else
  IFS=, read -ra picked <<<"$SELECTED"
  ((${#picked[@]})) || die_usage "--phases: empty list"
  for p in "${picked[@]}"; do is_phase "$p" || die_usage "--phases: unknown phase '$p'"; WANT[$p]=1; done
fi
# Every Python phase runs the installed package: the build comes with them.
for p in pytest kernels latency throughput mixed; do
  [ -n "${WANT[$p]:-}" ] && [ "$NO_BUILD" = 0 ] && WANT[build]=1
done
((NO_BUILD)) && unset 'WANT[build]'

# -- set-up ----------------------------------------------------------------------------------
START=$(date +%s)
DEADLINE=$((START + TOTAL_BUDGET))
OUT=${OUT:-$PWD/build/gpu-check}
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
LOG=$OUT/gpu_check.log
: >"$LOG"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if ((DRY_RUN)); then DEVICE=cpu; else DEVICE=cuda; fi

log() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
# phases.tsv: name, status, rc, duration_s, limit_s, reason (read by scripts/gpu_summary.py)
record() { printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$WORK/phases.tsv"; log "--- $1: $2 (rc $3, $4 s of $5 s)${6:+: $6}"; }
skip() { record "$1" skipped - 0 0 "$2"; }

# run_phase NAME CMD...: CMD under `timeout`, limited to min(budget, time left); its output
# goes to the log (and to $PHASE_OUTPUT instead, when set). rc 124/137 = killed at the limit.
run_phase() {
  local name=$1; shift
  local left=$((DEADLINE - $(date +%s))) limit=${BUDGET[$name]}
  if ((left < MIN_START_S)); then skip "$name" "out of time: ${left}s of the ${TOTAL_BUDGET}s left"; return 1; fi
  ((left < limit)) && limit=$left
  log "=== $name (limit ${limit}s): $*"
  local t0 rc status
  t0=$(now)
  if [ -n "${PHASE_OUTPUT:-}" ]; then
    timeout -k 10 "$limit" "$@" >"$PHASE_OUTPUT" 2>&1; rc=$?
  else
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG" "$WORK/$name.log"; rc=${PIPESTATUS[0]}
  fi
  case $rc in 0) status=ok ;; 124|137) status=timeout ;; *) status=failed ;; esac
  record "$name" "$status" "$rc" "$(since "$t0")" "$limit" ""
  [ "$rc" = 0 ]
}

log "fastllm gpu_check: $( ((DRY_RUN)) && echo 'DRY RUN (CPU, GPU parts skipped)' || echo 'GPU run')," \
    "phases: $(for p in "${PHASES[@]}"; do [ -n "${WANT[$p]:-}" ] && printf '%s ' "$p"; done)" \
    "total budget ${TOTAL_BUDGET}s; out $OUT"
COMMIT=unknown COMMIT_FROM=none
if git rev-parse --git-dir >/dev/null 2>&1; then
  COMMIT=$(git rev-parse HEAD) COMMIT_FROM=git
  git diff --quiet HEAD -- 2>/dev/null || COMMIT="$COMMIT-dirty"
elif [ -f .gpu/commit ]; then
  COMMIT=$(cat .gpu/commit) COMMIT_FROM=.gpu/commit   # the tree travels without .git
fi
SOURCE_HASH=$(source_hash)
PREPARED_HASH=$(cat .gpu/source_hash 2>/dev/null || echo none)
log "commit $COMMIT (from $COMMIT_FROM); C++/CUDA source $SOURCE_HASH, .gpu prepared from $PREPARED_HASH"
[ -d .gpu ] && [ "$PREPARED_HASH" != "$SOURCE_HASH" ] &&
  log "WARNING: .gpu/ was prepared from other C++/CUDA sources: rerun scripts/gpu_prepare.sh"

if compgen -G ".gpu/whl/*.whl" >/dev/null; then   # what the GPU image lacks (gpu_deps.py)
  # A dry run installs them too, for the GPU machine's CPython 3.12, and does not use them.
  for_gpu=()
  ((DRY_RUN)) && for_gpu=(--python-version 3.12 --implementation cp --only-binary=:all:
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
  if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
      "${for_gpu[@]+"${for_gpu[@]}"}" --target "$WORK/site" .gpu/whl/*.whl >>"$LOG" 2>&1; then
    log "wheels installed into $WORK/site: $(cd .gpu/whl && echo *.whl)"
    ((DRY_RUN)) || export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    log "WARNING: the wheels in .gpu/whl did not install"
  fi
else
  log "no .gpu/whl: gguf and nvtx must already be installed"
fi
if ((!DRY_RUN)); then
  export PIP_NO_INDEX=1            # no registry there: fail at once rather than retry
  command -v nvcc >/dev/null || export PATH="$PATH:/usr/local/cuda/bin"
  timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader,nounits \
    >"$WORK/gpu.csv" 2>>"$LOG" || log "WARNING: nvidia-smi failed"
  { timeout 30 nvidia-smi 2>&1; nvcc --version 2>&1 | tail -2; } >>"$LOG"
fi
timeout 60 $PY scripts/gpu_summary.py --probe-env >"$WORK/env.json" 2>>"$LOG" || log "WARNING: environment probe failed"
cat "$WORK/env.json" >>"$LOG"
grep -q '"requirements_not_installed": \[\]' "$WORK/env.json" ||
  log "WARNING: some of pyproject's requirements are not installed (env.json above): tests that import them fail"
GPU_OK=1
if ((!DRY_RUN)) && ! grep -q '"cuda_available": true' "$WORK/env.json"; then
  GPU_OK=0; log "ERROR: torch sees no CUDA GPU: the GPU phases are skipped"
fi

# -- phases ------------------------------------------------------------------------------------
BUILD_OK=1
# Import the extension Python will use (from outside the tree: the installed one) and say
# what it was built with; on a GPU run it must hold CUDA kernels for sm_90 that can run.
EXT_INFO='import json, fastllm._C as C; print(json.dumps(dict(C.build_info(), cuda_available=bool(C.cuda_available()))))'
EXT_GPU_READY='import fastllm._C as C; i = C.build_info(); assert i["cuda"] and "90" in i["cuda_archs"].split(",") and C.cuda_available(), f"not a usable sm_90 CUDA build: {i}, cuda_available={C.cuda_available()}"'
if [ -n "${WANT[build]:-}" ] && ((!GPU_OK)); then
  BUILD_OK=0; skip build "no CUDA GPU visible to torch"
elif [ -n "${WANT[build]:-}" ]; then
  if ((DRY_RUN)); then        # no build on the CPU: check the installed extension instead
    run_phase build bash -c 'cd "$1" && "$0" -c "$2"' "$PY" "$WORK" "$EXT_INFO" || BUILD_OK=0
  else
    # sm_90 only (H100/H200), FASTLLM_CUDA=ON so a missing nvcc fails instead of building CPU-only.
    PHASE_OUTPUT=$OUT/build.log FASTLLM_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) run_phase build \
      bash -c '"$0" -m pip install -v --no-build-isolation --no-deps -C cmake.define.FASTLLM_CUDA_ARCHS=90 . &&
               cd "$1" && "$0" -c "$2"' "$PY" "$WORK" "$EXT_GPU_READY" ||
      { BUILD_OK=0; tail -40 "$OUT/build.log" | tee -a "$LOG"; }
  fi
fi
(cd "$WORK" && timeout 60 $PY -c "$EXT_INFO") >"$WORK/build_info.json" 2>>"$LOG" ||
  { BUILD_OK=0; log "ERROR: fastllm._C does not import"; }
cat "$WORK/build_info.json" >>"$LOG" 2>/dev/null

needs() {   # needs PHASE: 0 when PHASE can start, else records why it cannot
  if [ -z "${WANT[$1]:-}" ]; then return 1; fi
  if ((!GPU_OK)); then skip "$1" "no CUDA GPU visible to torch"; return 1; fi
  if [ "$1" != cpptest ] && ((!BUILD_OK)); then skip "$1" "no usable fastllm._C (see the build)"; return 1; fi
  return 0
}

if needs cpptest; then
  bin=${FASTLLM_TESTS_BIN:-.gpu/bin/fastllm_tests}
  ((DRY_RUN)) && [ ! -x "$bin" ] && bin=build/cpp/fastllm_tests   # what scripts/test.sh builds
  [ -f "$bin" ] && [ ! -x "$bin" ] && chmod +x "$bin"   # in case the copy lost the mode
  if [ -x "$bin" ]; then
    run_phase cpptest "$bin" --gtest_output="json:$WORK/cpptest.json"
  else
    skip cpptest "no C++ test binary at $bin (run scripts/gpu_prepare.sh)"
  fi
fi

if needs pytest; then
  timeout_flag=()
  $PY -c "import pytest_timeout" 2>/dev/null && timeout_flag=(--timeout "$PYTEST_PER_TEST_S")
  # A test module that fails to import (a package the image lacks) must not stop the rest.
  run_phase pytest $PY -m pytest -m cuda -v -rfE -p no:cacheprovider --continue-on-collection-errors "${timeout_flag[@]+"${timeout_flag[@]}"}" \
    --junitxml="$WORK/pytest.xml" tests
fi

bench=($PY -m fastllm.bench)   # an array: `timeout` runs programs, not shell functions
if ((DRY_RUN)); then    # tiny CPU sizes: the same flags and JSON, seconds each
  MODEL=(--device cpu --random-weights tiny)
  LATENCY=(--input-len 8 --output-len 4 --num-requests 2 --concurrency 2 --num-load-requests 2)
  THROUGHPUT=(--num-prompts 8 --input-len 8 --output-len 4 --hf-modes static --hf-batch-size 4 --hf-num-prompts 4)
  # transformers' continuous batching takes 20-100 s to set up and wind down on a CPU:
  # static stands in (--hf-timeout is still passed, and ignored by static batching).
  MIXED=(--num-prompts 6 --random-lengths --input-range 4,16 --output-range 2,8 --hf-modes static --hf-batch-size 6)
else
  MODEL=(--device cuda --dtype bfloat16 --random-weights llama3-8b)
  LATENCY=(--input-len 512 --output-len 128 --num-requests 5 --concurrency 32 --num-load-requests 64)
  THROUGHPUT=(--num-prompts 1000 --input-len 256 --output-len 256 --hf-modes static --hf-batch-size 256 --hf-num-prompts 256)
  MIXED=(--num-prompts 300 --random-lengths --input-range 32,1024 --output-range 32,512 --seed 0 --hf-modes continuous)
fi
needs kernels && run_phase kernels "${bench[@]}" kernels --device "$DEVICE" --quick --json "$WORK/kernels.json"
needs latency && run_phase latency "${bench[@]}" latency "${MODEL[@]}" "${LATENCY[@]}" --json "$WORK/latency.json"
needs throughput && run_phase throughput "${bench[@]}" throughput "${MODEL[@]}" "${THROUGHPUT[@]}" --json "$WORK/throughput.json"
if needs mixed; then
  left=$((DEADLINE - $(date +%s))); limit=$((left < BUDGET[mixed] ? left : BUDGET[mixed]))
  hf_timeout=$((limit - MIXED_HF_SHARE_S))   # transformers gives up in time for the JSON
  if ((hf_timeout < MIN_START_S)); then skip mixed "out of time: ${left}s left"
  else run_phase mixed "${bench[@]}" throughput "${MODEL[@]}" "${MIXED[@]}" --hf-timeout "$hf_timeout" --json "$WORK/mixed.json"
  fi
fi

# -- summary -----------------------------------------------------------------------------------
for p in "${PHASES[@]}"; do [ -n "${WANT[$p]:-}" ] || record "$p" not_selected - 0 0 ""; done
budgets=$(for p in "${PHASES[@]}"; do printf '%s=%s,' "$p" "${BUDGET[$p]}"; done)
timeout 60 $PY scripts/gpu_summary.py --work "$WORK" --out "$OUT/summary.json" --commit "$COMMIT" \
  --commit-from "$COMMIT_FROM" --source-hash "$SOURCE_HASH" --prepared-hash "$PREPARED_HASH" \
  --started "$START" --total-budget "$TOTAL_BUDGET" --budgets "${budgets%,}" \
  $( ((DRY_RUN)) && echo --dry-run ) 2>&1 | tee -a "$LOG"
summary_rc=${PIPESTATUS[0]}

# The device tool brings back at most 8 files of 16 MiB: keep each log's end.
for f in "$OUT"/*; do
  [ -f "$f" ] && [ "$(stat -c %s "$f")" -gt $((16 << 20)) ] && { tail -c $((15 << 20)) "$f" >"$f.tail" && mv "$f.tail" "$f"; }
done
n=$(find "$OUT" -type f | wc -l)
((n > 8)) && log "WARNING: $n files in $OUT; the device tool brings back 8"
log "done in $(( $(date +%s) - START ))s"
exit $((summary_rc == 0 ? 0 : 1))   # the summary exits 1 when a selected phase did not pass
