"""The Flax model and the PyTorch reference compute the same thing (ARCHITECTURE.md)."""

import functools
import math
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from helpers import model_grads, model_pair, rel_err
from jaxllm.config import LLMConfig
from jaxllm.model import apply_rope, balance_loss, create_model, loss_fn, rope_tables, route

SEED_TREE = """\
CustomLLM(
  (token_embeddings): Embedding(49152, 768)
  (position_embeddings): Embedding(2048, 768)
  (dropout): Dropout(p=0.1, inplace=False)
  (decoder_layers): ModuleList(
    (0-29): 30 x DecoderLayer(
      (self_attn): MultiHeadLatentAttention(
        (kv_proj_d): Linear(in_features=768, out_features=192, bias=False)
        (q_proj_d): Linear(in_features=768, out_features=192, bias=False)
        (k_proj_u): Linear(in_features=192, out_features=384, bias=False)
        (v_proj_u): Linear(in_features=192, out_features=768, bias=False)
        (q_proj_u): Linear(in_features=192, out_features=384, bias=False)
        (rope_k): Linear(in_features=768, out_features=384, bias=False)
        (rope_q): Linear(in_features=192, out_features=384, bias=False)
        (o_proj): Linear(in_features=768, out_features=768, bias=False)
        (rotary_emb): RotaryEmbedding()
      )
      (mlp): LlamaMLP(
        (moe): DeepSeekMoE(
          (shared_experts): ModuleList(
            (0): DeepSeekExpertLayer(
              (gate_proj): Linear(in_features=768, out_features=1536, bias=False)
              (up_proj): Linear(in_features=768, out_features=1536, bias=False)
              (down_proj): Linear(in_features=1536, out_features=768, bias=False)
              (act_fn): SiLU()
            )
          )
          (routed_experts): ModuleList(
            (0-6): 7 x DeepSeekExpertLayer(
              (gate_proj): Linear(in_features=768, out_features=1536, bias=False)
              (up_proj): Linear(in_features=768, out_features=1536, bias=False)
              (down_proj): Linear(in_features=1536, out_features=768, bias=False)
              (act_fn): SiLU()
            )
          )
          (router): Linear(in_features=768, out_features=7, bias=False)
        )
      )
      (input_norm): CustomRMSNorm()
      (post_attn_norm): CustomRMSNorm()
    )
  )
  (lm_head): Linear(in_features=768, out_features=49152, bias=True)
)"""

TINY = LLMConfig.from_preset("tiny")


def _ids(shape, seed=0, vocab=TINY.vocab_size):
    return np.random.RandomState(seed).randint(0, vocab, shape)


def _seed_tree_from_document():
    from conftest import SHARED

    path = SHARED / "seed" / "000_c1d86efeb08b3295.txt"
    if not path.exists():
        return None
    text = path.read_text()
    block = text.split("### Example Output\n```\n", 1)[1].split("```", 1)[0]
    return block.split("\n", 1)[1].strip()  # drop the "Model parameters" line


def test_printed_tree_and_parameter_count_of_seed_preset():
    from torch_ref import CustomLLM, CustomLLMConfig

    with torch.device("meta"):  # no memory for 973M parameters
        model = CustomLLM(CustomLLMConfig.from_preset("seed-973m"))
    assert str(model) == SEED_TREE
    assert sum(p.numel() for p in model.parameters()) == 973_122_048
    assert f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M" == "973.12M"
    from_doc = _seed_tree_from_document()
    if from_doc is not None:  # the development checkout has the seed document itself
        assert str(model) == from_doc


# dense; the CPU's grouped loop (named: these 96 tokens under `sparse` would take the loop-free
# gather that decoding uses, `DeepSeekMoE._dispatch`); the GPU's gather
@pytest.mark.parametrize("moe_impl", ["dense", "grouped", "gather"])
def test_forward_parity_tiny(moe_impl):
    jm, tm = model_pair(TINY, seed=0, moe_impl=moe_impl)
    ids = _ids((2, 48))
    loss, (lm, aux, counts) = loss_fn(jm, jnp.asarray(ids))
    logits = np.asarray(jm(jnp.asarray(ids)))
    with torch.no_grad():
        out = tm(torch.from_numpy(ids), labels=torch.from_numpy(ids))
    # Routing decisions identical (inputs are not near top-k ties), so the comparison is exact math.
    np.testing.assert_array_equal(np.asarray(counts), out.expert_counts.numpy())
    assert rel_err(logits, out.logits.numpy()) <= 1e-5
    assert abs(float(loss) - float(out.loss)) <= 1e-5
    assert abs(float(aux) - float(out.aux_loss)) <= 1e-5


# Valid structures no preset has: no shared expert, one routed expert (top-1 of 1), no lm_head
# bias, one layer, latent = hidden, odd head sizes; two shared experts, every routed expert chosen
# (top-5 of 5), a latent of 1, three layers. A sequence of max_position_embeddings tokens.
UNUSUAL = {
    "no-shared-one-routed": TINY.replace(
        vocab_size=33, hidden_size=15, num_hidden_layers=1, num_attention_heads=3, latent_dim=15, nope_head_dim=1,
        rope_head_dim=2, v_head_dim=5, intermediate_size=3, num_shared_experts=0, num_routed_experts=1,
        num_experts_per_tok=1, max_position_embeddings=9, lm_head_bias=False, router_aux_loss_coef=0.5),
    "two-shared-all-routed": TINY.replace(
        vocab_size=40, hidden_size=6, num_hidden_layers=3, num_attention_heads=1, latent_dim=1, nope_head_dim=3,
        rope_head_dim=4, v_head_dim=6, intermediate_size=1, num_shared_experts=2, num_routed_experts=5,
        num_experts_per_tok=5, max_position_embeddings=11, initializer_range=0.3),
}


