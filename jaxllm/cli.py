"""Command-line conventions shared by every script (pure Python: the PyTorch-only scripts use it
too): bad arguments give one line on stderr and exit status 2, no usage dump."""

from __future__ import annotations

import argparse
import os
import re

# A value that starts with "-" and reads as a number, exponent or infinity included: argparse
# (before Python 3.13) took "-1e-3" or "-inf" for a flag and said "--lr: expected one argument",
# where the flag's own check names what is wrong ("--lr must be positive, got -0.001").
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)


class ArgumentParser(argparse.ArgumentParser):
    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        # argparse's own pattern (before 3.13 it knows no exponent; later ones may take more) or ours
        own = self._negative_number_matcher.pattern
        self._negative_number_matcher = re.compile(f"(?:{own})|(?:{NEGATIVE_NUMBER.pattern})", re.IGNORECASE)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def parser(file: str, doc: str, **kw) -> ArgumentParser:
    """The parser of a script: its file name as `prog`, the docstring's first line as the
    description and the rest as the epilog."""
    lines = (doc or "").strip("\n").split("\n")
    return ArgumentParser(prog=os.path.basename(file), description=lines[0], epilog="\n".join(lines[1:]),
                          formatter_class=argparse.RawDescriptionHelpFormatter, **kw)


def check_at_least(p: argparse.ArgumentParser, args: argparse.Namespace, **lowest: int) -> None:
    """`p.error` (one line, exit status 2) for the first of these flags given below its lowest
    value; flags left at None are not checked."""
    for name, low in lowest.items():
        v = getattr(args, name)
        if v is not None and v < low:
            p.error(f"--{name.replace('_', '-')} must be at least {low}, got {v}")


