"""Side-by-side benchmark of full training steps (forward, backward, optimizer) in JAX and in the
PyTorch reference, plus the machine's matmul peak, all measured in the same run: once at the start
and again by each framework's worker just before its steps and after them (the MFU's denominator
from the same minutes as its numerator).

Each measurement runs in its own subprocess (`python -m jaxllm.bench --worker ...`) so that peak
memory is per framework and one framework's threads do not disturb the other's. With `--rounds R`
the two frameworks' workers take turns R times (JAX first, then PyTorch first, ...), so that a
shared machine's slow and fast minutes fall on both: the step times pool over the rounds, and
each round's own JAX/PyTorch ratio is reported next to the pooled one. A timed step whose loss or
gradient norm is not finite is its case's error (exit status 1), not a throughput.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import signal
import statistics
import subprocess
import sys
import time

import numpy as np

from jaxllm import cli, hostmem
from jaxllm.recipes import ATTN_IMPLS, MOE_IMPLS


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


# On a CPU, a product timed right after a large JAX step runs up to a third slower for about a second
# (seed-973m: 154-206 GFLOP/s in the first samples, 230-273 two seconds later), so the peak samples
# around the steps wait this long first (`--settle-s`). Accelerators' products do not share the host's state.
SETTLE_S = 2.0


def _timed_steps_with_peak(one, sample, warmup: int, iters: int, settle_s: float,
                           on_cpu: bool) -> tuple[list[float], list[float]]:
    """(step times, peak samples): the matmul peak (median of 3 products, after `settle_s` of rest on a
    CPU) just before the warm-up and after the last timed step, around `_timeit(one, warmup, iters)`;
    the steps themselves run back to back as without it."""
    settle_s = settle_s if on_cpu else 0.0
    for _ in range(3):  # compile and warm up
        sample()

    def peak():
        time.sleep(settle_s)
        return float(np.median([sample() for _ in range(3)]))

    before = peak()
    times = _timeit(one, warmup, iters)
    return times, [before, peak()]


class NonFiniteStep(RuntimeError):
    """A timed training step whose loss or gradient norm is not finite: its time is no benchmark's (the
    JAX step skips the update of such a step, PyTorch's fills the weights with NaN)."""


def _check_finite(steps: list, warmup: int) -> None:
    """`steps`: each step's (loss, gradient norm), the warm-up's first; NonFiniteStep names the first
    timed step with a value that is not finite."""
    timed = steps[warmup:]
    for i, (loss, norm) in enumerate(timed, 1):
        loss, norm = float(loss), float(norm)
        if not (math.isfinite(loss) and math.isfinite(norm)):
            raise NonFiniteStep(f"timed step {i} of {len(timed)} has loss {loss}, gradient norm {norm}: "
                                "a diverging step's time is no throughput")


