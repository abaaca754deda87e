#!/usr/bin/env python
"""Time variants of the JAX training step in one process, and profile where a step's time goes.

    python scripts/profile_step.py                                   # seed-973m, 16 x 256, bf16: sparse/dense, profiled
    python scripts/profile_step.py --variants 16:gather:dots:512 16:dense:dots --no-profile
    python scripts/profile_step.py --preset tiny --seq-len 32 --variants 2:sparse:none --dtype float32

Each variant is BATCH:MOE_IMPL:REMAT[:MOE_BLOCK] (MOE_BLOCK: by default the dispatch's, `MOE_BLOCKS`). For each: compile, 2 warm-up steps, the median of
`--steps` timed steps, tokens/s, counted TFLOP/s and MFU against `--peak-flops` (default: the
device's datasheet peak, where known). With profiling on, 3 more steps run under `jax.profiler` and
the device's kernels are summed per step: the busy time against the steps' span, the kernel count,
matrix products (cuBLAS / XLA gemm kernels) against everything else, the heaviest kernels with the
HLO op they came from. On a CPU the trace holds XLA's ops on the host's threads instead: the
report gives how long matrix products (dots and the fusions holding one) ran within the step's
span (the idle gaps that end at a product XLA runs through Eigen count as its time: such a product's
events cover only the end of its work), how long only other ops did, how long none did, and the
other ops that took the threads' time (by kind, then the heaviest, with their shapes):

    python scripts/profile_step.py --dtype float32 --variants 4:sparse:dots --steps 2   # CPU, seed-973m

`--out DIR` keeps the first profiled variant's trace and its HLO there; `--json PATH` writes every
variant's figures (or its error) there, rewritten after each variant, so a run cut short keeps them.
`--scan-unroll N` unrolls the scan over the layers N at a time (the model's default: whole up to 8
layers, else 1).
"""

from __future__ import annotations

import collections
import glob
import os
import re
import shutil
import sys
import tempfile
import time

# This file's checkout (found through any symbolic link) goes ahead of an installed jaxllm: after a
# `pip install .` (not -e) the installed copy ran instead of the code beside this file. Where no
# checkout holds this file (convert/ as pip installs it, a script copied alone), the installed packages serve.
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
if os.path.isfile(os.path.join(_CHECKOUT, "pyproject.toml")) and os.path.isdir(os.path.join(_CHECKOUT, "jaxllm")):
    sys.path.insert(0, _CHECKOUT)

GEMM = re.compile(r"(nvjet|gemm|cutlass|sm\d+_xmma|ampere_|cublas|triton_gemm)", re.I)


def parse_variant(spec: str):
    from jaxllm.recipes import MOE_IMPLS, REMAT_POLICIES

    parts = spec.split(":")
    if len(parts) not in (3, 4) or not parts[0].isdigit() or int(parts[0]) < 1 or parts[1] not in MOE_IMPLS \
            or parts[2] not in REMAT_POLICIES or (len(parts) == 4 and not (parts[3].isdigit() and int(parts[3]) > 0)):
        raise ValueError(f"--variants: {spec!r} is not BATCH:MOE_IMPL:REMAT[:MOE_BLOCK] (impls {', '.join(MOE_IMPLS)}; "
                         f"remat {', '.join(REMAT_POLICIES)})")
    return int(parts[0]), parts[1], parts[2], int(parts[3]) if len(parts) == 4 else None


def hlo_op_name(hlo: str, kernel: str) -> str:
    """The JAX op (`op_name` metadata) behind a kernel named after an HLO instruction (`fusion_12`
    for `%fusion.12`); for a fusion, that of the first op inside it that has one. "" if none."""
    for name in dict.fromkeys((re.sub(r"_(\d+)$", r".\1", kernel), kernel)):
        line = re.search(r"^\s*(?:ROOT )?%" + re.escape(name) + r" = [^\n]*", hlo, re.M)
        if not line:
            continue
        own = re.search(r'op_name="([^"]*)"', line.group(0))
        if own:
            return own.group(1)
        called = re.search(r"calls=%([\w.\-]+)", line.group(0))
        if called:
            body = re.search(r"^%" + re.escape(called.group(1)) + r" [^\n]*\{\n(.*?)\n\}", hlo, re.M | re.S)
            inner = body and re.search(r'op_name="([^"]*)"', body.group(1))
            if inner:
                return inner.group(1)
    return ""


