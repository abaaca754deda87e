"""Generation with MLA's latent cache, in both frameworks (jaxllm/generate.py, torch_ref's
`generate()`), and `scripts/generate.py`."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import ROOT
from helpers import model_pair, rel_err
from jaxllm.config import LLMConfig
from jaxllm.generate import (Sampling, cache_bytes_per_token, cache_shape, full_kv_bytes_per_token, generate,
                             left_pad, sample_logits)
from torch_ref.modeling_customllm import _CACHE_FIELD

TINY = LLMConfig.from_preset("tiny")
STEPS = 32
# Prompts of different lengths: the batch is left-padded to the longest.
PROMPTS = [[5, 17, 300, 42, 7, 99, 250, 3, 11, 480, 64, 128], [23, 9, 311], [402, 77, 1, 250, 18, 200, 6]]


def _generate(jm, prompts=PROMPTS, **kw):
    """`generate` with the settings most tests share (one compilation for all of them)."""
    kw = {"max_new_tokens": STEPS, "stop_at_eos": False, "return_logits": True, "on_token": lambda *a: None, **kw}
    return generate(jm, prompts, **kw)


@pytest.fixture(scope="module")
def pair():
    return model_pair(TINY, seed=0)


@pytest.fixture(scope="module")
def greedy(pair):
    """The greedy continuations of PROMPTS (a left-padded batch) with the latent cache, and the
    host callbacks made while they were generated."""
    calls = []
    out = _generate(pair[0], on_token=lambda step, tokens, live: calls.append((step, tokens.copy(), live.copy())))
    return out, calls


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


def test_a_padded_batch_given_only_its_mask_has_each_rows_own_logits_in_both_frameworks(pair):
    """Called with an attention mask and no positions, both models count each row's positions from
    its first real token (as Hugging Face models do), with and without the latent cache: the real
    tokens of a left-padded row get the logits of that row alone."""
    jm, tm = pair
    ids, mask = left_pad(PROMPTS, TINY.pad_token_id)
    P = ids.shape[1]
    jax_logits = np.asarray(jm(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    with torch.no_grad():
        torch_logits = tm(torch.from_numpy(ids.astype(np.int64)),
                          attention_mask=torch.from_numpy(mask.astype(np.int64))).logits.numpy()
    # The same through the cache: the prompt, then one more token, masks over the whole cache.
    extra = np.full((len(PROMPTS), 1), 42, np.int32)
    mask_S = jnp.asarray(np.concatenate([mask, np.ones_like(extra, bool)], axis=1))
    cache = jm.init_cache(len(PROMPTS), P + 1)
    prefill = jm.forward(jnp.asarray(ids), attention_mask=mask_S, cache=cache, cache_index=0)
    step = jm.forward(jnp.asarray(extra), attention_mask=mask_S, cache=prefill.cache, cache_index=P)
    for b, prompt in enumerate(PROMPTS):
        real = slice(P - len(prompt), P)
        alone = np.asarray(jm(jnp.asarray([prompt + [42]])))[0]
        assert rel_err(jax_logits[b, real], alone[:-1]) <= 1e-5
        assert rel_err(torch_logits[b, real], alone[:-1]) <= 1e-5
        assert rel_err(np.asarray(prefill.logits)[b, real], alone[:-1]) <= 1e-5
        assert rel_err(np.asarray(step.logits)[b, 0], alone[-1]) <= 1e-5


def test_last_logits_are_the_last_position_of_the_full_logits(pair):
    jm, _ = pair
    ids = jnp.asarray([PROMPTS[0]])
    last = jm.forward(ids, last_logits=True).logits
    assert last.shape == (1, 1, TINY.vocab_size)
    assert rel_err(last, np.asarray(jm(ids))[:, -1:]) <= 1e-6  # a product of another shape may round apart


def test_torch_generate_with_latent_cache_equals_no_cache(pair):
    _, tm = pair
    tok_c, logits_c, out = _torch_generate(tm, PROMPTS, use_cache=True)
    tok_n, logits_n, _ = _torch_generate(tm, PROMPTS, use_cache=False)
    np.testing.assert_array_equal(tok_c, tok_n)
    for b in range(len(PROMPTS)):
        assert rel_err(logits_c[b], logits_n[b]) <= 1e-5
    # The Hugging Face cache holds the latent only: c_kv as one "head" and the rotated k_rope.
    B, S = len(PROMPTS), max(map(len, PROMPTS)) + STEPS - 1
    cache = getattr(out, _CACHE_FIELD)  # `cache`, or `past_key_values` before transformers 5.24
    assert len(cache.layers) == TINY.num_hidden_layers
    for layer in cache.layers:
        assert tuple(layer.keys.shape) == (B, 1, S, TINY.latent_dim)
        assert tuple(layer.values.shape) == (B, TINY.num_attention_heads, S, TINY.rope_head_dim)


def test_torch_beam_search_and_several_sequences_run_on_the_latent_cache(pair):
    """Hugging Face's beam search reorders the cache between steps (`DynamicCache` holding the
    latent): the same beams with and without the cache; `num_return_sequences` returns each."""
    _, tm = pair
    ids = torch.tensor([PROMPTS[2]])
    beams = {c: tm.generate(ids, num_beams=4, num_return_sequences=3, max_new_tokens=8, min_new_tokens=8,
                            do_sample=False, eos_token_id=None, pad_token_id=0, use_cache=c) for c in (True, False)}
    assert beams[True].shape == (3, len(PROMPTS[2]) + 8)
    assert torch.equal(beams[True], beams[False])
    assert len({tuple(row.tolist()) for row in beams[True]}) == 3  # three different beams


def test_torch_static_cache_is_refused_clearly(pair):
    _, tm = pair
    with pytest.raises(ValueError, match="static"), torch.no_grad():
        tm.generate(torch.tensor([PROMPTS[1]]), max_new_tokens=2, cache_implementation="static",
                    pad_token_id=TINY.pad_token_id)


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
    # top-p over the tempered distribution: at t = 0.5 it is [.685, .247, .062, .007], at 2 [.379, .294, .208, .120]
    assert drawn(Sampling(temperature=0.5, top_p=0.9)) == {0, 1}
    assert drawn(Sampling(temperature=2.0, top_p=0.7)) == {0, 1, 2}


def test_top_k_and_top_p_keep_the_candidates_that_hugging_face_keeps_ties_included():
    """Top-p keeps the smallest set reaching p, as Hugging Face's TopPLogitsWarper: of tokens tied at
    its edge, as many as needed (the higher ids, its order), not all of them (uniform logits at 0.5
    kept every token in JAX, half in PyTorch). Top-k keeps the ties with the k-th in both."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    keys = jax.random.split(jax.random.key(0), 400)
    for probs, top_k, top_p in (([0.25] * 4, 0, 0.5), ([0.4, 0.3, 0.3], 0, 0.5), ([0.3, 0.3, 0.4], 0, 0.5),
                                ([0.2, 0.4, 0.2, 0.2], 0, 0.7), ([0.4, 0.2, 0.2, 0.1, 0.1], 2, 0.9),
                                ([0.5, 0.3, 0.15, 0.05], 0, 0.6), ([0.1] * 10, 0, 0.35)):
        logits = np.log(np.array([probs], np.float32))
        hf = torch.from_numpy(logits)
        if top_k:
            hf = TopKLogitsWarper(top_k)(None, hf)
        hf_kept = set(torch.isfinite(TopPLogitsWarper(top_p)(None, hf))[0].nonzero()[:, 0].tolist())
        sampling = Sampling(temperature=1.0, top_k=top_k, top_p=top_p)
        drawn = set(np.asarray(jax.vmap(lambda k: sample_logits(jnp.asarray(logits), k, sampling))(keys)).ravel().tolist())
        assert drawn == hf_kept, (probs, top_k, top_p)


