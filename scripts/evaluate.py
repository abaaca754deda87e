#!/usr/bin/env python
"""Measure a checkpoint's loss and perplexity on a dataset, in JAX, in PyTorch, or in both.

    python scripts/evaluate.py --checkpoint ckpt                          # the embedded corpus, 20 batches of 8 x 128
    python scripts/evaluate.py --checkpoint ckpt --dataset held_out.jsonl --batches 0   # one whole pass
    python scripts/evaluate.py --checkpoint hf_dir --framework both --json eval.json

--checkpoint is a Flax (Orbax) checkpoint directory or a Hugging Face directory, as for
generate.py; either framework runs either kind (the weights are converted in memory). The data is
read, tokenized and packed exactly as the trainers read theirs (rows of --seq-len tokens, each
document followed by EOS, no padding), from its start, once: the first --batches N batches of
--batch-size rows (fewer where the data holds fewer), or with --batches 0 every full batch of it.
The loss is the trainers' language-model loss alone (the mean shifted cross-entropy over every
predicted token, without the router's balance loss), in float32 without dropout; perplexity =
exp(loss). With --framework both, each batch runs in both frameworks and the relative difference of
their losses is printed as well. A loss that is not finite (NaN or inf weights) is printed, then
refused as an error (exit status 2, no --json).

--json PATH writes: checkpoint, step, dataset, dataset_config, split, text_column, seq_len,
batch_size, batches; input_tokens (the tokens read: batches x batch_size x seq_len);
predicted_tokens (those the loss averages over: batches x batch_size x (seq_len - 1), a row's first
token having no prediction); tokens (the same count as predicted_tokens, under the name earlier
files used); results, per framework: loss, perplexity (null past exp(700)), seconds; and with
--framework both, relative_difference.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import sys
import time

# This file's checkout (found through any symbolic link) goes ahead of an installed jaxllm: after a
# `pip install .` (not -e) the installed copy ran instead of the code beside this file. Where no
# checkout holds this file (convert/ as pip installs it, a script copied alone), the installed packages serve.
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
if os.path.isfile(os.path.join(_CHECKOUT, "pyproject.toml")) and os.path.isdir(os.path.join(_CHECKOUT, "jaxllm")):
    sys.path.insert(0, _CHECKOUT)
sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))
from generate import (checkpoint_info, checkpoint_kind, load_jax_model, load_torch_model,  # noqa: E402  (scripts/)
                      torch_model_of)

sys.path.pop(0)

PROG = "evaluate.py"
FRAMEWORKS = {"jax": ("jax",), "torch": ("torch",), "both": ("jax", "torch")}
NAMES = {"jax": "JAX", "torch": "PyTorch"}
PROGRESS_EVERY_S = 30.0  # a progress line on stderr this often where it is not a terminal (a log)


def parse_args(argv=None):
    from jaxllm.cli import add_compile_cache_flag, check_json_path, parser, path
    from jaxllm.recipes import RunConfig

    d = RunConfig()
    p = parser(__file__, __doc__)
    a = p.add_argument
    a("--checkpoint", required=True, type=path, help="Orbax checkpoint directory or Hugging Face model directory")
    a("--step", type=int, help="step of an Orbax checkpoint directory (default: the latest)")
    a("--framework", choices=sorted(FRAMEWORKS), default="jax", help="which implementation runs (default jax)")
    a("--dataset", type=path, help="Hub dataset id, or local .parquet/.jsonl/.json/.txt data: a file, a glob, or a "
                                    "directory holding such files (default: the embedded corpus)")
    a("--dataset-config", help="Hub dataset configuration, e.g. cosmopedia-v2")
    a("--split", default=d.split, help=f"dataset split (default {d.split})")
    a("--text-column", default=d.text_column, help=f"column holding the text (default {d.text_column})")
    a("--tokenizer", type=path, help="Hub id, local directory or tokenizer.json (default: recorded with the checkpoint)")
    a("--seq-len", type=int, default=d.seq_len,
      help=f"tokens per row (default {d.seq_len}, the trainers' default; give the run's own to compare with its loss)")
    a("--batch-size", type=int, default=8, help="rows per batch (default 8)")
    a("--batches", type=int, default=20,
      help="batches to evaluate at most, from the data's start, each document once; 0: all of them (default 20)")
    a("--json", metavar="PATH", type=path, help="also write the figures to PATH as JSON (its fields: below)")
    add_compile_cache_flag(p)
    args = p.parse_args(argv)
    check_json_path(p, args.json)
    return args


def check_args(args, config) -> None:
    """ValueError naming the flag, for settings that no evaluation can use."""
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    if args.batches < 0:
        raise ValueError(f"--batches must be non-negative (0: one whole pass), got {args.batches}")
    if args.seq_len < 2:  # the loss predicts each token from the ones before it
        raise ValueError(f"--seq-len must be at least 2 (a row of one token has nothing to predict), got {args.seq_len}")
    if args.seq_len > config.max_position_embeddings:
        raise ValueError(f"--seq-len {args.seq_len} exceeds the model's max_position_embeddings "
                         f"({config.max_position_embeddings})")


def run_directory(checkpoint: str) -> str:
    """The run that `checkpoint` belongs to, which a dataset directory or glob holding it leaves out
    (its files are not data): a Trainer's `checkpoint-N`, the output directory above it (its other
    checkpoints' JSON files and metrics.jsonl), else the checkpoint itself."""
    path = os.path.abspath(checkpoint)
    return os.path.dirname(path) if re.fullmatch(r"checkpoint-\d+", os.path.basename(path)) else checkpoint


