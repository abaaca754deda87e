"""PyTorch reference of CustomLLM: Multi-Head Latent Attention + DeepSeekMoE (ARCHITECTURE.md).

A Hugging Face `PreTrainedModel` whose parameter names are the checkpoint keys. It imports and
runs without JAX; the converter ships this file (with its configuration) next to exported weights
so that `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` works anywhere.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init  # (transformers 5: init functions that keep loaded weights)
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer  # recomputed in the backward pass
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .configuration_customllm import CustomLLMConfig

# The Trainer's label smoothing shifts the labels only for the causal LMs transformers lists by
# name: unlisted, CustomLLM was trained to predict each token from itself (the list's own lookup of
# a model type goes through `AutoModelForCausalLM.register` or `auto_map` first, so this changes no
# loading).
MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault(CustomLLMConfig.model_type, "CustomLLM")

# The code a saved directory ships, so that `AutoModelForCausalLM.from_pretrained(dir,
# trust_remote_code=True)` loads it where this project is not installed (`remote_code_sources`).
AUTO_MAP = {
    "AutoConfig": "configuration_customllm.CustomLLMConfig",
    "AutoModelForCausalLM": "modeling_customllm.CustomLLM",
}
CORE_MODULE = "customllm_config_core"  # jaxllm/config.py, as shipped
_NONE = object()


def remote_code_sources() -> dict[str, str]:
    """{file name: source} of the code a saved directory ships: this file, the configuration's, and
    the module the configuration imports its fields from (`jaxllm/config.py`), shipped as
    `customllm_config_core.py` with that import made relative (transformers copies relative imports
    of remote code along with it). Read from the loaded modules' files: this project's, or those of
    a directory loaded with `trust_remote_code`, which a save then ships again."""
    config_module = sys.modules[CustomLLMConfig.__module__]
    files = {}
    for name, module in (("configuration_customllm.py", config_module), ("modeling_customllm.py", sys.modules[__name__]),
                         (f"{CORE_MODULE}.py", sys.modules[config_module.LLMConfig.__module__])):
        with open(module.__file__, encoding="utf-8") as f:
            files[name] = f.read()
    files["configuration_customllm.py"] = re.sub(r"^from jaxllm\.config import ", f"from .{CORE_MODULE} import ",
                                                 files["configuration_customllm.py"], flags=re.M)
    return files

# transformers 5.24 renamed the outputs' `past_key_values` to `cache`: fill whichever this version has.
_CACHE_FIELD = "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"


@dataclass
class CustomLLMOutput(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus the MoE bookkeeping: `aux_loss` (the balance loss summed over
    layers, before `router_aux_loss_coef`), `lm_loss` (cross-entropy alone) and `expert_counts`
    ([layers, routed experts]: (token, slot) assignments of this forward pass)."""

    aux_loss: torch.FloatTensor | None = None
    lm_loss: torch.FloatTensor | None = None
    expert_counts: torch.LongTensor | None = None


class CustomRMSNorm(nn.Module):
    """`w * x / sqrt(mean(x^2) + eps)`, computed in float32 and cast back to the input dtype."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x32).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE tables: `inv_freq[i] = theta^(-2i/d)`, cos/sin of `concat(freqs, freqs)`."""

    def __init__(self, dim: int, theta: float):
        super().__init__()
        self.dim, self.theta = dim, theta
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self) -> torch.Tensor:
        return 1.0 / (self.theta ** (torch.arange(0, self.dim, 2, dtype=torch.float32) / self.dim))

    def _apply(self, fn, recurse=True):
        # `model.to(torch.bfloat16)` / `.half()` cast every floating buffer; the tables stay float32
        # (rounded frequencies would move the rotation by up to 0.36 at position 2,047).
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32 and self.inv_freq.device.type != "meta":
            self.inv_freq = self.compute_inv_freq().to(self.inv_freq.device)
        return self

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids.float()[..., None] * self.inv_freq.float()  # [B, T, d/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [B, T, d]
        return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, d]; cos, sin: [B, T, d]. Rotation in float32, result in x's dtype."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x32 = x.float()
    return (x32 * cos + rotate_half(x32) * sin).to(x.dtype)


