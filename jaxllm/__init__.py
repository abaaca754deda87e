"""jaxllm: a JAX/Flax (NNX) training stack for CustomLLM (MLA + DeepSeekMoE).

`jaxllm.config` is pure Python; everything that needs JAX is imported lazily, so that
`from jaxllm.config import LLMConfig` works where JAX is not installed (the PyTorch side).
"""

from jaxllm.config import PRESETS, LLMConfig, count_params

__all__ = ["LLMConfig", "PRESETS", "count_params", "CustomLLM", "create_model", "load", "load_tokenizer"]

_LAZY = {
    "CustomLLM": "jaxllm.model",
    "create_model": "jaxllm.model",
    "load": "jaxllm.checkpoint",
    "load_tokenizer": "jaxllm.checkpoint",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jaxllm' has no attribute {name!r}")
