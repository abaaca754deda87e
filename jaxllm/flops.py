"""Analytic FLOP count of CustomLLM (ARCHITECTURE.md) and accelerator peaks, for MFU.

A matmul of [m, k] x [k, n] is 2mkn FLOPs. Per token, the forward pass costs:
- MLA projections: 2 x the attention parameters (q/kv down, q/k/v up, rope_q, rope_k, o_proj);
- causal attention: q.k and p.v over on average seq_len / 2 keys:
  2 x heads x (qk_head_dim + v_head_dim) x seq_len / 2;
- router: 2 x hidden x routed experts;
- experts: 2 x 3 x hidden x intermediate for each shared expert and each of the top-k;
- lm_head: 2 x hidden x vocab.
Training costs 3x the forward (backward = 2x forward). Embedding look-ups, norms, RoPE, softmax and
the optimizer are not counted (the convention of MFU).
"""

from __future__ import annotations

from jaxllm.config import LLMConfig


def forward_flops_per_token(config: LLMConfig, seq_len: int) -> dict[str, float]:
    c = config
    h, lat, n = c.hidden_size, c.latent_dim, c.num_attention_heads
    attn_params = (2 * h * lat + lat * n * c.nope_head_dim * 2 + lat * n * c.v_head_dim
                   + h * n * c.rope_head_dim + lat * n * c.rope_head_dim + n * c.v_head_dim * h)
    per_layer = {
        "mla_projections": 2 * attn_params,
        "attention": 2 * n * (c.qk_head_dim + c.v_head_dim) * seq_len / 2,
        "router": 2 * h * c.num_routed_experts,
        "experts": 2 * 3 * h * c.intermediate_size * (c.num_shared_experts + c.num_experts_per_tok),
    }
    out = {k: v * c.num_hidden_layers for k, v in per_layer.items()}
    out["lm_head"] = 2 * h * c.vocab_size
    out["total"] = sum(out.values())
    return out


def training_flops_per_token(config: LLMConfig, seq_len: int) -> float:
    return 3 * forward_flops_per_token(config, seq_len)["total"]


# Dense peak FLOP/s per chip from the vendors' datasheets (no sparsity). On NVIDIA GPUs "float32"
# is the TF32 tensor-core peak: XLA runs float32 products as TF32 at JAX's default precision (an
# H200 ran 8192^3 float32 products at 349-369 TFLOP/s, beyond its 67 TFLOP/s of plain FP32).
PEAK_FLOPS = {
    # name fragment (lower case): {dtype: FLOP/s}
    "h200": {"bfloat16": 989e12, "float32": 494.7e12},
    "h100": {"bfloat16": 989e12, "float32": 494.7e12},  # SXM ("NVIDIA H100 80GB HBM3")
    "h100 pcie": {"bfloat16": 756e12, "float32": 378e12},
    "h100 nvl": {"bfloat16": 835e12, "float32": 417.5e12},
    "h200 nvl": {"bfloat16": 835e12, "float32": 417.5e12},
    "a100": {"bfloat16": 312e12, "float32": 156e12},
    "l40s": {"bfloat16": 362e12, "float32": 183e12},
    "l40": {"bfloat16": 181e12, "float32": 90.5e12},
    "l4": {"bfloat16": 121e12, "float32": 60e12},
    "tpu v4": {"bfloat16": 275e12},
    "tpu v5 lite": {"bfloat16": 197e12},
    "tpu v5e": {"bfloat16": 197e12},
    "tpu v5p": {"bfloat16": 459e12},
    "tpu v5": {"bfloat16": 459e12},
    "tpu v6": {"bfloat16": 918e12},
}


def device_peak_flops(device, dtype: str = "bfloat16") -> float | None:
    """Datasheet peak of a known accelerator (`jax.Device`), or None (CPUs and unknown chips:
    give `--peak-flops`)."""
    kind = getattr(device, "device_kind", str(device)).lower()
    for fragment in sorted(PEAK_FLOPS, key=len, reverse=True):  # "l40s" before "l40" before "l4"
        peaks = PEAK_FLOPS[fragment]
        if fragment in kind:
            return peaks.get(dtype) or peaks.get("bfloat16")
    return None
