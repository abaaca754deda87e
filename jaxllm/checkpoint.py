"""The Flax checkpoint layout, defined once for the trainer, the converter and `jaxllm.load`.

A checkpoint directory is an Orbax `CheckpointManager` directory: one numbered subdirectory per
saved step, each with up to four items:

- `params`: `{"params": <nested dict of nnx.Param>, "router_bias": <nested dict of RouterBias>}`,
  the Flax layout of `jaxllm.model` (layers stacked, kernels `[in, out]`), float32 master weights;
- `train_state` (written by training only): `{"opt_state": ..., "step": int, "rng": key data}`;
- `meta` (JSON): `{"format": 1, "config": <config.json dict>, "data": <data position>,
  "tokenizer": <what the tokenizer was loaded from, or null>, "step": int}`;
- `tokenizer` (JSON, when known): `{"format": 1, "files": {<name>: <text>}}`, the files the
  tokenizer's `save_pretrained` writes (`tokenizer.json`, `tokenizer_config.json`, ...), so that a
  checkpoint copied to another machine still has its tokenizer (`jaxllm.data.tokenizer_files`).
  Readers prefer it to `meta["tokenizer"]`, which names where it came from (a local path or a Hub
  id that the other machine may not have); checkpoints written before it existed have none.

A checkpoint written by `convert/torch_to_flax.py` has `params`, `meta` and (when the Hugging Face
directory has one) `tokenizer`, no `train_state`; training started from it (`--init-from`) builds
a fresh optimizer state. Saves are atomic (Orbax writes a temporary directory and renames it when
complete), so an interrupted save never shadows the previous step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jaxllm.cli import is_one_step, listing, step_dirs
from jaxllm.config import IGNORED_KEYS, LLMConfig, field_names
from jaxllm.stopping import add_unraisable_hook

FORMAT_VERSION = 1
ITEMS = ("params", "train_state", "meta", "tokenizer")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be used (missing, empty, corrupt, another model)."""


def one_line(e: BaseException) -> str:
    """The first sentence of an error, on one line: Orbax's and TensorStore's run over many lines
    (a dump of the array's whole TensorStore spec after "See full TensorStore details"), and
    TensorStore's own errors end in the JSON specs of the stores involved
    (`[tensorstore_spec='{...}']`, about 1 KB each), which are dropped."""
    text = str(e).strip()
    if not text:
        return type(e).__name__
    first = re.split(r"(?<=\.)\s+(?=[A-Z])", text.splitlines()[0], maxsplit=1)[0]
    return re.sub(r"\s*\[tensorstore_spec(\[\d+\])?='[^']*'\]", "", first)


