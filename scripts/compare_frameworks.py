#!/usr/bin/env python
"""Train the same model in JAX and in PyTorch side by side and print both loss curves.

    python scripts/compare_frameworks.py                 # tiny (4,096-token vocabulary), 20 steps, accumulation 2
    python scripts/compare_frameworks.py --steps 40 --lr 1e-3 --preset small

Same initial weights (the JAX initialisation, converted), the same batches of the embedded corpus,
float32, no dropout; the JAX trainer (jaxllm/train.py) against the Hugging Face Trainer glue that
scripts/train_torch.py runs (torch_ref/training.py). Prints the losses of every step, the largest relative gaps of loss and
final weights, and exits with status 1 when a gap exceeds --tolerance.
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


def main(argv=None) -> int:
    from jaxllm import cli

    p = cli.parser(__file__, __doc__)
    p.add_argument("--preset", default="tiny", help="model preset, with the tokenizer's vocabulary (default tiny)")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps (default 20)")
    p.add_argument("--grad-accum", type=int, default=2, help="micro-batches per step (default 2)")
    p.add_argument("--batch-size", type=int, default=4, help="micro-batch size (default 4)")
    p.add_argument("--seq-len", type=int, default=32, help="tokens per sequence (default 32)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    p.add_argument("--warmup-steps", type=int, default=5, help="warm-up steps (default 5)")
    p.add_argument("--seed", type=cli.seed, default=0, help="initialisation seed (default 0)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest relative gap accepted (default 1e-4)")
    args = p.parse_args(argv)
    if not 0 < args.tolerance < float("inf"):
        p.error(f"--tolerance must be a positive number, got {args.tolerance}")
    try:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from jaxllm.config import PRESETS, LLMConfig
        from torch_ref.crosscheck import cross_check, embedded_batches

        for name in ("steps", "grad_accum", "batch_size", "seq_len"):
            if getattr(args, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
        if not 0 < args.lr < float("inf"):
            raise ValueError(f"--lr must be a finite positive number, got {args.lr}")
        if args.warmup_steps < 0:
            raise ValueError(f"--warmup-steps must be non-negative, got {args.warmup_steps}")
        if args.preset not in PRESETS:  # before the batches are built
            raise ValueError(f"--preset: unknown preset {args.preset!r}; known presets: {', '.join(PRESETS)}")
        batches, tokenizer = embedded_batches(args.steps, args.grad_accum * args.batch_size, args.seq_len,
                                              seed=args.seed)
        config = LLMConfig.from_preset(args.preset, vocab_size=len(tokenizer))
        result = cross_check(config, batches, grad_accum=args.grad_accum, lr=args.lr,
                             warmup_steps=args.warmup_steps, seed=args.seed)
    except (ValueError, OSError) as e:
        print(f"compare_frameworks.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(result.table())
    ok = result.max_loss_gap <= args.tolerance and result.max_weight_gap[1] <= args.tolerance
    print(f"{'PASS' if ok else 'FAIL'}: tolerance {args.tolerance:g} relative")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
