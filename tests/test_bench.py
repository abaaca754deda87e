"""scripts/bench.py and scripts/bench_products.py: the report's figures, the products' inventory, and bad
input (no timing is asserted: speed lives in BENCHMARKS.md, measured side by side)."""

import json
import math
import statistics
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPT = str(ROOT / "scripts" / "bench.py")


def test_a_missing_mfu_reads_as_missing_not_as_a_negative_number():
    """The JAX MFU cell is "around the steps / at start": with either missing it read `--` or
    `-13.4%`."""
    import jaxllm.bench as bench

    case = {"preset": "tiny", "batch_size": 2, "seq_len": 32, "dtype": "float32", "moe_impl": "sparse"}
    result = {"matmul": {"jax_matmul_float32_flops": 1e11}, "cases": [case]}
    assert "| - / - |" in bench.markdown(result)
    case["jax_mfu_start_peak"] = 0.134
    assert "| - / 13.4% |" in bench.markdown(result)


def test_json_is_written_through_a_temporary_file_of_this_process(tmp_path, monkeypatch):
    """`--json PATH` (the benchmarks, evaluate.py) is whole or not at all, through a temporary
    file named by the process: with `PATH.tmp` for all, two runs given the same path wrote into one
    file, and a user's own `PATH.tmp` was overwritten and taken away."""
    import os

    from jaxllm import cli

    path = tmp_path / "out.json"
    (tmp_path / "out.json.tmp").write_text("mine")
    cli.write_json(str(path), {"a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2]} and path.read_text().endswith("}\n")
    assert (tmp_path / "out.json.tmp").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "out.json.tmp"]
    monkeypatch.setattr(os, "getpid", lambda: 4242)
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: opened.append(str(f)) or real_open(f, *a, **k))
    with pytest.raises(TypeError):  # not JSON: nothing half-written is left, the old file stays
        cli.write_json(str(path), {"a": object()})
    assert opened == [f"{path}.4242.tmp"]
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "out.json.tmp"]


@pytest.mark.parametrize("returncode, said", [(-9, "killed by SIGKILL, out of memory?"), (-15, "killed by SIGTERM"),
                                              (1, "exit status 1")])
def test_a_worker_that_dies_is_said_with_how_it_ended(monkeypatch, returncode, said):
    """A worker killed (the kernel's out-of-memory killer sends SIGKILL) left an empty reason in
    the error line and the JSON: its exit status or signal is the first line now."""
    import subprocess

    import jaxllm.bench as bench

    monkeypatch.setattr(bench.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, returncode, "", ""))
    with pytest.raises(RuntimeError) as e:
        bench._run_worker("torch", [], 10)
    assert str(e.value).splitlines()[0] == f"torch worker failed ({said}):"


