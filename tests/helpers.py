"""Shared test helpers: the same weights in both frameworks, through the converter's one map."""

from __future__ import annotations

import jax
import numpy as np
import torch

from convert.mapping import flax_to_torch
from jaxllm.config import LLMConfig
from jaxllm.model import create_model
from jaxllm.weights import get_weights


def torch_model_from_flax(model, config: LLMConfig):
    from torch_ref import CustomLLM, CustomLLMConfig

    sd = flax_to_torch(get_weights(model), config)
    return CustomLLM.from_state_dict(CustomLLMConfig.from_llm_config(config),
                                     {k: torch.from_numpy(v if v.flags.writeable else v.copy()) for k, v in sd.items()})


def model_pair(config: LLMConfig, seed: int = 0, **model_kw):
    """(Flax model, PyTorch model) holding identical float32 weights."""
    jm = create_model(config, seed=seed, **model_kw)
    return jm, torch_model_from_flax(jm, config)


def word_tokenizer():
    """A four-token word-level tokenizer ("<|endoftext|>" = 0, "the", "a", "[UNK]"), other than the
    embedded one and small enough for `tiny`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "the": 1, "a": 2, "[UNK]": 3}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=words, eos_token="<|endoftext|>")


def tree_listing(path) -> dict[str, int]:
    """Every file and directory under `path` with its modification time (ns): equal before and
    after a command that must leave the directory alone."""
    return {p.relative_to(path).as_posix(): p.stat().st_mtime_ns for p in sorted(path.rglob("*"))}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def model_grads(model, ids):
    """Gradients of `loss_fn(model, ids)` with respect to the model's parameters, under one `jit`.
    (Outside a jit, `nnx.grad` runs the ops around the layer scan one by one, compiling each: two
    to three times slower for these tests' tiny models.)"""
    from flax import nnx

    from jaxllm.model import loss_fn

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return jax.jit(jax.grad(lambda p, r: loss_fn(nnx.merge(graphdef, p, r), ids)[0]))(params, rest)


def logits_without_this_project(hf_dir, ids: np.ndarray, tmp_path, python: str | None = None) -> np.ndarray:
    """The logits of `AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True)` for
    `ids`, computed in a fresh process (of `python`, default this one's interpreter) where jaxllm,
    torch_ref, convert and JAX cannot be imported and the repository is off sys.path: the
    directory's shipped modeling code must suffice. Only the repository leaves sys.path: after a
    `pip install .` (not -e) site-packages holds jaxllm beside numpy, torch and transformers."""
    import os
    import subprocess
    import sys
    import textwrap

    root = os.path.realpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
    np.save(tmp_path / "ids.npy", ids)
    code = textwrap.dedent(f"""
        import os, sys
        for name in ("jaxllm", "torch_ref", "convert", "jax", "jaxlib", "flax", "orbax"):
            sys.modules[name] = None  # any import of them now fails
        sys.path = [p for p in sys.path if os.path.realpath(p or ".") != {root!r}]
        import numpy as np, torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(hf_dir)!r}, trust_remote_code=True).eval()
        assert type(m).__module__.startswith("transformers_modules."), type(m).__module__
        ids = torch.from_numpy(np.load({str(tmp_path / "ids.npy")!r}))
        with torch.no_grad():
            np.save({str(tmp_path / "logits.npy")!r}, m(ids).logits.numpy())
        loaded = [n for n, mod in sys.modules.items() if mod is not None and n.split(".")[0] in
                  ("jaxllm", "torch_ref", "convert", "jax")]
        assert not loaded, loaded
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    r = subprocess.run([python or sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return np.load(tmp_path / "logits.npy")
