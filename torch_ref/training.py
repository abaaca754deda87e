"""Training the PyTorch reference with the Hugging Face `Trainer` (the seed document's way).

The pieces behind `scripts/train_torch.py`, written so that a step here equals a step of the JAX
trainer (`jaxllm/train.py`) on the same batches:

- `StreamDataset`: a torch `IterableDataset` over `jaxllm.data.PackedBatches` (the same streaming,
  tokenizing and packing code as the JAX side, not a copy). Each process reads only its own share
  and the dataset yields whole micro-batches, so the `Trainer` gets a plain `DataLoader` over it
  (`CustomLLMTrainer.get_train_dataloader`): Accelerate's default for iterable datasets would make
  every process read all the data and keep a slice, or process 0 read it all and dispatch.
- `CustomLLMTrainer`: the loss of a micro-batch is normalised by the *whole step*: cross-entropy
  sum / tokens of the step (the Trainer's `num_items_in_batch`, over all micro-batches and
  processes) + `router_aux_loss_coef` x balance-loss sum / sequences of the step. That is
  `jaxllm.train`'s loss, so gradient accumulation equals one large batch.
- `RouterBiasCallback`: after every optimizer step, the expert counts of the step (every
  micro-batch, all-reduced over processes) update `router_bias` (auxiliary-loss-free balancing).
- `check_finite_gradients` (after each step's last micro-batch): a NaN / Inf loss or gradient
  stops the run before its update (`NonFiniteError`); `StopOnSignalCallback`: SIGTERM / Ctrl-C
  save the running step and stop (every process together).
- `MPSCallback`, `TextGenerationCallback`, `MetricsCallback` (`metrics.jsonl` as the JAX side
  writes it), `DataStateSaver` (the data position saved into every checkpoint, before the rest of
  it, so a resumed run continues the stream exactly where it stopped).
- `run(rc)`: the whole run from a `jaxllm.recipes.RunConfig` (the settings both scripts share),
  with automatic resume from the latest `checkpoint-*` of the output directory.

Optimizer parity with `jaxllm.train.make_optimizer` (checked by tests/test_train_torch.py):
AdamW (0.9, 0.999, eps 1e-8, decoupled weight decay x lr), weight decay on everything but the
biases and norm weights (the Trainer's `get_decay_parameter_names` leaves out exactly
`lm_head.bias` and the `*_norm.weight`s, as `jaxllm.train.decay_mask` does), linear warm-up from 0
then cosine to 0 (`get_cosine_schedule_with_warmup` = `optax.warmup_cosine_decay_schedule(0, lr,
W, T, 0)` at every step 0..T-1, up to float32 rounding), global-norm clipping (torch divides by
`norm + 1e-6`, optax by `norm`: a relative difference of 1e-6 / norm on clipped steps).

Checkpoints are Hugging Face directories (`checkpoint-N/`: config.json with `auto_map`,
model.safetensors with the canonical names and the persistent `router_bias` buffers, the modeling
code (`CustomLLM.save_pretrained`), generation_config.json, tokenizer files, optimizer/scheduler/RNG
state, trainer_state.json, data_state.rank*.json) that `convert/torch_to_flax.py` reads and
`AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)` loads anywhere. Nothing here
imports JAX.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import glob
import json
import os
import re
import shutil
import sys
import time
import zipfile
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from safetensors import SafetensorError
from torch.utils.data import DataLoader, IterableDataset
from transformers import GenerationConfig, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import has_length

from convert import ConvertError, error_line
from convert.hf_import import is_checkpoint_dir, read_hf_dir
from jaxllm.config import LLMConfig
from jaxllm.flops import training_flops_per_token
from jaxllm.recipes import (RunConfig, another_model, changed_settings, check_prompts, check_run, differing_settings, encode_prompt,
                            model_name, recorded_settings, setting_digests, warmup_warning)
from jaxllm.stopping import (NonFiniteError, RunLock, SaveError, SignalStop, check_same_checkpoints,  # noqa: F401 (SaveError: train_torch.py's)
                             check_shared_directory, failing_together, raise_where_failed, save_failed)
from torch_ref.configuration_customllm import CustomLLMConfig
from torch_ref.modeling_customllm import CustomLLM

DEFAULT_CKPT_DIR = "ckpt-torch"  # the JAX side's default is "ckpt" (Orbax); the two layouts never share a directory
DTYPES = ("auto", "float32", "bfloat16")
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def _data_state_name(process_index: int) -> str:
    return f"data_state.rank{process_index}.json"


# ---- data -------------------------------------------------------------------------------------
class DataStreamError(ValueError):
    """The data stream failed while training (a corrupt record in a later shard, a stream that
    broke): raised by `StreamDataset` in place of the reader's ValueError or OSError, so that `run`
    tells it from other errors. The message is the reader's, on one line."""


class StreamDataset(IterableDataset):
    """Micro-batches `{"input_ids", "labels"}` (int64 `[rows, seq_len]`, labels = input_ids: the
    model shifts them) from `jaxllm.data.PackedBatches`: streamed, tokenized on the fly, packed
    into full rows exactly like the JAX side, this process's share only (`process_index` of
    `process_count`). Endless (the data restarts at its end). `state` (from `state_dict()`)
    resumes the stream exactly; iterating again continues where the last iteration stopped.

    `micro_batches_per_step` (the gradient accumulation): `state_dict()` is the position after the
    last whole step's micro-batches. The Trainer reads all of a step's micro-batches before it
    computes the step, so when a read fails mid-step the position saved is that of the weights,
    not one past the micro-batches already read (which a resume would then skip)."""

    def __init__(self, data_config, tokenizer, *, rows: int, process_index: int = 0, process_count: int = 1,
                 state: dict | None = None, micro_batches_per_step: int = 1):
        if rows <= 0:
            raise ValueError(f"rows must be positive, got {rows}")
        if micro_batches_per_step <= 0:
            raise ValueError(f"micro_batches_per_step must be positive, got {micro_batches_per_step}")
        self.data_config, self.tokenizer, self.rows = data_config, tokenizer, rows
        self.process_index, self.process_count = process_index, process_count
        self.micro_batches_per_step = micro_batches_per_step
        self._state = state
        # Opened now: a missing dataset, text column or document raises ValueError here, before
        # training starts; the first iteration reads from this stream.
        self._batches, self._fresh = self._open(), True
        self._step_state, self._read = self._batches.state_dict(), 0  # at the last step boundary; read since

    def _open(self):
        from jaxllm import data as data_lib

        return data_lib.PackedBatches(self.data_config, self.tokenizer, rows=self.rows, state=self._state,
                                      process_index=self.process_index, process_count=self.process_count)

    def __iter__(self):
        if not self._fresh or self._batches is None:
            self.close()
            self._batches = self._open()
        self._fresh = False
        while True:
            try:
                rows_BT = next(self._batches)
            except (ValueError, OSError) as e:
                raise DataStreamError(error_line(e)) from e
            self._read += 1
            if self._read % self.micro_batches_per_step == 0:
                self._step_state = self._batches.state_dict()
            ids = torch.from_numpy(np.asarray(rows_BT, dtype=np.int64))
            yield {"input_ids": ids, "labels": ids}

    def state_dict(self) -> dict:
        """The position just after the last whole step's micro-batches (after the last micro-batch
        yielded when a step is one micro-batch; JSON-serialisable)."""
        return self._step_state

    def close(self) -> None:
        if self._batches is not None:
            self._state = self._batches.state_dict()  # a new iteration goes on from the last micro-batch read
            self._batches.close()
            self._batches, self._fresh = None, False


