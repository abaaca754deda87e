"""ARCHITECTURE.md written out independently of both frameworks: the forward pass and loss as a
float64 NumPy transcription of its pseudo-code, the initialisation scheme, embedding dropout, the
`seed-973m` table and the seed document's training recipe. The parity tests (test_model.py,
test_convert.py) show that the two frameworks agree with each other; these show that what they
agree on is the definition."""

import re

import numpy as np
import pytest
import torch

from helpers import model_pair, rel_err
from jaxllm.config import LLMConfig

TINY = LLMConfig.from_preset("tiny")


# ---- the forward pass and the loss, from the pseudo-code ------------------------------------------
def definition_forward(sd: dict, c: LLMConfig, ids: np.ndarray):
    """ARCHITECTURE.md's forward pass on the canonical PyTorch names, in float64, token by token
    for the routed experts. Returns logits [B, T, V], the balance loss per sequence summed over
    layers [B], and the (token, slot) assignments per layer and routed expert [L, E]."""
    def w(name):
        return np.asarray(sd[name], np.float64)

    def linear(x, name):
        return x @ w(name).T

    def rms_norm(x, name):
        return w(name) * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + c.rms_norm_eps)

    def silu(z):
        return z / (1 + np.exp(-z))

    def expert(x, prefix):
        return linear(silu(linear(x, prefix + "gate_proj.weight")) * linear(x, prefix + "up_proj.weight"),
                      prefix + "down_proj.weight")

    B, T = ids.shape
    H, nope, rope, dv = c.num_attention_heads, c.nope_head_dim, c.rope_head_dim, c.v_head_dim
    E, k = c.num_routed_experts, c.num_experts_per_tok
    pos = np.arange(T)
    inv_freq = c.rope_theta ** (-2 * np.arange(rope // 2) / rope)
    freqs = pos[:, None] * inv_freq[None]
    emb = np.concatenate([freqs, freqs], -1)  # [T, rope]
    cos, sin = np.cos(emb)[None, :, None], np.sin(emb)[None, :, None]

    def rotate(x):  # rotate-half: x*cos + rotate_half(x)*sin
        x1, x2 = x[..., :rope // 2], x[..., rope // 2:]
        return x * cos + np.concatenate([-x2, x1], -1) * sin

    h = w("token_embeddings.weight")[ids] + w("position_embeddings.weight")[pos][None]
    aux, counts = np.zeros(B), []
    for i in range(c.num_hidden_layers):
        p = f"decoder_layers.{i}."
        x = rms_norm(h, p + "input_norm.weight")
        a = p + "self_attn."
        c_q, c_kv = linear(x, a + "q_proj_d.weight"), linear(x, a + "kv_proj_d.weight")
        q_nope = linear(c_q, a + "q_proj_u.weight").reshape(B, T, H, nope)
        q_rope = rotate(linear(c_q, a + "rope_q.weight").reshape(B, T, H, rope))
        k_nope = linear(c_kv, a + "k_proj_u.weight").reshape(B, T, H, nope)
        k_rope = rotate(linear(x, a + "rope_k.weight").reshape(B, T, H, rope))  # from x itself
        v = linear(c_kv, a + "v_proj_u.weight").reshape(B, T, H, dv)
        q, key = np.concatenate([q_nope, q_rope], -1), np.concatenate([k_nope, k_rope], -1)
        # The scale: 1/sqrt(nope + rope), the project's reading of "/ sqrt(64)" (README, "Model").
        s = np.einsum("bthd,bshd->bhts", q, key) / np.sqrt(nope + rope)
        s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)  # causal
        prob = np.exp(s - s.max(-1, keepdims=True))
        prob /= prob.sum(-1, keepdims=True)
        h = h + linear(np.einsum("bhts,bshd->bthd", prob, v).reshape(B, T, H * dv), a + "o_proj.weight")

        x = rms_norm(h, p + "post_attn_norm.weight").reshape(B * T, -1)
        m = p + "mlp.moe."
        out = np.zeros_like(x)
        for j in range(c.num_shared_experts):
            out += expert(x, f"{m}shared_experts.{j}.")
        scores = 1 / (1 + np.exp(-linear(x, m + "router.weight")))  # [N, E]
        chosen = np.argsort(-(scores + w(m + "router_bias")), axis=-1, kind="stable")[:, :k]  # ties: lower index
        weights = np.take_along_axis(scores, chosen, -1)  # from the unbiased scores
        weights /= weights.sum(-1, keepdims=True)
        for n in range(B * T):
            for slot in range(k):
                out[n] += weights[n, slot] * expert(x[n:n + 1], f"{m}routed_experts.{chosen[n, slot]}.")[0]
        h = h + out.reshape(B, T, -1)

        chosen_BTK, s_BTE = chosen.reshape(B, T, k), scores.reshape(B, T, E)
        f = E / (k * T) * np.stack([(chosen_BTK == e).sum((1, 2)) for e in range(E)], -1)  # [B, E]
        P = (s_BTE / s_BTE.sum(-1, keepdims=True)).mean(1)
        aux += (f * P).sum(-1)
        counts.append(np.bincount(chosen.ravel(), minlength=E))
    logits = linear(h, "lm_head.weight") + (w("lm_head.bias") if c.lm_head_bias else 0.0)  # no final norm
    return logits, aux, np.stack(counts)


def definition_loss(logits, labels, aux, coef):
    """Shifted cross-entropy, mean over labels that are not -100, + coef x the balance loss (mean
    over sequences)."""
    lg, lb = logits[:, :-1], labels[:, 1:]
    top = lg.max(-1, keepdims=True)
    logz = (np.log(np.exp(lg - top).sum(-1, keepdims=True)) + top)[..., 0]
    valid = lb != -100
    picked = np.take_along_axis(lg, np.where(valid, lb, 0)[..., None], -1)[..., 0]
    return ((logz - picked) * valid).sum() / valid.sum() + coef * aux.mean()


@pytest.mark.parametrize("overrides", [{}, {"nope_head_dim": 4, "rope_head_dim": 8}])
def test_both_frameworks_compute_the_definitions_forward_pass_and_loss(overrides):
    """Logits, loss (with ignored labels), balance loss and expert counts of both frameworks equal
    the pseudo-code's, with a non-zero router bias (it chooses, never weights). The second config
    has nope + rope (12) != v_head_dim (16), so the attention scale is pinned down too."""
    import jax.numpy as jnp

    from helpers import torch_model_from_flax
    from jaxllm.model import create_model, loss_fn

    c = LLMConfig.from_preset("tiny", **overrides)
    jm = create_model(c, seed=0)
    # Weights of a trained model's size rather than the initial 0.02: attention logits of order 1
    # (at initialisation attention is nearly uniform, whatever its scale or rotation), spread router
    # scores, logits of several units.
    attn = jm.decoder_layers.self_attn
    for proj in (attn.q_proj_d, attn.kv_proj_d, attn.q_proj_u, attn.k_proj_u, attn.rope_q, attn.rope_k):
        proj.kernel[...] = 10 * proj.kernel[...]
    jm.decoder_layers.mlp.router.kernel[...] = 5 * jm.decoder_layers.mlp.router.kernel[...]
    jm.lm_head.kernel[...] = 5 * jm.lm_head.kernel[...]
    bias = (0.05 * np.random.RandomState(1).randn(c.num_hidden_layers, c.num_routed_experts)).astype(np.float32)
    jm.decoder_layers.mlp.router_bias[...] = jnp.asarray(bias)
    tm = torch_model_from_flax(jm, c)
    sd = {k: v.numpy() for k, v in tm.state_dict().items()}
    ids = np.random.RandomState(0).randint(0, c.vocab_size, (2, 24))
    labels = ids.copy()
    labels[0, 3:7] = -100
    labels[1, -2:] = -100

    logits, aux, counts = definition_forward(sd, c, ids)
    want = definition_loss(logits, labels, aux, c.router_aux_loss_coef)
    unbiased = {k: np.zeros_like(v) if k.endswith("router_bias") else v for k, v in sd.items()}
    assert (definition_forward(unbiased, c, ids)[2] != counts).any()  # the bias changes some choices

    loss, (_, j_aux, j_counts) = loss_fn(jm, jnp.asarray(ids), jnp.asarray(labels))
    np.testing.assert_array_equal(np.asarray(j_counts), counts)
    assert rel_err(jm(jnp.asarray(ids)), logits) <= 1e-5
    assert abs(float(loss) - want) <= 1e-5
    assert abs(float(j_aux) - aux.mean()) <= 1e-5

    with torch.no_grad():
        out = tm(torch.from_numpy(ids), labels=torch.from_numpy(labels))
    np.testing.assert_array_equal(out.expert_counts.numpy(), counts)
    assert rel_err(out.logits.numpy(), logits) <= 1e-5
    assert abs(float(out.loss) - want) <= 1e-5
    assert abs(float(out.aux_loss) - aux.mean()) <= 1e-5


# ---- initialisation -------------------------------------------------------------------------------
def _check_initialisation(sd: dict, c: LLMConfig, framework: str):
    """Normal(0, initializer_range) for every Linear weight and both embeddings, zeros for
    lm_head.bias and router_bias, ones for the norms; every tensor drawn on its own."""
    std = c.initializer_range
    families: dict[str, list[np.ndarray]] = {}
    for name, t in sd.items():
        t = np.asarray(t, np.float64)
        if name.endswith(("router_bias", "lm_head.bias")):
            assert not t.any(), (framework, name)
        elif name.endswith("norm.weight"):
            assert (t == 1).all(), (framework, name)
        else:
            family = ".".join(part for part in name.split(".") if not part.isdigit())
            families.setdefault(family, []).append(t.ravel())
    assert len(families) == 8 + 6 + 4, (framework, sorted(families))  # attention 8, experts 2x3, router, embeddings 2, lm_head
    for family, parts in families.items():
        x = np.concatenate(parts)
        n = x.size
        assert abs(x.mean()) <= 5 * std / np.sqrt(n), (framework, family, x.mean())
        assert abs(x.std() / std - 1) <= 5 / np.sqrt(2 * n), (framework, family, x.std())
    # A normal, not a truncated normal or a uniform of the same spread: 4.55% of the draws lie
    # beyond 2 standard deviations (neither of the others has any there).
    x = np.asarray(sd["token_embeddings.weight"], np.float64).ravel()
    beyond = np.mean(np.abs(x) > 2 * std)
    assert abs(beyond - 0.0455) <= 5 * np.sqrt(0.0455 * 0.9545 / x.size), (framework, beyond)
    # No two tensors (layers, experts) share their values.
    heads = [tuple(np.asarray(t).ravel()[:8]) for name, t in sd.items() if np.asarray(t).std() > 0]
    assert len(set(heads)) == len(heads), framework


def test_initialisation_follows_the_definition_in_both_frameworks():
    from convert.mapping import flax_to_torch
    from jaxllm.model import create_model
    from jaxllm.weights import get_weights
    from torch_ref import CustomLLM, CustomLLMConfig

    _check_initialisation(flax_to_torch(get_weights(create_model(TINY, seed=0)), TINY), TINY, "jax")
    torch.manual_seed(0)
    tm = CustomLLM(CustomLLMConfig.from_llm_config(TINY))
    _check_initialisation({k: v.numpy() for k, v in tm.state_dict().items()}, TINY, "torch")


# ---- embedding dropout ----------------------------------------------------------------------------
def test_embedding_dropout_is_on_token_plus_position_embeddings_in_training_only():
    """With every layer's output projections zeroed (o_proj, each expert's down_proj) the layers
    pass h through, and an identity lm_head shows it: h = dropout(tok[ids] + pos), with about
    `embedding_dropout` of the entries zeroed and the rest scaled by 1 / (1 - p), in training
    only (JAX: a dropout key; PyTorch: `model.train()`)."""
    import jax
    import jax.numpy as jnp

    jm, tm = model_pair(TINY, seed=0)
    D, p = TINY.hidden_size, TINY.embedding_dropout
    assert p == 0.1
    eye = np.zeros((D, TINY.vocab_size), np.float32)
    eye[:, :D] = np.eye(D)
    jm.decoder_layers.self_attn.o_proj.kernel[...] = 0 * jm.decoder_layers.self_attn.o_proj.kernel[...]
    for experts in (jm.decoder_layers.mlp.routed_experts, jm.decoder_layers.mlp.shared_experts):
        experts.down_proj[...] = 0 * experts.down_proj[...]
    jm.lm_head.kernel[...] = jnp.asarray(eye)
    with torch.no_grad():
        for layer in tm.decoder_layers:
            layer.self_attn.o_proj.weight.zero_()
            for expert in (*layer.mlp.moe.routed_experts, *layer.mlp.moe.shared_experts):
                expert.down_proj.weight.zero_()
        tm.lm_head.weight.copy_(torch.from_numpy(eye.T.copy()))

    ids = np.random.RandomState(0).randint(0, TINY.vocab_size, (8, 64))
    h0 = (np.asarray(jm.token_embeddings[...])[ids] + np.asarray(jm.position_embeddings[...])[:64][None])

    def check(train, evaluated, framework):
        np.testing.assert_allclose(evaluated, h0, rtol=1e-6, atol=1e-7, err_msg=framework)
        dropped = train == 0
        assert abs(dropped.mean() - p) <= 0.01, (framework, dropped.mean())  # 6 standard deviations
        np.testing.assert_allclose(train[~dropped], h0[~dropped] / (1 - p), rtol=1e-5, atol=1e-7, err_msg=framework)

    j_train = np.asarray(jm(jnp.asarray(ids), dropout_rng=jax.random.key(0)))[..., :D]
    check(j_train, np.asarray(jm(jnp.asarray(ids)))[..., :D], "jax")
    torch.manual_seed(0)
    with torch.no_grad():
        t_train = tm.train()(torch.from_numpy(ids)).logits[..., :D].numpy()
        t_eval = tm.eval()(torch.from_numpy(ids)).logits[..., :D].numpy()
    check(t_train, t_eval, "torch")


# ---- the seed-973m table and the seed document's run ----------------------------------------------
SEED_TABLE = dict(
    vocab_size=49152, hidden_size=768, num_hidden_layers=30, num_attention_heads=12, latent_dim=192,
    nope_head_dim=32, rope_head_dim=32, v_head_dim=64, intermediate_size=1536, num_shared_experts=1,
    num_routed_experts=7, num_experts_per_tok=2, max_position_embeddings=2048, rope_theta=10000.0,
    rms_norm_eps=1e-5, embedding_dropout=0.1, lm_head_bias=True, tie_word_embeddings=False,
    initializer_range=0.02, router_bias_update_rate=0.001, router_aux_loss_coef=0.0001,
    bos_token_id=0, eos_token_id=0, pad_token_id=0,
)


def test_the_seed_preset_is_the_table_in_both_frameworks():
    from torch_ref import CustomLLMConfig

    jax_side = LLMConfig.from_preset("seed-973m").to_dict()
    hf = CustomLLMConfig.from_preset("seed-973m")
    torch_side = {k: getattr(hf, k) for k in SEED_TABLE}
    assert {k: jax_side[k] for k in SEED_TABLE} == SEED_TABLE
    assert torch_side == SEED_TABLE
    assert set(jax_side) == set(SEED_TABLE) | {"model_type"}  # nothing beyond the table


def test_the_seed_recipe_is_the_seed_documents_run_in_both_trainers(tmp_path, monkeypatch):
    """`--recipe seed`: sequence 256, micro-batch 4, accumulation 8, AdamW lr 2e-5 with 2,000
    warm-up steps and cosine decay, weight decay 0.01, clip 1.0, 10,000 steps, float32, on
    seed-973m, as both scripts parse it and as the Trainer's arguments and optax's schedule get it."""
    import importlib
    import sys

    from conftest import ROOT
    from jaxllm.recipes import check_run
    from jaxllm.train import OptimConfig, lr_schedule
    from torch_ref.training import resolve_dtype, training_arguments

    monkeypatch.delenv("USE_TORCH", raising=False)  # train_jax.py sets it on import; restored after the test
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        train_jax, train_torch = (importlib.import_module(m) for m in ("train_jax", "train_torch"))
    finally:
        sys.path.pop(0)
    _, jrc = train_jax.parse_args(["--recipe", "seed"])
    _, trc = train_torch.parse_args(["--recipe", "seed"])
    want = dict(preset="seed-973m", seq_len=256, batch_size=4, grad_accum=8, lr=2e-5, warmup_steps=2000,
                weight_decay=0.01, clip_norm=1.0, steps=10_000, dataset="HuggingFaceTB/smollm-corpus",
                dataset_config="cosmopedia-v2", tokenizer="HuggingFaceTB/cosmo2-tokenizer", dropout=True)
    for rc in (jrc, trc):
        assert {k: getattr(rc, k) for k in want} == want
    # --init-from without --preset and --config: the checkpoint's own model (preset None)
    for script in (train_jax, train_torch):
        assert script.parse_args(["--init-from", "ck"])[1].preset is None
        assert script.parse_args(["--init-from", "ck", "--preset", "tiny"])[1].preset == "tiny"
        assert script.parse_args(["--init-from", "ck", "--recipe", "seed"])[1].preset == "seed-973m"
        assert script.parse_args([])[1].preset == "small"
    # with local copies of the data (the README's command) the recipe's Hub config is not theirs
    for script in (train_jax, train_torch):
        rc = script.parse_args(["--recipe", "seed", "--dataset", "corpus/*.parquet"])[1]
        assert (rc.dataset, rc.dataset_config, rc.tokenizer) == ("corpus/*.parquet", None, want["tokenizer"])
        # ... but it is the recipe's dataset's, named again
        rc = script.parse_args(["--recipe", "seed", "--dataset", want["dataset"]])[1]
        assert rc.dataset_config == want["dataset_config"]
        # an error about a setting the recipe gave, and no flag, says whose it is
        for argv, said in ((["--recipe", "seed"], "--seq-len 256 (the seed recipe's) exceeds"),
                           (["--recipe", "seed", "--seq-len", "256"], "--seq-len 256 exceeds")):
            with pytest.raises(ValueError, match=re.escape(said)):
                check_run(script.parse_args(argv)[1], 128)
    args = training_arguments(trc, str(tmp_path), per_device_batch=trc.batch_size, save=False, use_cpu=True)
    assert (args.learning_rate, args.warmup_steps, args.max_steps, args.weight_decay, args.max_grad_norm) == \
        (2e-5, 2000, 10_000, 0.01, 1.0)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (4, 8)
    assert getattr(args.lr_scheduler_type, "value", None) == "cosine"
    assert getattr(args.optim, "value", None) == "adamw_torch"
    assert (args.adam_beta1, args.adam_beta2, args.adam_epsilon) == (0.9, 0.999, 1e-8)
    schedule = lr_schedule(OptimConfig(lr=jrc.lr, warmup_steps=jrc.warmup_steps, total_steps=jrc.steps,
                                       weight_decay=jrc.weight_decay, clip_norm=jrc.clip_norm))
    np.testing.assert_allclose([float(schedule(s)) for s in (0, 1000, 2000, 6000, 9999)],
                               [0.0, 1e-5, 2e-5, 1e-5, 2e-5 * 0.5 * (1 + np.cos(np.pi * 7999 / 8000))],
                               rtol=1e-5, atol=1e-12)

    # float32 in both, also where PyTorch's `--dtype auto` would pick bfloat16 (a GPU that has it);
    # `--dtype` still chooses, and other recipes keep `auto`.
    assert jrc.dtype == "float32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **kw: True)
    assert resolve_dtype(trc.dtype) == "float32"
    assert resolve_dtype(train_torch.parse_args(["--recipe", "seed", "--dtype", "bfloat16"])[1].dtype) == "bfloat16"
    assert resolve_dtype(train_torch.parse_args([])[1].dtype) == "bfloat16"


def test_the_pytorch_cache_holds_only_the_latent_and_the_rotated_rope_keys():
    """Per token and layer, `latent_dim` + heads x `rope_head_dim` numbers (576 for seed-973m, 48
    for tiny), not full keys and values; `c_kv` as it came out of kv_proj_d and `k_rope` rotated."""
    from torch_ref import CustomLLM, CustomLLMConfig
    from torch_ref.modeling_customllm import apply_rope

    seed = LLMConfig.from_preset("seed-973m")
    assert seed.latent_dim + seed.num_attention_heads * seed.rope_head_dim == 576
    torch.manual_seed(0)
    tm = CustomLLM(CustomLLMConfig.from_llm_config(TINY)).eval()
    B, T = 2, 5
    ids = torch.randint(0, TINY.vocab_size, (B, T))
    with torch.no_grad():
        out = tm(ids, use_cache=True, output_hidden_states=True)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    per_token_layer = sum(t.numel() for t in tensors) / (B * T * TINY.num_hidden_layers)
    assert per_token_layer == TINY.latent_dim + TINY.num_attention_heads * TINY.rope_head_dim == 48
    # Layer 0's entries are what the definition says: c_kv = kv_proj_d(x), k_rope = rope(rope_k(x)).
    layer, h = tm.decoder_layers[0], out.hidden_states[0]
    with torch.no_grad():
        x = layer.input_norm(h)
        attn = layer.self_attn
        cos, sin = attn.rotary_emb(torch.arange(T)[None].expand(B, T))
        k_rope = apply_rope(attn.rope_k(x).view(B, T, TINY.num_attention_heads, TINY.rope_head_dim), cos, sin)
    c_kv, k_rope_cached = cache.layers[0].keys, cache.layers[0].values
    torch.testing.assert_close(c_kv.reshape(B, T, -1), attn.kv_proj_d(x), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(k_rope_cached.transpose(1, 2), k_rope, rtol=1e-6, atol=1e-7)


def test_the_jax_train_step_applies_embedding_dropout():
    """The train step of `Trainer(dropout=True)` (train_jax.py's default) computes its loss with
    embedding dropout: not the model's plain loss (which a step without dropout equals to 1e-6)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxllm import sharding as shd
    from jaxllm.model import loss_fn
    from jaxllm.train import OptimConfig, Trainer

    mesh = shd.make_mesh(None, jax.devices()[:1])
    ids = np.random.RandomState(0).randint(0, TINY.vocab_size, (2, 16))
    tr = Trainer(TINY, OptimConfig(lr=1e-3, warmup_steps=0, total_steps=2), mesh, batch_size=2, seq_len=16)
    assert tr.dropout  # the default
    state = tr.init_state()
    plain = float(nnx.jit(lambda m, ids: loss_fn(m, ids)[0])(tr.model(state), jnp.asarray(ids)))
    _, metrics = tr.step_fn(state, tr.put_batch(ids))
    # At initialisation the loss is near log(vocab) with or without dropout: dropout moves it by
    # about 2e-4 here, float32 rounding by about 1e-6.
    assert abs(float(metrics["loss"]) - plain) > 2e-5, (float(metrics["loss"]), plain)


def test_the_router_runs_in_float32_under_bfloat16_compute_in_both_frameworks():
    """`s = sigmoid(router(x))` in float32 while the experts run in bfloat16 (JAX `dtype=bfloat16`,
    PyTorch autocast): the balance loss and the choices equal those of float32 scores of the same
    input. A bfloat16 router product moves the scores by about 1e-3."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxllm.model import DeepSeekMoE, balance_loss, route
    from torch_ref import CustomLLMConfig
    from torch_ref.modeling_customllm import DeepSeekMoE as TorchMoE
    from torch_ref.modeling_customllm import balance_loss as torch_balance_loss
    from torch_ref.modeling_customllm import route as torch_route

    B, T, E, k = 4, 32, TINY.num_routed_experts, TINY.num_experts_per_tok
    x = np.random.RandomState(0).randn(B, T, TINY.hidden_size).astype(np.float32)

    moe = DeepSeekMoE(TINY, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    moe.router.kernel[...] = 5 * moe.router.kernel[...]  # spread scores
    xb = jnp.asarray(x, jnp.bfloat16)
    _, aux, counts = nnx.jit(lambda m, x: m(x))(moe, xb)
    scores = jax.nn.sigmoid(jnp.dot(xb.astype(jnp.float32).reshape(B * T, -1), moe.router.kernel[...],
                                    precision="highest"))
    chosen, _ = route(scores, moe.router_bias[...], k)
    np.testing.assert_array_equal(np.asarray(counts), np.bincount(np.asarray(chosen).ravel(), minlength=E))
    np.testing.assert_allclose(np.asarray(aux), np.asarray(balance_loss(scores.reshape(B, T, E),
                                                                         chosen.reshape(B, T, k), E)), rtol=1e-6)

    torch.manual_seed(0)
    tmoe = TorchMoE(CustomLLMConfig.from_llm_config(TINY))
    with torch.no_grad():
        tmoe.router.weight.mul_(5)
        xt = torch.from_numpy(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, t_aux, t_counts = tmoe(xt)
        t_scores = torch.sigmoid(xt.reshape(B * T, -1) @ tmoe.router.weight.T)
        t_chosen, _ = torch_route(t_scores, tmoe.router_bias, k)
    np.testing.assert_array_equal(t_counts.numpy(), np.bincount(t_chosen.numpy().ravel(), minlength=E))
    torch.testing.assert_close(t_aux, torch_balance_loss(t_scores.view(B, T, E), t_chosen.view(B, T, k), E),
                               rtol=1e-6, atol=0)
    # The router's product asks for full float32 precision itself (on a GPU, JAX's default
    # precision computes float32 products as TF32; the tests set "highest" for every product): in
    # the forward pass it is the one product that does.
    def eqns(jaxpr):  # every equation, those of nested programs (jit, loops, custom VJPs) too
        for e in jaxpr.eqns:
            yield e
            for v in e.params.values():
                for sub in (v if isinstance(v, (list, tuple)) else [v]):
                    if isinstance(sub, (jax.extend.core.Jaxpr, jax.extend.core.ClosedJaxpr)):
                        yield from eqns(getattr(sub, "jaxpr", sub))

    graphdef, state = nnx.split(moe)
    with jax.default_matmul_precision(None):  # JAX's default, as outside the tests
        program = jax.make_jaxpr(lambda state, x: nnx.merge(graphdef, state)(x))(state, xb)
    products = [(str(e.outvars[0].aval), e.params["precision"]) for e in eqns(program.jaxpr)
                if e.primitive.name == "dot_general"]
    assert len(products) > 3 and [a for a, p in products if p is not None] == [f"float32[{B * T},{E}]"], products