@pytest.mark.parametrize("name", list(UNUSUAL))
def test_unusual_structures_match_in_both_frameworks_and_convert_exactly(name):
    """Logits, losses, expert counts and gradients agree, and the converter's map round-trips the
    weights bit for bit. (Fuzzed over ~75 such configs; these two keep the branches no preset takes.)"""
    from convert.mapping import flax_to_torch, torch_to_flax
    from flax import nnx

    from jaxllm.config import count_params
    from jaxllm.weights import flatten, get_weights

    c = UNUSUAL[name]
    jm, tm = model_pair(c, seed=2, moe_impl="grouped", moe_block=2)  # blocks of 1-4 rows: several per expert
    assert sum(p.numel() for p in tm.parameters()) == count_params(c)
    ids = _ids((2, c.max_position_embeddings), seed=4, vocab=c.vocab_size)
    loss, (lm, aux, counts) = loss_fn(jm, jnp.asarray(ids))
    out = tm(torch.from_numpy(ids), labels=torch.from_numpy(ids))
    out.loss.backward()
    np.testing.assert_array_equal(np.asarray(counts), out.expert_counts.numpy())
    assert rel_err(jm(jnp.asarray(ids)), out.logits.detach().numpy()) <= 1e-5
    assert abs(float(loss) - out.loss.item()) <= 1e-5 and abs(float(aux) - out.aux_loss.item()) <= 1e-5

    weights = get_weights(jm)
    grads = flatten(nnx.to_pure_dict(model_grads(jm, jnp.asarray(ids))))
    grads = flax_to_torch({k: np.asarray(grads[k]) if k in grads else np.zeros_like(v) for k, v in weights.items()}, c)
    total = math.sqrt(sum(float(np.sum(p.grad.numpy().astype(np.float64) ** 2)) for p in tm.parameters()))
    for k, p in tm.named_parameters():
        g = p.grad.numpy()
        if c.num_routed_experts == 1 and k.endswith("router.weight"):
            # One expert: its weight s / s is 1 and the balance loss a constant, so the router's
            # gradient is 0, up to rounding in both.
            assert max(np.linalg.norm(g), np.linalg.norm(grads[k])) <= 1e-5 * total, k
        else:  # (relative to the tensor, or for one 1,000 times smaller than all of them, to a thousandth of all)
            assert np.linalg.norm(grads[k] - g) <= 1e-5 * max(np.linalg.norm(g), 1e-3 * total), k

    back = torch_to_flax(flax_to_torch(weights, c), c)
    assert sorted(back) == sorted(weights)
    for k, v in weights.items():
        np.testing.assert_array_equal(back[k], v, err_msg=str(k))


def test_loss_with_ignored_labels_parity_and_hand_computed():
    jm, tm = model_pair(TINY, seed=1)
    ids = _ids((2, 20), seed=3)
    labels = ids.copy()
    labels[0, 5:9] = -100
    labels[1, -3:] = -100
    loss, (lm, aux, _) = loss_fn(jm, jnp.asarray(ids), jnp.asarray(labels))
    logits = np.asarray(jm(jnp.asarray(ids)), np.float64)
    # By hand: log-softmax, position t predicts label t+1, mean over labels that are not -100.
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    nll = [-logp[b, t, labels[b, t + 1]] for b in range(2) for t in range(19) if labels[b, t + 1] != -100]
    assert abs(float(lm) - np.mean(nll)) <= 1e-5
    assert abs(float(loss) - (np.mean(nll) + TINY.router_aux_loss_coef * float(aux))) <= 1e-5
    with torch.no_grad():
        out = tm(torch.from_numpy(ids), labels=torch.from_numpy(labels))
    assert abs(float(out.lm_loss) - np.mean(nll)) <= 1e-5
    assert abs(float(out.loss) - float(loss)) <= 1e-5


def test_a_sequence_longer_than_the_position_table_is_refused_in_both_frameworks():
    jm, tm = model_pair(TINY, seed=0)
    ids = _ids((1, TINY.max_position_embeddings + 1))
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        jm(jnp.asarray(ids))
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        jm(jnp.asarray(ids[:, :4]), cache=jm.init_cache(1, 8), cache_index=TINY.max_position_embeddings - 3)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        tm(torch.from_numpy(ids))


def test_positions_outside_the_table_and_writes_past_the_cache_are_refused():
    """Where a gather or a cache write would clamp the index silently (and give wrong logits):
    explicit positions outside the position table (PyTorch's embedding raises an IndexError), and
    new tokens that run past the end of the cache."""
    jm, tm = model_pair(TINY, seed=0)
    ids = jnp.asarray(_ids((1, 2)))
    for bad in ([[3, TINY.max_position_embeddings]], [[-1, 0]]):
        with pytest.raises(ValueError, match="outside the position table"):
            jm(ids, positions=jnp.asarray(bad, jnp.int32))
        with pytest.raises(IndexError):
            tm(torch.tensor(np.asarray(ids)), position_ids=torch.tensor(bad))
    cache = jm.init_cache(1, 8)
    out = jm.forward(jnp.asarray(_ids((1, 6))), cache=cache, cache_index=0)
    with pytest.raises(ValueError, match="4 new tokens at cache index 6 exceed the cache's 8 positions"):
        jm.forward(jnp.asarray(_ids((1, 4), seed=1)), cache=out.cache, cache_index=6)
    jm.forward(jnp.asarray(_ids((1, 2), seed=1)), cache=out.cache, cache_index=6)  # fills it exactly
    # a cache index given as an array (as the decode loop's) is checked as an int is
    with pytest.raises(ValueError, match="1 new tokens at cache index 9 exceed the cache's 8 positions"):
        jm.forward(jnp.asarray(_ids((1, 1), seed=1)), cache=out.cache, cache_index=jnp.int32(9))
    with pytest.raises(ValueError, match="cache_index must be >= 0, got -1"):
        jm.forward(jnp.asarray(_ids((1, 1), seed=1)), cache=out.cache, cache_index=jnp.int32(-1))


def test_token_ids_and_labels_outside_the_vocabulary_are_refused_in_both_frameworks():
    """A gather clamps an id past the embedding table (600 read as 511, -3 as 509) and a label
    past the logits gave NaN (or, negative, a finite wrong loss): refused where the arrays are
    concrete, as PyTorch's embedding and cross-entropy refuse them."""
    jm, tm = model_pair(TINY, seed=0)
    ids = _ids((1, 4))
    for bad in (TINY.vocab_size, -3):
        wrong = ids.copy()
        wrong[0, 2] = bad
        with pytest.raises(ValueError, match=f"token id {bad} is outside the vocabulary \\(0 .. 511\\)"):
            jm(jnp.asarray(wrong))
        with pytest.raises(IndexError):
            tm(torch.from_numpy(wrong))
        with pytest.raises(ValueError, match=f"label {bad} is neither -100"):
            loss_fn(jm, jnp.asarray(ids), labels=jnp.asarray(wrong))
        with pytest.raises(IndexError):
            tm(torch.from_numpy(ids), labels=torch.from_numpy(wrong))
    ignored = ids.copy()
    ignored[0, 2] = -100
    assert np.isfinite(float(loss_fn(jm, jnp.asarray(ids), labels=jnp.asarray(ignored))[0]))