def test_a_tiny_case_reports_both_frameworks_in_the_table_and_the_json(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, SCRIPT, "--preset", "tiny", "--batch-size", "8", "--seq-len", "8",
                        "--iters", "2", "--warmup", "1", "--decode-tokens", "0", "--matmul-size", "128",
                        "--rounds", "2", "--settle-s", "0", "--json", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(out.read_text())
    (case,) = result["cases"]
    assert case["preset"] == "tiny" and (case["batch_size"], case["seq_len"]) == (8, 8)
    for key in ("jax_tokens_per_sec", "torch_tokens_per_sec", "jax_mfu_measured_peak", "compile_s", "peak_rss_gb",
                "jax_over_torch"):
        assert isinstance(case[key], float) and case[key] > 0, key
    assert len(case["jax_step_times"]) == len(case["torch_step_times"]) == 4  # 2 rounds of 2 steps
    assert case["jax_devices"] == 1  # as the PyTorch worker (the tests simulate 8 CPU devices; no --mesh)
    assert len(case["jax_over_torch_rounds"]) == 2
    assert case["jax_tokens_per_sec"] == pytest.approx(64 / case["jax_step_s"])
    assert case["jax_over_torch"] == pytest.approx(case["jax_tokens_per_sec"] / case["torch_tokens_per_sec"])
    assert result["matmul"]["jax_matmul_float32_flops"] > 0
    # the peak sampled before and after each worker's steps, in both rounds: the MFU's denominator
    assert len(case["jax_peak_samples"]) == 4 and min(case["jax_peak_samples"]) > 0
    assert case["jax_mfu_measured_peak"] == pytest.approx(
        case["jax_flops_per_sec"] / statistics.median(case["jax_peak_samples"]))
    assert case["jax_mfu_start_peak"] == pytest.approx(
        case["jax_flops_per_sec"] / result["matmul"]["jax_matmul_float32_flops"])
    assert len(case["jax_mfu_rounds"]) == 2
    assert len(case["torch_peak_samples"]) == 4 and case["torch_mfu_around_steps_peak"] == pytest.approx(
        case["torch_flops_per_sec"] / statistics.median(case["torch_peak_samples"]))
    row = next(line for line in r.stdout.splitlines() if line.startswith("| tiny |"))
    assert f"{case['jax_tokens_per_sec']:.1f} | {case['torch_tokens_per_sec']:.1f} |" in row


def test_the_decode_measurement_times_both_frameworks_on_the_same_tokens():
    """bench.py's decode figures (as its worker asks for them): both frameworks' greedy tokens on the
    latent cache are the same, and each gets a rate."""
    from jaxllm.bench import measure_decode

    r = measure_decode("tiny", new_tokens=3, prompt_len=4, batch_size=2, repeats=1, recompute=False)
    assert r["same_tokens"] is True
    assert r["jax_cached_tokens_per_sec"] > 0 and r["torch_cached_tokens_per_sec"] > 0
    assert r["seed973m_cache_bytes_per_token"] < r["seed973m_full_kv_bytes_per_token"]


@pytest.mark.parametrize("args, message", [
    (["--preset", "nope"], "--preset: unknown preset 'nope'"),
    (["--iters", "0"], "--iters must be at least 1"),
    (["--rounds", "0"], "--rounds must be at least 1"),
    (["--batch-size", "2"], "--batch-size / --seq-len: give a --preset"),
    (["--frameworks", "jax,tf"], "--frameworks"),
    (["--quick", "--seq-len", "-4"], "--seq-len must be at least 2"),
    (["--mesh", "data=0"], "--mesh"),
    (["--preset", "tiny", "--seq-len", "16", "--batch-size", "3", "--mesh", "data=8"],
     "batch size 3 cannot be divided over the mesh's 8 batch shards"),
    (["--preset", "tiny", "--seq-len", "16", "--batch-size", "8", "--mesh", "expert=2,data=4"],
     "--mesh: expert=2 does not divide"),
    (["--preset", "tiny"], "--seq-len: preset tiny holds at most 128 positions, got 256"),
    (["--preset", "tiny", "--seq-len", "64", "--decode-tokens", "120"], "--decode-tokens: preset tiny"),
    (["--quick", "--json", "/nonexistent/bench.json"], "--json"),
    (["--quick", "--json", "/tmp"], "--json: /tmp is a directory"),
    (["--quick", "--json=~/no folder/bench.json"], "--json: the folder of {home}/no folder/bench.json does not exist"),
    (["--quick", "--json", "/proc/bench.json"], "--json: cannot write a file in the folder of /proc/bench.json ("),
    (["--quick", "--moe-block", "0"], "--moe-block must be at least 1"),
    (["--quick", "--scan-unroll", "0"], "--scan-unroll must be at least 1"),
    (["--quick", "--peak-flops", "-1"], "--peak-flops must be a positive number"),
    (["--quick", "--settle-s", "-1"], "--settle-s must be a number of seconds, 0 or more"),
    (["--quick", "--settle-s", "nan"], "--settle-s must be a number of seconds"),
    (["--quick", "--attn-impl", "cudnn", "--dtype", "bfloat16"], "--attn-impl: attn_impl 'cudnn' needs an NVIDIA GPU"),
])
def test_bad_input_is_one_line_and_exit_2_before_any_worker_starts(args, message, capsys, tmp_path, monkeypatch):
    from jaxllm.bench import main

    monkeypatch.setenv("HOME", str(tmp_path))  # (`~` expanded, as in every path flag)
    message = message.format(home=tmp_path)
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_a_failed_worker_is_its_error_and_exit_1_without_a_traceback(monkeypatch, capsys):
    import jaxllm.bench as bench

    def fail(kind, argv, timeout):
        raise RuntimeError(f"{kind} worker failed:\nMemoryError")

    monkeypatch.setattr(bench, "_run_worker", fail)
    with pytest.raises(SystemExit) as e:
        bench.main(["--quick"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("bench.py: error: matmul worker failed:") and "Traceback" not in err


def test_a_failed_worker_keeps_what_the_workers_before_it_measured(monkeypatch, tmp_path, capsys):
    """A PyTorch worker that fails after the JAX one finished: the table and the JSON still hold the
    JAX figures, the case names the error, and the exit status is 1."""
    import jaxllm.bench as bench

    def run(kind, argv, timeout):
        if kind == "matmul":
            return {"jax_matmul_float32_flops": 1e11, "device": "cpu"}
        if kind == "jax":
            return {"jax_step_s": 0.5, "jax_step_times": [0.5], "compile_s": 3.0, "jax_peak_rss_gb": 1.0,
                    "jax_peak_samples": [1e11, 1.2e11]}
        raise RuntimeError(f"{kind} worker failed:\nCUDA out of memory")

    monkeypatch.setattr(bench, "_run_worker", run)
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--decode-tokens", "0", "--json", str(out)]) == 1
    captured = capsys.readouterr()
    assert "\nbench.py: error: torch worker failed:\n" in captured.err and "Traceback" not in captured.err
    (case,) = json.loads(out.read_text())["cases"]
    assert case["jax_tokens_per_sec"] == pytest.approx(8 * 128 / 0.5) and case["compile_s"] == 3.0
    assert case["error"] == "torch worker failed:" and "torch_tokens_per_sec" not in case
    assert case["peak_rss_gb"] == 1.0  # the JAX worker's, measured before the failure
    assert f"| {case['jax_tokens_per_sec']:.1f} | - |" in captured.out
    assert case["jax_mfu_around_steps_peak"] == pytest.approx(case["jax_flops_per_sec"] / 1.1e11)


def test_pytorch_float32_products_are_set_as_jax_computes_them(monkeypatch):
    """On an NVIDIA GPU XLA computes float32 products as TF32 and PyTorch by default does not: the
    benchmark's PyTorch side turns TF32 on there (a float32 comparison of like with like), and
    leaves a CPU as it is."""
    import torch

    from jaxllm.bench import torch_float32_as_jax

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:  # (torch.backends' flags are properties: monkeypatch cannot undo them)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert torch_float32_as_jax(torch) is None and not torch.backends.cuda.matmul.allow_tf32
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert torch_float32_as_jax(torch) == "tf32"
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_budget_cuts_every_workers_timeout_to_what_is_left_of_the_run(monkeypatch, capsys):
    """`--budget`: the workers together fit in it (an outer `timeout` then never kills the
    orchestrator before it writes what they measured)."""
    import jaxllm.bench as bench

    timeouts = []

    def run(kind, argv, timeout):
        timeouts.append(timeout)
        if kind == "matmul":
            return {"jax_matmul_float32_flops": 1e11, "device": "cpu"}
        return {f"{kind}_step_s": 0.5, f"{kind}_step_times": [0.5], "compile_s": 3.0, f"{kind}_peak_rss_gb": 1.0}

    monkeypatch.setattr(bench, "_run_worker", run)
    assert bench.main(["--quick", "--decode-tokens", "0", "--rounds", "1", "--timeout", "1800", "--budget", "90"]) == 0
    assert len(timeouts) == 3 and all(0 < t <= 90 for t in timeouts)
    assert bench.main(["--quick", "--decode-tokens", "0", "--rounds", "1", "--timeout", "60", "--budget", "90"]) == 0
    assert timeouts[3:] == [60, 60, 60]
    capsys.readouterr()


def test_rounds_alternate_which_framework_goes_first_and_pool_the_step_times(monkeypatch, tmp_path, capsys):
    """`--rounds 3`: workers in the order J T, T J, J T; every step time pooled into one median per
    framework; each round's own ratio in the JSON and under the table; the peak memory is the
    largest of the rounds."""
    import jaxllm.bench as bench

    order, steps = [], {"jax": iter([[1.0, 1.0], [2.0, 2.0], [4.0, 4.0]]),
                        "torch": iter([[3.0, 3.0], [3.0, 3.0], [3.0, 3.0]])}

    def run(kind, argv, timeout):
        if kind == "matmul":
            return {"jax_matmul_float32_flops": 1e11, "device": "cpu"}
        order.append(kind)
        times = next(steps[kind])
        out = {f"{kind}_step_times": times, f"{kind}_step_s": times[0], f"{kind}_peak_rss_gb": len(order)}
        peaks = [8e10, 1e11, 1.2e11] if len(order) < 3 else [4e10, 5e10, 6e10]  # a slower machine later
        if kind == "torch":
            return {**out, "torch_peak_samples": [1e11, 1e11, 1e11]}
        return {**out, "compile_s": 10.0 * len(order), "jax_peak_samples": peaks}

    monkeypatch.setattr(bench, "_run_worker", run)
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--rounds", "3", "--decode-tokens", "0", "--json", str(out)]) == 0
    assert order == ["jax", "torch", "torch", "jax", "jax", "torch"]
    (case,) = json.loads(out.read_text())["cases"]
    assert case["jax_step_times"] == [1.0, 1.0, 2.0, 2.0, 4.0, 4.0] and case["jax_step_s"] == 2.0
    assert case["torch_step_s"] == 3.0 and case["jax_over_torch"] == pytest.approx(1.5)
    assert case["jax_over_torch_rounds"] == pytest.approx([3.0, 1.5, 0.75])
    assert case["compile_s"] == 40.0 and case["jax_peak_rss_gb"] == 5 and case["torch_peak_rss_gb"] == 6
    # MFU against the peak sampled around the JAX steps (median of all 9 samples: 6e10), and by round
    # against that round's own samples; the run's first peak (1e11) gives the other figure
    flops = case["train_flops_per_step"]
    assert case["jax_peak_around_steps_flops"] == 6e10
    assert case["jax_mfu_measured_peak"] == pytest.approx(flops / 2.0 / 6e10)
    assert case["jax_mfu_start_peak"] == pytest.approx(flops / 2.0 / 1e11)
    assert case["jax_mfu_rounds"] == pytest.approx([flops / 1.0 / 1e11, flops / 2.0 / 5e10, flops / 4.0 / 5e10])
    printed = capsys.readouterr().out
    assert "small: JAX/PyTorch by round (each framework's median step in that round): 3.00x, 1.50x, 0.75x" \
        in printed
    assert case["torch_mfu_around_steps_peak"] == pytest.approx(flops / 3.0 / 1e11)
    assert case["torch_mfu_rounds"] == pytest.approx([flops / 3.0 / 1e11] * 3)
    mfu = case["jax_mfu_rounds"]
    assert (f"small: float32 matmul peak sampled around the JAX steps: median 60 GFLOP/s (40-120, 9 samples); JAX "
            f"MFU against it {case['jax_mfu_measured_peak']:.1%}, by round: {mfu[0]:.1%}, {mfu[1]:.1%}, {mfu[2]:.1%}") \
        in printed
    assert "small: float32 matmul peak sampled around the PyTorch steps: median 100 GFLOP/s (100-100, 9 samples)" \
        in printed
    assert f"| {case['jax_mfu_measured_peak']:.1%} / {case['jax_mfu_start_peak']:.1%} |" in printed


def test_the_peak_is_sampled_before_the_warm_up_and_after_the_last_step_never_between_steps(monkeypatch):
    from jaxllm import bench

    calls, flops = [], iter(range(1, 100))

    def sample():
        calls.append("p")
        return float(next(flops))

    monkeypatch.setattr(bench.time, "sleep", lambda s: calls.append(f"({s:g})"))
    times, peaks = bench._timed_steps_with_peak(lambda: calls.append("s"), sample, warmup=1, iters=3, settle_s=0.5,
                                                 on_cpu=True)
    # the warm-up samples, a rest, 3 samples, the warm-up step, the timed steps, a rest, 3 samples
    assert "".join(calls) == "ppp" + "(0.5)ppp" + "s" + "sss" + "(0.5)ppp"
    assert len(times) == 3 and peaks == [5.0, 8.0]  # medians of (4, 5, 6) and (7, 8, 9)


@pytest.mark.parametrize("fw", ["jax", "torch"])
def test_a_timed_step_whose_loss_is_not_finite_is_the_worker_s_error(fw, monkeypatch, capsys):
    """The workers timed whatever the steps computed: a diverging (NaN) step was reported as a
    throughput like any other (and the JAX step skips the update of such a step, so it is not even
    the same work). A model whose weights are NaN: the worker reports an error in one line of JSON
    and exits 1."""
    import jax
    import jax.numpy as jnp

    from jaxllm import bench, xla_cache

    if fw == "jax":
        real = bench.compiled_step

        def poisoned(*a, **kw):
            step, state, batch, seconds = real(*a, **kw)
            return step, {**state, "params": jax.tree.map(lambda x: x * jnp.nan, state["params"])}, batch, seconds

        monkeypatch.setattr(bench, "compiled_step", poisoned)
        monkeypatch.setattr(xla_cache, "disable", lambda: None)  # (this test process keeps its cache setting)
    else:
        import torch
        import torch_ref

        class Poisoned(torch_ref.CustomLLM):
            def __init__(self, config):
                super().__init__(config)
                with torch.no_grad():
                    next(self.parameters()).fill_(float("nan"))

        monkeypatch.setattr(torch_ref, "CustomLLM", Poisoned)
    argv = ["--worker", fw, "--preset", "tiny", "--batch-size", "1", "--seq-len", "8", "--iters", "2", "--warmup",
            "1", "--matmul-size", "16", "--settle-s", "0"]
    assert bench.main(argv) == 1
    error = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["error"]
    assert error == "timed step 1 of 2 has loss nan, gradient norm nan: a diverging step's time is no throughput"


def test_a_worker_s_non_finite_step_is_the_case_s_error_in_one_line(monkeypatch, tmp_path, capsys):
    """The orchestrator gives the worker's own error as the case's error and exits 1."""
    import subprocess

    import jaxllm.bench as bench

    said = "timed step 2 of 3 has loss nan, gradient norm nan: a diverging step's time is no throughput"

    def run(cmd, **kw):
        kind = cmd[cmd.index("--worker") + 1]
        if kind == "matmul":
            return subprocess.CompletedProcess(cmd, 0, json.dumps({"jax_matmul_float32_flops": 1e11}) + "\n", "")
        return subprocess.CompletedProcess(cmd, 1, json.dumps({"error": said}) + "\n", "")

    monkeypatch.setattr(bench.subprocess, "run", run)
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--frameworks", "jax", "--decode-tokens", "0", "--json", str(out)]) == 1
    (case,) = json.loads(out.read_text())["cases"]
    assert case["error"] == f"jax worker: {said}" and "jax_tokens_per_sec" not in case
    assert capsys.readouterr().err.endswith(f"bench.py: error: jax worker: {said}\n")


def test_rounds_default_to_three_for_small_presets_and_one_for_seed_973m():
    from jaxllm.bench import default_rounds

    assert (default_rounds("tiny"), default_rounds("small"), default_rounds("seed-973m")) == (3, 3, 1)


def test_the_matmul_worker_measures_the_peak_of_the_steps_dtype():
    """`--dtype bfloat16` MFU is against the bfloat16 peak, which the worker then measures on CPUs too."""
    import argparse

    from jaxllm.bench import worker_matmul

    for dtype, keys in (("float32", {"jax_matmul_float32_flops"}),
                        ("bfloat16", {"jax_matmul_float32_flops", "jax_matmul_bfloat16_flops"})):
        out = worker_matmul(argparse.Namespace(matmul_size=64, dtype=dtype, torch_matmul=False))
        assert {k for k in out if k.startswith("jax_matmul")} == keys and all(out[k] > 0 for k in keys)


def test_the_products_ceiling_inventory_matches_the_analytic_count_of_seed_973m():
    """scripts/bench_products.py times the step's products; its inventory must be the model's:
    the projections' FLOPs equal flops.py's, the routed experts run 7 x (256 + 64) rows a layer."""
    import importlib.util

    from jaxllm.config import LLMConfig
    from jaxllm.flops import forward_flops_per_token

    spec = importlib.util.spec_from_file_location("bench_products", ROOT / "scripts" / "bench_products.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = LLMConfig.from_preset("seed-973m")
    inventory = mod.products(config, 1024, 256)
    flop = {name: 2 * m * k * n * batch * count for name, m, k, n, batch, count in inventory}
    counted = forward_flops_per_token(config, 256)
    assert sum(v for name, v in flop.items() if name.startswith("attention ") and "batched" not in name) \
        == counted["mla_projections"] * 1024
    # the routed products run 2,240 padded rows a layer for the 2,048 assignments counted
    routed = sum(v for name, v in flop.items() if name.startswith("routed"))
    shared = sum(v for name, v in flop.items() if name.startswith("shared"))
    assert shared + routed * 2048 / 2240 == pytest.approx(counted["experts"] * 1024, rel=1e-12)
    rows = {name: m * count for name, m, k, n, batch, count in inventory if name.startswith("routed down")}
    assert sum(rows.values()) == 30 * 7 * (256 + 64)
    assert flop["lm_head"] == counted["lm_head"] * 1024
    with pytest.raises(SystemExit) as e:
        mod.main(["--preset", "tiny", "--seq-len", "500"])
    assert e.value.code == 2


def test_the_products_are_timed_inside_the_loop_not_hoisted_out_of_it():
    """bench_products.py times n products back to back in one loop: each form's product (forward,
    input gradient, weight gradient; plain and batched) must stay in the loop's body, where XLA
    runs it n times, and the loop must give the product's value."""
    import importlib.util
    import re

    import jax
    import numpy as np

    spec = importlib.util.spec_from_file_location("bench_products", ROOT / "scripts" / "bench_products.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    key = jax.random.split(jax.random.key(0), 3)
    for lead in ((), (3,)):
        x, w, g = (jax.random.normal(k, (*lead, *shape)) for k, shape in zip(key, ((8, 16), (16, 32), (8, 32))))
        for form, f in mod.product_forms().items():
            loop = mod.product_loop(f, 5)
            hlo = loop.lower(x, w, g).compile().as_text()
            body = re.search(r"body=%([\w.\-]+)", hlo).group(1)
            # the while body's computations (the body and what it calls) hold the product
            called, todo = set(), [body]
            while todo:
                name = todo.pop()
                if name in called:
                    continue
                called.add(name)
                block = re.search(r"^%" + re.escape(name) + r" [^\n]*\{\n(.*?)\n\}", hlo, re.M | re.S).group(1)
                todo += re.findall(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)", block)
                if re.search(r" dot\(", block):
                    break
            else:
                raise AssertionError(f"{form} {lead}: no product in the loop body\n{hlo}")
            np.testing.assert_allclose(np.asarray(loop(x, w, g)), np.asarray(f(x, w, g)), rtol=1e-6)


def _script(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _profile_step():
    return _script("profile_step")


@pytest.mark.parametrize("args, message", [
    (["--json", "/nonexistent/decode.json"], "--json: the folder of /nonexistent/decode.json does not exist"),
    (["--json", "/tmp"], "--json: /tmp is a directory (give a file name)"),
    (["--json", "/proc/x.json"], "--json: cannot write a file in the folder of /proc/x.json ("),
    (["--json", "/tmp/no folder/"], "--json: /tmp/no folder/ ends in a slash, a folder's name (give a file name)"),
    (["--json=~/no folder/decode.json"], "--json: the folder of {home}/no folder/decode.json does not exist"),
    (["--torch-threads", "-1"], "--torch-threads must be at least 1, got -1"),
    (["--torch-threads", "0"], "--torch-threads must be at least 1, got 0"),
    (["--new-tokens", "0"], "--new-tokens must be at least 1, got 0"),
    (["--prompt-len", "0"], "--prompt-len must be at least 1, got 0"),
])
def test_bench_decode_refuses_bad_input_before_it_runs(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # (`~` expanded, as in every path flag)
    message = message.format(home=tmp_path)
    with pytest.raises(SystemExit) as e:
        _script("bench_decode").main(["--preset", "tiny", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_profile_step_times_each_variant_on_the_cpu(tmp_path):
    out = tmp_path / "steps.json"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "profile_step.py"), "--preset", "tiny",
                        "--seq-len", "16", "--dtype", "float32", "--variants", "8:dense:none", "4:sparse:dots",
                        "--steps", "1", "--json", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "8 x 16 dense, remat none: step " in r.stdout and "tok/s" in r.stdout
    assert "4 x 16 sparse (grouped)/128, remat dots: step " in r.stdout, r.stdout
    assert "XLA's ops, per step: a " in r.stdout and "heaviest other ops" in r.stdout, r.stdout
    dense, sparse = json.loads(out.read_text())  # each variant's figures, as printed
    assert (dense["batch"], dense["moe_impl"], dense["moe_block"], dense["remat"]) == (8, "dense", None, "none")
    assert (sparse["dispatch"], sparse["moe_block"], sparse["attn_impl"]) == ("grouped", 128, "xla")
    assert sparse["step_ms"] > 0 and sparse["tokens_per_sec"] > 0 and "error" not in sparse
    # each variant's own memory (XLA's plan), not the process's peak so far: the second, smaller
    # step (half the batch, activations recomputed) shows less than the first
    assert 0 < sparse["xla_peak_gb"] < dense["xla_peak_gb"], (sparse["xla_peak_gb"], dense["xla_peak_gb"])
    assert f"XLA peak {sparse['xla_peak_gb']:.1f} GiB" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--variants", "2:foo:none"], "--variants: '2:foo:none' is not BATCH:MOE_IMPL:REMAT[:MOE_BLOCK]"),
    (["--variants", "0:dense:none"], "--variants: '0:dense:none'"),
    (["--variants", "2:gather:dots:0"], "--variants: '2:gather:dots:0'"),
    (["--preset", "tiny"], "--seq-len: preset tiny holds at most 128 positions"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--mesh", "data=8", "--variants", "8:dense:none", "3:dense:none"],
     "batch size 3 cannot be divided over the mesh's 8 batch shards"),
    (["--mesh", "data=3"], "--mesh"),
    # an axis that splits nothing, refused as training refuses it (it profiled a replicated step)
    (["--preset", "tiny", "--seq-len", "16", "--mesh", "expert=2,data=4", "--variants", "8:dense:none"],
     "--mesh: expert=2 does not divide the 7 routed experts"),
    (["--attn-impl", "cudnn"], "--attn-impl: attn_impl 'cudnn' needs an NVIDIA GPU"),
    (["--scan-unroll", "0"], "--scan-unroll must be at least 1, got 0"),
    (["--json", "/nonexistent/steps.json"], "--json: the folder of /nonexistent/steps.json does not exist"),
    (["--json", "/tmp"], "--json: /tmp is a directory (give a file name)"),
    (["--json", "/proc/x.json"], "--json: cannot write a file in the folder of /proc/x.json ("),
    (["--json=~/no folder/steps.json"], "--json: the folder of {home}/no folder/steps.json does not exist"),
    (["--peak-flops=-5e10"], "--peak-flops must be a positive number, got -50000000000.0"),
    (["--peak-flops", "0"], "--peak-flops must be a positive number, got 0.0"),
    (["--budget=-5"], "--budget must be a positive number of seconds, got -5.0"),
    (["--budget", "nan"], "--budget must be a positive number of seconds, got nan"),
])
def test_profile_step_bad_input_is_one_line_and_exit_2(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    message = message.format(home=tmp_path)
    with pytest.raises(SystemExit) as e:
        _profile_step().main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_profile_step_names_a_cpu_peak_and_the_variants_left_out_as_given(capsys):
    """A CPU's --peak-flops (hundreds of GFLOP/s) was announced as "MFU against 0 TFLOP/s", and the
    variants a spent --budget left out as "2:dense:none:None" (the resolved block appended)."""
    rc = _profile_step().main(["--preset", "tiny", "--seq-len", "16", "--dtype", "float32", "--no-profile",
                               "--variants", "2:dense:none", "4:gather:dots", "--peak-flops", "2.5e11",
                               "--budget", "1e-9"])  # spent before the first variant: nothing compiles
    out = capsys.readouterr().out
    assert rc == 0
    assert "; MFU against 250 GFLOP/s" in out.splitlines()[0], out
    assert "--budget spent: 2:dense:none and after not run" in out, out
    assert _profile_step()._rate(989e12) == "989 TFLOP/s"


def test_profile_step_names_the_jax_op_behind_a_kernel():
    """Kernels are named after HLO instructions (`fusion.12` runs as `fusion_12`); a fusion's op is
    the first one inside it that carries `op_name` metadata."""
    hlo = """
%fused_mul.3 (p0: f32[4]) -> f32[4] {
  %p0 = f32[4]{0} parameter(0)
  ROOT %m = f32[4]{0} multiply(%p0, %p0), metadata={op_name="jit(step)/mul"}
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %a = f32[4]{0} parameter(0)
  %loop_multiply_fusion.12 = f32[4]{0} fusion(%a), kind=kLoop, calls=%fused_mul.3
  ROOT %sort_7 = f32[4]{0} sort(%loop_multiply_fusion.12), metadata={op_name="jit(step)/sort"}
}
"""
    mod = _profile_step()
    assert mod.hlo_op_name(hlo, "loop_multiply_fusion_12") == "jit(step)/mul"
    assert mod.hlo_op_name(hlo, "sort_7") == "jit(step)/sort"
    assert mod.hlo_op_name(hlo, "nvjet_sm90_tst_256x96") == ""
    assert mod.GEMM.search("nvjet_sm90_tst_256x96_64x4") and not mod.GEMM.search("loop_select_fusion_2")


def test_profile_step_cpu_report_splits_the_step_into_products_and_the_rest():
    """On a CPU: the time matrix products ran (a dot, or a fusion holding one), the time only other
    ops did and the time none did, within the span; `while` events (which span their bodies) and
    names that are not HLO instructions are left out."""
    hlo = """
%fused_dot.1 (p0: f32[4,4], p1: f32[4,4]) -> f32[4,4] {
  %p0 = f32[4,4]{1,0} parameter(0)
  %p1 = f32[4,4]{1,0} parameter(1)
  ROOT %d = f32[4,4]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_add.2 (p0: f32[4,4]) -> f32[4,4] {
  %p0 = f32[4,4]{1,0} parameter(0)
  ROOT %a = f32[4,4]{1,0} add(%p0, %p0), metadata={op_name="jit(step)/add"}
}

ENTRY %main (x: f32[4,4]) -> (f32[4,4], f32[4,4]) {
  %x = f32[4,4]{1,0} parameter(0)
  %ynn_fusion.3 = f32[4,4]{1,0} fusion(%x, %x), kind=kCustom, calls=%fused_dot.1
  %add_fusion.4 = f32[4,4]{1,0} fusion(%ynn_fusion.3), kind=kLoop, calls=%fused_add.2
  %dot.5 = f32[4,4]{1,0} dot(%x, %x), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %while.6 = (f32[4,4], f32[4,4]) while(%x, %x), condition=%c, body=%b
  ROOT %t = (f32[4,4], f32[4,4]) tuple(%add_fusion.4, %dot.5)
}
"""
    mod = _profile_step()
    ops = mod.hlo_instructions(hlo)
    assert ops["ynn_fusion.3"] == ("f32[4,4]", "fusion", True)
    assert ops["add_fusion.4"] == ("f32[4,4]", "fusion", False)
    assert ops["dot.5"][2] and ops["while.6"][1] == "while" and ops["t"][0] == "(f32[4,4], f32[4,4])"
    ms = 1_000_000
    events = [("ynn_fusion.3", 0, 10 * ms), ("add_fusion.4", 5 * ms, 10 * ms), ("dot.5", 20 * ms, 2 * ms),
              ("add_fusion.4", 30 * ms, 10 * ms), ("while.6", 0, 60 * ms), ("ThunkExecutor::Execute", 0, 90 * ms)]
    lines = mod.cpu_ops(events, 2, hlo, top=5)
    # span 0-40 ms over 2 steps: products 0-10 and 20-22 ms, plus the 15-20 ms gap that ends at the
    # Eigen dot; only other ops 10-15 and 30-40 ms; none 22-30 ms
    assert lines[0] == ("  XLA's ops, per step: a 20.0 ms span; matrix products (dots and the fusions holding one) "
                        "running during 8.5 ms (2.5 ms of it the gaps before Eigen `dot` ops), only other ops "
                        "during 7.5 ms, none during 4.0 ms"), lines[0]
    assert lines[1] == "  thread time per step (summed over threads): matrix products 6.0 ms, other ops 10.0 ms"
    assert "add_fusion 10" in lines[2] and "while" not in "\n".join(lines)
    assert "add_fusion.4" in lines[4] and "f32[4,4]" in lines[4] and "jit(step)/add" in lines[4]
    assert mod.cpu_ops([("nothing", 0, 1)], 1, hlo, top=5) == ["  no XLA ops in the trace"]


@pytest.mark.parametrize("args, message", [
    (["--seed=-1"], "argument --seed: must be in 0 .. 2**32 - 1, got -1"),
    (["--seed", "4294967296"], "argument --seed: must be in 0 .. 2**32 - 1, got 4294967296"),
    (["--tolerance=-1"], "--tolerance must be a positive number, got -1.0"),
    (["--tolerance", "nan"], "--tolerance must be a positive number, got nan"),
    (["--tolerance", "0"], "--tolerance must be a positive number, got 0.0"),
    (["--tolerance=-0"], "--tolerance must be a positive number, got -0.0"),
    (["--tolerance", "inf"], "--tolerance must be a positive number, got inf"),
])
def test_compare_frameworks_bad_input_is_one_line_and_exit_2(args, message, capsys):
    """Refused before anything is trained: a seed NumPy refused later without naming the flag, a
    tolerance that made the comparison fail (or pass) whatever the gap."""
    with pytest.raises(SystemExit) as e:
        _script("compare_frameworks").main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("args, message", [
    (["--lr", "0"], "--lr must be a finite positive number, got 0.0"),
    (["--lr", "inf"], "--lr must be a finite positive number, got inf"),
    (["--warmup-steps=-1"], "--warmup-steps must be non-negative, got -1"),
    (["--preset", "bogus"], "--preset: unknown preset 'bogus'; known presets: seed-973m, small, "),
])
def test_compare_frameworks_names_a_bad_setting_by_its_flag_before_building_the_batches(args, message, capsys,
                                                                                       monkeypatch):
    """The optimizer's own errors named the setting ("lr must be positive"), not the flag, and an
    unknown preset was found only after the batches had been tokenized."""
    import torch_ref.crosscheck

    def not_reached(*a, **k):
        raise AssertionError("the batches were built")

    monkeypatch.setattr(torch_ref.crosscheck, "embedded_batches", not_reached)
    assert _script("compare_frameworks").main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("compare_frameworks.py: error: " + message), err


@pytest.mark.parametrize("loss_gap, weight_gap", [(2e-6, 3e-5), (3e-5, 2e-6)])
def test_compare_frameworks_verdict_and_exit_status_follow_the_tolerance(loss_gap, weight_gap, capsys, monkeypatch):
    """PASS and exit status 0 when both the largest loss gap and the largest weight gap are within
    --tolerance (a gap equal to it included), FAIL and status 1 when either exceeds it, however
    small the tolerance. The comparison's result is given here (its training is tested in
    tests/test_train_torch.py); the script's own data and arguments are real."""
    from torch_ref import crosscheck

    result = crosscheck.CrossCheck(jax_losses=[8.0, 7.5], torch_losses=[8.0, 7.5 * (1 + loss_gap)],
                                   weight_gaps={"embed_tokens.weight": weight_gap / 10, "lm_head.weight": weight_gap},
                                   router_bias_max_abs_diff=0.0)
    loss_gap, weight_gap = result.max_loss_gap, result.max_weight_gap[1]  # (as the script computes them)
    calls = []
    monkeypatch.setattr(crosscheck, "cross_check", lambda *a, **kw: calls.append(a) or result)
    script = _script("compare_frameworks")
    argv = ["--steps", "2", "--grad-accum", "1", "--batch-size", "2", "--seq-len", "8"]
    for tolerance, verdict in [(1e-300, "FAIL"), (min(loss_gap, weight_gap), "FAIL"),
                               (max(loss_gap, weight_gap), "PASS"), (0.5, "PASS")]:
        rc = script.main(argv + ["--tolerance", repr(tolerance)])
        out, err = capsys.readouterr()
        assert (rc, err) == ((0 if verdict == "PASS" else 1), ""), (tolerance, rc, err)
        assert out.splitlines()[-1] == f"{verdict}: tolerance {tolerance:g} relative", out
        assert result.table() in out
    assert len(calls) == 4 and calls[0][1].shape == (2, 2, 8)  # (the batches of --steps x rows x --seq-len)


def test_compare_frameworks_reports_a_run_that_diverges_as_a_fail_with_its_table(capsys):
    """A learning rate that makes the loss non-finite in step 3: the PyTorch side stops there
    (`NonFiniteError`; the JAX step skips the update and goes on), which used to end the script in
    a traceback; now both curves are printed (PyTorch's NaN from that step on), with why it
    stopped, and the verdict is FAIL, exit status 1."""
    rc = _script("compare_frameworks").main(["--lr", "1e30", "--warmup-steps", "1", "--steps", "3", "--grad-accum",
                                             "1", "--batch-size", "2", "--seq-len", "16"])
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert rc == 1 and lines[-1] == "FAIL: tolerance 0.0001 relative", out + err
    assert lines[-2] == "the PyTorch run stopped: non-finite loss or gradient at step 3; the update was not applied"
    rows = [line.split() for line in lines[1:4]]
    assert [r[0] for r in rows] == ["1", "2", "3"] and rows[2][2] == "nan" and rows[0][2] != "nan", out
    assert "largest relative loss gap nan; largest relative weight gap nan" in out


@pytest.mark.parametrize("where", ["loss", "weight"])
def test_compare_frameworks_fails_on_a_nan_gap_wherever_it_comes(where, capsys, monkeypatch):
    """A framework whose loss or weights became NaN after the first step is a FAIL (status 1), not a
    PASS on the other gaps: NaN counts as the largest gap, wherever it comes in the steps or names."""
    from torch_ref import crosscheck

    nan = float("nan")
    result = crosscheck.CrossCheck(jax_losses=[8.0, 7.5, 7.0], torch_losses=[8.0, nan if where == "loss" else 7.5, 7.0],
                                   weight_gaps={"a": 1e-6, "b": nan if where == "weight" else 2e-6, "c": 1e-6},
                                   router_bias_max_abs_diff=0.0)
    assert math.isnan(result.max_loss_gap if where == "loss" else result.max_weight_gap[1])
    assert result.max_weight_gap[0] == "b"
    monkeypatch.setattr(crosscheck, "cross_check", lambda *a, **kw: result)
    rc = _script("compare_frameworks").main(["--steps", "3", "--grad-accum", "1", "--batch-size", "2", "--seq-len", "8",
                                             "--tolerance", "1e-4"])
    out = capsys.readouterr().out
    assert rc == 1 and out.splitlines()[-1] == "FAIL: tolerance 0.0001 relative", out


def test_a_worker_runs_the_orchestrator_s_jaxllm_not_one_in_the_working_directory(tmp_path, monkeypatch):
    """The workers were started with `python -m jaxllm.bench`, which puts the working directory first
    on sys.path: run from another checkout (or any folder holding a jaxllm), the orchestrator measured
    with that one's code, whatever scripts/bench.py had put on PYTHONPATH."""
    import os

    import jaxllm.bench as bench

    (tmp_path / "jaxllm").mkdir()
    (tmp_path / "jaxllm" / "__init__.py").write_text("")
    (tmp_path / "jaxllm" / "bench.py").write_text(
        'import json\nprint(json.dumps({"error": "the working directory\'s jaxllm ran"}))\nraise SystemExit(1)\n')
    monkeypatch.chdir(tmp_path)
    out = bench._run_worker("matmul", ["--matmul-size", "64"], 300)
    assert out["jax_matmul_float32_flops"] > 0
    cmd, env = bench._worker_command("matmul", [])
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT)  # (this checkout's, found from the module)


def test_bench_gpu_sh_reached_through_a_link_runs_its_own_checkout_s_scripts(tmp_path):
    """bench_gpu.sh found the checkout from `dirname "$0"`: through a link elsewhere (~/bin) it put
    the link's parent on PYTHONPATH and looked for profile_step.py there. A stand-in interpreter
    records what it is asked to run and fails (the script then goes on to its next stages)."""
    import os

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "bench_gpu.sh").symlink_to(ROOT / "scripts" / "bench_gpu.sh")
    calls = tmp_path / "calls.txt"
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\necho "$PYTHONPATH $1" >> {calls}\nexit 3\n')
    python.chmod(0o755)
    env = {**os.environ, "PYTHON": str(python), "BUDGET_S": "120", "PYTHONPATH": ""}
    proc = subprocess.run(["bash", str(bin_dir / "bench_gpu.sh"), str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    runs = [line.split(" ", 1) for line in calls.read_text().splitlines()]
    scripts = [script for _, script in runs if script.endswith(".py")]
    assert scripts and all(s == str(ROOT / "scripts" / "profile_step.py") for s in scripts), runs
    assert all(path.split(os.pathsep)[0] == str(ROOT) for path, _ in runs), runs