def eager_attention(q, k, v, scale: float, attn_mask: torch.Tensor | None):
    """Attention written out, as `config.attn_implementation="eager"` asks (and
    `output_attentions=True`, whose weights SDPA does not return): q `[B, n, T, d]`, k and v `[B, n,
    S, .]`, `attn_mask` boolean `[B, 1, T, S]` (True: may attend) or None (causal over the last T
    keys). The softmax runs in float32. Returns the output `[B, n, T, dv]` and the weights `[B, n, T, S]`."""
    T, S = q.shape[-2], k.shape[-2]
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if attn_mask is None:
        attn_mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    scores = scores.masked_fill(~attn_mask, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, v), weights


class MultiHeadLatentAttention(nn.Module):
    """MLA: queries and keys/values pass through a `latent_dim` bottleneck; each head is
    `[nope | rope]`. With a cache, only `c_kv` and the rotated `k_rope` are stored per token."""

    def __init__(self, config: CustomLLMConfig, layer_idx: int):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.config = c  # read at each call: `_attn_implementation` ("sdpa" or "eager")
        self.num_heads = c.num_attention_heads
        self.nope_head_dim, self.rope_head_dim, self.v_head_dim = c.nope_head_dim, c.rope_head_dim, c.v_head_dim
        self.latent_dim = c.latent_dim
        self.scale = (c.nope_head_dim + c.rope_head_dim) ** -0.5
        h, lat, n = c.hidden_size, c.latent_dim, c.num_attention_heads
        # Declaration order = the seed document's printed module tree.
        self.kv_proj_d = nn.Linear(h, lat, bias=False)
        self.q_proj_d = nn.Linear(h, lat, bias=False)
        self.k_proj_u = nn.Linear(lat, n * c.nope_head_dim, bias=False)
        self.v_proj_u = nn.Linear(lat, n * c.v_head_dim, bias=False)
        self.q_proj_u = nn.Linear(lat, n * c.nope_head_dim, bias=False)
        self.rope_k = nn.Linear(h, n * c.rope_head_dim, bias=False)
        self.rope_q = nn.Linear(lat, n * c.rope_head_dim, bias=False)
        self.o_proj = nn.Linear(n * c.v_head_dim, h, bias=False)
        self.rotary_emb = RotaryEmbedding(c.rope_head_dim, c.rope_theta)

    def forward(self, x, position_ids, cache: Cache | None = None, attn_mask: torch.Tensor | None = None,
                output_attentions: bool = False):
        """The attention's output `[B, T, hidden]`; with `output_attentions`, also its weights."""
        B, T, _ = x.shape
        n = self.num_heads
        c_q = self.q_proj_d(x)  # [B, T, latent]
        c_kv = self.kv_proj_d(x)  # [B, T, latent]
        cos, sin = self.rotary_emb(position_ids)
        q_nope = self.q_proj_u(c_q).view(B, T, n, self.nope_head_dim)
        q_rope = apply_rope(self.rope_q(c_q).view(B, T, n, self.rope_head_dim), cos, sin)
        k_rope = apply_rope(self.rope_k(x).view(B, T, n, self.rope_head_dim), cos, sin)
        if cache is not None:
            # The latent cache: c_kv as one "head" [B, 1, S, latent], k_rope as [B, n, S, rope].
            c_kv, k_rope_t = cache.update(c_kv[:, None], k_rope.transpose(1, 2), self.layer_idx)
            c_kv, k_rope = c_kv[:, 0], k_rope_t.transpose(1, 2)
        S = c_kv.shape[1]
        k_nope = self.k_proj_u(c_kv).view(B, S, n, self.nope_head_dim)
        v = self.v_proj_u(c_kv).view(B, S, n, self.v_head_dim)
        q = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)  # [B, n, T, dqk]
        k = torch.cat([k_nope, k_rope], dim=-1).transpose(1, 2)  # [B, n, S, dqk]
        v = v.transpose(1, 2)  # [B, n, S, dv]
        weights = None
        if output_attentions or getattr(self.config, "_attn_implementation", None) == "eager":
            o, weights = eager_attention(q, k, v, self.scale, attn_mask)
        elif attn_mask is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, scale=self.scale)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)
        out = self.o_proj(o.transpose(1, 2).reshape(B, T, n * self.v_head_dim))
        return (out, weights) if output_attentions else out


