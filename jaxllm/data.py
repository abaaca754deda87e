"""Training data: the embedded default corpus and tokenizer, and packed token batches streamed
from `datasets`, shared by `scripts/train_jax.py` and `scripts/train_torch.py`.

Pure Python + numpy + datasets/tokenizers/transformers (no JAX, no PyTorch), so both trainers
use the same code and see the same batches.

- **Sources.** Every source is a `datasets.IterableDataset` of documents read through the same
  code: a Hub id is streamed with `load_dataset(id, config, split=, streaming=True)`; a local
  `.parquet` / `.txt` file, glob or directory with `load_dataset("parquet"|"text",
  data_files=..., streaming=True)`, local `.jsonl` / `.json` files with
  `IterableDataset.from_generator` over their records (`_json_texts`); the embedded corpus
  (`embedded_corpus()`) with `Dataset.from_dict(...).to_iterable_dataset()`. In a `.txt` file a
  document is a paragraph: text separated by an empty line (a line holding spaces is not one, as `datasets` reads it) (`DataConfig.sample_by` changes that).
  Of local parquet and JSON files only the text column is read (their other columns may differ
  from file to file, or record to record); every parquet file's footer, and the first 10 MiB of
  the first JSON file with records, are checked when the data is opened (a file that is no
  parquet or JSON, or lacks the text column, is named then).
- **Packing.** Each document is tokenized without special tokens (a special token's text in a
  document, e.g. a literal "<|endoftext|>", is encoded as text) and followed by EOS; the
  documents of a process's share form one endless token stream (epoch after epoch), cut into
  rows of exactly `seq_len` tokens: no padding, and a document may continue into the next row.
  Tokenization runs in a background thread that keeps `prefetch` batches ready.
- **Processes.** `datasets.distributed.split_dataset_by_node` gives each process its share
  (whole files when their number divides by the process count, else every n-th document).
- **Resume.** The position is `(epoch, documents, offset)`: the stream continues at token
  `offset` of document `documents` (counted in this process's share) of epoch `epoch`. That is
  exact and independent of `rows`/`seq_len`; resuming re-reads, without tokenizing, the
  documents of the current epoch before that position, so it costs O(documents skipped).
- **Shuffling.** The embedded corpus is shuffled whole at the start of every epoch (seed
  `DataConfig.seed` + epoch). Other sources are read in their stored order, or, with
  `DataConfig.shuffle_buffer` N > 0, through `IterableDataset.shuffle`: their files (shards) in a
  shuffled order and their documents through a buffer of N, from a generator seeded by (seed,
  epoch), so every epoch has its own order and a resume re-reads the same one.
"""

from __future__ import annotations

import codecs
import collections
import dataclasses
import functools
import glob
import hashlib
import json
import logging
import os
import queue
import re
import sys
import threading
import warnings
from typing import Any, Iterator

import numpy as np

EMBEDDED = "embedded"
EOS_TOKEN = "<|endoftext|>"
EMBEDDED_VOCAB_SIZE = 4096          # preset `small`'s vocab_size
STATE_FORMAT = 1

# File suffix -> `datasets` packaged builder.
BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text"}
PARQUET_BATCH_ROWS = 1024           # rows per record batch read from a parquet file
# EOS names tried, in order, for a tokenizer file that does not say which token is EOS.
KNOWN_EOS = (EOS_TOKEN, "</s>", "<|end_of_text|>", "<eos>")


# ---- the embedded corpus --------------------------------------------------------------------
_SECTION = re.compile(r"\n(?=[^\n]+\n[=\-*~^]{3,}\n)")   # before a line underlined with = - * ~ ^
_MIN_SECTION_CHARS = 200


def embedded_corpus() -> list[str]:
    """The documents of the embedded default corpus: the sections of Python's own reference
    documentation (`pydoc_data.topics`, ~465 KB, shipped with every CPython), topics in sorted
    order, each cut at its section headings; a heading-only section is merged into the next one.
    Never downloaded; identical for a given Python version (~200 documents for 3.11)."""
    from pydoc_data.topics import topics

    docs: list[str] = []
    for name in sorted(topics):
        pending = ""
        for section in _SECTION.split(topics[name]):
            pending += section
            if len(pending) >= _MIN_SECTION_CHARS:
                docs.append(pending)
                pending = ""
            else:
                pending += "\n"
        if pending.strip():
            docs.append(pending.rstrip("\n"))
    return docs


# ---- tokenizers ------------------------------------------------------------------------------
def cache_root(cache_dir=None) -> str:
    """The project's cache directory: `cache_dir`, else `$JAXLLM_CACHE`, else `~/.cache/jaxllm`
    (the embedded tokenizer here, the scripts' compilation cache in `jaxllm/xla_cache.py`)."""
    if cache_dir is None:
        cache_dir = os.environ.get("JAXLLM_CACHE") or os.path.join("~", ".cache", "jaxllm")
    return os.path.expanduser(os.fspath(cache_dir))


def _embedded_settings(vocab_size: int) -> dict[str, Any]:
    """Everything besides the corpus that decides the embedded tokenizer (part of its key)."""
    return {"model": "byte-level BPE", "vocab_size": vocab_size, "special_tokens": [EOS_TOKEN],
            "min_frequency": 2, "add_prefix_space": False, "corpus": "pydoc_data.topics sections"}


def _hash_embedded_corpus(h) -> str:
    """`h` (a hashlib object) updated with the embedded corpus's documents, as 16 hex digits."""
    for doc in embedded_corpus():
        h.update(b"\0" + doc.encode())
    return h.hexdigest()[:16]


def embedded_corpus_key() -> str:
    """A hash of the embedded corpus's documents, which differ between Python versions: a
    checkpoint's data position points into this list (`stream_source`)."""
    return _hash_embedded_corpus(hashlib.sha256())


def embedded_tokenizer_key(vocab_size: int = EMBEDDED_VOCAB_SIZE) -> str:
    """A hash of the embedded corpus and the training settings: the tokenizer's cache key."""
    return _hash_embedded_corpus(hashlib.sha256(json.dumps(_embedded_settings(vocab_size), sort_keys=True).encode()))


