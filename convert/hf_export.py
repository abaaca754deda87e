"""Flax checkpoint -> Hugging Face directory (`export_hf`).

The directory holds `config.json` (with `auto_map`), the weights as safetensors (one
`model.safetensors`, or shards plus `model.safetensors.index.json` above `max_shard_size`),
`generation_config.json`, the tokenizer files when the checkpoint has a tokenizer that loads (the
files it saved, else the tokenizer its metadata names),
and the modeling code (`convert.remote_code`), so that
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` works in a process that never
imported this project.

Peak memory is about one copy of the float32 weights plus the largest stacked tensor: the
Orbax checkpoint is restored into numpy arrays, and each one is freed as soon as it is mapped
to PyTorch names (`mapping.flax_to_torch(..., consume=True)`).
"""

from __future__ import annotations

import dataclasses
import os
import re

import jax
import numpy as np
import torch

from convert import ConvertError, error_line, mapping
from convert.output import atomic_output_dir, check_output, parse_max_shard_size
from convert.remote_code import FILE_NAMES as REMOTE_FILE_NAMES
from convert.remote_code import write_remote_code
from jaxllm.cli import listing
from jaxllm import checkpoint
from jaxllm.config import LLMConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_MAX_SHARD_SIZE = "50GB"
# Tensors kept in float32 whatever the export dtype: `router_bias` is state that moves in steps of
# `router_bias_update_rate` and only chooses experts (ARCHITECTURE.md: float32).
KEEP_FLOAT32 = ("router_bias",)


@dataclasses.dataclass
class ExportResult:
    out_dir: str
    step: int
    dtype: str
    weight_files: list[str]
    tokenizer: str | None  # what the exported tokenizer files came from; None: none exported
    notes: list[str]  # why something optional (the tokenizer) was left out


def default_out_dir(ckpt_dir: str | os.PathLike) -> str:
    """`CKPT_DIR-hf`, next to the checkpoint directory."""
    return os.path.abspath(os.fspath(ckpt_dir)).rstrip(os.sep) + "-hf"


def is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


# What an export writes (the tokenizer's files depend on its kind) and what else a Hugging Face
# model directory may hold in its place (legacy weights); anything else is not replaced.
HF_DIR_FILES = re.compile("|".join([
    r"config\.json", r"generation_config\.json",
    r"model(-\d+-of-\d+)?\.safetensors", r"model\.safetensors\.index\.json",
    r"pytorch_model(-\d+-of-\d+)?\.bin", r"pytorch_model\.bin\.index\.json",
    *(re.escape(name) for name in REMOTE_FILE_NAMES),
    r"tokenizer(_config)?\.json", r"tokenizer\.model", r"special_tokens_map\.json", r"added_tokens\.json",
    r"vocab\.(json|txt)", r"merges\.txt", r"chat_template\.(jinja|json)"]))
# A Trainer checkpoint's (`checkpoint-N`, scripts/train_torch.py) state beside its weights.
TRAINING_STATE = re.compile(r"optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state(_\d+)?\.pth|trainer_state\.json"
                            r"|training_args\.bin|data_state\.rank\d+\.json")


def hf_dir_extras(path: str) -> list[str]:
    """What the Hugging Face directory `path` holds that `export_hf` does not write: training state
    (first), subdirectories, other files."""
    other = [n + ("/" if os.path.isdir(os.path.join(path, n)) else "") for n in sorted(os.listdir(path))
             if not (HF_DIR_FILES.fullmatch(n) and os.path.isfile(os.path.join(path, n)))]
    state = [n for n in other if TRAINING_STATE.fullmatch(n)]
    return ([f"training state ({listing(state)})"] if state else []) + [n for n in other if n not in state]