def test_each_decoding_step_draws_with_its_own_key(pair):
    """At a temperature that flattens the logits, 32 sampled tokens are nearly all different; with
    one key for every step (the same Gumbel noise) they would nearly all be the same token."""
    out = _generate(pair[0], [PROMPTS[1]], sampling=Sampling(temperature=1000.0), return_logits=False)
    assert len(set(np.asarray(out.tokens[0]).tolist())) > STEPS // 2


def test_temperature_sharpens_below_one_and_flattens_above():
    """Sampling draws from softmax(logits / temperature): frequencies over 4,000 draws are
    p^(1/t) normalised (every other sampling test uses t = 1, where * and / agree)."""
    p = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.asarray(np.log(p)[None], jnp.float32)
    keys = jax.random.split(jax.random.key(0), 4000)
    for t in (0.5, 2.0):
        drawn = np.asarray(jax.vmap(lambda k: sample_logits(logits, k, Sampling(temperature=t)))(keys)).ravel()
        want = p ** (1 / t) / np.sum(p ** (1 / t))
        np.testing.assert_allclose(np.bincount(drawn, minlength=4) / drawn.size, want, atol=0.03)


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


def test_streaming_says_which_sequences_still_run_and_compiles_programs_the_cache_keeps(pair, greedy, tmp_path):
    """Tokens reach the host between decode calls of `STREAM_CHUNK` tokens, not through a host
    callback inside the loop: JAX's persistent compilation cache refuses programs with callbacks, so
    `generate.py` used to compile its decoder afresh in every run."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    free, _ = greedy
    eos = int(free.tokens[1, 4])  # the second prompt stops after at most 5 tokens, the others later
    saved = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    cc.set_cache_dir(str(tmp_path))  # an empty cache of its own: every program here is compiled and written
    cc.reset_cache()
    calls = []
    try:
        out = _generate(pair[0], eos_token_id=eos, stop_at_eos=True, max_new_tokens=STEPS - 1,  # new programs
                        on_token=lambda step, tokens, live: calls.append((step, tokens.copy(), live.copy())))
    finally:
        cc.set_cache_dir(saved[0])
        cc.reset_cache()
        jax.config.update("jax_persistent_cache_min_compile_time_secs", saved[1])
    assert [step for step, _, _ in calls] == list(range(out.lengths.max()))
    np.testing.assert_array_equal(np.stack([t for _, t, _ in calls], 1), out.tokens[:, :len(calls)])
    for step, _, live in calls:
        np.testing.assert_array_equal(live, step < out.lengths)
    assert not calls[-1][2][1]  # the second prompt had stopped before the last token
    quiet = _generate(pair[0], eos_token_id=eos, stop_at_eos=True, max_new_tokens=STEPS - 1, on_token=None)
    for a, b in zip(out, quiet):  # not streamed: the whole loop in one call, the same results
        np.testing.assert_array_equal(a, b)
    kept = os.listdir(tmp_path)
    for program in ("jit__prefill-", "jit__decode-"):
        assert any(name.startswith(program) for name in kept), program


def test_bad_arguments_raise_naming_the_field(pair):
    jm, _ = pair
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(jm, PROMPTS, max_new_tokens=TINY.max_position_embeddings)
    with pytest.raises(ValueError, match=r"a prompt of 3 tokens \+ 126 new tokens exceeds max_position_embeddings"):
        generate(jm, [PROMPTS[1]], max_new_tokens=TINY.max_position_embeddings - 2)
    fills = generate(jm, [PROMPTS[1]], max_new_tokens=TINY.max_position_embeddings - 3, stop_at_eos=False)
    assert fills.tokens.shape == (1, TINY.max_position_embeddings - 3)  # the whole table is allowed
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(jm, PROMPTS, max_new_tokens=0)
    with pytest.raises(ValueError, match="prompts"):
        generate(jm, [[1, 2], []], max_new_tokens=4)
    with pytest.raises(ValueError, match="prompts"):
        generate(jm, [[1, TINY.vocab_size]], max_new_tokens=4)
    # Checked before the cast to int32: no wrap-around (2**32 + 5 is not 5), no truncation.
    for bad in ([1, 2**32 + 5], [1, 2**70], [1, 2.7], [True, False], np.array([1, 2**32 + 5], np.int64), [[1, 2]]):
        with pytest.raises(ValueError, match=r"prompts: (token ids must be in|prompt 1 must be a list)"):
            generate(jm, [[4, 5], bad], max_new_tokens=4)
    assert generate(jm, [np.array([4, 5], np.int64), (6,)], max_new_tokens=1).tokens.shape == (2, 1)
    with pytest.raises(ValueError, match="eos_token_id"):
        generate(jm, PROMPTS, max_new_tokens=4, eos_token_id=TINY.vocab_size)
    with pytest.raises(ValueError, match="top_p"):
        Sampling(temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        Sampling(temperature=-1.0)
    for tiny in (1e-39, 1e-300, 5e-324):  # logits / temperature overflowed: JAX drew token 0 every time
        with pytest.raises(ValueError, match=r"temperature must be 0 \(greedy\) or at least 1e-30"):
            Sampling(temperature=tiny)
    logits = jnp.asarray([[3.0, -2.0, 30.0, 29.9]])
    assert int(sample_logits(logits, jax.random.key(0), Sampling(Sampling.MIN_TEMPERATURE))[0]) == 2
    with pytest.raises(ValueError, match="top_k"):
        Sampling(top_k=-2)
    assert Sampling(1.0, np.int64(5)) == Sampling(1.0, 5)
    for bad in (-1, 2**32, 1.0, True):  # a key keeps 32 bits: 2**32 would draw seed 0's samples
        with pytest.raises(ValueError, match="seed"):
            generate(jm, PROMPTS, max_new_tokens=1, sampling=Sampling(1.0), seed=bad)


def test_numpy_numbers_are_taken_as_python_ones(pair):
    """`max_new_tokens=np.int64(2)` and `Sampling(temperature=np.float32(0.8))` (or top_p) were
    refused ("must be a positive integer, got np.int64(2)") where the seed, top_k and token ids took
    NumPy integers and temperature took np.float64 (a float subclass); a `sampling` that is not a
    Sampling failed deep inside (None: an AttributeError; a dict: jit's hash of static arguments)."""
    jm, _ = pair
    t, p = float(np.float32(0.8)), float(np.float32(0.9))
    assert Sampling(np.float32(0.8), np.int64(5), np.float32(0.9)) == Sampling(t, 5, p)
    assert type(Sampling(np.float64(0.8)).temperature) is float and type(Sampling(top_p=np.int64(1)).top_p) is float
    kw = dict(stop_at_eos=False, seed=np.uint32(3))
    ours = generate(jm, PROMPTS[1:], max_new_tokens=np.int64(2),
                    sampling=Sampling(np.float32(0.8), top_p=np.float32(0.9)), **kw)
    python = generate(jm, PROMPTS[1:], max_new_tokens=2, sampling=Sampling(t, top_p=p), **kw)
    np.testing.assert_array_equal(ours.tokens, python.tokens)
    for bad in (np.float32(-1.0), np.float64("nan")):
        with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
            Sampling(bad)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer, got np.float64"):
        generate(jm, PROMPTS, max_new_tokens=np.float64(2))
    for bad in (None, {"temperature": 0.8}):
        with pytest.raises(ValueError, match=re.escape(f"sampling must be a jaxllm.generate.Sampling, got {bad!r}")):
            generate(jm, PROMPTS, max_new_tokens=2, sampling=bad)


def test_torch_generate_past_the_position_table_is_refused_before_decoding(pair):
    """Hugging Face's `generate` only warns; the model refuses it before its first forward pass
    (not after decoding up to the table's end), as the JAX side does."""
    _, tm = pair
    calls = []
    hook = tm.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=r"up to 129 tokens .* exceed max_position_embeddings \(128\)"):
            tm.generate(torch.tensor([PROMPTS[1]]), max_new_tokens=TINY.max_position_embeddings - 2, do_sample=False)
    finally:
        hook.remove()
    assert calls == []
    assert tm.generate(torch.tensor([PROMPTS[1]]), max_new_tokens=2, do_sample=False).shape == (1, 5)
    n = TINY.max_position_embeddings - len(PROMPTS[1])  # up to the table's end is allowed
    assert tm.generate(torch.tensor([PROMPTS[1]]), max_new_tokens=n, min_new_tokens=n, do_sample=False).shape == (1, 128)
    with torch.no_grad():
        assert tm(torch.tensor([[5] * 128])).logits.shape == (1, 128, TINY.vocab_size)
    # a prompt given as inputs_embeds alone, which Hugging Face leaves out of its max_length
    embeds = tm.get_input_embeddings()(torch.tensor([[5] * 120])).detach()
    hook = tm.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=r"up to 140 positions \(inputs_embeds 120 \+ 20 new tokens\) exceed "
                                             r"max_position_embeddings \(128\)"):
            tm.generate(inputs_embeds=embeds, max_new_tokens=20, do_sample=False, pad_token_id=0)
    finally:
        hook.remove()
    assert calls == []
    assert tm.generate(inputs_embeds=embeds, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                       pad_token_id=0).shape == (1, 8)


