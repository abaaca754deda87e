"""The training run behind `scripts/train_jax.py`: data, model, sharded step, checkpoints, metrics.

Its settings (`RunConfig`) and named bundles of them (`RECIPES`) live in `jaxllm/recipes.py`
(pure Python, shared with the PyTorch side) and are re-exported here.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import checkpoint as ckpt_lib
from jaxllm import sharding as shd
from jaxllm.config import LLMConfig
from jaxllm.flops import device_peak_flops, training_flops_per_token
from jaxllm.metrics import MetricsWriter, plot_loss_curve
from jaxllm.recipes import RECIPES, RunConfig  # noqa: F401 (the settings live in one pure-Python place)
from jaxllm.train import OptimConfig, Trainer


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class NonFiniteError(RuntimeError):
    pass


class _Stop:
    """SIGTERM / first Ctrl-C ask the loop to save and stop; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested: str | None = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def model_config(rc: RunConfig) -> LLMConfig:
    if rc.config:
        return LLMConfig.from_json_file(rc.config)
    return LLMConfig.from_preset(rc.preset)


def log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def run(rc: RunConfig) -> dict:
    """Train as `rc` says; returns a summary dict. Raises ValueError for bad input."""
    from jaxllm import data as data_lib

    if rc.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {rc.dtype!r}")
    for name in ("steps", "batch_size", "seq_len", "log_every", "save_every", "grad_accum", "keep"):
        if getattr(rc, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(rc, name)}")
    config = model_config(rc)
    if rc.seq_len > config.max_position_embeddings:
        raise ValueError(f"--seq-len {rc.seq_len} exceeds the model's max_position_embeddings "
                         f"({config.max_position_embeddings})")
    ckpt_dir = os.path.abspath(rc.ckpt_dir)
    if os.path.exists(ckpt_dir) and not os.path.isdir(ckpt_dir):
        raise ValueError(f"--ckpt-dir {rc.ckpt_dir} exists and is not a directory")
    mesh = shd.make_mesh(rc.mesh)
    shd.check_batch(rc.batch_size, mesh)

    tokenizer = data_lib.load_tokenizer(rc.tokenizer)
    data_lib.check_vocab(tokenizer, config)
    optim = OptimConfig(lr=rc.lr, warmup_steps=rc.warmup_steps, total_steps=rc.steps,
                        weight_decay=rc.weight_decay, clip_norm=rc.clip_norm)
    trainer = Trainer(config, optim, mesh, batch_size=rc.batch_size, grad_accum=rc.grad_accum, seq_len=rc.seq_len,
                      seed=rc.seed, dropout=rc.dropout, dtype=DTYPES[rc.dtype], moe_impl=rc.moe_impl,
                      remat=rc.remat)

    # ---- state: resume, start from converted weights, or initialise -------------------------
    mngr = ckpt_lib.manager(ckpt_dir, max_to_keep=rc.keep)
    existing = mngr.all_steps()
    data_state = None
    if existing and rc.no_resume:
        raise ValueError(f"--no-resume: {ckpt_dir} already holds checkpoints (steps {sorted(existing)}); "
                         "use an empty --ckpt-dir or drop --no-resume")
    if existing:
        state, data_state = restore_train_state(mngr, trainer, config)
        log(f"resuming from {ckpt_dir} at step {int(state['step'])}")
    elif rc.init_from:
        state = trainer.init_state(load_weights(rc.init_from, trainer, config))
        log(f"starting from the weights in {rc.init_from}")
    else:
        state = trainer.init_state()
    start = int(state["step"])

    data = data_lib.PackedBatches(
        data_lib.DataConfig(dataset=rc.dataset, dataset_config=rc.dataset_config, split=rc.split,
                            text_column=rc.text_column, seq_len=rc.seq_len, seed=rc.seed),
        tokenizer, rows=trainer.rows_per_process(), process_index=jax.process_index(),
        process_count=jax.process_count(), state=data_state)
    tok_source = data_lib.tokenizer_source(rc.tokenizer)

    def save(step: int, st) -> None:
        ckpt_lib.save(mngr, step, weights={"params": st["params"], "router_bias": st["router_bias"]},
                      train_state={"opt_state": st["opt_state"], "step": st["step"], "rng": st["rng"]},
                      config=config, data=data.state_dict(), tokenizer=tok_source, force=True)

    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
    tokens_per_step = rc.batch_size * rc.grad_accum * rc.seq_len
    flops_per_step = training_flops_per_token(config, rc.seq_len) * tokens_per_step
    peak = rc.peak_flops or device_peak_flops(jax.devices()[0], rc.dtype)
    peak_total = peak * jax.device_count() if peak else None
    log(f"model: {n_params / 1e6:.2f}M parameters ({rc.config or rc.preset}), mesh {dict(mesh.shape)} over "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s), {jax.process_count()} process(es)")
    log(f"steps {start} -> {rc.steps}: {rc.grad_accum} x {rc.batch_size} x {rc.seq_len} = "
        f"{tokens_per_step} tokens per step, checkpoints in {ckpt_dir}")

    writer = MetricsWriter(ckpt_dir, enabled=jax.process_index() == 0)
    summary: dict[str, Any] = {"start_step": start, "skipped_nonfinite": 0}
    bar = None
    if rc.progress and jax.process_index() == 0:
        from tqdm import tqdm

        bar = tqdm(total=rc.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    step_fn = trainer.step_fn
    t_compile = None
    last_saved = start if existing else None
    window_t, window_steps = time.perf_counter(), 0
    first_loss = last_loss = None
    try:
        with _Stop() as stop:
            step = start
            while step < rc.steps:
                batch = trainer.put_batch(next(data))
                if t_compile is None:
                    t0 = time.perf_counter()
                    step_fn = trainer.step_fn.lower(state, batch).compile()
                    t_compile = time.perf_counter() - t0
                    summary["compile_s"] = t_compile
                    log(f"compiled the train step in {t_compile:.1f} s")
                    window_t = time.perf_counter()
                state, m = step_fn(state, batch)
                finite = bool(m["finite"])
                if not finite:
                    if not rc.skip_nonfinite:
                        raise NonFiniteError(
                            f"non-finite loss or gradient at step {step + 1} (loss {float(m['loss'])}, grad norm "
                            f"{float(m['grad_norm'])}); the update was not applied and nothing was saved after "
                            f"step {last_saved}. Lower --lr, or pass --skip-nonfinite to skip such steps")
                    summary["skipped_nonfinite"] += 1
                    log(f"step {step + 1}: non-finite loss or gradient, update skipped "
                        f"({summary['skipped_nonfinite']} so far)")
                    # The step counter did not advance: this batch is dropped, the next one is used.
                    continue
                step += 1
                window_steps += 1
                if step % rc.log_every == 0 or step == rc.steps or step == start + 1:
                    m = jax.device_get(m)
                    dt = time.perf_counter() - window_t
                    tps = window_steps * tokens_per_step / dt if dt > 0 else 0.0
                    rec = {
                        "step": step, "loss": float(m["loss"]), "lm_loss": float(m["lm_loss"]),
                        "aux_loss": float(m["aux_loss"]), "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
                        "tokens_per_sec": tps, "step_time_s": dt / max(window_steps, 1),
                        "mfu": (tps / tokens_per_step * flops_per_step / peak_total) if peak_total else None,
                        "expert_load_min": [float(x) for x in m["expert_load_min"]],
                        "expert_load_max": [float(x) for x in m["expert_load_max"]],
                        "skipped_nonfinite": summary["skipped_nonfinite"],
                    }
                    writer.write(rec)
                    first_loss = rec["loss"] if first_loss is None else first_loss
                    last_loss = rec["loss"]
                    if bar is not None:
                        bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.2e}", tok_s=f"{tps:,.0f}")
                    window_t, window_steps = time.perf_counter(), 0
                if bar is not None:
                    bar.update(1)
                if step % rc.save_every == 0 or step == rc.steps:
                    save(step, state)
                    last_saved = step
                if stop.requested:
                    if last_saved != step:
                        save(step, state)
                        last_saved = step
                    mngr.wait_until_finished()
                    log(f"\n{stop.requested}: saved a checkpoint at step {step} in {ckpt_dir}; "
                        "run the same command again to resume")
                    summary["stopped_by"] = stop.requested
                    break
    finally:
        if bar is not None:
            bar.close()
        mngr.wait_until_finished()
        data.close()
        writer.close()
    summary.update(end_step=int(jax.device_get(state["step"])), first_loss=first_loss, last_loss=last_loss,
                   ckpt_dir=ckpt_dir)
    if jax.process_index() == 0:
        png = plot_loss_curve(writer.path, os.path.join(ckpt_dir, "loss.png"))
        summary["loss_png"] = png
        log(f"done: step {summary['end_step']}, loss {first_loss} -> {last_loss}; metrics in {writer.path}"
            + (f", curve in {png}" if png else ""))
    summary["model"] = trainer.model(state)
    summary["tokenizer"] = tokenizer
    return summary