def _median_seconds(fn, repeats: int, warmup=None) -> float:
    """Median wall time of `fn` over `repeats` calls, after one call of `warmup` (default `fn`)."""
    (warmup or fn)()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_decode(preset: str = "small", *, new_tokens: int = 256, prompt_len: int = 16, batch_size: int = 1,
                   seed: int = 0, frameworks=("jax", "torch"), repeats: int = 3,
                   torch_threads: int | None = None, recompute: bool = True) -> dict:
    """Decode tokens/s with the latent cache and with full recomputation for each framework
    (float32, as each framework computes it: bench.py's worker and bench_decode.py set PyTorch's
    products as JAX's, TF32 on NVIDIA GPUs; the same randomly initialised weights, greedy, no early
    stop), plus the cache
    bytes per token of `seed-973m` against a full K/V cache. The slow recomputation runs are
    timed once (after their warm-up). `torch_threads`: PyTorch's intra-op threads (default: its
    own choice; on a shared machine one thread can be faster for these small matmuls).
    `recompute=False`: the cached decode only."""
    import numpy as np

    from jaxllm.config import LLMConfig
    from jaxllm.generate import cache_bytes_per_token, full_kv_bytes_per_token, generate
    from jaxllm.model import create_model

    config = LLMConfig.from_preset(preset)
    if prompt_len + new_tokens > config.max_position_embeddings:
        raise ValueError(f"new_tokens: {prompt_len} + {new_tokens} tokens exceed max_position_embeddings "
                         f"({config.max_position_embeddings}) of preset {preset}")
    prompts = np.random.RandomState(seed).randint(1, config.vocab_size, (batch_size, prompt_len)).tolist()
    jm = create_model(config, seed=seed)
    n = batch_size * new_tokens
    seed_cfg = LLMConfig.from_preset("seed-973m")
    result = {"preset": preset, "new_tokens": new_tokens, "prompt_len": prompt_len, "batch_size": batch_size,
              "seed973m_cache_bytes_per_token": cache_bytes_per_token(seed_cfg),
              "seed973m_full_kv_bytes_per_token": full_kv_bytes_per_token(seed_cfg)}
    tokens = {}
    # (use_cache, name, timed calls): the slow recomputation is timed once
    modes = [(True, "cached", repeats)] + ([(False, "recompute", 1)] if recompute else [])
    if "jax" in frameworks:
        for use_cache, mode, reps in modes:
            def run(use_cache=use_cache, key=f"jax_{mode}"):
                tokens[key] = generate(jm, prompts, max_new_tokens=new_tokens, stop_at_eos=False,
                                       use_cache=use_cache).tokens
            result[f"jax_{mode}_tokens_per_sec"] = n / _median_seconds(run, reps)
    if "torch" in frameworks:
        import torch

        from convert.mapping import flax_to_torch
        from jaxllm.weights import get_weights
        from torch_ref import CustomLLM, CustomLLMConfig

        if torch_threads:
            torch.set_num_threads(torch_threads)
        result["torch_threads"] = torch.get_num_threads()
        sd = flax_to_torch(get_weights(jm), config)
        device = "cuda" if torch.cuda.is_available() else "cpu"  # as the JAX side runs on its default device
        tm = CustomLLM.from_state_dict(CustomLLMConfig.from_llm_config(config),
                                       {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}).to(device)
        ids = torch.tensor(prompts, device=device)
        def run(use_cache, steps=new_tokens):
            with torch.no_grad():
                out = tm.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                  use_cache=use_cache, eos_token_id=None, pad_token_id=config.pad_token_id)
            tokens[f"torch_{'cached' if use_cache else 'recompute'}"] = out[:, prompt_len:].cpu().numpy()

        for use_cache, mode, reps in modes:
            # Nothing compiles in PyTorch: a 2-token call warms it up.
            result[f"torch_{mode}_tokens_per_sec"] = n / _median_seconds(lambda: run(use_cache), reps,
                                                                        warmup=lambda: run(use_cache, 2))
    for fw in frameworks:
        if recompute:
            result[f"{fw}_speedup"] = result[f"{fw}_cached_tokens_per_sec"] / result[f"{fw}_recompute_tokens_per_sec"]
    names = sorted(tokens)
    result["same_tokens"] = all(np.array_equal(tokens[names[0]], tokens[k]) for k in names[1:])
    return result


def report(text: str, result: dict, json_path: str | None) -> None:
    """Print the markdown table; with `--json PATH`, write the same figures there."""
    print(text)
    if json_path:  # whole or not at all (a SIGTERM may come at any moment: `bench_gpu.sh` reads it after)
        cli.write_json(json_path, result)


# ---- workers ------------------------------------------------------------------------------------
def jax_matmul_sampler(n: int, dtype: str):
    """A function that times one sample of JAX's `[n, n] x [n, n]` product in `dtype` and returns its
    FLOP/s (call it a few times first: the first call compiles). Random operands: constant ones or
    zeros draw less power, and GPUs run them faster than real data; made afresh (untimed) for each
    sample and dropped after it, so that nothing stays allocated between samples (the workers'
    peak memory is the steps'). On an accelerator a sample is 10 products back to back (no host
    round trip between)."""
    import jax

    reps = 10 if jax.devices()[0].platform != "cpu" else 1
    f = jax.jit(lambda x: x @ x)

    def sample() -> float:
        a = jax.random.normal(jax.random.key(0), (n, n), dtype).block_until_ready()
        t0 = time.perf_counter()
        for _ in range(reps):
            y = f(a)
        y.block_until_ready()
        return 2 * n**3 * reps / (time.perf_counter() - t0)

    return sample


def torch_float32_as_jax(torch) -> str | None:
    """PyTorch's float32 products as JAX computes them at its default precision, so that a float32
    comparison is like for like: TF32 on NVIDIA GPUs (PyTorch keeps TF32 off by default, XLA uses
    it); nothing to do on CPUs, where both are full float32. Returns what was set, for the JSON."""
    if not torch.cuda.is_available():
        return None
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return "tf32"


