#!/usr/bin/env bash
# Every GPU check and benchmark in one call, sized for a lent GPU machine: a 600 s call on a lease of
# 15 minutes that includes the machine's start and one rerun, and at most 8 files returned, 2 folders
# deep. So the time limits below add up to 420 s, the steps that matter most run first (a run cut short
# keeps them), and it writes at most 3 files (5 in a dry run), all directly in OUT_DIR:
#   log.txt                        the machine, then every step's output and exit status
#   combined-pairs.json, .png      run_combined.py on the pairs workload (the plot needs matplotlib)
#   combined-rerank.json, .png     the rerank workload, in a dry run only
# Steps on CUDA, most important first:
#   1. build-tiny      the tiny twin, the tests' model;
#   2. preflight       a compiled varlen call, a CUDA-graph replay whose first output survives the second;
#   3. cuda-default    the class's CUDA defaults (device_policy.device_defaults("cuda"): max-autotune, CUDA
#                      graphs), bf16, the padded default (x16 buckets) then the packed path: every batch of
#                      a warmed call replays a graph (a profiler sees the launches), none is recorded or
#                      skipped, and the scores are eager's;
#   4. build-full      the full-size twin (bf16) the benchmark runs;
#   5. combined-pairs  run_combined.py on it, with --check-fp32;
#   6. gpu-tests       the rest of tests/test_gpu.py, the checks without compiles first.
# The rerank workload (run_combined.py --workload rerank) does not fit in the 420 s: run it on a lease
# of its own.
#
# Limits: the time each step was measured to take on a 2-core CPU (fresh inductor cache: the cost a
# fresh GPU machine pays), scaled by the H200's compile times of the full-size model (40 s for the
# x16-bucket graph in default mode, 71-121 s max-autotune). Measured here (fp32, compile + warm-up):
#   model, path                        default   max-autotune   graphs
#   tiny twin, padded (256 wide)        50 s      148 s          1
#   tiny twin, packed (1024 tokens)     69 s      239 s          2
#   full-size twin, padded / packed     83 / 261 s   209 s / -   1 / 2
#   twin builds: tiny 15 s, full-size 21 s; pytest collecting tests/test_gpu.py: 21 s
# tiny/full: 0.60 default, 0.71 max-autotune (identical layers share their kernels, and autotuning is
# per GEMM shape, as many in both), so on the H200 the tiny twin compiles in ~24 s default, 50-86 s
# max-autotune; a packed graph costs about what a padded one does (239 s for 2 against 148 s for 1).
#   build-tiny      20 s  15 s measured;
#   preflight       60 s  20 start + 24 compile (reduce-overhead) + a varlen call and references: ~55 s;
#   cuda-default   150 s  20 start + 2 x 50-86 max-autotune + references: 135-200 s; the padded default
#                         runs first (done within ~115 s), so a cut keeps it;
#   build-full      30 s  21 s measured;
#   combined-pairs 130 s  20 start + 40 compile (x16 buckets) + 40-63 packed (40 s times 1 to 1.57, the
#                         CPU's packed / padded time per graph) + 20 runs and loads: 120-145 s;
#                         run_combined.py writes each setup as it ends, so a cut keeps the setups before;
#   gpu-tests       30 s  what is left: the start and the varlen kernels against SDPA; the compiled checks
#                         after them (24 s default, 50-86 s max-autotune each) need a lease of their own.
# A step that reaches its limit is interrupted (Ctrl-C) 5 s before it, it and every process it started:
# pytest prints what passed, run_combined.py what finished; the log says it timed out (exit 124, or 137
# if it had to be killed at the limit). Each step's time is logged: the next run's limits start there.
#
# Without CUDA it is a dry run: it says what it skips and runs the benchmark steps (pairs and rerank) on
# the tiny twin on the CPU, which tests its plumbing. GPU_CHECK_FAKE_CUDA=1 dry-runs the CUDA branch
# itself: its steps and limits, with the tiny twin on the CPU (the GPU tests skip themselves there).
#
#   bash gpu_check.sh OUT_DIR
set -uo pipefail

step() {  # step NAME SECONDS COMMAND...: run with a time limit, its output appended to $log as it comes
  local name=$1 limit=$2 grace=5
  shift 2
  echo "== $name (limit ${limit} s)" | tee -a "$log"
  local start=$SECONDS
  # timeout puts the command in a process group of its own and signals the whole group
  timeout -s INT -k "$grace" "$((limit - grace))" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "== $name: timed out: interrupted at $((limit - grace)) s (its limit, $limit s, less $grace s to write what it has)" | tee -a "$log"
  fi
  echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$log"
  [ "$rc" -eq 0 ] || status=1
}

# sourced (tests/test_scripts.py tests the step function on its own): the functions only
if [ "${BASH_SOURCE[0]}" != "$0" ]; then return 0; fi

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
pairs_step() {  # pairs_step LIMIT BENCH_ARGS...
  local limit=$1
  shift
  step combined-pairs "$limit" "$py" run_combined.py "$@" --json "$out/combined-pairs.json" \
    ${plot:+--plot "$out/combined-pairs.png"} --markdown
}
if [ "$cuda" = 1 ]; then
  # one cache for the twin builds and the GPU tests: each twin is built once, in its build step
  export FAST_RERANK_CACHE=${FAST_RERANK_CACHE:-$HOME/.cache/fast-rerank}
  export FAST_RERANK_TEST_CACHE=$FAST_RERANK_CACHE
  # -v: each test's result is printed as it ends, so a step cut short shows which passed
  tests=(-v -p no:cacheprovider --durations=0 --durations-min=1 tests/test_gpu.py)
  if [ -n "$fake" ]; then
    full=tiny bench=("${tiny[@]}" --num-pairs 16 --check-fp32)
  else
    full=full bench=(--model synthetic --compile-mode default --quiet --check-fp32)
  fi
  step build-tiny 20 "$py" models.py build-synthetic tiny
  step preflight 60 "$py" -m pytest -x "${tests[@]}" -k preflight
  step cuda-default 150 "$py" -m pytest "${tests[@]}" -k "cuda_default and bf16"
  step build-full 30 "$py" models.py build-synthetic "$full"
  pairs_step 130 "${bench[@]}"
  step gpu-tests 30 "$py" -m pytest "${tests[@]}" -k "not preflight and not (cuda_default and bf16)"
  echo "== combined-rerank: not run on CUDA (the 420 s are spent); on a lease of its own:" \
    "python run_combined.py --model synthetic --compile-mode default --workload rerank --num-queries 50" | tee -a "$log"
else
  echo "dry run: skipping the preflight and the GPU tests (no CUDA); benchmarks on the tiny twin, CPU" | tee -a "$log"
  # no lease here; a loaded CI machine gets room
  pairs_step 180 "${tiny[@]}" --num-pairs 16 --check-fp32
  step combined-rerank 90 "$py" run_combined.py "${tiny[@]}" --num-queries 3 --docs-per-query 8 --workload rerank \
    --json "$out/combined-rerank.json" ${plot:+--plot "$out/combined-rerank.png"} --markdown
fi
echo "results in $out"
exit $status
