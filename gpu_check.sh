#!/usr/bin/env bash
# Every GPU check and benchmark in one call: the GPU tests, then run_combined.py on the full-size
# synthetic twin (bf16) for the pairs and the rerank workloads. About 8 minutes on an H100/H200,
# most of it compilation (default mode; the original's max-autotune adds ~2 minutes per setup).
#   bash gpu_check.sh [OUT_DIR]      (default: results/<gpu>-<date>)
set -uo pipefail
cd "$(dirname "$0")"
export PYTHONUNBUFFERED=1
gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name().split()[1].lower() if torch.cuda.is_available() else 'cpu')")
out=${1:-results/$gpu-$(date -u +%Y%m%d)}
mkdir -p "$out"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; python3 -m pip list 2>/dev/null | grep -iE "^(torch|transformers|sentence-transformers|tokenizers|triton|flash.attn) "; } > "$out/machine.txt" 2>&1
python3 models.py build-synthetic full
python3 -m pytest tests/test_gpu.py -q 2>&1 | tee "$out/gpu-tests.txt"
python3 run_combined.py --model synthetic --compile-mode default --quiet --check-fp32 \
  --json "$out/combined-pairs.json" --plot "$out/combined-pairs.png" --markdown 2>&1 | tee "$out/combined-pairs.txt"
python3 run_combined.py --model synthetic --compile-mode default --quiet --workload rerank \
  --json "$out/combined-rerank.json" --plot "$out/combined-rerank.png" --markdown 2>&1 | tee "$out/combined-rerank.txt"
