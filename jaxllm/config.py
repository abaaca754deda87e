"""The one model configuration shared by the Flax model, the PyTorch reference and the converter.

Pure Python (standard library only) so that `torch_ref` can use it without JAX and `jaxllm`
without PyTorch. Field names are those of ARCHITECTURE.md and of `config.json` on both sides.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
from typing import Any

MODEL_TYPE = "customllm"


@dataclasses.dataclass(frozen=True)
class LLMConfig:
    """Hyper-parameters of CustomLLM (MLA attention + DeepSeekMoE). Defaults are `seed-973m`."""

    vocab_size: int = 49152
    hidden_size: int = 768
    num_hidden_layers: int = 30
    num_attention_heads: int = 12
    latent_dim: int = 192
    nope_head_dim: int = 32
    rope_head_dim: int = 32
    v_head_dim: int = 64
    intermediate_size: int = 1536
    num_shared_experts: int = 1
    num_routed_experts: int = 7
    num_experts_per_tok: int = 2
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    embedding_dropout: float = 0.1
    lm_head_bias: bool = True
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    router_bias_update_rate: float = 0.001
    router_aux_loss_coef: float = 0.0001
    bos_token_id: int = 0
    eos_token_id: int = 0
    pad_token_id: int = 0

    def __post_init__(self):
        # NumPy numbers (np.int64(64) from an array or a sweep) count as the Python ones they
        # equal, as OptimConfig takes them, and are stored as those (config.json is plain JSON).
        # Bools stay refused where they were: np.bool_ is no `numbers.Real`.
        for name in field_names():
            v = getattr(self, name)
            if type(v) not in (int, float, bool) and isinstance(v, numbers.Real):
                object.__setattr__(self, name, int(v) if isinstance(v, numbers.Integral) else float(v))
        validate(self)

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        """Per-head width of q and k: the no-RoPE half followed by the RoPE half."""
        return self.nope_head_dim + self.rope_head_dim

    # ---- construction and serialisation --------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "LLMConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LLMConfig":
        """Build from a `config.json` dict. Hugging Face bookkeeping keys are ignored; any other
        unknown key is an error (a typo must not silently fall back to a default)."""
        check_known_keys(d)
        fields = field_names()
        if "model_type" in d and d["model_type"] != MODEL_TYPE:
            raise ValueError(f"model_type: expected {MODEL_TYPE!r}, got {d['model_type']!r}")
        return cls(**{k: v for k, v in d.items() if k in fields})

    def preset(self) -> str | None:
        """The name of the preset this config is, or None (a model of its own)."""
        return next((name for name in PRESETS if LLMConfig.from_preset(name) == self), None)

    def differences(self, other: "LLMConfig") -> list[str]:
        """The fields in which `other` differs from this config (empty: the same model)."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [k for k, v in mine.items() if theirs.get(k) != v]

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": MODEL_TYPE, **dataclasses.asdict(self)}

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "LLMConfig":
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ValueError(f"config file not found: {path}") from None
        except OSError as e:  # a directory, no permission, ...
            raise ValueError(f"cannot read config file {path}: {e.strerror or e}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {path} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ValueError(f"config file {path} must hold a JSON object")
        return cls.from_dict(d)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def replace(self, **changes: Any) -> "LLMConfig":
        return dataclasses.replace(self, **changes)


# Keys that Hugging Face writes into config.json next to ours (a whole `to_dict()` too, not only
# `save_pretrained`'s difference from the defaults); they carry no model information read here
# (`quantization_config`: how a quantized load stored the weights; a save of it writes one).
IGNORED_KEYS = frozenset({
    "model_type", "architectures", "auto_map", "transformers_version", "torch_dtype", "dtype",
    "_name_or_path", "return_dict", "output_hidden_states", "output_attentions", "use_cache",
    "is_encoder_decoder", "_attn_implementation_autoset", "chunk_size_feed_forward", "id2label",
    "label2id", "problem_type", "quantization_config",
})


def check_known_keys(d: dict[str, Any]) -> None:
    """ValueError naming the keys of a config.json dict that are neither fields nor Hugging Face
    bookkeeping (`IGNORED_KEYS`): a typo must not silently fall back to a default."""
    unknown = sorted(k for k in d if k not in field_names() and k not in IGNORED_KEYS)
    if unknown:
        raise ValueError(f"unknown config field(s): {', '.join(unknown)}")


def field_names() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(LLMConfig))


