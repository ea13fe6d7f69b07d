#!/usr/bin/env bash
# The one command to run on a machine with a GPU (no network needed: every Python dependency beyond torch,
# triton and transformers is optional). Builds the extension against the torch installed here, runs the GPU
# tests, the kernel profile and the benchmarks, and writes bench/results/<gpu>-<date>*.{json,md,log,txt}.
#   bash bench/gpu_check.sh                       # every stage
#   STAGES="build tests profile" bash bench/gpu_check.sh
# Stages: build tests profile kv_cache acceptance lm_head verify_attention e2e, and (not by default, a few
# minutes) tune: bench/tune_gpu.py's sweep of the Triton launch configurations. A stage that needs the
# extension builds it first when it is missing.
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
stages=${STAGES:-"build tests profile kv_cache acceptance lm_head verify_attention e2e"}
gpu=$($python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))") || {
  echo "gpu_check: no CUDA GPU visible to torch"; exit 1; }
stamp="$(date +%Y-%m-%d)"
results="bench/results/${gpu}-${stamp}"
mkdir -p bench/results
log="${results}.log"
touch "$log"
step() { echo "== $*" | tee -a "$log"; }
wants() { [[ " $stages " == *" $1 "* ]]; }
status=0

built() { ls fastvlm_kernels/_C*.so >/dev/null 2>&1; }
if wants build || ! built; then
  step "build ($(date +%T))"
  FASTVLM_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} $python setup.py build_ext --inplace >>"$log" 2>&1 || {
    echo "gpu_check: the extension did not build; see $log" | tee -a "$log"; status=1; }
  $python -m fastvlm_kernels.info 2>&1 | tee -a "$log"
fi

if wants tests; then
  step "GPU tests ($(date +%T))"
  parallel=""
  $python -c "import xdist" 2>/dev/null && parallel="-n 8"
  $python -m pytest -q -m gpu $parallel -p no:cacheprovider tests 2>&1 | tee "${results}-tests.log" | tail -n 40 || status=1
  grep -qE "[0-9]+ (failed|error)" "${results}-tests.log" && status=1
fi

if wants profile; then
  step "kernel profile ($(date +%T))"
  $python bench/profile_gpu.py --json "${results}-profile.json" 2>&1 | tee "${results}-profile.txt" | grep -v "^      " \
    || status=1
  $python bench/profile_gpu.py --host-profile > "${results}-host-profile.txt" 2>&1 || status=1
fi

for op in kv_cache acceptance lm_head verify_attention; do
  if wants "$op"; then
    step "$op benchmark ($(date +%T))"
    $python "bench/$op.py" --device cuda --json "${results}-$op.json" --md "${results}-$op.md" 2>&1 \
      | tee -a "$log" | tail -n 12 || status=1
  fi
done

if wants tune; then
  step "Triton configuration sweep ($(date +%T))"
  $python bench/tune_gpu.py --out "${results}-tune" 2>&1 | tee -a "$log" | grep -v "^{" | tail -n 12 || status=1
fi

if wants e2e; then
  step "end-to-end ($(date +%T))"
  $python bench/e2e.py --device cuda --layers 24 --hidden 1024 --heads 16 --kv-heads 4 --vocab 32000 \
    --exit-layer 6 --draft-lens 0 3 adaptive --max-new-tokens 48 --repeats 3 \
    --json "${results}-e2e.json" --md "${results}-e2e.md" 2>&1 | tee -a "$log" | tail -n 12 || status=1
fi

step "done ($(date +%T)): ${results}*, status $status"
exit $status
