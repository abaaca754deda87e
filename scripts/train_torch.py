#!/usr/bin/env python
"""Train the PyTorch reference of CustomLLM with the Hugging Face Trainer.

    python scripts/train_torch.py                    # `small` on the embedded corpus, minutes on a CPU
    python scripts/train_torch.py --recipe seed      # the seed document's run (seed-973m, cosmopedia-v2)
    accelerate launch scripts/train_torch.py ...     # or: torchrun --nproc-per-node N scripts/train_torch.py ...

The settings, recipes and flag names are the JAX trainer's (scripts/train_jax.py, jaxllm/recipes.py);
--batch-size is the global micro-batch, split over the processes. Accelerate picks the device (CUDA,
MPS, CPU); --dtype auto trains in bfloat16 mixed precision where the GPU supports it, float32
elsewhere. Checkpoints are Hugging Face directories CKPT_DIR/checkpoint-N (convert/torch_to_flax.py
reads them); an existing --ckpt-dir resumes from its latest checkpoint automatically.
"""

from __future__ import annotations

import dataclasses
import os
import sys

try:
    import torch_ref  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    from jaxllm.recipes import RECIPES, RunConfig
    from torch_ref.training import DEFAULT_CKPT_DIR, DTYPES

    d = dataclasses.replace(RunConfig(), ckpt_dir=DEFAULT_CKPT_DIR)
    from jaxllm.cli import parser

    p = parser(__file__, __doc__)
    a = p.add_argument
    a("--recipe", choices=sorted(RECIPES), default="embedded", help="named bundle of settings (default: embedded)")
    a("--preset", help=f"model preset: seed-973m, small, tiny (default {d.preset})")
    a("--config", help="a config.json with ARCHITECTURE.md's field names (overrides --preset)")
    a("--dataset", help="Hub dataset id, or a local parquet/jsonl/txt file or glob (default: embedded corpus)")
    a("--dataset-config", help="Hub dataset configuration, e.g. cosmopedia-v2")
    a("--split", help=f"dataset split (default {d.split})")
    a("--text-column", help=f"column holding the text (default {d.text_column})")
    a("--tokenizer", help="Hub id, local directory or tokenizer.json (default: the embedded tokenizer)")
    a("--seq-len", type=int, help=f"tokens per sequence (default {d.seq_len})")
    a("--batch-size", type=int, help=f"micro-batch size, global over all processes (default {d.batch_size})")
    a("--grad-accum", type=int, help=f"micro-batches per optimizer step (default {d.grad_accum})")
    a("--lr", type=float, help=f"peak learning rate (default {d.lr})")
    a("--warmup-steps", type=int, help=f"linear warm-up steps before the cosine decay (default {d.warmup_steps})")
    a("--steps", type=int, help=f"optimizer steps in total (default {d.steps})")
    a("--weight-decay", type=float, help=f"AdamW weight decay (default {d.weight_decay})")
    a("--clip-norm", type=float, help=f"global gradient-norm clip (default {d.clip_norm})")
    a("--dtype", choices=DTYPES,
      help="auto: bfloat16 mixed precision on GPUs that support it, else float32 (default auto)")
    a("--ckpt-dir", help=f"output directory of checkpoint-N folders; resumes from the latest (default {d.ckpt_dir})")
    a("--save-every", type=int, help=f"checkpoint every N steps (default {d.save_every})")
    a("--keep", type=int, help=f"checkpoints to keep (default {d.keep})")
    a("--log-every", type=int, help=f"metrics every N steps (default {d.log_every})")
    a("--seed", type=int, help=f"random seed (default {d.seed})")
    a("--no-resume", action="store_true", default=None, help="start over; only into an empty --ckpt-dir")
    a("--init-from", help="start from the weights of this Hugging Face directory (e.g. from convert/flax_to_torch.py)")
    a("--no-dropout", dest="dropout", action="store_false", default=None, help="turn embedding dropout off")
    a("--prompt", dest="prompts", action="append", help="prompt for the generated text at the end (repeatable)")
    a("--max-new-tokens", type=int, help=f"tokens generated per prompt at the end (default {d.max_new_tokens})")
    a("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    args = p.parse_args(argv)

    settings = dataclasses.asdict(d)
    settings.update(RECIPES[args.recipe])
    for f in dataclasses.fields(RunConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            settings[f.name] = tuple(value) if f.name == "prompts" else value
    return args, RunConfig(**settings)


def main(argv=None) -> int:
    args, rc = parse_args(argv)
    try:
        from torch_ref.training import run

        run(rc, dtype=args.dtype or "auto")
    except (ValueError, OSError) as e:
        print(f"train_torch.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