def write_json(path: str, value) -> None:
    """Write `value` to `path` as indented JSON, whole or not at all (a run may be killed at any
    moment): through a temporary file beside it, named by this process, so that two runs given the
    same `--json` do not write into one temporary file, nor over a user's `PATH.tmp`."""
    import json

    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(value, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def check_json_path(p: argparse.ArgumentParser, path: str | None) -> None:
    """`p.error` for a `--json PATH` that cannot be written: before the measurement, not after it."""
    if path and path.endswith((os.sep, "/")):  # (abspath drops the slash: the folder checked was the path's own)
        p.error(f"--json: {path} ends in a slash, a folder's name (give a file name)")
    if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        p.error(f"--json: the folder of {path} does not exist")
    if path and os.path.isdir(path):
        p.error(f"--json: {path} is a directory (give a file name)")
    if path:  # (a file made and removed at once: permissions, a read-only or immutable folder, /proc)
        import tempfile

        try:
            with tempfile.TemporaryFile(dir=os.path.dirname(os.path.abspath(path))):
                pass
        except OSError as e:
            p.error(f"--json: cannot write a file in the folder of {path} ({e.strerror or e})")


def check_peak_flops(p: argparse.ArgumentParser, peak_flops: float | None) -> None:
    """`p.error` for a `--peak-flops` that is given but not a positive, finite number."""
    if peak_flops is not None and not 0 < peak_flops < float("inf"):
        p.error(f"--peak-flops must be a positive number, got {peak_flops}")


def text(value: str) -> str:
    """argparse `type` of a text flag (`--prompt`): refuses bytes that are not UTF-8 (Python keeps
    them as lone surrogates, which the tokenizer and the JSON files refused with a traceback)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        c = ord(e.object[e.start])  # (bytes the command line held that are not UTF-8: U+DC80..U+DCFF)
        what = f"byte {bytes([c - 0xDC00])!r}" if 0xDC80 <= c <= 0xDCFF else f"U+{c:04X}"
        raise argparse.ArgumentTypeError(f"not UTF-8 text ({what} at character {e.start})") from None
    return value


def path(value: str) -> str:
    """argparse `type` of a path flag: `~` expanded where the shell leaves it (`--ckpt-dir=~/runs`,
    or quoted), which made a directory named `~` in the working directory; an empty string refused,
    which meant the working directory (an unset variable: `--ckpt-dir "$CKPT"`) or was taken as not
    given (`--init-from ""` trained from random weights); not UTF-8 refused (checkpoints record
    their paths as JSON text)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("an empty path (an unset shell variable?)")
    return os.path.expanduser(text(value))


SEED_LIMIT = 2**32  # JAX's PRNG keys, NumPy's and PyTorch's seeding all take 0 <= seed < 2**32


def seed(text: str) -> int:
    """argparse `type` of `--seed`: an integer in [0, 2**32), so that the error names the flag
    (argparse prefixes "argument --seed:") instead of an OverflowError from deep inside a run."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be in 0 .. 2**32 - 1, got {value}")
    return value


def check_attn_impl(p: argparse.ArgumentParser, attn_impl: str, dtype: str) -> None:
    """`p.error` (one line, exit status 2) for an `--attn-impl` this process cannot run in `dtype`."""
    if attn_impl == "xla":
        return
    from jaxllm.model import check_attn_impl

    try:
        check_attn_impl(attn_impl, dtype)
    except ValueError as e:
        p.error(f"--attn-impl: {e}")


def preset_config(p: argparse.ArgumentParser, preset: str, seq_len: int | None = None):
    """The `LLMConfig` of `preset`, or `p.error` (one line, exit status 2) for an unknown preset or
    a sequence longer than its positions."""
    from jaxllm.config import LLMConfig

    try:
        config = LLMConfig.from_preset(preset)
    except ValueError as e:
        p.error(f"--preset: {e}")
    if seq_len is not None and seq_len > config.max_position_embeddings:
        p.error(f"--seq-len: preset {preset} holds at most {config.max_position_embeddings} positions, got {seq_len}")
    return config


# ---- the training scripts' shared flags (train_jax.py, train_torch.py) ---------------------------
def add_data_and_optimizer_flags(p: argparse.ArgumentParser, d, *, batch_over: str) -> None:
    """Recipe, model, data and optimizer flags. `d` is the defaults (a `RunConfig`); every flag
    defaults to None so that only flags given explicitly override the recipe."""
    from jaxllm.recipes import RECIPES

    a = p.add_argument
    a("--recipe", choices=sorted(RECIPES), default="embedded", help="named bundle of settings (default: embedded)")
    a("--preset", help=f"model preset: seed-973m, small, tiny (default: with no --config or recipe naming a model, the "
                       f"model of the checkpoint resumed or of --init-from, else {d.preset})")
    a("--config", type=path, help="a config.json with LLMConfig's field names, jaxllm/config.py (overrides --preset)")
    a("--dataset", type=path, help="Hub dataset id, or local .parquet/.jsonl/.json/.txt data: a file, a glob, or a directory "
                        "holding such files (default: the embedded corpus)")
    a("--dataset-config", help="Hub dataset configuration, e.g. cosmopedia-v2")
    a("--split", help=f"dataset split (default {d.split})")
    a("--text-column", help=f"column holding the text (default {d.text_column})")
    a("--shuffle-buffer", type=int, metavar="N",
      help="read a --dataset through a shuffle buffer of N documents, its files in a shuffled order, both "
           f"reshuffled every epoch by --seed (default {d.shuffle_buffer}: in stored order; the embedded corpus is "
           "shuffled whole every epoch)")
    a("--tokenizer", type=path, help="Hub id, local directory or tokenizer.json (default: a resumed run keeps its checkpoint's, "
                          "--init-from takes that checkpoint's, else the embedded tokenizer)")
    a("--seq-len", type=int, help=f"tokens per sequence (default {d.seq_len})")
    a("--batch-size", type=int, help=f"micro-batch size, global over all {batch_over} (default {d.batch_size})")
    a("--grad-accum", type=int, help=f"micro-batches per optimizer step (default {d.grad_accum})")
    a("--lr", type=float, help=f"peak learning rate (default {d.lr})")
    a("--warmup-steps", type=int, help=f"linear warm-up steps before the cosine decay (default {d.warmup_steps})")
    a("--steps", type=int, help=f"optimizer steps in total (default {d.steps})")
    a("--weight-decay", type=float, help=f"AdamW weight decay (default {d.weight_decay})")
    a("--clip-norm", type=float, help=f"global gradient-norm clip, 0 for none (default {d.clip_norm})")


def add_run_flags(p: argparse.ArgumentParser, d, *, init_from: str) -> None:
    """Checkpointing, logging and sampling flags (`--ckpt-dir` is each script's own)."""
    a = p.add_argument
    a("--save-every", type=int, help=f"checkpoint every N steps (default {d.save_every})")
    a("--keep", type=int, help=f"checkpoints to keep (default {d.keep})")
    a("--log-every", type=int, help=f"metrics every N steps (default {d.log_every})")
    a("--seed", type=seed, help=f"random seed, 0 .. 2**32 - 1 (default {d.seed})")
    a("--no-resume", action="store_true", default=None, help="start over; only into an empty --ckpt-dir")
    a("--init-from", type=path, help=init_from)
    a("--no-dropout", dest="dropout", action="store_false", default=None, help="turn embedding dropout off")
    a("--prompt", dest="prompts", action="append", type=text, help="prompt for the generated text at the end (repeatable)")
    a("--max-new-tokens", type=int, help=f"tokens generated per prompt at the end (default {d.max_new_tokens})")
    a("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")


def _cache_dir(value: str) -> str:
    """`path`, but for the values that turn the cache off ("none", "off", "": an unset variable)."""
    from jaxllm.xla_cache import OFF

    return value if value.strip().lower() in OFF else path(value)


def add_compile_cache_flag(p: argparse.ArgumentParser) -> None:
    """`--compile-cache DIR` (JAX scripts; `jaxllm/xla_cache.py`)."""
    p.add_argument("--compile-cache", metavar="DIR", type=_cache_dir,
                   help="keep compiled XLA programs here and reuse them in later runs (default $JAXLLM_CACHE/xla, "
                        "i.e. ~/.cache/jaxllm/xla; 'none': off)")


def add_remat_flags(p: argparse.ArgumentParser) -> None:
    """`--remat [POLICY]` and `--no-remat` (JAX scripts)."""
    from jaxllm.recipes import AUTO_REMAT_PARAMS, REMAT_POLICIES

    a = p.add_mutually_exclusive_group().add_argument  # `--remat full --no-remat` is an error, not `none`
    a("--remat", nargs="?", const="full", choices=REMAT_POLICIES, default=None, metavar="POLICY",
      help="what the backward pass recomputes to save memory: full (whole layers, about 1/3 more work; "
           "the value of a bare --remat), moe (all but the routed experts' projections), dots (only attention's "
           "core and elementwise ops), none. Default: none "
           f"below {AUTO_REMAT_PARAMS / 1e6:.0f}M parameters; above, dots, or full when accumulating gradients")
    a("--no-remat", dest="remat", action="store_const", const="none", help="same as --remat none")


def run_config(args: argparse.Namespace, d, resumes=None):
    """The run's settings: the defaults `d`, then the recipe, then the flags given explicitly. With
    no --preset or --config given (by a flag or the recipe), the model is that of the checkpoint the
    run resumes (`resumes(ckpt_dir)`: the script's own checkpoints are there) or starts from
    (--init-from): `preset` None. A resumed run needs no model flags again (it was refused as another
    model than the default preset's, or one started from --init-from without that flag)."""
    import dataclasses

    from jaxllm.recipes import RECIPES

    settings = dataclasses.asdict(d)
    settings.update(RECIPES[args.recipe])
    given = set()
    for f in dataclasses.fields(d):
        value = getattr(args, f.name, None)
        if value is not None:
            settings[f.name] = tuple(value) if f.name == "prompts" else value
            given.add(f.name)
    settings.update(recipe=args.recipe, from_recipe=tuple(sorted(set(RECIPES[args.recipe]) - given)))
    dataset = getattr(args, "dataset", None)
    if dataset is not None and getattr(args, "dataset_config", None) is None \
            and dataset != RECIPES[args.recipe].get("dataset"):
        settings["dataset_config"] = None  # a recipe's Hub config belongs to the recipe's dataset, not this one
    chosen = [getattr(args, k, None) for k in ("preset", "config")] + [RECIPES[args.recipe].get(k) for k in ("preset", "config")]
    if not any(chosen) and (getattr(args, "init_from", None) is not None or _resumes(resumes, settings["ckpt_dir"])):
        settings["preset"] = None  # the model of the checkpoint resumed, or of --init-from's, as its tokenizer
    return type(d)(**settings)


def _resumes(resumes, ckpt_dir: str) -> bool:
    """`resumes(ckpt_dir)`, False without it or for a directory that cannot be listed (the run names
    that problem when it gets there)."""
    try:
        return resumes is not None and bool(resumes(ckpt_dir))
    except OSError:
        return False


def nearest_existing(path: str) -> str:
    """`path` (absolute) if it exists, else its nearest ancestor that does (at worst the root)."""
    while not os.path.lexists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def step_dirs(path: str) -> list[int]:
    """The numbered step directories of an Orbax checkpoint directory, sorted, found by their names
    (no Orbax read: in a multi-process run those are collective); [] when `path` is no directory."""
    if not os.path.isdir(path):
        return []
    return sorted(int(n) for n in os.listdir(path) if n.isdigit() and os.path.isdir(os.path.join(path, n)))


def is_one_step(path: str) -> bool:
    """Whether `path` is one step inside an Orbax checkpoint directory (Orbax's record of the step,
    or the items saved), not the directory of steps: the easy slip of pointing at a checkpoint."""
    names = set(os.listdir(path)) if os.path.isdir(path) else set()
    return "_CHECKPOINT_METADATA" in names or {"params", "meta"} <= names


def not_a_run_directory(path: str, framework: str) -> str | None:
    """The error for a `--ckpt-dir` that exists, holds nothing to resume, and is not a run's
    directory but one checkpoint inside a run, or a model directory (pointing at the checkpoint
    to resume from is an easy slip): a new run started inside it, from random weights, with exit
    status 0. `framework` ("jax" or "torch") is the trainer's, for the way out. None otherwise."""
    names, above = set(os.listdir(path)), os.path.dirname(os.path.abspath(path))
    jax = framework == "jax"
    if is_one_step(path):
        what, fix = "one step of a JAX run's checkpoint directory", (
            f"to resume that run, pass the directory above it ({above})" if jax else
            f"convert/flax_to_torch.py {above} makes a Hugging Face directory of it for --init-from")
    elif "trainer_state.json" in names:
        what, fix = "one checkpoint of a PyTorch (Trainer) run", (
            f"convert/torch_to_flax.py {path} makes a JAX checkpoint of it for --init-from" if jax else
            f"to resume that run, pass the directory above it ({above})")
    elif "config.json" in names and any(n.startswith(("model.safetensors", "model-", "pytorch_model")) for n in names):
        what, fix = "a Hugging Face model directory (config.json and weights)", (
            f"convert/torch_to_flax.py {path} makes a JAX checkpoint of it for --init-from" if jax else
            f"--init-from {path} starts from its weights")
    else:
        return None
    return f"--ckpt-dir {path} is {what}, not a training run's directory: {fix}, or use another --ckpt-dir"


def run_reporting_errors(run, args, prog: str) -> int:
    """`run(args)` for a script's `main`: 0, or 2 after a ValueError or OSError printed as one line,
    `PROG: error: ...`, on stderr."""
    import sys

    try:
        run(args)
    except (ValueError, OSError) as e:
        print(f"{prog}: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    return 0


def exit_with(main, prog: str, interrupted: str, leave=None):
    """`sys.exit(main())` for a script, with Ctrl-C outside the places that handle it (start-up,
    imports, a conversion, generation) ending in one line, `interrupted`, and exit status 130
    instead of a traceback; a second Ctrl-C during training (the first asked to save and stop) ends
    the same way at once (`stopping.exit_at_once`).

    An exception raised because of the interrupt (`_from_an_interrupt`) ends the same way.
    Once the interrupt has unwound `main` (its `finally` blocks have run: a conversion's temporary
    output is gone), the process ends at once: a normal exit met JAX's threads still working and
    crashed in 10 of 15 tries of a Ctrl-C during generate.py (SIGSEGV, status 139, after the line).
    A Ctrl-C that lands inside a callback whose exceptions Python ignores (JAX's garbage-collection
    callback) is raised again in the main thread (`stopping.raise_lost_interrupts`): it used to print
    "Exception ignored" and a traceback, and the conversion or generation went on to exit 0.
    A first Ctrl-C during an import is held until the import ends (`stopping.hold_interrupts_in_imports`):
    inside PyTorch's compiled initialisation it aborted the process (once in 300 tries here).
    `leave(130)`, if given, ends the process instead (train_jax.py: with the other processes of a
    multi-process run, through JAX's shutdown). A `stopping.Terminated` (a conversion's SIGTERM) ends
    with its line, `PROG: SIGTERM: <interrupted>`, and status 128 + the signal."""
    import signal
    import sys

    from jaxllm.stopping import (Terminated, end_interrupted, exit_at_once, hold_interrupts_in_imports,
                                 raise_lost_interrupts)

    exit_at_once(f"{prog}: interrupted: {interrupted}")
    raise_lost_interrupts(True)
    hold_interrupts_in_imports(True)
    try:
        code = main()
    except Terminated as e:  # (a conversion's SIGTERM: its output removed, as after Ctrl-C)
        print(f"{prog}: {signal.Signals(e.signum).name}: {interrupted}", file=sys.stderr, flush=True)
        raise
    except BaseException as e:
        if not _from_an_interrupt(e):
            raise
        end_interrupted(f"{prog}: interrupted: {interrupted}", *([leave] if leave else []))
    finally:
        exit_at_once(None)
        raise_lost_interrupts(False)
        hold_interrupts_in_imports(False)
    sys.exit(code)


def _from_an_interrupt(e: BaseException) -> bool:
    """Whether `e` is a KeyboardInterrupt, or came from one: a compiled module that a Ctrl-C
    interrupted while it was being imported raised an ImportError "initialization failed" caused by
    the KeyboardInterrupt (tensorstore, under Orbax, during a trainer's start-up), which ended in a
    traceback and exit status 1."""
    return caused_by(e, KeyboardInterrupt)


def caused_by(e: BaseException | None, kind: type) -> bool:
    """Whether `e`, or an exception it was raised from or while handling, is a `kind`."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, kind):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def listing(items: list[str], most: int = 4) -> str:
    """`a, b, c` or `a, b, c, d and 3 more`."""
    shown = ", ".join(items[:most])
    return shown if len(items) <= most else f"{shown} and {len(items) - most} more"
