#!/usr/bin/env python
"""Train CustomLLM with JAX.

    python scripts/train_jax.py                      # `small` on the embedded corpus, a few minutes on a CPU
    python scripts/train_jax.py --recipe seed        # the seed document's run (seed-973m, cosmopedia-v2)
    python scripts/train_jax.py --dataset 'data/*.parquet' --tokenizer tok/tokenizer.json --steps 1000

An existing --ckpt-dir resumes automatically. Flags given explicitly override the recipe.
Multi-host: run the same command on every host with --coordinator HOST:PORT --num-processes N
--process-id I (or the environment of a cluster launcher that `jax.distributed.initialize()` reads).
"""

from __future__ import annotations

import dataclasses
import os
import sys

try:
    import jaxllm  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    from jaxllm.loop import RECIPES, RunConfig

    d = RunConfig()
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
    a("--batch-size", type=int, help=f"micro-batch size, global over all devices (default {d.batch_size})")
    a("--grad-accum", type=int, help=f"micro-batches per optimizer step (default {d.grad_accum})")
    a("--lr", type=float, help=f"peak learning rate (default {d.lr})")
    a("--warmup-steps", type=int, help=f"linear warm-up steps before the cosine decay (default {d.warmup_steps})")
    a("--steps", type=int, help=f"optimizer steps in total (default {d.steps})")
    a("--weight-decay", type=float, help=f"AdamW weight decay (default {d.weight_decay})")
    a("--clip-norm", type=float, help=f"global gradient-norm clip (default {d.clip_norm})")
    a("--dtype", choices=["float32", "bfloat16"], help="compute dtype; weights stay float32 (default float32)")
    a("--mesh", help="device mesh, e.g. data=2,fsdp=4 (axes data, fsdp, expert; default: all devices on data)")
    a("--ckpt-dir", help=f"checkpoint directory; resumes when it holds checkpoints (default {d.ckpt_dir})")
    a("--save-every", type=int, help=f"checkpoint every N steps (default {d.save_every})")
    a("--keep", type=int, help=f"checkpoints to keep (default {d.keep})")
    a("--log-every", type=int, help=f"metrics every N steps (default {d.log_every})")
    a("--seed", type=int, help=f"random seed (default {d.seed})")
    a("--no-resume", action="store_true", default=None, help="start over; only into an empty --ckpt-dir")
    a("--init-from", help="start from the weights of this checkpoint (e.g. made by convert/torch_to_flax.py)")
    a("--moe-impl", choices=["sparse", "gather", "scan", "ragged", "dense"],
      help="routed-expert dispatch, equal results (default sparse: the platform's fastest sparse one)")
    a("--remat", action="store_true", default=None,
      help="recompute layers in the backward pass: less memory, about 1/3 more work "
           "(default: on for models of 200M parameters or more)")
    a("--no-remat", dest="remat", action="store_false", default=None, help="never recompute layers")
    a("--no-dropout", dest="dropout", action="store_false", default=None, help="turn embedding dropout off")
    a("--peak-flops", type=float, help="peak FLOP/s per device for MFU (known accelerators are looked up)")
    a("--skip-nonfinite", action="store_true", default=None, help="skip steps with a NaN/Inf loss instead of stopping")
    a("--prompt", dest="prompts", action="append", help="prompt for the generated text at the end (repeatable)")
    a("--max-new-tokens", type=int, help=f"tokens generated per prompt at the end (default {d.max_new_tokens})")
    a("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    a("--coordinator", help="multi-host: coordinator address HOST:PORT")
    a("--num-processes", type=int, help="multi-host: number of processes")
    a("--process-id", type=int, help="multi-host: this process's index")
    a("--heartbeat-timeout", type=int, default=100,
      help="multi-host: seconds without a heartbeat before a lost process fails the others (default 100)")
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
        from jaxllm.distributed import maybe_initialize

        maybe_initialize(args.coordinator, args.num_processes, args.process_id, args.heartbeat_timeout)
        from jaxllm.loop import run

        summary = run(rc)
    except (ValueError, OSError) as e:
        print(f"train_jax.py: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a non-finite loss, or a lost peer process
        import jax

        if jax.process_count() > 1:
            print(f"train_jax.py: error in process {jax.process_index()} of {jax.process_count()} (did another "
                  f"process die?): {str(e).splitlines()[0]}", file=sys.stderr, flush=True)
            os._exit(1)  # skip the shutdown barrier, which would wait for the dead process and abort
        print(f"train_jax.py: {e}", file=sys.stderr)
        return 1
    if summary.get("stopped_by") is None and rc.prompts and rc.max_new_tokens > 0:
        from jaxllm.loop import print_samples

        print_samples(summary["model"], summary["tokenizer"], rc.prompts, rc.max_new_tokens, seed=rc.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
