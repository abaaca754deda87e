"""The one map between the Flax layout and the canonical PyTorch `state_dict` names.

Flax side: a flat dict from key tuples (the path in `nnx.to_pure_dict(nnx.state(model))`) to arrays,
layers stacked on axis 0, linear kernels `[in, out]`, experts stacked `[L, E, in, out]`.
PyTorch side: `{name: array}` with ARCHITECTURE.md's names, Linear weights `[out, in]`.
Only numpy is needed here; the direction functions are exact (transposes and slicing only),
so a round trip is bit-exact in any dtype.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np

from jaxllm.config import LLMConfig


class Entry(NamedTuple):
    torch_name: str  # may contain {i} (layer) and {e} (expert)
    flax_path: tuple[str, ...]
    transpose: bool  # a Linear weight: torch [out, in] <-> flax [in, out]
    per_layer: bool
    experts: str | None = None  # "routed" / "shared": stacked expert axis after the layer axis


_ATTN = ("kv_proj_d", "q_proj_d", "k_proj_u", "v_proj_u", "q_proj_u", "rope_k", "rope_q", "o_proj")
_PROJ = ("gate_proj", "up_proj", "down_proj")


def entries(config: LLMConfig) -> list[Entry]:
    """Every tensor of the model, once. `router_bias` is included (it is model state)."""
    out = [
        Entry("token_embeddings.weight", ("token_embeddings",), False, False),
        Entry("position_embeddings.weight", ("position_embeddings",), False, False),
    ]
    for name in _ATTN:
        out.append(Entry(f"decoder_layers.{{i}}.self_attn.{name}.weight",
                         ("decoder_layers", "self_attn", name, "kernel"), True, True))
    kinds = (("shared", "shared_experts"), ("routed", "routed_experts")) if config.num_shared_experts \
        else (("routed", "routed_experts"),)
    for kind, module in kinds:
        for proj in _PROJ:
            out.append(Entry(f"decoder_layers.{{i}}.mlp.moe.{module}.{{e}}.{proj}.weight",
                             ("decoder_layers", "mlp", module, proj), True, True, kind))
    out += [
        Entry("decoder_layers.{i}.mlp.moe.router.weight", ("decoder_layers", "mlp", "router", "kernel"), True, True),
        Entry("decoder_layers.{i}.mlp.moe.router_bias", ("decoder_layers", "mlp", "router_bias"), False, True),
        Entry("decoder_layers.{i}.input_norm.weight", ("decoder_layers", "input_norm", "weight"), False, True),
        Entry("decoder_layers.{i}.post_attn_norm.weight", ("decoder_layers", "post_attn_norm", "weight"), False, True),
        Entry("lm_head.weight", ("lm_head", "kernel"), True, False),
    ]
    if config.lm_head_bias:
        out.append(Entry("lm_head.bias", ("lm_head", "bias"), False, False))
    return out


def _expand(entry: Entry, config: LLMConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(torch name, index into the stacked flax array) for each torch tensor of an entry."""
    layers = range(config.num_hidden_layers) if entry.per_layer else [None]
    n_exp = {"routed": config.num_routed_experts, "shared": config.num_shared_experts}.get(entry.experts)
    for i in layers:
        lead = () if i is None else (i,)
        if n_exp is None:
            yield entry.torch_name.format(i=i), lead
        else:
            for e in range(n_exp):
                yield entry.torch_name.format(i=i, e=e), lead + (e,)


def torch_names(config: LLMConfig) -> list[str]:
    return [name for entry in entries(config) for name, _ in _expand(entry, config)]


def flax_to_torch(flat: dict[tuple[str, ...], np.ndarray], config: LLMConfig, *,
                  consume: bool = False) -> dict[str, np.ndarray]:
    """Flax flat dict -> PyTorch state dict (numpy arrays, contiguous). `consume=True` deletes each
    Flax array from `flat` as soon as it is converted, so that a large model is not held twice
    (the converter's peak memory)."""
    _check_keys(set(flat), {e.flax_path for e in entries(config)}, "Flax")
    sd = {}
    for entry in entries(config):
        arr = np.asarray(flat.pop(entry.flax_path) if consume else flat[entry.flax_path])
        for name, idx in _expand(entry, config):
            t = arr[idx]
            sd[name] = np.ascontiguousarray(t.T if entry.transpose else t)
    return sd


