#!/usr/bin/env python
"""Decode speed with MLA's latent cache against full recomputation, in JAX and in the PyTorch
reference, from the same weights in one run; and the cache's size per token.

    python scripts/bench_decode.py                       # `small`, 256 new tokens after a 16-token prompt
    python scripts/bench_decode.py --new-tokens 64 --json decode.json

Tokens/s count the new tokens of one call (prefill included) after a warm-up call (JAX compiles
there). "JAX recompute" runs the whole model over the static [B, prompt + new tokens] buffer
at every step (jaxllm.generate with use_cache=False); "torch recompute" is Hugging Face
`generate(use_cache=False)`, which reruns the growing prefix. `measure_decode` returns the
figures for other benchmarks to use.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

try:
    import jaxllm  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _seconds(fn, repeats: int, warmup=None) -> float:
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
                   torch_threads: int | None = None) -> dict:
    """Decode tokens/s with the latent cache and with full recomputation for each framework
    (float32, the same randomly initialised weights, greedy, no early stop), plus the cache
    bytes per token of `seed-973m` against a full K/V cache. The slow recomputation runs are
    timed once (after their warm-up). `torch_threads`: PyTorch's intra-op threads (default: its
    own choice; on a shared machine one thread can be faster for these small matmuls)."""
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
    if "jax" in frameworks:
        for use_cache, key, reps in ((True, "jax_cached", repeats), (False, "jax_recompute", 1)):
            def run(use_cache=use_cache, key=key):
                tokens[key] = generate(jm, prompts, max_new_tokens=new_tokens, stop_at_eos=False,
                                       use_cache=use_cache).tokens
            result[f"{key}_tokens_per_sec"] = n / _seconds(run, reps)
        result["jax_speedup"] = result["jax_cached_tokens_per_sec"] / result["jax_recompute_tokens_per_sec"]
    if "torch" in frameworks:
        import torch

        from convert.mapping import flax_to_torch
        from jaxllm.weights import get_weights
        from torch_ref import CustomLLM, CustomLLMConfig

        if torch_threads:
            torch.set_num_threads(torch_threads)
        result["torch_threads"] = torch.get_num_threads()
        sd = flax_to_torch(get_weights(jm), config)
        tm = CustomLLM.from_state_dict(CustomLLMConfig.from_llm_config(config),
                                       {k: torch.from_numpy(np.array(v)) for k, v in sd.items()})
        ids = torch.tensor(prompts)
        def run(use_cache, steps=new_tokens):
            with torch.no_grad():
                out = tm.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                  use_cache=use_cache, eos_token_id=None, pad_token_id=config.pad_token_id)
            tokens[f"torch_{'cached' if use_cache else 'recompute'}"] = out[:, prompt_len:].numpy()

        for use_cache, key, reps in ((True, "torch_cached", repeats), (False, "torch_recompute", 1)):
            # Nothing compiles in PyTorch: a 2-token call warms it up.
            result[f"{key}_tokens_per_sec"] = n / _seconds(lambda: run(use_cache), reps,
                                                           warmup=lambda: run(use_cache, 2))
        result["torch_speedup"] = result["torch_cached_tokens_per_sec"] / result["torch_recompute_tokens_per_sec"]
    names = sorted(tokens)
    result["same_tokens"] = all(np.array_equal(tokens[names[0]], tokens[k]) for k in names[1:])
    return result


def markdown(r: dict) -> str:
    rows = [f"Decode, preset `{r['preset']}`, batch {r['batch_size']}, {r['prompt_len']}-token prompt, "
            f"{r['new_tokens']} new tokens (float32, greedy)", "",
            "| framework | latent cache tok/s | full recompute tok/s | speed-up |", "| --- | --- | --- | --- |"]
    for fw in ("jax", "torch"):
        if f"{fw}_speedup" in r:
            name = f"torch ({r['torch_threads']} threads)" if fw == "torch" else fw
            cached, full = r[f"{fw}_cached_tokens_per_sec"], r[f"{fw}_recompute_tokens_per_sec"]
            rows.append(f"| {name} | {cached:.1f} | {full:.2f} | {r[f'{fw}_speedup']:.1f}x |")
    latent, full = r["seed973m_cache_bytes_per_token"], r["seed973m_full_kv_bytes_per_token"]
    rows += ["", f"All runs made the same tokens: {r['same_tokens']}.",
             f"Cache per token, `seed-973m`, float32: latent {latent:,} B (576 numbers x 30 layers) vs full K/V "
             f"{full:,} B (1,536 x 30): {full / latent:.2f}x smaller."]
    return "\n".join(rows)


def main(argv=None) -> int:
    from jaxllm.cli import parser

    p = parser(__file__, __doc__)
    p.add_argument("--preset", default="small", help="model preset (default small)")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens to generate (default 256)")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (default 16)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences decoded together (default 1)")
    p.add_argument("--framework", choices=["jax", "torch"], action="append", help="only this one (repeatable)")
    p.add_argument("--torch-threads", type=int, help="PyTorch intra-op threads (default: PyTorch's choice)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    try:
        r = measure_decode(args.preset, new_tokens=args.new_tokens, prompt_len=args.prompt_len,
                           batch_size=args.batch_size, frameworks=tuple(args.framework or ("jax", "torch")),
                           torch_threads=args.torch_threads)
    except ValueError as e:
        print(f"bench_decode.py: error: {e}", file=sys.stderr)
        return 2
    print(markdown(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
