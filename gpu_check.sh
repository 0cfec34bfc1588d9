#!/usr/bin/env bash
# Every GPU check and benchmark in one call, sized for a lent GPU machine: a 600 s call on a lease of
# 15 minutes that includes the machine's start, and at most 8 files returned, 2 folders deep. So the
# time limits below add up to 420 s (room to rerun), the steps that matter most run first (a run cut
# short keeps them), and it writes at most 5 files, all directly in OUT_DIR:
#   log.txt                        the machine, then every step's output and exit status
#   combined-pairs.json, .png      run_combined.py on the pairs workload (the plot needs matplotlib)
#   combined-rerank.json, .png     run_combined.py on the rerank workload
# Steps on CUDA:
#   1. build    the synthetic twins once: tiny for the tests, full-size (bf16) for the benchmarks;
#   2. preflight         a compiled varlen call, a CUDA-graph replay whose first output survives the second;
#   3. cuda-default      the class's CUDA default (max-autotune, CUDA graphs, packed): inductor must
#                        not skip graphs, and the scores must be eager's;
#   4. combined-pairs    run_combined.py on the full-size twin, with --check-fp32;
#   5. gpu-tests         the rest of tests/test_gpu.py;
#   6. combined-rerank   run_combined.py, rerank workload.
# Without CUDA it is a dry run: it says what it skips and runs the benchmark steps on the tiny twin
# on the CPU, which tests its plumbing. GPU_CHECK_FAKE_CUDA=1 dry-runs the CUDA branch itself: its
# steps and limits, with the tiny twin on the CPU (the GPU tests skip themselves there).
#
#   bash gpu_check.sh OUT_DIR
set -uo pipefail
if [ $# -ne 1 ] || [ -z "$1" ]; then
  echo "usage: bash gpu_check.sh OUT_DIR   (results are written there, step by step)" >&2
  exit 2
fi
out=$1
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)
cd "$(dirname "$0")" || exit 2
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
log=$out/log.txt
status=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, its output appended to log.txt
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit} s)" | tee -a "$log"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$log"
  [ "$rc" -eq 0 ] || status=1
}

fake=${GPU_CHECK_FAKE_CUDA:-}
if [ -n "$fake" ]; then
  cuda=1
else
  cuda=$("$py" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
fi
{
  echo "date_utc: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  if [ -n "$fake" ]; then
    echo "fake CUDA (GPU_CHECK_FAKE_CUDA): the CUDA branch's steps and limits, tiny twin on the CPU"
  elif [ "$cuda" = 1 ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  else
    echo "no CUDA device: dry run"
  fi
  "$py" -m pip list 2>/dev/null | grep -iE "^(torch|transformers|sentence-transformers|tokenizers|triton|flash.attn|hypothesis|matplotlib) "
} > "$log"
cat "$log"

# Optional packages: a missing one costs its own output, never the run.
plot=yes
"$py" -c "import matplotlib" 2>/dev/null || { plot=; echo "matplotlib missing: no plots" | tee -a "$log"; }

tiny=(--model synthetic-tiny --device cpu --quiet --runs 2 --warmup 1)
if [ "$cuda" = 1 ]; then
  # one cache for the twin build and the GPU tests: each twin is built once, in the build step
  export FAST_RERANK_CACHE=${FAST_RERANK_CACHE:-$HOME/.cache/fast-rerank}
  export FAST_RERANK_TEST_CACHE=$FAST_RERANK_CACHE
  tests=(-q -p no:cacheprovider tests/test_gpu.py)
  if [ -n "$fake" ]; then
    twins=(tiny) bench=("${tiny[@]}") pairs=(--num-pairs 16 --check-fp32) rerank=(--num-queries 3 --docs-per-query 8)
  else
    twins=(tiny full) bench=(--model synthetic --compile-mode default --quiet) pairs=(--check-fp32) rerank=(--num-queries 50)
  fi
  step build 60 bash -c 'for size in "${@:2}"; do "$1" models.py build-synthetic "$size" || exit; done' - "$py" "${twins[@]}"
  step preflight 45 "$py" -m pytest -x "${tests[@]}" -k preflight
  step cuda-default 60 "$py" -m pytest "${tests[@]}" -k "cuda_default and bf16"
  limits=(120 60)
else
  echo "dry run: skipping the preflight and the GPU tests (no CUDA); benchmarks on the tiny twin, CPU" | tee -a "$log"
  bench=("${tiny[@]}") pairs=(--num-pairs 16 --check-fp32) rerank=(--num-queries 3 --docs-per-query 8)
  limits=(180 90)  # no lease here; a loaded CI machine gets room
fi
step combined-pairs "${limits[0]}" "$py" run_combined.py "${bench[@]}" "${pairs[@]}" --json "$out/combined-pairs.json" \
  ${plot:+--plot "$out/combined-pairs.png"} --markdown
if [ "$cuda" = 1 ]; then
  step gpu-tests 75 "$py" -m pytest "${tests[@]}" -k "not preflight and not (cuda_default and bf16)"
fi
step combined-rerank "${limits[1]}" "$py" run_combined.py "${bench[@]}" "${rerank[@]}" --workload rerank \
  --json "$out/combined-rerank.json" ${plot:+--plot "$out/combined-rerank.png"} --markdown
echo "results in $out"
exit $status
