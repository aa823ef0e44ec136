#!/usr/bin/env bash
# One prepared run for a lent GPU machine (the device tool), under 8 minutes in all:
#   1. the CUDA tests (pytest -m cuda: they skip on a machine without CUDA),
#   2. benchmarks/gpu_speed.py (matmul peaks, inference and training tokens/s per precision).
# Figures and logs go under $OUT (the device tool brings that folder back). Uses the machine's own
# python3 (its PyTorch build matches the driver); nothing is installed.
#
#   run(command="bash benchmarks/device_check.sh", timeout_s=540)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/device_check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader;
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
          torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA')"; } \
  2>&1 | tee "$OUT/machine.txt"

# 1. CUDA tests (about a minute)
timeout 150 $PY -m pytest -q -m cuda -p no:cacheprovider tests 2>&1 | tee "$OUT/cuda_tests.txt"
tests_rc=${PIPESTATUS[0]}

# 2. GPU benchmark (original preset; each mode in its own try block, so one failure keeps the rest)
timeout 300 $PY benchmarks/gpu_speed.py --steps 10 --warmup 3 2>&1 | tee "$OUT/gpu_speed.txt"
bench_rc=${PIPESTATUS[0]}

echo "cuda tests rc=$tests_rc, gpu_speed rc=$bench_rc" | tee "$OUT/summary.txt"
exit $(( tests_rc != 0 || bench_rc != 0 ))
