"""CustomLLM in Flax NNX: Multi-Head Latent Attention + DeepSeekMoE (ARCHITECTURE.md).

Layout chosen for speed, mapped to the canonical PyTorch names by `convert/`:
- the decoder layers are stored stacked (every parameter has a leading `layers` axis) and run
  under `jax.lax.scan`, so compile time does not grow with the depth;
- linear kernels are `[in, out]`; experts are stacked `[experts, in, out]`;
- every parameter carries its logical axis names (`axes` metadata); `jaxllm.sharding` maps them to
  mesh axes through one rules table.

Shape suffixes in names: B batch, T query tokens, S key tokens, D hidden, H heads, L layers,
E experts, N flattened tokens, K experts per token.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxllm import sharding as shd
from jaxllm.config import LLMConfig
from jaxllm.recipes import ATTN_IMPLS, MOE_IMPLS, REMAT_POLICIES

Array = jax.Array
F32 = jnp.float32


class RouterBias(nnx.Variable):
    """Expert-choice bias of auxiliary-loss-free balancing: state, never touched by the optimizer
    (which only sees `nnx.Param`)."""


def _normal_param(rngs: nnx.Rngs, shape, std, dtype, axes) -> nnx.Param:
    """A Normal(0, std) parameter. The `init` metadata lets `create_model` draw every parameter
    from one random call (fast to compile) instead of one per parameter."""
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, dtype), axes=axes, init=("normal", std))


class Dense(nnx.Module):
    """A bias-free (unless asked) linear layer with an `[*lead, in, out]` kernel; `lead` is the
    stacked `layers` (and `experts`) axes. `wide`: a projection to many outputs (the lm_head),
    differentiated by `wide_linear`. `precision`: the product's (`jnp.dot`'s; None: JAX's default,
    which computes float32 products as TF32 on recent NVIDIA GPUs and bfloat16 passes on TPUs)."""

    def __init__(self, d_in, d_out, axes, *, rngs, std, lead=(), use_bias=False, wide=False,
                 dtype=F32, param_dtype=F32, precision=None):
        self.kernel = _normal_param(rngs, (*lead, d_in, d_out), std, param_dtype, axes)
        self.bias = nnx.Param(jnp.zeros((*lead, d_out), param_dtype), axes=axes[:-2] + axes[-1:],
                              init=("zeros",)) \
            if use_bias else None
        if wide and precision is not None:
            raise ValueError("Dense: a wide projection takes JAX's default precision")
        self.wide, self.dtype, self.precision = wide, dtype, precision

    def __call__(self, x: Array, out_dtype=None) -> Array:
        x, w = x.astype(self.dtype), self.kernel[...].astype(self.dtype)
        b = None if self.bias is None else self.bias[...]
        if self.wide:
            return wide_linear(x, w, b, out_dtype)
        return _affine(x, w, b, out_dtype, self.precision)


def _affine(x: Array, w: Array, b: Array | None, out_dtype=None, precision=None) -> Array:
    y = jnp.dot(x, w, preferred_element_type=out_dtype, precision=precision)
    return y if b is None else y + b.astype(y.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def wide_linear(x: Array, w: Array, b: Array | None, out_dtype=None) -> Array:
    """`x @ w + b` (b may be None) with a hand-written backward pass for wide projections such as
    the `[768, 49152]` lm_head, where XLA's CPU autodiff products are slow (BENCHMARKS.md):
    - on one device, the weight gradient is `x^T @ g` from a materialised `x^T` (an optimization
      barrier keeps XLA from folding the transpose back into the product): the transposed-operand
      product over the tokens ran at about 75 GFLOP/s against 145;
    - the bias gradient is a product with a vector of ones: XLA's CPU reduction of the
      `[tokens, vocab]` gradient over its rows took 0.64 s against 8 ms.
    Same math as autodiff's; equal within float32 rounding."""
    return _affine(x, w, b, out_dtype)


def _wide_linear_fwd(x, w, b, out_dtype):
    return wide_linear(x, w, b, out_dtype), (x, w, b)


def _wide_linear_bwd(out_dtype, res, g):
    x, w, b = res
    g2 = g.reshape(-1, g.shape[-1])
    xt = x.reshape(-1, x.shape[-1]).T
    if jax.device_count() == 1:
        # Materialised on one device only: across several, the barrier changes how the partitioner
        # splits the product, and so the order of its cross-device sums (a 2-process and a
        # 1-process run then differ in the last bits, tests/test_multiprocess.py).
        xt = jax.lax.optimization_barrier(xt)
    dx = jax.lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())), preferred_element_type=x.dtype)
    dw = jax.lax.dot_general(xt, g2, (((1,), (0,)), ((), ())), preferred_element_type=w.dtype)
    db = None
    if b is not None:
        db = jnp.dot(jnp.ones((g2.shape[0],), g2.dtype), g2, preferred_element_type=F32).astype(b.dtype)
    return dx, dw, db


wide_linear.defvjp(_wide_linear_fwd, _wide_linear_bwd)


