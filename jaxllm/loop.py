"""The training run behind `scripts/train_jax.py`: data, model, sharded step, checkpoints, metrics.

Its settings (`RunConfig`) and named bundles of them (`RECIPES`) live in `jaxllm/recipes.py`
(pure Python, shared with the PyTorch side) and are re-exported here.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import checkpoint as ckpt_lib
from jaxllm import hostmem
from jaxllm import sharding as shd
from jaxllm import xla_cache
from jaxllm.cli import listing, not_a_run_directory, step_dirs
from jaxllm.config import LLMConfig, count_params
from jaxllm.distributed import (all_reach, as_process_0_sees, check_same_checkpoints, check_same_settings,
                                check_shared_directory, processes_where, raise_if_any_failed)
from jaxllm.flops import device_peak_flops, training_flops_per_token
from jaxllm.metrics import MetricsWriter, end_line, plot_loss_curve, truncate_metrics
from jaxllm.recipes import RECIPES, RunConfig, another_model, changed_settings, check_prompts, check_run, continuation_text, encode_prompt, model_name, recorded_settings, resolve_remat, warmup_warning  # noqa: F401 (the settings live in one pure-Python place)
from jaxllm.stopping import NonFiniteError, RunLock, SaveError, SignalStop, failing_together, save_failed  # noqa: F401 (NonFiniteError: train_jax.py's)
from jaxllm.train import OptimConfig, Trainer


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


MAX_CONSECUTIVE_SKIPS = 10  # with --skip-nonfinite: give up after this many bad batches in a row


class _Stop(SignalStop):
    """SIGTERM / first Ctrl-C ask the loop to save and stop; a second Ctrl-C interrupts at once."""

    def agreed(self) -> str | None:  # (collective: every process calls it before each step)
        return super().agreed(processes_where(self.requested is not None))


def model_config(rc: RunConfig) -> LLMConfig:
    """The run's model: its --config, its --preset, or (neither given) its --init-from checkpoint's."""
    if rc.config:
        return LLMConfig.from_json_file(rc.config)
    if rc.preset is None:  # the model of the run's own newest readable checkpoint (a resume), else of --init-from's
        # Newest first, as the resume itself falls back (`restore_train_state`): a latest step whose
        # metadata is missing or damaged made this the default model, which the resume then refused
        # as "another model" than the step before it, the one it would have resumed.
        steps, i = sorted(step_dirs(rc.ckpt_dir), reverse=True), 0
        while as_process_0_sees(i < len(steps)):  # (collective: the processes try the same steps)
            saved = None
            try:
                saved = ckpt_lib.read_step_info(rc.ckpt_dir, steps[i])[1]["config"]
            except (ckpt_lib.CheckpointError, OSError, KeyError, IndexError):
                pass
            if not processes_where(saved is None):  # (collective: the processes fall back together)
                return LLMConfig.from_dict(saved)
            i += 1
        if rc.init_from is None:  # no step readable: the default model, which the resume then checks
            return LLMConfig.from_preset(RunConfig.preset)
        with failing_together("checking --init-from", raise_if_any_failed):  # (before Orbax's collective reads)
            init_from_dir(rc.init_from)
        return LLMConfig.from_dict(init_from_meta(rc.init_from)[0]["config"])
    return LLMConfig.from_preset(rc.preset)


def log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def run(rc: RunConfig) -> dict:
    """Train as `rc` says; returns a summary dict. Raises ValueError for bad input, and when
    another run is training in the same --ckpt-dir (`RunLock`)."""
    lock = RunLock()
    try:
        return _run(rc, lock)
    finally:
        lock.release()


def _take_lock(lock: RunLock, ckpt_dir: str) -> None:
    """Process 0 locks the checkpoint directory for the run (collective: every process raises
    when it cannot)."""
    raise_if_any_failed(lock.take(ckpt_dir) if jax.process_index() == 0 else None, "locking --ckpt-dir")


def _run(rc: RunConfig, lock: RunLock) -> dict:
    from jaxllm import data as data_lib

    t_start = time.perf_counter()
    check_same_settings(rc)  # (first: a setting one process refuses alone would leave the others waiting)
    with failing_together("reading the model's settings", raise_if_any_failed):  # (--config: a file on each host)
        if rc.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {rc.dtype!r}")
        if rc.config or rc.preset:
            config = model_config(rc)
            check_run(rc, config.max_position_embeddings)
        elif rc.init_from and not step_dirs(rc.ckpt_dir):  # the model of --init-from (read below)
            init_from_dir(rc.init_from)
    if not (rc.config or rc.preset):  # the model of a checkpoint: Orbax's reads are collective
        config = model_config(rc)
        with failing_together("checking the settings", raise_if_any_failed):  # (--ckpt-dir, on each host)
            check_run(rc, config.max_position_embeddings)
    ckpt_dir = os.path.abspath(rc.ckpt_dir)
    check_shared_directory(ckpt_dir)  # (several processes: they save and resume together)
    exists = as_process_0_sees(os.path.isdir(ckpt_dir))
    if exists:  # before anything reads it as this run's: a writer's manager clears the temporary
        _take_lock(lock, ckpt_dir)  # directory of a save in progress
    mesh = shd.make_mesh(rc.mesh)
    shd.check_mesh(mesh, hidden_size=config.hidden_size, num_routed_experts=config.num_routed_experts)
    shd.check_batch(rc.batch_size, mesh)

    optim = OptimConfig(lr=rc.lr, warmup_steps=rc.warmup_steps, total_steps=rc.steps,
                        weight_decay=rc.weight_decay, clip_norm=rc.clip_norm)
    used = settings_in_use(rc, mesh, config)
    trainer = Trainer(config, optim, mesh, batch_size=rc.batch_size, grad_accum=rc.grad_accum, seq_len=rc.seq_len,
                      seed=rc.seed, dropout=rc.dropout, dtype=DTYPES[rc.dtype], moe_impl=rc.moe_impl,
                      attn_impl=rc.attn_impl, scan_unroll=rc.scan_unroll, remat=used.remat)

    # ---- state: resume, start from converted weights, or initialise -------------------------
    # Nothing is written before the data source has been opened and checked.
    mngr = ckpt_lib.manager(ckpt_dir, max_to_keep=rc.keep, create=False) if exists else None
    existing = mngr.all_steps() if mngr is not None else []
    check_same_checkpoints(existing, ckpt_dir)  # (several processes: they resume the same step together)
    data_state = None
    if existing and rc.no_resume:
        raise ValueError(f"--no-resume: {ckpt_dir} already holds checkpoints (steps {sorted(existing)}); "
                         "use an empty --ckpt-dir or drop --no-resume")
    if not existing and exists:
        check_no_earlier_run(ckpt_dir)
    # Without --tokenizer, a resumed run keeps its checkpoint's tokenizer and a run from --init-from
    # takes the starting checkpoint's (`data.run_tokenizer`).
    inherited, origin = (None, None), None
    skipped: list[tuple[int, str]] = []  # unreadable newer steps: said and set aside once the checks pass
    if existing:
        state, saved_data, inherited = restore_train_state(mngr, trainer, config, skipped=skipped, rc=rc)
        origin = ckpt_dir
    elif rc.init_from:
        with failing_together("checking --init-from", raise_if_any_failed):  # (Orbax's reads are collective)
            init_from_dir(rc.init_from)
        inherited, origin = init_tokenizer(rc.init_from, config), os.path.abspath(rc.init_from)
    with failing_together("checking the tokenizer and the dataset", raise_if_any_failed):  # (each host's files)
        notes: list[str] = []  # printed once the start-up checks have passed
        tokenizer, tokenizer_spec = data_lib.run_tokenizer(rc, config, inherited, origin=origin,
                                                           quiet=jax.process_index() != 0, notes=notes)
        check_prompts(rc, tokenizer, config.max_position_embeddings)
        data_cfg, source = data_lib.run_stream(rc, config, tokenizer_spec)
        if existing:
            data_lib.check_same_stream((saved_data or {}).get("source"), source, ckpt_dir,
                                       quiet=jax.process_index() != 0)
    if existing:
        data_state = select_data_state(saved_data)
    elif rc.init_from:
        state = trainer.init_state(load_weights(rc.init_from, trainer, config))
    else:
        state = trainer.init_state()
    start = int(state["step"])

    with failing_together("opening the data", raise_if_any_failed):  # (each process opens its own share)
        data = data_lib.PackedBatches(data_cfg, tokenizer, rows=trainer.rows_per_process(),
                                      process_index=jax.process_index(), process_count=jax.process_count(),
                                      state=data_state)
    try:
        if mngr is None:
            os.makedirs(ckpt_dir, exist_ok=True)
            _take_lock(lock, ckpt_dir)
            mngr = ckpt_lib.manager(ckpt_dir, max_to_keep=rc.keep)
            if mngr.all_steps():  # another run saved there since this one looked
                raise ValueError(f"--ckpt-dir {ckpt_dir}: another run saved checkpoints there (steps "
                                 f"{sorted(mngr.all_steps())}) while this one started; run the command again "
                                 "to resume")
            check_no_earlier_run(ckpt_dir)  # (or a PyTorch run did: its metrics.jsonl is not this run's)
        else:
            _set_aside(mngr, [step for step, _ in skipped])
    except BaseException:
        data.close()
        raise
    # What the start did, said once every check has passed (the data opened included)
    if existing:
        if jax.process_index() == 0:
            for _, warning in skipped:
                print(warning, file=sys.stderr, flush=True)
        log(f"resuming from {ckpt_dir} at step {start}"
            + (f" (--init-from {rc.init_from} only starts a new run: not used)" if rc.init_from else ""))
        if note := changed_settings(known_settings((saved_data or {}).get("settings")), used):
            log(note)
    elif rc.init_from:
        log(f"starting from the weights in {rc.init_from}"
            + (" with its tokenizer" if rc.tokenizer is None and any(inherited) else ""))
    for note in notes:
        print(note, file=sys.stderr, flush=True)

    saved_tokenizer = data_lib.tokenizer_files(tokenizer)  # each step carries its tokenizer's files

    def save(step: int, st) -> None:
        try:
            with peer_failures_as_runtime_errors(f"saving step {step}", jax.process_count()):
                ckpt_lib.save(mngr, step, weights={"params": st["params"], "router_bias": st["router_bias"]},
                              train_state={"opt_state": st["opt_state"], "step": st["step"], "rng": st["rng"]},
                              config=config, data={**gather_data_states(data.state_dict()), "source": source,
                                                   "skipped_nonfinite": summary["skipped_nonfinite"],
                                                   "consecutive_nonfinite": consecutive_skips,
                                                   "settings": recorded_settings(used)},
                              tokenizer=source["tokenizer"], tokenizer_files=saved_tokenizer,
                              force=True)
        except (ValueError, OSError) as e:  # no space left, a read-only directory, ...: not bad input
            last = f"step {last_saved}" if last_saved is not None else None
            raise SaveError(save_failed(f"step {step}", ckpt_dir, last, ckpt_lib.one_line(e))) from e

    def keep_progress(step: int) -> str:
        """After a data error mid-run: save the steps taken since the last checkpoint (one process:
        with several, the others are inside the next step's collectives and cannot join a save), and
        say so. The saved position is that of the last batch used, so a resume meets the same
        error until the data is mended."""
        if step == start or last_saved == step:
            return f" (at step {step}; " + ("nothing new to save)" if step == start else "saved at that step)")
        if jax.process_count() > 1:
            return f" (at step {step}; the steps after {last_saved if last_saved is not None else start} are lost)"
        try:
            save(step, state)
            mngr.wait_until_finished()
        except SaveError as e:  # the data error stays the one named
            return f" (at step {step}; saving it failed: {e})"
        return f" (saved a checkpoint at step {step} in {ckpt_dir} first)"

    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
    tokens_per_step = rc.batch_size * rc.grad_accum * rc.seq_len
    flops_per_step = training_flops_per_token(config, rc.seq_len) * tokens_per_step
    peak = rc.peak_flops or device_peak_flops(jax.devices()[0], rc.dtype)
    peak_total = peak * jax.device_count() if peak else None
    log(f"model: {n_params / 1e6:.2f}M parameters ({model_name(rc, bool(existing))}), mesh {dict(mesh.shape)} over "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s), {jax.process_count()} process(es)"
        + (f"; {hostmem.describe()}" if jax.devices()[0].platform == "cpu" else ""))
    log(f"steps {start} -> {rc.steps}: {rc.grad_accum} x {rc.batch_size} x {rc.seq_len} = "
        f"{tokens_per_step} tokens per step, {rc.dtype}, remat {trainer.model_kw['remat']}, "
        f"checkpoints in {ckpt_dir}")
    if start >= rc.steps:
        log(f"the checkpoint is at step {start} >= --steps {rc.steps}: nothing to train (raise --steps to go on)")
    elif warning := warmup_warning(rc):
        log(warning)

    if jax.process_index() == 0:  # records after the checkpoint resumed from (a crash) go, as does a cut line
        truncate_metrics(os.path.join(ckpt_dir, "metrics.jsonl"), start)
    writer = MetricsWriter(ckpt_dir, enabled=jax.process_index() == 0, start_step=start)
    # Steps skipped as non-finite (--skip-nonfinite) over the whole training, resumes included.
    summary: dict[str, Any] = {"start_step": start,
                               "skipped_nonfinite": int((saved_data or {}).get("skipped_nonfinite", 0)) if existing
                               else 0}
    # A progress bar (made after the compile: its rate and ETA are the steps') on a terminal; else
    # (--no-progress, output to a file) a log line per logged step.
    bar, show_bar = None, rc.progress and jax.process_index() == 0 and sys.stderr.isatty()
    step_fn = trainer.step_fn
    t_compile = None
    last_saved = start if existing else None
    # The logging window: its start, its steps, and the seconds spent saving checkpoints in it,
    # which its tokens/s, step time and MFU leave out (a save counted there showed a falsely low
    # throughput); `save_s` reports them.
    window_t, window_steps, window_save_s = time.perf_counter(), 0, 0.0
    first = last = None  # this run's first and last logged records
    # Non-finite steps skipped in a row (--skip-nonfinite): the checkpoint carries the streak, so
    # that a resume does not restart it at 0 (0 for a checkpoint saved before it was recorded).
    consecutive_skips = int((saved_data or {}).get("consecutive_nonfinite", 0)) if existing else 0
    try:
        with _Stop() as stop:
            step = start
            while step < rc.steps:
                stopped_by = stop.agreed()  # before each step, also after a skipped one
                if stopped_by:
                    if last_saved != step and step > start:  # no step taken yet: nothing new to save
                        save(step, state)
                        last_saved = step
                    mngr.wait_until_finished()
                    log(f"\n{stopped_by}: " + (f"saved a checkpoint at step {step} in {ckpt_dir}; run the same "
                                              "command again to resume" if last_saved == step else
                                              "stopped before the first step; nothing to save"))
                    summary["stopped_by"] = stopped_by
                    break
                try:
                    batch = trainer.put_batch(next(data))
                except (ValueError, OSError) as e:  # the data stream failed mid-run (a corrupt record, ...)
                    why = " ".join(str(e).split()) or type(e).__name__
                    raise (OSError if isinstance(e, OSError) else ValueError)(why + keep_progress(step)) from e
                if t_compile is None:
                    log("compiling the train step (or loading it from the compilation cache) ...")
                    t0, hits = time.perf_counter(), xla_cache.hits()
                    step_fn = trainer.step_fn.lower(state, batch).compile()
                    t_compile = time.perf_counter() - t0
                    summary["compile_s"] = t_compile
                    log(f"loaded the train step from the compilation cache in {t_compile:.1f} s"
                        if xla_cache.hits() > hits else f"compiled the train step in {t_compile:.1f} s")
                    if show_bar:
                        from tqdm import tqdm

                        bar = tqdm(total=rc.steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
                    window_t = time.perf_counter()
                state, m = step_fn(state, batch)
                finite = bool(m["finite"])
                if not finite:
                    if not rc.skip_nonfinite:
                        raise NonFiniteError(
                            f"non-finite loss or gradient at step {step + 1} (loss {float(m['loss'])}, grad norm "
                            f"{float(m['grad_norm'])}); the update was not applied"
                            + (f" and nothing was saved after step {last_saved}" if last_saved is not None
                               else " and no checkpoint was saved") + ". Lower --lr, or pass --skip-nonfinite "
                            "to skip such steps")
                    summary["skipped_nonfinite"] += 1
                    consecutive_skips += 1
                    log(f"step {step + 1}: non-finite loss or gradient, update skipped "
                        f"({summary['skipped_nonfinite']} so far)")
                    if consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
                        raise NonFiniteError(
                            f"{consecutive_skips} batches in a row gave a non-finite loss or gradient at step "
                            f"{step + 1}; the weights are not recovering. Lower --lr or resume from an earlier "
                            "checkpoint")
                    # The step counter did not advance: this batch is dropped, the next one is used.
                    continue
                step += 1
                consecutive_skips = 0
                window_steps += 1
                if step % rc.log_every == 0 or step == rc.steps or step == start + 1:
                    m = jax.device_get(m)
                    dt = time.perf_counter() - window_t - window_save_s  # the steps' time, saves left out
                    tps = window_steps * tokens_per_step / dt if dt > 0 else 0.0
                    rec = {
                        "step": step, "loss": float(m["loss"]), "lm_loss": float(m["lm_loss"]),
                        "aux_loss": float(m["aux_loss"]), "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
                        "tokens_per_sec": tps, "step_time_s": dt / max(window_steps, 1), "save_s": window_save_s,
                        "mfu": (tps / tokens_per_step * flops_per_step / peak_total) if peak_total else None,
                        "expert_load_min": [float(x) for x in m["expert_load_min"]],
                        "expert_load_max": [float(x) for x in m["expert_load_max"]],
                        "skipped_nonfinite": summary["skipped_nonfinite"],
                    }
                    writer.write(rec)
                    first, last = first or rec, rec
                    if bar is not None:
                        bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.2e}", tok_s=f"{tps:,.0f}")
                    else:
                        log(f"step {step}/{rc.steps}: loss {rec['loss']:.4f}, lr {rec['lr']:.2e}, "
                            f"grad norm {rec['grad_norm']:.3f}, {tps:,.0f} tokens/s")
                    window_t, window_steps, window_save_s = time.perf_counter(), 0, 0.0
                if bar is not None:
                    bar.update(1)
                if step % rc.save_every == 0 or step == rc.steps:
                    jax.block_until_ready(state)  # (the step's own computation is the step's time)
                    t_save = time.perf_counter()
                    save(step, state)
                    window_save_s += time.perf_counter() - t_save
                    last_saved = step
    finally:
        if bar is not None:
            bar.close()
        with peer_failures_as_runtime_errors("finishing the last save", jax.process_count()):
            mngr.wait_until_finished()
        mngr.close()
        data.close()
        writer.close()
    summary.update(end_step=int(jax.device_get(state["step"])), first_loss=first and first["loss"],
                   last_loss=last and last["loss"], ckpt_dir=ckpt_dir, wall_s=time.perf_counter() - t_start)
    if jax.process_index() == 0:
        png = plot_loss_curve(writer.path, os.path.join(ckpt_dir, "loss.png"))
        summary["loss_png"] = png
        log(end_line(bool(summary.get("stopped_by")), summary["end_step"], first, last, summary["wall_s"])
            + f"; metrics in {writer.path}" + (f", curve in {png}" if png else ""))
    summary["model"] = trainer.model(state)
    summary["tokenizer"] = tokenizer
    return summary


def settings_in_use(rc: RunConfig, mesh, config: LLMConfig) -> RunConfig:
    """`rc` with the settings whose flag may be left to a default as this run resolves them: the
    mesh (its sizes, as `--mesh` would give them), `--remat` and `--scan-unroll`. A checkpoint
    records these and a resume's note compares them, not the flags as typed: "fsdp=4,data=2" is
    "data=2,fsdp=4", and `--remat none` where the default is none changes nothing, while the default
    mesh on 8 devices after one is a change."""
    import dataclasses

    from jaxllm.model import UNROLL_MAX_LAYERS

    sizes = [f"{axis}={mesh.shape[axis]}" for axis in shd.MESH_AXES if mesh.shape[axis] > 1]
    layers = config.num_hidden_layers
    unroll = rc.scan_unroll if rc.scan_unroll is not None else (layers if layers <= UNROLL_MAX_LAYERS else 1)
    return dataclasses.replace(rc, mesh=",".join(sizes) or "data=1", scan_unroll=min(unroll, layers),
                               remat=resolve_remat(rc.remat, count_params(config), rc.grad_accum))


def known_settings(recorded: dict | None) -> dict | None:
    """The settings a checkpoint recorded, less those left to a default (None) by a checkpoint saved
    before `settings_in_use` was recorded: what they resolved to is not known."""
    if recorded is None:
        return None
    return {name: value for name, value in recorded.items()
            if value is not None or name not in ("mesh", "remat", "scan_unroll")}


TRAINER_CHECKPOINT = re.compile(r"^checkpoint-\d+$")  # a Hugging Face Trainer's (scripts/train_torch.py)


@contextlib.contextmanager
def peer_failures_as_runtime_errors(what: str, process_count: int) -> Iterator[None]:
    """Around a checkpoint save of a run of several processes: Orbax's barriers
    (`jax.experimental.multihost_utils`) raise a collective that failed because another process
    died (gloo: "Connection closed by peer") as a ValueError, which train_jax.py took for bad input
    (exit status 2, and a wait for the dead process to leave with it); as a RuntimeError it ends as a
    lost peer does between saves ("did another process die?", exit status 1). One process: as
    raised."""
    try:
        yield
    except ValueError as e:
        if process_count == 1:
            raise
        raise RuntimeError(f"{what}: {e}") from e


def check_no_earlier_run(ckpt_dir: str) -> None:
    """ValueError naming what is there when `ckpt_dir`, which holds no Orbax step, holds an earlier
    run all the same: a PyTorch (Hugging Face Trainer) run, steps set aside as unreadable, or a
    finished run's loss curve; or when it is one checkpoint of a run, or a model directory
    (`cli.not_a_run_directory`). A new run would truncate its metrics.jsonl and replace its loss.png.
    What a run that stopped before its first checkpoint leaves (metrics.jsonl, tensorboard/, an
    interrupted save's temporary directory) is no earlier run: that run starts again."""
    names = sorted(os.listdir(ckpt_dir))
    problem = not_a_run_directory(ckpt_dir, "jax")
    if problem:
        raise ValueError(problem)
    trainer = [n for n in names if TRAINER_CHECKPOINT.match(n) and os.path.isdir(os.path.join(ckpt_dir, n))]
    if trainer:
        raise ValueError(f"--ckpt-dir {ckpt_dir} holds a PyTorch run (Hugging Face Trainer checkpoints: "
                         f"{listing(trainer)}), no JAX checkpoint: use another --ckpt-dir (convert/torch_to_flax.py "
                         "turns a Trainer checkpoint into one for --init-from)")
    if any(".unreadable-" in n for n in names) or "loss.png" in names:
        raise ValueError(f"--ckpt-dir {ckpt_dir} holds an earlier run ({listing(names)}) but no readable checkpoint: "
                         "use another --ckpt-dir, or move those files away to start over in it")


def gather_data_states(state: dict) -> dict:
    """Every process's data position (each reads its own share), gathered so that the checkpoint's
    metadata, written by process 0, holds all of them."""
    if jax.process_count() == 1:
        return {"process_count": 1, "states": [state]}
    import json

    from jax.experimental import multihost_utils

    blob = np.frombuffer(json.dumps(state).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([blob.size], np.int64))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: blob.size] = blob
    blobs = np.asarray(multihost_utils.process_allgather(padded))
    return {"process_count": jax.process_count(),
            "states": [json.loads(bytes(blobs[i, : sizes[i]]).decode()) for i in range(len(sizes))]}


def select_data_state(saved: dict | None) -> dict | None:
    """This process's data position, or None (start of the stream, with a warning) when the
    checkpoint was written by a different number of processes."""
    if not saved or "states" not in saved:
        return None
    if saved["process_count"] != jax.process_count():
        if jax.process_index() == 0:
            print(f"warning: the data position was saved by {saved['process_count']} process(es) and this run has "
                  f"{jax.process_count()}; the data stream restarts from its beginning", file=sys.stderr, flush=True)
        return None
    return saved["states"][jax.process_index()]


def restore_train_state(mngr, trainer: Trainer, config: LLMConfig, *, skipped: list | None = None,
                        rc: RunConfig | None = None):
    """The newest readable checkpoint's train state, data position and tokenizer (what it names, as
    the run recorded it, and the files it saved). A checkpoint that cannot be read (a corrupt file)
    is skipped and the one before it is used; a checkpoint of another model is an error. The
    (step, warning) of each step skipped is appended to `skipped`, for the caller to print and set
    aside (`_set_aside`) once the run's start-up checks have passed (a run refused for bad input
    changes nothing). The error for another model names the model saved, and with the run's `rc`
    the flag that asked for the model."""
    steps = sorted(mngr.all_steps(), reverse=True)
    if not steps:
        raise ckpt_lib.CheckpointError(f"no checkpoint found in {mngr.directory}")
    def holds(item: str) -> bool:
        return any(os.path.isdir(os.path.join(str(mngr.directory), str(s), item)) for s in steps)

    if not holds("train_state") and holds("params"):  # (steps holding neither are damaged: read below)
        raise ValueError(f"{mngr.directory} holds weights only (no optimizer state; a converted checkpoint?): "
                         f"to train from them, pass it as --init-from with a new --ckpt-dir")
    error, unreadable = None, []
    for step in steps:
        try:
            restored = _restore_step(mngr, step, trainer, config, rc)
        except ckpt_lib.CheckpointError as e:
            if not all_reach(f"unreadable_step_{step}"):
                # Unreadable here but not in every process (a damaged file of this process's
                # shards): the others wait inside Orbax's restore for this one, and going on to
                # an earlier step alone would mismatch every collective after it. Set the step
                # aside so that the same command resumes from the one before it.
                where, aside = _step_path(mngr, step), _aside_path(mngr, step, time.strftime("%Y%m%d-%H%M%S"))
                again = "run the same command again to resume from the step before it"
                try:
                    os.rename(where, aside)
                    done = f"set aside as {aside}; {again}"
                except FileNotFoundError:
                    done = f"another process has set it aside; {again}"
                except OSError as moved:
                    done = f"move it aside ({ckpt_lib.one_line(moved)}) and run the same command again"
                raise ValueError(f"checkpoint step {step} could not be restored in process {jax.process_index()} of "
                                 f"{jax.process_count()} ({e}), and not every process failed to read it: {done}") from None
            error = e
            unreadable.append((step, f"warning: cannot use checkpoint step {step} ({e}); trying an earlier one"))
            continue
        if skipped is not None:
            skipped.extend(unreadable)
        return restored
    raise error


def _set_aside(mngr, steps) -> None:
    """Rename unreadable newer steps to `<step>.unreadable-<time>` (kept for inspection, ignored by
    Orbax) so that training can save those step numbers again."""
    if not steps:
        return
    if jax.process_index() == 0:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for step in steps:
            if os.path.isdir(_step_path(mngr, step)):
                os.rename(_step_path(mngr, step), _aside_path(mngr, step, stamp))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("set aside unreadable checkpoints")
    mngr.reload()


def _step_path(mngr, step: int) -> str:
    return os.path.join(str(mngr.directory), str(step))


def _aside_path(mngr, step: int, stamp: str) -> str:
    """Where an unreadable step is kept: `<step>.unreadable-<time>`, which Orbax ignores."""
    return f"{_step_path(mngr, step)}.unreadable-{stamp}"


def _check_same_model(saved: LLMConfig, config: LLMConfig, where: str) -> None:
    """ValueError when the `--init-from` checkpoint (`where`) holds another model than `config` (a
    resume's checkpoint: `another_model`)."""
    if saved != config:
        raise ValueError(f"{where} holds a checkpoint of another model "
                         f"(differs in {', '.join(saved.differences(config))}); without --preset, --config or "
                         "a recipe naming a model, --init-from trains the model it holds")


def _restore_step(mngr, step: int, trainer: Trainer, config: LLMConfig, rc: RunConfig | None = None):
    import orbax.checkpoint as ocp

    meta = ckpt_lib.read_meta(mngr, step)
    saved = LLMConfig.from_dict(meta["config"])
    if saved != config:
        raise ValueError(another_model(rc, saved, config, f"--ckpt-dir {mngr.directory}"))
    target = trainer.abstract_state()
    weights = ckpt_lib.restore_weights(mngr, step, {"params": target["params"], "router_bias": target["router_bias"]})
    ts_target = {"opt_state": target["opt_state"], "step": target["step"], "rng": target["rng"]}
    try:
        ts = mngr.restore(step, args=ocp.args.Composite(train_state=ocp.args.StandardRestore(ts_target)))["train_state"]
    except Exception as e:  # noqa: BLE001 - orbax raises many types for unreadable files
        raise ckpt_lib.CheckpointError(f"step {step} has no readable optimizer state: {ckpt_lib.one_line(e)}") from e
    state = {"params": weights["params"], "router_bias": weights["router_bias"], **ts}
    data = meta.get("data") or None
    recorded = ((data or {}).get("source") or {}).get("tokenizer", meta.get("tokenizer"))
    return state, data, (recorded, ckpt_lib.read_tokenizer_files(mngr, step))


def init_tokenizer(path: str, config: LLMConfig | None = None) -> tuple[str | None, dict | None]:
    """(the tokenizer it names, the tokenizer files it saved) of the `--init-from` checkpoint; with
    `config`, a checkpoint of another model is refused first (its tokenizer may not fit `config`)."""
    meta, files = init_from_meta(path)
    if config is not None:
        _check_same_model(LLMConfig.from_dict(meta["config"]), config, f"--init-from {os.path.abspath(path)}")
    return meta.get("tokenizer"), files


def init_from_dir(path: str) -> str:
    """The `--init-from` directory, absolute; ValueError naming it when it is no directory or holds
    no step directory. Checked by file names only: in a multi-process run Orbax's reads are
    collective, and this check is agreed on before them (`failing_together`)."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"--init-from {path}: not a checkpoint directory")
    if not step_dirs(path):
        raise ValueError(f"--init-from {path}: {ckpt_lib.no_checkpoint_found(path)}")
    return path


def init_from_meta(path: str) -> tuple[dict, dict | None]:
    """(metadata, saved tokenizer files) of the `--init-from` checkpoint's latest step; ValueError
    naming the directory when it is none."""
    path = init_from_dir(path)
    try:
        return ckpt_lib.read_step_info(path)[1:]
    except ckpt_lib.CheckpointError as e:
        raise ValueError(f"--init-from {path}: {e}") from None


def load_weights(path: str, trainer: Trainer, config: LLMConfig) -> dict:
    path = init_from_dir(path)
    with ckpt_lib.reading(path) as mngr:
        step = ckpt_lib.resolve_step(mngr, None)
        _check_same_model(LLMConfig.from_dict(ckpt_lib.read_meta(mngr, step)["config"]), config,
                          f"--init-from {path}")
        target = trainer.abstract_state()
        return ckpt_lib.restore_weights(mngr, step, {"params": target["params"], "router_bias": target["router_bias"]})


def print_samples(model, tokenizer, prompts, max_new_tokens: int, *, seed: int = 0, temperature: float = 0.8,
                  top_k: int = 40) -> list[str]:
    """The seed's TextGenerationCallback: continue a few prompts with the trained model (latent-cache
    decoding) and print them. Returns the continuations."""
    from jaxllm.generate import Sampling, generate

    encoded = [encode_prompt(tokenizer, p) or [model.config.bos_token_id] for p in prompts]
    # Each prompt up to `max_new_tokens`, as many as fit after it (as the PyTorch trainer's samples):
    # one batch per length, so that a long prompt no longer cut the other prompts' continuations.
    room = [min(max_new_tokens, model.config.max_position_embeddings - len(e)) for e in encoded]
    texts = [""] * len(encoded)
    for n in sorted(set(room)):
        rows = [i for i, r in enumerate(room) if r == n]
        out = generate(model, [encoded[i] for i in rows], max_new_tokens=n, sampling=Sampling(temperature, top_k),
                       seed=seed)
        for i, tokens, k in zip(rows, out.tokens, out.lengths):
            texts[i] = continuation_text(tokenizer, encoded[i], tokens[:k])
    if jax.process_index() == 0:
        print("\ngenerated text:")
        for p, t in zip(prompts, texts):
            print(f"  {p!r} -> {p}{t}")
    return texts