def device_kernels(xplane: str, steps: int, hlo: str, top: int) -> list[str]:
    """Per-step kernel totals of the device planes of a trace, as report lines."""
    from jax.profiler import ProfileData

    lines = []
    for plane in ProfileData.from_file(xplane).planes:
        if not plane.name.startswith("/device:"):
            continue
        # The CUDA streams' kernels; a trace without stream lines may list XLA's ops instead (never both).
        streams = ([line for line in plane.lines if line.name.startswith("Stream")]
                  or [line for line in plane.lines if line.name == "XLA Ops"])
        events = [e for line in streams for e in line.events]
        if not events:
            continue
        busy = collections.Counter()
        calls = collections.Counter()
        for e in events:
            busy[e.name] += e.duration_ns / 1e6 / steps
            calls[e.name] += 1
        span = (max(e.start_ns + e.duration_ns for e in events) - min(e.start_ns for e in events)) / 1e6 / steps
        gemm = sum(v for k, v in busy.items() if GEMM.search(k))
        short = sum(1 for e in events if e.duration_ns < 10_000) // steps
        lines.append(f"  {plane.name}: kernels {sum(busy.values()):.1f} ms (summed over streams) in a "
                     f"{span:.1f} ms span per step; "
                     f"{len(events) // steps} kernels per step ({short} under 10 us); matrix products "
                     f"{gemm:.1f} ms, everything else {sum(busy.values()) - gemm:.1f} ms")
        kinds = collections.Counter()
        for k, v in busy.items():
            kinds["matrix products" if GEMM.search(k) else re.sub(r"[_.\d]+$", "", k)] += v
        lines.append("  by kind (ms per step): " + ", ".join(f"{k} {v:.1f}" for k, v in kinds.most_common(14)))
        lines.append("  heaviest kernels (ms per step, calls per step, HLO op):")
        for k, v in busy.most_common(top):
            lines.append(f"    {v:8.3f} {calls[k] // steps:5d}  {k[:44]:44s} {hlo_op_name(hlo, k)[-90:]}")
    return lines