# ---- scripts/generate.py ------------------------------------------------------------------------
TEXTS = ["Once upon a time there was a little fox who loved the forest.",
         "The sun rose over the hills and the birds began to sing.",
         "Café, naïve, jalapeño: a few words with accents."] * 20


def _script(name="generate"):
    """scripts/NAME.py as a module."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    """A small byte-level BPE (`<|endoftext|>` = 0, as in the real tokenizer) trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(
        vocab_size=TINY.vocab_size, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def script():
    return _script()


@pytest.fixture(scope="module")
def checkpoints(pair, tokenizer_json, tmp_path_factory):
    """The tiny model as an Orbax checkpoint (recording the tokenizer), as one copied to a machine
    without the tokenizer it records (only the tokenizer files it saved), and as a Hugging Face
    directory (with its tokenizer.json)."""
    from jaxllm import checkpoint, data

    jm, tm = pair
    orbax_dir = tmp_path_factory.mktemp("ckpt") / "ckpt"
    mngr = checkpoint.manager(orbax_dir)
    checkpoint.save(mngr, 0, weights=checkpoint.split_weights(jm), config=TINY, tokenizer=str(tokenizer_json))
    mngr.wait_until_finished()
    moved = tmp_path_factory.mktemp("moved") / "ckpt"
    mngr = checkpoint.manager(moved)
    checkpoint.save(mngr, 0, weights=checkpoint.split_weights(jm), config=TINY, tokenizer=str(moved / "gone.json"),
                    tokenizer_files=data.tokenizer_files(data.load_tokenizer(str(tokenizer_json))))
    mngr.wait_until_finished()
    hf_dir = tmp_path_factory.mktemp("hf") / "hf"
    tm.save_pretrained(hf_dir)
    shutil.copy(tokenizer_json, hf_dir / "tokenizer.json")
    return {"orbax": str(orbax_dir), "moved": str(moved), "hf": str(hf_dir)}


class Writes:
    """A stdout that keeps each write, to see the text arrive piece by piece."""

    def __init__(self):
        self.pieces = []

    def write(self, s):
        self.pieces.append(s)

    def flush(self):
        pass


def test_script_streams_the_same_text_from_both_checkpoint_kinds_in_both_frameworks(
        pair, script, checkpoints, tokenizer_json):
    from transformers import PreTrainedTokenizerFast

    jm, _ = pair
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json))
    prompt = "Once upon a time"
    expected = generate(jm, [tok.encode(prompt)], max_new_tokens=12, on_token=lambda *a: None)
    n = expected.lengths[0]
    want = prompt + tok.decode(expected.tokens[0, :n], skip_special_tokens=True) + "\n"
    for kind, framework, step in [("orbax", "jax", []), ("hf", "jax", []), ("moved", "jax", []),
                                  ("orbax", "torch", ["--step", "0"]), ("hf", "torch", [])]:
        out = Writes()
        args = script.parse_args(["--checkpoint", checkpoints[kind], "--prompt", prompt, "--max-new-tokens", "12",
                                  "--framework", framework, *step])
        script.run(args, out=out)
        assert "".join(out.pieces) == want, (kind, framework)
        assert len(out.pieces) >= 3  # the prompt, then the continuation as it is made


