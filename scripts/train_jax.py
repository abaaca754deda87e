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

import os
import signal
import sys

# This file's checkout (found through any symbolic link) goes ahead of an installed jaxllm: after a
# `pip install .` (not -e) the installed copy ran instead of the code beside this file. Where no
# checkout holds this file (convert/ as pip installs it, a script copied alone), the installed packages serve.
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
if os.path.isfile(os.path.join(_CHECKOUT, "pyproject.toml")) and os.path.isdir(os.path.join(_CHECKOUT, "jaxllm")):
    sys.path.insert(0, _CHECKOUT)

# The JAX run needs no PyTorch, but `datasets` and `transformers` import it when it is installed
# (about 180 MB more in this process, on top of the model's state) unless told not to.
os.environ.setdefault("USE_TORCH", "0")


def parse_args(argv=None):
    from jaxllm import cli
    from jaxllm.recipes import ATTN_IMPLS, MOE_IMPLS, RunConfig

    d = RunConfig()
    p = cli.parser(__file__, __doc__)
    cli.add_data_and_optimizer_flags(p, d, batch_over="devices")
    a = p.add_argument
    a("--dtype", choices=["float32", "bfloat16"], help="compute dtype; weights stay float32 (default float32)")
    a("--mesh", help="device mesh, e.g. data=2,fsdp=4 (axes data, fsdp, expert; one size may be -1: the devices "
                     "left over; default: all devices on data)")
    a("--ckpt-dir", type=cli.path, help=f"checkpoint directory; resumes when it holds checkpoints (default {d.ckpt_dir})")
    cli.add_run_flags(p, d, init_from="start from the weights of this checkpoint (e.g. made by "
                                      "convert/torch_to_flax.py), and its tokenizer unless --tokenizer")
    a("--moe-impl", choices=MOE_IMPLS,
      help="routed-expert dispatch, equal results (default sparse: the platform's fastest sparse one)")
    a("--attn-impl", choices=ATTN_IMPLS,
      help="training attention: xla (default) or cudnn (cuDNN's fused attention: NVIDIA GPUs, --dtype bfloat16)")
    a("--scan-unroll", type=int, metavar="N",
      help="unroll the scan over the layers N at a time (default: whole up to 8 layers, else 1). On an H200 "
           "30 made the seed-973m step 13-15%% faster and its compile about 4x longer (BENCHMARKS.md)")
    cli.add_remat_flags(p)
    cli.add_compile_cache_flag(p)
    a("--peak-flops", type=float, help="peak FLOP/s per device for MFU (known accelerators are looked up)")
    a("--skip-nonfinite", action="store_true", default=None, help="skip steps with a NaN/Inf loss instead of stopping")
    a("--coordinator", help="multi-host: coordinator address HOST:PORT")
    a("--num-processes", type=int, help="multi-host: number of processes")
    a("--process-id", type=int, help="multi-host: this process's index")
    a("--heartbeat-timeout", type=int, default=100,
      help="multi-host: seconds without a heartbeat before a lost process fails the others (default 100)")
    a("--init-timeout", type=int, default=300,
      help="multi-host: seconds to wait at start-up for every process to connect; after that JAX aborts the "
           "process (exit status 134, no Python error) (default 300)")
    args = p.parse_args(argv)
    cli.check_at_least(p, args, heartbeat_timeout=1, init_timeout=1, num_processes=1, process_id=0, scan_unroll=1)
    return args, cli.run_config(args, d, resumes=lambda ckpt_dir: bool(cli.step_dirs(ckpt_dir)))


def main(argv=None) -> int:
    args, rc = parse_args(argv)
    try:
        from jaxllm import xla_cache
        from jaxllm.distributed import maybe_initialize

        xla_cache.enable(args.compile_cache)
        maybe_initialize(args.coordinator, args.num_processes, args.process_id, args.heartbeat_timeout,
                         args.init_timeout)
        from jaxllm.loop import run

        summary = run(rc)
    except (ValueError, OSError) as e:
        print(f"train_jax.py: error: {e}", file=sys.stderr, flush=True)
        import jax

        if jax.process_count() > 1:
            # Not JAX's shutdown barrier alone: a process still inside a collective would never
            # reach it, and both would wait minutes and abort. The processes that meet the same
            # error leave together; one that does not come is left after at most 30 s, and fails
            # within --heartbeat-timeout once this one is gone.
            from jaxllm.distributed import exit_together

            exit_together(2)
        return 2
    except RuntimeError as e:  # a non-finite loss, a checkpoint that could not be written, or a lost peer process
        import jax

        if jax.process_count() > 1:
            from jaxllm.distributed import exit_together
            from jaxllm.loop import NonFiniteError, SaveError

            # A non-finite loss is global: every process meets it at the same step, and they leave
            # together as after bad input (process 0 leaving first took the coordination service
            # away). Otherwise skip the shutdown barrier, which would wait for a dead process and abort.
            together = isinstance(e, NonFiniteError)
            print(f"train_jax.py: error in process {jax.process_index()} of {jax.process_count()}"
                  f"{'' if together or isinstance(e, SaveError) else ' (did another process die?)'}: "
                  f"{str(e).splitlines()[0]}",
                  file=sys.stderr, flush=True)
            if together:
                exit_together(1)
            os._exit(1)
        print(f"train_jax.py: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # anything else (a bug, a MemoryError): as raised, but not through JAX's shutdown
        from jaxllm.cli import caused_by

        jax = sys.modules.get("jax")
        if (caused_by(e, KeyboardInterrupt) or jax is None or not jax.distributed.is_initialized()
                or jax.process_count() == 1):
            raise
        # Raised as it is, the traceback was followed by JAX's shutdown barrier, which waited
        # 300 s for the other processes (held inside the step's collectives, waiting for this one,
        # and kept there by its heartbeats) and then aborted them all (status 134).
        import traceback

        traceback.print_exc()
        print(f"train_jax.py: error in process {jax.process_index()} of {jax.process_count()}: "
              f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}", file=sys.stderr, flush=True)
        from jaxllm.distributed import exit_together

        exit_together(1)
    if summary.get("stopped_by"):  # saved, not finished: 128 + the signal, as a shell reports it
        return 128 + (signal.SIGINT if summary["stopped_by"] == "SIGINT" else signal.SIGTERM)
    if rc.prompts and rc.max_new_tokens > 0:
        from jaxllm.loop import print_samples

        print_samples(summary["model"], summary["tokenizer"], rc.prompts, rc.max_new_tokens, seed=rc.seed)
    return 0


def _leave(status: int) -> None:
    """End this process with `status` after a Ctrl-C at start-up: in a multi-process run with the
    other processes (a launcher's Ctrl-C reaches them all), through JAX's shutdown; leaving at once,
    process 0 took the coordination service with it and JAX aborted the others (SIGABRT)."""
    try:
        distributed = sys.modules["jax"].distributed  # (not imported again: it may be what was interrupted)
        several = distributed.is_initialized()
    except Exception:  # noqa: BLE001 - no JAX yet, or half imported
        several = False
    if several:
        from jaxllm.distributed import exit_together

        exit_together(status)
    os._exit(status)


if __name__ == "__main__":
    from jaxllm.hostmem import reexec_with_huge_pages

    reexec_with_huge_pages(__file__)  # big per-step buffers in huge pages (jaxllm/hostmem.py)
    from jaxllm.cli import exit_with

    exit_with(main, "train_jax.py", "nothing more was saved", leave=_leave)
