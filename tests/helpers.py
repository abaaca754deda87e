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