def test_both_frameworks_decode_as_told_whatever_a_directory_s_generation_config_asks(
        pair, script, checkpoints, tokenizer_json, tmp_path):
    """A Hugging Face directory's generation_config.json, which `from_pretrained` reads (here a
    repetition penalty and no repeated pairs), is not applied on the PyTorch side alone:
    `generate.py` decodes as its flags say in both frameworks, and so do the PyTorch trainer's
    samples (from an --init-from directory)."""
    from transformers import PreTrainedTokenizerFast

    from torch_ref.training import generate_samples

    asks = {"repetition_penalty": 5.0, "no_repeat_ngram_size": 2}
    hf = tmp_path / "hf"
    shutil.copytree(checkpoints["hf"], hf)
    (hf / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0,
                                                           **asks}))
    texts = {}
    for framework in ("jax", "torch"):
        out = Writes()
        script.run(script.parse_args(["--checkpoint", str(hf), "--prompt", "Once upon a time", "--max-new-tokens",
                                      "12", "--framework", framework]), out=out)
        texts[framework] = "".join(out.pieces)
    assert texts["torch"] == texts["jax"]
    _, tm = pair
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), eos_token="<|endoftext|>")
    plain = generate_samples(tm, tok, ["Once upon a time"], 12, temperature=0)
    saved = tm.generation_config
    tm.generation_config = saved.__class__(**{**saved.to_dict(), **asks})
    try:
        assert generate_samples(tm, tok, ["Once upon a time"], 12, temperature=0) == plain
    finally:
        tm.generation_config = saved



def test_script_starts_an_empty_prompt_from_the_bos_token_in_both_frameworks(pair, script, tokenizer_json, tmp_path):
    """`--prompt ""` encodes to no tokens: generation starts from the config's BOS token (here 7,
    not EOS, so that the two are told apart), in JAX and in PyTorch, and prints only the
    continuation."""
    from transformers import PreTrainedTokenizerFast

    from jaxllm import checkpoint

    jm, _ = pair
    config = TINY.replace(bos_token_id=7)
    assert config.bos_token_id != config.eos_token_id
    ckpt = tmp_path / "ckpt"
    mngr = checkpoint.manager(ckpt)
    checkpoint.save(mngr, 0, weights=checkpoint.split_weights(jm), config=config, tokenizer=str(tokenizer_json))
    mngr.wait_until_finished()
    mngr.close()
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json))

    def continuation(start):
        out = generate(jm, [[start]], max_new_tokens=8, on_token=lambda *a: None)
        return tok.decode(out.tokens[0, :out.lengths[0]], skip_special_tokens=True) + "\n"

    want = continuation(config.bos_token_id)
    assert want != continuation(config.eos_token_id)  # (the start token shows in the text)
    for framework in ("jax", "torch"):
        out = Writes()
        script.run(script.parse_args(["--checkpoint", str(ckpt), "--prompt", "", "--max-new-tokens", "8",
                                      "--framework", framework]), out=out)
        assert "".join(out.pieces) == want, framework


def test_the_jax_trainer_s_samples_give_each_prompt_its_own_room(pair, tokenizer_json, monkeypatch, capsys):
    """`--max-new-tokens` tokens for each prompt at the end of training, or as many as fit after it,
    as the PyTorch trainer's samples: a long prompt cut every prompt's continuation to its own room."""
    import jaxllm.generate
    from jaxllm.data import load_tokenizer
    from jaxllm.loop import print_samples
    from jaxllm.recipes import encode_prompt

    tok = load_tokenizer(str(tokenizer_json))
    long = next(t for t in ("the cat " * k for k in range(1, 200)) if len(encode_prompt(tok, t)) > 100)
    n = len(encode_prompt(tok, long))
    assert 88 < n < TINY.max_position_embeddings - 1  # the case being tested: 40 new tokens do not fit after it
    asked, real = [], jaxllm.generate.generate
    monkeypatch.setattr(jaxllm.generate, "generate",
                        lambda m, p, **kw: asked.append((len(p), kw["max_new_tokens"])) or real(m, p, **kw))
    texts = print_samples(pair[0], tok, ["The", long, ""], 40)
    assert sorted(asked) == [(1, TINY.max_position_embeddings - n), (2, 40)]  # was [(3, 128 - n)]
    assert len(texts) == 3 and f"'The' -> The{texts[0]}" in capsys.readouterr().out


def test_script_sampling_is_reproducible(script, checkpoints, capsys):
    argv = ["--checkpoint", checkpoints["orbax"], "--prompt", "The sun", "--max-new-tokens", "10",
            "--temperature", "0.9", "--top-k", "40", "--top-p", "0.95", "--seed", "5"]
    outputs = []
    for framework in ("jax", "jax", "torch", "torch"):
        assert script.main(argv + ["--framework", framework]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[2] == outputs[3]
    assert all(o.startswith("The sun") for o in outputs)


def test_text_stream_holds_back_split_characters(assets, script):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(assets / "smollm2-tokenizer" / "tokenizer.json"))
    text = " Naïve café — 日本語のテキスト 🙂 done."
    ids = tok.encode(text, add_special_tokens=False)
    assert any("\ufffd" in tok.decode(ids[:k]) for k in range(1, len(ids)))  # the case being tested occurs
    out = Writes()
    stream = script.TextStream(tok, out)
    for t in ids + [0]:  # then EOS, which is not printed
        stream.push(t)
    stream.end()
    assert "".join(out.pieces) == text + "\n"
    assert not any("\ufffd" in p for p in out.pieces)


