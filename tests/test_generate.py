"""Generation with MLA's latent cache, in both frameworks (jaxllm/generate.py, torch_ref's
`generate()`), and `scripts/generate.py`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from helpers import model_pair, rel_err
from jaxllm.config import LLMConfig
from jaxllm.generate import (Sampling, cache_bytes_per_token, cache_shape, full_kv_bytes_per_token, generate,
                             left_pad, sample_logits)

TINY = LLMConfig.from_preset("tiny")
STEPS = 32
# Prompts of different lengths: the batch is left-padded to the longest.
PROMPTS = [[5, 17, 300, 42, 7, 99, 250, 3, 11, 480, 64, 128], [23, 9, 311], [402, 77, 1, 250, 18, 200, 6]]


class Recorder:
    """An `on_token` callback that keeps what it is given. One instance for the whole module, so
    that the runs below share one compilation."""

    def __init__(self):
        self.calls = []

    def __call__(self, step, tokens, live):
        self.calls.append((step, tokens.copy(), live.copy()))


STREAM = Recorder()


def _generate(jm, prompts=PROMPTS, **kw):
    """`generate` with the settings most tests share (one compilation for all of them)."""
    kw = {"max_new_tokens": STEPS, "stop_at_eos": False, "return_logits": True, "on_token": STREAM, **kw}
    return generate(jm, prompts, **kw)


@pytest.fixture(scope="module")
def pair():
    return model_pair(TINY, seed=0)


@pytest.fixture(scope="module")
def greedy(pair):
    """The greedy continuations of PROMPTS (a left-padded batch) with the latent cache, and the
    host callbacks made while they were generated."""
    STREAM.calls.clear()
    out = _generate(pair[0])
    return out, list(STREAM.calls)


def _torch_generate(tm, prompts, steps=STEPS, pad=True, **kw):
    ids, mask = left_pad(prompts, TINY.pad_token_id)
    ids = torch.from_numpy(ids.astype(np.int64))
    if pad:
        kw["attention_mask"] = torch.from_numpy(mask.astype(np.int64))
    with torch.no_grad():
        out = tm.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                          pad_token_id=TINY.pad_token_id, eos_token_id=None, return_dict_in_generate=True,
                          output_logits=True, **kw)
    return out.sequences[:, ids.shape[1]:].numpy(), torch.stack(out.logits, 1).numpy(), out


def test_jax_cached_decoding_equals_full_recomputation(pair, greedy):
    jm, _ = pair
    cached, _ = greedy
    full = _generate(jm, use_cache=False)
    np.testing.assert_array_equal(cached.tokens, full.tokens)
    assert cached.logits.shape == (len(PROMPTS), STEPS, TINY.vocab_size)
    for b in range(len(PROMPTS)):
        assert rel_err(cached.logits[b], full.logits[b]) <= 1e-5


def test_jax_padded_batch_equals_plain_forward_of_each_sequence(pair, greedy):
    """Left padding is invisible: positions count from each prompt's first token, pads are masked.
    Every step's logits equal those of a plain forward pass over the unpadded prompt + output."""
    jm, _ = pair
    out, _ = greedy
    for b, prompt in enumerate(PROMPTS):
        seq = np.concatenate([prompt, out.tokens[b, :-1]])[None]
        plain = np.asarray(jm(jnp.asarray(seq)))[0, len(prompt) - 1:]
        assert rel_err(out.logits[b], plain) <= 1e-5
        np.testing.assert_array_equal(out.tokens[b], plain.argmax(-1))


def test_torch_generate_with_latent_cache_equals_no_cache(pair):
    _, tm = pair
    tok_c, logits_c, out = _torch_generate(tm, PROMPTS, use_cache=True)
    tok_n, logits_n, _ = _torch_generate(tm, PROMPTS, use_cache=False)
    np.testing.assert_array_equal(tok_c, tok_n)
    for b in range(len(PROMPTS)):
        assert rel_err(logits_c[b], logits_n[b]) <= 1e-5
    # The Hugging Face cache holds the latent only: c_kv as one "head" and the rotated k_rope.
    B, S = len(PROMPTS), max(map(len, PROMPTS)) + STEPS - 1
    assert len(out.cache.layers) == TINY.num_hidden_layers
    for layer in out.cache.layers:
        assert tuple(layer.keys.shape) == (B, 1, S, TINY.latent_dim)
        assert tuple(layer.values.shape) == (B, TINY.num_attention_heads, S, TINY.rope_head_dim)


def test_jax_and_torch_greedy_outputs_are_the_same_tokens(pair, greedy):
    _, tm = pair
    jax_out, _ = greedy
    torch_tokens, torch_logits, _ = _torch_generate(tm, PROMPTS)  # left-padded batch
    np.testing.assert_array_equal(jax_out.tokens, torch_tokens)
    for b in range(len(PROMPTS)):
        assert rel_err(jax_out.logits[b], torch_logits[b]) <= 1e-5
    # One prompt, no padding and no attention mask on the torch side.
    torch_tokens, torch_logits, _ = _torch_generate(tm, PROMPTS[:1], pad=False)
    np.testing.assert_array_equal(jax_out.tokens[:1], torch_tokens)
    assert rel_err(jax_out.logits[0], torch_logits[0]) <= 1e-5


