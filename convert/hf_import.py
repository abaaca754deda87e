"""Hugging Face directory -> Flax checkpoint (`import_hf`).

Reads `config.json` and the weights (`model.safetensors`, sharded safetensors with their index,
or a legacy `pytorch_model.bin`, loaded with `torch.load(weights_only=True)` only), checks every
tensor name and shape against the config (`mapping.check_torch_state`) before converting any
tensor (safetensors: from the files' headers, before reading any data; a `.bin` has no header,
so its tensors are loaded first), and writes step 0 of an Orbax checkpoint in the layout of
`jaxllm/checkpoint.py` (the `params` and `meta` items; training started from it builds a fresh
optimizer state).
Weights are stored as float32 master weights whatever the source dtype (bfloat16 -> float32 is
exact). Tensors are read one at a time and stacked entry by entry; Orbax's save then sets the
peak (about 2.3x the float32 weights for seed-973m).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping

import numpy as np
import torch

from convert import ConvertError, error_line, mapping
from convert.output import atomic_output_dir, check_output
from jaxllm.cli import listing, step_dirs
from jaxllm.config import MODEL_TYPE, LLMConfig

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
PYTORCH_BIN, PYTORCH_BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
FLOAT_DTYPES = {torch.float32, torch.bfloat16, torch.float16, torch.float64}


@dataclasses.dataclass
class ImportResult:
    out_dir: str
    weight_files: list[str]
    tokenizer: str | None  # recorded in the checkpoint's metadata: the source directory, when it has a tokenizer.json
    notes: list[str] = dataclasses.field(default_factory=list)  # why the tokenizer was left out or is missing


def is_checkpoint_dir(path: str) -> bool:
    """An Orbax checkpoint directory: it holds at least one numbered step."""
    return bool(step_dirs(path))


def checkpoint_extras(path: str) -> list[str]:
    """What the Orbax checkpoint directory `path` holds that `import_hf` does not write: training
    state (a step's `train_state`, first) and anything but numbered steps (a run's metrics.jsonl,
    loss.png)."""
    names = sorted(os.listdir(path))
    is_step = {n: n.isdigit() and os.path.isdir(os.path.join(path, n)) for n in names}
    trained = [str(s) for s in sorted(int(n) for n in names if is_step[n])
               if os.path.isdir(os.path.join(path, str(s), "train_state"))]
    state = [f"training state (train_state in step{'s' if len(trained) > 1 else ''} {listing(trained)})"]
    return (state if trained else []) + [n for n in names if not is_step[n]]


def import_hf(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *, force: bool = False) -> ImportResult:
    """Convert the Hugging Face directory `hf_dir` into a Flax checkpoint at `out_dir` (step 0).
    An existing `out_dir` is replaced only with `force`, and only once the new checkpoint is
    complete. Raises ConvertError naming the file or tensor at fault."""
    hf_dir = os.path.abspath(os.fspath(hf_dir))
    if os.path.isdir(hf_dir) and not os.path.exists(os.path.join(hf_dir, "config.json")) and is_checkpoint_dir(hf_dir):
        raise ConvertError(f"{hf_dir} is a Flax (Orbax) checkpoint already (numbered steps, no config.json), "
                           "not a Hugging Face directory to convert")
    config, weights = read_hf_dir(hf_dir)
    out = check_output(out_dir, force=force, kind="Flax checkpoint", is_kind=is_checkpoint_dir,
                       extras=checkpoint_extras, source=hf_dir)
    flat = mapping.torch_to_flax(weights, config)  # reads tensor by tensor
    tokenizer, files, notes = read_tokenizer(hf_dir, config)
    with atomic_output_dir(out, force=force) as tmp:
        save_flax_checkpoint(tmp, flat, config, tokenizer=tokenizer, tokenizer_files=files)
    return ImportResult(out, weights.files, tokenizer, notes)


def read_tokenizer(hf_dir: str, config: LLMConfig) -> tuple[str | None, dict | None, list[str]]:
    """(what the checkpoint records as its tokenizer's source, the tokenizer's files, notes) of a
    Hugging Face directory. The files are saved in the checkpoint, so that it keeps its tokenizer
    when `hf_dir` moves; its absolute path is recorded as where they came from. Optional: a
    tokenizer that does not load is left out with a note (the weights are the conversion's point).
    A directory without one gets a note too when readers of the checkpoint would take the embedded
    tokenizer in its place (`jaxllm.data.checkpoint_tokenizer`; a larger vocabulary is refused there)."""
    from jaxllm.data import EMBEDDED_VOCAB_SIZE, embedded_vocab_size, model_tokenizer, tokenizer_dir, tokenizer_files

    if tokenizer_dir(hf_dir) is None:
        if config.vocab_size > EMBEDDED_VOCAB_SIZE:
            return None, None, []
        return None, None, [f"{hf_dir} holds no tokenizer; the checkpoint names none, so generate.py and --init-from "
                            f"will use the embedded tokenizer ({embedded_vocab_size(config):,} tokens; to keep the "
                            f"model's own, put its tokenizer.json in {hf_dir} and convert again, or pass --tokenizer "
                            "to them)"]

    try:
        tok = model_tokenizer(hf_dir, config)
    except Exception as e:  # noqa: BLE001 - whatever the reason, the weights are still converted
        return None, None, [f"the tokenizer of {hf_dir} was not saved: it does not load here ({error_line(e)})"]
    return hf_dir, tokenizer_files(tok), []


def read_hf_dir(hf_dir: str) -> tuple[LLMConfig, "TorchWeights"]:
    """The config and the (not yet read) tensors of a Hugging Face directory, every tensor name and
    shape checked against the config: ConvertError naming the file or tensor at fault. Readers
    that load the directory some other way (`from_pretrained`) check it with this first."""
    _check_is_dir(hf_dir)
    if not os.listdir(hf_dir):
        raise ConvertError(f"Hugging Face directory {hf_dir} is empty")
    config = read_hf_config(hf_dir)
    weights = TorchWeights(hf_dir)
    try:
        mapping.check_torch_state(weights.shapes, config)
    except ValueError as e:
        raise ConvertError(f"{hf_dir}: {e}") from None
    return config, weights


def _check_is_dir(hf_dir: str) -> None:
    if not os.path.exists(hf_dir):
        raise ConvertError(f"Hugging Face directory {hf_dir} does not exist")
    if not os.path.isdir(hf_dir):
        raise ConvertError(f"Hugging Face directory {hf_dir} is not a directory")


def read_hf_config(hf_dir: str) -> LLMConfig:
    _check_is_dir(hf_dir)
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        latest = _latest_trainer_checkpoint(hf_dir)
        if latest:
            raise ConvertError(f"{hf_dir} is a Trainer output directory (checkpoint-N folders, no config.json), not "
                               f"a Hugging Face model directory; pass one of its checkpoints, the latest: {latest}")
        raise ConvertError(f"{hf_dir} has no config.json (not a Hugging Face model directory)")
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConvertError(f"{path}: cannot read it as JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConvertError(f"{path}: not a JSON object")
    if "model_type" not in d:
        raise ConvertError(f"{path}: no model_type (this project's is {MODEL_TYPE!r}); not a config of this model")
    if d["model_type"] != MODEL_TYPE:
        raise ConvertError(f"{path}: model_type is {d['model_type']!r}, not {MODEL_TYPE!r} "
                           "(a checkpoint of another architecture)")
    try:
        return LLMConfig.from_dict(d)
    except ValueError as e:
        raise ConvertError(f"{path}: {e}") from None


def _latest_trainer_checkpoint(path: str) -> str | None:
    """The latest resumable `checkpoint-N` of a Trainer output directory (scripts/train_torch.py),
    or None when `path` holds none."""
    if not any(n.startswith("checkpoint-") for n in os.listdir(path)):
        return None
    from torch_ref.training import latest_checkpoint

    try:
        found = latest_checkpoint(path, warn=False)
    except ValueError:  # checkpoints, none loadable
        return None
    return found[0] if found else None


class TorchWeights(Mapping):
    """The tensors of a Hugging Face directory as a read-only mapping {name: float32 numpy array}.
    Names, shapes and dtypes (`shapes`, `dtypes`) come from the file headers; a tensor's data is
    read only when it is looked up, each read opening its file afresh: safetensors memory-maps a
    file, and a mapping kept open would count every tensor read so far in the process's memory."""

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        self._source: dict[str, tuple[str, torch.Tensor | None]] = {}  # name -> (file, tensor of a .bin)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self.files = self._scan()

    def _scan(self) -> list[str]:
        join = lambda name: os.path.join(self.hf_dir, name)  # noqa: E731
        # The first of these files that the directory holds, in the order in which `from_pretrained`
        # takes them: a directory holding two (one a leftover of an earlier save) was read here from
        # its shards while PyTorch loaded its model.safetensors, two different models.
        for weights, load in ((SAFETENSORS, self._safetensors_header), (SAFETENSORS_INDEX, self._safetensors_header),
                              (PYTORCH_BIN, self._load_bin), (PYTORCH_BIN_INDEX, self._load_bin)):
            if not os.path.isfile(join(weights)):
                continue
            if weights in (SAFETENSORS, PYTORCH_BIN):
                for name, content in load(join(weights)).items():
                    self._register(name, content, join(weights))
                return [weights]
            names = self._index(join(weights))
            files = sorted(set(names.values()))
            contents = {f: load(join(f)) for f in files}
            for name, f in names.items():
                if name not in contents[f]:
                    raise ConvertError(f"{join(weights)} maps tensor {name} to {f}, which does not hold it")
            # Every tensor of every shard, as `from_pretrained` loads them: one that two shards hold
            # (it took the last shard's, this the index's) or that the index does not list is refused.
            for f in files:
                for name, content in contents[f].items():
                    self._register(name, content, join(f))
            return files
        raise ConvertError(f"{self.hf_dir} has no weights ({SAFETENSORS}, {SAFETENSORS_INDEX} or {PYTORCH_BIN})")

    @staticmethod
    def _index(path: str) -> dict[str, str]:
        try:
            with open(path) as f:
                index = json.load(f)
            weight_map = index["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConvertError(f"{path}: not a readable weight index ({type(e).__name__}: {e})") from None
        if not isinstance(index.get("metadata"), dict):  # (from_pretrained stops with a KeyError without one)
            raise ConvertError(f"{path}: no \"metadata\" object beside the weight_map (from_pretrained needs one; "
                               "save_pretrained writes {\"metadata\": {...}, \"weight_map\": {...}})")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ConvertError(f"{path}: weight_map must map tensor names to file names")
        for f in set(weight_map.values()):
            if os.path.basename(f) != f or not os.path.isfile(os.path.join(os.path.dirname(path), f)):
                raise ConvertError(f"{path}: lists shard {f!r}, which is not a file of the directory")
        return weight_map

    @staticmethod
    def _safetensors_header(path: str) -> dict[str, tuple[tuple[int, ...], torch.dtype | str]]:
        """{name: (shape, dtype)} from a safetensors header, without reading tensor data."""
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                slices = {name: f.get_slice(name) for name in f.keys()}
                return {name: (tuple(s.get_shape()), _SAFETENSORS_DTYPES.get(s.get_dtype(), s.get_dtype()))
                        for name, s in slices.items()}
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise ConvertError(f"{path}: not a readable safetensors file ({error_line(e)})") from None

    @staticmethod
    def _load_bin(path: str) -> dict[str, torch.Tensor]:
        """A legacy pickle checkpoint, loaded with `weights_only=True` (no arbitrary code) and memory
        mapped where the format allows it."""
        try:
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # the pre-zip format cannot be memory mapped
                sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - unpickling raises many types
            raise ConvertError(f"{path}: not a loadable PyTorch weights file ({error_line(e)})") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise ConvertError(f"{path}: does not hold a state dict of tensors")
        return sd

    def _register(self, name: str, content, path: str) -> None:
        shape, dtype, tensor = (tuple(content.shape), content.dtype, content) if isinstance(content, torch.Tensor) \
            else (*content, None)
        if name in self._source:
            raise ConvertError(f"{path}: tensor {name} appears twice in the directory (also in "
                               f"{os.path.basename(self._source[name][0])})")
        if dtype not in FLOAT_DTYPES:
            raise ConvertError(f"{path}: tensor {name} has dtype {dtype}, expected float32, bfloat16, float16 or "
                               "float64")  # (fp8, a floating-point type too, is not read)
        self.shapes[name], self.dtypes[name], self._source[name] = shape, dtype, (path, tensor)

    def __getitem__(self, name: str) -> np.ndarray:
        from safetensors import safe_open

        path, tensor = self._source[name]
        if tensor is None:
            try:
                with safe_open(path, framework="pt") as f:
                    tensor = f.get_tensor(name)
            except Exception as e:  # noqa: BLE001
                raise ConvertError(f"{path}: cannot read tensor {name} ({error_line(e)})") from None
        return tensor.to(torch.float32).numpy()

    def __iter__(self):
        return iter(self._source)

    def __len__(self) -> int:
        return len(self._source)


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def save_flax_checkpoint(ckpt_dir: str, flat: dict, config: LLMConfig, *, tokenizer: str | None,
                         tokenizer_files: dict | None = None) -> None:
    """Step 0 of a Flax checkpoint (`params` + `meta` items) from a flat Flax dict (consumed)."""
    import jax.numpy as jnp

    from jaxllm import checkpoint
    from jaxllm.model import create_model
    from jaxllm.weights import flatten, unflatten

    abstract = checkpoint.split_weights(create_model(config, abstract=True))
    # JAX arrays, one at a time (each numpy array freed once copied): Orbax would otherwise copy
    # every numpy array at once while saving.
    weights = {kind: unflatten({path: jnp.asarray(flat.pop(path)) for path in flatten(abstract[kind])})
               for kind in ("params", "router_bias")}
    mngr = checkpoint.manager(ckpt_dir, create=True)
    try:
        checkpoint.save(mngr, 0, weights=weights, config=config, tokenizer=tokenizer,
                        tokenizer_files=tokenizer_files)
        mngr.wait_until_finished()
    finally:
        mngr.close()