def _orbax_read_leftover(unraisable) -> bool:
    """What Orbax (0.12) leaves behind after a restore that failed reading an array: the read
    coroutines of the other arrays, abandoned mid-read (each turns its GeneratorExit into an
    Exception when collected: `except BaseException` in `_read_array_index_and_device_put`), and
    TensorStore reads that complete after Orbax closed its event loop (`Event loop is closed`, from
    a TensorStore thread, with no object)."""
    code = getattr(unraisable.object, "cr_code", None)
    if code is not None and code.co_name == "_read_array_index_and_device_put":
        return True
    return (unraisable.object is None and isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed")


class _OrbaxTaskLogFilter(logging.Filter):
    """asyncio's "... exception was never retrieved" reports of abandoned Orbax tasks and futures:
    an array's read, a TensorStore open (its errors read `DATA_LOSS: Error opening "zarr" driver:
    ...`), the parse of a damaged array metadata file."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not re.match(r"\S+ exception was never retrieved", message):
            return True
        if "/orbax/checkpoint/" in message:
            return False
        exc, tb = (record.exc_info or (None, None, None))[1:]
        if exc is not None and re.match(r'[A-Z][A-Z_]+: Error \w+ "', str(exc)):
            return False
        while tb is not None:
            if "/orbax/checkpoint/" in tb.tb_frame.f_code.co_filename.replace(os.sep, "/"):
                return False
            tb = tb.tb_next
        return True


class _StepMetadataLogFilter(logging.Filter):
    """Orbax's "Failed to json parse Metadata file: <path>, file content: <all of it>, error: ..."
    (absl ERROR records, one each time a manager opens the directory) about a step's damaged
    `_CHECKPOINT_METADATA`, Orbax's record of the step (its save times, the names of its item
    handlers), which the restores here do not need (they name their handlers): one warning line per
    file instead. Its "Metadata file does not exist: <step>/_CHECKPOINT_METADATA" (absl WARNING
    records, up to three per read of a step without one: a step that a run still saving there is
    deleting or finishing, as generate.py and evaluate.py read it) are dropped."""

    said: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if re.match(r"Metadata file does not exist: .+_CHECKPOINT_METADATA$", record.getMessage(), re.DOTALL):
            return False
        m = re.match(r"Failed to json parse Metadata file: (.+?_CHECKPOINT_METADATA), file content: .*, error: (.*)$",
                     record.getMessage(), re.DOTALL)  # (a step's; Orbax's other metadata files are left to it)
        if m is None:
            return True
        path, error = m.groups()
        if path not in self.said:
            self.said.add(path)
            print(f"warning: {path} cannot be read (not JSON: {' '.join(error.split())}); it is Orbax's record of "
                  "the step (save times, item handlers), which reading the step does not need", file=sys.stderr, flush=True)
        return False


class _SaveThreadLogFilter(logging.Filter):
    """Orbax's "_SignalingThread.run() raised an exception" (absl ERROR records with the traceback,
    one per thread of a save that failed, some of them after the run has ended): the save's own
    error reaches the caller (a full disk: the training's one line naming the step)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "_SignalingThread.run() raised an exception" not in record.getMessage()


def quiet_orbax_read_leftovers() -> None:
    """Called by `manager()`, before anything is read: should a restore fail (an unreadable
    checkpoint, reported in one line and skipped), Orbax's leftovers (above) would otherwise print
    hundreds of lines of tracebacks and TensorStore specs to stderr whenever the garbage collector
    or a TensorStore thread meets them, some of them before the error reaches us. Only those are
    dropped (a restore that succeeds leaves none); everything else still goes to the previous
    `sys.unraisablehook` and to asyncio's logger. Also the tracebacks of a failed save's threads
    (`_SaveThreadLogFilter`). Installed once per process."""
    add_unraisable_hook("orbax", _orbax_read_leftover)
    # A restore that failed can also leave the read of an item's array metadata files created and
    # never started (its event loop gone first; seen once, on a loaded machine): Python's
    # "coroutine ... was never awaited" RuntimeWarning when it is collected, printed wherever that
    # happens. (Re-adding the same filter moves it to the front rather than adding a second one.)
    warnings.filterwarnings("ignore", message=r"coroutine 'Store\._get_array_metadatas' was never awaited$",
                            category=RuntimeWarning)
    for name, kind in (("asyncio", _OrbaxTaskLogFilter), ("absl", _StepMetadataLogFilter), ("absl", _SaveThreadLogFilter)):
        logger = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in logger.filters):
            logger.addFilter(kind())


def manager(ckpt_dir: str | os.PathLike, *, max_to_keep: int | None = None, create: bool = True,
            async_save: bool = False, read_only: bool = False) -> ocp.CheckpointManager:
    """`read_only=True` for readers (export, inspection): the manager creates, cleans up and
    deletes nothing, so reading is safe while a trainer writes to the same directory, and no
    background clean-up outlives the reader."""
    ckpt_dir = os.path.abspath(os.fspath(ckpt_dir))
    if os.path.exists(ckpt_dir) and not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"checkpoint path {ckpt_dir} exists and is not a directory")
    quiet_orbax_read_leftovers()
    # (Not Orbax's own `read_only` option, which logs a warning on every use.)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=create and not read_only, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=not read_only)
    # At most 1 GB in flight to disk per item: Orbax's default (96 GB) stages a host copy of nearly
    # the whole state, +5.2 GiB at seed-973m's save, which set the run's peak memory; bounded, the
    # save also ran faster here (2 GiB of arrays: 7.0 s against 11.7 s).
    handlers = {"params": ocp.StandardCheckpointHandler(save_concurrent_gb=1),
                "train_state": ocp.StandardCheckpointHandler(save_concurrent_gb=1),
                "meta": ocp.JsonCheckpointHandler(), "tokenizer": ocp.JsonCheckpointHandler()}
    mngr = ocp.CheckpointManager(ckpt_dir, options=options, item_handlers=handlers)
    # A writer's manager clears leftover temporary directories in a thread it starts here (awaited
    # only by the first save): a run that then stopped with an error before saving ended while that
    # thread ran, and Orbax logged its traceback ("cannot schedule new futures after interpreter
    # shutdown") after the error's one line. It lists the directory (and removes what an interrupted
    # save left, which the first save would wait for anyway): wait for it now.
    await_cleanup = getattr(mngr, "_maybe_await_cleanup_tmp_directory", None)  # (no public way)
    if await_cleanup is not None:
        await_cleanup()
    return mngr