class FixedBatches(IterableDataset):
    """Micro-batches from given token arrays `[steps, grad_accum * batch, seq]`, in order: step s,
    micro-batch i holds rows `i*batch:(i+1)*batch` (the split `jaxllm.train.Trainer.put_batch`
    makes), `batch` being global: process p of n gets the p-th n-th of each micro-batch. For checks
    that feed both frameworks, or several processes and one, the very same batches."""

    def __init__(self, batches_SRT: np.ndarray, batch_size: int, *, process_index: int = 0, process_count: int = 1):
        if batch_size % process_count:
            raise ValueError(f"batch size {batch_size} cannot be split over {process_count} processes")
        self.batches, self.batch_size = np.asarray(batches_SRT, dtype=np.int64), batch_size
        self.process_index, self.process_count = process_index, process_count

    def __iter__(self):
        b = self.batch_size // self.process_count
        for rows in self.batches:
            for i in range(0, len(rows), self.batch_size):
                start = i + self.process_index * b
                ids = torch.from_numpy(rows[start:start + b])
                yield {"input_ids": ids, "labels": ids}


# ---- callbacks --------------------------------------------------------------------------------
def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def _ranks_where(flag: bool, device) -> list[int]:
    """The processes where `flag` holds: an all-reduce over the process group (every process must
    call it); [0] or [] without one."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [0] if flag else []
    flags = torch.zeros(torch.distributed.get_world_size(), dtype=torch.int32, device=device)
    flags[torch.distributed.get_rank()] = flag
    return torch.nonzero(_all_reduce_sum(flags)).flatten().tolist()


# torch.save's errors when a file cannot be written (a full disk: "unexpected pos ...", "file write
# failed"): RuntimeErrors, as a lost peer's are, which a save does not take for a failed write.
_WRITE_FAILED = re.compile(r"PytorchStreamWriter|inline_container|unexpected pos|file write failed")


class ThisRunsIntervalsCallback(TrainerCallback):
    """A resumed Trainer takes `logging_steps` and `save_steps` from the checkpoint's
    `trainer_state.json`, i.e. the first run's --log-every and --save-every, with a warning that they
    differ from the arguments: this run's apply instead (as in the JAX trainer), and the warning's
    lines about them are dropped (`_IntervalsWarningFilter`)."""

    def on_train_begin(self, args, state, control, **kwargs):
        state.logging_steps, state.save_steps = args.logging_steps, args.save_steps


class _IntervalsWarningFilter:
    """Drops the lines about logging and save intervals from `transformers`' warning that a resumed
    checkpoint's trainer state differs from the arguments (`ThisRunsIntervalsCallback` applies the
    arguments'), and the line about `per_device_train_batch_size` (this project names the change
    itself: another --batch-size in its note of changed settings, another number of processes in its
    warning about the data position; with the second, the global batch was often the same and the
    line read as an error), and the warning itself when nothing else is in it."""

    HEAD = "Warning: The following arguments do not match the ones in the `trainer_state.json`"

    def filter(self, record) -> bool:
        message = record.getMessage()
        if not message.startswith(self.HEAD):
            return True
        head, *lines = message.split("\n")
        lines = [line for line in lines if line.strip().split(":")[0] not in
                 ("logging_steps", "save_steps", "per_device_train_batch_size")]
        record.msg, record.args = "\n".join([head, *lines]), ()
        return bool(lines)


def _drop_intervals_warning() -> None:
    import logging

    logger = logging.getLogger("transformers.trainer_utils")
    if not any(isinstance(f, _IntervalsWarningFilter) for f in logger.filters):
        logger.addFilter(_IntervalsWarningFilter())


class RouterBiasCallback(TrainerCallback):
    """Auxiliary-loss-free balancing: `CustomLLMTrainer.compute_loss` adds each micro-batch's
    `expert_counts` ([layers, experts]); after the optimizer step their sum over the step (and over
    processes) goes to `model.update_router_bias`. Also keeps the last step's loss parts for logging."""

    def __init__(self):
        self._counts = None  # this step, this process
        self._lm = self._aux = 0.0  # this step, this process (already normalised by the step)
        self._last = None  # [lm, aux] of the last optimizer step, this process
        self.last_counts = None  # the last step's global counts

    def add(self, expert_counts: torch.Tensor, lm_part: torch.Tensor, aux_part: torch.Tensor) -> None:
        c = expert_counts.detach()
        self._counts = c.clone() if self._counts is None else self._counts + c
        self._lm = self._lm + lm_part.detach().float()
        self._aux = self._aux + aux_part.detach().float()

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self._counts is None:
            return
        counts = _all_reduce_sum(self._counts)
        model.update_router_bias(counts)
        self.last_counts = counts
        self._last = torch.stack([torch.as_tensor(self._lm), torch.as_tensor(self._aux)]).to(counts.device)
        self._counts, self._lm, self._aux = None, 0.0, 0.0

    def pop_last(self) -> dict[str, Any]:
        """The last optimizer step's `lm_loss` / `aux_loss` (summed over processes: every process
        holds its part of the step's normalised sums) and per-layer min / max expert load, as the
        JAX trainer logs them; {} when no step was taken since the last call. Collective under
        torch.distributed (reduced here, at log time only): call on every rank."""
        if self._last is None:
            return {}
        lm, aux = _all_reduce_sum(self._last.clone()).tolist()
        load = self.last_counts.float() / self.last_counts.sum(-1, keepdim=True).clamp(min=1)
        self._last = None
        return {"lm_loss": lm, "aux_loss": aux, "expert_load_min": load.min(-1).values.tolist(),
                "expert_load_max": load.max(-1).values.tolist()}


class DenseGradientsCallback(TrainerCallback):
    """Before each optimizer step, gives every trainable parameter without a gradient a zero one.

    A parameter with `grad is None` (the Trainer zeroes gradients with `set_to_none`) is skipped
    entirely by torch's AdamW: no moment decay, no weight decay, no step count. optax (the JAX side)
    sees a zero gradient and still decays the moments, applies the momentum update and the weight
    decay. `CustomLLM` already gives a routed expert that no token chose a zero gradient (it runs
    on no rows); this keeps both optimizers the same for any other parameter left out of a step."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        for p in model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)


def check_finite_gradients(model, step: int) -> None:
    """`NonFiniteError` unless the gradients and their global norm are finite, as the JAX trainer
    checks its loss and gradient norm: before clipping, which turns an overflowing norm (finite
    gradients) into zero gradients and an update of momentum alone. One pass over the gradients
    (a norm per tensor, as the clipping computes them) and one device sync."""
    norms = [torch.linalg.vector_norm(p.grad) for p in model.parameters() if p.grad is not None]
    if norms and not bool(torch.isfinite(torch.linalg.vector_norm(torch.stack(norms)))):
        raise NonFiniteError(f"non-finite loss or gradient at step {step}; the update was not applied")


class StopOnSignalCallback(TrainerCallback):
    """SIGTERM or a first Ctrl-C (`jaxllm.stopping.SignalStop`, as in the JAX trainer): the running
    step ends, a checkpoint is saved and training stops. Under torch.distributed the request is
    all-reduced after every optimizer step (one small collective), so a signal to any one process
    stops all of them at the same step: the save is collective. `stopped_by`: the signal's name,
    or "a signal to process I". `restore()` puts the previous handlers back."""

    def __init__(self):
        self.signals = SignalStop()
        self.stopped_by: str | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.signals.install()

    def on_step_end(self, args, state, control, **kwargs):
        stopped_by = self.signals.agreed(self._asked(args.device))
        if stopped_by and state.global_step < state.max_steps:  # (the last step saves anyway)
            self.stopped_by = stopped_by
            control.should_save = control.should_training_stop = True

    def _asked(self, device) -> list[int]:
        """The processes where a signal came."""
        return _ranks_where(self.signals.requested is not None, device)

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()

    def restore(self) -> None:
        self.signals.restore()


class MPSCallback(TrainerCallback):
    """Releases the MPS allocator's cached memory after every optimizer step and checkpoint
    (Apple GPUs keep freed blocks cached, which starves the rest of the machine). No-op elsewhere."""

    def on_step_end(self, args, state, control, **kwargs):
        if args.device.type == "mps":
            torch.mps.empty_cache()

    on_save = on_step_end


def generate_samples(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, *, seed: int = 0,
                     temperature: float = 0.8, top_k: int = 40) -> list[tuple[str, str]]:
    """Continuations of each prompt by `model.generate`, as (prompt, text) pairs: sampled with
    `temperature` and `top_k` (the JAX side's `print_samples` defaults), seeded by `seed` without
    touching the global RNG; `temperature=0` is greedy. A prompt that tokenizes to nothing starts
    from the BOS token."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    sampling = dict(do_sample=True, temperature=temperature, top_k=top_k) if temperature > 0 else dict(do_sample=False)
    # These settings only, as on the JAX side: not also what the generation_config.json of an
    # --init-from directory asks (`generate` takes its settings for every one the call leaves unset).
    saved_settings, model.generation_config = model.generation_config, GenerationConfig.from_model_config(model.config)
    out = []
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for prompt in prompts:
                ids = encode_prompt(tokenizer, prompt) or [model.config.bos_token_id]
                n_new = min(max_new_tokens, model.config.max_position_embeddings - len(ids))
                if n_new <= 0:
                    raise ValueError(f"prompt {prompt!r} has {len(ids)} tokens, no room left in "
                                     f"max_position_embeddings ({model.config.max_position_embeddings})")
                x = torch.tensor([ids], device=device)
                with torch.no_grad():
                    y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n_new,
                                       eos_token_id=eos, pad_token_id=eos, **sampling)
                out.append((prompt, tokenizer.decode(y[0], skip_special_tokens=True)))
    finally:
        model.train(was_training)
        model.generation_config = saved_settings
    return out


