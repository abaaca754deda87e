"""Hugging Face configuration of CustomLLM.

The field names, defaults, presets and validation live in one place, `jaxllm/config.py` (pure
Python); this class only wraps them in a `PretrainedConfig`. When a checkpoint is exported with
its modeling code, the converter ships that module beside this one and rewrites the import below.
"""

from transformers import PretrainedConfig

from jaxllm.config import MODEL_TYPE, LLMConfig, check_known_keys, field_names

_DEFAULTS = LLMConfig().to_dict()


class CustomLLMConfig(PretrainedConfig):
    model_type = MODEL_TYPE
    # Outputs a Trainer leaves out of its predictions: the cache (named `cache` from transformers
    # 5.24 on) and the MoE bookkeeping, so that `predict()` / `compute_metrics` get the logits alone.
    keys_to_ignore_at_inference = ["past_key_values", "cache", "aux_loss", "lm_loss", "expert_counts"]

    def __init__(self, **kwargs):
        ours = {k: kwargs.pop(k, _DEFAULTS[k]) for k in field_names()}
        # validates (a ValueError naming the field), and gives NumPy numbers as Python ones
        ours = LLMConfig(**ours).to_dict()
        ours.pop("model_type")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings"):
            kwargs[name] = ours.pop(name)
        for k, v in ours.items():
            setattr(self, k, v)
        # Hugging Face's convention (Llama's config): a plain call outside training returns its cache.
        self.use_cache = kwargs.pop("use_cache", True)
        super().__init__(**kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """A config.json's dict (what `from_pretrained` reads), refused with an unknown key as
        `LLMConfig.from_dict` refuses it: a misspelt field must not fall back to its default (a
        `num_hiden_layers` loaded 30 layers, most of them untrained)."""
        check_known_keys(config_dict)
        return super().from_dict(config_dict, **kwargs)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "CustomLLMConfig":
        return cls.from_llm_config(LLMConfig.from_preset(name, **overrides))

    @classmethod
    def from_llm_config(cls, config: LLMConfig, **kwargs) -> "CustomLLMConfig":
        d = config.to_dict()
        d.pop("model_type")
        return cls(**d, **kwargs)

    def to_llm_config(self) -> LLMConfig:
        return LLMConfig(**{k: getattr(self, k) for k in field_names()})

    @property
    def qk_head_dim(self) -> int:
        return self.nope_head_dim + self.rope_head_dim