def _metaspace_tokenizer():
    """A word-level tokenizer of TINY's vocabulary with Metaspace's "▁" word starts (Llama's, T5's
    kind), whose decoder drops the space of the first word it decodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<|endoftext|>", "<unk>", "▁once", "▁upon", "▁a", "▁time"]
    words += [f"▁w{i}" for i in range(TINY.vocab_size - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<unk>")


def test_a_continuation_keeps_the_space_before_its_first_word_with_a_metaspace_tokenizer(script, pair, capsys):
    from jaxllm.loop import print_samples
    from jaxllm.recipes import encode_prompt

    tok = _metaspace_tokenizer()
    prompt = encode_prompt(tok, "once upon a")
    assert prompt == [2, 3, 4] and tok.decode([5]) == "time"  # the case being tested: the space goes alone
    out = Writes()
    stream = script.TextStream(tok, out, prompt)
    for t in (5, 0):  # " time", then EOS
        stream.push(t)
    stream.end()
    assert "".join(out.pieces) == " time\n"  # was "time": "once upon atime"
    texts = print_samples(pair[0], tok, ["once upon a"], 3)  # the JAX trainer's samples
    assert texts[0].startswith(" ") or texts[0] == "", texts  # every word but the special tokens starts "▁"
    assert "'once upon a' -> once upon a" + texts[0] in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "/nonexistent/ckpt", "--prompt", "x"], "does not exist"),
    (["--checkpoint", "{tok}", "--prompt", "x"], "is not a directory"),
    (["--checkpoint", "{empty}", "--prompt", "x"], "neither a Hugging Face directory"),
    (["--checkpoint", "{trainer}", "--prompt", "x"], "is a Trainer output directory (scripts/train_torch.py): "
                                                     "pass one of its checkpoints, e.g. the latest, {trainer}/checkpoint-12"),
    (["--checkpoint", "{orbax}", "--prompt", "x", "--top-p", "2"], "--top-p must be in (0, 1], got 2.0"),
    (["--checkpoint", "{orbax}", "--prompt", "x", "--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["--checkpoint", "{hf}", "--prompt", "x", "--framework", "torch", "--temperature", "1e-39"],
     "--temperature must be 0 (greedy) or at least 1e-30"),
    (["--checkpoint", "{orbax}", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["--checkpoint", "{orbax}", "--prompt", "x", "--max-new-tokens", "1000"], "--max-new-tokens: the prompt's"),
    (["--checkpoint", "{orbax}", "--prompt", "x " * 200, "--max-new-tokens", "1"], "--prompt: its 400 tokens leave no room"),
    (["--checkpoint", "{orbax}", "--prompt", "x", "--framework", "mxnet"], "--framework"),
    (["--checkpoint", "{orbax}", "--prompt", "x", "--step", "7"], "step 7 not in"),
    (["--checkpoint", "{hf}", "--prompt", "x", "--step", "0"], "--step applies to an Orbax checkpoint directory"),
    (["--checkpoint", "{orbax}", "--prompt", "x", "--top-k", "many"], "--top-k"),
    (["--checkpoint", "{orbax}", "--prompt", "x", "--top-k", "40"],
     "--top-k only applies to sampling: give --temperature > 0 too (0 decodes greedily)"),
    (["--checkpoint", "{orbax}", "--prompt", "x", "--top-k", "4", "--top-p", "0.9"], "--top-k and --top-p only apply"),
    (["--prompt", "x"], "--checkpoint"),
    (["--checkpoint", "{orbax}", "--prompt", "a", "--prompt", "b"],
     "--prompt given 2 times: generate.py continues one prompt (run it once per prompt)"),  # (was: "b" alone)
    (["--checkpoint", "{orbax}/0", "--prompt", "x"],
     "--checkpoint {orbax}/0 is one step of an Orbax checkpoint directory: pass the directory above it, {orbax}, "
     "with --step 0"),
])
def test_script_bad_input_is_one_line_on_stderr_and_exit_2(script, checkpoints, tokenizer_json, tmp_path, capsys,
                                                            argv, message):
    (tmp_path / "empty").mkdir()
    for step in (3, 12):
        (tmp_path / "trainer" / f"checkpoint-{step}").mkdir(parents=True)
    fill = {"tok": str(tokenizer_json), "empty": str(tmp_path / "empty"), "orbax": checkpoints["orbax"],
            "trainer": str(tmp_path / "trainer"), "hf": checkpoints["hf"]}
    argv = [a.format(**fill) for a in argv]
    message = message.format(**fill)
    try:
        rc = script.main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and message in err, err


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_script_refuses_a_hugging_face_directory_whose_weights_do_not_fit_its_config(
        script, checkpoints, tmp_path, capsys, framework, monkeypatch):
    """`from_pretrained` alone would fill missing tensors with random ones (and ignore extra ones):
    the directory is checked as the converter checks it, one line, exit status 2."""
    import json

    bad = tmp_path / "hf"
    shutil.copytree(checkpoints["hf"], bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "num_hidden_layers": TINY.num_hidden_layers + 1}))
    assert script.main(["--checkpoint", str(bad), "--prompt", "the", "--framework", framework]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "decoder_layers.2." in err, err
    # A checkpoint that names no tokenizer, for a vocabulary the embedded tokenizer is not: refused.
    from jaxllm.config import LLMConfig

    monkeypatch.setattr(script, "checkpoint_info", lambda path, kind, step: (LLMConfig.from_preset("seed-973m"), None, None))
    assert script.main(["--checkpoint", checkpoints["hf"], "--prompt", "the", "--framework", framework]) == 2
    assert "names no tokenizer" in capsys.readouterr().err


def test_script_notes_when_a_checkpoint_without_a_tokenizer_is_read_with_the_embedded_one(
        pair, script, checkpoints, tokenizer_json, tmp_path, capsys, monkeypatch):
    """A Hugging Face directory without tokenizer files, or a Flax checkpoint naming none (as
    torch_to_flax.py writes from such a directory), is read with the embedded tokenizer when the
    vocabulary fits it: one note on stderr says so (it was silent). None when the checkpoint has its
    tokenizer or --tokenizer chooses one; `jaxllm.load_tokenizer` notes it as well."""
    import jaxllm
    from jaxllm import checkpoint

    monkeypatch.setenv("JAXLLM_CACHE", str(tmp_path / "cache"))
    bare_hf = shutil.copytree(checkpoints["hf"], tmp_path / "hf", ignore=shutil.ignore_patterns("tokenizer*"))
    bare_orbax = tmp_path / "ckpt"
    mngr = checkpoint.manager(bare_orbax)
    checkpoint.save(mngr, 0, weights=checkpoint.split_weights(pair[0]), config=TINY, tokenizer=None)
    mngr.wait_until_finished()
    mngr.close()
    note = "note: {} holds no tokenizer; using the embedded tokenizer (512 tokens; {})\n"
    common = ["--prompt", "The", "--max-new-tokens", "2", "--framework", "torch"]
    for path in (bare_hf, bare_orbax):
        assert script.main(["--checkpoint", str(path), *common]) == 0
        assert capsys.readouterr().err == note.format(path, "pass --tokenizer to choose another")
    for argv in (["--checkpoint", checkpoints["hf"]], ["--checkpoint", checkpoints["orbax"]],
                 ["--checkpoint", str(bare_hf), "--tokenizer", str(tokenizer_json)]):
        assert script.main([*argv, *common]) == 0
        assert capsys.readouterr().err == "", argv
    assert len(jaxllm.load_tokenizer(bare_orbax)) == TINY.vocab_size
    assert capsys.readouterr().err == note.format(bare_orbax, "if the model was trained with another, load that one "
                                                              "instead")
    jaxllm.load_tokenizer(checkpoints["moved"])
    assert capsys.readouterr().err == ""


def test_script_bad_input_from_the_command_line_has_no_traceback():
    r = subprocess.run([sys.executable, "scripts/generate.py", "--checkpoint", "/nonexistent", "--prompt", "x"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["generate.py: error: --checkpoint /nonexistent does not exist"]


# ---- scripts/evaluate.py ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def evaluate_script():
    return _script("evaluate")


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    path = tmp_path_factory.mktemp("held_out") / "held_out.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:12]))
    return path


def test_evaluate_script_gives_each_frameworks_loss_of_the_packed_batches(
        pair, evaluate_script, checkpoints, tokenizer_json, held_out, tmp_path):
    """The script's loss is the mean shifted cross-entropy of the trainers' packed batches, the same
    from an Orbax checkpoint and a Hugging Face directory, in JAX and PyTorch."""
    from jaxllm.data import DataConfig, PackedBatches, load_tokenizer
    from jaxllm.model import loss_fn

    jm, _ = pair
    with PackedBatches(DataConfig(dataset=str(held_out), seq_len=16), load_tokenizer(str(tokenizer_json)),
                       rows=2) as packed:
        want = float(np.mean([loss_fn(jm, jnp.asarray(next(packed)))[1][0] for _ in range(3)]))
    for kind in ("orbax", "hf"):
        out = Writes()
        argv = ["--checkpoint", checkpoints[kind], "--dataset", str(held_out), "--seq-len", "16", "--batch-size", "2",
                "--batches", "3", "--framework", "both", "--json", str(tmp_path / f"{kind}.json")]
        result = evaluate_script.run(evaluate_script.parse_args(argv), out=out)
        assert json.loads((tmp_path / f"{kind}.json").read_text()) == json.loads(json.dumps(result))
        assert result["batches"] == 3 and result["tokens"] == 3 * 2 * 15
        for name in ("jax", "torch"):
            assert rel_err(result["results"][name]["loss"], want) < 1e-5, (kind, name)
            assert result["results"][name]["perplexity"] == pytest.approx(np.exp(want), rel=1e-4)
        assert result["relative_difference"] < 1e-5
        text = "".join(out.pieces)
        assert f"loss {want:.4f}, perplexity " in text and "JAX and PyTorch losses differ by" in text, text


def test_evaluate_script_json_counts_the_tokens_read_and_those_predicted_and_help_names_every_field(
        evaluate_script, checkpoints, held_out, tmp_path, capsys):
    """The JSON's "tokens" was the predicted tokens, batches x rows x (seq_len - 1), where a reader
    takes the name for the tokens read, and no field was documented. `input_tokens` (read) and
    `predicted_tokens` (what the loss averages over) say which is which; "tokens" stays, the same
    count as before, for earlier readers; --help lists every field the file holds."""
    argv = ["--checkpoint", checkpoints["orbax"], "--dataset", str(held_out), "--seq-len", "16", "--batch-size", "2",
            "--batches", "2", "--json", str(tmp_path / "eval.json")]
    evaluate_script.run(evaluate_script.parse_args(argv), out=Writes())
    written = json.loads((tmp_path / "eval.json").read_text())
    assert written["batches"] == 2
    assert (written["input_tokens"], written["predicted_tokens"], written["tokens"]) == (2 * 2 * 16, 2 * 2 * 15, 2 * 2 * 15)
    with pytest.raises(SystemExit):
        evaluate_script.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "input_tokens (the tokens read: batches x batch_size x seq_len)" in help_text
    assert "predicted_tokens (those the loss averages over: batches x batch_size x (seq_len - 1)" in help_text
    assert "tokens (the same count as predicted_tokens" in help_text
    fields = list(written) + list(written["results"]["jax"]) + ["relative_difference"]
    assert [f for f in fields if not re.search(rf"\b{f}\b", help_text)] == [], help_text


def test_evaluate_script_json_names_the_data_it_measured_wherever_it_is_read(evaluate_script, checkpoints, held_out,
                                                                            tmp_path, monkeypatch):
    """The JSON named a local dataset as typed ("held.jsonl", relative to a directory it does not
    record, beside the checkpoint's absolute path) and left out the text column, config and split:
    two evaluations of one Hub dataset's validation and test splits wrote the same header. They are
    recorded as a checkpoint records its data (`jaxllm.data.stream_source`)."""
    rows = [json.loads(line) for line in held_out.read_text().splitlines()]
    (tmp_path / "held.jsonl").write_text("".join(json.dumps({"content": r["text"]}) + "\n" for r in rows))
    monkeypatch.chdir(tmp_path)
    argv = ["--checkpoint", checkpoints["orbax"], "--dataset", "held.jsonl", "--text-column", "content",
            "--seq-len", "16", "--batch-size", "2", "--batches", "1", "--json", "eval.json"]
    evaluate_script.run(evaluate_script.parse_args(argv), out=Writes())
    written = json.loads((tmp_path / "eval.json").read_text())
    assert {k: written[k] for k in ("dataset", "dataset_config", "split", "text_column")} == {
        "dataset": str(tmp_path / "held.jsonl"), "dataset_config": None, "split": "train", "text_column": "content"}
    assert written["results"]["jax"]["loss"] > 0


def test_evaluate_script_refuses_a_loss_that_is_not_finite_after_reporting_it(evaluate_script, checkpoints, held_out,
                                                                            tmp_path):
    """Weights holding a NaN give a NaN loss: reported, then an error naming the frameworks whose loss
    it is (exit status 2), with no --json written (it held the non-JSON token NaN, and the run exited
    0). A finite loss past 700 has perplexity inf: null in the JSON, which stays standard JSON."""
    from safetensors.numpy import load_file, save_file

    bad = tmp_path / "hf"
    shutil.copytree(checkpoints["hf"], bad)
    weights = load_file(bad / "model.safetensors")
    saved = tmp_path / "eval.json"
    argv = ["--checkpoint", str(bad), "--dataset", str(held_out), "--seq-len", "16", "--batch-size", "2",
            "--batches", "1", "--framework", "both", "--json", str(saved)]

    printed = Writes()

    def evaluate(change):
        save_file({k: change(k, v.copy()) for k, v in weights.items()}, bad / "model.safetensors",
                  metadata={"format": "pt"})
        printed.pieces.clear()
        return evaluate_script.run(evaluate_script.parse_args(argv), out=printed)

    nan_embedding = lambda k, v: np.full_like(v, np.nan) if k == "token_embeddings.weight" else v  # noqa: E731
    assert "token_embeddings.weight" in weights and "lm_head.bias" in weights
    with pytest.raises(ValueError, match=rf"^JAX loss is nan and the PyTorch loss is nan on dataset .*: {bad} does "
                                         rf"not give a finite loss \(nothing written to {saved}\)$"):
        evaluate(nan_embedding)
    text = "".join(printed.pieces)
    assert "     JAX: loss nan, perplexity nan" in text and " PyTorch: loss nan, perplexity nan" in text, text
    assert ": at most 1 batch of 2 x 16 tokens, in JAX and PyTorch\n" in text, text
    assert not saved.exists()

    def one_token_far_ahead(k, v):  # token 5's logit 1e4 above the rest: a loss of about 1e4
        if k == "lm_head.bias":
            v[5] = 1e4
        return v

    result = evaluate(one_token_far_ahead)
    for name in ("jax", "torch"):
        assert 700 < result["results"][name]["loss"] < float("inf") and result["results"][name]["perplexity"] is None
    assert "perplexity inf over" in "".join(printed.pieces)
    assert json.loads(saved.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}")) == \
        json.loads(json.dumps(result))


def test_evaluate_script_leaves_a_checkpoint_inside_the_dataset_directory_out_of_the_data(
        evaluate_script, checkpoints, held_out, tmp_path):
    """As the trainers leave their --ckpt-dir out of a dataset directory holding it, evaluate.py
    leaves out its --checkpoint (there, its files made the data "mix file types")."""
    (tmp_path / "data").mkdir()
    shutil.copy(held_out, tmp_path / "data")
    results = {}
    for where in ("outside", "inside"):
        ckpt = tmp_path / ("data" if where == "inside" else "") / "ck"
        shutil.copytree(checkpoints["orbax"], ckpt)
        argv = ["--checkpoint", str(ckpt), "--dataset", str(tmp_path / "data"), "--seq-len", "16", "--batch-size", "2",
                "--batches", "0", "--framework", "jax"]
        results[where] = evaluate_script.run(evaluate_script.parse_args(argv), out=Writes())
    same = lambda r: (r["batches"], r["tokens"], r["results"]["jax"]["loss"])  # noqa: E731
    assert same(results["inside"]) == same(results["outside"]) and results["inside"]["batches"] > 0


def test_evaluate_script_leaves_the_trainer_run_of_a_checkpoint_inside_the_dataset_directory_out_of_the_data(
        evaluate_script, checkpoints, held_out, tmp_path):
    """A Trainer's `checkpoint-N` inside the dataset directory: its whole run is left out, not only
    `checkpoint-N` (the other checkpoints' config.json was read as a JSON dataset's records, and
    failed; in a parquet dataset the run's files made the data "mix file types")."""
    (tmp_path / "data").mkdir()
    shutil.copy(held_out, tmp_path / "data")
    run = tmp_path / "data" / "run"
    for step in (1, 3):
        shutil.copytree(checkpoints["hf"], run / f"checkpoint-{step}")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 6.0}\n')
    argv = ["--checkpoint", str(run / "checkpoint-3"), "--dataset", str(tmp_path / "data"), "--seq-len", "16",
            "--batch-size", "2", "--batches", "0", "--framework", "torch"]
    inside = evaluate_script.run(evaluate_script.parse_args(argv), out=Writes())
    alone = evaluate_script.run(evaluate_script.parse_args([*argv[:3], str(held_out), *argv[4:]]), out=Writes())
    assert (inside["batches"], inside["tokens"]) == (alone["batches"], alone["tokens"]) and inside["batches"] > 0


def test_evaluate_script_reads_each_document_once(evaluate_script, checkpoints, tokenizer_json, held_out):
    from jaxllm.data import DataConfig, iter_documents, load_tokenizer

    tok = load_tokenizer(str(tokenizer_json))
    tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 1
                 for t in iter_documents(DataConfig(dataset=str(held_out))) if t.strip())
    argv = ["--checkpoint", checkpoints["orbax"], "--dataset", str(held_out), "--seq-len", "16", "--batch-size", "3",
            "--batches", "0"]
    result = evaluate_script.run(evaluate_script.parse_args(argv), out=Writes())
    assert result["batches"] == tokens // (3 * 16) and result["tokens"] == result["batches"] * 3 * 15
    assert list(result["results"]) == ["jax"]
    out = Writes()  # more batches asked for than the data holds: each document is still read once
    more = evaluate_script.run(evaluate_script.parse_args(argv[:-1] + ["1000"]), out=out)
    assert more["batches"] == result["batches"] and more["results"]["jax"]["loss"] == result["results"]["jax"]["loss"]
    assert f"(the data holds {result['batches']} full batches of 3 x 16 tokens, not the 1000" in "".join(out.pieces)