def train_embedded_tokenizer(vocab_size: int = EMBEDDED_VOCAB_SIZE):
    """Train the byte-level BPE of the embedded default on `embedded_corpus()` (well under a
    second). `<|endoftext|>` is id 0, as in the cosmo2 tokenizer. Returns a `tokenizers.Tokenizer`;
    training is deterministic, so every call gives the same vocabulary and merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    settings = _embedded_settings(vocab_size)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=settings["add_prefix_space"])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=settings["min_frequency"],
        special_tokens=settings["special_tokens"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    docs = embedded_corpus()
    tok.train_from_iterator(docs, trainer, length=len(docs))
    return tok


def _wrap_embedded(tok):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN,
                                   pad_token=EOS_TOKEN, unk_token=EOS_TOKEN)


def _embedded_tokenizer(cache_dir, vocab_size: int, expected_key: str | None = None):
    """The embedded tokenizer from `<cache>/tokenizer-<key>/tokenizer.json`, trained and written
    there (atomically) when absent or unreadable."""
    from tokenizers import Tokenizer

    key = embedded_tokenizer_key(vocab_size)
    if expected_key is not None and expected_key != key:
        raise ValueError(
            f"tokenizer 'embedded:{expected_key}' (recorded in a checkpoint) differs from the "
            f"embedded tokenizer this installation builds ('embedded:{key}', vocab {vocab_size}): "
            f"the embedded corpus (Python's pydoc_data) or the vocabulary size changed")
    path = os.path.join(cache_root(cache_dir), f"tokenizer-{key}", "tokenizer.json")
    if os.path.isfile(path):
        try:
            return _wrap_embedded(Tokenizer.from_file(path))
        except Exception as e:  # a damaged cache entry: train again and overwrite it
            warnings.warn(f"ignoring unreadable cached tokenizer {path} ({e}); training it again")
    tok = train_embedded_tokenizer(vocab_size)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        tok.save(tmp)
        os.replace(tmp, path)
    except OSError as e:
        warnings.warn(f"could not cache the embedded tokenizer in {path}: {e}")
    return _wrap_embedded(tok)


def _offline() -> bool:
    """Whether Hugging Face offline mode is on (environment read now, not at import time)."""
    import huggingface_hub.constants

    flags = (os.environ.get(k, "") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return huggingface_hub.constants.HF_HUB_OFFLINE or any(
        f.upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def _looks_local(spec: str) -> bool:
    """A path rather than a Hub id ("name" or "owner/name", which never ends in "/")."""
    return (os.path.exists(os.path.expanduser(spec)) or glob.has_magic(spec)
            or spec.startswith(("/", ".", "~")) or spec.endswith("/") or spec.count("/") > 1 or "\\" in spec
            or os.path.splitext(spec)[1].lower() in (*BUILDERS, ".gz"))


def _check_hub(repo_id: str, repo_type: str, what: str, local_hint: str) -> None:
    """Fail fast and clearly when `repo_id` cannot be used from the Hub: offline mode, no
    network (one request, 10 s timeout, no retries), no such repository, or gated."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    if _offline():
        raise ValueError(
            f"{what} {repo_id!r} is a Hugging Face Hub id, but the Hub cannot be reached: offline "
            f"mode is on (HF_HUB_OFFLINE). Pass a local path instead ({local_hint})")
    try:
        HfApi().repo_info(repo_id, repo_type=repo_type, timeout=10)
    except HFValidationError:
        raise ValueError(f"{what} {repo_id!r}: no such file, and not a valid Hub id") from None
    except GatedRepoError:
        raise ValueError(f"{what} {repo_id!r} is gated on the Hub: accept its terms and log in "
                         f"(`hf auth login`), or pass a local path ({local_hint})") from None
    except RepositoryNotFoundError:
        raise ValueError(f"{what} {repo_id!r}: no such local file, and no such {repo_type} "
                         f"repository on the Hugging Face Hub") from None
    except Exception as e:
        raise ValueError(
            f"{what} {repo_id!r} is a Hugging Face Hub id, but the Hub cannot be reached "
            f"({type(e).__name__}: {e}). Pass a local path instead ({local_hint})") from None


def _ensure_eos(tok, what: str):
    """Every tokenizer we return has an EOS token (it separates packed documents) and a pad token
    (the EOS when the tokenizer names none, for batched generation). `what`: the tokenizer, in messages."""
    if tok.eos_token_id is None:
        vocab = tok.get_vocab()
        name = next((t for t in KNOWN_EOS if t in vocab), None)
        if name is None:
            raise ValueError(f"{what} defines no EOS token, and has none of "
                             f"{', '.join(KNOWN_EOS)}; packing needs one to separate documents")
        tok.eos_token = name
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_tokenizer(spec: str | None = None, *, cache_dir=None, vocab_size: int = EMBEDDED_VOCAB_SIZE):
    """A `transformers` fast tokenizer from `spec`:

    - None, "embedded" or "embedded:<key>" (what `tokenizer_source` records): the embedded
      byte-level BPE (`vocab_size` tokens, default 4096 = preset `small`; `<|endoftext|>` = 0 is
      BOS, EOS, pad and unk), trained once on `embedded_corpus()` and cached under `cache_dir`
      (default `$JAXLLM_CACHE` or `~/.cache/jaxllm`) by a hash of corpus and settings;
    - a local `tokenizer.json` file, or a local directory holding one (and maybe a
      `tokenizer_config.json` naming the special tokens);
    - a Hub id such as `HuggingFaceTB/cosmo2-tokenizer` (a clear ValueError when offline or
      unreachable and not in the Hugging Face cache).

    Directories and Hub ids load with `PreTrainedTokenizerFast.from_pretrained`, so the tokenizer
    is exactly its `tokenizer.json`: `AutoTokenizer` would build the class named in
    `tokenizer_config.json` (GPT2Tokenizer for cosmo2), which in transformers 5 replaces the
    file's pre-tokenizer (dropping SmolLM2's digit splitting).

    `vocab_size` applies to the embedded tokenizer only. Raises ValueError naming the problem.
    """
    from transformers import PreTrainedTokenizerFast

    if spec is None or spec == EMBEDDED or spec.startswith(EMBEDDED + ":"):
        expected = spec.split(":", 1)[1] if spec and ":" in spec else None
        return _embedded_tokenizer(cache_dir, vocab_size, expected)
    path = os.path.expanduser(spec)
    if os.path.isfile(path):
        if not path.endswith(".json"):
            raise ValueError(f"tokenizer file {spec}: expected a tokenizer.json (or a directory)")
        try:
            tok = PreTrainedTokenizerFast(tokenizer_file=path)
        except Exception as e:
            try:  # JSON, but not a tokenizers file (a tokenizer_config.json, a config.json, ...)
                with open(path, encoding="utf-8") as f:
                    held = json.load(f)
            except (OSError, ValueError):
                held = None
            if isinstance(held, dict) and "model" not in held:
                raise ValueError(f"tokenizer file {spec} is JSON but not a tokenizer.json (no \"model\"; it holds "
                                 f"{', '.join(sorted(held)[:4]) or 'nothing'}): give the tokenizer.json, or its "
                                 "directory") from None
            raise ValueError(f"cannot read tokenizer file {spec}: {e}") from None
    elif os.path.isdir(path):
        tok = _directory_tokenizer(path, f"tokenizer directory {spec}")
    elif _looks_local(spec):
        raise ValueError(f"tokenizer {spec}: no such file or directory")
    else:
        try:
            tok = PreTrainedTokenizerFast.from_pretrained(spec, local_files_only=True)  # HF cache
        except Exception:
            _check_hub(spec, "model", "tokenizer", "a tokenizer.json file or a directory holding one")
            try:
                tok = PreTrainedTokenizerFast.from_pretrained(spec)
            except Exception as e:
                raise ValueError(f"cannot load tokenizer {spec!r} from the Hub: {e}") from None
    return _ensure_eos(tok, f"tokenizer {spec!r}")