CONTROL_FLOW = ("while", "conditional", "call")  # their trace events span the ops they run
INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.+?) ([\w\-]+)\((.*)$")


def hlo_instructions(hlo: str) -> dict[str, tuple[str, str, bool]]:
    """Every instruction of an HLO module: name -> (shape, opcode, whether it computes a matrix
    product: a `dot` or `convolution`, or a fusion whose computation holds one)."""
    bodies: dict[str, list[str]] = {}
    current = None
    for line in hlo.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            current = line.split()[0 if not line.startswith("ENTRY") else 1].lstrip("%")
            bodies[current] = []
        elif current is not None and line.strip() != "}":
            bodies[current].append(line)

    with_product = {c for c, lines in bodies.items()
                    if any((m := INSTRUCTION.match(x)) and m.group(3) in ("dot", "convolution") for x in lines)}
    out = {}
    for lines in bodies.values():
        for line in lines:
            m = INSTRUCTION.match(line)
            if not m:
                continue
            name, shape, opcode, rest = m.groups()
            called = re.search(r"calls=%([\w.\-]+)", rest)
            product = opcode in ("dot", "convolution") or (
                opcode == "fusion" and called is not None and called.group(1) in with_product)
            out[name] = (shape.split("{")[0], opcode, product)
    return out


def _covered_ns(intervals) -> int:
    """Length of the union of (start, end) intervals."""
    total, end = 0, None
    for s, e in sorted(intervals):
        if end is None or s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def _rate(flops_per_s: float) -> str:
    """FLOP/s in TFLOP/s, or GFLOP/s below one TFLOP/s (a CPU's peak: 250e9 is not "0 TFLOP/s")."""
    return f"{flops_per_s / 1e12:,.0f} TFLOP/s" if flops_per_s >= 1e12 else f"{flops_per_s / 1e9:,.0f} GFLOP/s"


def _dur(seconds: float) -> str:
    return f"{seconds:.2f} s" if abs(seconds) >= 1 else f"{seconds * 1e3:.1f} ms"


def _gaps_before_dots(ev, ops) -> int:
    """Nanoseconds in which no op ran and that end where a plain `dot` op's event starts: XLA's
    CPU runs those products through Eigen, and their events cover only the end of the work (a
    [1024, 768]^T x [1024, 1536] product's events last 2.8 ms, after a gap of about 13 ms)."""
    total, end = 0, None
    for s, e, n in sorted((s, s + d, n) for n, s, d in ev):
        if end is not None and s > end and ops[n][1] == "dot":
            total += s - end
        end = e if end is None else max(end, e)
    return total


def cpu_ops(events, steps: int, hlo: str, top: int) -> list[str]:
    """Report lines for the XLA ops of a CPU trace: `events` are (HLO instruction name, start ns,
    duration ns) from any of XLA's threads. When matrix products ran (counting the idle gaps that
    end at an Eigen `dot`, see `_gaps_before_dots`), when only other ops did, and which other ops
    took the threads' time (control-flow ops, which span their bodies, left out)."""
    ops = hlo_instructions(hlo)
    ev = [(n, s, d) for n, s, d in events if n in ops and ops[n][1] not in CONTROL_FLOW]
    if not ev:
        return ["  no XLA ops in the trace"]
    span = (max(s + d for _, s, d in ev) - min(s for _, s, _ in ev)) / 1e9 / steps
    prod = [(s, s + d) for n, s, d in ev if ops[n][2]]
    every = _covered_ns([(s, s + d) for _, s, d in ev]) / 1e9 / steps
    hidden = _gaps_before_dots(ev, ops) / 1e9 / steps
    recorded = _covered_ns(prod) / 1e9 / steps
    products = recorded + hidden
    busy = collections.Counter()
    calls = collections.Counter()
    for n, _, d in ev:
        busy[n] += d / 1e6 / steps
        calls[n] += 1
    other = {n: t for n, t in busy.items() if not ops[n][2]}
    lines = [f"  XLA's ops, per step: a {_dur(span)} span; matrix products (dots and the fusions holding one) "
             f"running during {_dur(products)} ({_dur(hidden)} of it the gaps before Eigen `dot` ops), only other "
             f"ops during {_dur(every - recorded)}, none during {_dur(span - every - hidden)}",
             f"  thread time per step (summed over threads): matrix products "
             f"{_dur((sum(busy.values()) - sum(other.values())) / 1e3)}, other ops {_dur(sum(other.values()) / 1e3)}"]
    kinds = collections.Counter()
    for n, t in other.items():
        kinds[re.sub(r"[.\d]+$", "", n)] += t
    lines.append("  other ops by kind (thread-ms per step): "
                 + ", ".join(f"{k} {v:.0f}" if v >= 10 else f"{k} {v:.1f}" for k, v in kinds.most_common(12)))
    lines.append("  heaviest other ops (thread-ms per step, calls per step, shape, HLO op):")
    for n, t in sorted(other.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"    {t:8.1f} {calls[n] // steps:5d}  {n[:36]:36s} {ops[n][0][:28]:28s} "
                     f"{hlo_op_name(hlo, n)[-70:]}")
    return lines


def host_events(xplane: str):
    """(name, start ns, duration ns) of every event on the host's threads."""
    from jax.profiler import ProfileData

    return [(e.name, e.start_ns, e.duration_ns) for plane in ProfileData.from_file(xplane).planes
            if plane.name == "/host:CPU" for line in plane.lines for e in line.events]


def main(argv=None) -> int:
    from jaxllm import cli
    from jaxllm.recipes import ATTN_IMPLS

    p = cli.parser(__file__, __doc__)
    p.add_argument("--preset", default="seed-973m", help="(default seed-973m)")
    p.add_argument("--seq-len", type=int, default=256, help="(default 256)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="(default bfloat16)")
    p.add_argument("--variants", nargs="+", default=["16:sparse:dots", "16:dense:dots"],
                   help="BATCH:MOE_IMPL:REMAT[:MOE_BLOCK] (default: 16:sparse:dots 16:dense:dots)")
    p.add_argument("--attn-impl", default="xla", choices=ATTN_IMPLS,
                   help="every variant's attention: xla (default) or cudnn (NVIDIA GPUs, bfloat16)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per variant (default 8)")
    p.add_argument("--no-profile", action="store_true", help="time only")
    p.add_argument("--top", type=int, default=25, help="heaviest kernels listed (default 25)")
    p.add_argument("--peak-flops", type=float, default=None, help="peak FLOP/s for MFU (default: datasheet)")
    p.add_argument("--out", type=cli.path, default=None, help="keep the first profiled trace (.xplane.pb) and its HLO here")
    p.add_argument("--mesh", default=None, help="device mesh, e.g. data=2,fsdp=4 (default: one device; MFU is against the peak of all the mesh's devices)")
    p.add_argument("--budget", type=float, default=None, help="start no variant after this many seconds")
    p.add_argument("--json", type=cli.path, default=None, help="write every variant's figures here (after each variant)")
    p.add_argument("--scan-unroll", type=int, default=None,
                   help="unroll the scan over layers N at a time (default: the model's, whole up to 8 layers)")
    args = p.parse_args(argv)
    cli.check_at_least(p, args, seq_len=2, steps=1, top=0, scan_unroll=1)
    cli.check_json_path(p, args.json)
    cli.check_peak_flops(p, args.peak_flops)
    if args.budget is not None and not 0 < args.budget < float("inf"):
        p.error(f"--budget must be a positive number of seconds, got {args.budget}")
    config = cli.preset_config(p, args.preset, args.seq_len)
    try:
        variants = [parse_variant(v) for v in args.variants]
    except ValueError as e:
        p.error(str(e))
    if args.out and not os.path.isdir(args.out):
        p.error(f"--out: {args.out} is not a folder")
    cli.check_attn_impl(p, args.attn_impl, args.dtype)

    import jax
    import numpy as np

    from jaxllm import sharding as shd
    from jaxllm.bench import compiled_step
    from jaxllm.flops import device_peak_flops, training_flops_per_token
    from jaxllm.model import training_dispatch

    try:  # the mesh, and every variant's batch on it, as training checks them: refuse before any variant runs
        mesh = shd.make_mesh(args.mesh, None if args.mesh else jax.devices()[:1])  # one device unless --mesh
        shd.check_mesh(mesh, hidden_size=config.hidden_size, num_routed_experts=config.num_routed_experts)
        for b, *_ in variants:
            shd.check_batch(b, mesh)
    except ValueError as e:
        p.error(" ".join(str(e).split()))
    t_start = time.time()
    device = jax.devices()[0]
    peak = args.peak_flops or device_peak_flops(device, args.dtype)
    peak = peak * mesh.size if peak else None  # the mesh's devices together
    profile = not args.no_profile
    on_cpu = device.platform == "cpu"
    print(f"{device.device_kind}, jax {jax.__version__}; {args.preset}, sequence {args.seq_len}, {args.dtype}"
          + (f"; MFU against {_rate(peak)}" if peak else "; no peak known (--peak-flops)"), flush=True)
    kept = False
    failed = 0
    records = []

    def write():  # whole or not at all (a run may be killed at any moment)
        if args.json:
            cli.write_json(args.json, records)

    def record(**fields) -> dict:  # one variant's figures
        records.append({"preset": args.preset, "seq_len": args.seq_len, "dtype": args.dtype,
                        "attn_impl": args.attn_impl, "scan_unroll": args.scan_unroll, "device": device.device_kind,
                        **fields})
        write()
        return records[-1]

    for spec, (b, impl, remat, block) in zip(args.variants, variants):
        timed = None
        ran, block = training_dispatch(impl, block)  # what the step runs here, and its block
        shown = (impl if ran == impl else f"{impl} ({ran})") + (f"/{block}" if block else "")
        if args.budget is not None and time.time() - t_start > args.budget:
            print(f"--budget spent: {spec} and after not run")
            break
        try:  # one variant failing (out of memory, cuDNN) costs that variant only
            step, state, batch, compile_s = compiled_step(config, mesh, b, args.seq_len, dtype=args.dtype,
                                                          moe_impl=impl, moe_block=block, remat=remat,
                                                          attn_impl=args.attn_impl, scan_unroll=args.scan_unroll)

            def run(n, times=None):
                nonlocal state
                for _ in range(n):
                    t = time.perf_counter()
                    state, m = step(state, batch)
                    jax.block_until_ready(m["loss"])
                    if times is not None:
                        times.append(time.perf_counter() - t)
                return m

            run(2)
            times = []
            m = run(args.steps, times)
            med = float(np.median(times))
            flops = training_flops_per_token(config, args.seq_len) * b * args.seq_len
            # This variant's own peak as XLA's buffer assignment plans it (arguments, outputs and
            # temporaries live at once); the allocator's peak_bytes_in_use is the process's so far,
            # which every variant after the first inherits (JAX cannot reset it).
            planned = getattr(step.memory_analysis(), "peak_memory_in_bytes", None)
            mem = (device.memory_stats() or {}).get("peak_bytes_in_use")
            print(f"{b} x {args.seq_len} {shown}, remat {remat}"
                  f"{'' if args.attn_impl == 'xla' else ', ' + args.attn_impl + ' attention'}: "
                  f"step {med * 1e3:.1f} ms (min {min(times) * 1e3:.1f}), {b * args.seq_len / med:,.0f} tok/s, "
                  f"{flops / med / 1e12:.2f} TFLOP/s" + (f", MFU {flops / med / peak:.1%}" if peak else "")
                  + f", compile {compile_s:.1f} s" + (f", XLA peak {planned / 2**30:.1f} GiB" if planned else "")
                  + (f", process peak device memory so far {mem / 2**30:.1f} GiB" if mem else "")
                  + f", loss {float(m['loss']):.3f}", flush=True)
            timed = record(batch=b, moe_impl=impl, dispatch=ran, moe_block=block, remat=remat, step_ms=med * 1e3,
                   step_min_ms=min(times) * 1e3, tokens_per_sec=b * args.seq_len / med, tflops=flops / med / 1e12,
                   mfu=flops / med / peak if peak else None, compile_s=compile_s,
                   xla_peak_gb=planned / 2**30 if planned else None,
                   process_peak_device_gb=mem / 2**30 if mem else None, loss=float(m["loss"]))
            if profile:
                trace_dir = tempfile.mkdtemp(prefix="profile_step_")
                jax.profiler.start_trace(trace_dir)
                run(3)
                jax.profiler.stop_trace()
                hlo = step.as_text()
                xplane = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[0]
                report = (cpu_ops(host_events(xplane), 3, hlo, args.top) if on_cpu
                          else device_kernels(xplane, 3, hlo, args.top))
                print("\n".join(report), flush=True)
                if args.out and not kept:
                    shutil.copy(xplane, os.path.join(args.out, "step.xplane.pb"))
                    with open(os.path.join(args.out, "step_hlo.txt"), "w") as f:
                        f.write(hlo)
                    kept = True
                shutil.rmtree(trace_dir, ignore_errors=True)
            del state, step, batch
        except Exception as e:  # noqa: BLE001
            failed += 1
            try:  # a trace left open would refuse the next variant's
                jax.profiler.stop_trace()
            except Exception:  # noqa: BLE001
                pass
            why = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
            print(f"{spec}: failed: {why}", flush=True)
            if timed is not None:  # timed, then its profile failed
                timed["profile_error"] = why
                write()
            else:
                record(batch=b, moe_impl=impl, dispatch=ran, moe_block=block, remat=remat, error=why)
        finally:  # a failed variant's arrays go before the next one is built (its memory, on a GPU)
            state = step = batch = None
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