@contextlib.contextmanager
def reading(ckpt_dir: str | os.PathLike):
    """`with reading(ckpt_dir) as mngr:` a `read_only` manager, closed on exit. Every reader uses
    one: a writer's manager would delete the temporary directory of a save in progress."""
    mngr = manager(ckpt_dir, read_only=True)
    try:
        yield mngr
    finally:
        mngr.close()


def split_weights(model) -> dict[str, Any]:
    """The `params` item of a model: parameters and router biases, as nested pure dicts."""
    from jaxllm.model import RouterBias

    return {
        "params": nnx.to_pure_dict(nnx.state(model, nnx.Param)),
        "router_bias": nnx.to_pure_dict(nnx.state(model, RouterBias)),
    }


def save(mngr: ocp.CheckpointManager, step: int, *, weights: dict, config: LLMConfig,
         train_state: dict | None = None, data: dict | None = None, tokenizer: str | None = None,
         tokenizer_files: dict[str, str] | None = None, force: bool = False) -> bool:
    """Save one step. `weights` is `split_weights(model)` (or arrays of the same structure);
    `tokenizer` names where the tokenizer came from, `tokenizer_files` are its files
    (`jaxllm.data.tokenizer_files`)."""
    meta = {"format": FORMAT_VERSION, "config": config.to_dict(), "data": data or {},
            "tokenizer": tokenizer, "step": int(step)}
    items = {"params": ocp.args.StandardSave(weights), "meta": ocp.args.JsonSave(meta)}
    if train_state is not None:
        items["train_state"] = ocp.args.StandardSave(train_state)
    if tokenizer_files:
        items["tokenizer"] = ocp.args.JsonSave({"format": FORMAT_VERSION, "files": dict(tokenizer_files)})
    return mngr.save(step, args=ocp.args.Composite(**items), force=force)


def _require_steps(ckpt_dir: str) -> None:
    if not os.path.exists(ckpt_dir):
        raise CheckpointError(f"checkpoint directory {ckpt_dir} does not exist")
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"checkpoint path {ckpt_dir} is not a directory")


def latest_step(ckpt_dir: str | os.PathLike) -> int | None:
    ckpt_dir = os.fspath(ckpt_dir)
    _require_steps(ckpt_dir)
    with reading(ckpt_dir) as mngr:
        return mngr.latest_step()