def _directory_tokenizer(path: str, name: str):
    """The tokenizer of directory `path`, loaded as `load_tokenizer` says; `name` is what messages
    call it (not the path of a temporary directory, gone when the message is read)."""
    from transformers import PreTrainedTokenizerFast

    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise ValueError(f"{name} has no tokenizer.json")
    try:
        tok = PreTrainedTokenizerFast.from_pretrained(path)
    except Exception as e:
        raise ValueError(f"cannot load {name}: {str(e).replace(path, name)}") from None
    return tok


def tokenizer_dir(path: str) -> str | None:
    """`path` made absolute when it is a directory holding a tokenizer (a tokenizer.json), else None
    (a Hugging Face model directory, a Trainer checkpoint)."""
    return os.path.abspath(path) if os.path.isfile(os.path.join(path, "tokenizer.json")) else None


def tokenizer_files(tokenizer) -> dict[str, str]:
    """The files `tokenizer.save_pretrained` writes ({name: text}): what a Flax checkpoint stores
    beside its weights so that it carries its own tokenizer (`jaxllm.checkpoint`)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="jaxllm-tokenizer-") as d:
        tokenizer.save_pretrained(d)
        files = {}
        for name in sorted(os.listdir(d)):
            if os.path.isfile(os.path.join(d, name)):
                with open(os.path.join(d, name), encoding="utf-8") as f:
                    files[name] = f.read()
    return files


def tokenizer_from_files(files: dict[str, str], config=None):
    """The tokenizer of `files` (from `tokenizer_files`, as a checkpoint stores them), loaded as
    `load_tokenizer` loads a directory (and checked against `config`'s vocabulary when given).
    Raises ValueError naming the problem."""
    import tempfile

    if "tokenizer.json" not in files:
        raise ValueError("the saved tokenizer has no tokenizer.json")
    with tempfile.TemporaryDirectory(prefix="jaxllm-tokenizer-") as d:
        for name, text in files.items():
            if not name or name != os.path.basename(name) or name.startswith("."):
                raise ValueError(f"the saved tokenizer has a file named {name!r}")
            with open(os.path.join(d, name), "w", encoding="utf-8") as f:
                f.write(text)
        tok = _ensure_eos(_directory_tokenizer(d, "the saved tokenizer"), "the saved tokenizer")  # read into memory
    if config is not None:
        check_vocab(tok, config)
    return tidy_tokenizer(tok, config)  # (a checkpoint saved before the project's tokenizers were tidied)


def tokenizer_source(spec: str | None, *, vocab_size: int = EMBEDDED_VOCAB_SIZE) -> str:
    """What a checkpoint records about its tokenizer, loadable again with `load_tokenizer`:
    "embedded:<key>" (the cache key: corpus + settings), an absolute local path, or the Hub id."""
    if spec is None or spec == EMBEDDED:
        return f"{EMBEDDED}:{embedded_tokenizer_key(vocab_size)}"
    if spec.startswith(EMBEDDED + ":") or not _looks_local(spec):
        return spec
    return os.path.abspath(os.path.expanduser(spec))


def stream_source(cfg: DataConfig, tokenizer_spec: str) -> dict:
    """What decides the token stream that a saved data position points into: the dataset (an
    absolute path when local, with its files' relative paths and sizes), its config, split, text
    column and seed, and the tokenizer as `tokenizer_source` records it; for the embedded corpus, a
    fingerprint of its documents (they change with the Python version). A checkpoint stores it;
    resuming with another one is refused (`check_same_stream`)."""
    dataset = cfg.dataset if cfg.dataset not in (None, EMBEDDED) else EMBEDDED
    files = None
    if dataset == EMBEDDED:  # its documents come with Python (`pydoc_data`): a fingerprint of them
        files = [["pydoc_data.topics", embedded_corpus_key()]]
    elif _looks_local(dataset):
        dataset = os.path.abspath(os.path.expanduser(dataset))
        files = _file_list(dataset, cfg.skip_dir)
    return {"dataset": dataset, "dataset_config": cfg.dataset_config, "split": cfg.split,
            "text_column": cfg.text_column, "seed": cfg.seed, "shuffle_buffer": cfg.shuffle_buffer,
            "tokenizer": tokenizer_spec, "files": files}


def _file_list(dataset: str, skip_dir: str | None = None) -> list[list] | None:
    """[[path relative to the files' common directory, size in bytes], ...] of a local dataset (in
    the order it is read), or None when it cannot be listed (opening it will say why)."""
    try:
        files = _local_files(dataset, skip_dir)[1]
    except ValueError:
        return None
    root = os.path.commonpath([os.path.dirname(f) for f in files])
    return [[os.path.relpath(f, root), os.path.getsize(f)] for f in files]


def checkpoint_tokenizer(spec: str | None, config, files: dict[str, str] | None = None, *, where: str,
                         advice: str = "pass --tokenizer to choose another", quiet: bool = False):
    """The tokenizer that a checkpoint (`where`, for messages) of a model of `config` comes with: the
    `files` it saved, else the one it names (`spec`), else the embedded tokenizer, but only for a
    vocabulary that one was made for (not a 49,152-token model's), and then with a note on stderr
    (`embedded_note`, ending with `advice`; none when `quiet`). ValueError naming the problem."""
    if files:
        return tokenizer_from_files(files, config)
    if spec is not None:
        return model_tokenizer(spec, config)
    _check_embedded_fits(config, where)
    tokenizer = model_tokenizer(None, config)
    if not quiet:
        print(embedded_note(where, config, advice), file=sys.stderr)
    return tokenizer


def embedded_note(where: str, config, advice: str = "pass --tokenizer to choose another") -> str:
    """The line saying that the checkpoint or model directory `where`, which names and holds no
    tokenizer, is read with the embedded tokenizer (at the size a model of `config` takes), which
    may not be the one the model was trained with; `advice`: how to choose another."""
    return (f"note: {where} holds no tokenizer; using the embedded tokenizer "
            f"({embedded_vocab_size(config):,} tokens; {advice})")


def _check_embedded_fits(config, where: str) -> None:
    """ValueError when a checkpoint (`where`) that names no tokenizer has a vocabulary larger than
    the embedded tokenizer's: its token ids cannot be the embedded tokenizer's."""
    if config.vocab_size > EMBEDDED_VOCAB_SIZE:
        raise ValueError(f"{where} names no tokenizer, and its vocabulary ({config.vocab_size}) is not the "
                         f"embedded tokenizer's: give one explicitly (--tokenizer)")


def run_tokenizer(rc, config, inherited: tuple[str | None, Any] = (None, None), *, origin: str | None = None,
                  quiet: bool = False, notes: list[str] | None = None):
    """(tokenizer, spec) of a run (`rc`, a `jaxllm.recipes.RunConfig`) for a model of `config`.

    `inherited` describes the checkpoint the run continues (`origin`: the one it resumes, or the
    `--init-from` one): (the tokenizer it names, its own copy: the files a Flax checkpoint saved,
    or a directory holding them). Without `--tokenizer` the run takes that tokenizer (so training
    on from converted weights keeps their token ids), else the embedded one (an error for a checkpoint
    whose vocabulary is larger than the embedded one's, as in generation; for a smaller one, a note
    on stderr, `embedded_note`, unless `quiet`: a run's processes but its first; `quiet` silences the
    warning about an unreadable saved copy too). A `--tokenizer` (or a
    recipe's) naming the same tokenizer as the checkpoint is loaded from the checkpoint's copy too,
    so that the same command resumes where the original path or Hub id cannot be reached. `spec`
    is what the run's checkpoints record (`run_stream`). The note goes into `notes` instead, when
    given: a trainer prints it once its start-up checks have passed, so that bad input still ends
    in one line. Both trainers use it; ValueError naming the problem."""
    recorded, copy = inherited
    if rc.tokenizer is not None:
        same = recorded is not None and tokenizer_source(
            rc.tokenizer, vocab_size=embedded_vocab_size(config)) == recorded
        if not (same and copy):
            given = model_tokenizer(rc.tokenizer, config)
            if recorded is not None and copy:
                # Named otherwise (a relative path from another directory, a local copy of a Hub
                # tokenizer): the same tokenizer all the same when it tokenizes as the saved copy.
                try:
                    saved = tokenizer_from_files(copy, config) if isinstance(copy, dict) else model_tokenizer(copy, config)
                except ValueError:
                    saved = None
                if saved is not None and same_tokenization(given, saved):
                    return saved, recorded
            return given, rc.tokenizer
    spec = recorded if recorded is not None else origin  # a copy named nowhere: recorded as where it came from
    if isinstance(copy, dict) and copy:
        return tokenizer_from_files(copy, config), spec
    if isinstance(copy, str):  # a directory (a Trainer checkpoint's): when damaged, the tokenizer it names
        try:
            return model_tokenizer(copy, config), spec
        except ValueError as e:
            if recorded is None:
                raise
            if not quiet:
                print(f"warning: the tokenizer saved in {copy} cannot be read ({e}); using {recorded!r}", file=sys.stderr)
    if recorded is None and origin is not None:  # as generation reads that checkpoint (`checkpoint_tokenizer`)
        _check_embedded_fits(config, origin)
    try:
        tokenizer = model_tokenizer(recorded, config)
    except ValueError as e:
        what = f"the tokenizer {recorded!r}" if recorded is not None else "the embedded tokenizer"
        raise ValueError(f"{what}{f' of {origin}' if origin is not None else ''} does not load ({e}); "
                         "pass --tokenizer") from None
    if recorded is None and origin is not None and not quiet:  # (a new run uses it as the README says)
        if notes is None:
            print(embedded_note(origin, config), file=sys.stderr)
        else:
            notes.append(embedded_note(origin, config))
    return tokenizer, recorded


def same_tokenization(a, b) -> bool:
    """Whether two fast tokenizers split and number text alike: the same model (vocabulary and
    merges), normalizer and pre-tokenizer, and the same ids for every token, added ones included.
    Not compared: how they pad or decode, nor which tokens `tidy_tokenizer` named special."""
    parts = ("model", "normalizer", "pre_tokenizer")
    ja, jb = (json.loads(t.backend_tokenizer.to_str()) for t in (a, b))
    return all(ja.get(k) == jb.get(k) for k in parts) and a.get_vocab() == b.get_vocab()


def run_stream(rc, config, tokenizer_spec: str | None) -> tuple[DataConfig, dict]:
    """The data settings of a run (`rc`, a `jaxllm.recipes.RunConfig`) for a model of `config`: its
    `DataConfig` and its `stream_source`, whose "tokenizer" is what the checkpoint records
    (`tokenizer_spec` from `run_tokenizer`). Both trainers use it."""
    cfg = DataConfig(dataset=rc.dataset, dataset_config=rc.dataset_config, split=rc.split,
                     text_column=rc.text_column, seq_len=rc.seq_len, seed=rc.seed,
                     shuffle_buffer=rc.shuffle_buffer, skip_dir=rc.ckpt_dir)
    return cfg, stream_source(cfg, tokenizer_source(tokenizer_spec, vocab_size=embedded_vocab_size(config)))


FLAGS_OF_SOURCE = {"dataset": "--dataset", "dataset_config": "--dataset-config", "split": "--split",
                   "text_column": "--text-column", "seed": "--seed", "shuffle_buffer": "--shuffle-buffer",
                   "tokenizer": "--tokenizer"}
# What checkpoints written before a key was recorded were read with.
SOURCE_DEFAULTS = {"shuffle_buffer": 0}


def check_same_stream(recorded: dict | None, source: dict, ckpt_dir: str, *, quiet: bool = False) -> None:
    """ValueError when `recorded` (the `stream_source` a checkpoint stored with its data position)
    is another token stream than this run's `source` (another dataset, tokenizer, seed, ...):
    resuming would not continue with the batches the run would have seen. Both trainers call it;
    checkpoints written before the source was recorded (`recorded` None) are not checked. Changed
    files of the same dataset are allowed, with a warning on stderr unless `quiet` (a run's
    processes but its first)."""
    if not recorded:
        return
    for key, flag in FLAGS_OF_SOURCE.items():
        if key == "dataset" and recorded.get("files") and recorded.get("files") == source.get("files"):
            continue  # the same files (names and sizes) in another place: a run moved to another machine
        if key == "dataset_config" and (source["dataset"] == EMBEDDED or _looks_local(source["dataset"])):
            continue  # meaningless there (earlier runs recorded a recipe's Hub config with local files)
        if recorded.get(key, SOURCE_DEFAULTS.get(key)) != source.get(key):
            raise ValueError(f"{flag} {source.get(key)!r} differs from the {recorded.get(key, SOURCE_DEFAULTS.get(key))!r} "
                             f"that {ckpt_dir} was "
                             f"trained with: pass the same to resume, or start a new --ckpt-dir")
    if recorded.get("files") and source.get("files") and recorded["files"] != source["files"]:
        # The same path, other files (some added, changed or removed): allowed, as data may grow.
        what = (f"the embedded corpus (Python {sys.version.split()[0]}'s pydoc_data) differs from the one "
                f"{ckpt_dir} was trained on (another Python version?)" if source["dataset"] == EMBEDDED else
                f"the files of --dataset {source['dataset']} differ from those {ckpt_dir} was trained on")
        if not quiet:
            print(f"warning: {what}; the resumed data position points into another stream of documents", file=sys.stderr)


def embedded_vocab_size(config) -> int:
    """The size the embedded tokenizer is trained to for a model of `config`: min(vocab_size, 4096),
    so that `tiny` (512) works too. Every caller of `load_tokenizer` that knows the model passes it
    (training records "embedded:<key>" of this size, and the key is checked on loading)."""
    return min(config.vocab_size, EMBEDDED_VOCAB_SIZE)


def model_tokenizer(spec: str | None, config, *, cache_dir=None):
    """`load_tokenizer(spec)` for a model of `config` (the embedded tokenizer at
    `embedded_vocab_size(config)`), checked with `check_vocab`."""
    tokenizer = load_tokenizer(spec, cache_dir=cache_dir, vocab_size=embedded_vocab_size(config))
    check_vocab(tokenizer, config)
    return tidy_tokenizer(tokenizer, config)


def tidy_tokenizer(tokenizer, config=None):
    """`tokenizer`, as every tokenizer this project saves (checkpoint steps of both trainers,
    exports) is set, in itself and in the files it saves: padding on the left, for batched prompts
    to `generate` (a decoder-only model continues from each row's last token; padded on the right,
    a short prompt's continuation followed its padding; training packs documents and never pads);
    naming `config`'s BOS token when it names none (a bare tokenizer.json) and that token is a
    special one (the EOS or an added special token); its `model_max_length` at most `config`'s
    `max_position_embeddings` (a bare tokenizer.json says 1e30, "no limit known": `truncation=True`
    would not cut a text to what the model takes); and without the loading options (`is_local`,
    `local_files_only`) that a tokenizer read from files would save."""
    tokenizer.padding_side = "left"
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and getattr(tokenizer, "model_max_length", 0) > limit:
        tokenizer.model_max_length = limit
    kwargs = getattr(tokenizer, "init_kwargs", None)
    if kwargs is not None:
        kwargs["padding_side"] = "left"  # (the attribute alone is not saved)
        for option in ("is_local", "local_files_only"):
            kwargs.pop(option, None)
    bos = getattr(config, "bos_token_id", None)
    if bos is not None and tokenizer.bos_token is None and 0 <= bos < len(tokenizer):
        added = tokenizer.added_tokens_decoder.get(bos)  # (an ordinary word named BOS would become special)
        if bos == tokenizer.eos_token_id or (added is not None and added.special):
            tokenizer.bos_token = tokenizer.convert_ids_to_tokens(bos)
    return tokenizer


def check_vocab(tokenizer, config) -> None:
    """ValueError when the tokenizer does not fit the model: ids its embedding table cannot hold,
    or an EOS other than the config's `eos_token_id` (training separates documents with the
    tokenizer's EOS; generation, in both frameworks and in exports, stops at the config's)."""
    n = len(tokenizer)
    if n > config.vocab_size:
        raise ValueError(
            f"the tokenizer has {n} tokens but the model's vocab_size is {config.vocab_size}: use a "
            f"tokenizer with at most {config.vocab_size} tokens or a config with vocab_size >= {n}")
    eos = tokenizer.eos_token_id
    if eos is not None and eos != config.eos_token_id:
        raise ValueError(
            f"the tokenizer's EOS token {tokenizer.eos_token!r} is id {eos} but the model's eos_token_id is "
            f"{config.eos_token_id}: documents would end with {eos} and generation stop at {config.eos_token_id}; "
            f"use a config (--config) whose eos_token_id is {eos}")


# ---- document sources ------------------------------------------------------------------------
@dataclasses.dataclass
class DataConfig:
    dataset: str | None = None          # None/"embedded", a Hub id, or a local parquet/jsonl/json/txt file, glob or directory
    dataset_config: str | None = None   # the Hub dataset's config, e.g. "cosmopedia-v2"
    split: str = "train"               # the Hub dataset's split (local files are one split)
    text_column: str = "text"
    seq_len: int = 256
    seed: int = 0                       # shuffling (the embedded corpus, a shuffle buffer), every epoch
    shuffle_buffer: int = 0             # documents in a shuffle buffer (not the embedded corpus); 0: stored order
    sample_by: str = "paragraph"        # documents of a .txt file: "paragraph" (blank-line separated), "line" or "document"
    skip_dir: str | None = None         # not data where a local dataset's directory or glob holds it: the run's --ckpt-dir

    def __post_init__(self):
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {self.seq_len}")
        if self.shuffle_buffer < 0:
            raise ValueError(f"--shuffle-buffer must be non-negative, got {self.shuffle_buffer}")
        if self.shuffle_buffer and self.is_embedded:
            raise ValueError(f"--shuffle-buffer {self.shuffle_buffer}: the embedded corpus is shuffled whole every "
                             "epoch (by --seed); a shuffle buffer is for a --dataset")
        if self.sample_by not in ("paragraph", "line", "document"):
            raise ValueError(f"sample_by must be 'paragraph', 'line' or 'document', got {self.sample_by!r}")
        # Settings that only a Hub dataset reads are refused rather than ignored elsewhere.
        if self.split != "train" and (self.is_embedded or _looks_local(self.dataset)):
            what = "the embedded corpus is" if self.is_embedded else "local files are"
            raise ValueError(f"--split {self.split!r}: only a Hub dataset has splits; {what} read whole as 'train'")
        if self.text_column != "text" and self.is_embedded:
            raise ValueError(f"--text-column {self.text_column!r}: the embedded corpus has no columns")
        if self.dataset_config is not None and (self.is_embedded or _looks_local(self.dataset)):
            what = "the embedded corpus is read as it is" if self.is_embedded else "local files are read as they are"
            raise ValueError(f"--dataset-config {self.dataset_config!r}: only a Hub dataset has configs; {what}")

    @property
    def is_embedded(self) -> bool:
        return self.dataset is None or self.dataset == EMBEDDED


def _literal_folder(pattern: str) -> str:
    """A glob with its longest leading part that is an existing folder escaped (`glob.escape`): in
    `data [v1]/*.jsonl`, the folder `data [v1]`, not `data v/` or `data 1/` (whichever exists, read
    in its place without a word, or "no file matches")."""
    head = os.path.dirname(pattern)
    while head and not os.path.isdir(head):
        if os.path.dirname(head) == head:
            return pattern
        head = os.path.dirname(head)
    return glob.escape(head) + pattern[len(head):] if head and glob.has_magic(head) else pattern


def _local_files(spec: str, skip_dir: str | None = None) -> tuple[str, list[str]]:
    """(builder, sorted files) of a local file, glob or directory; ValueError when none is usable.
    A path that exists is taken as it is, even where its name holds glob characters (`[`, `*`, `?`),
    and so is a glob's leading folder that exists (`_literal_folder`).
    Files inside `skip_dir` (the run's own --ckpt-dir: its metrics.jsonl and checkpoint files) are
    not part of a directory or glob that holds it: a dataset directory holding it reads the same on
    a resume (a dataset inside `skip_dir` is read whole)."""
    path = os.path.expanduser(spec)
    skip = skipped = ""
    if skip_dir is not None:
        root = path
        while glob.has_magic(root) and not os.path.exists(root):  # a glob's directory before its patterns
            root = os.path.dirname(root)
        skip = os.path.join(os.path.realpath(os.path.expanduser(skip_dir)), "")
        if skip.startswith(os.path.join(os.path.realpath(root or "."), "")):  # (not where the data lies inside it)
            skipped = f" outside --ckpt-dir {skip_dir}"
        else:
            skip = ""

    def outside(files: list[str]) -> list[str]:
        return [f for f in files if not os.path.realpath(f).startswith(skip)] if skip else files

    if os.path.isdir(path):
        files = outside([f for f in glob.glob(os.path.join(glob.escape(path), "**", "*"), recursive=True)
                         if os.path.splitext(f)[1].lower() in BUILDERS and os.path.isfile(f)])
        if not files:
            raise ValueError(f"dataset directory {spec} holds no {'/'.join(BUILDERS)} file{skipped}")
    elif os.path.isfile(path):
        files = [path]
    elif glob.has_magic(path):
        files = outside([f for f in glob.glob(_literal_folder(path), recursive=True) if os.path.isfile(f)])
        if not files:
            raise ValueError(f"dataset {spec}: no file matches{skipped}")
    elif os.path.exists(path):  # e.g. a shell's <(zcat data.jsonl.gz): once read, it is gone
        raise ValueError(f"dataset {spec} is neither a file nor a directory (a pipe?): the data is read again every "
                         "epoch and on a resume, so give a file, glob or directory")
    else:
        raise ValueError(f"dataset {spec}: no such file or directory")
    suffixes = sorted({os.path.splitext(f)[1].lower() for f in files})
    unknown = [s or "(none)" for s in suffixes if s not in BUILDERS]
    if unknown:
        raise ValueError(f"dataset {spec}: unsupported file type {', '.join(unknown)} "
                         f"(supported: {', '.join(BUILDERS)})")
    builders = {BUILDERS[s] for s in suffixes}
    if len(builders) > 1:
        raise ValueError(f"dataset {spec} mixes file types {', '.join(suffixes)}; use one type")
    for f in files:
        if not os.access(f, os.R_OK):
            raise ValueError(f"dataset file {f} is not readable (permission denied)")
    return builders.pop(), sorted(os.path.abspath(f) for f in files)


# Characters of the first JSON file checked when the data is opened (as `datasets`' json builder did).
JSON_CHECKED_CHARS = 10 << 20


class _JSONError(ValueError):
    """A JSON file that cannot be read as records holding text, with the file and line."""


def _json_records(path: str) -> Iterator[tuple[str, Any, int]]:
    """(where: "line N" or "element N", record, characters read so far) of a `.jsonl` / `.json`
    file: one JSON value per line (blank lines skipped), or, where the file starts with `[`, the
    elements of one array."""
    try:
        yield from _json_values(path)
    except UnicodeDecodeError as e:
        raise _JSONError(f"{path} is not UTF-8 text: {e}") from None


def _json_values(path: str) -> Iterator[tuple[str, Any, int]]:
    with open(path, encoding="utf-8-sig") as f:
        head = f.read(4096)
        if head.lstrip().startswith("["):
            text = head + f.read()
            try:
                records = json.loads(text)
            except json.JSONDecodeError as e:
                raise _JSONError(f"JSON parse error in {path} line {e.lineno}: {e.msg}") from None
            if not isinstance(records, list):
                raise _JSONError(f"JSON parse error in {path}: one array of records was expected")
            for i, record in enumerate(records):
                yield f"element {i}", record, len(text)
            return
        f.seek(0)
        done, first = 0, True
        for n, line in enumerate(f, 1):
            done += len(line)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                # (e.g. one object spread over several lines, a pretty-printed file)
                hint = " (a JSON dataset is one record per line, or one array of records)" if first else ""
                raise _JSONError(f"JSON parse error in {path} line {n}: {e.msg}{hint}") from None
            first = False
            yield f"line {n}", record, done


def _json_file_texts(path: str, column: str) -> Iterator[tuple[str | None, int]]:
    """(text or None, characters read so far) of each record of a JSON file. Only `column` is
    read: the records' other keys may differ. A record without it, or with something else than a
    string or null in it, is an error naming the line."""
    for where, record, done in _json_records(path):
        if isinstance(record, str):  # a JSON array of strings, as `datasets` reads one
            record = {"text": record}
        if not isinstance(record, dict):
            raise _JSONError(f"{path} {where}: {json.dumps(record)[:40]} where a record (a JSON object) was expected")
        if column not in record:
            raise _JSONError(f"{path} {where} has no text column {column!r}; its keys: "
                             f"{', '.join(map(str, record)) or '(none)'} (choose one with --text-column)")
        text = record[column]
        if text is not None and not isinstance(text, str):
            raise _JSONError(f"{path} {where}: column {column!r} holds {json.dumps(text)[:40]}, not text")
        yield text, done


def _json_texts(files: list[str], column: str) -> Iterator[dict]:
    """`{column: text or None}` of every record of `files`, in order: `from_generator`'s generator
    (one shard a file)."""
    for path in files:
        for text, _ in _json_file_texts(path, column):
            yield {column: text}


@functools.lru_cache(maxsize=None)
def _one_shard_at_a_time() -> dict:
    """`IterableDataset.shuffle`'s argument that fills the buffer from one file (shard) at a time,
    where this `datasets` has it (5.x): the default, up to 10 files read side by side in threads,
    waits 5 s for those threads to end (`SLEEP_TIME_ON_THREADS_SHUTDOWN`, for parquet files) at the
    end of every epoch and whenever an iteration is left (a resume's start, `close()`). The files'
    order is shuffled all the same."""
    import inspect

    import datasets

    takes = "max_buffer_input_shards" in inspect.signature(datasets.IterableDataset.shuffle).parameters
    return {"max_buffer_input_shards": 1} if takes else {}


def _describe(cfg: DataConfig) -> str:
    return "the embedded corpus" if cfg.is_embedded else f"dataset {cfg.dataset}"


class _Source:
    """The documents of `cfg` as `datasets.IterableDataset`s: `epoch(e)` gives epoch e's stream
    of this process's share, with one column, the text."""

    def __init__(self, cfg: DataConfig, process_index: int, process_count: int):
        import datasets

        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
        self.cfg, self.process_index, self.process_count = cfg, process_index, process_count
        self.name = _describe(cfg)
        self._files: list[str] = []  # a local dataset's
        if cfg.is_embedded:
            self._docs = embedded_corpus()
            self._dataset = None
            return
        if _looks_local(cfg.dataset):
            builder, files = _local_files(cfg.dataset, cfg.skip_dir)
            self._files = files
            if builder == "json":
                self._dataset = self._open_json(files)
                return
            # `datasets` reads each data file's name as a pattern again: escaped, it is that file.
            args, kwargs = (builder,), {"data_files": [glob.escape(f) for f in files], "split": "train"}
            if builder == "text":
                kwargs["sample_by"] = cfg.sample_by
            if builder == "parquet":
                # Every file's footer is read now: a file that is no parquet, or one without the
                # text column, is named before training rather than when the stream reaches it.
                self._check_parquet_files(files)
                # Only the text column is read (other columns may differ between files), in
                # batches of a fixed size: `datasets` takes a file's first row group's row count,
                # which is 0 in an empty file (an ArrowInvalid error, not an empty file).
                kwargs.update(columns=[cfg.text_column], batch_size=PARQUET_BATCH_ROWS)
        else:
            _check_hub(cfg.dataset, "dataset", "dataset", "a parquet/jsonl/txt file, glob or directory")
            args, kwargs = (cfg.dataset, cfg.dataset_config), {"split": cfg.split}
        # A bad file is reported once, by us (ValueError), not also logged by `datasets`.
        for builder_module in ("json.json", "parquet.parquet"):
            logging.getLogger(f"datasets.packaged_modules.{builder_module}").setLevel(logging.CRITICAL)
        try:
            ds = datasets.load_dataset(*args, streaming=True, **kwargs)
        except StopIteration:  # the json builder's way of saying that it found no record
            raise ValueError(f"{self.name} is empty: it has no documents") from None
        except Exception as e:
            raise ValueError(f"cannot read {self.name}: {_reason(e)}") from e
        features = ds.features
        if features is not None and cfg.text_column not in features:
            raise self._missing_column(list(features))
        self._dataset = ds

    def _open_json(self, files: list[str]):
        """The texts of local JSON files' records as an `IterableDataset` (a shard a file), after
        a check of the first file's first `JSON_CHECKED_CHARS` (as `datasets`' json builder checks
        its first chunk): a file that is no JSON, a record without the text column fail now rather
        than when training reaches them, and files without any record are an empty dataset."""
        import datasets

        column, records = self.cfg.text_column, 0
        try:
            for path in files:
                for _, done in _json_file_texts(path, column):
                    records += 1
                    if done >= JSON_CHECKED_CHARS:
                        break
                if records:
                    break
        except (ValueError, OSError) as e:  # _JSONError, UnicodeDecodeError (a ValueError), unreadable
            raise ValueError(f"cannot read {self.name}: {_reason(e)}") from None
        if not records:
            raise ValueError(f"{self.name} is empty: it has no documents")
        return datasets.IterableDataset.from_generator(
            _json_texts, features=datasets.Features({column: datasets.Value("string")}),
            gen_kwargs={"files": files, "column": column})

    def _missing_column(self, columns, file: str | None = None) -> ValueError:
        where = f" (in {file})" if file else ""
        return ValueError(f"{self.name} has no text column {self.cfg.text_column!r}{where}; its columns: "
                          f"{', '.join(map(str, columns)) or '(none)'} (choose one with --text-column)")

    def _check_parquet_files(self, files: list[str]) -> None:
        """ValueError naming the file (of several) that is no readable parquet file, lacks the text
        column or holds something else than strings in it. Reads each file's footer only."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        column = self.cfg.text_column
        for f in files:
            which = f"{f}: " if len(files) > 1 else ""
            try:
                schema = pq.read_schema(f)
            except UnicodeEncodeError:  # pyarrow takes a path as UTF-8 text
                raise ValueError(f"cannot read {self.name}: the name of {f!r} is not UTF-8 text, which pyarrow "
                                 "needs to open a parquet file; rename it") from None
            except (pa.ArrowException, OSError) as e:
                raise ValueError(f"cannot read {self.name}: {which}{_reason(e)}") from None
            if column not in schema.names:
                raise self._missing_column(schema.names, f if len(files) > 1 else None)
            kind = schema.field(column).type
            if pa.types.is_dictionary(kind):  # e.g. a pandas categorical column: strings all the same
                kind = kind.value_type
            if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)
                    or getattr(pa.types, "is_string_view", lambda t: False)(kind)):
                raise ValueError(f"column {column!r} of {self.name} holds {kind} values, not text"
                                 + (f" (in {f})" if len(files) > 1 else ""))

    def epoch(self, epoch: int):
        import datasets
        from datasets.distributed import split_dataset_by_node

        if self._dataset is None:  # the embedded corpus, in a fresh order every epoch
            order = np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self._docs))
            ds = datasets.Dataset.from_dict(
                {self.cfg.text_column: [self._docs[i] for i in order]}).to_iterable_dataset()
        else:
            ds = self._dataset
            if self.cfg.shuffle_buffer:  # the same generator in every process: they agree on the files' order
                ds = ds.shuffle(generator=np.random.default_rng([self.cfg.seed, epoch]),
                                buffer_size=self.cfg.shuffle_buffer, **_one_shard_at_a_time())
        if self.process_count > 1:
            ds = split_dataset_by_node(ds, rank=self.process_index, world_size=self.process_count)
        return ds

    def texts(self, epoch: int, start: int = 0, batch_size: int = 64) -> Iterator[list]:
        """Lists of consecutive texts (str or None) of epoch `epoch`, beginning at document `start`
        of this process's share; the documents before it are read but not returned."""
        batches = iter(self.epoch(epoch).iter(batch_size=batch_size))
        seen = 0
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except Exception as e:
                from jaxllm.cli import caused_by

                undecodable = self._undecodable_text_files() if caused_by(e, UnicodeDecodeError) else []
                raise ValueError(f"cannot read {self.name}: {'; '.join(undecodable) or _reason(e)}") from e
            if self.cfg.text_column not in batch:
                raise self._missing_column(list(batch))
            texts = batch[self.cfg.text_column]
            seen += len(texts)
            if seen > start:
                yield texts[max(0, len(texts) - (seen - start)):]
                start = seen

    def _undecodable_text_files(self) -> list[str]:
        """"<file> is not UTF-8 text (byte 0x.. at offset N)" for each of the dataset's `.txt` files
        that is not (`datasets`' text reader does not say which file, nor where in it: its position
        is within a chunk). All of them: this process's share, and its order under a shuffle buffer,
        are `datasets`' to choose. Read only when reading the data failed so."""
        found = []
        for path in self._files:
            if os.path.splitext(path)[1].lower() != ".txt":
                continue
            decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
            try:
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 20):
                        pending = len(decoder.getstate()[0])  # bytes of a character the last chunk cut
                        decoder.decode(chunk)
                        offset += len(chunk)
                    pending = len(decoder.getstate()[0])
                    decoder.decode(b"", final=True)
            except UnicodeDecodeError as e:
                at = offset - pending + e.start  # (e.object: the pending bytes, then this chunk)
                found.append(f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {at})")
            except OSError:
                continue
        return found


def _reason(e: Exception) -> str:
    """The error as one line (some of `datasets`' messages span several, e.g. a failed cast)."""
    text = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
    return " ".join(text.split())


def iter_documents(cfg: DataConfig, *, process_index: int = 0, process_count: int = 1,
                   epoch: int = 0) -> Iterator[str]:
    """The texts of one epoch of this process's share, in the order packing reads them (empty
    documents included, as the stream position counts them)."""
    source = _Source(cfg, process_index, process_count)
    for texts in source.texts(epoch):
        yield from ("" if t is None else t for t in texts)


# ---- packing -------------------------------------------------------------------------------
def _encoder(tokenizer):
    """texts -> token id lists, without special tokens: none added, and a special token's text
    inside a document (a literal "<|endoftext|>") is encoded as the text it is, not as that token,
    so that EOS only ever separates documents. Uses a private copy of the Rust tokenizer (no
    truncation, no padding) so that the caller may keep using `tokenizer` meanwhile."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow (pure Python) tokenizer
        return lambda texts: tokenizer(texts, add_special_tokens=False, split_special_tokens=True,
                                       verbose=False)["input_ids"]  # (documents longer than model_max_length)
    from tokenizers import Tokenizer

    own = Tokenizer.from_str(backend.to_str())
    own.no_truncation()
    own.no_padding()
    own.encode_special_tokens = True
    return lambda texts: [e.ids for e in own.encode_batch_fast(texts, add_special_tokens=False)]


class PackedBatches:
    """Endless batches `int32 [rows, seq_len]` of packed tokens for this process; see the module
    docstring. `state_dict()` is the position just after the last batch `next()` returned, and
    `PackedBatches(..., state=that)` continues with exactly the batches that would have followed.

    Construction reads the first documents and waits for the first batch, so a missing text
    column, an empty dataset, one whose documents hold no text or an unreadable file raise
    ValueError here rather than at the first `next()`. Errors met later by the
    background thread are raised by `next()`. Call `close()` (or use `with`) when done.
    """

    def __init__(self, cfg: DataConfig, tokenizer, *, rows: int, process_index: int = 0,
                 process_count: int = 1, state: dict | None = None, prefetch: int = 4):
        if rows < 1:
            raise ValueError(f"rows must be >= 1, got {rows}")
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        self.cfg, self.rows = cfg, rows
        self.process_index, self.process_count = process_index, process_count
        self._source = _Source(cfg, process_index, process_count)
        self._eos = tokenizer.eos_token_id
        if self._eos is None:
            raise ValueError("the tokenizer has no EOS token; packing needs one between documents")
        self._encode = _encoder(tokenizer)
        self._state = self._initial_state(state)
        if next(self._source.texts(0), None) is None:
            share = f" for process {process_index} of {process_count}" if process_count > 1 else ""
            raise ValueError(f"{self._source.name} is empty: it has no documents{share}")
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._produce, name="PackedBatches", daemon=True)
        self._thread.start()
        # The first batch is waited for here, so that a dataset whose documents hold no text fails
        # before the caller writes anything; `next()` returns it first.
        self._head = self._queue.get()
        if isinstance(self._head, BaseException):
            self.close()
            raise self._head

    # -- position ---------------------------------------------------------------------------
    def _position_state(self, epoch: int, documents: int, offset: int) -> dict:
        return {"format": STATE_FORMAT, "epoch": epoch, "documents": documents, "offset": offset,
                "process_index": self.process_index, "process_count": self.process_count}

    def _initial_state(self, state: dict | None) -> dict:
        if state is None:
            return self._position_state(0, 0, 0)
        if not isinstance(state, dict):
            raise ValueError(f"data state must be a dict, got {type(state).__name__}")
        for key in ("epoch", "documents", "offset", "process_index", "process_count"):
            if not isinstance(state.get(key), int) or state[key] < 0:
                raise ValueError(f"data state: {key!r} must be an integer >= 0, got {state.get(key)!r}")
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"data state: format {state.get('format')!r}, expected {STATE_FORMAT}")
        if (state["process_index"], state["process_count"]) != (self.process_index, self.process_count):
            raise ValueError(
                f"data state belongs to process {state['process_index']} of {state['process_count']}, "
                f"not {self.process_index} of {self.process_count}: resume with the same process count")
        return self._position_state(state["epoch"], state["documents"], state["offset"])

    def state_dict(self) -> dict:
        """JSON-serialisable position just after the last batch returned by `next()`."""
        return dict(self._state)

    # -- the producer (background thread) ---------------------------------------------------
    def _documents(self) -> Iterator[tuple[int, int, int, np.ndarray]]:
        """(epoch, document, offset of the first token, tokens + EOS) from the saved position on,
        epoch after epoch. Empty and whitespace-only documents count but give no tokens."""
        epoch, doc, offset = self._state["epoch"], self._state["documents"], self._state["offset"]
        column = self.cfg.text_column
        while True:
            start, any_tokens = doc, False
            for texts in self._source.texts(epoch, start=doc):
                for text in texts:
                    if text is not None and not isinstance(text, str):
                        raise ValueError(f"column {column!r} of {self._source.name} holds "
                                         f"{type(text).__name__} values, not text")
                kept = [i for i, t in enumerate(texts) if t and not t.isspace()]
                ids = self._encode([texts[i] for i in kept])
                for i, doc_ids in zip(kept, ids):
                    tokens = np.asarray(doc_ids + [self._eos], dtype=np.int32)
                    skip = offset if doc + i == start else 0
                    any_tokens = True
                    yield epoch, doc + i, skip, tokens[skip:]
                doc += len(texts)
            if start == 0 and not any_tokens:
                raise ValueError(f"{self._source.name} has no text: every document's {column!r} "
                                 f"is empty" + (f" (process {self.process_index} of "
                                                f"{self.process_count})" if self.process_count > 1 else ""))
            epoch, doc, offset = epoch + 1, 0, 0

    def _batches(self) -> Iterator[tuple[np.ndarray, dict]]:
        """(batch [rows, seq_len], position after it): consecutive `rows*seq_len` tokens of the stream."""
        need = self.rows * self.cfg.seq_len
        pending: collections.deque = collections.deque()  # [epoch, document, offset, tokens]
        have = 0
        for epoch, doc, offset, tokens in self._documents():
            if len(tokens) == 0:
                continue
            pending.append([epoch, doc, offset, tokens])
            have += len(tokens)
            while have >= need:
                parts, take = [], need
                while take:
                    chunk = pending[0]
                    if len(chunk[3]) <= take:
                        parts.append(chunk[3])
                        take -= len(chunk[3])
                        last = pending.popleft()
                    else:
                        parts.append(chunk[3][:take])
                        chunk[3], chunk[2], take = chunk[3][take:], chunk[2] + take, 0
                have -= need
                position = pending[0][:3] if pending else (last[0], last[1] + 1, 0)
                yield (np.concatenate(parts).reshape(self.rows, self.cfg.seq_len),
                       self._position_state(*position))

    def _produce(self) -> None:
        try:
            for item in self._batches():
                if not self._put(item):
                    return
        except BaseException as e:  # handed to the consumer, raised by next()
            self._put(e)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    # -- the consumer ------------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        if self._error is not None:
            raise self._error
        if self._stop.is_set():
            raise RuntimeError("PackedBatches is closed")
        if self._head is not None:
            item, self._head = self._head, None
        else:
            item = self._queue.get()
        if isinstance(item, BaseException):
            self._error = item
            raise item
        batch, self._state = item
        return batch

    def close(self) -> None:
        """Stop the background thread: it finishes the documents it is tokenizing and exits
        instead of waiting for room in the queue. Safe to call twice, and at interpreter exit."""
        self._stop.set()
        self._thread.join(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if getattr(self, "_thread", None) is not None:
            self._stop.set()