def test_cache_bytes_per_token_is_576_per_layer_for_seed_973m():
    seed = LLMConfig.from_preset("seed-973m")
    shapes = cache_shape(seed, batch_size=2, max_len=8)  # abstract: nothing allocated
    assert shapes.c_kv.shape == (30, 2, 8, 192) and shapes.k_rope.shape == (30, 2, 8, 12, 32)
    assert cache_bytes_per_token(seed) == 576 * 30 * 4
    assert cache_bytes_per_token(seed, jnp.bfloat16) == 576 * 30 * 2
    assert full_kv_bytes_per_token(seed) == 12 * (64 + 64) * 30 * 4  # 1,536 numbers per layer
    # The formula agrees with a real (tiny) cache.
    from jaxllm.model import create_model

    real = create_model(TINY).init_cache(1, 5)
    assert sum(x.nbytes for x in jax.tree.leaves(real)) == 5 * cache_bytes_per_token(TINY)


def test_sampling_is_reproducible_with_a_seed(pair, greedy):
    jm, _ = pair
    s = Sampling(temperature=1.0, top_k=50, top_p=0.9)
    a, b, c = (_generate(jm, sampling=s, seed=seed) for seed in (7, 7, 8))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    assert not np.array_equal(a.tokens, greedy[0].tokens)


def test_top_k_and_top_p_keep_the_right_candidates():
    probs = np.array([[0.5, 0.3, 0.15, 0.05]])
    logits = jnp.asarray(np.log(probs), jnp.float32)
    keys = jax.random.split(jax.random.key(0), 400)

    def drawn(sampling):
        return set(np.asarray(jax.vmap(lambda k: sample_logits(logits, k, sampling))(keys)).ravel().tolist())

    assert drawn(Sampling(temperature=1.0)) == {0, 1, 2, 3}
    assert drawn(Sampling(temperature=1.0, top_k=2)) == {0, 1}
    assert drawn(Sampling(temperature=1.0, top_p=0.5)) == {0}  # 0.5 already reaches 0.5
    assert drawn(Sampling(temperature=1.0, top_p=0.6)) == {0, 1}
    assert drawn(Sampling(temperature=1.0, top_p=0.85)) == {0, 1, 2}
    assert drawn(Sampling(temperature=1.0, top_k=3, top_p=0.99)) == {0, 1, 2}
    assert int(sample_logits(logits, keys[0], Sampling())[0]) == 0


def test_generation_stops_at_eos(pair, greedy):
    jm, tm = pair
    free, _ = greedy
    eos = int(free.tokens[1, 4])  # the fifth token of the second prompt becomes "EOS"
    out = _generate(jm, eos_token_id=eos, stop_at_eos=True)
    for b in range(len(PROMPTS)):
        hits = np.flatnonzero(free.tokens[b] == eos)
        n = hits[0] + 1 if hits.size else STEPS
        assert out.lengths[b] == n
        np.testing.assert_array_equal(out.tokens[b, :n], free.tokens[b, :n])
        assert (out.tokens[b, n:] == TINY.pad_token_id).all()
    assert out.lengths[1] <= 5
    # The torch reference stops at the same place.
    ids, mask = left_pad([PROMPTS[1]], TINY.pad_token_id)
    with torch.no_grad():
        seq = tm.generate(torch.from_numpy(ids.astype(np.int64)), max_new_tokens=STEPS, do_sample=False,
                          eos_token_id=eos, pad_token_id=TINY.pad_token_id)
    np.testing.assert_array_equal(seq[0, ids.shape[1]:].numpy(), out.tokens[1, :out.lengths[1]])


def test_tokens_are_streamed_as_they_are_made(greedy):
    out, calls = greedy
    assert [step for step, _, _ in calls] == list(range(STEPS))
    np.testing.assert_array_equal(np.stack([t for _, t, _ in calls], 1), out.tokens)
    assert all(live.all() for _, _, live in calls)


def test_bad_arguments_raise_naming_the_field(pair):
    jm, _ = pair
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(jm, PROMPTS, max_new_tokens=TINY.max_position_embeddings)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(jm, PROMPTS, max_new_tokens=0)
    with pytest.raises(ValueError, match="prompts"):
        generate(jm, [[1, 2], []], max_new_tokens=4)
    with pytest.raises(ValueError, match="prompts"):
        generate(jm, [[1, TINY.vocab_size]], max_new_tokens=4)
    with pytest.raises(ValueError, match="eos_token_id"):
        generate(jm, PROMPTS, max_new_tokens=4, eos_token_id=TINY.vocab_size)
    with pytest.raises(ValueError, match="top_p"):
        Sampling(temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        Sampling(temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        Sampling(top_k=-2)