def test_evaluate_takes_the_batches_of_the_first_pass_when_the_data_ends_at_or_just_short_of_a_batch_s_end(
        evaluate_script, tokenizer_json, tmp_path):
    """`batches_of_one_pass` at the edges of the data: data holding exactly one batch (the batch
    ends where the data does) gives that batch, and so does data a token short of one batch more,
    or just short of two; data holding exactly two gives both. Never a batch reaching into the
    second pass, whatever --batches asks for beyond them (fewer when it asks for fewer), and each
    batch is the next stretch of the documents' tokens."""
    from jaxllm.data import DataConfig, PackedBatches, load_tokenizer

    tok = load_tokenizer(str(tokenizer_json))
    docs = TEXTS[:3]
    stream = np.concatenate([tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in docs])
    n = len(stream)
    once, twice = tmp_path / "once.jsonl", tmp_path / "twice.jsonl"
    once.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    twice.write_text(once.read_text() * 2)
    cases = [(once, 1, n, 1),            # exactly one batch
             (once, 1, n - 1, 1),        # one batch and a token
             (once, 1, n // 2 + 1, 1),   # a bit less than two batches
             (once, 1, n + 1, 0),        # not one batch
             (twice, 1, n, 2),           # exactly two batches
             (twice, 2, n, 1)]           # exactly one batch of two rows
    for path, rows, seq_len, held in cases:
        for limit in (0, 1, held, held + 1, 10):
            with PackedBatches(DataConfig(dataset=str(path), seq_len=seq_len), tok, rows=rows) as packed:
                got = list(evaluate_script.batches_of_one_pass(packed, limit))
            want = min(limit, held) if limit else held
            assert len(got) == want, (path.name, rows, seq_len, limit)
            flat = np.concatenate([b.reshape(-1) for b in got]) if got else np.zeros(0, stream.dtype)
            np.testing.assert_array_equal(flat, np.tile(stream, 2)[:want * rows * seq_len])


def test_evaluate_script_says_the_data_holds_fewer_batches_only_when_it_does(evaluate_script, checkpoints,
                                                                              tokenizer_json, tmp_path):
    """Data holding exactly one batch (it ends at the batch's end) or a bit less than two: one batch
    is evaluated with --batches 0, 1 or 2; only where more were asked for than it holds does the
    report say how many it holds (one, not the two asked for)."""
    from jaxllm.data import load_tokenizer

    tok = load_tokenizer(str(tokenizer_json))
    docs = TEXTS[:3]
    n = sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in docs)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    assert 2 * (n // 2 + 1) <= TINY.max_position_embeddings  # (the rows fit the model)
    for seq_len in (n, n // 2 + 1):
        for asked in (0, 1, 2):
            out = Writes()
            argv = ["--checkpoint", checkpoints["orbax"], "--dataset", str(data), "--seq-len", str(seq_len),
                    "--batch-size", "1", "--batches", str(asked)]
            result = evaluate_script.run(evaluate_script.parse_args(argv), out=out)
            text = "".join(out.pieces)
            assert result["batches"] == 1 and result["tokens"] == seq_len - 1, (seq_len, asked)
            assert f"over {seq_len - 1:,} predicted tokens (1 batch, " in text, text
            if asked == 2:
                assert f"(the data holds 1 full batch of 1 x {seq_len} tokens, not the 2 asked for" in text, text
            else:
                assert "the data holds" not in text, (seq_len, asked, text)


def test_evaluate_script_shows_progress_in_a_log(evaluate_script, checkpoints, held_out, capsys, monkeypatch):
    """Standard error not a terminal (a log, nohup): a progress line every PROGRESS_EVERY_S
    seconds (here every batch), where there was nothing between the first line and the result."""
    monkeypatch.setattr(evaluate_script, "PROGRESS_EVERY_S", 0.0)
    argv = ["--checkpoint", checkpoints["orbax"], "--dataset", str(held_out), "--seq-len", "16", "--batch-size", "2",
            "--batches", "3"]
    result = evaluate_script.run(evaluate_script.parse_args(argv), out=Writes())
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(":")[0] for line in lines] == [f"evaluated {i} of 3 batches" for i in (1, 2, 3)], lines
    assert lines[-1] == f"evaluated 3 of 3 batches: loss {result['results']['jax']['loss']:.4f}"


def test_a_step_without_orbax_s_own_record_reads_without_warnings(checkpoints, tmp_path, caplog):
    """A step without `_CHECKPOINT_METADATA` (Orbax's record of save times and handlers, which the
    reads here do not need): a run still saving there is deleting or finishing it while generate.py
    or evaluate.py reads. The step reads, and Orbax's three "Metadata file does not exist"
    warnings are dropped."""
    import logging

    from jaxllm import checkpoint

    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoints["orbax"], ckpt)
    (ckpt / "0" / "_CHECKPOINT_METADATA").unlink()
    with caplog.at_level(logging.WARNING):
        model, config, step = checkpoint.load_step(ckpt)
    assert step == 0 and config == TINY
    assert "Metadata file does not exist" not in caplog.text, caplog.text