def print_samples(samples: Iterable[tuple[str, str]], file=None) -> None:
    """The JAX side's format: `'prompt' -> prompt + continuation`, one line per prompt."""
    file = file or sys.stdout
    print("\ngenerated text:", file=file)
    for prompt, text in samples:
        print(f"  {prompt!r} -> {text}", file=file, flush=True)


class TextGenerationCallback(TrainerCallback):
    """The seed's callback: at the end of training, prints generated text for each prompt
    (process 0 only) and keeps it in `samples`."""

    def __init__(self, tokenizer, prompts: Sequence[str], max_new_tokens: int = 40, *, seed: int = 0):
        self.tokenizer, self.prompts, self.max_new_tokens, self.seed = tokenizer, tuple(prompts), max_new_tokens, seed
        self.samples: list[tuple[str, str]] = []

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero or not self.prompts or self.max_new_tokens <= 0:
            return
        if state.global_step < state.max_steps:  # stopped by a signal: saved, not finished
            return
        self.samples = generate_samples(model, self.tokenizer, self.prompts, self.max_new_tokens, seed=self.seed)
        print_samples(self.samples)


class MetricsCallback(TrainerCallback):
    """Writes every training log of a `CustomLLMTrainer` to `metrics.jsonl` with the JAX side's keys
    and meaning (`step`, `loss`, `lm_loss`, `aux_loss`, `lr`, `grad_norm`, `tokens_per_sec`,
    `step_time_s`, expert loads) through `jaxllm.metrics.MetricsWriter`, and keeps the records
    (`records`) on process 0. `loss`, `lm_loss` and `aux_loss` are the logging step's own (`loss` =
    `lm_loss + router_aux_loss_coef * aux_loss`); the Trainer's console `loss` stays its mean over
    the steps since the last log. Throughput, step time and MFU are means over the steps since the
    last log, the checkpoint saves among them left out (`saved`: a save counted there showed a
    falsely low throughput); `save_s` holds the seconds those saves took."""

    def __init__(self, out_dir: str | None, tokens_per_step: int, *, enabled: bool = True, start_step: int = 0,
                 flops_per_step: float | None = None, peak_flops: float | None = None):
        from jaxllm.metrics import MetricsWriter

        self.writer = MetricsWriter(out_dir, enabled=enabled, start_step=start_step) if out_dir else None
        self.tokens_per_step = tokens_per_step
        # MFU as on the JAX side: counted FLOPs per second over the peak of all devices (None: unknown)
        self.flops_per_step, self.peak_flops = flops_per_step, peak_flops
        self.records: list[dict[str, Any]] = []
        self._t = self._step = self._first = None
        self._save_s = 0.0  # seconds spent saving checkpoints since the last log

    def saved(self, seconds: float) -> None:
        """A checkpoint save took `seconds` (`CustomLLMTrainer._save_checkpoint`), which the
        window's throughput leaves out."""
        self._save_s += seconds

    def on_train_begin(self, args, state, control, **kwargs):
        self._t, self._step, self._save_s = time.perf_counter(), state.global_step, 0.0
        self._first = state.global_step + 1

    def on_step_end(self, args, state, control, **kwargs):
        # The first step of a run (a resumed one's too) and the last are logged, as on the JAX side.
        if state.global_step in (self._first, state.max_steps):
            control.should_log = True

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if not logs or "loss" not in logs or not state.is_world_process_zero:
            return
        now = time.perf_counter()
        steps = max(state.global_step - self._step, 1)
        dt = now - self._t - self._save_s  # the steps' time, saves left out
        loss = logs["lm_loss"] + model.config.router_aux_loss_coef * logs["aux_loss"]
        rec = {"step": state.global_step, "loss": loss, "lr": float(logs.get("learning_rate", 0.0)),
               "grad_norm": float(logs["grad_norm"]) if logs.get("grad_norm") is not None else None,
               "tokens_per_sec": steps * self.tokens_per_step / dt if dt > 0 else 0.0, "step_time_s": dt / steps,
               "save_s": self._save_s}
        rec["mfu"] = (self.flops_per_step / rec["step_time_s"] / self.peak_flops
                      if self.peak_flops and self.flops_per_step and dt > 0 else None)
        rec.update({k: logs[k] for k in ("lm_loss", "aux_loss", "expert_load_min", "expert_load_max") if k in logs})
        self.records.append(rec)
        if self.writer is not None:
            self.writer.write(rec)
        self._t, self._step, self._save_s = now, state.global_step, 0.0

    def on_train_end(self, args, state, control, **kwargs):
        if self.writer is not None:
            self.writer.close()


def _synchronize(device: torch.device) -> None:
    """Wait for the kernels queued on `device` (CUDA, MPS; nothing to wait for on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class DataStateSaver:
    """Saves the data position of this process into a checkpoint
    (`checkpoint-N/data_state.rank{i}.json`), so that a resumed run reads the batches that the
    interrupted one would have read next. Called by `CustomLLMTrainer._save_checkpoint` before the
    Trainer's own save: a checkpoint with a trainer state always has its data position."""

    def __init__(self, dataset: StreamDataset, source: dict | None = None, settings: dict | None = None):
        self.dataset, self.source = dataset, source  # source: `jaxllm.data.stream_source`, checked on resume
        self.settings = settings  # `jaxllm.recipes.recorded_settings`: a resume names those it changes

    def save(self, ckpt: str) -> None:
        os.makedirs(ckpt, exist_ok=True)
        record = {"process_count": self.dataset.process_count, "state": self.dataset.state_dict(),
                  "source": self.source, "settings": self.settings}
        path = os.path.join(ckpt, _data_state_name(self.dataset.process_index))
        with open(path + ".tmp", "w") as f:
            json.dump(record, f)
        os.replace(path + ".tmp", path)


def read_data_state(checkpoint: str, process_index: int, process_count: int,
                    source: dict | None = None) -> dict | None:
    """This process's data position saved in `checkpoint`, or None (with a warning on stderr)
    when it is missing, cannot be read or was written by another number of processes. ValueError when it was
    saved for another token stream than `source` (`jaxllm.data.check_same_stream`)."""
    from jaxllm import data as data_lib

    path = os.path.join(checkpoint, _data_state_name(process_index))
    if not os.path.isfile(path):
        print(f"warning: {path} is missing; the data stream starts from its beginning", file=sys.stderr)
        return None
    try:
        record = _data_record(checkpoint, process_index)
        if not isinstance(record.get("state"), dict):
            raise ValueError("no data position in it")
    except (OSError, ValueError) as e:  # damaged (truncated, overwritten): as if missing, not a bare JSON error
        print(f"warning: {path} cannot be read ({error_line(e)}); the data stream starts from its beginning",
              file=sys.stderr)
        return None
    if source is not None:
        data_lib.check_same_stream(record.get("source"), source, os.path.dirname(checkpoint),
                                   quiet=process_index != 0)
    if record.get("process_count") != process_count:
        if process_index == 0:  # (the same for every process)
            print(f"warning: {checkpoint} was written by {record.get('process_count')} process(es), this run has "
                  f"{process_count}; the data stream starts from its beginning", file=sys.stderr)
        return None
    return record["state"]


