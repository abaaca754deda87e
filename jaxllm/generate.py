"""Text generation with MLA's latent cache: one prefill, then a jitted decode loop.

Per layer and token the cache holds only `c_kv` (latent_dim numbers) and the rotated `k_rope`
(heads x rope_head_dim): 576 numbers for `seed-973m` instead of 1,536 for full keys and values
(ARCHITECTURE.md). The prefill computes `k_nope` and `v` from `c_kv` as training does (and the
logits of the last prompt position only, the one the first new token needs); each
one-token decode step attends on the cached latent directly, with `k_proj_u` folded into the
query and `v_proj_u` into the output ("absorbed" MLA, `MultiHeadLatentAttention._absorbed`).

Two jitted programs with static shapes: a prefill, then a decode `lax.while_loop` that makes one
token per step until every sequence has emitted EOS or max_new_tokens is reached (in one call, or
`STREAM_CHUNK` tokens per call when they are streamed to the host). Prompts are left-padded to the
longest one (P tokens) and the cache holds P + max_new_tokens slots. With left padding all
sequences end at the same cache slot, so one scalar `cache_index` serves the whole batch, while
each sequence's positions count from 0 at its first real token and the pads are masked out.

`use_cache=False` is the reference (and the benchmark's baseline): every step runs the whole
model on the full [B, P + max_new_tokens] buffer (static shapes) and reads the logits of the last
real token.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.config import LLMConfig
from jaxllm.model import positions_from_mask

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. `temperature=0` is greedy (argmax, ties to the lower id);
    otherwise the logits are divided by `temperature`, then cut to the `top_k` best (0: no cut;
    tokens tied with the k-th kept), then to the smallest set whose probability reaches `top_p` (1: no
    cut; of tokens tied at its edge, the higher ids), and a token is drawn. The order and the ties are
    Hugging Face's (temperature, top-k, top-p). A positive temperature is at least
    `MIN_TEMPERATURE`: below it, float32 logits divided by it overflowed (JAX drew token 0 on every
    step, PyTorch's sampler failed on the infinite probabilities)."""

    MIN_TEMPERATURE = 1e-30

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        for name in ("temperature", "top_p"):  # a NumPy number as the same Python float (np.float32 was refused)
            if isinstance(getattr(self, name), (np.integer, np.floating)):
                object.__setattr__(self, name, float(getattr(self, name)))
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not self.temperature >= 0 or math.isinf(self.temperature):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if 0 < self.temperature < self.MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or at least {self.MIN_TEMPERATURE:g}, got "
                             f"{self.temperature!r}: float32 logits divided by it overflow")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        object.__setattr__(self, "top_k", int(self.top_k))  # (a NumPy integer too; one jit cache key)
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample_logits(logits_BV: Array, key: Array, sampling: Sampling) -> Array:
    """One token per row of `logits_BV` (float32) under `sampling`; returns int32 [B]."""
    if sampling.greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits = logits_BV.astype(jnp.float32) / sampling.temperature
    if sampling.top_k and sampling.top_k < logits.shape[-1]:
        kth_B1 = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth_B1, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        # The n best tokens, equal logits ranked as Hugging Face's TopPLogitsWarper ranks them (the
        # higher id first): a cut by value kept every token tied with the last one, more than the
        # smallest set (uniform logits at top_p 0.5 kept all of them, PyTorch half).
        B, V = logits.shape
        order_BV = V - 1 - jnp.argsort(-logits[:, ::-1], axis=-1, stable=True)  # token ids, best first
        probs = jax.nn.softmax(jnp.take_along_axis(logits, order_BV, axis=-1), axis=-1)
        before_BV = jnp.cumsum(probs, axis=-1) - probs  # probability of the better tokens
        n_keep_B1 = jnp.sum(before_BV < sampling.top_p, axis=-1, keepdims=True)  # >= 1
        keep_BV = jnp.zeros((B, V), bool).at[jnp.arange(B)[:, None], order_BV].set(jnp.arange(V) < n_keep_B1)
        logits = jnp.where(keep_BV, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int,
             vocab_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token lists of different lengths -> (ids [B, P] int32, mask [B, P] bool), padded on the
    left so that every prompt ends in the last column. ValueError for an empty prompt, or one that
    is not integer token ids (in [0, vocab_size) when given), checked before the cast to int32."""
    if len(prompts) == 0:
        raise ValueError("prompts: at least one prompt is needed")
    limit = vocab_size if vocab_size is not None else 2**31
    rows = []
    for b, p in enumerate(prompts):
        tokens = np.asarray(p).tolist()  # Python ints, whatever the container: checked before the cast
        if isinstance(tokens, list) and len(tokens) == 0:
            raise ValueError(f"prompts: prompt {b} is empty (give at least one token, e.g. BOS)")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise ValueError(f"prompts: prompt {b} must be a list of integer token ids")
        if min(tokens) < 0 or max(tokens) >= limit:
            raise ValueError(f"prompts: token ids must be in [0, {limit}), prompt {b} has {min(tokens)}..{max(tokens)}")
        rows.append(tokens)
    P = max(len(row) for row in rows)
    ids = np.full((len(prompts), P), pad_token_id, np.int32)
    mask = np.zeros((len(prompts), P), bool)
    for b, row in enumerate(rows):
        ids[b, P - len(row):] = np.asarray(row, np.int32)
        mask[b, P - len(row):] = True
    return ids, mask


class Generation(NamedTuple):
    tokens: np.ndarray  # [B, max_new_tokens] int32; pad_token_id after a sequence stops
    lengths: np.ndarray  # [B] tokens made per sequence, its EOS included
    logits: np.ndarray | None = None  # [B, max_new_tokens, V] float32, the distribution of each token


def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, sampling: Sampling = Sampling(),
             seed: int = 0, eos_token_id: int | None = None, stop_at_eos: bool = True, pad_token_id: int | None = None,
             use_cache: bool = True, on_token: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
             return_logits: bool = False) -> Generation:
    """Continue each prompt (a list of token ids) by up to `max_new_tokens` tokens.

    A sequence stops after it emits `eos_token_id` (default: the config's) unless `stop_at_eos`
    is false; the loop ends when every sequence has stopped. `pad_token_id` (default: the
    config's) fills the left padding and the tokens after a stop. `seed` makes sampling
    reproducible. `on_token(step, tokens_B, live_B)` is called on the host for each token, in
    order, as the decode loop returns every `STREAM_CHUNK` tokens (streaming); `live_B` says which
    sequences were still running. Compilations are cached on the shapes, `sampling`, `use_cache`,
    `return_logits` and whether there is an `on_token`; token ids and the seed are runtime values.
    The programs hold no host callback, so JAX's persistent compilation cache can keep them.
    """
    c: LLMConfig = model.config
    eos_token_id = c.eos_token_id if eos_token_id is None else eos_token_id
    pad_token_id = c.pad_token_id if pad_token_id is None else pad_token_id
    for name, v in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v < c.vocab_size:
            raise ValueError(f"{name} must be a token id in [0, {c.vocab_size}), got {v!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    max_new_tokens = int(max_new_tokens)  # (a NumPy integer too, as seed and top_k; one jit cache key)
    if not isinstance(sampling, Sampling):
        raise ValueError(f"sampling must be a jaxllm.generate.Sampling, got {sampling!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        # (a JAX key keeps 32 bits of it: seeds 2**32 apart would draw the same samples)
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    ids, mask = left_pad(prompts, pad_token_id, c.vocab_size)
    P = ids.shape[1]
    if P + max_new_tokens > c.max_position_embeddings:
        raise ValueError(
            f"max_new_tokens: a prompt of {P} tokens + {max_new_tokens} new tokens exceeds "
            f"max_position_embeddings ({c.max_position_embeddings})")
    graphdef, state = nnx.split(model)
    s = _prefill(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), jnp.int32(pad_token_id),
                 max_new_tokens=max_new_tokens, use_cache=use_cache, return_logits=return_logits)
    key, eos = jax.random.key(seed), jnp.int32(eos_token_id if stop_at_eos else -1)
    chunk = STREAM_CHUNK if on_token is not None else max_new_tokens
    made = 0
    while True:
        s = _decode(graphdef, state, s, jnp.asarray(mask), key, eos, jnp.int32(pad_token_id), chunk=chunk,
                    sampling=sampling, use_cache=use_cache)
        i = int(s["i"])
        if on_token is not None:
            tokens, lengths = np.asarray(s["tokens"]), np.asarray(s["lengths"])
            for step in range(made, i):  # a sequence was running at `step` iff it made that token
                on_token(step, tokens[:, step], step < lengths)
        made = i
        if i >= max_new_tokens or np.asarray(s["done"]).all():
            break
    logits = np.asarray(s["all_logits"]) if return_logits else None
    return Generation(np.asarray(s["tokens"]), np.asarray(s["lengths"]), logits)


# Tokens per decode call when streaming: each call returns to the host, which then passes the
# new tokens to `on_token` (no host callback inside the program, so JAX's persistent compilation
# cache can keep it; a callback makes JAX refuse to cache a program).
STREAM_CHUNK = 8


def _prompt_layout(mask_BP, max_new_tokens: int):
    """The mask and positions of the whole [B, P + max_new_tokens] buffer."""
    B, _ = mask_BP.shape
    mask_BS = jnp.concatenate([mask_BP, jnp.ones((B, max_new_tokens), bool)], axis=1)
    return mask_BS, positions_from_mask(mask_BS)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "use_cache", "return_logits"))
def _prefill(graphdef, state, ids_BP, mask_BP, pad_id, *, max_new_tokens, use_cache, return_logits):
    """The prompt's pass: the decode loop's first state (the cache, or the token buffer without one,
    and the logits that the first new token is drawn from)."""
    B, P = ids_BP.shape
    N = max_new_tokens
    mask_BS, positions_BS = _prompt_layout(mask_BP, N)
    model = nnx.merge(graphdef, state)  # the MoE dispatch sizes its blocks by each call's tokens
    if use_cache:
        out = model.forward(ids_BP, positions=positions_BS[:, :P], attention_mask=mask_BS,
                            cache=model.init_cache(B, P + N), cache_index=0, last_logits=True)
        memory, logits = out.cache, out.logits[:, -1]
    else:
        memory = jnp.concatenate([ids_BP, jnp.full((B, N), pad_id, ids_BP.dtype)], axis=1)  # [B, S]
        out = model.forward(memory, positions=positions_BS, attention_mask=mask_BS)
        logits = out.logits[:, P - 1]
    return dict(i=jnp.int32(0), memory=memory, logits=logits, tokens=jnp.full((B, N), pad_id, jnp.int32),
                done=jnp.zeros((B,), bool), lengths=jnp.zeros((B,), jnp.int32),
                all_logits=jnp.zeros((B, N, logits.shape[-1]) if return_logits else (0,), jnp.float32))


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk", "sampling", "use_cache"), donate_argnames=("s",))
def _decode(graphdef, state, s, mask_BP, key, eos_id, pad_id, *, chunk, sampling, use_cache):
    """Up to `chunk` more tokens: a `while_loop` from the state `s` that `_prefill` (or the call
    before) left, until `chunk` tokens are made, every sequence has stopped, or the buffer is full.
    `eos_id` -1: never stop early."""
    _, P = mask_BP.shape
    N = s["tokens"].shape[1]
    mask_BS, positions_BS = _prompt_layout(mask_BP, N)
    model = nnx.merge(graphdef, state)
    return_logits = s["all_logits"].ndim == 3

    if use_cache:
        def next_logits(memory, tok_B, i):
            """Feed token i (cache slot P + i) and return the logits that follow it."""
            o = model.forward(tok_B[:, None], positions=jax.lax.dynamic_slice_in_dim(positions_BS, P + i, 1, 1),
                              attention_mask=mask_BS, cache=memory, cache_index=P + i)
            return o.cache, o.logits[:, 0]
    else:
        def next_logits(memory, tok_B, i):
            """Write token i into the buffer and run the whole model on it again."""
            memory = jax.lax.dynamic_update_slice_in_dim(memory, tok_B[:, None].astype(memory.dtype), P + i, 1)
            o = model.forward(memory, positions=positions_BS, attention_mask=mask_BS)
            return memory, jax.lax.dynamic_index_in_dim(o.logits, P + i, 1, keepdims=False)

    end = jnp.minimum(s["i"] + chunk, N)

    def cond(s):
        return (s["i"] < end) & ~jnp.all(s["done"])

    def body(s):
        i, live = s["i"], ~s["done"]
        tok = sample_logits(s["logits"], jax.random.fold_in(key, i), sampling)
        tok = jnp.where(live, tok, pad_id)
        done = s["done"] | (tok == eos_id)
        all_logits = s["all_logits"].at[:, i].set(s["logits"]) if return_logits else s["all_logits"]
        memory, logits = next_logits(s["memory"], tok, i)
        return dict(i=i + 1, memory=memory, logits=logits, tokens=s["tokens"].at[:, i].set(tok), done=done,
                    lengths=s["lengths"] + live, all_logits=all_logits)

    return jax.lax.while_loop(cond, body, s)


def cache_shape(config: LLMConfig, batch_size: int, max_len: int, dtype=jnp.float32):
    """The latent cache's shapes and dtypes (`jax.ShapeDtypeStruct`s), nothing allocated."""
    from jaxllm.model import create_model

    model = create_model(config, abstract=True, dtype=dtype)
    return jax.eval_shape(lambda: model.init_cache(batch_size, max_len))


def cache_bytes_per_token(config: LLMConfig, dtype=jnp.float32) -> int:
    """Bytes of latent cache per token of one sequence, all layers: (latent_dim + heads x
    rope_head_dim) x layers x dtype size (576 x 30 x 4 for `seed-973m` in float32)."""
    shapes = cache_shape(config, 1, 1, dtype)
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(shapes))


def full_kv_bytes_per_token(config: LLMConfig, dtype=jnp.float32) -> int:
    """What a standard cache of full keys and values would take per token: heads x (qk_head_dim +
    v_head_dim) x layers x dtype size (1,536 numbers per layer for `seed-973m`)."""
    c = config
    return c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * c.num_hidden_layers * jnp.dtype(dtype).itemsize
