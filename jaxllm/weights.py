"""Moving model weights in and out of the Flax model as flat `{path tuple: array}` dicts, the
layout that `convert/mapping.py` maps to PyTorch names."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.model import RouterBias

WEIGHTS = (nnx.Param, RouterBias)


def flatten(tree: dict, prefix=()) -> dict[tuple[str, ...], object]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, prefix + (str(k),)))
        else:
            out[prefix + (str(k),)] = v
    return out


def unflatten(flat: dict[tuple[str, ...], object]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


def get_weights(model) -> dict[tuple[str, ...], np.ndarray]:
    """Parameters and router biases as host numpy arrays, keyed by path."""
    pure = nnx.to_pure_dict(nnx.state(model, WEIGHTS))
    return {k: np.asarray(jax.device_get(v)) for k, v in flatten(pure).items()}


def set_weights(model, flat: dict[tuple[str, ...], np.ndarray]) -> None:
    """Load a flat dict into the model in place; every path must exist with the same shape.
    Values keep the dtype of the model's variables."""
    state = nnx.state(model, WEIGHTS)
    have = flatten(nnx.to_pure_dict(state))
    missing = sorted(set(have) - set(flat))
    extra = sorted(set(flat) - set(have))
    if missing or extra:
        raise ValueError(f"weights do not match the model: missing {['/'.join(p) for p in missing[:3]]}, "
                         f"unexpected {['/'.join(p) for p in extra[:3]]}")
    new = {}
    for path, cur in have.items():
        v = flat[path]
        if tuple(v.shape) != tuple(cur.shape):
            raise ValueError(f"weight {'/'.join(path)} has shape {tuple(v.shape)}, the model expects {tuple(cur.shape)}")
        new[path] = jnp.asarray(v, dtype=cur.dtype)
    nnx.replace_by_pure_dict(state, unflatten(new))
    nnx.update(model, state)