def restore_train_state(mngr, trainer: Trainer, config: LLMConfig):
    step = ckpt_lib.resolve_step(mngr, None)
    meta = ckpt_lib.read_meta(mngr, step)
    saved = LLMConfig.from_dict(meta["config"])
    if saved != config:
        diff = [k for k, v in saved.to_dict().items() if config.to_dict().get(k) != v]
        raise ValueError(f"{mngr.directory} holds a checkpoint of another model (differs in "
                         f"{', '.join(diff)}); use another --ckpt-dir or the same config")
    target = trainer.abstract_state()
    weights = ckpt_lib.restore_weights(mngr, step, {"params": target["params"], "router_bias": target["router_bias"]})
    import orbax.checkpoint as ocp

    ts_target = {"opt_state": target["opt_state"], "step": target["step"], "rng": target["rng"]}
    try:
        ts = mngr.restore(step, args=ocp.args.Composite(train_state=ocp.args.StandardRestore(ts_target)))["train_state"]
    except Exception as e:  # noqa: BLE001
        raise ckpt_lib.CheckpointError(
            f"checkpoint step {step} in {mngr.directory} has no usable optimizer state ({e}); "
            "start from its weights with --init-from into another --ckpt-dir") from e
    state = {"params": weights["params"], "router_bias": weights["router_bias"], **ts}
    return state, meta.get("data") or None


def load_weights(path: str, trainer: Trainer, config: LLMConfig) -> dict:
    path = os.path.abspath(path)
    mngr = ckpt_lib.manager(path, create=False) if os.path.isdir(path) else None
    if mngr is None:
        raise ValueError(f"--init-from {path}: not a checkpoint directory")
    step = ckpt_lib.resolve_step(mngr, None)
    saved = LLMConfig.from_dict(ckpt_lib.read_meta(mngr, step)["config"])
    if saved != config:
        diff = [k for k, v in saved.to_dict().items() if config.to_dict().get(k) != v]
        raise ValueError(f"--init-from {path}: a checkpoint of another model (differs in {', '.join(diff)})")
    target = trainer.abstract_state()
    return ckpt_lib.restore_weights(mngr, step, {"params": target["params"], "router_bias": target["router_bias"]})