def test_input_ids_that_are_not_an_integer_batch_of_tokens_are_refused_by_name():
    """A 1-D row failed with 'not enough values to unpack', an empty batch with a ZeroDivisionError,
    zero tokens with NumPy's 'zero-size array to reduction', float or bool ids with JAX indexing
    errors: each is now one line naming input_ids and what was given, under jit too."""
    jm = create_model(TINY, seed=0)
    msg = "input_ids must be an integer array [batch, seq] of at least one token, got "
    for bad, got in ((jnp.zeros((16,), jnp.int32), "int32[16]"), (jnp.zeros((0, 16), jnp.int32), "int32[0, 16]"),
                     (jnp.zeros((2, 0), jnp.int32), "int32[2, 0]"), (jnp.zeros((2, 3, 4), jnp.int32), "int32[2, 3, 4]"),
                     (jnp.ones((2, 4), jnp.float32), "float32[2, 4]"), (jnp.ones((2, 4), bool), "bool[2, 4]"),
                     ([[1, 2, 3]], "list")):
        with pytest.raises(ValueError, match=re.escape(msg + got)):
            jm(bad)
        if hasattr(bad, "dtype"):
            with pytest.raises(ValueError, match=re.escape(msg + got)):
                jax.jit(jm.__call__)(bad)
    assert jm(np.ones((1, 1), np.uint32)).shape == (1, 1, TINY.vocab_size)


def test_create_model_takes_a_numpy_seed_and_refuses_one_outside_32_bits():
    """A NumPy integer seed (from a sweep over `np.arange`) failed inside `nnx.Rngs`; a seed
    outside [0, 2**32) was cut to 32 bits silently (2**32 gave seed 0's weights), where
    `generate` and `--seed` refuse it."""
    weights = create_model(TINY, seed=np.int64(3)).token_embeddings[...]
    np.testing.assert_array_equal(weights, create_model(TINY, seed=3).token_embeddings[...])
    for bad in (2**32, -1, 1.5, True):
        with pytest.raises(ValueError, match=re.escape(f"seed must be an integer in [0, 2**32), got {bad!r}")):
            create_model(TINY, seed=bad, abstract=True)


def test_causality_in_both_frameworks():
    jm, tm = model_pair(TINY, seed=2)
    ids = _ids((1, 24), seed=5)
    t = 10
    changed = ids.copy()
    changed[0, t + 1] = (changed[0, t + 1] + 1) % TINY.vocab_size
    a, b = np.asarray(jm(jnp.asarray(ids))), np.asarray(jm(jnp.asarray(changed)))
    np.testing.assert_array_equal(a[:, : t + 1], b[:, : t + 1])
    assert not np.allclose(a[:, t + 1], b[:, t + 1])
    with torch.no_grad():
        ta, tb = tm(torch.from_numpy(ids)).logits, tm(torch.from_numpy(changed)).logits
    torch.testing.assert_close(ta[:, : t + 1], tb[:, : t + 1], rtol=0, atol=1e-6)
    assert not torch.allclose(ta[:, t + 1], tb[:, t + 1])


def test_routing_top_k_weights_and_bias_in_both_frameworks():
    from torch_ref.modeling_customllm import route as torch_route

    rng = np.random.RandomState(0)
    scores = (1 / (1 + np.exp(-rng.randn(64, 7)))).astype(np.float32)
    bias0 = np.zeros(7, np.float32)
    bias = np.array([0, 0, 0, 0, 0, 0, 10.0], np.float32)  # forces expert 6 into every choice
    for b in (bias0, bias):
        jc, jw = route(jnp.asarray(scores), jnp.asarray(b), 2)
        tc, tw = torch_route(torch.from_numpy(scores), torch.from_numpy(b), 2)
        jc, jw = np.asarray(jc), np.asarray(jw)
        np.testing.assert_array_equal(jc, tc.numpy())
        np.testing.assert_allclose(jw, tw.numpy(), rtol=1e-6)
        assert jc.shape == (64, 2) and all(len(set(row)) == 2 for row in jc)  # exactly k distinct experts
        np.testing.assert_allclose(jw.sum(-1), 1.0, rtol=1e-6)
        # Weights are the chosen *unbiased* scores, normalised.
        picked = np.take_along_axis(scores, jc, -1)
        np.testing.assert_allclose(jw, picked / picked.sum(-1, keepdims=True), rtol=1e-6)
    jc0, _ = route(jnp.asarray(scores), jnp.asarray(bias0), 2)
    jcb, _ = route(jnp.asarray(scores), jnp.asarray(bias), 2)
    assert (np.asarray(jcb) == 6).any(-1).all() and not (np.asarray(jc0) == 6).any(-1).all()


def test_routing_ties_go_to_the_lower_expert_in_both_frameworks():
    from torch_ref.modeling_customllm import route as torch_route

    scores = np.full((3, 7), 0.5, np.float32)
    jc, _ = route(jnp.asarray(scores), jnp.zeros(7), 2)
    tc, _ = torch_route(torch.from_numpy(scores), torch.zeros(7), 2)
    np.testing.assert_array_equal(np.asarray(jc), [[0, 1]] * 3)
    np.testing.assert_array_equal(tc.numpy(), [[0, 1]] * 3)


def test_balance_loss_matches_formula():
    rng = np.random.RandomState(1)
    s = (1 / (1 + np.exp(-rng.randn(2, 5, 7)))).astype(np.float32)
    chosen = np.stack([np.argsort(-s[b], axis=-1, kind="stable")[:, :2] for b in range(2)])
    expected = []
    for b in range(2):
        f = np.array([7 / (2 * 5) * (chosen[b] == e).sum() for e in range(7)])
        p = (s[b] / s[b].sum(-1, keepdims=True)).mean(0)
        expected.append((f * p).sum())
    np.testing.assert_allclose(np.asarray(balance_loss(jnp.asarray(s), jnp.asarray(chosen), 7)), expected, rtol=1e-6)


