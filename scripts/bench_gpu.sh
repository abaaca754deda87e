#!/usr/bin/env bash
# The whole GPU benchmark in one call of at most 10 minutes: seed-973m, bfloat16, several micro-batch
# sizes, JAX and the PyTorch reference side by side, plus the bf16 matmul peak (8192^3, random data).
#   scripts/bench_gpu.sh [OUT_DIR]      (default ./bench-gpu)
# Writes OUT_DIR/bench.md (the tables), OUT_DIR/bench.json (every case) and OUT_DIR/log.txt (versions,
# progress, errors). Settings (environment):
#   BATCH_SIZES   micro-batches, run in this order (default "32 4 16"; sequence 256)
#   EXTRA_IMPLS   MoE dispatches also timed for JAX alone at EXTRA_BATCH (default 16), as IMPL[:BLOCK][+cudnn]
#                 (BLOCK: rows per block of the gather dispatch; +cudnn: cuDNN's fused attention;
#                 default "dense dense+cudnn gather:512 gather:512+cudnn gather:128")
#   BUDGET_S      no case starts after this many seconds, and none runs past it (default 540)
#   PRESET        default seed-973m; MATMUL_SIZE default 8192; PYTHON default python3
# A tiny smoke case runs first: if the PyTorch side fails there, the cases run JAX alone.
# Exit status 1 when a case failed or was cut short (what was measured is still written).
set -uo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-${OUT:-$here/bench-gpu}}"
mkdir -p "$out" || exit 2
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
py="${PYTHON:-python3}" preset="${PRESET:-seed-973m}" budget="${BUDGET_S:-540}"
cases="$(mktemp -d)"
log="$out/log.txt"
: >"$log"; : >"$out/bench.md"

say() { echo "[$(date +%T) +${SECONDS}s] $*" | tee -a "$log"; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$py" -c 'import sys, jax, flax, optax, torch, transformers
print("python", sys.version.split()[0], "| jax", jax.__version__, "| flax", flax.__version__, "| optax",
      optax.__version__, "| torch", torch.__version__, "| transformers", transformers.__version__)
print("jax devices:", jax.devices(), "| torch cuda:", torch.cuda.is_available())
try:
    from jax._src.lib import cuda_versions
    print("cuDNN: jax", cuda_versions.cudnn_get_version(), "| torch", torch.backends.cudnn.version())
except Exception as e:
    print("cuDNN version not found:", e)'
} 2>&1 | tee -a "$log"

# bench ARGS...: one bench.py run; its table goes to bench.md, its JSON to the cases folder.
bench() {
  local name="$1"; shift
  local left=$((budget - SECONDS))
  if (( left < 45 )); then say "$name: skipped (${left}s of the budget left)"; return 1; fi
  say "$name: $*"
  # The workers get 30 s less than the whole call, so that bench.py itself can still write what
  # was measured (its table and JSON) when a worker runs out of time.
  timeout "$left" "$py" -m jaxllm.bench --dtype bfloat16 --decode-tokens 0 --rounds 1 --timeout "$((left - 30))" \
    --json "$cases/$name.json" "$@" >"$cases/$name.md" 2>>"$log"
  local rc=$?
  (( rc == 0 )) || failures=$((failures + 1))
  { echo "### $name"; echo; cat "$cases/$name.md"; echo; } >>"$out/bench.md"
  cat "$cases/$name.md"
  say "$name: exit $rc"
  return $rc
}

failures=0
frameworks=jax,torch
if ! bench smoke --preset tiny --batch-size 2 --seq-len 32 --iters 2 --warmup 1 --matmul-size 1024; then
  frameworks=jax
  bench smoke-jax --preset tiny --batch-size 2 --seq-len 32 --iters 2 --warmup 1 --matmul-size 1024 \
    --frameworks jax || { say "the JAX smoke case failed: see $log"; exit 1; }
fi
for b in ${BATCH_SIZES:-32 4 16}; do
  bench "b$b" --preset "$preset" --batch-size "$b" --seq-len 256 --iters 10 --warmup 2 --matmul-size "${MATMUL_SIZE:-8192}" \
    --frameworks "$frameworks"
done
for spec in ${EXTRA_IMPLS-dense dense+cudnn gather:512 gather:512+cudnn gather:128}; do
  attn=xla
  if [[ "$spec" == *+cudnn ]]; then attn=cudnn spec="${spec%+cudnn}"; fi
  impl="${spec%%:*}" block=128
  [[ "$spec" == *:* ]] && block="${spec#*:}"
  bench "b${EXTRA_BATCH:-16}-$impl-$block-$attn" --preset "$preset" --batch-size "${EXTRA_BATCH:-16}" --seq-len 256 \
    --iters 10 --warmup 2 --matmul-size "${MATMUL_SIZE:-8192}" --frameworks jax --moe-impl "$impl" --moe-block "$block" \
    --attn-impl "$attn"
done
"$py" - "$cases" "$out/bench.json" <<'EOF'
import glob, json, os, sys
runs = {os.path.basename(p)[:-5]: json.load(open(p)) for p in sorted(glob.glob(os.path.join(sys.argv[1], "*.json")))}
json.dump(runs, open(sys.argv[2], "w"), indent=2)
EOF
rm -rf "$cases"
say "done: $out/bench.md, $out/bench.json, $log ($failures case(s) failed or were cut short)"
exit $(( failures > 0 ))
