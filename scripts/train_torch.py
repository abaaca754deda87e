#!/usr/bin/env python
"""Train the PyTorch reference of CustomLLM with the Hugging Face Trainer.

    python scripts/train_torch.py                    # `small` on the embedded corpus, minutes on a CPU
    python scripts/train_torch.py --recipe seed      # the seed document's run (seed-973m, cosmopedia-v2)
    accelerate launch scripts/train_torch.py ...     # or: torchrun --nproc-per-node N scripts/train_torch.py ...

The settings, recipes and flag names are the JAX trainer's (scripts/train_jax.py, jaxllm/recipes.py);
--batch-size is the global micro-batch, split over the processes. Accelerate picks the device (CUDA,
MPS, CPU); --dtype auto (the default, but for --recipe seed, which trains in float32 as the seed
document did) trains in bfloat16 mixed precision where the GPU supports it, float32 elsewhere.
Checkpoints are Hugging Face directories CKPT_DIR/checkpoint-N (convert/torch_to_flax.py reads
them); an existing --ckpt-dir resumes from its latest checkpoint automatically.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys

# This file's checkout (found through any symbolic link) goes ahead of an installed jaxllm: after a
# `pip install .` (not -e) the installed copy ran instead of the code beside this file. Where no
# checkout holds this file (convert/ as pip installs it, a script copied alone), the installed packages serve.
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
if os.path.isfile(os.path.join(_CHECKOUT, "pyproject.toml")) and os.path.isdir(os.path.join(_CHECKOUT, "jaxllm")):
    sys.path.insert(0, _CHECKOUT)


def parse_args(argv=None):
    from jaxllm import cli
    from jaxllm.recipes import RunConfig
    from torch_ref.training import DEFAULT_CKPT_DIR, DTYPES, holds_checkpoints

    # `auto` unless the recipe names a dtype (the seed run: float32, as in JAX) or --dtype is given
    d = dataclasses.replace(RunConfig(), ckpt_dir=DEFAULT_CKPT_DIR, dtype="auto")
    p = cli.parser(__file__, __doc__)
    cli.add_data_and_optimizer_flags(p, d, batch_over="processes")
    a = p.add_argument
    a("--dtype", choices=DTYPES,
      help="auto: bfloat16 mixed precision on GPUs that support it, else float32 (default auto; "
           "--recipe seed: float32, the seed document's run, as train_jax.py)")
    a("--ckpt-dir", type=cli.path, help=f"output directory of checkpoint-N folders; resumes from the latest (default {d.ckpt_dir})")
    cli.add_run_flags(p, d, init_from="start from the weights of this Hugging Face directory "
                                      "(e.g. from convert/flax_to_torch.py), and its tokenizer unless --tokenizer")
    args = p.parse_args(argv)
    return args, cli.run_config(args, d, resumes=holds_checkpoints)


def main(argv=None) -> int:
    args, rc = parse_args(argv)
    from torch_ref.training import NonFiniteError, SaveError, run

    try:
        summary = run(rc, dtype=rc.dtype)
    except (ValueError, OSError) as e:
        print(f"train_torch.py: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return 2
    except (NonFiniteError, SaveError) as e:  # the run itself went wrong, not its input
        print(f"train_torch.py: error: {e}", file=sys.stderr)
        return 1
    finally:
        import torch

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Left to the interpreter's exit, gloo's threads could abort the process ("terminate
            # called without an active exception", SIGABRT), after an error's line or a finished run.
            torch.distributed.destroy_process_group()
    if summary.get("stopped_by"):  # saved, not finished: 128 + the signal, as a shell reports it
        return 128 + (signal.SIGINT if summary["stopped_by"] == "SIGINT" else signal.SIGTERM)
    return 0


if __name__ == "__main__":
    from jaxllm.cli import exit_with

    exit_with(main, "train_torch.py", "nothing more was saved")
