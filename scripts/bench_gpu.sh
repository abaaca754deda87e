#!/usr/bin/env bash
# The whole GPU benchmark in one call of at most 10 minutes: seed-973m, bfloat16, several micro-batch
# sizes, JAX and the PyTorch reference side by side, plus the bf16 matmul peak (8192^3, random data).
#   scripts/bench_gpu.sh [OUT_DIR]      (default ./bench-gpu)
# Writes OUT_DIR/bench.md (the tables), OUT_DIR/bench.json (every case) and OUT_DIR/log.txt (versions,
# progress, errors). Settings (environment):
#   BATCH_SIZES   micro-batches, run in this order after the EXTRA_IMPLS (default "16 32 4"; sequence 256)
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

# merge: every case's JSON so far into bench.json (after each case: a run cut short keeps it).
merge() {
  "$py" - "$cases" "$out/bench.json" <<'EOF'
import glob, json, os, sys
runs = {os.path.basename(p)[:-5]: json.load(open(p)) for p in sorted(glob.glob(os.path.join(sys.argv[1], "*.json")))}
json.dump(runs, open(sys.argv[2] + ".tmp", "w"), indent=2)
os.replace(sys.argv[2] + ".tmp", sys.argv[2])
EOF
}

# bench ARGS...: one bench.py run; its table goes to bench.md, its JSON to the cases folder.
bench() {
  local name="$1"; shift
  local left=$((budget - SECONDS))
  if (( left < 45 )); then say "$name: skipped (${left}s of the budget left)"; return 1; fi
  say "$name: $*"
  # --budget: bench.py cuts its workers short so that it still writes what they measured (and it
  # writes it on the outer timeout's SIGTERM too).
  timeout "$left" "$py" -m jaxllm.bench --dtype bfloat16 --decode-tokens 0 --rounds 1 --timeout "$((left - 20))" \
    --budget "$((left - 20))" --json "$cases/$name.json" "$@" >"$cases/$name.md" 2>>"$log"
  local rc=$?
  merge
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
# cuDNN's fused attention, forward and backward, on a small bf16 batch (seconds): when it fails
# here, the +cudnn cases are skipped instead of each failing after a minute of set-up.
cudnn_ok=1
timeout 180 "$py" -c 'import jax, jax.numpy as jnp
q = jax.random.normal(jax.random.key(0), (2, 256, 12, 64), jnp.bfloat16)
f = lambda q: jax.nn.dot_product_attention(q, q, q, is_causal=True, implementation="cudnn").astype(jnp.float32).sum()
print("cuDNN attention probe: ok", float(jax.jit(jax.grad(f))(q).astype(jnp.float32).sum()))' 2>&1 | tail -n 3 >>"$log"
(( ${PIPESTATUS[0]} == 0 )) || { cudnn_ok=0; say "the cuDNN attention probe failed (see above): the +cudnn cases are skipped"; }
# The dispatches not yet measured on a GPU first, then the side-by-side cases.
for spec in ${EXTRA_IMPLS-dense dense+cudnn gather:512 gather:512+cudnn gather:128}; do
  attn=xla
  if [[ "$spec" == *+cudnn ]]; then
    (( cudnn_ok )) || { say "$spec: skipped (the cuDNN attention probe failed)"; continue; }
    attn=cudnn spec="${spec%+cudnn}"
  fi
  impl="${spec%%:*}" block=128
  [[ "$spec" == *:* ]] && block="${spec#*:}"
  bench "b${EXTRA_BATCH:-16}-$impl-$block-$attn" --preset "$preset" --batch-size "${EXTRA_BATCH:-16}" --seq-len 256 \
    --iters 10 --warmup 2 --matmul-size "${MATMUL_SIZE:-8192}" --frameworks jax --moe-impl "$impl" --moe-block "$block" \
    --attn-impl "$attn"
done
for b in ${BATCH_SIZES:-16 32 4}; do
  bench "b$b" --preset "$preset" --batch-size "$b" --seq-len 256 --iters 10 --warmup 2 --matmul-size "${MATMUL_SIZE:-8192}" \
    --frameworks "$frameworks"
done
rm -rf "$cases"
say "done: $out/bench.md, $out/bench.json, $log ($failures case(s) failed or were cut short)"
exit $(( failures > 0 ))
