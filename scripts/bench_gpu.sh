#!/usr/bin/env bash
# The whole GPU benchmark in one call of at most 10 minutes: seed-973m, bfloat16, several micro-batch
# sizes, JAX and the PyTorch reference side by side, plus the bf16 matmul peak.
#   scripts/bench_gpu.sh [OUT_DIR]      (default ./bench-gpu; writes bench.json and bench.md there)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-${OUT:-$here/bench-gpu}}"
mkdir -p "$out"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt" || true
for b in ${BATCH_SIZES:-4 16 32}; do
  timeout "${CASE_TIMEOUT:-170}" python3 -m jaxllm.bench --preset seed-973m --dtype bfloat16 --batch-size "$b" \
    --seq-len 256 --iters 5 --warmup 2 --json "$out/bench-b$b.json" --timeout 160 | tee "$out/bench-b$b.md" || \
    echo "batch $b: failed or timed out" | tee -a "$out/errors.txt"
done