def batches_of_one_pass(packed, limit: int):
    """The batches of `packed` (a `jaxllm.data.PackedBatches`, which packs the data endlessly, epoch
    after epoch) that lie wholly in its first pass over the data: the first `limit` of them, or all
    with `limit` 0."""
    taken = 0
    while not limit or taken < limit:
        batch = next(packed)
        state = packed.state_dict()
        if state["epoch"] > 0 and (state["documents"] or state["offset"]):
            return  # this batch reaches into the second pass
        yield batch
        taken += 1
        if state["epoch"] > 0:
            return  # it ended exactly at the end of the data


class JaxLoss:
    """Sums of the shifted cross-entropy and of the predicted tokens of a batch, in JAX."""

    def __init__(self, model):
        import jax
        from flax import nnx

        from jaxllm.model import lm_loss_sums

        graphdef, self.state = nnx.split(model)

        @jax.jit
        def sums(state, ids):
            out = nnx.merge(graphdef, state).forward(ids)  # no dropout_rng: no dropout
            return lm_loss_sums(out.logits, ids)

        self._sums = sums

    def __call__(self, ids) -> tuple[float, int]:
        ce, n = self._sums(self.state, ids)
        return float(ce), int(n)


class TorchLoss:
    """The same sums from the PyTorch reference's own loss (`CustomLLMOutput.lm_loss`, a mean)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, ids) -> tuple[float, int]:
        import torch

        t = torch.from_numpy(ids).long()
        with torch.no_grad():
            out = self.model(input_ids=t, labels=t)
        n = t.shape[0] * (t.shape[1] - 1)
        return float(out.lm_loss.double()) * n, n


def run(args, out=None) -> dict:
    """Evaluate; print the report to `out` (default: standard output) and return its figures.
    Raises ValueError / OSError naming the problem."""
    from jaxllm.data import DataConfig, PackedBatches, checkpoint_tokenizer, model_tokenizer, stream_source

    out = out or sys.stdout
    kind = checkpoint_kind(args.checkpoint)
    if args.step is not None and kind != "orbax":
        raise ValueError(f"--step applies to an Orbax checkpoint directory; {args.checkpoint} is a Hugging Face "
                         "directory (one model)")
    step = args.step  # (the step read, once the model has been: a run may still be saving there)
    config, recorded, saved = checkpoint_info(args.checkpoint, kind, step)
    check_args(args, config)
    tokenizer = (model_tokenizer(args.tokenizer, config) if args.tokenizer is not None
                 else checkpoint_tokenizer(recorded, config, saved, where=args.checkpoint))
    cfg = DataConfig(dataset=args.dataset, dataset_config=args.dataset_config, split=args.split,
                     text_column=args.text_column, seq_len=args.seq_len,
                     skip_dir=run_directory(args.checkpoint))  # (a run's directory inside the dataset's: not data)
    frameworks = FRAMEWORKS[args.framework]
    if "jax" in frameworks:
        from jaxllm import xla_cache

        xla_cache.enable(getattr(args, "compile_cache", None))
    source = "the embedded corpus" if cfg.is_embedded else f"dataset {cfg.dataset}"
    with PackedBatches(cfg, tokenizer, rows=args.batch_size) as packed:  # reads the data's start: errors now
        pending = batches_of_one_pass(packed, args.batches)
        first = next(pending, None)
        if first is None:  # (before the models load)
            raise ValueError(f"{source} holds fewer than {args.batch_size * args.seq_len} tokens: not one batch of "
                             f"{args.batch_size} x {args.seq_len} (lower --batch-size or --seq-len)")
        if kind == "orbax":  # read once, for both frameworks: without --step, the latest now (a run still
            from jaxllm import checkpoint  # training there may have rotated away the step looked at)

            model, config, step = checkpoint.load_step(args.checkpoint, args.step)
            load = {"jax": lambda: model, "torch": lambda: torch_model_of(model, config)}
        else:
            load = {"jax": lambda: load_jax_model(args.checkpoint, kind),
                    "torch": lambda: load_torch_model(args.checkpoint, kind)}
        losses = {name: (JaxLoss if name == "jax" else TorchLoss)(load[name]()) for name in frameworks}
        where = f"{args.checkpoint} (step {step})" if kind == "orbax" else args.checkpoint
        asked = f"at most {args.batches} {'batch' if args.batches == 1 else 'batches'}" if args.batches else "every batch"
        print(f"evaluating {where} on {source}: {asked} of {args.batch_size} x {args.seq_len} tokens, "
              f"in {' and '.join(NAMES[f] for f in frameworks)}", file=out, flush=True)
        sums = {name: [0.0, 0, 0.0] for name in frameworks}  # cross-entropy, tokens, seconds
        bar = _progress(args.batches or None)
        batches, noted = 0, time.monotonic()
        try:
            for batch in itertools.chain([first], pending):
                for name in frameworks:
                    start = time.perf_counter()
                    ce, n = losses[name](batch)
                    s = sums[name]
                    s[0], s[1], s[2] = s[0] + ce, s[1] + n, s[2] + time.perf_counter() - start
                batches += 1
                loss = sums[frameworks[0]][0] / sums[frameworks[0]][1]
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}")
                elif time.monotonic() - noted >= PROGRESS_EVERY_S:
                    print(f"evaluated {batches}{f' of {args.batches}' if args.batches else ''} batches: loss {loss:.4f}",
                          file=sys.stderr, flush=True)
                    noted = time.monotonic()
        finally:
            if bar is not None:
                bar.close()
    # The data as the trainers' checkpoints record it: a local dataset's absolute path (as the
    # checkpoint's), a Hub dataset's config and split, the text column.
    recorded = stream_source(cfg, "")
    result = {"checkpoint": os.path.abspath(args.checkpoint), "step": step,
              **{k: recorded[k] for k in ("dataset", "dataset_config", "split", "text_column")},
              "seq_len": args.seq_len, "batch_size": args.batch_size, "batches": batches,
              "input_tokens": batches * args.batch_size * args.seq_len, "predicted_tokens": sums[frameworks[0]][1],
              # (`tokens`: the predicted ones, not those read; the name earlier files used, kept for their readers)
              "tokens": sums[frameworks[0]][1], "results": {}}
    unit = "batch" if batches == 1 else "batches"
    for name in frameworks:
        ce, n, seconds = sums[name]
        loss = ce / n
        perplexity = math.inf if loss > 700.0 else math.exp(loss)  # (exp overflows past 709.78; NaN stays NaN)
        result["results"][name] = {"loss": loss, "perplexity": perplexity if math.isfinite(perplexity) else None,
                                   "seconds": seconds}  # (JSON has no inf: null)
        print(f"{NAMES[name]:>8}: loss {loss:.4f}, perplexity {perplexity:.2f} over {n:,} predicted "
              f"tokens ({batches} {unit}, {seconds:.1f} s{', compile included' if name == 'jax' else ''})", file=out)
    broken = [f"{NAMES[name]} loss is {result['results'][name]['loss']}" for name in frameworks
              if not math.isfinite(result["results"][name]["loss"])]
    if broken:  # (weights holding NaN or inf: an error, not a figure to compare)
        out.flush()
        raise ValueError(f"{' and the '.join(broken)} on {source}: {where} does not give a finite loss"
                         f"{f' (nothing written to {args.json})' if args.json else ''}")
    if args.batches and batches < args.batches:
        print(f"(the data holds {batches} full {unit} of {args.batch_size} x "
              f"{args.seq_len} tokens, not the {args.batches} asked for: each document is read once)", file=out)
    if len(frameworks) == 2:
        a, b = (result["results"][f]["loss"] for f in frameworks)
        result["relative_difference"] = abs(a - b) / max(abs(b), 1e-30)
        print(f"JAX and PyTorch losses differ by {result['relative_difference']:.2e} (relative)", file=out)
    out.flush()
    if args.json:  # (whole or not at all, as the benchmarks write theirs; the folder was checked at the start)
        from jaxllm.cli import write_json

        write_json(args.json, result)
    return result


def _progress(total):
    """A progress bar on a terminal's standard error (None elsewhere: a log gets a line every
    PROGRESS_EVERY_S seconds instead)."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="evaluating", unit="batch", dynamic_ncols=True)


def main(argv=None) -> int:
    from jaxllm.cli import run_reporting_errors

    return run_reporting_errors(run, parse_args(argv), PROG)


if __name__ == "__main__":
    from jaxllm.cli import exit_with

    exit_with(main, PROG, "stopped")