_INT_FIELDS_POSITIVE = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "latent_dim",
    "nope_head_dim", "rope_head_dim", "v_head_dim", "intermediate_size", "num_routed_experts",
    "num_experts_per_tok", "max_position_embeddings",
)


def validate(c: LLMConfig) -> None:
    """Raise ValueError naming the first field whose value is invalid or inconsistent."""
    for name in _INT_FIELDS_POSITIVE:
        v = getattr(c, name)
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name} must be an integer, got {v!r}")
        if v <= 0:
            raise ValueError(f"{name} must be positive, got {v}")
    for name in ("num_shared_experts", "bos_token_id", "eos_token_id", "pad_token_id"):
        v = getattr(c, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
    for name in ("rope_theta", "rms_norm_eps", "initializer_range"):
        v = getattr(c, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):  # (NaN too)
            raise ValueError(f"{name} must be a finite positive number, got {v!r}")
    for name in ("router_bias_update_rate", "router_aux_loss_coef"):
        v = getattr(c, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf"):  # (NaN too)
            raise ValueError(f"{name} must be a finite non-negative number, got {v!r}")
    if isinstance(c.embedding_dropout, bool) or not isinstance(c.embedding_dropout, (int, float)) \
            or not 0 <= c.embedding_dropout < 1:
        raise ValueError(f"embedding_dropout must be in [0, 1), got {c.embedding_dropout!r}")
    for name in ("lm_head_bias", "tie_word_embeddings"):
        if not isinstance(getattr(c, name), bool):
            raise ValueError(f"{name} must be true or false, got {getattr(c, name)!r}")
    if c.tie_word_embeddings:
        raise ValueError("tie_word_embeddings: CustomLLM has an untied lm_head; only false is supported")
    if c.rope_head_dim % 2:
        raise ValueError(f"rope_head_dim must be even (rotate-half RoPE), got {c.rope_head_dim}")
    if c.num_experts_per_tok > c.num_routed_experts:
        raise ValueError(
            f"num_experts_per_tok ({c.num_experts_per_tok}) is larger than num_routed_experts "
            f"({c.num_routed_experts})")
    if c.latent_dim > c.hidden_size:
        raise ValueError(f"latent_dim ({c.latent_dim}) must not exceed hidden_size ({c.hidden_size})")
    if c.num_attention_heads * c.v_head_dim != c.hidden_size:
        raise ValueError(
            f"v_head_dim: num_attention_heads x v_head_dim ({c.num_attention_heads} x "
            f"{c.v_head_dim}) must equal hidden_size ({c.hidden_size})")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(c, name) >= c.vocab_size:
            raise ValueError(f"{name} ({getattr(c, name)}) must be below vocab_size ({c.vocab_size})")


# The presets change sizes, never the structure (1 shared + 7 routed experts, top-2, MLA).
PRESETS: dict[str, dict[str, Any]] = {
    # The seed document's model: 973,122,048 trainable parameters.
    "seed-973m": {},
    # The CPU demo: ~15M parameters, a 4,096-token vocabulary built from an embedded corpus.
    "small": dict(
        vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
        latent_dim=64, nope_head_dim=32, rope_head_dim=32, v_head_dim=64,
        intermediate_size=512, max_position_embeddings=512,
    ),
    # Tests: a train step in well under a second.
    "tiny": dict(
        vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        latent_dim=16, nope_head_dim=8, rope_head_dim=8, v_head_dim=16,
        intermediate_size=128, max_position_embeddings=128,
    ),
}


def count_params(config: LLMConfig) -> int:
    """Trainable parameters, from the sizes alone (nothing is allocated). `router_bias` is state,
    not a parameter, and is not counted."""
    c = config
    h, lat, heads = c.hidden_size, c.latent_dim, c.num_attention_heads
    attn = (
        2 * h * lat                           # q_proj_d, kv_proj_d
        + lat * heads * c.nope_head_dim * 2   # q_proj_u, k_proj_u
        + lat * heads * c.v_head_dim          # v_proj_u
        + h * heads * c.rope_head_dim         # rope_k (reads x)
        + lat * heads * c.rope_head_dim       # rope_q (reads c_q)
        + heads * c.v_head_dim * h            # o_proj
    )
    experts = (c.num_shared_experts + c.num_routed_experts) * 3 * h * c.intermediate_size
    router = c.num_routed_experts * h
    norms = 2 * h
    layer = attn + experts + router + norms
    embed = c.vocab_size * h + c.max_position_embeddings * h
    head = c.vocab_size * h + (c.vocab_size if c.lm_head_bias else 0)
    return embed + c.num_hidden_layers * layer + head
