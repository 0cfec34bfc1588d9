#!/usr/bin/env bash
# Every GPU check and benchmark in one call, sized for a short lease: under 10 minutes in all (the
# limits below add up to 570 s), about 6 on an H100:
#   1. preflight (~30 s): imports, one compiled varlen call, a CUDA-graph replay whose first output
#      must survive the second;
#   2. the GPU tests (tests/test_gpu.py);
#   3. run_combined.py on the full-size synthetic twin (bf16): the pairs workload, then rerank.
# Each step writes its files into OUT_DIR as it ends and has its own time limit, so a run cut off
# early still leaves what finished. Without CUDA it is a dry run: it says what it skips and runs
# the benchmark steps on the tiny twin on the CPU, which tests its plumbing.
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
status=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUT_DIR/NAME.txt
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit} s)"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$out/steps.txt"
  [ "$rc" -eq 0 ] || status=1
}

cuda=$("$py" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
{
  echo "date_utc: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  if [ "$cuda" = 1 ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  else
    echo "no CUDA device: dry run"
  fi
  "$py" -m pip list 2>/dev/null | grep -iE "^(torch|transformers|sentence-transformers|tokenizers|triton|flash.attn|hypothesis|matplotlib) "
} > "$out/machine.txt"
cat "$out/machine.txt"

# Optional packages: a missing one costs its own output, never the run.
plot=yes
"$py" -c "import matplotlib" 2>/dev/null || { plot=; echo "matplotlib missing: no plots"; }

if [ "$cuda" = 1 ]; then
  bench=(--model synthetic --compile-mode default --quiet)
  pairs=(--check-fp32)
  rerank=(--num-queries 50)
  # one cache for the twin build and the GPU tests: the full-size twin is built once
  export FAST_RERANK_CACHE=${FAST_RERANK_CACHE:-$HOME/.cache/fast-rerank}
  export FAST_RERANK_TEST_CACHE=$FAST_RERANK_CACHE
  step build-twin 90 "$py" models.py build-synthetic full
  step preflight 60 "$py" -m pytest -q -x -p no:cacheprovider tests/test_gpu.py -k preflight
  step gpu-tests 150 "$py" -m pytest -q -p no:cacheprovider tests/test_gpu.py
else
  echo "dry run: skipping the preflight and the GPU tests (no CUDA); benchmarks on the tiny twin, CPU"
  bench=(--model synthetic-tiny --device cpu --quiet --runs 2 --warmup 1)
  pairs=(--num-pairs 16 --check-fp32)
  rerank=(--num-queries 3 --docs-per-query 8)
fi
step combined-pairs 180 "$py" run_combined.py "${bench[@]}" "${pairs[@]}" --json "$out/combined-pairs.json" \
  ${plot:+--plot "$out/combined-pairs.png"} --markdown
step combined-rerank 90 "$py" run_combined.py "${bench[@]}" "${rerank[@]}" --workload rerank \
  --json "$out/combined-rerank.json" ${plot:+--plot "$out/combined-rerank.png"} --markdown
echo "results in $out"
exit $status