def _data_record(checkpoint: str, process_index: int) -> dict:
    """The parsed `data_state.rank<i>.json` of `checkpoint` (what `DataStateSaver` wrote).
    OSError / ValueError when it is missing, damaged or not a JSON object."""
    with open(os.path.join(checkpoint, _data_state_name(process_index))) as f:
        record = json.load(f)
    if not isinstance(record, dict):
        raise ValueError("no data position in it")
    return record


def read_settings(checkpoint: str) -> dict | None:
    """The run settings recorded with `checkpoint`'s data position (process 0's), or None."""
    try:
        return _data_record(checkpoint, 0).get("settings")
    except (OSError, ValueError):
        return None


# ---- the trainer ------------------------------------------------------------------------------
class CustomLLMTrainer(Trainer):
    """`Trainer` with `jaxllm.train`'s step loss, the router-bias update and a rank-aware stream.

    Per micro-batch, with S_tok / S_seq the shifted tokens / sequences of the whole optimizer step
    over all processes and P the number of processes:
        loss = P * (ce_sum / S_tok + router_aux_loss_coef * aux_sum / S_seq)
    (P because DDP averages the gradients over processes). Summed over the step's micro-batches and
    processes that is `jaxllm.train`'s `ce / n_tokens + coef * aux / n_seqs`. S_tok is the Trainer's
    `num_items_in_batch`; it counts `labels[:, 1:]` because the model declares a causal-LM loss
    (`CustomLLM.loss_type`).

    `data_state` (a `DataStateSaver`) writes this process's data position into each checkpoint
    before the Trainer saves it (`_save_checkpoint`)."""

    loss_is_scaled_for_ga = True

    def __init__(self, *args, callbacks=None, data_state: DataStateSaver | None = None, **kwargs):
        self.router_bias_callback = RouterBiasCallback()
        self.data_state = data_state
        # (told each checkpoint save's seconds, which its throughput leaves out)
        self.metrics = next((c for c in callbacks or [] if isinstance(c, MetricsCallback)), None)
        model = kwargs.get("model", args[0] if args else None)
        use_cache = getattr(getattr(model, "config", None), "use_cache", None)
        super().__init__(*args, callbacks=[self.router_bias_callback, DenseGradientsCallback(),
                                           ThisRunsIntervalsCallback(), *(callbacks or [])], **kwargs)
        _drop_intervals_warning()
        if use_cache is not None:  # the Trainer writes `args.use_cache` (False by default) into the
            # config that every checkpoint saves: loaded, `model(ids)` would return no cache. The
            # model builds none while training anyway.
            self.model.config.use_cache = use_cache

    def get_train_dataloader(self) -> DataLoader:
        # The dataset yields this process's micro-batches already: no sampler, no collator and no
        # Accelerate sharding; `_prepare_inputs` moves the tensors to the device. The loader's own
        # generator keeps `iter()` from drawing on the global RNG, which the Trainer restores from
        # a checkpoint just before that call: a draw there would shift every later dropout mask.
        if self.train_dataset is None:
            raise ValueError("CustomLLMTrainer: training requires a train_dataset")
        return DataLoader(self.train_dataset, batch_size=None, num_workers=0, generator=torch.Generator())

    def training_step(self, *args, **kwargs):
        # After the step's last micro-batch (its gradients complete, and all-reduced under DDP, so
        # that every process decides alike) and before the Trainer clips them: a NaN / Inf loss or
        # gradient stops the run before its update, as in JAX; nothing non-finite reaches the
        # weights or a checkpoint, and the Trainer's rotation keeps the checkpoints saved before.
        loss = super().training_step(*args, **kwargs)
        if self.accelerator.sync_gradients:
            check_finite_gradients(self.model, self.state.global_step + 1)
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids, labels = inputs["input_ids"], inputs.get("labels", inputs["input_ids"])
        if num_items_in_batch is None:  # not inside the Trainer's step (no step totals): this batch alone
            num_items_in_batch = (labels[:, 1:] != -100).sum()
        out = model(input_ids=ids, attention_mask=inputs.get("attention_mask"), labels=labels,
                    num_items_in_batch=num_items_in_batch)
        if not model.training:  # evaluation: this batch's loss, as the model gives it (not a step's part)
            return (out.loss, out) if return_outputs else out.loss
        P = self.accelerator.num_processes
        seqs_step = ids.shape[0] * getattr(self, "current_gradient_accumulation_steps", 1) * P
        cfg = self.accelerator.unwrap_model(model).config
        aux_part = out.aux_loss * ids.shape[0] / seqs_step  # the model's aux_loss is a mean over this batch
        loss = P * (out.lm_loss + cfg.router_aux_loss_coef * aux_part)
        self.router_bias_callback.add(out.expert_counts, out.lm_loss, aux_part)
        return (loss, out) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs = {**logs, **self.router_bias_callback.pop_last()}
        if self.train_dataset is None or has_length(self.train_dataset):
            super().log(logs, start_time)
            return
        # A stream has no epochs: the Trainer's `epoch` (steps over its own idea of an epoch's
        # length) would mean nothing, so it is left out of the logs.
        epoch, self.state.epoch = self.state.epoch, None
        try:
            super().log(logs, start_time)
        finally:
            self.state.epoch = epoch

    def _save_checkpoint(self, model, trial) -> None:
        # A checkpoint that cannot be written (a full disk: safetensors' or torch.save's error, the
        # latter "unexpected pos ..." without a word of space) ends the run in one line naming the
        # checkpoint and the last complete one; a lost peer's error is left as it is.
        _synchronize(self.args.device)  # (the step's own kernels are the step's time)
        t0 = time.perf_counter()
        try:
            self._save_and_rotate(model, trial)
            if self.metrics is not None:
                self.metrics.saved(time.perf_counter() - t0)
        except (OSError, RuntimeError, SafetensorError) as e:
            if isinstance(e, RuntimeError) and not _WRITE_FAILED.search(str(e)):  # (gloo's lost peer, ...)
                raise
            out, step = self._get_output_dir(trial=trial), self.state.global_step
            reason = error_line(e)
            free = shutil.disk_usage(out).free if os.path.isdir(out) else None
            if free is not None and free < 2**26 and os.strerror(errno.ENOSPC) not in reason:
                reason += f"; {free / 2**20:.1f} MiB free on its file system"
            last = next((f"checkpoint-{s}" for s, path in _checkpoints(out)
                         if s != step and _missing_from_checkpoint(path) is None), None)
            raise SaveError(save_failed(f"checkpoint-{step}", out, last, reason)) from e

    def _save_and_rotate(self, model, trial) -> None:
        # Every process's data position goes in first (hence the barrier): the Trainer's save then
        # writes trainer_state.json, which makes the checkpoint resumable, and deletes older
        # checkpoints. Written after, a crash in between would leave a checkpoint that resumes the
        # weights but restarts the data stream.
        if self.data_state is not None:
            self.data_state.save(os.path.join(self._get_output_dir(trial=trial),
                                              f"checkpoint-{self.state.global_step}"))
            self.accelerator.wait_for_everyone()
        # The Trainer deletes checkpoints beyond --keep in the order of their folders' modification
        # times, which a copy, a restore or a download can leave out of step order (it then deleted
        # the newest steps): older complete ones go by step number here, as in JAX. An incomplete one
        # (an interrupted save, which a resume passed over) is neither counted nor deleted: counted,
        # one above the resumed step took the place of the checkpoint just written.
        keep, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = keep
        if self.args.should_save and keep is not None and keep > 0:
            complete = [(step, path) for step, path in _checkpoints(self._get_output_dir(trial=trial))
                        if _missing_from_checkpoint(path) is None]  # newest first
            for step, path in complete[keep:]:
                if step != self.state.global_step:
                    shutil.rmtree(path, ignore_errors=True)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        # A resumed run's schedule follows this run's settings, as in JAX (`jaxllm.train` builds it
        # from the flags; the optimizer state holds only the step count). The saved state holds
        # the learning rate the run started with (the scheduler's `base_lrs`, the groups'
        # `initial_lr`), which a resume with another --lr kept; warm-up and length come from the
        # schedule's function, made from this run's arguments. Likewise the groups' weight decay
        # (the state's was the first run's --weight-decay): this run's on the parameters it decays.
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        groups = self.optimizer.param_groups
        model = self.accelerator.unwrap_model(self.model)
        names = set(self.get_decay_parameter_names(model))
        decayed = {id(p) for n, p in model.named_parameters() if n in names}
        for group in groups:
            group["weight_decay"] = self.args.weight_decay if all(id(p) in decayed for p in group["params"]) else 0.0
        sched = self.lr_scheduler
        if not isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
            return
        sched.base_lrs = [self.args.learning_rate] * len(groups)
        lrs = [base * f(sched.last_epoch) for base, f in zip(sched.base_lrs, sched.lr_lambdas)]
        for group, lr in zip(groups, lrs):
            group["initial_lr"], group["lr"] = self.args.learning_rate, lr
        sched._last_lr = lrs


