#!/usr/bin/env bash
# The whole GPU benchmark in one call of at most 10 minutes: seed-973m, bfloat16, sequence 256.
#   scripts/bench_gpu.sh [OUT_DIR]      (default: bench-gpu/ in the repository, git-ignored)
#   PRESET=tiny SEQ_LEN=32 BLOCKS=16 BATCHES="4:dots 8:none" MATMUL_SIZE=512 UNROLL=2 scripts/bench_gpu.sh /tmp/b   # a CPU rehearsal
# In order, each stage only while the time budget lasts (the first ones matter most):
#   1. versions, and a probe of cuDNN's fused attention (forward and backward, seconds);
#   2. a sweep of the JAX step in one process (profile_step.py, no profiling): the `dense` dispatch
#      at micro-batch 16 (the last GPU run's reference), then the `gather` dispatch at 16 with
#      blocks of BLOCKS rows;
#   3. with cuDNN attention (when the probe passed), the best block of stage 2 at the micro-batches
#      and remat policies of BATCHES, largest first: JAX's allocator keeps what earlier variants
#      freed, and a step's temporaries are one allocation (41 GiB at micro-batch 128), which after
#      smaller variants found no room (2026-11-29); a variant out of memory fails alone;
#   4. the fastest JAX configuration of stages 2-3 (tokens/s) at a micro-batch of at most SIDE_MAX
#      side by side with the PyTorch reference (bench.py: the same batch, the bf16 matmul peak
#      measured in the run; PyTorch took 63 GiB at micro-batch 64 on an H200), then both frameworks'
#      cached decoding (DECODE_TOKENS greedy tokens after a 16-token prompt, batch 1; 0 skips it);
#   5. the fastest configuration's step profiled: its kernels by kind, the heaviest with their JAX op;
#   6. that configuration with the layers' scan unrolled (UNROLL layers at a time; a long compile).
# Writes OUT_DIR/bench.md (the tables), OUT_DIR/sweep.json (every timed variant),
# OUT_DIR/bench.json (stage 4) and OUT_DIR/log.txt (versions, progress, errors), each as it goes.
# Settings (environment): BUDGET_S (default 540: no stage starts after it, none runs past it),
# BLOCKS (default "1024 2048 512"), BATCHES (default "128:dots 64:dots 64:none 32:dots 16:dots"),
# SIDE_MAX (default 64), DECODE_TOKENS (default 32), UNROLL (default 30; 0 skips stage 6), PRESET (default seed-973m), SEQ_LEN (default 256),
# MATMUL_SIZE (default 8192), PYTHON (default: the `python` on the PATH, else `python3`).
# Exit status 1 when a stage failed or was cut short (what was measured is still written).
set -uo pipefail
# (the checkout around the real path of this file: through a link to it elsewhere, ~/bin say, none was found)
here="$(cd "$(dirname "$(readlink -f "$0" 2>/dev/null || echo "$0")")/.." && pwd)"
out="${1:-${OUT:-$here/bench-gpu}}"
mkdir -p "$out" || exit 2
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
py="${PYTHON:-$(command -v python || command -v python3 || echo python3)}" preset="${PRESET:-seed-973m}" budget="${BUDGET_S:-540}" seq="${SEQ_LEN:-256}"
work="$(mktemp -d)"
log="$out/log.txt"
: >"$log"; : >"$out/bench.md"
failures=0

say() { echo "[$(date +%T) +${SECONDS}s] $*" | tee -a "$log"; }
left() { echo $((budget - SECONDS)); }

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader || true
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

