#!/usr/bin/env bash
# The one command to run on a machine with a GPU (no network needed: every Python dependency beyond torch
# and triton is optional). Builds the extension against the torch installed here, runs the GPU tests and
# the benchmarks, and writes bench/results/<gpu>-<date>.{json,md} plus the logs beside them.
#   bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
gpu=$($python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))") || {
  echo "gpu_check: no CUDA GPU visible to torch"; exit 1; }
stamp="$(date +%Y-%m-%d)"
results="bench/results/${gpu}-${stamp}"
mkdir -p bench/results
log="${results}.log"
: > "$log"
step() { echo "== $*" | tee -a "$log"; }
status=0

step "build ($(date +%T))"
build_ok=0
FASTVLM_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} $python setup.py build_ext --inplace >>"$log" 2>&1 && build_ok=1
[ "$build_ok" = 1 ] || { echo "gpu_check: the extension did not build; see $log" | tee -a "$log"; status=1; }
$python -m fastvlm_kernels.info 2>&1 | tee -a "$log"

step "GPU tests ($(date +%T))"
$python -m pytest -q -m "gpu or compile" tests 2>&1 | tee "${results}-tests.log" | tail -n 30 || status=1
grep -qE "(failed|error)" "${results}-tests.log" && status=1

step "benchmarks ($(date +%T))"
$python bench/verify_attention.py --device cuda --json "${results}.json" --md "${results}.md" 2>&1 \
  | tee -a "$log" || status=1

step "kv_cache benchmark ($(date +%T))"
$python bench/kv_cache.py --device cuda --json "${results}-kv_cache.json" --md "${results}-kv_cache.md" 2>&1 \
  | tee -a "$log" || status=1

step "acceptance benchmarks ($(date +%T))"
$python bench/acceptance.py --device cuda --json "${results}-acceptance.json" --md "${results}-acceptance.md" 2>&1 \
  | tee -a "$log" || status=1

step "lm_head benchmark ($(date +%T))"
$python bench/lm_head.py --device cuda --json "${results}-lm_head.json" --md "${results}-lm_head.md" 2>&1 \
  | tee -a "$log" || status=1

step "done ($(date +%T)): ${results}.{json,md,log}, status $status"
exit $status