def test_evaluate_script_reads_the_newest_step_of_a_run_still_saving(evaluate_script, checkpoints, held_out, tmp_path,
                                                                     monkeypatch):
    """A trainer still saving into the directory (`--keep`) deletes the step that was latest when
    the script looked, while it opens the data: without --step the script reads the newest step
    then, in both frameworks, and names it (it failed with "step 0 not in ..."); with --step, that
    step or the error."""
    from jaxllm import checkpoint

    ckpt = tmp_path / "live"
    shutil.copytree(checkpoints["orbax"], ckpt)
    looked = checkpoint.read_step_info

    def then_rotated(path, step=None):
        info = looked(path, step)
        if not (ckpt / "1").exists():  # the trainer saves step 1 and deletes step 0
            shutil.copytree(ckpt / "0", ckpt / "1")
            meta = json.loads((ckpt / "1" / "meta" / "metadata").read_text())
            (ckpt / "1" / "meta" / "metadata").write_text(json.dumps({**meta, "step": 1}))
            shutil.rmtree(ckpt / "0")
        return info

    monkeypatch.setattr(checkpoint, "read_step_info", then_rotated)
    argv = ["--checkpoint", str(ckpt), "--dataset", str(held_out), "--seq-len", "16", "--batch-size", "2",
            "--batches", "1", "--framework", "both"]
    out = Writes()
    result = evaluate_script.run(evaluate_script.parse_args(argv), out=out)
    assert result["step"] == 1 and f"evaluating {ckpt} (step 1)" in "".join(out.pieces)
    assert result["relative_difference"] < 1e-5
    with pytest.raises(Exception, match="step 0 not in"):
        evaluate_script.run(evaluate_script.parse_args(argv + ["--step", "0"]), out=Writes())