def export_hf(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *, step: int | None = None,
              dtype: str = "float32", force: bool = False,
              max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> ExportResult:
    """Write the Hugging Face directory of step `step` (default: the latest) of the Flax checkpoint
    `ckpt_dir` to `out_dir` (default `CKPT_DIR-hf`), weights in `dtype` ("float32" or "bfloat16";
    `router_bias` stays float32). An existing `out_dir` is replaced only with `force`, and only
    once the new directory is complete. Raises ConvertError / CheckpointError naming the problem."""
    if dtype not in DTYPES:
        raise ConvertError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    max_shard_size = parse_max_shard_size(max_shard_size)
    ckpt_dir = os.path.abspath(os.fspath(ckpt_dir))
    _require_dir(ckpt_dir, "checkpoint directory")
    out = check_output(out_dir if out_dir is not None else default_out_dir(ckpt_dir), force=force,
                       kind="Hugging Face model", is_kind=is_hf_dir, extras=hf_dir_extras, source=ckpt_dir)
    config, step, meta, flat, saved_tokenizer = read_flax_checkpoint(ckpt_dir, step)
    tensors = to_torch_tensors(flat, config, DTYPES[dtype])
    with atomic_output_dir(out, force=force) as tmp:
        write_weights(tensors, tmp, max_shard_size=max_shard_size, step=step)
        del tensors
        write_config(config, tmp, dtype)
        write_remote_code(tmp)
        tokenizer, notes = write_tokenizer(meta.get("tokenizer"), config, tmp, files=saved_tokenizer)
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    return ExportResult(out, step, dtype, files, tokenizer, notes)


def _require_dir(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise ConvertError(f"{what} {path} does not exist")
    if not os.path.isdir(path):
        raise ConvertError(f"{what} {path} is not a directory")


def read_flax_checkpoint(ckpt_dir: str, step: int | None):
    """(config, step, meta, flat weights {path tuple: float32 numpy}, saved tokenizer files or None)
    of one checkpoint step.
    The config in the checkpoint's metadata decides the expected tensors; a checkpoint whose
    weights do not match it (another preset, a missing or unexpected tensor) is refused."""
    from jaxllm.model import create_model
    from jaxllm.weights import flatten

    def read(mngr, step):
        meta = checkpoint.read_meta(mngr, step)
        try:
            config = LLMConfig.from_dict(meta["config"])
        except ValueError as e:
            raise checkpoint.CheckpointError(
                f"checkpoint step {step} in {ckpt_dir}: its config is not a CustomLLM config ({e})") from None
        abstract = checkpoint.split_weights(create_model(config, abstract=True))
        # numpy targets: restored straight into host memory, float32 whatever was saved.
        target = jax.tree.map(lambda x: np.zeros(x.shape, np.float32), abstract)
        weights = checkpoint.restore_weights(mngr, step, target)
        return config, step, meta, weights, checkpoint.read_tokenizer_files(mngr, step)

    # (the latest step again if a trainer still running there rotates it away while it is read)
    config, step, meta, weights, tokenizer_files = checkpoint.read_step(os.path.abspath(ckpt_dir), step, read)
    flat = {**flatten(weights.pop("params")), **flatten(weights.pop("router_bias"))}
    return config, step, meta, flat, tokenizer_files


def to_torch_tensors(flat: dict, config: LLMConfig, torch_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Flax flat dict (consumed) -> PyTorch state dict in `torch_dtype`. Every tensor owns its
    memory (safetensors refuses tensors that share storage, e.g. slices of one stacked array)."""
    sd = mapping.flax_to_torch(flat, config, consume=True)
    tensors = {}
    for name in list(sd):
        t = torch.from_numpy(np.require(sd.pop(name), np.float32, ["C", "W", "O"]))
        if not name.endswith(KEEP_FLOAT32):
            t = t.to(torch_dtype)
        tensors[name] = t
    return tensors


def write_weights(tensors: dict[str, torch.Tensor], out: str, *, max_shard_size: int | str, step: int) -> None:
    """`model.safetensors`, or shards and their index above `max_shard_size` (Hugging Face's own
    writer, so the layout is exactly what `from_pretrained` expects)."""
    from huggingface_hub import save_torch_state_dict

    save_torch_state_dict(tensors, out, max_shard_size=max_shard_size, metadata={"jaxllm_step": str(step)})


def write_config(config: LLMConfig, out: str, dtype: str) -> None:
    """`config.json` (the fields of `jaxllm/config.py`, `model_type` "customllm", `auto_map`) and
    `generation_config.json` (the special token ids, and `max_length` = max_position_embeddings:
    generation stops at the table's end, as `CustomLLM`'s own generation config says)."""
    from transformers import GenerationConfig

    from torch_ref import CustomLLMConfig
    from torch_ref.modeling_customllm import AUTO_MAP

    hf_config = CustomLLMConfig.from_llm_config(config, architectures=["CustomLLM"], auto_map=AUTO_MAP,
                                                dtype=dtype)
    hf_config.save_pretrained(out)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id,
                     max_length=config.max_position_embeddings).save_pretrained(out)


def write_tokenizer(spec, config: LLMConfig, out: str, *, files: dict | None = None) -> tuple[str | None, list[str]]:
    """Save the checkpoint's tokenizer: the `files` it saved (`jaxllm.checkpoint`), else the one its
    metadata names (`spec`, via `jaxllm.data.load_tokenizer`). Optional: a tokenizer that cannot be
    loaded here is left out with a note, not an error (the weights are the conversion's point)."""
    if not spec and not files:
        return None, []
    what = "the tokenizer saved in the checkpoint" if files else f"tokenizer {spec!r}"
    try:
        from jaxllm.data import embedded_vocab_size, load_tokenizer, tidy_tokenizer, tokenizer_from_files
    except ImportError as e:
        return None, [f"{what} not exported: jaxllm.data.load_tokenizer is not available ({e})"]
    try:
        tok = tokenizer_from_files(files) if files else load_tokenizer(spec, vocab_size=embedded_vocab_size(config))
    except Exception as e:  # noqa: BLE001 - whatever the reason, the weights are still exported
        return None, [f"{what} not exported: it does not load here ({error_line(e)})"]
    if not hasattr(tok, "save_pretrained"):  # a bare `tokenizers.Tokenizer`
        from transformers import PreTrainedTokenizerFast

        names = {f"{k}_token": tok.id_to_token(getattr(config, f"{k}_token_id")) for k in ("bos", "eos", "pad")}
        tok = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=config.max_position_embeddings,
                                      **{k: v for k, v in names.items() if v is not None})
    tidy_tokenizer(tok, config).save_pretrained(out)
    return str(spec or "saved with the checkpoint"), []