def torch_matmul_sampler(n: int, dtype: str):
    """`jax_matmul_sampler`'s twin for PyTorch (its default device: CUDA if there is one)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    reps = 10 if device == "cuda" else 1
    torch_float32_as_jax(torch)

    def sample() -> float:
        t = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            t @ t
        if device == "cuda":
            torch.cuda.synchronize()
        return 2 * n**3 * reps / (time.perf_counter() - t0)

    return sample


def _peak(sample) -> float:
    """The median of 5 samples after 3 warm-ups."""
    return float(np.median([sample() for _ in range(8)][3:]))


def worker_matmul(args) -> dict:
    out = {}
    import jax

    # float32 always; bfloat16 on accelerators and whenever the steps run in it (the peak of their MFU).
    accel = jax.devices()[0].platform != "cpu"
    for dtype in ["float32"] + (["bfloat16"] if accel or args.dtype == "bfloat16" else []):
        out[f"jax_matmul_{dtype}_flops"] = _peak(jax_matmul_sampler(args.matmul_size, dtype))
    if args.torch_matmul:
        out["torch_matmul_float32_flops"] = _peak(torch_matmul_sampler(args.matmul_size, "float32"))
    out["device"] = str(jax.devices()[0].device_kind)
    out["malloc"] = hostmem.describe()  # the workers share the orchestrator's environment
    return out


def compiled_step(config, mesh, batch_size: int, seq_len: int, *, dtype: str, moe_impl: str, moe_block: int | None,
                  remat: str, attn_impl: str = "xla", **model_kw):
    """A benchmark's training step (no dropout, one micro-batch, AdamW), compiled ahead of time for
    one random batch: (step, state, batch, compile seconds). `model_kw`: the model's other settings
    (`scan_unroll`; None: the model's default). Turns JAX's persistent compilation
    cache off in this process (`jaxllm/xla_cache.py`): the seconds are a compile, not a load."""
    import jax.numpy as jnp

    from jaxllm import xla_cache
    from jaxllm.train import OptimConfig, Trainer

    xla_cache.disable()

    trainer = Trainer(config, OptimConfig(lr=1e-4, warmup_steps=1, total_steps=1000), mesh,
                      batch_size=batch_size, grad_accum=1, seq_len=seq_len, dropout=False,
                      dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32,
                      moe_impl=moe_impl, moe_block=moe_block, remat=remat, attn_impl=attn_impl, **model_kw)
    state = trainer.init_state()
    batch = trainer.put_batch(np.random.RandomState(0).randint(0, config.vocab_size, (batch_size, seq_len)))
    t0 = time.perf_counter()
    step = trainer.step_fn.lower(state, batch).compile()
    return step, state, batch, time.perf_counter() - t0


def worker_jax(args) -> dict:
    import jax

    from jaxllm import sharding as shd
    from jaxllm.config import LLMConfig, count_params
    from jaxllm.recipes import resolve_remat

    config = LLMConfig.from_preset(args.preset)
    remat = resolve_remat(args.remat, count_params(config), grad_accum=1)
    # One device, as the PyTorch worker uses, unless --mesh asks for more (then the MFU is against
    # the peak of that many devices).
    mesh = shd.make_mesh(args.mesh, None if args.mesh else jax.devices()[:1])
    step, state, batch, compile_s = compiled_step(
        config, mesh, args.batch_size, args.seq_len, dtype=args.dtype,
        moe_impl=args.moe_impl, moe_block=args.moe_block, remat=remat, attn_impl=args.attn_impl,
        scan_unroll=args.scan_unroll)
    holder = {"state": state}
    steps = []  # each step's (loss, gradient norm), read after the timing

    def one():
        holder["state"], m = step(holder["state"], batch)
        jax.block_until_ready((holder["state"], m))  # all of the step's work, not only the loss
        steps.append((m["loss"], m["grad_norm"]))

    # The matmul peak again, before and after the steps, in this process: the MFU's denominator
    # measured in the same minutes as its numerator (a shared machine's speed drifts within minutes).
    times, peaks = _timed_steps_with_peak(one, jax_matmul_sampler(args.matmul_size, args.dtype), args.warmup,
                                          args.iters, args.settle_s, on_cpu=jax.devices()[0].platform == "cpu")
    _check_finite(steps, args.warmup)
    out = {"jax_step_s": float(np.median(times)), "jax_step_times": times, "compile_s": compile_s,
           "jax_peak_rss_gb": _peak_rss_gb(), "remat": remat, "jax_peak_samples": peaks, "jax_devices": mesh.size}
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["jax_peak_device_gb"] = stats["peak_bytes_in_use"] / 2**30
    return out


def worker_torch(args) -> dict:
    import torch

    from torch_ref import CustomLLM, CustomLLMConfig

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    float32_products = torch_float32_as_jax(torch)
    config = CustomLLMConfig.from_preset(args.preset, embedding_dropout=0.0)
    model = CustomLLM(config).to(device).train()
    # Mixed precision as the Trainer does it (bf16=True): float32 weights, bfloat16 autocast.
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    rng = np.random.RandomState(0)
    ids = torch.from_numpy(rng.randint(0, config.vocab_size, (args.batch_size, args.seq_len))).to(device)
    steps = []  # each step's (loss, gradient norm), read after the timing

    def one():
        with autocast:
            out = model(ids, labels=ids)
        out.loss.backward()
        steps.append((out.loss.detach(), torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_router_bias(out.expert_counts)
        if device == "cuda":
            torch.cuda.synchronize()

    times, peaks = _timed_steps_with_peak(one, torch_matmul_sampler(args.matmul_size, args.dtype), args.warmup,
                                          args.iters, args.settle_s, on_cpu=device == "cpu")
    _check_finite(steps, args.warmup)
    out = {"torch_step_s": float(np.median(times)), "torch_step_times": times, "torch_peak_rss_gb": _peak_rss_gb(),
           "torch_threads": torch.get_num_threads(), "torch_peak_samples": peaks}
    if float32_products:
        out["torch_float32_products"] = float32_products
    if device == "cuda":
        out["torch_peak_device_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


DECODE_PROMPT = 16  # prompt tokens of bench.py's decode measurement


def worker_decode(args) -> dict:
    import torch

    torch_float32_as_jax(torch)
    r = measure_decode(args.preset, new_tokens=args.decode_tokens, prompt_len=DECODE_PROMPT, batch_size=1,
                       frameworks=tuple(f for f in args.frameworks.split(",") if f in ("jax", "torch")),
                       recompute=False, repeats=2)
    return {f"{fw}_decode_tokens_per_sec": r[f"{fw}_cached_tokens_per_sec"] for fw in ("jax", "torch")
            if f"{fw}_cached_tokens_per_sec" in r}


WORKERS = {"matmul": worker_matmul, "jax": worker_jax, "torch": worker_torch, "decode": worker_decode}


# ---- orchestration ----------------------------------------------------------------------------
def _worker_command(kind: str, argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """The worker's command line and environment: it runs this process's own jaxllm (and torch_ref).
    `python -m` puts the working directory first on sys.path, so a worker started from another
    checkout (or a folder holding a jaxllm) ran that one's code: `-P` leaves the working directory
    out, and the checkout around this file, if any, goes first on PYTHONPATH (an installed copy is
    found as the orchestrator found it)."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    if os.path.isfile(os.path.join(root, "pyproject.toml")) and os.path.isdir(os.path.join(root, "jaxllm")):
        if env.get("PYTHONPATH", "").split(os.pathsep)[0] != root:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return [sys.executable, "-P", "-m", "jaxllm.bench", "--worker", kind, *argv], env


def _run_worker(kind: str, argv: list[str], timeout: int) -> dict:
    cmd, env = _worker_command(kind, argv)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    said = _said(r.stdout)
    if r.returncode != 0 and said:  # the worker's own one-line error (`NonFiniteStep`)
        raise RuntimeError(f"{kind} worker: {said}")
    if r.returncode != 0:
        raise RuntimeError(f"{kind} worker failed ({_ended(r.returncode)}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _said(stdout: str) -> str | None:
    """The error a worker reported as its last line of output (`{"error": ...}`), if any."""
    try:
        last = json.loads(stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return None
    return last.get("error") if isinstance(last, dict) else None


def _ended(returncode: int) -> str:
    """How a worker process ended, for its error's first line (the one the table and JSON keep)."""
    if returncode >= 0:
        return f"exit status {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return f"killed by {name}" + (", out of memory?" if -returncode == signal.SIGKILL else "")


def _within(timeout: float, deadline: float | None, kind: str) -> float:
    """A worker's timeout: `timeout`, cut to what is left of the run's `--budget` (a `time.monotonic()`
    deadline), so that the orchestrator always outlives its workers and writes what they measured."""
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left < 1:
        raise RuntimeError(f"--budget spent before the {kind} worker started")
    return min(timeout, left)


def _stop_on_sigterm(signum, frame):
    raise RuntimeError("stopped by SIGTERM (an outer timeout?) before the workers finished")


def default_rounds(preset: str) -> int:
    """Turns of the two frameworks when `--rounds` is not given: 3 where a step takes about a second
    (presets under 200M parameters, `small`), 1 where a round takes minutes (`seed-973m`)."""
    from jaxllm.config import LLMConfig, count_params

    return 3 if count_params(LLMConfig.from_preset(preset)) < 200_000_000 else 1


def _pool(runs: list[dict], fw: str) -> dict:
    """One framework's figures over rounds: every step time, their median, the median compile time,
    the largest peak memory, every matmul peak sample taken around the steps and their median."""
    times = [t for r in runs for t in r[f"{fw}_step_times"]]
    out = {**runs[-1], f"{fw}_step_times": times, f"{fw}_step_s": float(np.median(times))}
    if all(r.get(f"{fw}_peak_samples") for r in runs):
        out[f"{fw}_peak_samples"] = [p for r in runs for p in r[f"{fw}_peak_samples"]]
        out[f"{fw}_peak_around_steps_flops"] = float(np.median(out[f"{fw}_peak_samples"]))
    if "compile_s" in out:  # the JAX worker's
        out["compile_s"] = float(np.median([r["compile_s"] for r in runs]))
    for key in (f"{fw}_peak_rss_gb", f"{fw}_peak_device_gb"):
        if key in runs[-1]:
            out[key] = max(r[key] for r in runs)
    return out


def bench_case(preset: str, batch_size: int, seq_len: int, *, dtype: str, iters: int, warmup: int, frameworks,
               moe_impl: str, moe_block: int | None, remat: str | None, mesh: str | None, timeout: int,
               compare_dense: bool = False, decode_tokens: int = 0, rounds: int = 1, attn_impl: str = "xla",
               matmul_size: int = 2048, case: dict | None = None, deadline: float | None = None,
               scan_unroll: int | None = None, settle_s: float = SETTLE_S) -> dict:
    """One preset and shape: each framework's worker in turn, `rounds` times (a fresh process each
    time; odd rounds start with PyTorch). `case` (a dict) is filled in as the workers finish, so
    that a caller keeps what was measured before a worker failed."""
    from jaxllm.config import LLMConfig
    from jaxllm.flops import training_flops_per_token

    def worker_argv(impl: str) -> list[str]:
        argv = ["--preset", preset, "--batch-size", str(batch_size), "--seq-len", str(seq_len), "--dtype", dtype,
                "--iters", str(iters), "--warmup", str(warmup), "--moe-impl", impl,
                "--attn-impl", attn_impl, "--matmul-size", str(matmul_size), "--settle-s", str(settle_s)]
        if remat is not None:
            argv += ["--remat", remat]
        if moe_block is not None:
            argv += ["--moe-block", str(moe_block)]
        if scan_unroll is not None:
            argv += ["--scan-unroll", str(scan_unroll)]
        return argv + (["--mesh", mesh] if mesh else [])

    argv = worker_argv(moe_impl)
    case = {} if case is None else case
    case.update(preset=preset, batch_size=batch_size, seq_len=seq_len, dtype=dtype, moe_impl=moe_impl,
                moe_block=moe_block, attn_impl=attn_impl, scan_unroll=scan_unroll)
    tokens = batch_size * seq_len
    flops = training_flops_per_token(LLMConfig.from_preset(preset), seq_len) * tokens
    case["train_flops_per_step"] = flops
    runs = {fw: [] for fw in ("jax", "torch") if fw in frameworks}
    try:
        for r in range(rounds):
            for fw in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                runs[fw].append(_run_worker(fw, argv, _within(timeout, deadline, fw)))
                case.update(_pool(runs[fw], fw))
                case[f"{fw}_tokens_per_sec"] = tokens / case[f"{fw}_step_s"]
                case[f"{fw}_flops_per_sec"] = flops / case[f"{fw}_step_s"]
            if len(runs) == 2:
                case["jax_over_torch"] = case["jax_tokens_per_sec"] / case["torch_tokens_per_sec"]
                if rounds > 1:
                    case["jax_over_torch_rounds"] = [t["torch_step_s"] / j["jax_step_s"]
                                                     for j, t in zip(runs["jax"], runs["torch"])]
    finally:  # also when a later worker failed: the figures of those that finished stay complete
        for fw, fw_runs in runs.items():  # MFU against the peak sampled around the steps, pooled and by round
            n = case.get("jax_devices", 1) if fw == "jax" else 1  # the peak is one device's
            if f"{fw}_peak_around_steps_flops" in case:
                case[f"{fw}_mfu_around_steps_peak"] = (case[f"{fw}_flops_per_sec"]
                                                       / (n * case[f"{fw}_peak_around_steps_flops"]))
                if rounds > 1:
                    case[f"{fw}_mfu_rounds"] = [flops / r[f"{fw}_step_s"]
                                                / (n * float(np.median(r[f"{fw}_peak_samples"]))) for r in fw_runs]
        if "jax_flops_per_sec" in case:
            case["jax_gflops"] = case["jax_flops_per_sec"] / 1e9
        case["peak_rss_gb"] = case.get("jax_peak_rss_gb")
    if "jax" in frameworks and compare_dense and moe_impl != "dense":
        dense = _run_worker("jax", worker_argv("dense"), _within(timeout, deadline, "jax"))
        case["jax_dense_step_s"] = dense["jax_step_s"]
        case["jax_dense_peak_rss_gb"] = dense["jax_peak_rss_gb"]
        case["sparse_over_dense"] = dense["jax_step_s"] / case["jax_step_s"]
    if decode_tokens:
        case.update(_run_worker("decode", ["--preset", preset, "--decode-tokens", str(decode_tokens),
                                           "--frameworks", ",".join(frameworks)],
                                _within(timeout, deadline, "decode")))
    return case


def _or_exit(fn, *a, **kw):
    """`fn(*a, **kw)` (which runs workers), or the failed worker's stderr and exit status 1 (no
    orchestrator traceback)."""
    try:
        return fn(*a, **kw)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"bench.py: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


def markdown(result: dict) -> str:
    mm = result["matmul"]
    lines = [f"device: {mm.get('device')} ({mm.get('malloc')}); measured float32 "
             f"matmul peak: JAX {mm['jax_matmul_float32_flops'] / 1e9:.0f} GFLOP/s"
             + (f", PyTorch {mm['torch_matmul_float32_flops'] / 1e9:.0f} GFLOP/s"
                if "torch_matmul_float32_flops" in mm else "")
             + (f"; bfloat16: JAX {mm['jax_matmul_bfloat16_flops'] / 1e9:.0f} GFLOP/s"
                if "jax_matmul_bfloat16_flops" in mm else ""), "",
             "| preset | batch x seq | dtype | moe, remat | JAX tok/s | PyTorch tok/s | JAX/PyTorch | JAX GFLOP/s | "
             "JAX MFU (measured peak: around the steps / at start) | MFU (datasheet) | compile s | JAX peak RSS GB | "
             "PyTorch peak RSS GB | sparse/dense step | decode tok/s JAX / PyTorch | peak device GB JAX / PyTorch |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in result["cases"]:
        def f(key, fmt="{:.1f}"):
            return fmt.format(c[key]) if c.get(key) is not None else "-"
        lines.append(
            f"| {c['preset']} | {c['batch_size']} x {c['seq_len']} | {c['dtype']} | "
            f"{c['moe_impl']}, {c.get('remat', '-')}"
            f"{', ' + c['attn_impl'] + ' attention' if c.get('attn_impl', 'xla') != 'xla' else ''}"
            f"{', layers unrolled ' + str(c['scan_unroll']) + ' at a time' if c.get('scan_unroll') else ''} | "
            f"{f('jax_tokens_per_sec')} | {f('torch_tokens_per_sec')} | {f('jax_over_torch', '{:.2f}x')} | "
            f"{f('jax_gflops')} | {f('jax_mfu_around_steps_peak', '{:.1%}')} / {f('jax_mfu_start_peak', '{:.1%}')} | "
            f"{f('jax_mfu_datasheet', '{:.1%}')} | {f('compile_s')} | {f('jax_peak_rss_gb')} | "
            f"{f('torch_peak_rss_gb')} | {f('sparse_over_dense', '{:.2f}x')} | "
            f"{f('jax_decode_tokens_per_sec')} / {f('torch_decode_tokens_per_sec')} | "
            f"{f('jax_peak_device_gb')} / {f('torch_peak_device_gb')} |")
    for c in result["cases"]:
        if c.get("jax_over_torch_rounds"):
            lines.append(f"\n{c['preset']}: JAX/PyTorch by round (each framework's median step in that round): "
                         + ", ".join(f"{x:.2f}x" for x in c["jax_over_torch_rounds"]))
        for fw, name in (("jax", "JAX"), ("torch", "PyTorch")):
            if c.get(f"{fw}_peak_samples"):
                p = np.asarray(c[f"{fw}_peak_samples"]) / 1e9
                lines.append(f"\n{c['preset']}: {c['dtype']} matmul peak sampled around the {name} steps: median "
                             f"{np.median(p):.0f} GFLOP/s ({p.min():.0f}-{p.max():.0f}, {p.size} samples); {name} MFU "
                             f"against it {c[f'{fw}_mfu_around_steps_peak']:.1%}"
                             + (", by round: " + ", ".join(f"{x:.1%}" for x in c[f"{fw}_mfu_rounds"])
                                if c.get(f"{fw}_mfu_rounds") else ""))
    return "\n".join(lines)


def _check_args(p, args, shapes, decode_tokens: int) -> None:
    """Bad input: one line on stderr, exit status 2, before any worker starts."""
    cli.check_at_least(p, args, batch_size=1, seq_len=2, iters=1, warmup=0, decode_tokens=0, matmul_size=1,
                       timeout=1, rounds=1, budget=1, moe_block=1, scan_unroll=1)
    cli.check_json_path(p, args.json)
    cli.check_peak_flops(p, args.peak_flops)
    if not 0 <= args.settle_s < float("inf"):
        p.error(f"--settle-s must be a number of seconds, 0 or more, got {args.settle_s}")
    configs = [cli.preset_config(p, preset, seq_len) for preset, _, seq_len in shapes]
    for (preset, _, _), c in zip(shapes, configs):
        longest = c.max_position_embeddings
        if decode_tokens and DECODE_PROMPT + decode_tokens > longest:
            p.error(f"--decode-tokens: preset {preset} holds at most {longest} positions, and the decode "
                    f"measurement starts from a {DECODE_PROMPT}-token prompt")
    unknown = set(args.frameworks.split(",")) - {"jax", "torch"}
    if unknown or not args.frameworks:
        p.error(f"--frameworks: a comma-separated list of jax and torch, got {args.frameworks!r}")
    cli.check_attn_impl(p, args.attn_impl, args.dtype)
    if args.mesh:  # the mesh, and each case's batch and model on it, as training checks them
        from jaxllm import sharding as shd

        try:
            mesh = shd.make_mesh(args.mesh)
            for (_, batch, _), c in zip(shapes, configs):
                shd.check_batch(batch, mesh)
                shd.check_mesh(mesh, hidden_size=c.hidden_size, num_routed_experts=c.num_routed_experts)
        except ValueError as e:
            p.error(" ".join(str(e).split()))


def main(argv=None) -> int:
    p = cli.ArgumentParser(prog="bench.py", description="Side-by-side JAX / PyTorch training-step benchmark.")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="small preset only, few iterations (< 3 min on 2 cores)")
    p.add_argument("--preset", default=None, help="only this preset (default: small, and seed-973m unless --quick)")
    p.add_argument("--batch-size", type=int, default=None, help="with --preset or --quick (default 4, --quick 8)")
    p.add_argument("--seq-len", type=int, default=None, help="with --preset or --quick (default 256, --quick 128)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype of both frameworks' steps (default float32)")
    p.add_argument("--iters", type=int, default=None, help="timed steps per round (default 5, --quick 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before them (default 1)")
    p.add_argument("--rounds", type=int, default=None,
                   help="turns of the JAX and PyTorch workers, alternating which goes first; the step times "
                        "pool over the rounds (default: 3 for presets under 200M parameters, 1 above)")
    p.add_argument("--frameworks", default="jax,torch", help="jax, torch, or jax,torch (default: both)")
    p.add_argument("--moe-impl", default="sparse", choices=MOE_IMPLS,
                   help="the JAX step's routed-expert dispatch, equal results (default sparse: the platform's "
                        "fastest sparse one)")
    p.add_argument("--moe-block", type=int, default=None,
                   help="rows per block of the sparse dispatches (default: by dispatch, jaxllm.model.MOE_BLOCKS)")
    p.add_argument("--scan-unroll", type=int, default=None,
                   help="unroll the JAX model's scan over layers N at a time (default: the model's, whole up to 8 "
                        "layers; on a GPU 30 made the seed-973m step 13-15%% faster and its compile about 4x longer)")
    p.add_argument("--attn-impl", default="xla", choices=ATTN_IMPLS,
                   help="the JAX step's attention: xla, or cudnn (cuDNN's fused attention; NVIDIA GPUs, bfloat16)")
    cli.add_remat_flags(p)
    p.add_argument("--compare-dense", action="store_true",
                   help="also time the JAX step with the dense MoE dispatch (reports sparse/dense)")
    p.add_argument("--decode-tokens", type=int, default=None,
                   help="new tokens for the decode measurement (default 64; 0 skips it)")
    p.add_argument("--mesh", default=None, help="JAX's device mesh, e.g. data=8 (default: one device, as the PyTorch "
                   "side; MFU is against the peak of all the mesh's devices)")
    p.add_argument("--matmul-size", type=int, default=2048,
                   help="N of the N x N x N product that measures the matmul peak (default 2048)")
    p.add_argument("--torch-matmul", action="store_true", help=argparse.SUPPRESS)  # the matmul worker's own flag
    p.add_argument("--settle-s", type=float, default=SETTLE_S,
                   help=f"seconds of rest before each peak sample on a CPU (default {SETTLE_S:g}: a product right "
                        "after a large step runs slower for about a second)")
    p.add_argument("--peak-flops", type=float, default=None, help="datasheet peak per device (known GPUs/TPUs are looked up)")
    p.add_argument("--json", type=cli.path, help="also write the figures as JSON here")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per worker (default 1800)")
    p.add_argument("--budget", type=int, default=None,
                   help="seconds for the whole run: each worker's timeout is cut to what is left, so that what was "
                        "measured is still written (give it a margin under any outer timeout)")
    args = p.parse_args(argv)
    # The orchestrator initialises JAX's backend too (device name, --attn-impl check), and its
    # workers run beside it: on a GPU, JAX's default preallocation of 75% of the memory in the
    # orchestrator would leave the workers a quarter. Allocate on demand, here and in the workers
    # (which inherit it, as under bench_gpu.sh); set it to override.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if args.worker:
        try:
            print(json.dumps(WORKERS[args.worker](args)))
        except NonFiniteStep as e:  # for the orchestrator: the case's error, in one line
            print(json.dumps({"error": str(e)}))
            return 1
        return 0
    frameworks = args.frameworks.split(",")
    if args.preset:
        shapes = [(args.preset, args.batch_size or 4, args.seq_len or 256)]
    elif args.quick:
        shapes = [("small", args.batch_size or 8, args.seq_len or 128)]
    elif args.batch_size or args.seq_len:
        p.error("--batch-size / --seq-len: give a --preset (or --quick) too; the full run has fixed shapes "
                "(small 8 x 128, seed-973m 4 x 256)")
    else:
        shapes = [("small", 8, 128), ("seed-973m", 4, 256)]
    iters = args.iters or (3 if args.quick else 5)
    decode_tokens = 64 if args.decode_tokens is None else args.decode_tokens
    _check_args(p, args, shapes, decode_tokens)
    matmul_argv = (["--matmul-size", str(args.matmul_size), "--dtype", args.dtype]
                   + (["--torch-matmul"] if "torch" in frameworks else []))
    deadline = None if args.budget is None else time.monotonic() + args.budget
    if argv is None:  # a command-line run: on an outer `timeout`'s SIGTERM, still write what was measured
        signal.signal(signal.SIGTERM, _stop_on_sigterm)
    result = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "cases": [],
              "matmul": _or_exit(lambda: _run_worker("matmul", matmul_argv, _within(args.timeout, deadline, "matmul")))}
    peak = result["matmul"]["jax_matmul_float32_flops" if args.dtype == "float32" else "jax_matmul_bfloat16_flops"]
    from jaxllm.flops import device_peak_flops

    datasheet = args.peak_flops
    if datasheet is None:  # the matmul worker's device name (this process need not start a JAX backend)
        datasheet = device_peak_flops(str(result["matmul"].get("device", "")), args.dtype)
    failed = None
    for preset, b, t in shapes:
        print(f"benchmarking {preset} at {b} x {t} ...", file=sys.stderr, flush=True)
        rounds = args.rounds or default_rounds(preset)
        case = {}
        try:
            bench_case(preset, b, t, dtype=args.dtype, iters=iters, warmup=args.warmup, frameworks=frameworks,
                       moe_impl=args.moe_impl, moe_block=args.moe_block, remat=args.remat, mesh=args.mesh,
                       timeout=args.timeout, compare_dense=args.compare_dense, decode_tokens=decode_tokens,
                       rounds=rounds, attn_impl=args.attn_impl, matmul_size=args.matmul_size, case=case,
                       scan_unroll=args.scan_unroll, settle_s=args.settle_s,
                       deadline=deadline)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            failed = e  # report what was measured, then the error
        if "jax_flops_per_sec" in case:
            # Against the peak sampled around the JAX steps (the same minutes), else the run's first one.
            n = case.get("jax_devices", 1)  # the peaks are one device's
            case["jax_mfu_start_peak"] = case["jax_flops_per_sec"] / (n * peak)
            case["jax_mfu_measured_peak"] = case.get("jax_mfu_around_steps_peak", case["jax_mfu_start_peak"])
            case["jax_mfu_datasheet"] = case["jax_flops_per_sec"] / (n * datasheet) if datasheet else None
        result["cases"].append(case)
        if failed:
            case["error"] = str(failed).splitlines()[0]
            break
    report(markdown(result), result, args.json)
    if failed:
        print(f"bench.py: error: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