# ---- settings -> TrainingArguments ------------------------------------------------------------
def resolve_dtype(dtype: str) -> str:
    """"auto": bfloat16 mixed precision where the accelerator supports it (CUDA with bf16), else
    float32 (CPU, MPS, older GPUs). GPUs before Ampere (T4, V100) run bfloat16 only by emulation,
    which `torch.cuda.is_bf16_supported()` counts unless told not to: they get float32."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    given = dtype
    if dtype == "auto":
        dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False) \
            else "float32"
    # `accelerate launch --mixed_precision` (or Accelerate's config file) passes its precision in
    # this variable, and the Trainer takes it over `bf16=False`: refused where it is not --dtype's.
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if launched != "no" and launched != {"bfloat16": "bf16"}.get(dtype):
        resolved = f" ({dtype} here)" if given != dtype else ""
        raise ValueError(f"Accelerate's mixed precision {launched} (accelerate launch --mixed_precision or its config "
                         f"file) differs from --dtype {given}{resolved}; train_torch.py trains in float32 or bfloat16 "
                         "as --dtype says: launch with --mixed_precision no (or bf16 with --dtype bfloat16)")
    return dtype


def _peak_flops(dtype: str, gpus: int) -> float | None:
    """The datasheet peak of this run's `gpus` GPUs in bfloat16, for the metrics' MFU;
    None on CPUs, unknown chips and in float32 (the datasheet's float32 figure is TF32's, which
    PyTorch does not use by default)."""
    from jaxllm.flops import device_peak_flops

    if dtype != "bfloat16" or not torch.cuda.is_available():
        return None
    peak = device_peak_flops(torch.cuda.get_device_name(), "bfloat16")
    return peak * gpus if peak else None


def cpu_only() -> bool:
    """No GPU or other accelerator: then the Trainer must be told `use_cpu`, or processes started
    by torchrun / accelerate launch would each train alone instead of together (gloo DDP)."""
    if hasattr(torch, "accelerator"):  # torch >= 2.6: CUDA, MPS, XPU, ...
        return not torch.accelerator.is_available()
    return not (torch.cuda.is_available() or torch.backends.mps.is_available())


def training_arguments(rc: RunConfig, output_dir: str, *, per_device_batch: int, dtype: str = "float32",
                       save: bool = True, **overrides) -> TrainingArguments:
    """The Trainer's arguments for the settings `rc` (the optimizer and schedule of `jaxllm.train`).
    Accelerate picks the device (CUDA, MPS or CPU); `dtype` "bfloat16" is autocast mixed precision
    with float32 master weights."""
    kw = dict(
        use_cpu=cpu_only(),
        output_dir=output_dir, max_steps=rc.steps, per_device_train_batch_size=per_device_batch,
        gradient_accumulation_steps=rc.grad_accum, learning_rate=rc.lr, lr_scheduler_type="cosine",
        warmup_steps=min(rc.warmup_steps, rc.steps),  # as jaxllm.train.lr_schedule clamps it
        weight_decay=rc.weight_decay, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, optim="adamw_torch",
        max_grad_norm=rc.clip_norm, bf16=dtype == "bfloat16",
        logging_steps=rc.log_every, logging_first_step=True,
        save_strategy="steps" if save else "no", save_steps=rc.save_every, save_total_limit=rc.keep,
        seed=rc.seed, report_to="none", disable_tqdm=not rc.progress,
        dataloader_num_workers=0, ignore_data_skip=True,  # the data position is restored, not replayed
        average_tokens_across_devices=True,
        # Every parameter gets a gradient in every micro-batch, even a routed expert no token chose
        # (`DeepSeekMoE.forward`), so DDP need not search the graph for unused ones.
        ddp_find_unused_parameters=False,
    )
    kw.update(overrides)
    args = TrainingArguments(**kw)
    if args.n_gpu > 1:
        # One process that sees several GPUs (not started by torchrun / accelerate launch): the
        # Trainer would wrap the model in nn.DataParallel, which gathers the outputs of the replicas:
        # the step's loss (`CustomLLMTrainer.compute_loss`: a sum of parts over the step's tokens)
        # would be averaged over them, and the router-bias counts concatenated. One GPU trains.
        print(f"note: this process sees {args.n_gpu} GPUs and trains on one ({args.device}); to train on all of "
              f"them, start it with torchrun --nproc-per-node {args.n_gpu} (or accelerate launch)",
              file=sys.stderr, flush=True)
        args._n_gpu = 1  # (what the Trainer itself does for a model split over GPUs)
    return args


def model_config(rc: RunConfig) -> LLMConfig:
    """The run's model: its --config, its --preset, or (neither given) its --init-from directory's."""
    if rc.config:
        return LLMConfig.from_json_file(rc.config)
    if rc.preset is None:  # the model of the run's own latest checkpoint (a resume), else of --init-from's
        from convert import ConvertError
        from convert.hf_import import read_hf_config

        last = latest_checkpoint(rc.ckpt_dir, warn=False) if os.path.isdir(rc.ckpt_dir) else None
        if not last and rc.init_from is None:  # none of them loads: the default model (the resume says why not)
            return LLMConfig.from_preset(RunConfig.preset)
        if not last:
            _refuse_orbax_init_from(os.path.abspath(rc.init_from))
        try:
            return read_hf_config(last[0] if last else os.path.abspath(rc.init_from))
        except ConvertError as e:
            raise ValueError(f"{'' if last else '--init-from: '}{e}") from None
    return LLMConfig.from_preset(rc.preset)


def _missing_from_checkpoint(path: str) -> str | None:
    """The first file that a resumable checkpoint needs and `path` lacks: its trainer state, or the
    data position of a process (rank 0's records how many processes wrote one); None if complete."""
    if not os.path.isfile(os.path.join(path, "trainer_state.json")):
        return "trainer_state.json"
    try:
        count = int(_data_record(path, 0)["process_count"])
    except (OSError, ValueError, KeyError, TypeError):
        return _data_state_name(0)
    return next((n for n in map(_data_state_name, range(1, count))
                 if not os.path.isfile(os.path.join(path, n))), None)


def _unloadable(path: str) -> str | None:
    """Why the Trainer cannot resume from the checkpoint `path` (a damaged file: truncated, cut
    short, overwritten), or None. Cheap: the trainer state is parsed, the weights' headers are
    checked against its config.json (`convert.hf_import.read_hf_dir`), the optimizer and scheduler
    states are there, and the zip directory (at the end of the file) of every optimizer / scheduler
    / RNG state is read."""
    try:
        with open(os.path.join(path, "trainer_state.json")) as f:
            json.load(f)
    except (OSError, ValueError) as e:
        return f"{os.path.join(path, 'trainer_state.json')}: not readable JSON ({error_line(e)})"
    config_path = os.path.join(path, "config.json")
    # A checkpoint holding its trainer state (written last) and lacking one of these lost it: the
    # Trainer resumes without either, silently, with a new optimizer state and the learning-rate
    # schedule from its start (the rate of its warm-up's first step).
    for name in ("config.json", "optimizer.pt", "scheduler.pt"):
        if not os.path.isfile(os.path.join(path, name)):
            return f"{os.path.join(path, name)} is missing"
    try:
        with open(config_path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        return f"{config_path}: not readable JSON ({error_line(e)})"
    try:
        LLMConfig.from_dict(saved)
    except (ValueError, TypeError, AttributeError):
        return None  # no damage: another model or version, which resuming refuses by name (`_check_saved_config`)
    try:
        read_hf_dir(path)
    except ConvertError as e:
        return str(e)
    for file in sorted(glob.glob(os.path.join(path, "*.pt")) + glob.glob(os.path.join(path, "*.pth"))):
        try:
            zipfile.ZipFile(file).close()
        except (OSError, zipfile.BadZipFile) as e:
            return f"{file}: not a readable PyTorch file ({error_line(e)})"
    return None


def _checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every `checkpoint-N` in `output_dir`, newest first (by their names)."""
    found = []
    for path in glob.glob(os.path.join(output_dir, "checkpoint-*")):
        m = CHECKPOINT_RE.match(os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found, reverse=True)


def holds_checkpoints(output_dir: str) -> bool:
    """Whether `output_dir` holds `checkpoint-N` directories (by their names; none read)."""
    return any(os.path.isdir(path) for _, path in _checkpoints(output_dir))


def latest_checkpoint(output_dir: str, *, warn: bool = True, notes: list | None = None) -> tuple[str, int] | None:
    """(path, step) of the highest complete (`_missing_from_checkpoint`) and loadable (`_unloadable`)
    `checkpoint-N` in `output_dir`. A higher one is skipped with a warning on stderr (`warn`: one
    process of several says it): an incomplete one (a crash while it was being saved) or a damaged
    one (`set_aside_damaged` then keeps it out of the Trainer's way). When none is complete, the
    highest loadable one with a trainer state still resumes (its data stream then restarts,
    `read_data_state` warns), rather than a new run from step 0 over the old one; when checkpoints
    with a trainer state exist and none of them loads, ValueError (nothing is deleted). With a
    `notes` list, the warnings are appended to it instead of printed (said once the run's start-up
    checks have passed)."""
    found = _checkpoints(output_dir)
    skipped = []
    for step, path in found:
        missing = _missing_from_checkpoint(path)
        why = ((f"has an unreadable {missing}" if os.path.exists(os.path.join(path, missing)) else f"lacks {missing}")
               + " (an interrupted save)") if missing else _unloadable(path)
        if why is None:
            break
        skipped.append((path, why if missing else f"cannot be loaded: {why}"))
    else:
        with_state = [(step, path) for step, path in found if os.path.isfile(os.path.join(path, "trainer_state.json"))]
        damaged = {path: _unloadable(path) for _, path in with_state}
        step, path = next(((step, path) for step, path in with_state if damaged[path] is None), (None, None))
        if path is None:
            if with_state:
                raise ValueError(f"no checkpoint of {output_dir} can be resumed: {with_state[0][1]} cannot be loaded "
                                 f"({damaged[with_state[0][1]]}); nothing was deleted: move the damaged checkpoints "
                                 "away, or use another --ckpt-dir")
            return None
        skipped = [(p, f"cannot be loaded: {damaged[p]}") for s, p in with_state if s > step]
    if warn:
        for p, why in skipped:
            line = f"warning: {p} {why}; not resuming from it"
            if notes is None:
                print(line, file=sys.stderr)
            else:
                notes.append(line)
    return path, step


def check_no_earlier_run(output_dir: str) -> None:
    """ValueError naming what is there when `output_dir`, which holds no checkpoint to resume, holds
    an earlier run all the same: checkpoints set aside as unloadable, or a finished run's loss curve
    (a new run would truncate its metrics.jsonl and replace its loss.png; as `train_jax.py` does);
    or when it is one checkpoint of a run, or a model directory (`cli.not_a_run_directory`).
    What a run that stopped before its first checkpoint leaves (metrics.jsonl) starts again."""
    from jaxllm.cli import listing, not_a_run_directory

    problem = not_a_run_directory(output_dir, "torch")
    if problem:
        raise ValueError(problem)
    names = sorted(os.listdir(output_dir))
    if any(n.startswith("unloadable-checkpoint-") for n in names) or "loss.png" in names:
        raise ValueError(f"--ckpt-dir {output_dir} holds an earlier run ({listing(names)}) but no checkpoint to "
                         "resume: use another --ckpt-dir, or move those files away to start over in it")


def set_aside_damaged(output_dir: str, step: int) -> list[str]:
    """Rename the checkpoints above `step` (the one resumed from) that cannot be loaded to
    `unloadable-checkpoint-N-<time>`, and return their new paths: kept for inspection (a damaged
    optimizer state leaves good weights), and out of the Trainer's way, which would save into
    them and whose rotation (`save_total_limit`) deletes old `checkpoint-*` directories."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = []
    for found, path in _checkpoints(output_dir):
        if found > step and os.path.isfile(os.path.join(path, "trainer_state.json")) and _unloadable(path):
            target = os.path.join(output_dir, f"unloadable-{os.path.basename(path)}-{stamp}")
            try:
                os.rename(path, target)
            except OSError as e:  # left where it is: the other processes are waiting at a barrier
                print(f"warning: cannot rename {path} ({e.strerror or e})", file=sys.stderr)
                continue
            moved.append(target)
    return moved


def _recorded_tokenizer(checkpoint: str) -> str | None:
    """The tokenizer a run recorded with its data position in `checkpoint` (`stream_source`), or
    None when it recorded none."""
    try:
        with open(os.path.join(checkpoint, _data_state_name(0))) as f:
            return ((json.load(f).get("source") or {}).get("tokenizer"))
    except (OSError, ValueError, AttributeError):
        return None


def _check_same_model(saved: LLMConfig, config: LLMConfig, where: str, advice: str) -> None:
    if saved != config:
        raise ValueError(f"{where} holds another model (differs in {', '.join(saved.differences(config))}); {advice}")


def _check_saved_config(path: str, config: LLMConfig, what: str, rc: RunConfig) -> None:
    try:
        saved = LLMConfig.from_json_file(os.path.join(path, "config.json"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{what} {path}: cannot read its config.json ({e})") from None
    if saved != config:  # naming the flag that asked for the model and the model saved
        raise ValueError(another_model(rc, saved, config, f"--ckpt-dir {os.path.dirname(path)} "
                                                          f"({os.path.basename(path)})"))


def _refuse_orbax_init_from(path: str) -> None:
    """ValueError pointing to the converter when `--init-from` (absolute `path`) is a JAX (Orbax)
    checkpoint directory, or one step of one, rather than a Hugging Face directory."""
    if not os.path.isdir(path) or os.path.exists(os.path.join(path, "config.json")):
        return
    parent, name = os.path.split(path)
    if is_checkpoint_dir(path):
        what, ckpt = "a JAX (Orbax) checkpoint", path
    elif name.isdigit() and is_checkpoint_dir(parent):
        what, ckpt = f"step {name} of the JAX (Orbax) checkpoint {parent}", parent
    else:
        return
    raise ValueError(f"--init-from {path} is {what}, not a Hugging Face directory; convert it first "
                     f"(python convert/flax_to_torch.py {ckpt} --out HF_DIR) and pass --init-from HF_DIR")


def _check_init_from(path: str, config: LLMConfig) -> None:
    """The `--init-from` directory is a Hugging Face directory of this model holding every tensor
    with its shape, as the converter checks it (`convert.hf_import.read_hf_dir`, headers only):
    `from_pretrained` would start a missing tensor from random values. ValueError otherwise."""
    path = os.path.abspath(path)
    _refuse_orbax_init_from(path)
    try:
        saved, _ = read_hf_dir(path)
    except ConvertError as e:
        raise ValueError(f"--init-from: {e}") from None
    _check_same_model(saved, config, f"--init-from {path}", "without --preset, --config or a recipe naming a model, "
                      "--init-from trains the model it holds")


def _log(msg: str, process_index: int) -> None:
    if process_index == 0:
        print(msg, flush=True)


def _keep_progress(trainer: "CustomLLMTrainer", start: int, world: int) -> str:
    """After a data error mid-run: save the steps taken since the last checkpoint (one process:
    with several, the others wait inside the step's collectives), and say so. The Trainer reads a
    step's micro-batches before computing it, so the weights are those of the last whole step, and
    so is the data position (`StreamDataset.state_dict`): a resume meets the same error until the
    data is mended."""
    step = trainer.state.global_step
    saved = os.path.isdir(os.path.join(trainer.args.output_dir, f"checkpoint-{step}"))
    if step == start or saved:
        return f" (at step {step}; " + ("nothing new to save)" if step == start else "saved at that step)")
    if world > 1:
        return f" (at step {step}; the steps after the last checkpoint are lost)"
    try:
        trainer._save_checkpoint(trainer.model, trial=None)  # ours: the data position, then the Trainer's save
    except SaveError as e:  # the data error stays the one named
        return f" (at step {step}; saving it failed: {e})"
    return f" (saved {os.path.join(trainer.args.output_dir, f'checkpoint-{step}')} first)"


def run(rc: RunConfig, *, dtype: str = "auto") -> dict[str, Any]:
    """Train as `rc` says (resuming from the latest checkpoint in `rc.ckpt_dir`); returns a summary
    (start/end step, first/last logged loss, wall time, generated samples, checkpoint directory).
    Raises ValueError for bad settings or inputs, and when another run is training in the same
    --ckpt-dir (`jaxllm.stopping.RunLock`)."""
    lock = RunLock()
    try:
        return _run(rc, lock, dtype)
    finally:
        lock.release()


def _several(dist) -> bool:
    return dist.num_processes > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


def _raise_if_any_failed(error: Exception | None, what: str, dist) -> None:
    """`error` where it happened, and a ValueError naming the failed processes everywhere else
    (`jaxllm.stopping.raise_where_failed`; without it, the others waited in their next collective
    or died there with a traceback). Collective."""
    raise_where_failed(error, what, lambda flag: _ranks_where(flag, dist.device), dist.num_processes)


def _from_rank_0(value: int, dist) -> int:
    """Process 0's `value`, in every process (collective)."""
    t = torch.tensor([value], dtype=torch.int64, device=dist.device)
    torch.distributed.broadcast(t, src=0)
    return int(t.item())


def _as_rank_0_sees(value: bool, dist) -> bool:
    """`value` as process 0 found it, in every process (collective), so that they take the same
    branch (and the same collectives) when the file system changes between their looks."""
    return bool(_from_rank_0(int(bool(value)), dist)) if _several(dist) else bool(value)


def _collectives(dist) -> dict[str, Any]:
    """The process count and collectives that `jaxllm.stopping`'s agreements take (`count`,
    `broadcast`: process 0's int to all, `where`: the processes where a flag holds)."""
    return dict(count=dist.num_processes, broadcast=lambda value: _from_rank_0(value, dist),
                where=lambda flag: _ranks_where(flag, dist.device))


def _check_shared_directory(path: str, dist) -> None:
    """ValueError in every process unless all of them see the output directory `path` as process 0
    does (`jaxllm.stopping.check_shared_directory`, as in JAX): on per-host disks each process
    found only its own checkpoints (process 0's weights, the others' data positions). Collective."""
    if _several(dist):
        check_shared_directory(path, "--ckpt-dir", index=dist.process_index, **_collectives(dist))


def _check_same_checkpoint(last: tuple[str, int] | None, path: str, dist) -> None:
    """ValueError in every process unless all of them chose to resume the checkpoint that process 0
    chose (`last`, `latest_checkpoint`) from the output directory `path`
    (`jaxllm.stopping.check_same_checkpoints`, as in JAX). Collective."""
    if _several(dist):
        check_same_checkpoints(os.path.basename(last[0]) if last else "no checkpoint to resume", path,
                               **_collectives(dist))


def _check_same_settings(rc: RunConfig, dist) -> None:
    """Every process raises unless all were given process 0's settings (`setting_digests`)."""
    if not _several(dist):
        return
    names, mine = setting_digests(rc)
    first = torch.tensor(mine, dtype=torch.int64, device=dist.device)
    torch.distributed.broadcast(first, src=0)
    _raise_if_any_failed(differing_settings(names, mine, first.tolist()), "comparing the processes' settings", dist)


def _check_not_jax_run(out_dir: str) -> None:
    if is_checkpoint_dir(out_dir):
        raise ValueError(f"--ckpt-dir {out_dir} holds a JAX (Orbax) checkpoint; use another directory "
                         "(convert/flax_to_torch.py turns it into a Hugging Face directory for --init-from)")


def _take_lock(lock: RunLock, out_dir: str, dist, error: Exception | None = None) -> None:
    """Process 0 locks the output directory for the run (and checks that it can write there).
    Every process raises when that failed, or when any process brings an `error` (making the
    directory): each process calls this once, and they agree before going on."""
    if error is None and dist.process_index == 0:
        error = lock.take(out_dir)
    _raise_if_any_failed(error, f"locking or making --ckpt-dir {out_dir}", dist)


def _run(rc: RunConfig, lock: RunLock, dtype: str) -> dict[str, Any]:
    from accelerate import PartialState
    from transformers import set_seed

    from jaxllm import data as data_lib
    from jaxllm.metrics import end_line, plot_loss_curve, truncate_metrics

    t_start = time.perf_counter()
    if not rc.progress:  # --no-progress: none of transformers' bars either (loading and saving weights)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    dtype = resolve_dtype(dtype)
    # The precision the run trains in, as checkpoints record it and a resume compares it: "auto" is
    # bfloat16 on one machine and float32 on another (a resume there changed it unnoticed, and
    # --dtype float32 after "auto" on a CPU was named a change that was none).
    trained = dataclasses.replace(rc, dtype=dtype)
    dist = PartialState(cpu=cpu_only())  # reads the torchrun / accelerate launch environment, as the Trainer will
    rank, world = dist.process_index, dist.num_processes
    _check_same_settings(rc, dist)  # (first: a setting one process refuses alone would leave the others waiting)
    agree = functools.partial(_raise_if_any_failed, dist=dist)  # (for `failing_together`)
    with failing_together("reading the model's settings", agree):  # (--config: a file on each host)
        config = model_config(rc)
        check_run(rc, config.max_position_embeddings)
        out_dir = os.path.abspath(rc.ckpt_dir)
        _check_not_jax_run(out_dir)
    _check_shared_directory(out_dir, dist)  # (several processes: they save and resume together)
    fresh = _as_rank_0_sees(not os.path.isdir(out_dir), dist)  # (locked when made, below)
    if not fresh:  # before anything in it is read as this run's, moved or truncated
        _take_lock(lock, out_dir, dist)
    if rc.batch_size % world:
        raise ValueError(f"--batch-size {rc.batch_size} (global) cannot be split over {world} processes")
    per_device = rc.batch_size // world

    # Each process reads the checkpoint, --init-from, the tokenizer and its share of the data on its
    # own host, and opens the data before anything is written (a dataset that cannot be read fails first).
    skipped: list[str] = []  # warnings about checkpoints passed over, said once the checks below pass
    with failing_together("choosing the checkpoint to resume", agree):
        last = latest_checkpoint(out_dir, warn=rank == 0, notes=skipped) if os.path.isdir(out_dir) else None
    _check_same_checkpoint(last, out_dir, dist)  # (several processes: they resume the same step together)
    with failing_together("checking the checkpoint, tokenizer and data", agree):
        if not last and os.path.isdir(out_dir):
            check_no_earlier_run(out_dir)
        if last and rc.no_resume:
            raise ValueError(f"--no-resume: {out_dir} already holds checkpoints (latest {last[0]}); "
                             "use an empty --ckpt-dir or drop --no-resume")
        if last:
            _check_saved_config(last[0], config, "--ckpt-dir checkpoint", rc)
        elif rc.init_from:
            _check_init_from(rc.init_from, config)

        # Without --tokenizer, a resumed run keeps the tokenizer of its checkpoint (which the Trainer
        # saves there) and a run from --init-from takes the directory's own.
        if last:
            origin, inherited = last[0], (_recorded_tokenizer(last[0]), data_lib.tokenizer_dir(last[0]))
        else:
            origin = os.path.abspath(rc.init_from) if rc.init_from else None  # (as train_jax.py names it)
            inherited = (data_lib.tokenizer_dir(rc.init_from), None) if rc.init_from else (None, None)
        notes: list[str] = []  # printed once the start-up checks have passed
        tokenizer, tokenizer_spec = data_lib.run_tokenizer(rc, config, inherited, origin=origin, quiet=rank != 0,
                                                           notes=notes)
        check_prompts(rc, tokenizer, config.max_position_embeddings)
        data_cfg, source = data_lib.run_stream(rc, config, tokenizer_spec)
        data_state = read_data_state(last[0], rank, world, source) if last else None
        dataset = StreamDataset(data_cfg, tokenizer, rows=per_device, process_index=rank, process_count=world,
                                state=data_state, micro_batches_per_step=rc.grad_accum)
    for warning in skipped:
        print(warning, file=sys.stderr, flush=True)
    start = last[1] if last else 0
    if fresh:
        try:
            try:
                os.makedirs(out_dir, exist_ok=True)
                made = None
            except OSError as e:
                made = e
            _take_lock(lock, out_dir, dist, made)
            if latest_checkpoint(out_dir, warn=False):  # another run saved there since this one looked
                raise ValueError(f"--ckpt-dir {out_dir}: another run saved checkpoints there while this one "
                                 "started; run the command again to resume")
            _check_not_jax_run(out_dir)  # (or a JAX run did: its metrics.jsonl is not this run's)
            check_no_earlier_run(out_dir)
        except BaseException:
            dataset.close()
            raise
    for note in notes:
        print(note, file=sys.stderr, flush=True)
    if rank == 0:  # records after the checkpoint resumed from (a crash) go, as does a cut line
        truncate_metrics(os.path.join(out_dir, "metrics.jsonl"), start)

    set_seed(rc.seed)  # the initial weights; the Trainer seeds again for dropout
    if rc.init_from and not last:
        model = CustomLLM.from_pretrained(rc.init_from, dtype=torch.float32)
        _log(f"starting from the weights in {rc.init_from}"
             + (" with its tokenizer" if rc.tokenizer is None and any(inherited) else ""), rank)
    else:
        model = CustomLLM(CustomLLMConfig.from_llm_config(config))
    if not rc.dropout:
        model.dropout.p = 0.0  # a runtime switch: the saved config keeps its embedding_dropout

    args = training_arguments(rc, out_dir, per_device_batch=per_device, dtype=dtype)
    tokens_per_step = rc.batch_size * rc.grad_accum * rc.seq_len
    metrics = MetricsCallback(out_dir, tokens_per_step, enabled=rank == 0, start_step=start,
                              flops_per_step=training_flops_per_token(config, rc.seq_len) * tokens_per_step,
                              peak_flops=_peak_flops(dtype, world * max(args.n_gpu, 1)))
    generation = TextGenerationCallback(tokenizer, rc.prompts, rc.max_new_tokens, seed=rc.seed)
    stop = StopOnSignalCallback()
    trainer = CustomLLMTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
        callbacks=[metrics, MPSCallback(), stop, generation],
        data_state=DataStateSaver(dataset, source, recorded_settings(trained)))
    n_params = sum(p.numel() for p in model.parameters())
    _log(f"model: {n_params / 1e6:.2f}M parameters ({model_name(rc, bool(last))}) on {args.device.type}, {dtype}, "
         f"{world} process(es)", rank)
    _log(f"steps {start} -> {rc.steps}: {rc.grad_accum} x {rc.batch_size} x {rc.seq_len} = {tokens_per_step} "
         f"tokens per step, checkpoints in {out_dir}" + (f" (resuming from {last[0]})" if last else "")
         + (f"; --init-from {rc.init_from} only starts a new run: not used" if last and rc.init_from else ""), rank)
    recorded = read_settings(last[0]) if last else None
    if recorded and recorded.get("dtype") == "auto":  # (saved before the precision was recorded: unknown)
        del recorded["dtype"]
    if note := changed_settings(recorded, trained):
        _log(note, rank)
    if start < rc.steps and (warning := warmup_warning(rc)):
        _log(warning, rank)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if not rc.progress:  # --no-progress: the checkpoints' "Writing model shards" bars too
        hf_logging.disable_progress_bar()
    try:
        if start < rc.steps:
            if last:  # (every process chose this `last`: `_check_same_checkpoint`)
                dist.wait_for_everyone()
                if rank == 0:
                    for path in set_aside_damaged(out_dir, start):
                        _log(f"kept the checkpoint that cannot be loaded as {path}", rank)
                dist.wait_for_everyone()
            try:
                trainer.train(resume_from_checkpoint=last[0] if last else None)
            except DataStreamError as e:
                raise DataStreamError(f"{e}{_keep_progress(trainer, start, world)}") from e
            except NonFiniteError as e:
                try:
                    saved = latest_checkpoint(out_dir, warn=False)
                except ValueError:
                    saved = None
                raise NonFiniteError(
                    f"{e}" + (f" and nothing was saved after {saved[0]}" if saved else " and no checkpoint was saved")
                    + ". Lower --lr (a resumed run takes it)") from None
        else:  # the Trainer would run one more step; there is nothing left to do but the samples
            _log(f"{last[0]} is at step {start} >= --steps {rc.steps}: nothing to train", rank)
            if rank == 0 and rc.prompts and rc.max_new_tokens > 0:
                done = CustomLLM.from_pretrained(last[0], dtype=torch.float32).to(args.device)
                generation.samples = generate_samples(done, tokenizer, rc.prompts, rc.max_new_tokens, seed=rc.seed)
                print_samples(generation.samples)
    finally:
        stop.restore()
        dataset.close()
        if bars:
            hf_logging.enable_progress_bar()
    if stop.stopped_by:
        _log(f"\n{stop.stopped_by}: saved a checkpoint at step {trainer.state.global_step} in {out_dir}; run the "
             "same command again to resume", rank)
    summary: dict[str, Any] = {
        "start_step": start, "end_step": max(trainer.state.global_step, start), "ckpt_dir": out_dir,
        "first_loss": metrics.records[0]["loss"] if metrics.records else None,
        "last_loss": metrics.records[-1]["loss"] if metrics.records else None,
        "records": metrics.records, "samples": generation.samples, "dtype": dtype,
        "device": args.device.type, "wall_s": time.perf_counter() - t_start, "stopped_by": stop.stopped_by,
    }
    if rank == 0 and metrics.writer is not None:
        summary["loss_png"] = plot_loss_curve(metrics.writer.path, os.path.join(out_dir, "loss.png"))
        records = metrics.records
        _log(end_line(bool(stop.stopped_by), summary["end_step"], records[0] if records else None,
                      records[-1] if records else None, summary["wall_s"]) + f"; metrics in {metrics.writer.path}"
             + (f", curve in {summary['loss_png']}" if summary.get("loss_png") else ""), rank)
    summary["model"] = model
    summary["tokenizer"] = tokenizer
    return summary
