"""PyTorch / Hugging Face reference implementation of CustomLLM. Imports without JAX."""

from transformers import AutoConfig, AutoModelForCausalLM

from torch_ref.configuration_customllm import CustomLLMConfig
from torch_ref.modeling_customllm import CustomLLM, CustomLLMOutput

AutoConfig.register(CustomLLMConfig.model_type, CustomLLMConfig, exist_ok=True)
AutoModelForCausalLM.register(CustomLLMConfig, CustomLLM, exist_ok=True)

__all__ = ["CustomLLMConfig", "CustomLLM", "CustomLLMOutput"]