class RMSNorm(nnx.Module):
    """`w * x / sqrt(mean(x^2) + eps)` in float32, cast back to the input dtype."""

    def __init__(self, dim, eps, *, lead=(), param_dtype=F32):
        self.weight = nnx.Param(jnp.ones((*lead, dim), param_dtype), axes=("layers", "norm")[-1 - len(lead):],
                                init=("ones",))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(F32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (self.weight[...].astype(F32) * y).astype(x.dtype)


def positions_from_mask(mask_BS: Array) -> Array:
    """Each token's position: how many real tokens (mask true) come before it, so that a left-padded
    row counts from its first real token (pads before it get 0; Hugging Face's rule)."""
    return jnp.maximum(jnp.cumsum(mask_BS.astype(jnp.int32), axis=-1) - 1, 0)


def rope_tables(positions_BT: Array, dim: int, theta: float) -> tuple[Array, Array]:
    """cos, sin [B, T, dim] of rotate-half RoPE: `inv_freq[i] = theta^(-2i/dim)`."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=F32) / dim))
    freqs = positions_BT.astype(F32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_BTHd: Array, cos_BTd: Array, sin_BTd: Array) -> Array:
    x = x_BTHd.astype(F32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * cos_BTd[:, :, None] + rotated * sin_BTd[:, :, None]).astype(x_BTHd.dtype)


class LayerCache(NamedTuple):
    """MLA's latent cache for one layer (or all layers, stacked on a leading axis): only `c_kv`
    and the rotated `k_rope` are kept, never full keys and values."""

    c_kv: Array  # [B, S_max, latent]
    k_rope: Array  # [B, S_max, H, rope]


def attend(q_BTHd: Array, k_BSHd: Array, v_BSHd: Array, mask_BTS: Array, scale: float) -> Array:
    """Softmax attention `softmax(q k^T * scale, masked) v`, [B, T, H, dv] out. Computed head-major
    (`[B, H, T, d]`, batch dimensions leading: XLA's CPU batched products run 3-4x faster than on
    the token-major layout) and normalised after the product with v: `(e v) / sum(e)` with
    `e = exp(logits - max)`, which divides a `[.., T, dv]` array instead of the `[.., T, S]` one
    (same math; equal within float32 rounding). Products and sums in float32."""
    q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q_BTHd, k_BSHd, v_BSHd))
    logits = jnp.einsum("bhtd,bhsd->bhts", q, k, preferred_element_type=F32) * scale
    logits = jnp.where(mask_BTS[:, None], logits, jnp.finfo(F32).min)
    e = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
    o = jnp.einsum("bhts,bhsd->bhtd", e.astype(v.dtype), v, preferred_element_type=F32)
    o = o / jnp.sum(e, axis=-1, keepdims=True)
    return jnp.swapaxes(o, 1, 2).astype(v.dtype)


def fused_causal_attention(q_BTHd: Array, k_BTHd: Array, v_BTHd: Array, scale: float,
                           implementation: str = "cudnn") -> Array:
    """Causal self-attention through `jax.nn.dot_product_attention` (`attn_impl="cudnn"`: cuDNN's
    fused flash attention on NVIDIA GPUs, bfloat16 or float16: no `[B, H, T, T]` logits in memory,
    one kernel each way instead of XLA's products, softmax and transposes). `implementation="xla"`
    runs the same call through XLA (how the tests check the layout, scale and mask on a CPU)."""
    return jax.nn.dot_product_attention(q_BTHd, k_BTHd, v_BTHd, scale=scale, is_causal=True,
                                        implementation=implementation)


def check_attn_impl(attn_impl: str, dtype, config: LLMConfig | None = None) -> None:
    """ValueError (one line) unless `attn_impl` can run here with this compute dtype (and model)."""
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl must be one of {', '.join(ATTN_IMPLS)}, got {attn_impl!r}")
    if attn_impl == "cudnn":
        if jax.default_backend() != "gpu":
            raise ValueError(f"attn_impl 'cudnn' needs an NVIDIA GPU (cuDNN); this process runs on "
                             f"{jax.default_backend()}")
        if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            raise ValueError(f"attn_impl 'cudnn' needs a bfloat16 or float16 compute dtype, got {jnp.dtype(dtype)}")
        if config is not None and config.v_head_dim != config.nope_head_dim + config.rope_head_dim:
            raise ValueError(f"attn_impl 'cudnn' needs v_head_dim equal to nope_head_dim + rope_head_dim "
                             f"(jax.nn.dot_product_attention), got {config.v_head_dim} and "
                             f"{config.nope_head_dim + config.rope_head_dim}")


class MultiHeadLatentAttention(nnx.Module):
    def __init__(self, c: LLMConfig, *, rngs, lead=(), dtype=F32, param_dtype=F32, attn_impl: str = "xla"):
        std = c.initializer_range
        D, lat, H = c.hidden_size, c.latent_dim, c.num_attention_heads
        la = ("layers",) * len(lead)
        mk = functools.partial(Dense, rngs=rngs, std=std, lead=lead, dtype=dtype, param_dtype=param_dtype)
        self.kv_proj_d = mk(D, lat, la + ("embed", "kv_lora"))
        self.q_proj_d = mk(D, lat, la + ("embed", "q_lora"))
        self.k_proj_u = mk(lat, H * c.nope_head_dim, la + ("kv_lora", "heads"))
        self.v_proj_u = mk(lat, H * c.v_head_dim, la + ("kv_lora", "heads"))
        self.q_proj_u = mk(lat, H * c.nope_head_dim, la + ("q_lora", "heads"))
        self.rope_k = mk(D, H * c.rope_head_dim, la + ("embed", "heads"))
        self.rope_q = mk(lat, H * c.rope_head_dim, la + ("q_lora", "heads"))
        self.o_proj = mk(H * c.v_head_dim, D, la + ("heads", "embed"))
        self.num_heads, self.nope, self.rope, self.dv = H, c.nope_head_dim, c.rope_head_dim, c.v_head_dim
        self.scale = (c.nope_head_dim + c.rope_head_dim) ** -0.5
        self.dtype, self.attn_impl = dtype, attn_impl

    def __call__(self, x_BTD: Array, rope_BTr: tuple[Array, Array], mask_BTS: Array | None,
                 cache: LayerCache | None = None, cache_index: Array | None = None):
        """`rope_BTr`: the (cos, sin) tables of the tokens' positions (`rope_tables`), made once per
        forward pass outside the layer loop: made inside it, XLA's CPU fusions re-evaluated cos and
        sin for every head (BENCHMARKS.md)."""
        B, T, _ = x_BTD.shape
        H = self.num_heads
        c_q = self.q_proj_d(x_BTD)  # [B, T, latent]
        c_kv = self.kv_proj_d(x_BTD)  # [B, T, latent]
        cos, sin = rope_BTr
        q_nope = self.q_proj_u(c_q).reshape(B, T, H, self.nope)
        q_rope = apply_rope(self.rope_q(c_q).reshape(B, T, H, self.rope), cos, sin)
        k_rope = apply_rope(self.rope_k(x_BTD).reshape(B, T, H, self.rope), cos, sin)
        new_cache = None
        if cache is not None:
            c_kv = jax.lax.dynamic_update_slice_in_dim(cache.c_kv, c_kv.astype(cache.c_kv.dtype), cache_index, 1)
            k_rope = jax.lax.dynamic_update_slice_in_dim(cache.k_rope, k_rope.astype(cache.k_rope.dtype), cache_index, 1)
            new_cache = LayerCache(c_kv, k_rope)
            if T == 1:
                return self._absorbed(q_nope, q_rope, c_kv, k_rope, mask_BTS), new_cache
        S = c_kv.shape[1]
        k_nope = self.k_proj_u(c_kv).reshape(B, S, H, self.nope)
        v = self.v_proj_u(c_kv).reshape(B, S, H, self.dv)
        q = jnp.concatenate([q_nope, q_rope.astype(q_nope.dtype)], axis=-1)  # [B, T, H, nope+rope]
        k = jnp.concatenate([k_nope, k_rope.astype(k_nope.dtype)], axis=-1)  # [B, S, H, nope+rope]
        if mask_BTS is None and self.attn_impl != "xla":  # plain causal self-attention (training)
            o = fused_causal_attention(q, k, v, self.scale, self.attn_impl).reshape(B, T, H * self.dv)
            return self.o_proj(o), new_cache
        if mask_BTS is None:  # plain causal self-attention (T == S)
            mask_BTS = jnp.tril(jnp.ones((T, S), bool))[None]
        o = attend(q, k, v, mask_BTS, self.scale).reshape(B, T, H * self.dv)
        return self.o_proj(o), new_cache

    def _absorbed(self, q_nope, q_rope, c_kv_BSL, k_rope_BSHr, mask_BTS):
        """Decoding attention computed on the cached latent itself ("absorbed" MLA): since
        `q_nope . k_nope = (q_nope W_uk^T) . c_kv` and `sum_s p_s v_s = (sum_s p_s c_kv_s) W_uv`,
        k_proj_u is folded into the query and v_proj_u into the output, so a decode step costs
        O(S x heads x latent) instead of recomputing k_nope and v for all S cached tokens. Same
        math as the path above, summed in another order (equal within float32 rounding)."""
        B, T, H, _ = q_nope.shape
        lat = c_kv_BSL.shape[-1]
        w_uk = self.k_proj_u.kernel[...].astype(self.dtype).reshape(lat, H, self.nope)
        w_uv = self.v_proj_u.kernel[...].astype(self.dtype).reshape(lat, H, self.dv)
        q_lat = jnp.einsum("bthd,lhd->bthl", q_nope, w_uk)  # [B, T, H, latent]
        logits = (jnp.einsum("bthl,bsl->bhts", q_lat, c_kv_BSL.astype(q_lat.dtype), preferred_element_type=F32)
                  + jnp.einsum("bthr,bshr->bhts", q_rope.astype(q_lat.dtype), k_rope_BSHr.astype(q_lat.dtype),
                               preferred_element_type=F32)) * self.scale
        logits = jnp.where(mask_BTS[:, None], logits, jnp.finfo(F32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(q_lat.dtype)
        o_lat = jnp.einsum("bhts,bsl->bthl", probs, c_kv_BSL.astype(q_lat.dtype))  # [B, T, H, latent]
        o = jnp.einsum("bthl,lhd->bthd", o_lat, w_uv).reshape(B, T, H * self.dv)
        return self.o_proj(o)


class Experts(nnx.Module):
    """A stack of SwiGLU experts: `down(silu(gate(x)) * up(x))`, kernels `[*lead, E, in, out]`."""

    def __init__(self, n, d, f, *, rngs, std, lead=(), dtype=F32, param_dtype=F32):
        la = ("layers",) * len(lead)
        shape = (*lead, n)
        self.gate_proj = _normal_param(rngs, (*shape, d, f), std, param_dtype, la + ("exp", "embed", "mlp"))
        self.up_proj = _normal_param(rngs, (*shape, d, f), std, param_dtype, la + ("exp", "embed", "mlp"))
        self.down_proj = _normal_param(rngs, (*shape, f, d), std, param_dtype, la + ("exp", "mlp", "embed"))
        self.dtype = dtype

    def weights(self):
        return tuple(p[...].astype(self.dtype) for p in (self.gate_proj, self.up_proj, self.down_proj))


def swiglu(x, wg, wu, wd, up: str, down: str, routed: bool = False):
    """Batched SwiGLU expert(s): `down(silu(x @ wg) * (x @ wu))` with explicit einsum specs.
    `routed`: name the projections and output for the "moe" remat policy."""
    g, u = jnp.einsum(up, x, wg), jnp.einsum(up, x, wu)
    if routed:
        g, u = checkpoint_name(g, "moe_gate"), checkpoint_name(u, "moe_up")
    y = jnp.einsum(down, jax.nn.silu(g) * u, wd)
    return checkpoint_name(y, "moe_out") if routed else y


def route(scores_NE: Array, router_bias_E: Array, k: int) -> tuple[Array, Array]:
    """Top-k of `scores + router_bias` (ties to the lower index: `lax.top_k` is stable); weights
    are the chosen unbiased scores normalised to sum to 1. Everything float32."""
    _, chosen_NK = jax.lax.top_k(scores_NE + router_bias_E, k)
    w_NK = jnp.take_along_axis(scores_NE, chosen_NK, axis=-1)
    return chosen_NK, w_NK / jnp.sum(w_NK, axis=-1, keepdims=True)


def balance_loss(scores_BTE: Array, chosen_BTK: Array, E: int) -> Array:
    """DeepSeek-V3 sequence-wise balance loss per sequence: sum_e f_e * P_e, [B]."""
    _, T, K = chosen_BTK.shape
    counts_BE = jax.nn.one_hot(chosen_BTK, E, dtype=F32).sum(axis=(1, 2))
    f_BE = counts_BE * (E / (K * T))
    p_BE = jnp.mean(scores_BTE / jnp.sum(scores_BTE, -1, keepdims=True), axis=1)
    return jnp.sum(f_BE * p_BE, axis=-1)


def dense_dispatch(x_ND, chosen_NK, w_NK, wg, wu, wd):
    """Reference: every routed expert on every token, masked by the routing weights."""
    E = wg.shape[0]
    combine_NE = jnp.sum(jax.nn.one_hot(chosen_NK, E, dtype=F32) * w_NK[..., None], axis=1)
    y_END = swiglu(x_ND, wg, wu, wd, "nd,edf->enf", "enf,efd->end")
    return jnp.einsum("ne,end->nd", combine_NE.astype(y_END.dtype), y_END)


class BlockLayout(NamedTuple):
    """Where each (token, slot) assignment goes when they are sorted by expert and every expert's
    rows are padded to a multiple of `block`: static shapes, dropless."""

    asg_P: Array  # [P] assignment (token * K + slot) of each padded row (N * K: padding)
    dest_M: Array  # [N*K] padded row of each assignment, in (token, slot) order
    block_expert: Array  # [P / block] expert of each block (ascending: an expert's blocks are consecutive)
    group_sizes: Array  # [E] assignments per expert (unpadded)


def block_layout(chosen_NK: Array, E: int, block: int) -> BlockLayout:
    N, K = chosen_NK.shape
    M = N * K
    e_M = chosen_NK.reshape(M)
    order_M = jnp.argsort(e_M, stable=True)
    e_sorted = e_M[order_M]
    counts_E = jnp.bincount(e_M, length=E)
    padded_E = (counts_E + block - 1) // block * block
    pad_end_E = jnp.cumsum(padded_E)
    rank_M = jnp.arange(M) - (jnp.cumsum(counts_E) - counts_E)[e_sorted]
    dest_sorted = ((pad_end_E - padded_E)[e_sorted] + rank_M).astype(jnp.int32)
    n_blocks = (M + E * (block - 1)) // block  # static upper bound on sum(padded_E) / block
    asg_P = jnp.full((n_blocks * block,), M, jnp.int32).at[dest_sorted].set(order_M.astype(jnp.int32))
    block_expert = jnp.minimum(jnp.searchsorted(pad_end_E, jnp.arange(n_blocks) * block, side="right"), E - 1)
    dest_M = jnp.zeros((M,), jnp.int32).at[order_M].set(dest_sorted)
    return BlockLayout(asg_P, dest_M, block_expert, counts_E)


@jax.custom_vjp
def gather_rows(x_RD: Array, idx_S: Array, users_RJ: Array) -> Array:
    """`x_RD` with a zero row appended (row R), at rows `idx_S`: `[S, D]`. A gather whose transpose
    is a gather too, not a scatter-add: `users_RJ[r]` lists the J positions s with `idx_S[s] == r`
    (S where fewer), so the cotangent of row r is the sum of those positions' cotangents. On a GPU
    the scatter-adds ran as slow atomics (BENCHMARKS.md); the sparse dispatches use this both ways: token rows into the padded blocks (each token used K times: `users` =
    `dest_M` as [N, K]) and block rows back to assignments (each row used at most once: `users`
    = `asg_P` as [P, 1])."""
    return _with_zero_row(x_RD)[idx_S]


def _with_zero_row(a_RD):
    return jnp.concatenate([a_RD, jnp.zeros((1, a_RD.shape[1]), a_RD.dtype)])


def _gather_rows_fwd(x_RD, idx_S, users_RJ):
    return _with_zero_row(x_RD)[idx_S], users_RJ


def _gather_rows_bwd(users_RJ, g_SD):
    g_SD = _with_zero_row(g_SD)
    dx_RD = g_SD[users_RJ[:, 0]]
    for j in range(1, users_RJ.shape[1]):  # in slot order, as a scatter-add onto zeros sums them
        dx_RD = dx_RD + g_SD[users_RJ[:, j]]
    return dx_RD, None, None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def take_experts(w_E, e_B: Array, E: int) -> Array:
    """`w_E[e_B]`: each block's expert weights. Its transpose sums each expert's blocks' cotangents
    through a one-hot product instead of a scatter-add (on a GPU, atomics in the
    weights' dtype: a quarter of a seed-973m step at micro-batch 128)."""
    return w_E[e_B]


def _take_experts_fwd(w_E, e_B, E):
    return w_E[e_B], e_B


def _take_experts_bwd(E, e_B, g_B):
    # XLA's products of bfloat16 operands sum in float32 and round once (on a GPU, cuBLAS); float32
    # operands run at full precision, not TF32.
    exact = jax.lax.Precision.HIGHEST if g_B.dtype == F32 else None
    return jnp.einsum("be,b...->e...", jax.nn.one_hot(e_B, E, dtype=g_B.dtype), g_B, precision=exact), None


take_experts.defvjp(_take_experts_fwd, _take_experts_bwd)


def dispatch_block(n_assignments: int, E: int, block: int) -> int:
    """Rows per block of the sparse dispatches: `block` (sized for training), or ceil(n / E) when
    the assignments are few: decoding one token of one sequence then pads nothing (1-row
    blocks) instead of computing and gathering about E x `block` rows for its k real ones."""
    return max(1, min(block, -(-n_assignments // E)))


def _padded_blocks(x_ND, chosen_NK, E: int, block: int):
    """The assignments' rows sorted by expert, each expert's rows padded to whole blocks:
    `[n_blocks, block, D]` (padding rows are zeros), and the layout that undoes it."""
    N, K = chosen_NK.shape
    lay = block_layout(chosen_NK, E, block)
    x_BbD = gather_rows(x_ND, lay.asg_P // K, lay.dest_M.reshape(N, K)).reshape(-1, block, x_ND.shape[1])
    return x_BbD, lay


def _combine(y_BbD, lay: BlockLayout, w_NK):
    N, K = w_NK.shape
    y_NKD = gather_rows(y_BbD.reshape(-1, y_BbD.shape[-1]), lay.dest_M, lay.asg_P[:, None]).reshape(N, K, -1)
    return jnp.einsum("nk,nkd->nd", w_NK.astype(y_NKD.dtype), y_NKD)


def sparse_dispatch(x_ND, chosen_NK, w_NK, wg, wu, wd, block: int):
    """Dropless sparse dispatch with static shapes ("gather"): the N*K assignments are sorted by
    expert, each expert's rows padded to a multiple of `block`, and one batched matmul runs every
    block (active or not) through its expert's weights, gathered per block. Work grows with K,
    not with E; results equal the dense reference."""
    block = dispatch_block(chosen_NK.size, wg.shape[0], block)
    x_BbD, lay = _padded_blocks(x_ND, chosen_NK, wg.shape[0], block)
    E, e = wg.shape[0], lay.block_expert
    y_BbD = swiglu(x_BbD, take_experts(wg, e, E), take_experts(wu, e, E), take_experts(wd, e, E),
                   "nbd,ndf->nbf", "nbf,nfd->nbd", routed=True)
    return _combine(y_BbD, lay, w_NK)


def _first_blocks(nblk_E):
    """Each expert's first block (its blocks are consecutive, experts in order)."""
    return jnp.cumsum(nblk_E) - nblk_E


def _take(a, i, width: int):
    """`width` consecutive blocks from block `i` of `[n_blocks, block, ...]`, as `[width * block, ...]`."""
    return jax.lax.dynamic_slice_in_dim(a, i, width, 0).reshape(width * a.shape[1], *a.shape[2:])


def _place(a, v, i, width: int):
    return jax.lax.dynamic_update_slice_in_dim(a, v.reshape(width, *a.shape[1:]).astype(a.dtype), i, 0)


def _over_blocks(start, n, group: int, body, carry):
    """Runs `body(i, width, carry)` over blocks `start .. start + n` in few products: `group`
    blocks at a time while a whole group remains, then halving the width down to one block
    (group 4: 4, .., 4, then at most one 2 and one 1; `group == 1`: one loop)."""
    while True:
        n_big = n // group
        carry = jax.lax.fori_loop(0, n_big, lambda j, c, s=start, w=group: body(s + j * w, w, c), carry)
        if group == 1:
            return carry
        start, n, group = start + n_big * group, n - n_big * group, group // 2


# The grouped loop over the experts is a Python loop (each expert's weights a static slice, which
# XLA's CPU fuses with the layer scan's slice into one copy per matrix and pass) where an expert's
# matrix is at least this large, and a `fori_loop` below it (one copy of the loop body: about 40%
# less to compile; XLA then copies the layer's expert weights whole before slicing each expert out).
# Measured on the Intel CPU (2026-11-30): at seed-973m width (4.5 MiB a matrix in float32) the
# `fori_loop` steps were 2-9% slower; at `small` width (0.5 MiB) the step was the same (514 against
# 528 ms) and compiled in 8.4 s against 13.7 s (BENCHMARKS.md).
UNROLL_EXPERTS_BYTES = 1 << 20


def unroll_experts(w) -> bool:
    """Whether the grouped loop over `w`'s experts (`[E, D, F]`) is a Python loop (see
    `UNROLL_EXPERTS_BYTES`)."""
    return math.prod(w.shape[1:]) * w.dtype.itemsize >= UNROLL_EXPERTS_BYTES


def _over_experts(unrolled: bool, ws, step, carry):
    """`carry = step(e, expert e's matrices of ws, carry)` for each expert in order: a Python loop
    (static slices) or a `fori_loop` (one copy of `step` in the program). Same results either way."""
    if unrolled:
        for e in range(ws[0].shape[0]):
            carry = step(e, tuple(w[e] for w in ws), carry)
        return carry
    return jax.lax.fori_loop(
        0, ws[0].shape[0],
        lambda e, c: step(e, tuple(jax.lax.dynamic_index_in_dim(w, e, 0, keepdims=False) for w in ws), c), carry)


def _grouped_forward(x_BbD, wg, wu, wd, nblk_E, group: int, save: bool, unrolled: bool):
    """A loop over each expert's blocks only, `group` blocks per product while a whole group
    remains, each expert's last rows in products halving down to one block (less padding at the
    rate of the large products): every product is a `[rows, D] x [D, F]` SwiGLU; an expert without
    rows runs no product, and blocks past the last active one are never computed (they stay zero)."""
    start_E = _first_blocks(nblk_E)
    z = jnp.zeros((*x_BbD.shape[:2], wg.shape[-1]), x_BbD.dtype) if save else None

    def expert(e, W, carry):
        Wg, Wu, Wd = W

        def body(i, width, carry):
            y, g_all, u_all = carry
            x = _take(x_BbD, i, width)
            g, u = x @ Wg, x @ Wu
            y = _place(y, (jax.nn.silu(g) * u) @ Wd, i, width)
            if save:
                g_all, u_all = _place(g_all, g, i, width), _place(u_all, u, i, width)
            return y, g_all, u_all

        return _over_blocks(start_E[e], nblk_E[e], group, body, carry)

    return _over_experts(unrolled, (wg, wu, wd), expert, (jnp.zeros_like(x_BbD), z, z))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def grouped_swiglu(x_BbD, wg, wu, wd, nblk_E, group: int, unrolled: bool):
    """SwiGLU of each expert's blocks of rows, `[n_blocks, block, D]` in and out: expert e owns
    `nblk_E[e]` consecutive blocks, experts in order; inactive blocks give zeros; `group` blocks
    per product where an expert has that many left, in both passes. A hand-written backward in
    the same loops: per-expert weight gradients accumulate in place over that expert's blocks (no
    gathered weight copies, no per-block gradients). `unrolled`: the loop over the experts is a
    Python loop, else a `fori_loop` (`unroll_experts`)."""
    return _grouped_forward(x_BbD, wg, wu, wd, nblk_E, group, save=False, unrolled=unrolled)[0]


def _grouped_swiglu_fwd(x_BbD, wg, wu, wd, nblk_E, group, unrolled):
    y, g, u = _grouped_forward(x_BbD, wg, wu, wd, nblk_E, group, save=True, unrolled=unrolled)
    # Named so that a remat policy can keep them (`remat_policy("moe")`).
    g, u = checkpoint_name(g, "moe_gate"), checkpoint_name(u, "moe_up")
    return y, (x_BbD, wg, wu, wd, nblk_E, g, u)


def _block_widths(group: int) -> list[int]:
    """The product widths (in blocks) that `_over_blocks` uses, widest first: group, group // 2, .., 1."""
    widths = [group]
    while widths[-1] > 1:
        widths.append(widths[-1] // 2)
    return widths


def _grouped_swiglu_bwd(group, unrolled, res, dy_BbD):
    x_BbD, wg, wu, wd, nblk_E, g_all, u_all = res
    start_E = _first_blocks(nblk_E)
    dot = functools.partial(jnp.dot, preferred_element_type=F32)  # weight gradients sum in float32
    widths = _block_widths(group)
    n_blocks = x_BbD.shape[0]

    def expert(e, W, dx):
        """Expert e's blocks: dx with their input gradients placed, and e's three weight gradients."""
        Wg, Wu, Wd = W

        def products(i, width):
            """The input gradient of blocks i .. i + width ([width * block, D]) and their weight gradients."""
            x, dy, g, u = (_take(a, i, width) for a in (x_BbD, dy_BbD, g_all, u_all))
            sg = jax.nn.sigmoid(g)
            silu = g * sg
            dh = dy @ Wd.T
            dg = dh * u * (sg + silu * (1 - sg))
            du = dh * silu
            return dg @ Wg.T + du @ Wu.T, dot(x.T, dg), dot(x.T, du), dot((silu * u).T, dy)

        def body(i, width, carry):
            dx_i, *acc = products(i, width)
            return (_place(carry[0], dx_i, i, width), *(a + b for a, b in zip(carry[1:], acc)))

        # The expert's first product (the one `_over_blocks` would run first: `group` blocks, or
        # the widest that fits) starts its accumulators, and the loops add the rest: no zero-filled
        # accumulators and no add of the first product to zeros (each a pass over 4.7 MB per
        # seed-973m matrix). Same products in the same order: equal results. Each branch gives its
        # input gradient inside a window of `group` blocks (dx itself stays out of the conditional,
        # which would copy it).
        n, start = nblk_E[e], start_E[e]
        first = sum((n < w).astype(jnp.int32) for w in widths)  # index into widths; len: no rows
        win = jnp.minimum(start, n_blocks - group)  # a window of `group` blocks holding the first product

        def first_product(dx, w):
            dx_i, *acc = products(start, w)
            window = _place(jax.lax.dynamic_slice_in_dim(dx, win, group, 0), dx_i, start - win, w)
            return window, *acc

        def empty(dx):
            z_DF = jnp.zeros(wg.shape[1:], F32)
            return jax.lax.dynamic_slice_in_dim(dx, win, group, 0), z_DF, z_DF, jnp.zeros(wd.shape[1:], F32)

        branches = [functools.partial(first_product, w=w) for w in widths] + [empty]
        window, *acc = jax.lax.switch(first, branches, dx)
        dx = jax.lax.dynamic_update_slice_in_dim(dx, window, win, 0)
        done = jnp.asarray(widths + [0], jnp.int32)[first]
        return _over_blocks(start + done, n - done, group, body, (dx, *acc))

    dx = jnp.zeros_like(x_BbD)
    if unrolled:  # each expert's gradients kept apart (static weight slices), then stacked
        grads = []
        for e in range(wg.shape[0]):
            dx, *acc = expert(e, (wg[e], wu[e], wd[e]), dx)
            grads.append(acc)
        dws = (jnp.stack(per_expert) for per_expert in zip(*grads))
    else:  # each expert's gradients written into their place in the stacked ones, in the loop
        def step(e, W, carry):
            dx, *acc = expert(e, W, carry[0])
            return dx, *(jax.lax.dynamic_update_index_in_dim(d, a, e, 0) for d, a in zip(carry[1:], acc))

        dx, *dws = _over_experts(False, (wg, wu, wd), step, (dx, *(jnp.zeros(w.shape, F32) for w in (wg, wu, wd))))
    dwg, dwu, dwd = (d.astype(w.dtype) for d, w in zip(dws, (wg, wu, wd)))
    return dx, dwg, dwu, dwd, None


grouped_swiglu.defvjp(_grouped_swiglu_fwd, _grouped_swiglu_bwd)


def grouped_dispatch(x_ND, chosen_NK, w_NK, wg, wu, wd, block: int, tail: int | None = None,
                     unrolled: bool | None = None):
    """Dropless sparse dispatch ("grouped", the CPU default): the layout of `sparse_dispatch`, but
    a loop computes only the active blocks, each with its expert's weights read in place
    (`grouped_swiglu`). Rows are laid out in blocks of `tail` rows (default `block // 4`) and
    computed `block` rows at a time, each expert's last rows in products halving down to `tail`
    rows: padding of about `tail / 2` rows per expert instead of `block / 2`. `unrolled`: the loop
    over the experts as a Python loop or a `fori_loop` (default: by the experts' size,
    `unroll_experts`)."""
    E = wg.shape[0]
    tail = tail or next(block // d for d in (4, 2, 1) if block % d == 0)
    if block % tail:
        raise ValueError(f"the tail block ({tail} rows) must divide the block ({block} rows)")
    few = dispatch_block(chosen_NK.size, E, tail)
    if few < tail:  # fewer assignments than a tail block per expert (decoding): blocks of n / E rows
        block = tail = few
    x_BbD, lay = _padded_blocks(x_ND, chosen_NK, E, tail)
    nblk_E = ((lay.group_sizes + tail - 1) // tail).astype(jnp.int32)
    unrolled = unroll_experts(wg) if unrolled is None else bool(unrolled)
    # At most as many blocks per product as the layout has (fewer with one or two experts).
    group = min(block // tail, x_BbD.shape[0])
    y_BbD = grouped_swiglu(x_BbD, wg, wu, wd, nblk_E, group, unrolled)
    y_BbD = checkpoint_name(y_BbD, "moe_out")
    return _combine(y_BbD, lay, w_NK)


def ragged_dispatch(x_ND, chosen_NK, w_NK, wg, wu, wd):
    """Dropless sparse dispatch through `jax.lax.ragged_dot` (grouped matmuls; fast on GPUs, its
    CPU lowering is slow): assignments sorted by expert, no padding."""
    N, K = chosen_NK.shape
    e_M = chosen_NK.reshape(N * K)
    order_M = jnp.argsort(e_M, stable=True)
    sizes_E = jnp.bincount(e_M, length=wg.shape[0]).astype(jnp.int32)
    x_MD = x_ND[order_M // K]
    g = checkpoint_name(jax.lax.ragged_dot(x_MD, wg, sizes_E), "moe_gate")
    u = checkpoint_name(jax.lax.ragged_dot(x_MD, wu, sizes_E), "moe_up")
    y_MD = checkpoint_name(jax.lax.ragged_dot(jax.nn.silu(g) * u, wd, sizes_E), "moe_out")
    y_NKD = jnp.zeros_like(y_MD).at[order_M].set(y_MD).reshape(N, K, -1)
    return jnp.einsum("nk,nkd->nd", w_NK.astype(y_NKD.dtype), y_NKD)


# Rows per block of the sparse dispatches when `moe_block` is not given. "grouped" (the CPU's
# loop) computes two blocks per product (256 rows: on one seed-973m layer, forward and backward,
# 339 ms against 430 for 128-row products); "gather" runs every block through one batched product,
# for which larger blocks won on an H200 (seed-973m, 16 x 256, bf16: 1024 rows 94.0 ms a step,
# 512 99.0, 256 116.1; BENCHMARKS.md).
MOE_BLOCKS = {"grouped": 128, "gather": 1024}


def resolve_moe_impl(moe_impl: str, few_assignments: bool = False) -> str:
    """"sparse" picks the fastest exact sparse dispatch for the platform: on GPUs the batched
    "gather" (XLA's GPU compiler turns `ragged_dot` into a masked product over every expert); on
    TPUs `ragged_dot`; on CPUs the grouped loop over active blocks, or the loop-free gather when a
    call has fewer assignments than one full block per expert (decoding; measured in
    BENCHMARKS.md)."""
    if moe_impl not in MOE_IMPLS:
        raise ValueError(f"moe_impl must be one of {', '.join(MOE_IMPLS)}, got {moe_impl!r}")
    if moe_impl == "sparse":
        backend = jax.default_backend()
        if backend == "gpu":
            return "gather"
        if backend != "cpu":
            return "ragged"
        return "gather" if few_assignments else "grouped"
    return moe_impl


def training_dispatch(moe_impl: str, moe_block: int | None = None) -> tuple[str, int | None]:
    """The dispatch and block that the MoE layers run here for these settings (`moe_impl`,
    `moe_block`) on a training-sized call (decoding-sized ones on a CPU take the gather instead:
    `DeepSeekMoE._dispatch`); what benchmarks report. The block is None for "dense" and "ragged"."""
    impl = resolve_moe_impl(moe_impl)
    return impl, (moe_block or MOE_BLOCKS[impl]) if impl in MOE_BLOCKS else None


class DeepSeekMoE(nnx.Module):
    def __init__(self, c: LLMConfig, *, rngs, lead=(), dtype=F32, param_dtype=F32,
                 moe_impl: str = "sparse", moe_block: int | None = None):
        resolve_moe_impl(moe_impl)  # validates
        if moe_block is not None and moe_block < 1:
            raise ValueError(f"moe_block must be at least 1, got {moe_block}")
        la = ("layers",) * len(lead)
        std = c.initializer_range
        kw = dict(rngs=rngs, std=std, lead=lead, dtype=dtype, param_dtype=param_dtype)
        self.shared_experts = Experts(c.num_shared_experts, c.hidden_size, c.intermediate_size, **kw) \
            if c.num_shared_experts else None
        self.routed_experts = Experts(c.num_routed_experts, c.hidden_size, c.intermediate_size, **kw)
        # The router's scores are float32 (ARCHITECTURE.md) on every device: its product at full
        # float32 precision, not TF32 / bfloat16 passes (a [tokens, hidden] x [hidden, 7] product).
        self.router = Dense(c.hidden_size, c.num_routed_experts, la + ("embed", "exp_router"),
                            rngs=rngs, std=std, lead=lead, dtype=F32, param_dtype=param_dtype,
                            precision=jax.lax.Precision.HIGHEST)
        self.router_bias = RouterBias(jnp.zeros((*lead, c.num_routed_experts), F32), axes=la + ("exp_router",),
                                      init=("zeros",))
        self.k, self.E = c.num_experts_per_tok, c.num_routed_experts
        self.moe_impl, self.moe_block = moe_impl, moe_block

    def __call__(self, x_BTD: Array):
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D).astype(self.routed_experts.dtype)
        shared_ND = None
        if self.shared_experts is not None:
            # One plain [n, d] x [d, f] SwiGLU per shared expert (usually one), summed: no
            # reduction over an expert axis (XLA's CPU took 20 ms per seed-973m layer to sum over
            # an axis of one), and a backward of 2-D products (contracting `e` and `f` together,
            # `nef,edf->nd`, ran at half the rate: about 30 ms per seed-973m layer).
            for wg_DF, wu_DF, wd_FD in zip(*self.shared_experts.weights()):
                y_ND = swiglu(x_ND, wg_DF, wu_DF, wd_FD, "nd,df->nf", "nf,fd->nd")
                shared_ND = y_ND if shared_ND is None else shared_ND + y_ND
        scores_NE = jax.nn.sigmoid(self.router(x_BTD.reshape(B * T, D).astype(F32)))
        chosen_NK, w_NK = route(scores_NE, self.router_bias[...], self.k)
        routed = shd.map_batch_shards(self._dispatch, (x_ND, chosen_NK, w_NK), self.routed_experts.weights())
        out_ND = routed if shared_ND is None else shared_ND + routed
        aux_B = balance_loss(scores_NE.reshape(B, T, self.E), chosen_NK.reshape(B, T, self.k), self.E)
        counts_E = jnp.bincount(chosen_NK.reshape(-1), length=self.E)
        return out_ND.reshape(B, T, D).astype(x_BTD.dtype), aux_B, counts_E

    def _dispatch(self, x_ND, chosen_NK, w_NK, wg, wu, wd):
        """The routed experts' output for these tokens (a data-parallel shard's own, under a mesh:
        `map_batch_shards`)."""
        impl, block = training_dispatch(self.moe_impl, self.moe_block)
        if self.moe_impl == "sparse" and impl == "grouped" \
                and dispatch_block(chosen_NK.size, self.E, block) < block:
            # Decoding-sized calls: the loop-free gather, its blocks shrunk to the assignments.
            impl = resolve_moe_impl(self.moe_impl, few_assignments=True)
        if impl == "dense":
            return dense_dispatch(x_ND, chosen_NK, w_NK, wg, wu, wd)
        if impl == "ragged":
            return ragged_dispatch(x_ND, chosen_NK, w_NK, wg, wu, wd)
        if impl == "gather":
            return sparse_dispatch(x_ND, chosen_NK, w_NK, wg, wu, wd, block)
        # Products of two blocks padded to half blocks (`MOE_BLOCKS`).
        return grouped_dispatch(x_ND, chosen_NK, w_NK, wg, wu, wd, 2 * block)


def remat_policy(remat: bool | str):
    """The `jax.checkpoint` policy of a layer for a `REMAT_POLICIES` name (None: no remat).
    "full" recomputes the whole layer; "moe" keeps the routed experts' gate and up projections and
    outputs (named in the sparse dispatches; about 45 MB per seed-973m layer at 4 x 256) and
    recomputes the rest (attention, shared expert, router: about a third of the layer's work);
    "dots" keeps those and every other product without batch dimensions (the attention
    projections, shared experts and router: about 25 MB more per seed-973m layer) and recomputes
    only attention's core (`attend`: its batched products and softmax) and elementwise ops."""
    name = ("full" if remat else "none") if isinstance(remat, bool) else remat
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {', '.join(REMAT_POLICIES)}, got {remat!r}")
    cp = jax.checkpoint_policies
    moe = cp.save_only_these_names("moe_gate", "moe_up", "moe_out")
    return {"none": None, "full": cp.nothing_saveable, "moe": moe,
            "dots": cp.save_from_both_policies(cp.dots_with_no_batch_dims_saveable, moe)}[name]


class DecoderLayer(nnx.Module):
    """Pre-norm block: `h + attn(norm(h))`, then `h + moe(norm(h))`."""

    def __init__(self, c: LLMConfig, *, rngs, lead=(), dtype=F32, param_dtype=F32, attn_impl: str = "xla",
                 **moe_kw):
        self.self_attn = MultiHeadLatentAttention(c, rngs=rngs, lead=lead, dtype=dtype, param_dtype=param_dtype,
                                                  attn_impl=attn_impl)
        self.mlp = DeepSeekMoE(c, rngs=rngs, lead=lead, dtype=dtype, param_dtype=param_dtype, **moe_kw)
        self.input_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, lead=lead, param_dtype=param_dtype)
        self.post_attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, lead=lead, param_dtype=param_dtype)

    def __call__(self, h, rope, mask, cache=None, cache_index=None):
        a, new_cache = self.self_attn(self.input_norm(h), rope, mask, cache, cache_index)
        h = h + a
        m, aux_B, counts_E = self.mlp(self.post_attn_norm(h))
        return h + m, aux_B, counts_E, new_cache


class ModelOutput(NamedTuple):
    logits: Array  # [B, T, V] float32
    aux_loss: Array  # [B] balance loss per sequence, summed over layers (before the coefficient)
    expert_counts: Array  # [L, E] (token, slot) assignments per layer and routed expert
    cache: LayerCache | None = None  # stacked over layers when decoding


UNROLL_MAX_LAYERS = 8


class CustomLLM(nnx.Module):
    """The Flax model. `model(input_ids)` gives float32 logits `[B, T, vocab]`; `model.forward`
    also returns the balance loss and expert loads.

    Runtime settings (not part of the config): `dtype` (compute: float32 or bfloat16; norms,
    router, softmax and logits stay float32), `param_dtype` (master weights), `moe_impl`
    (routed-expert dispatch, equal results: "sparse" = the platform's best of "grouped", "gather",
    "ragged"; "dense" computes every expert), `moe_block` (rows per block of the sparse
    dispatch; default `MOE_BLOCKS`, by dispatch; "grouped" pads each expert's rows to half blocks
    only and computes up to two blocks per product), `remat` (what the backward pass recomputes to save memory:
    `REMAT_POLICIES`; True = "full", False = "none"), `attn_impl` (the training path's causal
    attention: "xla", the default, or "cudnn", cuDNN's fused attention on NVIDIA GPUs in bfloat16 or
    float16; cached and padded attention always take the "xla" path),
    `scan_unroll` (unroll of the scan over layers; default: fully unrolled up to 8 layers, a loop
    above).
    """

    def __init__(self, config: LLMConfig, *, rngs: nnx.Rngs, dtype=F32, param_dtype=F32,
                 moe_impl: str = "sparse", moe_block: int | None = None, remat: bool | str = False,
                 scan_unroll: int | bool | None = None, attn_impl: str = "xla"):
        check_attn_impl(attn_impl, dtype, config)
        c = self.config = config
        std = c.initializer_range
        self.token_embeddings = _normal_param(rngs, (c.vocab_size, c.hidden_size), std, param_dtype,
                                              ("vocab", "embed"))
        self.position_embeddings = _normal_param(rngs, (c.max_position_embeddings, c.hidden_size), std,
                                                 param_dtype, ("positions", "embed"))
        self.decoder_layers = DecoderLayer(c, rngs=rngs, lead=(c.num_hidden_layers,), dtype=dtype,
                                           param_dtype=param_dtype, moe_impl=moe_impl, moe_block=moe_block,
                                           attn_impl=attn_impl)
        self.lm_head = Dense(c.hidden_size, c.vocab_size, ("embed", "vocab"), rngs=rngs, std=std,
                             use_bias=c.lm_head_bias, wide=True, dtype=dtype, param_dtype=param_dtype)
        # The layers always run under one `lax.scan` over their stacked weights (compile time does
        # not grow with depth). Shallow models unroll it: for `small` (4 layers) the loop's
        # per-layer slicing and stacking cost about a fifth of the step on a CPU (BENCHMARKS.md).
        if scan_unroll is None:
            scan_unroll = True if c.num_hidden_layers <= UNROLL_MAX_LAYERS else 1
        self.dtype, self.remat, self.scan_unroll = dtype, remat, scan_unroll

    def __call__(self, input_ids: Array, **kw) -> Array:
        return self.forward(input_ids, **kw).logits

    def forward(self, input_ids: Array, *, positions: Array | None = None, dropout_rng: Array | None = None,
                attention_mask: Array | None = None, cache: LayerCache | None = None,
                cache_index: Array | int = 0, last_logits: bool = False) -> ModelOutput:
        """input_ids [B, T]. `positions` default to `cache_index + arange(T)`, or with an
        `attention_mask` to the count of real tokens before each one (`positions_from_mask`: a
        left-padded row's first real token is at 0, as in the PyTorch reference). `dropout_rng` turns
        embedding dropout on (training). With `cache` (stacked `[L, B, S_max, ...]`), the new
        tokens are written at `cache_index` and attend to every earlier cached token whose
        `attention_mask` [B, S_max] is true. `last_logits`: logits of the last position only
        ([B, 1, V]; a prefill needs no more)."""
        c = self.config
        # (static, so checked under jit too: a 1-D row failed to unpack, an empty batch divided by zero)
        if not hasattr(input_ids, "dtype") or jnp.ndim(input_ids) != 2 or 0 in input_ids.shape \
                or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            got = f"{input_ids.dtype}{list(input_ids.shape)}" if hasattr(input_ids, "dtype") else type(input_ids).__name__
            raise ValueError(f"input_ids must be an integer array [batch, seq] of at least one token, got {got}")
        B, T = input_ids.shape
        # Checked where concrete (a call outside jit; traced: unchecked): a gather clamps a token id,
        # position or cache index past its table silently, as JAX's indexing does.
        if (bad := _outside(input_ids, c.vocab_size)) is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary (0 .. {c.vocab_size - 1})")
        index = int(np.asarray(cache_index)) if _concrete(cache_index) else None
        if index is not None and index < 0:
            raise ValueError(f"cache_index must be >= 0, got {index}")
        end = T + (index or 0)
        if positions is None and end > c.max_position_embeddings:  # a gather would clamp it silently
            raise ValueError(f"sequence length {end} exceeds max_position_embeddings ({c.max_position_embeddings})")
        if positions is not None and (bad := _outside(positions, c.max_position_embeddings)) is not None:
            raise ValueError(f"position {bad} is outside the position table "
                             f"(0 .. {c.max_position_embeddings - 1}, max_position_embeddings)")
        if cache is not None and end > cache.c_kv.shape[2]:  # the cache write would clamp it silently
            raise ValueError(f"{T} new tokens at cache index {end - T} exceed the cache's {cache.c_kv.shape[2]} positions")
        if positions is None and attention_mask is not None:
            positions = positions_from_mask(attention_mask)  # [B, T], or [B, S_max] with a cache
            if cache is not None:
                positions = jax.lax.dynamic_slice_in_dim(positions, cache_index, T, axis=1)
        elif positions is None:
            positions = cache_index + jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        tok, pos = (shd.replicate(p[...]) for p in (self.token_embeddings, self.position_embeddings))
        h = tok[input_ids] + pos[positions]
        if dropout_rng is not None and c.embedding_dropout > 0:
            keep = jax.random.bernoulli(dropout_rng, 1.0 - c.embedding_dropout, h.shape)
            h = jnp.where(keep, h / (1.0 - c.embedding_dropout), 0.0)
        h = h.astype(self.dtype)
        mask = None
        if cache is not None:
            S = cache.c_kv.shape[2]
            q_idx = cache_index + jnp.arange(T)
            mask = jnp.arange(S)[None, :] <= q_idx[:, None]  # [T, S] causal over the cache
            mask = mask[None] if attention_mask is None else mask[None] & attention_mask[:, None, :].astype(bool)
        elif attention_mask is not None:
            mask = jnp.tril(jnp.ones((T, T), bool))[None] & attention_mask[:, None, :].astype(bool)
        if mask is not None:  # a query that sees no key (a pad) sees all keys, to stay finite
            mask = mask | ~jnp.any(mask, axis=-1, keepdims=True)

        rope = rope_tables(positions, c.rope_head_dim, c.rope_theta)
        graphdef, layer_state = nnx.split(self.decoder_layers)

        def body(h, xs):
            state, layer_cache = xs
            layer = nnx.merge(graphdef, state)
            h, aux_B, counts_E, new_cache = layer(h, rope, mask, layer_cache, cache_index)
            return h, (aux_B, counts_E, new_cache)

        policy = remat_policy(self.remat)
        if policy is not None:
            body = jax.checkpoint(body, policy=policy)
        h, (aux_LB, counts_LE, new_cache) = jax.lax.scan(body, h, (layer_state, cache), unroll=self.scan_unroll)
        logits = self.lm_head(h[:, -1:] if last_logits else h, out_dtype=F32)
        return ModelOutput(logits.astype(F32), jnp.sum(aux_LB, axis=0), counts_LE, new_cache)

    def init_cache(self, batch_size: int, max_len: int, dtype=None) -> LayerCache:
        """An empty latent cache for `max_len` tokens: 576 numbers per token and layer for
        `seed-973m` (latent 192 + 12 heads x 32 rope dims)."""
        c = self.config
        dtype = dtype or self.dtype
        L = c.num_hidden_layers
        return LayerCache(jnp.zeros((L, batch_size, max_len, c.latent_dim), dtype),
                          jnp.zeros((L, batch_size, max_len, c.num_attention_heads, c.rope_head_dim), dtype))


def lm_loss_sums(logits_BTV: Array, labels_BT: Array) -> tuple[Array, Array]:
    """Sum of the shifted causal-LM cross-entropy over labels that are not -100, and their count.
    Position t predicts label t + 1; the labels are shifted (the last position gets -100) rather
    than the logits sliced, so that no `[B, T-1, vocab]` copy of the logits is made, nor padded
    back in the backward pass (that took about 5 s of a 40 s `seed-973m` step on a CPU)."""
    logits = logits_BTV.astype(F32)
    labels = jnp.concatenate([labels_BT[:, 1:], jnp.full_like(labels_BT[:, :1], -100)], axis=1)
    valid = labels != -100
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, logz - picked, 0.0)), jnp.sum(valid)


def _concrete(x) -> bool:
    """Whether `x`'s values can be read here (not traced, all on this process)."""
    return not isinstance(x, jax.core.Tracer) and getattr(x, "is_fully_addressable", True)


def _outside(x, size: int) -> int | None:
    """The lowest value of `x` below 0, else its highest at or above `size`, else None; None too
    where `x` cannot be read here (`_concrete`: a call inside jit is not checked)."""
    if not _concrete(x) or not np.size(x):
        return None
    a = np.asarray(x)  # (NumPy's reductions of a jax.Array inside a trace are traced)
    lo, hi = int(a.min()), int(a.max())
    return lo if lo < 0 else hi if hi >= size else None


def loss_fn(model: CustomLLM, input_ids, labels=None, **kw):
    """ARCHITECTURE.md's loss: mean shifted cross-entropy + `router_aux_loss_coef` x the balance
    loss (mean over sequences). Returns (loss, (lm_loss, aux_loss, expert_counts))."""
    if labels is not None and _concrete(labels):  # (checked as the ids are)
        lab = np.asarray(labels)
        bad = lab[(lab != -100) & ((lab < 0) | (lab >= model.config.vocab_size))]
        if bad.size:
            raise ValueError(f"label {int(bad.flat[0])} is neither -100 (ignored) nor a token id of the vocabulary "
                             f"(0 .. {model.config.vocab_size - 1})")
    out = model.forward(input_ids, **kw)
    ce_sum, n = lm_loss_sums(out.logits, input_ids if labels is None else labels)
    lm = ce_sum / n
    aux = jnp.mean(out.aux_loss)
    return lm + model.config.router_aux_loss_coef * aux, (lm, aux, out.expert_counts)


_INIT_CHUNK = 1 << 27  # numbers per random call in create_model


def create_model(config: LLMConfig, *, seed: int = 0, abstract: bool = False, shardings=None,
                 **model_kw) -> CustomLLM:
    """A freshly initialised model (ARCHITECTURE.md's scheme: Normal(0, initializer_range) for
    linear weights and embeddings, zeros for biases and `router_bias`, ones for norms).

    The normal draws come from a few `jax.random.normal` calls over chunks of parameters inside
    one `jit` (XLA compiles one random call per parameter slowly on CPU). `shardings`, a function from the abstract state to
    a pytree of shardings, places every array where it belongs as it is created.
    `abstract=True` allocates nothing: every variable is a `jax.ShapeDtypeStruct`. `seed` is an
    integer in [0, 2**32) (a NumPy integer too), as `generate`'s and `--seed`."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        # (a JAX key keeps 32 bits of it: seed 2**32 gave seed 0's weights, -1 those of 2**32 - 1)
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    seed = int(seed)  # (nnx.Rngs refuses a NumPy integer)
    model = nnx.eval_shape(lambda: CustomLLM(config, rngs=nnx.Rngs(seed), **model_kw))
    if abstract:
        return model
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree_util.tree_flatten(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    specs = [(v.get_metadata().get("init", ("zeros",)), v.get_value().shape, v.get_value().dtype) for v in leaves]
    # Normal parameters are drawn in chunks of at most _INIT_CHUNK numbers (one random call each):
    # few calls to compile, and a bounded transient beside the parameters themselves.
    chunks: list[list[int]] = [[]]
    size = 0
    for i, ((kind, *_), shape, _) in enumerate(specs):
        if kind != "normal":
            continue
        n = math.prod(shape)
        if chunks[-1] and size + n > _INIT_CHUNK:
            chunks.append([])
            size = 0
        chunks[-1].append(i)
        size += n

    def fill():
        values: list = [None] * len(specs)
        for c, members in enumerate(chunks):
            total = sum(math.prod(specs[i][1]) for i in members)
            flat = jax.random.normal(jax.random.fold_in(jax.random.key(seed), c), (total,), F32)
            if out_shardings is not None:  # every device slices its shards out of the same numbers
                replicated = jax.sharding.NamedSharding(out_shardings[0].mesh, jax.sharding.PartitionSpec())
                flat = jax.lax.with_sharding_constraint(flat, replicated)
            offset = 0
            for i in members:
                (_, std), shape, dtype = specs[i]
                n = math.prod(shape)
                values[i] = (std * flat[offset:offset + n]).reshape(shape).astype(dtype)
                offset += n
        for i, ((kind, *_), shape, dtype) in enumerate(specs):
            if kind != "normal":
                values[i] = (jnp.ones if kind == "ones" else jnp.zeros)(shape, dtype)
        return values

    out_shardings = None
    if shardings is not None:
        out_shardings = jax.tree_util.tree_leaves(shardings(state))
    values = jax.jit(fill, out_shardings=out_shardings)()
    for var, value in zip(leaves, values):
        var.set_value(value)
    return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves))
