#!/usr/bin/env python
"""The matrix products of one JAX training step, timed alone: a ceiling for the step's speed.

    python scripts/bench_products.py                       # seed-973m, micro-batch 4 x 256
    python scripts/bench_products.py --preset small --batch-size 8 --seq-len 128

Every product of the step (forward, input gradient and weight gradient of each projection; the
routed experts as the default grouped dispatch runs them: per expert, products of 256 rows and a
last one of 64 over the rows it would get with a perfectly balanced router; attention's batched
products, the forward twice as the `dots` remat recomputes it; the `lm_head`) is timed alone at
its shape, interleaved with the float32 2048^3 matmul peak: n products back to back in one jitted
loop (each iteration's operands tied to the last result through an optimization barrier, so that
XLA can neither hoist nor drop it; n sized for about 50 ms a call), the median of `--reps` such
calls divided by n. The sum is the step time if nothing but the products took time, so (analytic
FLOPs / that time) / peak is the MFU no change to the rest of the step can exceed while the
products run at these rates. (Until 2026-11-29 each product was one call of its own: each call's
dispatch and cold operands made the sum 18.1 s, where profiles of the step have its products
running for 13.6-17.2 s; see BENCHMARKS.md.)
"""

from __future__ import annotations

import math
import os
import statistics
import sys

# This file's checkout (found through any symbolic link) goes ahead of an installed jaxllm: after a
# `pip install .` (not -e) the installed copy ran instead of the code beside this file. Where no
# checkout holds this file (convert/ as pip installs it, a script copied alone), the installed packages serve.
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
if os.path.isfile(os.path.join(_CHECKOUT, "pyproject.toml")) and os.path.isdir(os.path.join(_CHECKOUT, "jaxllm")):
    sys.path.insert(0, _CHECKOUT)


def _median_s(f, args, reps: int) -> float:
    """Median seconds of `f(*args)` to its results (after one warm-up call, which compiles)."""
    import jax

    from jaxllm.bench import _median_seconds

    return _median_seconds(lambda: jax.block_until_ready(f(*args)), reps)


def _per_product_s(f, args, reps: int, call_s: float = 0.05) -> float:
    """Seconds per `f(*args)` product, timed n at a time back to back in one jitted loop: the
    carried operands pass through an optimization barrier with each result, so every iteration
    computes the product again (XLA can neither hoist it out of the loop nor keep only the last)."""
    import jax

    once = _median_s(jax.jit(f), args, 1)
    n = max(2, min(64, round(call_s / max(once, 1e-6))))
    return _median_s(product_loop(f, n), args, reps) / n


def product_forms():
    """The three products of a projection `y = x @ w` with output gradient `g`: forward, input
    gradient, weight gradient (from a materialised `x^T`, as `wide_linear` does)."""
    import jax
    import jax.numpy as jnp

    barrier = jax.lax.optimization_barrier
    return {"fwd": lambda x, w, g: x @ w, "dx": lambda x, w, g: g @ jnp.swapaxes(w, -1, -2),
            "dW": lambda x, w, g: barrier(jnp.swapaxes(x, -1, -2)) @ g}


def product_loop(f, n: int):
    """`f(*operands)` computed n times in a jitted `fori_loop`, its last result returned."""
    import jax
    import jax.numpy as jnp

    def loop(*operands):
        def body(_, carry):
            *ops, _y = carry
            return jax.lax.optimization_barrier((*ops, f(*ops)))

        out = jax.eval_shape(f, *operands)
        y = jnp.zeros(out.shape, out.dtype)
        return jax.lax.fori_loop(0, n, body, (*operands, y))[-1]

    return jax.jit(loop)