# sweep NAME ARGS...: one profile_step.py process (timing only); its variants go to $work/NAME.json,
# all of them so far to sweep.json, its lines to bench.md.
sweep() {
  local name="$1"; shift
  local l; l=$(left)
  if (( l < 60 )); then say "$name: skipped (${l}s of the budget left)"; failures=$((failures + 1)); return 1; fi
  say "$name: $*"
  timeout "$l" "$py" "$here/scripts/profile_step.py" --preset "$preset" --seq-len "$seq" --dtype bfloat16 --steps 8 \
    --no-profile --budget "$((l - 45))" --json "$work/$name.json" "$@" 2>>"$log" | tee "$work/$name.txt"
  local rc=${PIPESTATUS[0]}
  "$py" - "$work" "$out/sweep.json" <<'EOF'
import glob, json, os, sys
rows = [r for p in sorted(glob.glob(os.path.join(sys.argv[1], "*.json")), key=os.path.getmtime)
        for r in json.load(open(p))]
tmp = f"{sys.argv[2]}.{os.getpid()}.tmp"
with open(tmp, "w") as f:
    json.dump(rows, f, indent=2)
os.replace(tmp, sys.argv[2])
EOF
  { echo "### $name"; echo; echo '```'; cat "$work/$name.txt"; echo '```'; echo; } >>"$out/bench.md"
  (( rc == 0 )) || failures=$((failures + 1))
  say "$name: exit $rc"
}

# best [FIELD=VALUE ...] [max_batch=N]: the fastest timed variant of sweep.json (tokens/s) among those matching, as
# "BATCH IMPL BLOCK REMAT ATTN"; nothing if none.
best() {
  "$py" - "$out/sweep.json" "$@" <<'EOF'
import json, sys
try:
    rows = json.load(open(sys.argv[1]))
except OSError:
    rows = []
want = dict(a.split("=", 1) for a in sys.argv[2:])
most = int(want.pop("max_batch", 1 << 30))
rows = [r for r in rows if "tokens_per_sec" in r and r["batch"] <= most
        and all(str(r.get(k)) == v for k, v in want.items())]
if rows:
    r = max(rows, key=lambda r: r["tokens_per_sec"])
    print(r["batch"], r["moe_impl"], r["moe_block"] or "-", r["remat"], r["attn_impl"])
EOF
}

# 1. cuDNN's fused attention: when it fails here, stage 3 runs with XLA's attention instead.
attn=cudnn
timeout 120 "$py" -c 'import jax, jax.numpy as jnp
q = jax.random.normal(jax.random.key(0), (2, 256, 12, 64), jnp.bfloat16)
f = lambda q: jax.nn.dot_product_attention(q, q, q, is_causal=True, implementation="cudnn").astype(jnp.float32).sum()
print("cuDNN attention probe: ok", float(jax.jit(jax.grad(f))(q).astype(jnp.float32).sum()))' 2>&1 | tail -n 3 >>"$log"
(( ${PIPESTATUS[0]} == 0 )) || { attn=xla; say "the cuDNN attention probe failed (see above): stage 3 uses XLA's attention"; }

# 2. The dispatches at micro-batch 16, XLA's attention.
variants=("16:dense:dots")
for blk in ${BLOCKS:-1024 2048 512}; do variants+=("16:gather:dots:$blk"); done
sweep dispatch --variants "${variants[@]}"
read -r _ _ block _ _ <<<"$(best moe_impl=gather)"
block="${block:+:$block}"  # none timed: the dispatch's default block

# 3. The best block with cuDNN attention (or XLA's), larger micro-batches, remat dots and none.
variants=()
for br in ${BATCHES:-128:dots 64:dots 64:none 32:dots 16:dots}; do variants+=("${br%%:*}:gather:${br#*:}$block"); done
sweep "batch-$attn" --attn-impl "$attn" --variants "${variants[@]}"

# 4. The fastest configuration (up to SIDE_MAX) beside PyTorch.
read -r b impl blk remat a <<<"$(best)"
if [[ -z "${b:-}" ]]; then
  say "no variant was timed: see $log"; rm -rf "$work"; exit 1
fi
say "fastest: micro-batch $b, $impl/$blk, remat $remat, $a attention"
spec="$b:$impl:$remat"; [[ "$blk" != - ]] && spec+=":$blk"  # profile_step.py's variant
read -r sb simpl sblk sremat sa <<<"$(best max_batch="${SIDE_MAX:-64}")"
l=$(left)
if [[ -z "${sb:-}" ]]; then
  say "side by side: no variant at micro-batch ${SIDE_MAX:-64} or less"; failures=$((failures + 1))