def torch_to_flax(sd: dict[str, np.ndarray], config: LLMConfig) -> dict[tuple[str, ...], np.ndarray]:
    """PyTorch state dict (numpy arrays) -> Flax flat dict, stacking layers and experts."""
    _check_keys(set(sd), set(torch_names(config)), "PyTorch")
    flat = {}
    for entry in entries(config):
        parts = [(idx, np.asarray(sd[name])) for name, idx in _expand(entry, config)]
        first = parts[0][1].T if entry.transpose else parts[0][1]
        lead = tuple(d + 1 for d in parts[-1][0])  # stacked sizes (last index + 1)
        out = np.empty(lead + first.shape, dtype=first.dtype)
        for idx, t in parts:
            t = t.T if entry.transpose else t
            if t.shape != first.shape or t.dtype != first.dtype:
                raise ValueError(f"tensor {_expand_name(entry, idx)}: shape {t.shape} {t.dtype}, expected "
                                 f"{first.shape} {first.dtype}")
            out[idx] = t
        flat[entry.flax_path] = out
    return flat


def _expand_name(entry, idx):
    return entry.torch_name.format(i=idx[0] if idx else None, e=idx[1] if len(idx) > 1 else None)


def expected_torch_shapes(config: LLMConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor of the PyTorch checkpoint, from the config alone."""
    c = config
    D, lat, H, F = c.hidden_size, c.latent_dim, c.num_attention_heads, c.intermediate_size
    attn = {"kv_proj_d": (lat, D), "q_proj_d": (lat, D), "k_proj_u": (H * c.nope_head_dim, lat),
            "v_proj_u": (H * c.v_head_dim, lat), "q_proj_u": (H * c.nope_head_dim, lat),
            "rope_k": (H * c.rope_head_dim, D), "rope_q": (H * c.rope_head_dim, lat), "o_proj": (D, H * c.v_head_dim)}
    proj = {"gate_proj": (F, D), "up_proj": (F, D), "down_proj": (D, F)}
    shapes = {}
    for name in torch_names(c):
        leaf = name.split(".")
        if name == "token_embeddings.weight" or name == "lm_head.weight":
            s = (c.vocab_size, D)
        elif name == "position_embeddings.weight":
            s = (c.max_position_embeddings, D)
        elif name == "lm_head.bias":
            s = (c.vocab_size,)
        elif leaf[-2] in attn:
            s = attn[leaf[-2]]
        elif leaf[-2] in proj:
            s = proj[leaf[-2]]
        elif leaf[-2] == "router":
            s = (c.num_routed_experts, D)
        elif leaf[-1] == "router_bias":
            s = (c.num_routed_experts,)
        else:  # norms
            s = (D,)
        shapes[name] = s
    return shapes


def check_torch_state(sd_shapes: dict[str, tuple[int, ...]], config: LLMConfig) -> None:
    """Raise ValueError naming the first missing, unexpected or mis-shaped tensor."""
    expected = expected_torch_shapes(config)
    _check_keys(set(sd_shapes), set(expected), "PyTorch")
    for name, shape in expected.items():
        if tuple(sd_shapes[name]) != shape:
            raise ValueError(f"tensor {name} has shape {tuple(sd_shapes[name])}, the config expects {shape} "
                             "(a checkpoint of another model size?)")


def _check_keys(have: set, want: set, side: str) -> None:
    missing, unexpected = sorted(want - have, key=str), sorted(have - want, key=str)
    if missing:
        raise ValueError(f"{side} weights: missing tensor {_fmt(missing[0])}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if unexpected:
        raise ValueError(f"{side} weights: unexpected tensor {_fmt(unexpected[0])}"
                         + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))


def _fmt(key) -> str:
    return "/".join(key) if isinstance(key, tuple) else str(key)