def products(config, tokens: int, seq_len: int, block: int = 256, tail: int = 64):
    """(name, m, k, n, batch, count) of every `[m, k] x [k, n]` product (forward shapes) per step."""
    c = config
    h, lat, heads, f = c.hidden_size, c.latent_dim, c.num_attention_heads, c.intermediate_size
    L = c.num_hidden_layers
    proj = {"q_proj_d": (h, lat), "kv_proj_d": (h, lat), "q_proj_u": (lat, heads * c.nope_head_dim),
            "k_proj_u": (lat, heads * c.nope_head_dim), "v_proj_u": (lat, heads * c.v_head_dim),
            "rope_k": (h, heads * c.rope_head_dim), "rope_q": (lat, heads * c.rope_head_dim),
            "o_proj": (heads * c.v_head_dim, h)}
    out = [(f"attention {name}", tokens, k, n, 1, L) for name, (k, n) in proj.items()]
    out += [("shared gate/up", tokens, h, f, 1, 2 * L * c.num_shared_experts),
            ("shared down", tokens, f, h, 1, L * c.num_shared_experts)]
    rows = tokens * c.num_experts_per_tok / c.num_routed_experts  # per expert, balanced
    big, rest = divmod(math.ceil(rows), block)
    tails = math.ceil(rest / tail)  # the cascade's last products: one of tails * 64 rows
    for m, n_per_expert in ((block, big), (tails * tail, 1 if tails else 0)):
        if n_per_expert:
            count = L * c.num_routed_experts * n_per_expert
            out += [(f"routed gate/up ({m} rows)", m, h, f, 1, 2 * count),
                    (f"routed down ({m} rows)", m, f, h, 1, count)]
    B = tokens // seq_len
    out += [("attention q.k (batched)", seq_len, c.qk_head_dim, seq_len, B * heads, L),
            ("attention p.v (batched)", seq_len, seq_len, c.v_head_dim, B * heads, L),
            ("lm_head", tokens, h, c.vocab_size, 1, 1)]
    return out


def main(argv=None) -> int:
    from jaxllm.cli import parser

    p = parser(__file__, __doc__)
    p.add_argument("--preset", default="seed-973m", help="model preset (default seed-973m)")
    p.add_argument("--batch-size", type=int, default=4, help="micro-batch (default 4)")
    p.add_argument("--seq-len", type=int, default=256, help="sequence length (default 256)")
    p.add_argument("--reps", type=int, default=5,
                   help="timed calls (each a loop of products) per product (default 5)")
    args = p.parse_args(argv)
    from jaxllm.cli import check_at_least, preset_config

    check_at_least(p, args, batch_size=1, seq_len=1, reps=1)
    config = preset_config(p, args.preset, args.seq_len)

    import jax
    import jax.numpy as jnp

    from jaxllm.flops import training_flops_per_token

    tokens = args.batch_size * args.seq_len
    key = jax.random.key(0)
    peak_mm = jax.jit(lambda a: a @ a)
    a2048 = jax.random.normal(key, (2048, 2048), jnp.float32)  # random operands, as bench.py's peak
    forms = product_forms()
    print("| product | [m, k] x [k, n] | per step | fwd ms | dx ms | dW ms | GFLOP/s | seconds per step |")
    print("|---|---|---|---|---|---|---|---|")
    total_s, peaks = 0.0, []
    for name, m, k, n, batch, count in products(config, tokens, args.seq_len):
        lead = (batch,) if batch > 1 else ()
        x, w, g = (jax.random.normal(key, (*lead, *s), jnp.float32) for s in ((m, k), (k, n), (m, n)))
        peaks.append(2 * 2048**3 / _median_s(peak_mm, (a2048,), args.reps))
        ms = {form: 1e3 * _per_product_s(f, (x, w, g), args.reps) for form, f in forms.items()}
        # attention's forward runs twice (remat `dots` recomputes it for the backward pass)
        per_call = (2 * ms["fwd"] if "batched" in name else ms["fwd"]) + ms["dx"] + ms["dW"]
        seconds = count * per_call / 1e3
        total_s += seconds
        flop = 2 * m * k * n * batch * 3
        print(f"| {name} | [{m}, {k}] x [{k}, {n}]{f' x {batch}' if batch > 1 else ''} | {count} | "
              f"{ms['fwd']:.2f} | {ms['dx']:.2f} | {ms['dW']:.2f} | {flop / (sum(ms.values()) / 1e3) / 1e9:.0f} | "
              f"{seconds:.2f} |")
    peak = statistics.median(peaks)
    counted = training_flops_per_token(config, args.seq_len) * tokens
    print(f"\n{args.preset}, {args.batch_size} x {args.seq_len}: the products alone take {total_s:.1f} s per step; "
          f"float32 matmul peak {peak / 1e9:.0f} GFLOP/s (median over the run, {min(peaks) / 1e9:.0f}-"
          f"{max(peaks) / 1e9:.0f}); counted training FLOPs {counted / 1e12:.2f} T; "
          f"MFU ceiling at these product rates: {counted / total_s / peak:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