def test_rope_against_direct_formula():
    d, theta = 8, 10000.0
    x = np.random.RandomState(0).randn(1, 5, 2, d).astype(np.float32)
    pos = np.array([[0, 1, 7, 100, 2047]])
    cos, sin = rope_tables(jnp.asarray(pos), d, theta)
    got = np.asarray(apply_rope(jnp.asarray(x), cos, sin))
    want = np.empty_like(x)
    for t in range(5):
        for i in range(d // 2):
            a = pos[0, t] * theta ** (-2 * i / d)
            x1, x2 = x[0, t, :, i], x[0, t, :, i + d // 2]
            want[0, t, :, i] = x1 * np.cos(a) - x2 * np.sin(a)
            want[0, t, :, i + d // 2] = x2 * np.cos(a) + x1 * np.sin(a)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    from torch_ref.modeling_customllm import RotaryEmbedding, apply_rope as torch_rope

    tcos, tsin = RotaryEmbedding(d, theta)(torch.from_numpy(pos))
    np.testing.assert_allclose(torch_rope(torch.from_numpy(x), tcos, tsin).numpy(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["grouped", "gather", "ragged"])
def test_sparse_and_dense_dispatch_agree_in_value_and_gradient(impl):
    dense = create_model(TINY, seed=4, moe_impl="dense")
    sparse = create_model(TINY, seed=4, moe_impl=impl, moe_block=8)
    ids = jnp.asarray(_ids((3, 40), seed=7))
    gd, gs = model_grads(dense, ids), model_grads(sparse, ids)
    assert rel_err(sparse(ids), dense(ids)) <= 1e-5
    for a, b in zip(jax.tree.leaves(gs), jax.tree.leaves(gd)):
        assert rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("block,tail", [(8, 8), (8, 4), (12, 4), (8, 2)])
def test_grouped_dispatch_block_and_tail_sizes_equal_dense_in_value_and_gradient(block, tail):
    """The grouped loop computes `block` rows at a time and each expert's last rows in `tail`-row
    products; skewed routing gives experts whole groups, a remainder, a lone tail block, or nothing."""
    from jaxllm.model import dense_dispatch, grouped_dispatch

    N, D, F, E = 30, 8, 12, 5
    k = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(k[0], (N, D))
    wg, wu = (jax.random.normal(kk, (E, D, F)) for kk in k[1:3])
    wd = jax.random.normal(k[3], (E, F, D))
    experts = np.repeat(np.arange(E), [21, 13, 3, 23, 0])  # 60 assignments; expert 4 gets none
    chosen = jnp.asarray(np.stack([experts[:N], experts[N:]], axis=1), jnp.int32)  # two distinct per token
    w = jax.nn.softmax(jax.random.normal(k[4], (N, 2)), axis=-1)
    r = jax.random.normal(k[5], (N, D))

    def total(f):
        return lambda x, wg, wu, wd: jnp.sum(f(x, chosen, w, wg, wu, wd) * r)

    grouped = total(lambda *a: grouped_dispatch(*a, block, tail))
    assert rel_err(grouped_dispatch(x, chosen, w, wg, wu, wd, block, tail),
                   dense_dispatch(x, chosen, w, wg, wu, wd)) <= 1e-5
    got = jax.jit(jax.grad(grouped, argnums=(0, 1, 2, 3)))(x, wg, wu, wd)
    want = jax.jit(jax.grad(total(dense_dispatch), argnums=(0, 1, 2, 3)))(x, wg, wu, wd)
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-5


def test_grouped_backward_starts_each_expert_with_its_first_product_and_equals_dense():
    """The grouped backward runs each expert's first product (4 blocks, or the widest that fits)
    before its loops, to start the weight-gradient accumulators: experts of 5, 1, 0, 3, 6, 2, 8 and 1
    blocks of 4 rows take every first width (4, 2, 1, none); the last expert's block lies within 4
    blocks of the layout's end, so its input gradient goes through a window that the end shifts.
    Both forms of the loop over the experts (Python loop, `fori_loop`): equal to dense, and to each
    other bit for bit."""
    from jaxllm.model import block_layout, dense_dispatch, grouped_dispatch

    counts = [17, 1, 0, 9, 21, 6, 29, 1]  # 84 assignments
    N, D, F, E = 42, 8, 12, len(counts)
    k = jax.random.split(jax.random.key(3), 6)
    x = jax.random.normal(k[0], (N, D))
    wg, wu = (jax.random.normal(kk, (E, D, F)) for kk in k[1:3])
    wd = jax.random.normal(k[3], (E, F, D))
    experts = np.repeat(np.arange(E), counts)
    chosen = jnp.asarray(np.stack([experts[:N], experts[N:]], axis=1), jnp.int32)  # two distinct per token
    lay = block_layout(chosen, E, 4)
    assert lay.asg_P.shape[0] // 4 - (sum(-(-c // 4) for c in counts) - 1) < 4  # the last block near the end
    w = jax.nn.softmax(jax.random.normal(k[4], (N, 2)), axis=-1)
    r = jax.random.normal(k[5], (N, D))

    def total(f):
        return jax.jit(lambda x, wg, wu, wd, chosen, w: jnp.sum(f(x, chosen, w, wg, wu, wd) * r))

    want = jax.jit(jax.grad(total(dense_dispatch), argnums=(0, 1, 2, 3)))(x, wg, wu, wd, chosen, w)
    forms = []
    for unrolled in (True, False):
        grouped = total(lambda *a, u=unrolled: grouped_dispatch(*a, 16, 4, unrolled=u))
        got = jax.jit(jax.grad(grouped, argnums=(0, 1, 2, 3)))(x, wg, wu, wd, chosen, w)  # routing traced, not constant
        for a, b in zip(got, want):
            assert rel_err(a, b) <= 1e-5, unrolled
        forms.append(got)
    for a, b in zip(*forms):
        np.testing.assert_array_equal(a, b)


def test_the_grouped_loop_over_the_experts_is_unrolled_for_large_experts_only():
    """A Python loop (static weight slices) at seed-973m width, float32 and bfloat16; a `fori_loop`
    (less to compile) at `small` and `tiny` width."""
    from jaxllm.model import unroll_experts

    for name, want in (("seed-973m", True), ("small", False), ("tiny", False)):
        c = LLMConfig.from_preset(name)
        for dtype in (jnp.float32, jnp.bfloat16):
            w = jax.ShapeDtypeStruct((c.num_routed_experts, c.hidden_size, c.intermediate_size), dtype)
            assert unroll_experts(w) is want, (name, dtype)


def test_grouped_dispatch_with_fewer_assignments_than_a_tail_block_per_expert_equals_dense():
    """Decoding-sized calls (here 3 tokens, 6 assignments over 5 experts) shrink the blocks to
    about n / E rows instead of padding each expert to a whole tail block."""
    from jaxllm.model import dense_dispatch, grouped_dispatch

    N, D, F, E = 3, 8, 12, 5
    k = jax.random.split(jax.random.key(1), 5)
    x = jax.random.normal(k[0], (N, D))
    wg, wu = (jax.random.normal(kk, (E, D, F)) for kk in k[1:3])
    wd = jax.random.normal(k[3], (E, F, D))
    chosen = jnp.asarray([[0, 3], [3, 4], [1, 0]], jnp.int32)
    w = jax.nn.softmax(jax.random.normal(k[4], (N, 2)), axis=-1)
    assert rel_err(grouped_dispatch(x, chosen, w, wg, wu, wd, 16),
                   dense_dispatch(x, chosen, w, wg, wu, wd)) <= 1e-5


def test_grouped_dispatch_of_a_short_prompt_with_an_expert_of_several_blocks_equals_dense():
    """8 tokens, 16 assignments over 5 experts: blocks of 4 rows; expert 0 takes every token (2
    blocks), expert 2 none. Values and gradients."""
    N, D, F, E = 8, 8, 12, 5
    k = jax.random.split(jax.random.key(2), 5)
    x = jax.random.normal(k[0], (N, D))
    ws = [jax.random.normal(kk, (E, D, F)) for kk in k[1:3]] + [jax.random.normal(k[3], (E, F, D))]
    chosen = jnp.stack([jnp.zeros(N, jnp.int32), jnp.asarray([1, 3, 4, 1, 3, 4, 1, 1], jnp.int32)], axis=1)
    w = jax.nn.softmax(jax.random.normal(k[4], (N, 2)), axis=-1)

    _grouped_equals_dense(x, chosen, w, ws, 16, jnp.sin)


def _grouped_equals_dense(x, chosen, w, ws, block, head):
    """`grouped_dispatch` (products of `block` rows) equals the dense dispatch in value and in the
    gradients (input and the three expert weights) of `sum(head(dispatch(...)))`."""
    from jaxllm.model import dense_dispatch, grouped_dispatch

    def loss(dispatch, x, *ws):
        return jnp.sum(head(dispatch(x, chosen, w, *ws)))

    grouped = functools.partial(grouped_dispatch, block=block)
    assert rel_err(grouped(x, chosen, w, *ws), dense_dispatch(x, chosen, w, *ws)) <= 1e-5
    g_grouped = jax.jit(jax.grad(functools.partial(loss, grouped), argnums=(0, 1, 2, 3)))(x, *ws)
    g_dense = jax.jit(jax.grad(functools.partial(loss, dense_dispatch), argnums=(0, 1, 2, 3)))(x, *ws)
    for a, b in zip(g_grouped, g_dense):
        assert rel_err(a, b) <= 1e-5


def test_grouped_dispatch_rejects_a_tail_that_does_not_divide_the_block():
    from jaxllm.model import grouped_dispatch

    x, w3 = jnp.ones((4, 2)), jnp.ones((2, 2, 2))
    with pytest.raises(ValueError, match="must divide"):
        grouped_dispatch(x, jnp.zeros((4, 1), jnp.int32), jnp.ones((4, 1)), w3, w3, w3, 4, 3)


@pytest.mark.parametrize("experts,tokens", [(1, 64), (1, 96), (2, 64)])
def test_grouped_dispatch_of_one_or_two_experts_equals_dense(experts, tokens):
    """One or two routed experts (k = 1): the layout (2-3 blocks of 32 rows here) can hold fewer
    blocks than one 128-row product takes, and the products narrow to fit. Values and gradients."""
    from jaxllm.model import block_layout

    D, F = 8, 12
    k = jax.random.split(jax.random.key(5), 6)
    x = jax.random.normal(k[0], (tokens, D))
    ws = [jax.random.normal(kk, (experts, D, F)) for kk in k[1:3]] + [jax.random.normal(k[3], (experts, F, D))]
    chosen = jax.random.randint(k[4], (tokens, 1), 0, experts)
    assert block_layout(chosen, experts, 32).asg_P.shape[0] // 32 < 4
    r = jax.random.normal(k[5], (tokens, D))
    _grouped_equals_dense(x, chosen, jnp.ones((tokens, 1)), ws, 128, lambda y: y * r)


def test_unrolled_layer_scan_equals_the_loop_in_value_and_gradient():
    loop = create_model(TINY, seed=4, scan_unroll=1)
    unrolled = create_model(TINY, seed=4)
    assert unrolled.scan_unroll is True and loop.scan_unroll == 1  # tiny: 2 layers, unrolled by default
    ids = jnp.asarray(_ids((2, 24), seed=3))
    assert rel_err(unrolled(ids), loop(ids)) <= 1e-6
    g_loop, g_unrolled = (model_grads(m, ids) for m in (loop, unrolled))
    for a, b in zip(jax.tree.leaves(g_unrolled), jax.tree.leaves(g_loop)):
        assert rel_err(a, b) <= 1e-5


def test_the_fused_attention_call_equals_attend_and_the_model_takes_it_for_causal_training(monkeypatch):
    """`attn_impl="cudnn"` calls `jax.nn.dot_product_attention`; on a CPU the same call runs through
    XLA: it equals `attend` (layout, scale, causal mask), and a model routed through it (training
    path) equals the default model in value and gradient. Cached and padded calls keep `attend`."""
    import jaxllm.model as model_lib

    r = np.random.RandomState(0)
    q, k, v = (jnp.asarray(r.randn(2, 24, 4, 16), jnp.float32) for _ in range(3))
    mask = jnp.tril(jnp.ones((24, 24), bool))[None]
    fused = model_lib.fused_causal_attention(q, k, v, 0.25, implementation="xla")
    assert rel_err(fused, model_lib.attend(q, k, v, mask, 0.25)) <= 1e-5

    calls = []

    def on_cpu(q, k, v, scale, implementation):
        calls.append(implementation)
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation="xla")

    monkeypatch.setattr(model_lib, "fused_causal_attention", on_cpu)
    plain, routed = create_model(TINY, seed=5), create_model(TINY, seed=5)
    routed.decoder_layers.self_attn.attn_impl = "cudnn"  # past the GPU check, as on a GPU
    ids = jnp.asarray(_ids((2, 24), seed=6))
    assert rel_err(routed(ids), plain(ids)) <= 1e-5 and calls and set(calls) == {"cudnn"}
    g_plain, g_routed = (model_grads(m, ids) for m in (plain, routed))
    for a, b in zip(jax.tree.leaves(g_routed), jax.tree.leaves(g_plain)):
        assert rel_err(a, b) <= 1e-5
    calls.clear()
    routed(ids, attention_mask=jnp.ones((2, 24), jnp.int32))
    assert not calls


def test_cudnn_attention_is_refused_off_a_gpu_and_outside_bf16(monkeypatch):
    import jaxllm.model as M
    from jaxllm.model import check_attn_impl

    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
        create_model(TINY, attn_impl="cudnn", dtype=jnp.bfloat16, abstract=True)
    with pytest.raises(ValueError, match="must be one of xla, cudnn"):
        check_attn_impl("flash", jnp.bfloat16)
    # On a GPU (as the model module sees it): float32 and a v_head_dim other than the query's are
    # refused, what cuDNN runs is accepted.
    monkeypatch.setattr(M.jax, "default_backend", lambda: "gpu")
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        check_attn_impl("cudnn", jnp.float32)
    with pytest.raises(ValueError, match="v_head_dim equal to nope_head_dim"):
        check_attn_impl("cudnn", jnp.bfloat16, LLMConfig.from_preset("tiny", nope_head_dim=2 * TINY.nope_head_dim))
    check_attn_impl("cudnn", jnp.bfloat16, TINY)
    check_attn_impl("cudnn", jnp.float16, TINY)


def test_remat_policies_equal_in_value_and_gradient_and_keep_what_they_name():
    from jaxllm.model import remat_policy

    ids = jnp.asarray(_ids((3, 40), seed=5))
    # One layer: a policy applies to each layer alone (and each layer is one more copy to compile).
    one_layer = LLMConfig.from_preset("tiny", num_hidden_layers=1)
    base = create_model(one_layer, seed=2, moe_impl="grouped", moe_block=8)
    g0 = model_grads(base, ids)
    # remat=True is "full" (the same policy), False is "none"
    assert remat_policy(True) is remat_policy("full") and remat_policy(False) is None is remat_policy("none")
    for policy in ("full", "moe", "dots"):
        m = create_model(one_layer, seed=2, moe_impl="grouped", moe_block=8, remat=policy)
        g = model_grads(m, ids)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0)):
            assert rel_err(a, b) <= 1e-6, policy

    # What each policy keeps for the backward pass: "moe" saves the routed experts' gate and up
    # projections (their computation does not run again), "full" only the layer's inputs.
    from jaxllm.model import grouped_dispatch, ragged_dispatch, sparse_dispatch

    def saved_residuals(f, *args):
        """The residuals that `f`'s VJP keeps, as traced: shapes only, nothing compiled or run."""
        return jax.eval_shape(lambda *a: jax.tree.leaves(jax.vjp(f, *a)[1]), *args)

    N, D, F, E = 48, 16, 40, 4
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    x = jax.random.normal(k[0], (N, D))
    w = tuple(0.1 * jax.random.normal(kk, s) for kk, s in zip(k[1:], [(E, D, F), (E, D, F), (E, F, D)]))
    chosen = jnp.stack([jnp.arange(N) % E, (jnp.arange(N) + 1) % E], axis=1)
    dispatches = [functools.partial(grouped_dispatch, block=8), functools.partial(sparse_dispatch, block=8),
                  ragged_dispatch]
    for dispatch in dispatches:
        def layer(x, w):
            return jnp.tanh(dispatch(x, chosen, jnp.full((N, 2), 0.5), *w))  # noqa: B023

        def saved_projections(policy):
            p = remat_policy(policy)
            f = layer if p is None else jax.checkpoint(layer, policy=p)  # noqa: B023
            # [rows..., F] activations of at least one row per assignment (weights are [E, D, F])
            return [a.shape for a in saved_residuals(f, x, w)  # noqa: B023
                    if a.ndim >= 2 and a.shape[-1] == F and a.shape != (E, D, F) and math.prod(a.shape[:-1]) >= 2 * N]

        for policy in ("moe", "dots", "none"):
            assert len(saved_projections(policy)) >= 2, (dispatch, policy)
        assert saved_projections("full") == [], dispatch

    # "dots" also keeps other (unbatched) products, which "moe" recomputes; neither keeps
    # batched ones (attention's core).
    def kept(policy, f, *args):
        saved = saved_residuals(jax.checkpoint(f, policy=remat_policy(policy)), *args)
        return [a.shape for a in saved if a.ndim >= 2 and a.shape[-2:] == (N, F)]

    proj = lambda x, w: jnp.sin(x @ w)  # noqa: E731
    batched = lambda x, w: jnp.sin(jnp.einsum("bnd,bdf->bnf", x, w))  # noqa: E731
    assert kept("dots", proj, x, w[0][0]) == [(N, F)] and kept("moe", proj, x, w[0][0]) == []
    assert kept("dots", batched, x[None], w[0][:1]) == [] == kept("moe", batched, x[None], w[0][:1])
    with pytest.raises(ValueError, match="remat"):
        remat_policy("some")


def test_bfloat16_compute_keeps_float32_logits_and_stays_close():
    f32 = create_model(TINY, seed=0)
    bf16 = create_model(TINY, seed=0, dtype=jnp.bfloat16)
    ids = jnp.asarray(_ids((2, 16)))
    out = bf16(ids)
    assert out.dtype == jnp.float32
    assert rel_err(out, f32(ids)) < 5e-2



def test_bfloat16_compute_gives_float32_logits_not_rounded_bfloat16_ones():
    """ARCHITECTURE.md: logits are float32 even when the matmuls run in bfloat16: the lm_head
    product accumulates into float32, so its values are not bfloat16 numbers cast up."""
    m = create_model(TINY, seed=0, dtype=jnp.bfloat16)
    logits = np.asarray(m(jnp.asarray(np.random.RandomState(0).randint(0, TINY.vocab_size, (2, 16)))))
    assert logits.dtype == np.float32
    low_bits = logits.view(np.uint32) & 0xFFFF
    assert np.mean(low_bits != 0) > 0.9  # a bfloat16 value cast to float32 has 16 zero low bits


def test_bfloat16_norm_rope_and_attention_compute_in_float32():
    """RMSNorm, RoPE and the attention logits/softmax of bfloat16 inputs equal their float32
    computation rounded once to bfloat16 at the end (within one bfloat16 ulp), also with large
    attention logits (where bfloat16 logits would move the softmax)."""
    from jaxllm.model import RMSNorm, attend

    rng = np.random.RandomState(0)
    bf = jnp.bfloat16

    def ulps(got, want):  # error in units of bfloat16 rounding of the reference
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        return float(np.max(np.abs(got - want) / (np.abs(want) * 2.0 ** -8 + 1e-30)))

    x = jnp.asarray(rng.randn(4, 16, 64) * 3, bf)
    norm = RMSNorm(64, 1e-5)
    norm.weight[...] = jnp.asarray(1 + 0.1 * rng.randn(64), jnp.float32)
    assert ulps(norm(x), norm(x.astype(jnp.float32))) <= 1.0

    q = jnp.asarray(rng.randn(2, 16, 4, 8), bf)
    cos, sin = rope_tables(jnp.asarray(np.arange(1000, 1016)[None].repeat(2, 0)), 8, 10000.0)
    assert ulps(apply_rope(q, cos, sin), apply_rope(q.astype(jnp.float32), cos, sin)) <= 1.0

    q, k, v = (jnp.asarray(rng.randn(2, 16, 4, 16) * s, bf) for s in (8.0, 8.0, 1.0))  # logits ~ +-30
    mask = jnp.tril(jnp.ones((16, 16), bool))[None]
    got = attend(q, k, v, mask, 0.25)
    want = attend(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask, 0.25)
    # float32 logits: 6e-4 (the probabilities' bfloat16 rounding, by design); bfloat16 logits: 9e-3
    assert rel_err(got.astype(jnp.float32), want) <= 3e-3


def test_a_cast_of_the_torch_model_keeps_router_bias_and_rope_in_float32():
    """`model.to(torch.bfloat16)` / `.half()` cast the weights; `router_bias` (float32 state) keeps
    its dtype and values and RoPE's frequencies stay float32, so the rotation is not rounded."""
    from torch_ref import CustomLLM, CustomLLMConfig
    from torch_ref.modeling_customllm import RotaryEmbedding

    tm = CustomLLM(CustomLLMConfig.from_preset("tiny"))
    bias = torch.linspace(-0.123456, 0.123456, TINY.num_routed_experts)
    tm.decoder_layers[0].mlp.moe.router_bias.copy_(bias)
    rope = next(m for m in tm.modules() if isinstance(m, RotaryEmbedding))
    want = rope.compute_inv_freq()
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.float()):
        cast(tm)
        assert torch.equal(tm.decoder_layers[0].mlp.moe.router_bias, bias)
        assert torch.equal(rope.inv_freq, want)
    tm.to(torch.bfloat16)
    assert tm.lm_head.weight.dtype == torch.bfloat16
    assert tm.state_dict()["decoder_layers.0.mlp.moe.router_bias"].dtype == torch.float32
    with torch.no_grad():
        assert torch.isfinite(tm(torch.from_numpy(_ids((2, 16)).astype(np.int64))).logits).all()