def read_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
    try:
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # noqa: BLE001 - orbax raises many types for unreadable files
        raise CheckpointError(
            f"checkpoint step {step} in {mngr.directory}: cannot read its metadata ({one_line(e)})") from e
    if not isinstance(meta, dict) or "config" not in meta:
        raise CheckpointError(f"checkpoint step {step} in {mngr.directory}: metadata has no model config")
    saved = meta["config"]
    unknown = sorted(set(saved) - set(field_names()) - IGNORED_KEYS) if isinstance(saved, dict) else []
    if unknown:  # not damage (resume must not set the step aside): a checkpoint of another version
        raise ValueError(f"checkpoint step {step} in {mngr.directory}: its config has fields this version of jaxllm "
                         f"does not know ({', '.join(unknown)}): saved by another version?")
    try:  # a bad value there is damage to the checkpoint, not to the user's --config
        LLMConfig.from_dict(saved)
    except (ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(
            f"checkpoint step {step} in {mngr.directory}: its saved model config is invalid ({e})") from None
    return meta


def read_tokenizer_files(mngr: ocp.CheckpointManager, step: int) -> dict[str, str] | None:
    """The tokenizer files saved with `step` ({name: text}), or None when the step has none or they
    cannot be read (with a warning: readers then use the tokenizer the metadata names, and the
    step's weights and optimizer state stay usable)."""
    if not os.path.isdir(os.path.join(os.fspath(mngr.directory), str(step), "tokenizer")):
        return None
    try:
        saved = mngr.restore(step, args=ocp.args.Composite(tokenizer=ocp.args.JsonRestore()))["tokenizer"]
        files = saved.get("files") if isinstance(saved, dict) else None
        if not isinstance(files, dict) or not files or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
            raise ValueError("it holds no files")
        from jaxllm.data import tokenizer_from_files

        tokenizer_from_files(files)  # damaged contents (in a valid JSON item) are unreadable too
    except Exception as e:  # noqa: BLE001 - orbax raises many types for unreadable files
        if not os.path.isdir(os.path.join(os.fspath(mngr.directory), str(step))):
            raise CheckpointError(f"checkpoint step {step} in {mngr.directory} was removed while it was read") from e
        if jax.process_index() == 0:
            print(f"warning: checkpoint step {step} in {mngr.directory}: its saved tokenizer cannot be read "
                  f"({one_line(e)}); using the tokenizer its "
                  "metadata names", file=sys.stderr)
        return None
    return files


def read_step_info(ckpt_dir: str | os.PathLike, step: int | None = None) -> tuple[int, dict, dict | None]:
    """(step, metadata, saved tokenizer files or None) of a checkpoint's `step` (default: the latest),
    without its arrays. Read-only."""
    ckpt_dir = os.path.abspath(os.fspath(ckpt_dir))
    _require_steps(ckpt_dir)
    return read_step(ckpt_dir, step, lambda mngr, s: (s, read_meta(mngr, s), read_tokenizer_files(mngr, s)))


def read_step(ckpt_dir: str, step: int | None, read):
    """`read(mngr, s)` for the step `s` of `ckpt_dir` (the latest unless `step`) with a reading
    manager. A trainer still running there deletes its oldest steps as it saves (`--keep`): when
    the latest step fails to read and is gone, or being deleted with a newer step saved, it was
    rotated away, not damaged, and the newest step is read instead (twice at most); other failures
    are raised as they are, a CheckpointError of the latest step naming the earlier steps saved."""
    for attempt in range(3):
        with reading(ckpt_dir) as mngr:
            s = resolve_step(mngr, step)
            try:
                return read(mngr, s)
            except Exception as e:
                steps = step_dirs(ckpt_dir)
                if step is not None or attempt == 2 or (s in steps and max(steps) == s):
                    earlier = [x for x in steps if x < s]
                    if step is None and earlier and isinstance(e, CheckpointError):
                        raise CheckpointError(f"{e}; earlier steps saved there: "
                                              f"{listing([str(x) for x in earlier[::-1]])}") from e
                    raise


def no_checkpoint_found(where: str) -> CheckpointError:
    """The error for a directory without checkpoint steps, with what it seems to be instead."""
    trainer = sorted((n for n in (os.listdir(where) if os.path.isdir(where) else [])
                      if re.fullmatch(r"checkpoint-\d+", n) and os.path.isfile(os.path.join(where, n, "config.json"))),
                     key=lambda n: int(n.split("-")[1]))
    hint = (": a Hugging Face directory (convert/torch_to_flax.py makes a checkpoint of it)"
            if os.path.isfile(os.path.join(where, "config.json")) else
            ": a step of a checkpoint directory? pass the directory above it"
            if is_one_step(where)
            else f": a PyTorch (Trainer) run's directory, whose {trainer[-1]} is a Hugging Face directory "
                 f"(convert/torch_to_flax.py makes a checkpoint of it)" if trainer
            else "")
    return CheckpointError(f"no checkpoint found in {where} (an empty or non-Orbax directory{hint})")


def resolve_step(mngr: ocp.CheckpointManager, step: int | None) -> int:
    if step is not None and (isinstance(step, bool) or not isinstance(step, (int, np.integer))):
        # ("7" was "step 7 not in ...; saved steps: [7]", and True read step 1)
        raise CheckpointError(f"step must be an integer, got {step!r}")
    steps = mngr.all_steps()
    if not steps:
        raise no_checkpoint_found(os.fspath(mngr.directory))
    if step is None:
        return max(steps)
    if step not in steps:
        raise CheckpointError(f"step {step} not in {mngr.directory}; saved steps: {sorted(steps)}")
    return step


def restore_weights(mngr: ocp.CheckpointManager, step: int, target: dict) -> dict:
    """Restore the `params` item onto `target` (arrays or `jax.ShapeDtypeStruct`s, possibly with
    shardings); a missing, unexpected or mis-shaped tensor raises CheckpointError naming it."""
    _check_tensors(mngr, step, "params", target)
    try:
        return mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))["params"]
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(
            f"checkpoint step {step} in {mngr.directory}: cannot restore weights ({one_line(e)})") from e


