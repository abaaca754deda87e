#!/usr/bin/env python
"""Decode speed: MLA's latent cache against full recomputation, JAX and PyTorch, same weights.

Both frameworks decode from the same weights in one run; the cache's size per token is printed too.

    python scripts/bench_decode.py                       # `small`, 256 new tokens after a 16-token prompt
    python scripts/bench_decode.py --new-tokens 64 --json decode.json

Tokens/s count the new tokens of one call (prefill included) after a warm-up call (JAX compiles
there). "JAX recompute" runs the whole model over the static [B, prompt + new tokens] buffer
at every step (jaxllm.generate with use_cache=False); "torch recompute" is Hugging Face
`generate(use_cache=False)`, which reruns the growing prefix. `jaxllm.bench.measure_decode` makes
the figures (bench.py reports them too).
"""

from __future__ import annotations

import os
import sys

# This file's checkout (found through any symbolic link) goes ahead of an installed jaxllm: after a
# `pip install .` (not -e) the installed copy ran instead of the code beside this file. Where no
# checkout holds this file (convert/ as pip installs it, a script copied alone), the installed packages serve.
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
if os.path.isfile(os.path.join(_CHECKOUT, "pyproject.toml")) and os.path.isdir(os.path.join(_CHECKOUT, "jaxllm")):
    sys.path.insert(0, _CHECKOUT)


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
    import torch

    from jaxllm.bench import measure_decode, report, torch_float32_as_jax

    torch_float32_as_jax(torch)  # float32 products as JAX computes them (TF32 on NVIDIA GPUs)
    from jaxllm.cli import check_at_least, check_json_path, parser, path

    p = parser(__file__, __doc__)
    p.add_argument("--preset", default="small", help="model preset (default small)")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens to generate (default 256)")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (default 16)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences decoded together (default 1)")
    p.add_argument("--framework", choices=["jax", "torch"], action="append", help="only this one (repeatable)")
    p.add_argument("--torch-threads", type=int, help="PyTorch intra-op threads (default: PyTorch's choice)")
    p.add_argument("--json", type=path, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    check_at_least(p, args, new_tokens=1, prompt_len=1, batch_size=1, torch_threads=1)
    check_json_path(p, args.json)
    try:
        r = measure_decode(args.preset, new_tokens=args.new_tokens, prompt_len=args.prompt_len,
                           batch_size=args.batch_size, frameworks=tuple(args.framework or ("jax", "torch")),
                           torch_threads=args.torch_threads)
    except ValueError as e:
        print(f"bench_decode.py: error: {e}", file=sys.stderr)
        return 2
    report(markdown(r), r, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