class DeepSeekExpertLayer(nn.Module):
    """SwiGLU expert: `down_proj(silu(gate_proj(x)) * up_proj(x))`."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def route(scores: torch.Tensor, router_bias: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of `scores + router_bias` (ties to the lower expert index, via a stable sort);
    weights are the chosen *unbiased* scores, normalised to sum to 1. scores: [N, E] float32."""
    chosen = torch.sort(scores + router_bias, dim=-1, descending=True, stable=True).indices[:, :k]
    w = scores.gather(-1, chosen)
    return chosen, w / w.sum(-1, keepdim=True)


def balance_loss(scores: torch.Tensor, chosen: torch.Tensor, num_experts: int) -> torch.Tensor:
    """DeepSeek-V3 sequence-wise balance loss, one value per sequence.
    scores: [B, T, E] sigmoid affinities (float32); chosen: [B, T, k]."""
    B, T, k = chosen.shape
    counts = F.one_hot(chosen, num_experts).sum(dim=(1, 2)).float()  # [B, E]
    f = counts * (num_experts / (k * T))
    p = (scores / scores.sum(-1, keepdim=True)).mean(dim=1)  # [B, E]
    return (f * p).sum(-1)


class RouterLinear(nn.Linear):
    """The router's `nn.Linear` (printed as one, the seed's tree), whose product runs in float32 with
    autocast off: its input and weight are upcast. Computed in its own `forward`, not by reading
    `router.weight` from outside, so that hooks that load a module's weights as it is called (an
    offloading `device_map`, where the weight otherwise stays on the meta device) load it."""

    def _get_name(self):
        return "Linear"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.weight.float())