@pytest.mark.parametrize("argv, message", [
    (["--seq-len", "1"], "--seq-len must be at least 2"),
    (["--seq-len", "100000"], "--seq-len 100000 exceeds the model's max_position_embeddings"),
    (["--batch-size", "0"], "--batch-size must be positive, got 0"),
    (["--batches", "-1"], "--batches must be non-negative (0: one whole pass), got -1"),
    (["--json", "/proc/eval.json"], "--json: cannot write a file in the folder of /proc/eval.json ("),
    (["--json", "{tmp}/results/"], "--json: {tmp}/results/ ends in a slash, a folder's name (give a file name)"),
    (["--json=~/eval.json"], "--json: the folder of {tmp}/home/eval.json does not exist"),  # (~ expanded)
    (["--checkpoint", "{hf}", "--step", "1"], "--step applies to an Orbax checkpoint directory"),
    (["--dataset", "{tiny_data}"], "holds fewer than 1024 tokens: not one batch of 8 x 128"),
    (["--dataset", "{missing}"], "no such file or directory"),
    (["--framework", "jax2"], "argument --framework: invalid choice"),
])
def test_evaluate_script_bad_input_is_one_line_and_exit_2(evaluate_script, checkpoints, tmp_path, capsys, argv,
                                                          message, monkeypatch):
    (tmp_path / "tiny.txt").write_text("A few words only.\n")
    fill = {"hf": checkpoints["hf"], "tiny_data": str(tmp_path / "tiny.txt"), "missing": str(tmp_path / "no.jsonl"),
            "tmp": str(tmp_path)}
    argv = ["--checkpoint", checkpoints["orbax"]] + [a.format(**fill) for a in argv]
    message = message.format(**fill)
    (tmp_path / "results").mkdir()  # (a folder that exists: the slash is what is refused)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    try:
        rc = evaluate_script.main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    out, err = capsys.readouterr()
    assert rc == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert out == "", out  # refused before the evaluation starts
