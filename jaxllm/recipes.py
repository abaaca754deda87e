"""The settings of a training run, shared by `scripts/train_jax.py` and `scripts/train_torch.py`.

Pure Python (no JAX, no PyTorch), so that both frameworks read their defaults from one place.
`RunConfig` holds every setting (the scripts' flags; a few are JAX-only, e.g. `mesh`, `moe_impl`,
`remat`). `RECIPES` are named bundles of settings: `embedded` (the default: `small` on the embedded
corpus, minutes on a laptop CPU) and `seed` (the seed document's run: `seed-973m` on cosmopedia-v2,
sequence 256, micro-batch 4, accumulation 8, AdamW lr 2e-5, cosine with 2,000 warm-up steps,
weight decay 0.01, clip 1.0, 10,000 steps, float32). A recipe's `dtype` is also the PyTorch
trainer's default (otherwise `--dtype auto` there).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any


# Routed-expert dispatches of the JAX model (equal results; `jaxllm.model.resolve_moe_impl`).
MOE_IMPLS = ("sparse", "grouped", "gather", "ragged", "dense")
# The training path's causal attention (`jaxllm.model.fused_causal_attention`): XLA's products and
# softmax, or cuDNN's fused attention (NVIDIA GPUs, bfloat16/float16).
ATTN_IMPLS = ("xla", "cudnn")
# What the backward pass recomputes (`jaxllm.model.remat_policy`): nothing, whole layers, every
# layer but its routed experts' projections, or only attention's core and elementwise ops.
REMAT_POLICIES = ("none", "full", "moe", "dots")


@dataclasses.dataclass
class RunConfig:
    preset: str | None = "small"  # None: the model of the checkpoint resumed, else of `init_from`, else "small"
    #   (no --preset, --config or recipe's chosen, and one of those checkpoints: `jaxllm.cli.run_config`)
    config: str | None = None  # a config.json path; overrides preset
    dataset: str | None = None  # None: the embedded corpus
    dataset_config: str | None = None
    split: str = "train"
    text_column: str = "text"
    shuffle_buffer: int = 0  # documents in a --dataset's shuffle buffer; 0: read in stored order
    tokenizer: str | None = None  # None: the embedded tokenizer
    seq_len: int = 128
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    warmup_steps: int = 30
    steps: int = 300
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    dtype: str = "float32"
    mesh: str | None = None
    ckpt_dir: str = "ckpt"
    save_every: int = 100
    keep: int = 3
    log_every: int = 10
    seed: int = 0
    no_resume: bool = False
    init_from: str | None = None
    moe_impl: str = "sparse"
    attn_impl: str = "xla"
    scan_unroll: int | None = None  # layers per iteration of the scan over layers; None: the model's default
    remat: str | None = None  # a REMAT_POLICIES name; None: by model size (resolve_remat)
    dropout: bool = True
    peak_flops: float | None = None
    skip_nonfinite: bool = False
    prompts: tuple[str, ...] = ("The", "In Python,", "A list is")
    max_new_tokens: int = 40
    progress: bool = True
    recipe: str | None = None  # the --recipe whose settings these are, where no flag overrode them:
    from_recipe: tuple[str, ...] = ()  # (their names), for errors that name a setting not typed


def setting_digests(rc: RunConfig) -> tuple[list[str], list[int]]:
    """(flags, a 31-bit digest of each one's value) of a run's settings, which every process of a
    multi-process run must share: each process applies its own (another --lr made the replicas
    drift apart; another --steps hung the others at the end; another --ckpt-dir hung the first
    save). Paths are compared as given: the same relative --ckpt-dir from different working
    directories is left to `distributed.check_shared_directory`, which names that problem. Not
    compared: --no-progress (only process 0 shows a bar) and where a value came from (a recipe
    or a flag)."""
    import json
    import zlib

    names, digests = [], []
    for f in dataclasses.fields(rc):
        if f.name in ("progress", "recipe", "from_recipe"):
            continue
        value = getattr(rc, f.name)
        names.append({"prompts": "--prompt", "dropout": "--no-dropout"}.get(f.name, "--" + f.name.replace("_", "-")))
        digests.append(zlib.crc32(json.dumps(value, sort_keys=True, default=str).encode()) & 0x7FFFFFFF)
    return names, digests


def differing_settings(names: list[str], mine: list[int], first: list[int]) -> ValueError | None:
    """The error of a process whose setting digests (`mine`) are not process 0's (`first`)."""
    differ = [n for n, a, b in zip(names, mine, first) if int(a) != int(b)]
    return ValueError(f"{', '.join(differ)} differ{'s' if len(differ) == 1 else ''} from process 0's: give every "
                      "process the same settings") if differ else None


# What shapes the training of a run and may change when it resumes (the learning-rate schedule
# follows the new --lr, --warmup-steps and --steps): checkpoints record them (`recorded_settings`)
# and a resume names those that changed (`changed_settings`).
RESUMED_SETTINGS = ("lr", "warmup_steps", "steps", "weight_decay", "clip_norm", "batch_size", "grad_accum",
                    "seq_len", "dtype", "mesh", "moe_impl", "attn_impl", "scan_unroll", "remat", "dropout")


def recorded_settings(rc: RunConfig) -> dict[str, Any]:
    """The `RESUMED_SETTINGS` of a run, as a checkpoint records them (JSON)."""
    return {name: getattr(rc, name) for name in RESUMED_SETTINGS}


def changed_settings(recorded: dict[str, Any] | None, rc: RunConfig) -> str | None:
    """A note naming the settings of `rc` that differ from those `recorded` with the checkpoint a
    run resumes (None when none does, or for checkpoints that recorded none): a resume may change
    them, but it should not do so unnoticed (another --steps reshapes the learning-rate schedule)."""
    def change(name, now, was):
        if name == "dropout":  # (--no-dropout)
            return f"dropout {'on' if now else 'off'} (was {'on' if was else 'off'})"
        shown = lambda value: "the default" if value is None else value
        return f"--{name.replace('_', '-')} {shown(now)} (was {shown(was)})"

    changes = [change(name, getattr(rc, name), recorded[name])
               for name in RESUMED_SETTINGS if name in (recorded or {}) and recorded[name] != getattr(rc, name)]
    return f"note: resumed with other settings than the checkpoint's: {', '.join(changes)}" if changes else None


def named(rc: RunConfig, name: str) -> str:
    """`--seq-len 256` for an error about a setting, with `(the seed recipe's)` when the recipe
    gave it and no flag did."""
    said = f"--{name.replace('_', '-')} {getattr(rc, name)}"
    return f"{said} (the {rc.recipe} recipe's)" if name in rc.from_recipe else said


def another_model(rc: RunConfig | None, saved, config, where: str) -> str:
    """The error for a resume whose checkpoint (in `where`) holds the model `saved` while the run
    asks for `config` (both `LLMConfig`s): it names the model saved, and with the run's `rc` the
    flag that asked."""
    asked = named(rc, "config" if rc.config else "preset") if rc is not None and (rc.config or rc.preset) else None
    held = saved.preset()
    return (f"{where} holds a checkpoint of another model" + (f" than {asked}" if asked else "")
            + f" (differs in {', '.join(saved.differences(config))}"
            + (f"; it holds the {held} preset" if held else "") + "): resume without --preset, --config or a recipe "
            "naming a model to train the model it holds, or use another --ckpt-dir")


def check_run(rc: RunConfig, max_positions: int) -> None:
    """ValueError naming the flag, for settings that no run can use (both trainers call it before
    anything is written; `max_positions`: the model's `max_position_embeddings`)."""
    for name in ("lr", "weight_decay", "clip_norm", "peak_flops"):  # inf or nan would train to NaN
        value = getattr(rc, name)
        if value is not None and not math.isfinite(value):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    for name in ("steps", "batch_size", "seq_len", "log_every", "save_every", "grad_accum", "keep"):
        if getattr(rc, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(rc, name)}")
    for name in ("warmup_steps", "weight_decay", "clip_norm", "max_new_tokens", "shuffle_buffer"):  # clip-norm 0: no clipping
        if not getattr(rc, name) >= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be non-negative, got {getattr(rc, name)}")
    if not (rc.lr > 0):
        raise ValueError(f"--lr must be positive, got {rc.lr}")
    # beta1 is 0.9 in both trainers (`jaxllm.train.OptimConfig`, `torch_ref.training.training_arguments`);
    # JAX's weights became inf, and PyTorch's Adam raised a RuntimeError with a traceback
    if rc.lr / (1 - 0.9) > 3.4028234e38:
        raise ValueError(f"--lr {rc.lr:g} is too large: AdamW's first update, lr / (1 - beta1) = 10 x lr, "
                         "exceeds float32's largest number (3.4e38)")
    if rc.peak_flops is not None and not rc.peak_flops > 0:
        raise ValueError(f"--peak-flops must be positive, got {rc.peak_flops}")
    if rc.seq_len < 2:  # the loss predicts each token from the ones before it
        raise ValueError(f"--seq-len must be at least 2 (a row of one token has nothing to predict), got {rc.seq_len}")
    if rc.seq_len > max_positions:
        raise ValueError(f"{named(rc, 'seq_len')} exceeds the model's max_position_embeddings ({max_positions})")
    if os.path.exists(rc.ckpt_dir) and not os.path.isdir(rc.ckpt_dir):
        raise ValueError(f"--ckpt-dir {rc.ckpt_dir} exists and is not a directory")
    if os.path.islink(rc.ckpt_dir) and not os.path.exists(rc.ckpt_dir):
        raise ValueError(f"--ckpt-dir {rc.ckpt_dir} is a symbolic link to {os.readlink(rc.ckpt_dir)}, which does not "
                         "exist")


def warmup_warning(rc: RunConfig) -> str | None:
    """A line for a warm-up as long as the run or longer, which both trainers' schedules cut to the
    run's length (`jaxllm.train.lr_schedule`): the learning rate then rises over the whole run and
    never reaches --lr (step k of n trains at (k - 1) / n of it) nor decays. None otherwise."""
    if rc.warmup_steps < rc.steps:
        return None
    return (f"warning: --warmup-steps {rc.warmup_steps} is "
            f"{'more than' if rc.warmup_steps > rc.steps else 'equal to'} --steps {rc.steps}: the learning rate rises "
            f"over all {rc.steps} steps, never reaching --lr {rc.lr:g} nor decaying")


def encode_prompt(tokenizer, text: str) -> list[int]:
    """A prompt's token ids as training encodes a document (`jaxllm.data`): no special tokens
    added, and a special token's text written in it (a literal "<|endoftext|>") encoded as the
    text it is, since the model only ever saw EOS between documents. Without transformers' warning
    about a text longer than `model_max_length` (`check_prompts` says what is wrong with one)."""
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"])


def continuation_text(tokenizer, prompt_ids, new_ids) -> str:
    """The text that `new_ids` add after `prompt_ids`: both decoded together, less the prompt's own
    text (special tokens such as EOS left out). Decoded alone, the new tokens lost the space that
    a Metaspace tokenizer (Llama's, T5's, ...) keeps in a word's first token: after "once upon a",
    "▁time" alone decodes to "time", and the text read "once upon atime"."""
    def decode(ids):
        return tokenizer.decode([int(t) for t in ids], skip_special_tokens=True, clean_up_tokenization_spaces=False)

    prompt, text = decode(prompt_ids), decode(list(prompt_ids) + list(new_ids))
    return text[len(prompt):] if text.startswith(prompt) else decode(new_ids)


def check_prompts(rc: RunConfig, tokenizer, max_positions: int) -> None:
    """ValueError for a `--prompt` (the samples printed at the end) that leaves no room for a new
    token within `max_positions`: found before training rather than after it."""
    if rc.max_new_tokens <= 0:
        return
    for prompt in rc.prompts:
        n = len(encode_prompt(tokenizer, prompt))
        if n >= max_positions:
            raise ValueError(f"--prompt {prompt[:40]!r}{'...' if len(prompt) > 40 else ''} has {n} tokens: no room "
                             f"for new tokens within max_position_embeddings ({max_positions})")


# Remat by default from this model size on. For seed-973m at 4 x 256 (float32, 2-core CPU) the
# temporaries of a step without remat take 7.7 GiB (the gradient's 3.6 included); "dots" keeps
# every unbatched product (5.85 GiB) and recomputes only attention's core and elementwise ops;
# "full" when accumulating, which holds a second gradient-sized buffer (BENCHMARKS.md).
AUTO_REMAT_PARAMS = 200_000_000


def resolve_remat(remat: str | None, n_params: int, grad_accum: int = 1) -> str:
    """A `REMAT_POLICIES` name: `remat` if given, else by model size and accumulation."""
    if remat is not None:
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {', '.join(REMAT_POLICIES)}, got {remat!r}")
        return remat
    if n_params < AUTO_REMAT_PARAMS:
        return "none"
    return "dots" if grad_accum == 1 else "full"


RECIPES: dict[str, dict[str, Any]] = {
    "embedded": {},
    "seed": dict(
        preset="seed-973m", dataset="HuggingFaceTB/smollm-corpus", dataset_config="cosmopedia-v2",
        tokenizer="HuggingFaceTB/cosmo2-tokenizer", seq_len=256, batch_size=4, grad_accum=8, lr=2e-5,
        warmup_steps=2000, steps=10_000, weight_decay=0.01, clip_norm=1.0, dtype="float32", save_every=500,
        log_every=10,
        prompts=("Once upon a time", "The meaning of life is", "In a distant galaxy"),
    ),
}


def model_name(rc: RunConfig, resumed: bool) -> str:
    """How logs name the run's model: its config file, its preset, or the checkpoint it starts from
    (a resumed run's own: `--init-from` only starts a new run)."""
    return rc.config or rc.preset or f"the model of {rc.ckpt_dir if resumed else rc.init_from or rc.ckpt_dir}"
