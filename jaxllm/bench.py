"""Side-by-side benchmark of full training steps (forward, backward, optimizer) in JAX and in the
PyTorch reference, plus the machine's matmul peak, all measured in the same run.

Each measurement runs in its own subprocess (`python -m jaxllm.bench --worker ...`) so that peak
memory is per framework and one framework's threads do not disturb the other's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB -> GiB (Linux)


def _timeit(fn, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


# ---- workers ------------------------------------------------------------------------------------
def worker_matmul(args) -> dict:
    out = {}
    n = args.matmul_size
    import jax
    import jax.numpy as jnp

    for dtype in ["float32"] + (["bfloat16"] if jax.devices()[0].platform != "cpu" else []):
        a = jnp.ones((n, n), dtype)
        f = jax.jit(lambda x: x @ x)
        times = _timeit(lambda: f(a).block_until_ready(), 2, 5)
        out[f"jax_matmul_{dtype}_flops"] = 2 * n**3 / float(np.median(times))
    if args.torch_matmul:
        import torch

        t = torch.ones(n, n)
        times = _timeit(lambda: t @ t, 2, 5)
        out["torch_matmul_float32_flops"] = 2 * n**3 / float(np.median(times))
    out["device"] = str(jax.devices()[0].device_kind)
    return out


def worker_jax(args) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxllm import sharding as shd
    from jaxllm.config import LLMConfig
    from jaxllm.train import OptimConfig, Trainer

    config = LLMConfig.from_preset(args.preset)
    trainer = Trainer(config, OptimConfig(lr=1e-4, warmup_steps=1, total_steps=1000), shd.make_mesh(args.mesh),
                      batch_size=args.batch_size, grad_accum=1, seq_len=args.seq_len, dropout=False,
                      dtype=jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32,
                      moe_impl=args.moe_impl, moe_block=args.moe_block, remat=args.remat,
                      **({"scan_unroll": args.scan_unroll} if args.scan_unroll else {}))
    state = trainer.init_state()
    rng = np.random.RandomState(0)
    batch = trainer.put_batch(rng.randint(0, config.vocab_size, (args.batch_size, args.seq_len)))
    t0 = time.perf_counter()
    step = trainer.step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    holder = {"state": state}

    def one():
        holder["state"], m = step(holder["state"], batch)
        jax.block_until_ready(m["loss"])

    times = _timeit(one, args.warmup, args.iters)
    out = {"jax_step_s": float(np.median(times)), "jax_step_times": times, "compile_s": compile_s,
           "jax_peak_rss_gb": _peak_rss_gb()}
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["jax_peak_device_gb"] = stats["peak_bytes_in_use"] / 2**30
    return out


def worker_torch(args) -> dict:
    import torch

    from torch_ref import CustomLLM, CustomLLMConfig

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = CustomLLMConfig.from_preset(args.preset, embedding_dropout=0.0)
    model = CustomLLM(config).to(device).train()
    # Mixed precision as the Trainer does it (bf16=True): float32 weights, bfloat16 autocast.
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    rng = np.random.RandomState(0)
    ids = torch.from_numpy(rng.randint(0, config.vocab_size, (args.batch_size, args.seq_len))).to(device)

    def one():
        with autocast:
            out = model(ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_router_bias(out.expert_counts)
        if device == "cuda":
            torch.cuda.synchronize()

    times = _timeit(one, args.warmup, args.iters)
    out = {"torch_step_s": float(np.median(times)), "torch_step_times": times, "torch_peak_rss_gb": _peak_rss_gb(),
           "torch_threads": torch.get_num_threads()}
    if device == "cuda":
        out["torch_peak_device_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


WORKERS = {"matmul": worker_matmul, "jax": worker_jax, "torch": worker_torch}


# ---- orchestration ----------------------------------------------------------------------------
def _run_worker(kind: str, argv: list[str], timeout: int) -> dict:
    cmd = [sys.executable, "-m", "jaxllm.bench", "--worker", kind, *argv]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench_case(preset: str, batch_size: int, seq_len: int, *, dtype: str, iters: int, warmup: int, frameworks,
               moe_impl: str, moe_block: int, remat: bool, mesh: str | None, timeout: int) -> dict:
    from jaxllm.config import LLMConfig
    from jaxllm.flops import training_flops_per_token

    argv = ["--preset", preset, "--batch-size", str(batch_size), "--seq-len", str(seq_len), "--dtype", dtype,
            "--iters", str(iters), "--warmup", str(warmup), "--moe-impl", moe_impl, "--moe-block", str(moe_block)]
    if remat:
        argv.append("--remat")
    if mesh:
        argv += ["--mesh", mesh]
    case = {"preset": preset, "batch_size": batch_size, "seq_len": seq_len, "dtype": dtype, "moe_impl": moe_impl}
    tokens = batch_size * seq_len
    flops = training_flops_per_token(LLMConfig.from_preset(preset), seq_len) * tokens
    case["train_flops_per_step"] = flops
    if "jax" in frameworks:
        case.update(_run_worker("jax", argv, timeout))
        case["jax_tokens_per_sec"] = tokens / case["jax_step_s"]
        case["jax_flops_per_sec"] = flops / case["jax_step_s"]
        case["jax_gflops"] = case["jax_flops_per_sec"] / 1e9
    if "torch" in frameworks:
        case.update(_run_worker("torch", argv, timeout))
        case["torch_tokens_per_sec"] = tokens / case["torch_step_s"]
        case["torch_flops_per_sec"] = flops / case["torch_step_s"]
    if "jax" in frameworks and "torch" in frameworks:
        case["jax_over_torch"] = case["jax_tokens_per_sec"] / case["torch_tokens_per_sec"]
    case["peak_rss_gb"] = case.get("jax_peak_rss_gb")
    return case


def markdown(result: dict) -> str:
    peak = result["matmul"].get("jax_matmul_float32_flops")
    lines = [f"device: {result['matmul'].get('device')}; measured float32 matmul peak: JAX "
             f"{peak / 1e9:.0f} GFLOP/s"
             + (f", PyTorch {result['matmul']['torch_matmul_float32_flops'] / 1e9:.0f} GFLOP/s"
                if "torch_matmul_float32_flops" in result["matmul"] else ""), "",
             "| preset | batch x seq | dtype | moe | JAX tok/s | PyTorch tok/s | JAX/PyTorch | JAX GFLOP/s | "
             "JAX MFU (measured peak) | MFU (datasheet) | compile s | JAX peak RSS GB | PyTorch peak RSS GB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in result["cases"]:
        def f(key, fmt="{:.1f}"):
            return fmt.format(c[key]) if c.get(key) is not None else "-"
        lines.append(
            f"| {c['preset']} | {c['batch_size']} x {c['seq_len']} | {c['dtype']} | {c['moe_impl']} | "
            f"{f('jax_tokens_per_sec')} | {f('torch_tokens_per_sec')} | {f('jax_over_torch', '{:.2f}x')} | "
            f"{f('jax_gflops')} | {f('jax_mfu_measured_peak', '{:.1%}')} | "
            f"{f('jax_mfu_datasheet', '{:.1%}')} | {f('compile_s')} | {f('jax_peak_rss_gb')} | "
            f"{f('torch_peak_rss_gb')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Side-by-side JAX / PyTorch training-step benchmark.")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="small preset only, few iterations (< 3 min on 2 cores)")
    p.add_argument("--preset", default=None, help="only this preset (default: small, and seed-973m unless --quick)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--frameworks", default="jax,torch")
    p.add_argument("--moe-impl", default="sparse", choices=["sparse", "gather", "scan", "ragged", "dense"])
    p.add_argument("--moe-block", type=int, default=128)
    p.add_argument("--remat", action="store_true")
    p.add_argument("--scan-unroll", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--mesh", default=None)
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--torch-matmul", action="store_true")
    p.add_argument("--peak-flops", type=float, default=None, help="datasheet peak per device (known GPUs/TPUs are looked up)")
    p.add_argument("--json", help="also write the figures as JSON here")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per worker")
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return 0

    frameworks = args.frameworks.split(",")
    if args.preset:
        shapes = [(args.preset, args.batch_size or 4, args.seq_len or 256)]
    elif args.quick:
        shapes = [("small", args.batch_size or 8, args.seq_len or 128)]
    else:
        shapes = [("small", 8, 128), ("seed-973m", 4, 256)]
    iters = args.iters or (3 if args.quick else 5)
    matmul_argv = ["--matmul-size", str(args.matmul_size)] + (["--torch-matmul"] if "torch" in frameworks else [])
    result = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "cases": [],
              "matmul": _run_worker("matmul", matmul_argv, args.timeout)}
    peak = result["matmul"]["jax_matmul_float32_flops" if args.dtype == "float32" else "jax_matmul_bfloat16_flops"]
    from jaxllm.flops import device_peak_flops

    datasheet = args.peak_flops
    if datasheet is None:
        import jax

        datasheet = device_peak_flops(jax.devices()[0], args.dtype)
    for preset, b, t in shapes:
        print(f"benchmarking {preset} at {b} x {t} ...", file=sys.stderr, flush=True)
        case = bench_case(preset, b, t, dtype=args.dtype, iters=iters, warmup=args.warmup, frameworks=frameworks,
                          moe_impl=args.moe_impl, moe_block=args.moe_block, remat=args.remat, mesh=args.mesh,
                          timeout=args.timeout)
        if "jax_flops_per_sec" in case:
            case["jax_mfu_measured_peak"] = case["jax_flops_per_sec"] / peak
            case["jax_mfu_datasheet"] = case["jax_flops_per_sec"] / datasheet if datasheet else None
        result["cases"].append(case)
    print(markdown(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