WIDE_LINEAR_CHECK = """
import jax, jax.numpy as jnp
from jaxllm.model import wide_linear
k = jax.random.split(jax.random.key(0), 4)
def rel(a, b):
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
for dt, tol in ((jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)):
    x, w = jax.random.normal(k[0], (2, 6, 16)).astype(dt), jax.random.normal(k[1], (16, 40)).astype(dt)
    b, r = jax.random.normal(k[2], (40,)), jax.random.normal(k[3], (2, 6, 40))
    def grad(f):
        return jax.jit(jax.grad(lambda x, w, b: jnp.sum(f(x, w, b) * r), argnums=(0, 1, 2)))
    wide = grad(lambda x, w, b: wide_linear(x, w, b, jnp.float32))
    plain = grad(lambda x, w, b: jnp.dot(x, w, preferred_element_type=jnp.float32) + b)
    for got, want in zip(wide(x, w, b), plain(x, w, b)):
        assert got.dtype == want.dtype and rel(got, want) <= tol, (dt, rel(got, want))
    barrier = "optimization_barrier" in wide.lower(x, w, b).as_text()
    assert barrier == (jax.device_count() == 1), (jax.device_count(), barrier)
print("ok", jax.device_count())
"""


@pytest.mark.parametrize("devices", [1, 8])
def test_wide_linear_gradients_equal_autodiff_with_the_barrier_on_one_device_only(devices):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    r = subprocess.run([sys.executable, "-c", WIDE_LINEAR_CHECK], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["ok", str(devices)]


@pytest.mark.parametrize("blocked, check", [
    ("jax", "import torch_ref; from torch_ref import CustomLLM, CustomLLMConfig; "
            "CustomLLM(CustomLLMConfig.from_preset('tiny'))"),
    ("torch", "import jaxllm, jax.numpy as jnp; m = jaxllm.create_model(jaxllm.LLMConfig.from_preset('tiny')); "
              "m(jnp.zeros((1, 4), jnp.int32))"),
])
def test_each_side_imports_without_the_other_framework(blocked, check):
    code = textwrap.dedent(f"""
        import sys
        for name in ("{blocked}", "{blocked}lib"):
            sys.modules[name] = None   # any import of it now fails
        {check}
        assert "{blocked}" not in [m for m in sys.modules if sys.modules[m] is not None]
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_torch_model_follows_hugging_face_output_options():
    """`output_hidden_states` gives the embeddings and each layer's output (the last one is what
    `lm_head` reads); `return_dict=False` gives the output as a tuple, loss first."""
    from torch_ref import CustomLLM, CustomLLMConfig

    torch.manual_seed(0)
    model = CustomLLM(CustomLLMConfig.from_llm_config(TINY)).eval()
    x = torch.randint(0, TINY.vocab_size, (2, 8))
    with torch.no_grad():
        out = model(x, labels=x, output_hidden_states=True)
        assert model(x).hidden_states is None
        as_tuple = model(x, labels=x, return_dict=False)
    assert len(out.hidden_states) == TINY.num_hidden_layers + 1
    torch.testing.assert_close(model.lm_head(out.hidden_states[-1]).float(), out.logits)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], out.loss)
    torch.testing.assert_close(as_tuple[1], out.logits)


@pytest.mark.parametrize("impl", ["gather", "grouped"])
def test_sparse_dispatch_gradients_gather_rows_instead_of_scattering_them(impl):
    """The sparse dispatches' backward passes move rows and weights with gathers and a one-hot
    product (`gather_rows`, `take_experts`): no floating-point scatter-add is left in the gradient
    (on a GPU a quarter of a seed-973m step at micro-batch 128 went to them), and the gradients equal
    the dense reference's, with skewed routing (an expert with no rows, one with several blocks)."""
    from jaxllm.model import dense_dispatch, grouped_dispatch, sparse_dispatch

    N, D, F, E = 30, 8, 12, 5
    k = jax.random.split(jax.random.key(5), 6)
    x = jax.random.normal(k[0], (N, D))
    wg, wu = (jax.random.normal(kk, (E, D, F)) for kk in k[1:3])
    wd = jax.random.normal(k[3], (E, F, D))
    experts = np.repeat(np.arange(E), [21, 13, 3, 23, 0])
    chosen = jnp.asarray(np.stack([experts[:N], experts[N:]], axis=1), jnp.int32)
    w = jax.nn.softmax(jax.random.normal(k[4], (N, 2)), axis=-1)
    r = jax.random.normal(k[5], (N, D))
    dispatch = sparse_dispatch if impl == "gather" else grouped_dispatch

    def total(f):
        return jax.jit(jax.grad(lambda x, wg, wu, wd, chosen, w: jnp.sum(f(x, chosen, w, wg, wu, wd) * r),
                                argnums=(0, 1, 2, 3)))

    sparse = total(lambda *a: dispatch(*a, 8))
    hlo = sparse.lower(x, wg, wu, wd, chosen, w).as_text(dialect="hlo")
    float_scatters = [line for line in hlo.splitlines() if " scatter(" in line and re.search(r"= (f32|bf16)\[", line)]
    assert not float_scatters, float_scatters[:3]
    for a, b in zip(sparse(x, wg, wu, wd, chosen, w), total(dense_dispatch)(x, wg, wu, wd, chosen, w)):
        assert rel_err(a, b) <= 1e-5


def test_gather_rows_and_take_experts_have_the_gradients_of_plain_indexing():
    """Their hand-written transposes equal autodiff of the indexing they replace, bitwise in float32
    for the rows (two uses per row, summed in order) and to float32 rounding for the weights."""
    from jaxllm.model import block_layout, gather_rows, take_experts

    N, K, E, D = 12, 2, 4, 6
    chosen = jnp.asarray(np.random.RandomState(0).randint(0, E, (N, K)), jnp.int32)
    lay = block_layout(chosen, E, 4)
    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], (N, D))
    g = jax.random.normal(k[1], (lay.asg_P.shape[0], D))

    def plain(x):
        return jnp.sum(jnp.concatenate([x, jnp.zeros((1, D))])[lay.asg_P // K] * g)

    def ours(x):
        return jnp.sum(gather_rows(x, lay.asg_P // K, lay.dest_M.reshape(N, K)) * g)

    np.testing.assert_array_equal(jax.grad(ours)(x), jax.grad(plain)(x))
    y = jax.random.normal(k[2], (lay.asg_P.shape[0], D))
    h = jax.random.normal(k[3], (N * K, D))
    np.testing.assert_array_equal(
        jax.grad(lambda y: jnp.sum(gather_rows(y, lay.dest_M, lay.asg_P[:, None]) * h))(y),
        jax.grad(lambda y: jnp.sum(y[lay.dest_M] * h))(y))
    w = jax.random.normal(k[0], (E, 3, 5))
    hw = jax.random.normal(k[1], (lay.block_expert.shape[0], 3, 5))
    got = jax.grad(lambda w: jnp.sum(take_experts(w, lay.block_expert, E) * hw))(w)
    want = jax.grad(lambda w: jnp.sum(w[lay.block_expert] * hw))(w)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_gather_dispatch_gradient_in_bfloat16_is_near_the_dense_one():
    """The weights' one-hot transpose runs on bfloat16 operands (a CPU has no bf16 x bf16 -> f32
    product for it), and agrees with the dense dispatch to bfloat16 rounding."""
    from jaxllm.model import dense_dispatch, sparse_dispatch

    N, D, F, E = 40, 16, 24, 5
    k = jax.random.split(jax.random.key(6), 5)
    x = jax.random.normal(k[0], (N, D), jnp.bfloat16)
    wg, wu = (jax.random.normal(kk, (E, D, F), jnp.bfloat16) / 4 for kk in k[1:3])
    wd = jax.random.normal(k[3], (E, F, D), jnp.bfloat16) / 4
    chosen = jnp.asarray(np.random.RandomState(1).randint(0, E, (N, 2)), jnp.int32)
    w = jax.nn.softmax(jax.random.normal(k[4], (N, 2)), axis=-1)

    def grads(f):
        return jax.jit(jax.grad(lambda *ws: jnp.sum(f(x, chosen, w, *ws).astype(jnp.float32) ** 2),
                                argnums=(0, 1, 2)))(wg, wu, wd)

    for a, b in zip(grads(lambda *a: sparse_dispatch(*a, 8)), grads(dense_dispatch)):
        assert a.dtype == jnp.bfloat16 and rel_err(a.astype(jnp.float32), b.astype(jnp.float32)) <= 2e-2


def test_sparse_means_the_platforms_dispatch_with_its_default_block(monkeypatch):
    from jaxllm import model as M

    assert M.training_dispatch("sparse") == ("grouped", 128)  # this CPU
    assert M.training_dispatch("sparse", 64) == ("grouped", 64)
    assert M.training_dispatch("gather") == ("gather", 1024)
    assert M.training_dispatch("dense") == ("dense", None)
    assert M.resolve_moe_impl("sparse", few_assignments=True) == "gather"  # decoding on a CPU
    monkeypatch.setattr(M.jax, "default_backend", lambda: "gpu")
    assert M.training_dispatch("sparse") == ("gather", 1024)
    assert M.resolve_moe_impl("sparse", few_assignments=True) == "gather"
    monkeypatch.setattr(M.jax, "default_backend", lambda: "tpu")
    assert M.training_dispatch("sparse") == ("ragged", None)