elif (( l >= 90 )); then
  say "side by side: bench.py at micro-batch $sb, $simpl/$sblk, remat $sremat, $sa attention"
  blk_args=(); [[ "$sblk" != - ]] && blk_args=(--moe-block "$sblk")
  timeout "$l" "$py" -m jaxllm.bench --preset "$preset" --batch-size "$sb" --seq-len "$seq" --dtype bfloat16 \
    --iters 10 --warmup 2 --rounds 1 --decode-tokens "${DECODE_TOKENS:-32}" --matmul-size "${MATMUL_SIZE:-8192}" --moe-impl "$simpl" \
    "${blk_args[@]}" --remat "$sremat" --attn-impl "$sa" --timeout "$((l - 20))" --budget "$((l - 20))" \
    --json "$out/bench.json" 2>>"$log" | tee "$work/side.md"
  rc=${PIPESTATUS[0]}
  { echo "### side by side"; echo; cat "$work/side.md"; echo; } >>"$out/bench.md"
  (( rc == 0 )) || failures=$((failures + 1))
  say "side by side: exit $rc"
else
  say "side by side: skipped (${l}s of the budget left)"; failures=$((failures + 1))
fi

# 5. Where its step's time goes.
l=$(left)
if (( l >= 60 )); then
  say "profile: $spec"
  timeout "$l" "$py" "$here/scripts/profile_step.py" --preset "$preset" --seq-len "$seq" --dtype bfloat16 --steps 3 \
    --top 30 --attn-impl "$a" --variants "$spec" 2>>"$log" | tee "$work/profile.txt"
  rc=${PIPESTATUS[0]}
  { echo "### profile"; echo; echo '```'; cat "$work/profile.txt"; echo '```'; echo; } >>"$out/bench.md"
  (( rc == 0 )) || failures=$((failures + 1))
else
  say "profile: skipped (${l}s of the budget left)"; failures=$((failures + 1))
fi

# 6. The same with the scan over layers unrolled.
if (( ${UNROLL:-30} > 0 )); then
  sweep "unroll-${UNROLL:-30}" --attn-impl "$a" --scan-unroll "${UNROLL:-30}" --variants "$spec"
fi

"$py" - "$out/sweep.json" <<'EOF' | tee -a "$out/bench.md"
import json, sys
try:
    rows = json.load(open(sys.argv[1]))
except OSError:
    sys.exit()
# XLA peak: the variant's own (buffer assignment); process peak: the allocator's high-water mark of the
# sweep's process so far, which every variant after the first inherits.
print("\n| micro-batch | dispatch | remat | attention | unroll | step ms | tok/s | TFLOP/s | MFU | compile s "
      "| XLA peak GiB | process peak GiB |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for r in rows:
    disp = r["moe_impl"] + (f" ({r['dispatch']})" if r.get("dispatch", r["moe_impl"]) != r["moe_impl"] else "") \
        + (f"/{r['moe_block']}" if r.get("moe_block") else "")
    if "error" in r:
        print(f"| {r['batch']} | {disp} | {r['remat']} | {r['attn_impl']} | {r['scan_unroll'] or '-'} | failed: {r['error'][:80]} |")
        continue
    mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "-"
    gib = " | ".join(f"{r[k]:.1f}" if r.get(k) else "-" for k in ("xla_peak_gb", "process_peak_device_gb"))
    print(f"| {r['batch']} | {disp} | {r['remat']} | {r['attn_impl']} | {r['scan_unroll'] or '-'} | {r['step_ms']:.1f} "
          f"| {r['tokens_per_sec']:,.0f} | {r['tflops']:.1f} | {mfu} | {r['compile_s']:.1f} | {gib} |")
EOF
rm -rf "$work"
say "done: $out/bench.md, $out/sweep.json, $out/bench.json, $log ($failures stage(s) failed or were cut short)"
exit $(( failures > 0 ))