class DeepSeekMoE(nn.Module):
    """1 always-on shared expert + top-k of the routed experts by sigmoid affinity. The routed
    experts run only on the tokens routed to them (dropless). `router_bias` is a persistent buffer
    that chooses experts but never weights them (auxiliary-loss-free balancing)."""

    def __init__(self, config: CustomLLMConfig):
        super().__init__()
        c = config
        self.num_experts, self.top_k = c.num_routed_experts, c.num_experts_per_tok
        self.shared_experts = nn.ModuleList(
            [DeepSeekExpertLayer(c.hidden_size, c.intermediate_size) for _ in range(c.num_shared_experts)])
        self.routed_experts = nn.ModuleList(
            [DeepSeekExpertLayer(c.hidden_size, c.intermediate_size) for _ in range(c.num_routed_experts)])
        self.router = RouterLinear(c.hidden_size, c.num_routed_experts, bias=False)
        self.register_buffer("router_bias", torch.zeros(c.num_routed_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        # `router_bias` is float32 state (ARCHITECTURE.md): a cast of the model (`.to(torch.bfloat16)`,
        # `.half()`) moves it but keeps its dtype and values.
        bias = self.router_bias
        super()._apply(fn, recurse)
        if self.router_bias.dtype != bias.dtype:
            self.router_bias = bias.to(self.router_bias.device)
        return self

    def forward(self, x: torch.Tensor):
        B, T, D = x.shape
        xf = x.reshape(B * T, D)
        out = torch.zeros_like(xf)
        for expert in self.shared_experts:
            out = out + expert(xf)
        scores = torch.sigmoid(self.router(xf))  # [N, E], float32 (also under autocast)
        chosen, w = route(scores, self.router_bias.float(), self.top_k)
        for e, expert in enumerate(self.routed_experts):
            tok, slot = torch.nonzero(chosen == e, as_tuple=True)
            # While gradients are recorded, an expert no token chose still runs (on no rows), so
            # that every parameter is in the graph and gets a (zero) gradient: DDP then needs no
            # `find_unused_parameters` search, and AdamW updates it as optax does a zero gradient.
            if tok.numel() == 0 and not torch.is_grad_enabled():
                continue
            y = expert(xf[tok]) * w[tok, slot, None].to(xf.dtype)
            out = out.index_add(0, tok, y)
        aux = balance_loss(scores.view(B, T, -1), chosen.view(B, T, -1), self.num_experts)
        counts = torch.bincount(chosen.flatten(), minlength=self.num_experts)
        return out.view(B, T, D), aux, counts


class LlamaMLP(nn.Module):
    """The seed's name for the feed-forward block; it holds the DeepSeekMoE."""

    def __init__(self, config: CustomLLMConfig):
        super().__init__()
        self.moe = DeepSeekMoE(config)

    def forward(self, x):
        return self.moe(x)


class DecoderLayer(GradientCheckpointingLayer):
    """With gradient checkpointing on (`model.activation_checkpointing_enable()`, the Trainer's
    `gradient_checkpointing=True`), a training forward keeps only the layer's input and recomputes
    the layer in the backward pass. The recomputation routes the same tokens to the same experts
    (the same input and `router_bias`; no dropout inside a layer), and `aux` / `counts` come from
    the first forward only."""

    def __init__(self, config: CustomLLMConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MultiHeadLatentAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_norm = CustomRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attn_norm = CustomRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, h, position_ids, cache=None, attn_mask=None, output_attentions=False):
        """(output, balance loss, expert counts), and the attention weights with `output_attentions`."""
        attn = self.self_attn(self.input_norm(h), position_ids, cache, attn_mask, output_attentions)
        attn, weights = attn if output_attentions else (attn, None)
        h = h + attn
        moe_out, aux, counts = self.mlp(self.post_attn_norm(h))
        return (h + moe_out, aux, counts) + ((weights,) if output_attentions else ())


class CustomLLMPreTrainedModel(PreTrainedModel):
    config_class = CustomLLMConfig
    config: CustomLLMConfig
    base_model_prefix = ""
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True
    _can_compile_fullgraph = False

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        # transformers guesses from the module's source whether `set_attn_implementation` can work,
        # and guessed no: the attention reads `config._attn_implementation` at every call.
        return True

    def save_pretrained(self, save_directory, is_main_process: bool = True, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, with the modeling code and `auto_map` (as the
        converter exports and the trainer saves): the directory loads with
        `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` where this project is
        not installed. A model loaded from an exported directory saved its `auto_map` without the
        code, which such a load then missed. The model's own config is left as it was.
        `push_to_hub=True` is refused: it uploads before the code is written (`push_to_hub()`
        saves, code included, then uploads)."""
        if kwargs.get("push_to_hub"):
            raise ValueError("save_pretrained(push_to_hub=True) would upload the weights without their modeling code: "
                             "call model.push_to_hub(repo_id), or upload the saved directory")
        had = self.config.__dict__.get("auto_map", _NONE)
        self.config.auto_map = dict(AUTO_MAP)
        try:
            super().save_pretrained(save_directory, is_main_process, *args, **kwargs)
        finally:
            if had is _NONE:
                del self.config.auto_map
            else:
                self.config.auto_map = had
        if is_main_process:
            for name, text in remote_code_sources().items():
                with open(os.path.join(save_directory, name), "w", encoding="utf-8") as f:
                    f.write(text)

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, CustomRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, DeepSeekMoE):
            init.zeros_(module.router_bias)
        elif isinstance(module, RotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq())


class CustomLLM(CustomLLMPreTrainedModel, GenerationMixin):
    """CustomLLM: learned position + token embeddings, MLA + DeepSeekMoE decoder layers, no final
    norm, an untied `lm_head` with bias. `forward(input_ids, labels=input_ids)` gives the shifted
    causal-LM loss plus `router_aux_loss_coef` x the balance loss (given a Trainer's
    `num_items_in_batch`, both as this micro-batch's part of the optimizer step's loss)."""

    def __init__(self, config: CustomLLMConfig):
        # Validated again: `from_pretrained(dir, num_experts_per_tok=9)` and attribute changes
        # bypass the config's own check (top-9 of 7 experts ran as top-7).
        config.to_llm_config()
        super().__init__(config)
        c = config
        self.token_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.dropout = nn.Dropout(c.embedding_dropout)
        self.decoder_layers = nn.ModuleList([DecoderLayer(c, i) for i in range(c.num_hidden_layers)])
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=c.lm_head_bias)
        self.post_init()
        # Generation stops at the end of the position table unless told otherwise: `max_length`
        # (prompt + new tokens) = max_position_embeddings, saved in generation_config.json. Without
        # it a plain `pipeline("text-generation")` asked for its default 256 new tokens, which
        # `tiny`'s 128 positions refuse (Llama 2's generation_config.json sets its 4,096 alike).
        if self.generation_config is not None and self.generation_config.max_length is None:
            self.generation_config.max_length = c.max_position_embeddings
        # transformers derives `loss_type` from the class name and finds none for "CustomLLM"; a
        # `Trainer` then counts `num_items_in_batch` over every label instead of the shifted
        # `labels[..., 1:]` this loss divides by (loss and gradients scaled by (T-1)/T).
        self.loss_type = "ForCausalLM"

    @classmethod
    def from_state_dict(cls, config: CustomLLMConfig, state_dict: dict[str, torch.Tensor]) -> "CustomLLM":
        """Build a model around existing tensors without allocating or initialising weights first
        (fast for large models). Missing or unexpected keys raise."""
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(state_dict, strict=True, assign=True)
        for module in model.modules():
            if isinstance(module, RotaryEmbedding):
                module.inv_freq = module.compute_inv_freq()
        return model.eval()

    def get_input_embeddings(self):
        return self.token_embeddings

    def set_input_embeddings(self, value):
        self.token_embeddings = value

    def get_output_embeddings(self):
        return self.lm_head

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        logits_to_keep: int = 0,
        past_key_values: Cache | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        **kwargs,
    ) -> CustomLLMOutput | tuple:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give input_ids or inputs_embeds (the token embeddings, [batch, tokens, hidden]), "
                             "one of them")
        self._check_inputs(input_ids, inputs_embeds, labels)
        tokens = input_ids if input_ids is not None else inputs_embeds
        cache = cache if cache is not None else past_key_values
        if cache is not None and cache.is_compileable:
            # A static cache preallocates per-head keys and values; the latent (c_kv as one
            # "head", k_rope) has other shapes, so only growing caches (DynamicCache) fit.
            raise ValueError("cache: a static (compileable) cache is not supported; CustomLLM keeps MLA's latent "
                             "cache in a DynamicCache (the default of generate())")
        B, T = tokens.shape[:2]
        if use_cache is None:  # as Hugging Face's models: the config's setting, never while training
            use_cache = getattr(self.config, "use_cache", True) and not self.training
        if use_cache and cache is None:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        if past + T > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {past + T} exceeds max_position_embeddings "
                f"({self.config.max_position_embeddings})")
        attn_mask = None
        if position_ids is None:
            if attention_mask is not None and (attention_mask == 0).any():
                # Left padding: real tokens count positions from 0.
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            else:
                position_ids = torch.arange(past, past + T, device=tokens.device)[None].expand(B, T)
        if (attention_mask is not None and (attention_mask == 0).any()) or (past > 0 and T > 1):
            attn_mask = self._attention_mask(attention_mask, B, T, past, tokens.device)

        # `inputs_embeds` stand for the token embeddings only: the learned positions are added here.
        h = (self.token_embeddings(input_ids) if inputs_embeds is None else inputs_embeds) \
            + self.position_embeddings(position_ids)
        h = self.dropout(h)
        aux_total = h.new_zeros((), dtype=torch.float32)
        all_counts = []
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        hidden_states = [h] if output_hidden_states else None  # the embeddings, then each layer's output
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        attentions = [] if output_attentions else None  # each layer's [B, heads, T, S] weights
        for layer in self.decoder_layers:
            # h positional (a reentrant checkpoint passes gradients through positional inputs only),
            # cache by name (a checkpointed layer drops it rather than fill it twice).
            if output_attentions:
                h, aux, counts, weights = layer(h, position_ids, cache=cache, attn_mask=attn_mask,
                                                output_attentions=True)
                attentions.append(weights)
            else:
                h, aux, counts = layer(h, position_ids, cache=cache, attn_mask=attn_mask)
            # `.to()`: under a `device_map` the layers live on several GPUs (a no-op on one device).
            aux_total = aux_total + aux.mean().to(aux_total.device)
            all_counts.append(counts.to(aux_total.device))
            if hidden_states is not None:
                hidden_states.append(h)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h).float()

        loss = lm_loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
            shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
            ce_sum = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
            n_valid = (shift_labels != -100).sum()
            denom = num_items_in_batch if num_items_in_batch is not None else n_valid
            if isinstance(denom, torch.Tensor):
                denom = denom.to(ce_sum.device)
            lm_loss = ce_sum / denom
            # `num_items_in_batch` (a Trainer's token count of the whole optimizer step, over its
            # micro-batches and processes) makes this micro-batch one part of the step's loss: its
            # balance loss is weighted by its share of the step's tokens, so that the step sums to
            # their token-weighted mean instead of one full balance loss per micro-batch.
            loss = lm_loss + self.config.router_aux_loss_coef * aux_total.to(lm_loss.device) * (n_valid / denom)
        out = CustomLLMOutput(
            loss=loss, logits=logits, **{_CACHE_FIELD: cache if use_cache else None},
            hidden_states=tuple(hidden_states) if hidden_states is not None else None,
            attentions=tuple(attentions) if attentions is not None else None,
            aux_loss=aux_total, lm_loss=lm_loss, expert_counts=torch.stack(all_counts))
        return out if (return_dict if return_dict is not None else self.config.return_dict) else out.to_tuple()

    def _check_inputs(self, input_ids, inputs_embeds, labels) -> None:
        """ValueError naming what is wrong with `input_ids`, `inputs_embeds` or `labels`, which
        otherwise failed deep inside: a 1-D `input_ids` with "not enough values to unpack", float or
        bool ids in the embedding's lookup, an empty batch or no tokens in a reshape (the same
        refusals as the Flax model's). As Hugging Face's causal LMs (Llama, GPT-2 fail on it too), a
        single sequence is not taken as a batch of one: it needs its batch axis (`ids[None]`)."""

        def got(t):
            return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}" if isinstance(t, torch.Tensor) \
                else type(t).__name__

        if input_ids is not None:
            if not (isinstance(input_ids, torch.Tensor) and input_ids.dtype in (torch.long, torch.int32)
                    and input_ids.dim() == 2 and input_ids.numel() > 0):
                one = isinstance(input_ids, torch.Tensor) and input_ids.dim() == 1 and input_ids.numel() > 0
                raise ValueError("input_ids must be an integer tensor (int64 or int32) [batch, seq] of at least one "
                                 f"token, got {got(input_ids)}" + (" (one sequence: give input_ids[None])" if one else ""))
            shape = list(input_ids.shape)
        else:
            hidden = self.config.hidden_size
            if not (isinstance(inputs_embeds, torch.Tensor) and inputs_embeds.is_floating_point()
                    and inputs_embeds.dim() == 3 and inputs_embeds.shape[-1] == hidden and inputs_embeds.numel() > 0):
                raise ValueError(f"inputs_embeds must be a floating-point tensor [batch, seq, hidden_size={hidden}] "
                                 f"of at least one token, got {got(inputs_embeds)}")
            shape = list(inputs_embeds.shape[:2])
        if labels is not None and not (isinstance(labels, torch.Tensor) and list(labels.shape) == shape):
            raise ValueError(f"labels must be a tensor of the inputs' shape {shape} (token ids or -100), "
                             f"got {got(labels)}")

    def _validate_generated_length(self, generation_config, input_ids_length, has_default_max_length):
        """`generate()`'s length checks, and one more before any token: a total length past the
        position table is refused up front, not after decoding up to it (`forward` refuses it there)."""
        super()._validate_generated_length(generation_config, input_ids_length, has_default_max_length)
        if generation_config.max_length > self.config.max_position_embeddings:
            raise ValueError(
                f"generate: up to {generation_config.max_length} tokens (prompt {input_ids_length} + new) exceed "
                f"max_position_embeddings ({self.config.max_position_embeddings}); ask for fewer new tokens")

    def _prepare_generated_length(self, generation_config, has_default_max_length, has_default_min_length,
                                  model_input_name, input_ids_length, inputs_tensor):
        """The check above for a prompt given as `inputs_embeds` alone, whose positions Hugging Face
        leaves out of `max_length` (only the new tokens come back): it decoded up to the table's end.
        The `max_length` of the model's own generation config (the table's end) is a default, not a
        request: `max_new_tokens` replaces it without transformers' "both were set" warning."""
        if (generation_config.max_new_tokens is not None and self.generation_config is not None
                and generation_config.max_length == self.generation_config.max_length):
            has_default_max_length = True
        generation_config = super()._prepare_generated_length(
            generation_config, has_default_max_length, has_default_min_length, model_input_name, input_ids_length,
            inputs_tensor)
        embedded = inputs_tensor.shape[1] - input_ids_length if model_input_name == "inputs_embeds" else 0
        if embedded > 0 and generation_config.max_length + embedded > self.config.max_position_embeddings:
            raise ValueError(
                f"generate: up to {generation_config.max_length + embedded} positions (inputs_embeds {embedded} + "
                f"{generation_config.max_length} new tokens) exceed max_position_embeddings "
                f"({self.config.max_position_embeddings}); ask for fewer new tokens")
        return generation_config

    @staticmethod
    def _attention_mask(attention_mask, B, T, past, device):
        """Boolean [B, 1, T, S] mask: causal over cached + new tokens, minus padded keys."""
        S = past + T
        q_pos = torch.arange(past, S, device=device)[:, None]
        allowed = torch.arange(S, device=device)[None, :] <= q_pos  # [T, S]
        allowed = allowed[None, None].expand(B, 1, T, S)
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, :S].bool()
            # A padded query has no allowed key: let it see every key so that it stays finite
            # (its output is never used).
            allowed = allowed | ~allowed.any(-1, keepdim=True)
        return allowed

    @torch.no_grad()
    def update_router_bias(self, expert_counts: torch.Tensor) -> None:
        """DeepSeek-V3 auxiliary-loss-free balancing, after an optimizer step. `expert_counts`:
        [layers, experts] (token, slot) assignments of the whole step (all micro-batches and
        processes). `router_bias_e += rate * sign(mean(load) - load_e)`, the sign taken exactly on
        the counts, that of `total - E * count_e` (in floating point, a load exactly at the mean got
        +-1 from rounding, not 0)."""
        counts = expert_counts.long()
        signs = torch.sign(counts.sum(-1, keepdim=True) - counts.shape[-1] * counts).float()
        delta = self.config.router_bias_update_rate * signs
        for layer, d in zip(self.decoder_layers, delta):
            layer.mlp.moe.router_bias.add_(d.to(layer.mlp.moe.router_bias.device))