def _check_tensors(mngr, step, item, target) -> None:
    """The saved `item` holds exactly `target`'s tensors with their shapes (from its metadata)."""
    try:
        meta = mngr.item_metadata(step)[item]
    except Exception:  # noqa: BLE001 - fall back to Orbax's own errors
        return
    if meta is None:
        raise CheckpointError(f"checkpoint step {step} in {mngr.directory} has no '{item}' item")
    want = jax.tree_util.tree_flatten_with_path(target)[0]
    have = dict(jax.tree_util.tree_flatten_with_path(meta)[0])
    for path, leaf in want:
        if path not in have:
            raise CheckpointError(f"checkpoint step {step}: missing tensor {jax.tree_util.keystr(path)}")
        shape = tuple(getattr(have[path], "shape", ()) or ())
        if shape != tuple(leaf.shape):
            raise CheckpointError(
                f"checkpoint step {step}: tensor {jax.tree_util.keystr(path)} has shape {shape}, the model "
                f"expects {tuple(leaf.shape)} (a checkpoint of another model size?)")
    wanted = {path for path, _ in want}
    extra = sorted(jax.tree_util.keystr(path) for path in have if path not in wanted)
    if extra:
        raise CheckpointError(
            f"checkpoint step {step} in {mngr.directory}: unexpected tensor {extra[0]}"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "") + " (a checkpoint of another model?)")


def load(ckpt_dir: str | os.PathLike, step: int | None = None, **model_kw):
    """`model, config = jaxllm.load(ckpt_dir)`: the model of a checkpoint written by training or by
    `convert/torch_to_flax.py` (latest step unless `step`), on this process's first device whatever
    mesh it was saved from. `model_kw` go to `CustomLLM` (dtype, moe_impl, ...)."""
    return load_step(ckpt_dir, step, **model_kw)[:2]


def load_step(ckpt_dir: str | os.PathLike, step: int | None = None, **model_kw):
    """(model, config, step) as `load`, with the step read: without `step`, the latest when it was
    read (a trainer still saving there may have rotated away the one that was latest before)."""
    from jaxllm.model import create_model

    ckpt_dir = os.path.abspath(os.fspath(ckpt_dir))
    _require_steps(ckpt_dir)

    def read(mngr, step):
        config = LLMConfig.from_dict(read_meta(mngr, step)["config"])
        model = create_model(config, abstract=True, **model_kw)
        # Whole on this process's first device, whatever mesh saved them: without a sharding, Orbax
        # restores onto the saved one, which fails (or spreads the model) on other devices.
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                              split_weights(model))
        return model, config, restore_weights(mngr, step, target), step

    model, config, weights, step = read_step(ckpt_dir, step, read)
    set_split_weights(model, weights)
    return model, config, step


def load_tokenizer(ckpt_dir: str | os.PathLike, step: int | None = None):
    """`tokenizer = jaxllm.load_tokenizer(ckpt_dir)`: the tokenizer of a checkpoint (latest step
    unless `step`): the files it saved, else the tokenizer its metadata names, else the embedded one
    (`jaxllm.data.checkpoint_tokenizer`, with a note on stderr from process 0). A `transformers` fast
    tokenizer; ValueError naming the problem."""
    from jaxllm.data import checkpoint_tokenizer

    _, meta, files = read_step_info(ckpt_dir, step)
    return checkpoint_tokenizer(meta.get("tokenizer"), LLMConfig.from_dict(meta["config"]), files,
                                where=os.path.abspath(os.fspath(ckpt_dir)), quiet=jax.process_index() != 0,
                                advice="if the model was trained with another, load that one instead")


def set_split_weights(model, weights: dict) -> None:
    from jaxllm.model import RouterBias

    for kind, key in ((nnx.Param, "params"), (RouterBias, "router_bias")):
        state = nnx.state(model, kind)
        nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: jax.numpy.asarray(x), weights[key]))
        nnx.update(model, state)


def to_numpy_tree(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)
