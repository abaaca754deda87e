"""The converter (convert/): round trips are bit-exact, the converted model computes the same
logits, loss, gradients and optimizer step in both frameworks, an exported directory loads with
`trust_remote_code=True` in a process that never imported this project, and bad input gives one
line naming the problem, exit status 2 and no partial output."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file, save_file

import jaxllm
from conftest import ROOT
from convert import ConvertError, export_hf, import_hf
from convert.mapping import flax_to_torch
from helpers import logits_without_this_project, rel_err
from jaxllm import checkpoint
from jaxllm.config import LLMConfig
from jaxllm.model import create_model, loss_fn
from jaxllm.weights import flatten, get_weights, set_weights

TINY = LLMConfig.from_preset("tiny")
STEP = 7


def _ids(shape, seed, vocab=TINY.vocab_size):
    return np.random.RandomState(seed).randint(0, vocab, shape)


def _host_model(config, seed=0):
    """A randomly initialised model with ARCHITECTURE.md's scales, drawn tensor by tensor on the host
    (numpy, in place): nothing to compile, and peak memory one copy of the weights plus one tensor
    (`create_model` draws every parameter from one random call, whose temporaries peak near 19 GB
    for seed-973m). The draws are uniform with each tensor's standard deviation rather than normal:
    numpy draws uniform numbers about 6x as fast (seed-973m's 973M in about 3 s instead of 17), and
    a parity test needs random weights of the right scale, not their exact distribution."""
    model = create_model(config, abstract=True)
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree_util.tree_flatten(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    rng = np.random.default_rng(seed)
    for var in leaves:
        kind, *args = var.get_metadata().get("init", ("zeros",))
        shape = var.get_value().shape
        if kind == "normal":
            a = np.empty(shape, np.float32)
            rng.random(dtype=np.float32, out=a)  # [0, 1): mean 1/2, standard deviation sqrt(1/12)
            a -= 0.5
            a *= args[0] * math.sqrt(12.0)
        else:
            a = (np.ones if kind == "ones" else np.zeros)(shape, np.float32)
        var.set_value(jnp.asarray(a))
        del a
    return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves))


def _flax_model(config=TINY, seed=0, bf16_exact=False):
    """A model whose every tensor is non-trivial: random router biases, norm weights and lm_head
    bias (zeros and ones would hide a mix-up). `bf16_exact`: float32 values that bfloat16 holds
    exactly (a bfloat16 round trip then preserves them bit for bit)."""
    model = _host_model(config, seed=seed)
    rng = np.random.RandomState(seed + 100)
    flat = get_weights(model)
    for path, v in flat.items():
        if path[-1] == "router_bias":
            flat[path] = (0.01 * rng.randn(*v.shape)).astype(np.float32)
        elif path[-1] == "weight" or path[-1] == "bias":
            flat[path] = (v + 0.1 * rng.randn(*v.shape)).astype(np.float32)
        if bf16_exact:
            flat[path] = flat[path].astype(ml_dtypes.bfloat16).astype(np.float32)
    set_weights(model, flat)
    return model


def _save_flax(model, config, path, step=STEP, weights=None, tokenizer=None):
    mngr = checkpoint.manager(path)
    checkpoint.save(mngr, step, weights=weights or checkpoint.split_weights(model), config=config,
                    tokenizer=tokenizer)
    mngr.wait_until_finished()
    mngr.close()
    return str(path)


def _torch_model(config=TINY, seed=0, dtype=torch.float32):
    """A PyTorch reference model with non-trivial router biases, norms and lm_head bias; in
    bfloat16 every weight is bfloat16 and `router_bias` stays float32 (as an export writes it)."""
    from torch_ref import CustomLLM, CustomLLMConfig

    torch.manual_seed(seed)
    model = CustomLLM(CustomLLMConfig.from_llm_config(config)).eval()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith(("router_bias", "norm.weight", "lm_head.bias")):
                t.add_(0.05 * torch.randn_like(t))
    model = model.to(dtype)
    for layer in model.decoder_layers:
        layer.mlp.moe.router_bias = layer.mlp.moe.router_bias.float()
    return model


def _no_leftovers(parent, name):
    """Nothing that belongs to a (failed) output `name` remains in `parent`."""
    return [n for n in os.listdir(parent) if n == name or n.startswith(f".{name}.")]


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.view(torch.int32).numpy()


def test_set_weights_refuses_a_mismatch_naming_the_weight_and_keeps_the_models_dtype():
    """`jaxllm.weights.set_weights`: a weight missing, one the model lacks or one of another shape is
    refused, naming it, with the model left as it was; a float16 array is stored as the model's
    float32 (exactly: every float16 value is a float32 one)."""
    model = _host_model(TINY)
    flat = get_weights(model)
    path = ("lm_head", "bias")
    assert path in flat and flat[path].dtype == np.float32

    def refused(weights, message):
        with pytest.raises(ValueError, match=message):
            set_weights(model, weights)
        after = get_weights(model)
        assert sorted(after) == sorted(flat)
        for k, v in after.items():
            np.testing.assert_array_equal(v, flat[k], err_msg=str(k))

    refused({k: v for k, v in flat.items() if k != path}, r"missing \['lm_head/bias'\], unexpected \[\]")
    refused({**flat, ("lm_head", "extra"): np.zeros(3, np.float32)},
            r"missing \[\], unexpected \['lm_head/extra'\]")
    shape = flat[path].shape
    refused({**flat, path: np.zeros((shape[0] + 1,), np.float32)},
            rf"weight lm_head/bias has shape \({shape[0] + 1},\), the model expects \({shape[0]},\)")
    refused({**flat, path: flat[path][None]}, r"weight lm_head/bias has shape \(1, ")

    half = (flat[path] + 1.0).astype(np.float16)
    set_weights(model, {**flat, path: half})
    after = get_weights(model)
    assert after[path].dtype == np.float32
    np.testing.assert_array_equal(after[path], half.astype(np.float32))
    assert not np.array_equal(after[path], flat[path])


# ---- round trips --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_flax_torch_flax_round_trip_is_bit_exact(tmp_path, dtype):
    model = _flax_model(bf16_exact=dtype == "bfloat16")
    ckpt = _save_flax(model, TINY, tmp_path / "ckpt")
    result = export_hf(ckpt, dtype=dtype, max_shard_size="300KB")  # tiny is ~2 MB: several shards
    assert result.out_dir == ckpt + "-hf" and result.step == STEP and len(result.weight_files) > 1
    assert os.path.isfile(os.path.join(result.out_dir, "model.safetensors.index.json"))

    # The exported tensors are exactly the Flax weights under their PyTorch names, in `dtype`
    # (router_bias float32). (Weights that bfloat16 must round: the command-line test.)
    want = flax_to_torch(get_weights(model), TINY)
    exported = {}
    for f in result.weight_files:
        exported.update(load_file(os.path.join(result.out_dir, f)))
    assert sorted(exported) == sorted(want)
    for name, t in exported.items():
        expect_dtype = torch.float32 if name.endswith("router_bias") or dtype == "float32" else torch.bfloat16
        assert t.dtype == expect_dtype, name
        ref = torch.from_numpy(np.array(want[name])).to(expect_dtype)
        np.testing.assert_array_equal(_bits(t), _bits(ref), err_msg=name)

    back = import_hf(result.out_dir, tmp_path / "back")
    model2, config2 = jaxllm.load(back.out_dir)
    assert config2 == TINY
    got, orig = get_weights(model2), get_weights(model)
    assert sorted(got) == sorted(orig)
    for path in orig:
        assert got[path].dtype == np.float32
        np.testing.assert_array_equal(got[path].view(np.int32), orig[path].view(np.int32), err_msg=str(path))


@pytest.mark.parametrize("dtype, source", [
    (torch.float32, "safetensors"),
    (torch.bfloat16, "sharded"),
    (torch.float32, "pytorch_model.bin"),
])
def test_torch_flax_torch_round_trip_is_bit_exact(tmp_path, dtype, source):
    tm = _torch_model(dtype=dtype)
    src = tmp_path / "src"
    if source == "pytorch_model.bin":  # a legacy pickle directory
        tm.config.save_pretrained(src)
        torch.save(tm.state_dict(), src / "pytorch_model.bin")
    else:
        tm.save_pretrained(src, max_shard_size="300KB" if source == "sharded" else "5GB")
    assert (src / "model.safetensors.index.json").exists() == (source == "sharded")

    imported = import_hf(src, tmp_path / "ckpt")
    assert imported.weight_files[0].startswith("pytorch_model" if source.endswith("bin") else "model")
    name = "bfloat16" if dtype == torch.bfloat16 else "float32"
    result = export_hf(imported.out_dir, tmp_path / "out", dtype=name)
    out = load_file(os.path.join(result.out_dir, "model.safetensors"))
    sd = tm.state_dict()
    assert sorted(out) == sorted(sd)
    for k, t in sd.items():
        assert out[k].dtype == t.dtype, k
        np.testing.assert_array_equal(_bits(out[k]), _bits(t), err_msg=k)

    # The Flax checkpoint is a model: `jaxllm.load` + `model(ids)` give the PyTorch logits.
    model, config = jaxllm.load(imported.out_dir)
    assert config == TINY
    if source == "safetensors":  # (once: a forward pass compiles for seconds)
        ids = _ids((2, 16), seed=1)
        with torch.no_grad():
            want = tm(torch.from_numpy(ids)).logits.numpy()
        assert rel_err(model(jnp.asarray(ids)), want) <= 1e-5


def test_a_directory_holding_two_sets_of_weights_is_read_as_from_pretrained_loads_it(tmp_path):
    """model.safetensors beside the shards of model.safetensors.index.json (one a leftover of an
    earlier save): `from_pretrained` loads model.safetensors. The converter read the shards, so
    torch_to_flax.py and generate.py made two different models of one directory, and generate.py
    checked the shards and then ran a model.safetensors that lacked tensors (at random). Now the
    converter reads and checks what `from_pretrained` loads."""
    from convert.hf_import import TorchWeights, read_hf_dir
    from torch_ref import CustomLLM

    src = tmp_path / "src"
    _torch_model(seed=1).save_pretrained(src, max_shard_size="300KB")
    single = _torch_model(seed=2).state_dict()
    save_file(single, src / "model.safetensors")
    assert (src / "model.safetensors.index.json").exists()
    loaded = CustomLLM.from_pretrained(src).state_dict()
    weights = TorchWeights(str(src))
    assert weights.files == ["model.safetensors"]
    for name in ("token_embeddings.weight", "decoder_layers.0.self_attn.q_proj_d.weight"):
        np.testing.assert_array_equal(weights[name], loaded[name].numpy())
        np.testing.assert_array_equal(weights[name], single[name].numpy())
    save_file({k: single[k] for k in list(single)[:3]}, src / "model.safetensors")  # (what from_pretrained fills at random)
    with pytest.raises(ConvertError, match="missing tensor"):
        read_hf_dir(str(src))


# ---- parity through the converter -----------------------------------------------------------------

# Inputs chosen (seed 5) so that no token is near a top-k tie: both frameworks route alike
# (`_min_top_k_margin` checks it, identical expert counts confirm it).
PARITY_IDS = _ids((2, 48), seed=5)


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    """A Flax model, its exported Hugging Face directory, and the JAX side of the comparison
    (logits, loss, expert counts, gradients as a flat dict), computed once under `jit`."""
    model = _flax_model(seed=3)
    ckpt = _save_flax(model, TINY, tmp_path_factory.mktemp("parity") / "ckpt")
    ids = jnp.asarray(PARITY_IDS)
    (loss, (_, _, counts)), grads = nnx.jit(nnx.value_and_grad(lambda m: loss_fn(m, ids), has_aux=True))(model)
    logits = nnx.jit(lambda m: m(ids))(model)
    return SimpleNamespace(
        model=model, ckpt=ckpt, hf_dir=export_hf(ckpt).out_dir, logits=np.asarray(logits), loss=float(loss),
        counts=np.asarray(counts), grads={k: np.asarray(v) for k, v in flatten(nnx.to_pure_dict(grads)).items()})


def _load_torch(hf_dir):
    from torch_ref import CustomLLM

    return CustomLLM.from_pretrained(hf_dir).eval()  # eval: no embedding dropout


def _min_top_k_margin(tm, ids) -> float:
    """Smallest gap, over tokens and layers, between the k-th and the (k+1)-th biased router score:
    the inputs are safe from near ties when it is far above float32 rounding (~1e-7)."""
    margins = []

    def hook(moe, args):
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        s = torch.sigmoid(x @ moe.router.weight.float().T) + moe.router_bias
        top = torch.sort(s, dim=-1, descending=True).values
        margins.append(float((top[:, moe.top_k - 1] - top[:, moe.top_k]).min()))

    handles = [layer.mlp.moe.register_forward_pre_hook(hook) for layer in tm.decoder_layers]
    with torch.no_grad():
        tm(torch.from_numpy(ids))
    for h in handles:
        h.remove()
    return min(margins)


def test_logits_loss_and_gradients_match_through_the_converter(parity):
    tm = _load_torch(parity.hf_dir)
    ids = PARITY_IDS
    assert _min_top_k_margin(tm, ids) > 1e-5
    out = tm(torch.from_numpy(ids), labels=torch.from_numpy(ids))
    out.loss.backward()
    np.testing.assert_array_equal(parity.counts, out.expert_counts.numpy())
    assert rel_err(parity.logits, out.logits.detach().numpy()) <= 1e-5
    assert abs(parity.loss - out.loss.item()) <= 1e-5

    # JAX gradients under PyTorch names (router_bias has none: zeros fill its slot in the map).
    jax_grads = flax_to_torch({**parity.grads, BIAS: np.zeros((TINY.num_hidden_layers, TINY.num_routed_experts),
                                                               np.float32)}, TINY)
    torch_grads = {k: p.grad.numpy() for k, p in tm.named_parameters()}
    assert sorted(torch_grads) == sorted(k for k in jax_grads if not k.endswith("router_bias"))
    for name, g in torch_grads.items():
        assert np.linalg.norm(g) > 0, name  # every tensor takes part (all experts receive tokens)
        assert rel_err(jax_grads[name], g) <= 1e-5, name


BIAS = ("decoder_layers", "mlp", "router_bias")


def test_two_optimizer_steps_of_both_projects_match_through_the_converter(parity, tmp_path):
    """Each project's own optimizer, two steps. JAX: `jaxllm.train.make_optimizer` (clipping, AdamW
    with `decay_mask`, warm-up then cosine) and `router_bias_update`. PyTorch: the Trainer's, as
    `train_torch.py` builds it (`training_arguments`, `CustomLLMTrainer`: AdamW with its decay
    groups, the cosine schedule), clipping by `clip_grad_norm_` to the arguments' `max_grad_norm`
    (as the Trainer's step does), and `update_router_bias`. The schedule
    gives lr 0 at the first step (the moments and the router bias still move) and LR / WARMUP at
    the second. Set so that every part shows beyond float32 rounding: the two steps' batches have
    gradient norms of different sizes and both are clipped (Adam's update is blind to a scale
    common to all steps), and weight decay 1.0 (decaying a norm weight or a bias that the other
    side leaves alone moves it by 1e-3 of itself)."""
    from jaxllm.recipes import RunConfig
    from jaxllm.train import OptimConfig, make_optimizer, router_bias_update
    from jaxllm.weights import unflatten
    from torch_ref.training import CustomLLMTrainer, training_arguments

    LR, WARMUP, TOTAL, WD = 1e-2, 10, 100, 1.0
    batches = [PARITY_IDS, _ids((2, 12), seed=6)]
    model = _flax_model(seed=3)  # parity.model's weights, in a model this test may change
    before = get_weights(model)

    def grads_and_counts(ids):
        (_, (_, _, counts)), g = nnx.jit(nnx.value_and_grad(lambda m: loss_fn(m, jnp.asarray(ids)), has_aux=True))(model)
        return unflatten(flatten(nnx.to_pure_dict(g))), np.asarray(counts)

    # JAX. The first step's lr is 0, so the second step's gradients are those at the same
    # parameters with the router bias the first step's counts moved: both are known before the
    # clipping norm is chosen below both gradients' norms.
    g1, c1 = grads_and_counts(batches[0])
    bias1 = np.asarray(router_bias_update(jnp.asarray(before[BIAS]), c1, TINY.router_bias_update_rate))
    set_weights(model, {**before, BIAS: bias1})
    g2, c2 = grads_and_counts(batches[1])
    norms = [float(optax.tree.norm(g)) for g in (g1, g2)]
    assert max(norms) > 1.2 * min(norms), norms
    clip = 0.5 * min(norms)
    tx, schedule = make_optimizer(OptimConfig(lr=LR, warmup_steps=WARMUP, total_steps=TOTAL, weight_decay=WD,
                                              clip_norm=clip))
    assert float(schedule(0)) == 0.0 and math.isclose(float(schedule(1)), LR / WARMUP, rel_tol=1e-6)
    params = unflatten({k: jnp.asarray(v) for k, v in before.items() if k != BIAS})
    opt_state = tx.init(params)
    for g in (g1, g2):
        updates, opt_state = tx.update(g, opt_state, params)
        params = optax.apply_updates(params, updates)
    after = {k: np.asarray(v) for k, v in flatten(params).items()}
    after[BIAS] = np.asarray(router_bias_update(jnp.asarray(bias1), c2, TINY.router_bias_update_rate))

    # PyTorch: the exported model under the Trainer's optimizer and schedule.
    tm = _load_torch(parity.hf_dir)
    args = training_arguments(RunConfig(preset="tiny", steps=TOTAL, lr=LR, warmup_steps=WARMUP, weight_decay=WD,
                                        clip_norm=clip), str(tmp_path / "trainer"), per_device_batch=2, save=False)
    trainer = CustomLLMTrainer(model=tm, args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=TOTAL)
    for ids, counts in zip(batches, (c1, c2)):
        out = tm(torch.from_numpy(ids), labels=torch.from_numpy(ids))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(tm.parameters(), args.max_grad_norm)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        tm.update_router_bias(out.expert_counts)
        np.testing.assert_array_equal(counts, out.expert_counts.numpy())

    after, before = flax_to_torch(after, TINY), flax_to_torch(before, TINY)
    for name, t in tm.state_dict().items():
        assert rel_err(after[name], t.numpy()) <= 1e-5, name
        assert not np.array_equal(after[name], before[name]), name  # the steps moved every tensor


@pytest.mark.parametrize("counts", [[10, 0, 5, 5, 5, 5, 5], [764] * 9, [99, 397, 695], [8, 2, 5, 5, 5],
                                    [7, 0, 0, 0, 0, 0, 7], [2 ** 27, 2 ** 27 + 1, 2 ** 27 - 1, 0, 0, 0, 0]],
                         ids=["some at the mean", "all at the mean", "one at the mean", "three at the mean", "two over",
                              "large"])
def test_both_projects_move_the_router_biases_alike_also_where_a_load_is_the_mean(counts):
    """`sign(mean(load) - load_e)` is 0 where an expert's load is exactly the mean (whenever the
    experts divide a step's assignments): computed in float32 it was +-1, and not the same in both
    frameworks (nine experts of 764 each: -rate for every one in JAX, 0 in PyTorch)."""
    from jaxllm.train import router_bias_update
    from torch_ref import CustomLLM, CustomLLMConfig

    E = len(counts)
    total = sum(counts)
    expected = [float(np.sign(total - E * c)) * TINY.router_bias_update_rate for c in counts]
    jax_out = np.asarray(router_bias_update(jnp.zeros((1, E)), jnp.asarray([counts], jnp.int32),
                                            TINY.router_bias_update_rate))
    np.testing.assert_array_equal(jax_out[0], np.float32(expected))
    model = CustomLLM(CustomLLMConfig.from_llm_config(TINY.replace(num_hidden_layers=1, num_routed_experts=E)))
    model.update_router_bias(torch.tensor([counts]))
    np.testing.assert_array_equal(model.decoder_layers[0].mlp.moe.router_bias.numpy(), jax_out[0])


def test_exported_directory_loads_in_a_fresh_process_without_this_project(parity, tmp_path):
    """`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` with jaxllm, torch_ref,
    convert and JAX unimportable and the repository off sys.path: the shipped code suffices."""
    hf_dir = parity.hf_dir
    assert rel_err(logits_without_this_project(hf_dir, PARITY_IDS, tmp_path), parity.logits) <= 1e-5
    config = json.loads(open(os.path.join(hf_dir, "config.json")).read())
    assert config["model_type"] == "customllm" and config["auto_map"]["AutoModelForCausalLM"]
    gen = json.loads(open(os.path.join(hf_dir, "generation_config.json")).read())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (0, 0, 0)



@pytest.mark.parametrize("source", ["flax_to_torch", "save_pretrained"])
def test_a_plain_text_generation_pipeline_fits_the_position_table(source, parity, hf_src, caplog):
    """`pipeline("text-generation", model=dir)` called with no length: its default of 256 new
    tokens was refused (`tiny` has 128 positions). An export's and a `save_pretrained`'s
    generation_config.json say `max_length` = max_position_embeddings: generation runs to the
    table's end, never past it, and a `max_new_tokens` given replaces it without a warning."""
    import logging

    from transformers import pipeline

    from helpers import word_tokenizer

    hf_dir = parity.hf_dir if source == "flax_to_torch" else str(hf_src)
    pipe = pipeline("text-generation", model=hf_dir, tokenizer=word_tokenizer(), trust_remote_code=True)
    for prompt in ("the a the", " ".join(["a"] * 120)):
        n_prompt = len(pipe.tokenizer(prompt)["input_ids"])
        torch.manual_seed(0)
        ids = pipe(prompt, return_tensors=True)[0]["generated_token_ids"]
        assert n_prompt < len(ids) <= TINY.max_position_embeddings, (n_prompt, len(ids))
    gen = json.loads(open(os.path.join(hf_dir, "generation_config.json")).read())
    assert gen.get("max_length") == TINY.max_position_embeddings
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="transformers"):
        ids = pipe("the a the", max_new_tokens=4, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    assert len(ids) == len(pipe.tokenizer("the a the")["input_ids"]) + 4
    assert not [r for r in caplog.records if "seem to have been set" in r.getMessage()], caplog.text


_CORE_IMPORT = "from .customllm_config_core import "


@pytest.mark.parametrize("name, change, message", [
    ("configuration_customllm.py", lambda s: s.replace(_CORE_IMPORT, "from jaxllm.config import "),
     "torch_ref/configuration_customllm.py: expected one 'from jaxllm.config import' line to make relative, found 0"),
    ("configuration_customllm.py", lambda s: s.replace(_CORE_IMPORT, f"{_CORE_IMPORT}field_names\n{_CORE_IMPORT}"),
     "to make relative, found 2"),
    ("modeling_customllm.py", lambda s: s + "\nimport jax.numpy as jnp\n",
     "remote code modeling_customllm.py imports jax, which an exported directory cannot ship"),
    ("modeling_customllm.py", lambda s: s + "\ndef f():\n    from flax import nnx\n",
     "remote code modeling_customllm.py imports flax,"),
    ("customllm_config_core.py", lambda s: "from torch_ref import CustomLLM\n" + s,
     "remote code customllm_config_core.py imports torch_ref,"),
    ("configuration_customllm.py", lambda s: s + "\nimport convert.mapping\n",
     "remote code configuration_customllm.py imports convert,"),
    ("modeling_customllm.py", lambda s: s + "\nimport numpy, jax\n", "remote code modeling_customllm.py imports jax,"),
    ("modeling_customllm.py", lambda s: s + "\nx = 1; import flax\n", "remote code modeling_customllm.py imports flax,"),
    ("modeling_customllm.py", lambda s: s + "\ntry:\n    from jaxllm import model\nexcept ImportError:\n    pass\n",
     "remote code modeling_customllm.py imports jaxllm,"),
    ("customllm_config_core.py", lambda s: s + "\ndef f(:\n", "remote code customllm_config_core.py does not parse"),
])
def test_remote_code_of_an_unexpected_shape_is_refused_before_a_file_is_written(name, change, message, tmp_path,
                                                                                 monkeypatch):
    """convert/remote_code.py checks the sources it ships: the configuration's one import of the
    core module made relative (none or two: refused), and no import of this project or of JAX in
    any file, wherever the statement is (in a function or a `try`, after a `;`, among other modules
    in one `import`), and no source that does not parse. Refused with a ConvertError naming the file, before a file is
    written; the real sources pass unchanged."""
    from convert import remote_code

    real = remote_code.remote_code_sources()
    assert remote_code.remote_code_files() == real and sorted(real) == sorted(remote_code.FILE_NAMES)
    assert change(real[name]) != real[name]
    monkeypatch.setattr(remote_code, "remote_code_sources", lambda: {**real, name: change(real[name])})
    with pytest.raises(ConvertError) as e:
        remote_code.write_remote_code(str(tmp_path))
    assert message in str(e.value), str(e.value)
    assert os.listdir(tmp_path) == []


# ---- tokenizer files ------------------------------------------------------------------------------

def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "the": 1, "cat": 2, "sat": 3, "[UNK]": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def test_tokenizer_recorded_in_the_checkpoint_is_exported(parity, tmp_path, monkeypatch):
    """The checkpoint names its tokenizer; `jaxllm.data.load_tokenizer` loads it (stubbed here:
    this test pins the converter's side of that contract)."""
    from jaxllm.data import embedded_vocab_size

    import jaxllm.data as real_data

    loaded = []
    fake = SimpleNamespace(embedded_vocab_size=embedded_vocab_size,
                           load_tokenizer=lambda spec, vocab_size: loaded.append((spec, vocab_size)) or _word_tokenizer(),
                           tokenizer_from_files=lambda files: pytest.fail("this checkpoint saved no files"),
                           tidy_tokenizer=real_data.tidy_tokenizer)
    monkeypatch.setitem(sys.modules, "jaxllm.data", fake)
    ckpt = _save_flax(parity.model, TINY, tmp_path / "ckpt", tokenizer="words-v1")
    result = export_hf(ckpt)
    # The size the embedded tokenizer is trained to for this model (other tokenizers ignore it).
    assert loaded == [("words-v1", TINY.vocab_size)] and result.tokenizer == "words-v1" and result.notes == []
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(result.out_dir)
    assert tok("the cat sat")["input_ids"] == [1, 2, 3]
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token_id == 0
    # Padded for batched generation as a decoder-only model needs: on the left.
    assert tok.padding_side == "left" and tok(["the", "the cat sat"], padding=True)["input_ids"][0] == [0, 0, 1]

    # The way back records the directory in the checkpoint's metadata, as an absolute path even
    # when the directory was given relative to the working directory, and saves its files.
    monkeypatch.setitem(sys.modules, "jaxllm.data", real_data)
    monkeypatch.chdir(os.path.dirname(result.out_dir))
    back = import_hf(os.path.basename(result.out_dir), tmp_path / "back")
    assert os.path.isabs(result.out_dir) and back.tokenizer == result.out_dir and back.notes == []
    with checkpoint.reading(back.out_dir) as mngr:
        assert checkpoint.read_meta(mngr, 0)["tokenizer"] == back.tokenizer
        files = checkpoint.read_tokenizer_files(mngr, 0)
    assert json.loads(files["tokenizer_config.json"])["eos_token"] == "<|endoftext|>"
    assert real_data.tokenizer_from_files(files)("the cat sat")["input_ids"] == [1, 2, 3]


def test_a_checkpoint_keeps_its_tokenizer_when_the_source_is_gone(parity, tmp_path):
    """A checkpoint saves its tokenizer's files: a copy on another machine, where the local path
    (or Hub id) it was trained with does not exist, still exports it, both ways."""
    from transformers import PreTrainedTokenizerFast

    from jaxllm import data

    source = tmp_path / "tok"
    PreTrainedTokenizerFast(tokenizer_object=_word_tokenizer(), eos_token="<|endoftext|>").save_pretrained(source)
    files = data.tokenizer_files(data.load_tokenizer(str(source)))
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(files)
    mngr = checkpoint.manager(tmp_path / "ckpt")
    checkpoint.save(mngr, STEP, weights=checkpoint.split_weights(parity.model), config=TINY,
                    tokenizer=str(source), tokenizer_files=files)
    mngr.wait_until_finished()
    mngr.close()
    shutil.rmtree(source)
    with pytest.raises(ValueError, match="no such file"):
        data.load_tokenizer(str(source))  # what the metadata names is gone

    result = export_hf(tmp_path / "ckpt")
    assert result.notes == [] and result.tokenizer == str(source)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(result.out_dir)
    assert tok("the cat sat")["input_ids"] == [1, 2, 3] and tok.eos_token == "<|endoftext|>"
    back = import_hf(result.out_dir, tmp_path / "back")
    shutil.rmtree(result.out_dir)
    with checkpoint.reading(back.out_dir) as mngr:
        again = data.tokenizer_from_files(checkpoint.read_tokenizer_files(mngr, 0), TINY)
    assert again("the cat sat")["input_ids"] == [1, 2, 3] and again.eos_token == "<|endoftext|>"
    # A checkpoint without saved files (written before they were) reads as None.
    _save_flax(parity.model, TINY, tmp_path / "old", tokenizer="words-v1")
    with checkpoint.reading(tmp_path / "old") as mngr:
        assert checkpoint.read_tokenizer_files(mngr, STEP) is None


def test_embedded_tokenizer_of_a_small_vocabulary_is_exported(parity, tmp_path, monkeypatch):
    """A `tiny` run records the embedded tokenizer trained to its 512 tokens; the export finds that
    one (not the 4,096-token default, whose key differs)."""
    from jaxllm import data

    monkeypatch.setenv("JAXLLM_CACHE", str(tmp_path / "cache"))
    source = data.tokenizer_source(None, vocab_size=data.embedded_vocab_size(TINY))
    ckpt = _save_flax(parity.model, TINY, tmp_path / "ckpt", tokenizer=source)
    result = export_hf(ckpt)
    assert result.tokenizer == source and result.notes == []
    from transformers import PreTrainedTokenizerFast

    assert len(PreTrainedTokenizerFast.from_pretrained(result.out_dir)) == TINY.vocab_size


def test_tokenizer_that_cannot_be_loaded_is_left_out_with_a_note(parity, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "jaxllm.data", None)  # jaxllm.data unavailable
    ckpt = _save_flax(parity.model, TINY, tmp_path / "ckpt", tokenizer="words-v1")
    result = export_hf(ckpt)
    assert result.tokenizer is None and "not exported" in result.notes[0]
    assert not os.path.exists(os.path.join(result.out_dir, "tokenizer.json"))
    assert os.path.exists(os.path.join(result.out_dir, "model.safetensors"))


def test_torch_to_flax_notes_a_directory_without_a_tokenizer(hf_src, tmp_path, capsys):
    """A Hugging Face directory without tokenizer files makes a checkpoint that names none, which
    generate.py and --init-from then read with the embedded tokenizer: the conversion says so (it
    was silent). No note for a directory with its tokenizer."""
    from transformers import PreTrainedTokenizerFast

    from convert.torch_to_flax import main

    rc, err = _run_main(main, [hf_src, "--out", tmp_path / "ckpt"], capsys)
    assert rc == 0 and err == (
        f"torch_to_flax.py: note: {hf_src} holds no tokenizer; the checkpoint names none, so generate.py and "
        "--init-from will use the embedded tokenizer (512 tokens; to keep the model's own, put its tokenizer.json in "
        f"{hf_src} and convert again, or pass --tokenizer to them)\n"), err
    with_tokenizer = _copy(hf_src, tmp_path / "hf")
    PreTrainedTokenizerFast(tokenizer_object=_word_tokenizer(), eos_token="<|endoftext|>").save_pretrained(with_tokenizer)
    rc, err = _run_main(main, [with_tokenizer, "--out", tmp_path / "ckpt2"], capsys)
    assert rc == 0 and err == "", err


def test_the_no_tokenizer_note_covers_a_vocabulary_of_exactly_the_embedded_tokenizers_size(tmp_path):
    """`small`'s vocabulary is the embedded tokenizer's 4,096 tokens, which readers of the checkpoint
    then use: a directory without a tokenizer gets the note. One token more, they refuse it
    instead (no note)."""
    from convert.hf_import import read_tokenizer
    from jaxllm.data import EMBEDDED_VOCAB_SIZE

    small = LLMConfig.from_preset("small")
    assert small.vocab_size == EMBEDDED_VOCAB_SIZE == 4096
    tokenizer, files, notes = read_tokenizer(str(tmp_path), small)
    assert tokenizer is None and files is None and len(notes) == 1, notes
    assert notes[0].startswith(f"{tmp_path} holds no tokenizer") and "embedded tokenizer (4,096 tokens;" in notes[0]
    assert read_tokenizer(str(tmp_path), small.replace(vocab_size=EMBEDDED_VOCAB_SIZE + 1)) == (None, None, [])


# ---- bad input: one line, exit status 2, no partial output ----------------------------------------

def _run_main(script_main, argv, capsys):
    rc = script_main([str(a) for a in argv])
    err = capsys.readouterr().err
    return rc, err


@pytest.fixture(scope="module")
def hf_src(tmp_path_factory):
    """A PyTorch reference model saved by transformers itself (a "real" Hugging Face directory)."""
    path = tmp_path_factory.mktemp("src") / "hf"
    _torch_model(seed=1).save_pretrained(path)
    HF_SRC[:] = [path]
    return path


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _rewrite_weights(hf_dir, change):
    path = hf_dir / "model.safetensors"
    sd = load_file(path)
    change(sd)
    save_file(sd, path, metadata={"format": "pt"})


def _other_preset_weights(hf_dir):
    from torch_ref import CustomLLM, CustomLLMConfig

    other = CustomLLM(CustomLLMConfig.from_llm_config(TINY.replace(intermediate_size=96)))
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, hf_dir / "model.safetensors",
              metadata={"format": "pt"})


def _truncate(hf_dir):
    path = hf_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _llama_config(hf_dir):
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "vocab_size": 512}))


TORCH_TO_FLAX_ERRORS = {
    "missing directory": (lambda d: None, "does not exist"),
    "empty directory": (lambda d: d.mkdir(), "is empty"),
    "another architecture": (lambda d: _llama_config(_copy(HF_SRC[0], d)), "model_type is 'llama'"),
    "no model_type": (lambda d: (_copy(HF_SRC[0], d) / "config.json").write_text('{"hidden_size": 64}'),
                      "config.json: no model_type (this project's is 'customllm')"),
    "another preset": (lambda d: _other_preset_weights(_copy(HF_SRC[0], d)), "has shape"),
    "missing tensor": (lambda d: _rewrite_weights(_copy(HF_SRC[0], d), lambda sd: sd.pop("lm_head.bias")),
                       "missing tensor lm_head.bias"),
    "unexpected tensor": (lambda d: _rewrite_weights(_copy(HF_SRC[0], d), lambda sd: sd.update(extra=torch.ones(3))),
                          "unexpected tensor extra"),
    "integer tensor": (lambda d: _rewrite_weights(_copy(HF_SRC[0], d), lambda sd: sd.update(
        {"lm_head.bias": sd["lm_head.bias"].to(torch.int32)})),  # (the right shape: only its dtype is wrong)
                       "tensor lm_head.bias has dtype torch.int32, expected float32, bfloat16, float16 or float64"),
    "fp8 tensor": (lambda d: _rewrite_weights(_copy(HF_SRC[0], d), lambda sd: sd.update(
        {"lm_head.bias": sd["lm_head.bias"].to(torch.float8_e4m3fn)})),  # (was: "expected a floating-point dtype")
                   "tensor lm_head.bias has dtype F8_E4M3, expected float32, bfloat16, float16 or float64"),
    "corrupt safetensors": (lambda d: _truncate(_copy(HF_SRC[0], d)), "not a readable safetensors file"),
    "garbage safetensors": (lambda d: (_copy(HF_SRC[0], d) / "model.safetensors").write_bytes(b"\x00" * 64),
                            "not a readable safetensors file"),
    "no weights": (lambda d: (_copy(HF_SRC[0], d) / "model.safetensors").unlink(), "has no weights"),
    "a Flax checkpoint": (lambda d: (d / "0").mkdir(parents=True), "is a Flax (Orbax) checkpoint already"),
}
HF_SRC = []  # set by the `hf_src` fixture for the table above


@pytest.mark.parametrize("case", list(TORCH_TO_FLAX_ERRORS))
def test_torch_to_flax_refuses_bad_input(case, hf_src, tmp_path, capsys):
    from convert.torch_to_flax import main

    make, message = TORCH_TO_FLAX_ERRORS[case]
    make(tmp_path / "in")
    rc, err = _run_main(main, [tmp_path / "in", "--out", tmp_path / "ckpt"], capsys)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("torch_to_flax.py: error: "), err
    assert message in err, err
    assert _no_leftovers(tmp_path, "ckpt") == []


def _sharded(dst):
    """A tiny model saved as shards plus model.safetensors.index.json; returns (dst, its weight_map)."""
    _torch_model().save_pretrained(dst, max_shard_size="300KB")
    return dst, json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]


def _write_weight_map(hf_dir, weight_map):
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_a_shard_index_naming_a_file_outside_the_directory_or_the_wrong_shard_is_refused(tmp_path):
    """The index of sharded safetensors may name only files of the directory: a shard moved to a
    sibling folder (`../other/...`) is refused, not read from there. A tensor mapped to a shard
    that does not hold it is a ConvertError naming both, not a bare KeyError."""
    src, weight_map = _sharded(tmp_path / "in")
    shards = sorted(set(weight_map.values()))
    assert len(shards) > 1
    (tmp_path / "other").mkdir()
    shutil.move(src / shards[0], tmp_path / "other" / shards[0])
    outside = f"../other/{shards[0]}"
    _write_weight_map(src, {k: outside if f == shards[0] else f for k, f in weight_map.items()})
    with pytest.raises(ConvertError, match=f"lists shard '{outside}', which is not a file of the directory"):
        import_hf(src, tmp_path / "ckpt")

    src, weight_map = _sharded(tmp_path / "in2")
    wrong = next(f for f in sorted(set(weight_map.values())) if f != weight_map["lm_head.bias"])
    _write_weight_map(src, {**weight_map, "lm_head.bias": wrong})
    with pytest.raises(ConvertError, match=f"maps tensor lm_head.bias to {wrong}, which does not hold it"):
        import_hf(src, tmp_path / "ckpt")
    assert _no_leftovers(tmp_path, "ckpt") == []


def test_every_tensor_of_every_shard_is_read_as_from_pretrained_loads_them(tmp_path):
    """`from_pretrained` loads every tensor of every shard the index lists, whatever the index maps
    it to. The converter read only the index's entries: a tensor held by two shards became the
    index's one in torch_to_flax.py and the last shard's in PyTorch (two models of one directory),
    and a tensor no model has, refused in a model.safetensors, was passed over in a shard. Both are
    refused now, and a shard's tensor that the index leaves out is read, as from_pretrained reads it."""
    from convert.hf_import import TorchWeights, read_hf_dir
    from torch_ref import CustomLLM

    src, weight_map = _sharded(tmp_path / "dup")
    first, last = sorted(set(weight_map.values()))[0], sorted(set(weight_map.values()))[-1]
    name = next(k for k, f in weight_map.items() if f == first)
    shard = load_file(src / last)
    shard[name] = load_file(src / first)[name] * 2
    save_file(shard, src / last, metadata={"format": "pt"})
    assert torch.equal(CustomLLM.from_pretrained(src).state_dict()[name], shard[name])  # the other copy
    with pytest.raises(ConvertError, match=f"{last}: tensor {name} appears twice in the directory "
                                           f"\\(also in {first}\\)"):
        read_hf_dir(str(src))

    src, weight_map = _sharded(tmp_path / "extra")
    shard = load_file(src / last)
    save_file({**shard, "extra": torch.ones(3)}, src / last, metadata={"format": "pt"})
    with pytest.raises(ConvertError, match="unexpected tensor extra"):
        read_hf_dir(str(src))

    src, weight_map = _sharded(tmp_path / "unlisted")
    _write_weight_map(src, {k: f for k, f in weight_map.items() if k != "lm_head.bias"})
    np.testing.assert_array_equal(TorchWeights(str(src))["lm_head.bias"],
                                  CustomLLM.from_pretrained(src).state_dict()["lm_head.bias"].numpy())


def test_a_shard_index_without_metadata_is_one_line_not_from_pretrained_s_key_error(tmp_path, capsys):
    """A hand-written model.safetensors.index.json of a weight_map alone: `from_pretrained` stops
    with a KeyError 'metadata', so generate.py and evaluate.py (which check the directory with
    `read_hf_dir` first) ended in a traceback while torch_to_flax.py converted it. Each now refuses
    it in one line, exit status 2."""
    import importlib.util

    from convert.torch_to_flax import main
    from torch_ref import CustomLLM

    src, weight_map = _sharded(tmp_path / "in")
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(KeyError, match="metadata"):
        CustomLLM.from_pretrained(src)
    message = f'{src / "model.safetensors.index.json"}: no "metadata" object beside the weight_map'
    capsys.readouterr()  # (the progress bars of the saves and loads above)
    rc, err = _run_main(main, [src, "--out", tmp_path / "ckpt"], capsys)
    assert rc == 2 and err.count("\n") == 1 and message in err, err
    assert _no_leftovers(tmp_path, "ckpt") == []
    spec = importlib.util.spec_from_file_location("generate_script", ROOT / "scripts" / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    rc, err = _run_main(generate.main, ["--checkpoint", src, "--framework", "torch", "--prompt", "a"], capsys)
    assert rc == 2 and "Traceback" not in err and err.splitlines()[-1].startswith("generate.py: error: "), err
    assert message in err.splitlines()[-1], err  # (after a note that no tokenizer is there)


def test_a_float16_source_becomes_float32_master_weights(tmp_path):
    """A half-precision Hugging Face directory: the arrays read from it and those of the Orbax
    checkpoint are float32 (float16 -> float32 is exact: the values are the source's)."""
    from convert.hf_import import TorchWeights
    from convert.mapping import torch_to_flax

    tm = _torch_model(dtype=torch.float16)
    tm.save_pretrained(tmp_path / "src")
    weights = TorchWeights(str(tmp_path / "src"))
    assert weights.dtypes["token_embeddings.weight"] == torch.float16
    flat = torch_to_flax(weights, TINY)
    want = torch_to_flax({k: v.float().numpy() for k, v in tm.state_dict().items()}, TINY)
    assert sorted(flat) == sorted(want)
    for path, v in flat.items():
        assert v.dtype == np.float32, path
        np.testing.assert_array_equal(v, want[path], err_msg=str(path))

    ckpt = import_hf(tmp_path / "src", tmp_path / "ckpt").out_dir
    with checkpoint.reading(ckpt) as mngr:
        saved = jax.tree_util.tree_flatten_with_path(mngr.item_metadata(0)["params"])[0]
    assert saved and {str(leaf.dtype) for _, leaf in saved} == {"float32"}, saved


def _flax_weights(config):
    return checkpoint.split_weights(create_model(config, abstract=True))


def _zeros(tree):
    return jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), tree)


def _without_lm_head_bias(tree):
    del tree["params"]["lm_head"]["bias"]
    return tree


def _with_extra_tensor(tree):
    tree["params"]["extra"] = {"kernel": np.zeros((3, 3), np.float32)}
    return tree


FLAX_TO_TORCH_ERRORS = {
    "missing directory": (lambda d: None, "does not exist"),
    "empty directory": (lambda d: d.mkdir(), "no checkpoint found"),
    "a Hugging Face directory": (lambda d: _copy(HF_SRC[0], d), "a Hugging Face directory (convert/torch_to_flax.py"),
    "a PyTorch run's directory": (lambda d: [_copy(HF_SRC[0], d / f"checkpoint-{n}") for n in (4, 12)],
                                  "a PyTorch (Trainer) run's directory, whose checkpoint-12 is a Hugging Face directory "
                                  "(convert/torch_to_flax.py makes a checkpoint of it)"),
    "another preset": (lambda d: _save_flax(None, TINY, d, weights=_zeros(_flax_weights(TINY.replace(latent_dim=8)))),
                       "has shape"),
    "missing tensor": (lambda d: _save_flax(None, TINY, d, weights=_without_lm_head_bias(_zeros(_flax_weights(TINY)))),
                       "missing tensor"),
    "unexpected tensor": (lambda d: _save_flax(None, TINY, d, weights=_with_extra_tensor(_zeros(_flax_weights(TINY)))),
                          "unexpected tensor"),
}


@pytest.mark.parametrize("case", list(FLAX_TO_TORCH_ERRORS))
def test_flax_to_torch_refuses_bad_input(case, hf_src, tmp_path, capsys):
    from convert.flax_to_torch import main

    make, message = FLAX_TO_TORCH_ERRORS[case]
    make(tmp_path / "in")
    rc, err = _run_main(main, [tmp_path / "in", "--out", tmp_path / "hf"], capsys)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("flax_to_torch.py: error: "), err
    assert message in err, err
    assert _no_leftovers(tmp_path, "hf") == []


def test_flax_to_torch_refuses_a_step_directory_and_an_empty_out_naming_them(parity, tmp_path, capsys):
    """A step of a checkpoint (`ckpt/2`) says to pass the directory above it; `--out ""` (an unset
    shell variable) is refused, not read as the working directory."""
    from convert.flax_to_torch import main

    rc, err = _run_main(main, [os.path.join(parity.ckpt, str(STEP)), "--out", tmp_path / "hf"], capsys)
    assert rc == 2 and "a step of a checkpoint directory? pass the directory above it" in err, err
    with pytest.raises(SystemExit) as e:  # (argparse: every path flag refuses an empty path)
        main([str(parity.ckpt), "--out", ""])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == "flax_to_torch.py: error: argument --out: an empty path (an unset shell " \
                                        "variable?)\n", err


@pytest.mark.parametrize("case", ["another preset", "missing tensor", "unexpected tensor"])
def test_jaxllm_load_refuses_the_checkpoints_the_converter_refuses(case, tmp_path):
    import jaxllm

    make, message = FLAX_TO_TORCH_ERRORS[case]
    make(tmp_path / "in")
    with pytest.raises(checkpoint.CheckpointError, match=message):
        jaxllm.load(tmp_path / "in")


def test_jaxllm_load_names_a_step_that_is_not_an_integer(tmp_path):
    """`jaxllm.load(ckpt, step="7")` (a name from `os.listdir`) said "step 7 not in ...; saved steps:
    [7]", and `step=True` read step 1: the step is now refused as what it is; a NumPy integer is a step."""
    ckpt = _save_flax(_flax_model(), TINY, tmp_path / "ckpt")
    for bad in (str(STEP), float(STEP), True):
        for read in (jaxllm.load, jaxllm.load_tokenizer):
            with pytest.raises(ValueError, match=f"^step must be an integer, got {bad!r}$"):
                read(ckpt, step=bad)
    assert jaxllm.load(ckpt, step=np.int64(STEP))[1] == TINY


def test_the_libraries_raise_convert_errors(parity, tmp_path):
    with pytest.raises(ConvertError, match="dtype must be one of float32, bfloat16"):
        export_hf(parity.ckpt, tmp_path / "hf", dtype="float16")
    with pytest.raises(ConvertError, match="overlaps the input"):
        export_hf(parity.ckpt, os.path.join(parity.ckpt, "hf"))
    (tmp_path / "afile").write_text("not a directory")
    with pytest.raises(ConvertError, match=f"output {tmp_path / 'afile' / 'hf'} cannot be made: {tmp_path / 'afile'} is not"):
        export_hf(parity.ckpt, tmp_path / "afile" / "hf")  # (before reading anything: it failed at the end)
    os.symlink(parity.ckpt, tmp_path / "link")
    with pytest.raises(ConvertError, match="overlaps the input"):  # (it wrote into the input through the link)
        export_hf(parity.ckpt, tmp_path / "link" / "hf")
    os.symlink(parity.hf_dir, tmp_path / "hf_link")  # (an output of this kind, given through a link: not replaced,
    for force in (False, True):                     # and not said to be of another kind)
        with pytest.raises(ConvertError, match=rf"^output {tmp_path / 'hf_link'} is a symbolic link \(to "
                                               rf"{parity.hf_dir}\); give the directory itself as the output$"):
            export_hf(parity.ckpt, tmp_path / "hf_link", force=force)
    with pytest.raises(ConvertError, match="does not exist"):
        import_hf(tmp_path / "nothing", tmp_path / "ckpt")
    with pytest.raises(ConvertError, match=r"already exists \(force=True replaces it\)$"):
        export_hf(parity.ckpt, parity.hf_dir)
    with pytest.raises(ConvertError, match="max shard size must be a positive size"):  # before reading anything
        export_hf(tmp_path / "nothing", tmp_path / "hf", max_shard_size=0)
    assert _no_leftovers(tmp_path, "hf") == [] and _no_leftovers(tmp_path, "ckpt") == []


def test_latest_step_by_default_or_the_step_asked_for(tmp_path, capsys):
    from convert.flax_to_torch import main

    weights = _zeros(_flax_weights(TINY))
    for step in (3, 9):  # two saves: lm_head.bias holds the step number
        weights["params"]["lm_head"]["bias"] = np.full(TINY.vocab_size, step, np.float32)
        _save_flax(None, TINY, tmp_path / "ckpt", step=step, weights=weights)
    assert export_hf(tmp_path / "ckpt").step == 9
    assert float(load_file(tmp_path / "ckpt-hf" / "model.safetensors")["lm_head.bias"][0]) == 9
    assert export_hf(tmp_path / "ckpt", tmp_path / "hf3", step=3).step == 3
    assert float(load_file(tmp_path / "hf3" / "model.safetensors")["lm_head.bias"][0]) == 3
    rc, err = _run_main(main, [tmp_path / "ckpt", "--out", tmp_path / "hf5", "--step", 5], capsys)
    assert rc == 2 and "step 5 not in" in err and "[3, 9]" in err
    assert _no_leftovers(tmp_path, "hf5") == []


def test_a_bfloat16_export_loads_as_bfloat16_with_the_configs_own_special_token_ids(tmp_path):
    """`dtype="bfloat16"`: config.json says so, and `from_pretrained` (transformers 5: dtype "auto"
    by default) loads the model in bfloat16, `router_bias` float32. generation_config.json holds
    the config's bos, eos and pad ids (three different ones here: a mix-up shows)."""
    from torch_ref import CustomLLM

    config = TINY.replace(bos_token_id=1, eos_token_id=2, pad_token_id=3)
    ckpt = _save_flax(None, config, tmp_path / "ckpt", weights=_zeros(_flax_weights(config)))
    out = export_hf(ckpt, dtype="bfloat16").out_dir
    saved = json.loads(open(os.path.join(out, "config.json")).read())
    assert saved["dtype"] == "bfloat16"
    assert (saved["bos_token_id"], saved["eos_token_id"], saved["pad_token_id"]) == (1, 2, 3)
    gen = json.loads(open(os.path.join(out, "generation_config.json")).read())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 3)

    tm = CustomLLM.from_pretrained(out)
    assert tm.dtype == torch.bfloat16
    dtypes = {name: t.dtype for name, t in tm.state_dict().items()}
    assert {d for name, d in dtypes.items() if not name.endswith("router_bias")} == {torch.bfloat16}
    assert {d for name, d in dtypes.items() if name.endswith("router_bias")} == {torch.float32}
    assert tm.generation_config.pad_token_id == 3 and tm.generation_config.eos_token_id == 2


def test_existing_output_needs_force_and_is_replaced_only_when_the_new_one_is_complete(
        parity, hf_src, tmp_path, capsys, monkeypatch):
    from convert import hf_export
    from convert.flax_to_torch import main as flax_to_torch_main
    from convert.torch_to_flax import main as torch_to_flax_main

    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text("{}")  # an old export
    rc, err = _run_main(flax_to_torch_main, [parity.ckpt, "--out", out], capsys)
    assert rc == 2 and "already exists (--force replaces it)" in err and err.count("\n") == 1, err
    assert "force=True" not in err and os.listdir(out) == ["config.json"]

    # --force, but the new export fails half-way: the old output stays, nothing else is left.
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hf_export, "write_remote_code", broken)
    rc, err = _run_main(flax_to_torch_main, [parity.ckpt, "--out", out, "--force"], capsys)
    assert rc == 2 and "disk full" in err
    assert os.listdir(out) == ["config.json"] and _no_leftovers(tmp_path, "hf") == ["hf"]
    monkeypatch.undo()

    rc, err = _run_main(flax_to_torch_main, [parity.ckpt, "--out", out, "--force"], capsys)
    assert rc == 0, err
    assert os.path.isfile(out / "model.safetensors") and _no_leftovers(tmp_path, "hf") == ["hf"]

    # A directory that is not an output of this kind is never replaced, even with --force.
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    for force in (["--force"], []):  # the message says so with or without --force (not "use --force")
        rc, err = _run_main(torch_to_flax_main, [hf_src, "--out", precious, *force], capsys)
        assert rc == 2 and "refusing to replace" in err and "--force" not in err
    (tmp_path / "a_file").write_text("keep me too")
    rc, err = _run_main(flax_to_torch_main, [parity.ckpt, "--out", tmp_path / "a_file"], capsys)
    assert rc == 2 and "refusing to replace" in err
    assert os.listdir(precious) == ["notes.txt"] and (tmp_path / "a_file").read_text() == "keep me too"
    rc, err = _run_main(torch_to_flax_main, [hf_src, "--out", tmp_path / "ckpt"], capsys)
    assert rc == 0, err
    rc, err = _run_main(torch_to_flax_main, [hf_src, "--out", tmp_path / "ckpt"], capsys)
    assert rc == 2 and "already exists" in err
    rc, err = _run_main(torch_to_flax_main, [hf_src, "--out", tmp_path / "ckpt", "--force"], capsys)
    assert rc == 0, err


def test_an_output_another_conversion_wrote_meanwhile_is_not_replaced_without_force(tmp_path, capsys, monkeypatch):
    """Two conversions to the same new --out started together (no --force): both passed the check
    that the output does not exist, and the one that finished last replaced the other's output and
    said "wrote" too (flax_to_torch.py of steps 2 and 4 at once: both exit 0, step 4's kept). The
    later one now ends with one line and status 2, the other's output untouched, nothing left of
    its own; with --force it replaces it, as asked."""
    from convert import hf_export
    from convert.flax_to_torch import main as flax_to_torch_main

    ckpt = _save_flax(None, TINY, tmp_path / "ckpt", weights=_zeros(_flax_weights(TINY)))
    out = tmp_path / "hf"
    write_remote_code = hf_export.write_remote_code

    def the_other_finishes_first(tmp):  # (while this conversion writes its temporary output)
        write_remote_code(tmp)
        if not out.exists():
            out.mkdir()
            (out / "config.json").write_text('{"the other": 1}')

    monkeypatch.setattr(hf_export, "write_remote_code", the_other_finishes_first)
    rc, err = _run_main(flax_to_torch_main, [ckpt, "--out", out], capsys)
    assert rc == 2 and err.count("\n") == 1, err
    assert f"output {out} was written by another process while this conversion ran" in err
    assert "(--force replaces it)" in err and "force=True" not in err
    assert os.listdir(out) == ["config.json"] and _no_leftovers(tmp_path, "hf") == ["hf"]
    rc, err = _run_main(flax_to_torch_main, [ckpt, "--out", out, "--force"], capsys)
    assert rc == 0 and os.path.isfile(out / "model.safetensors"), err
    assert _no_leftovers(tmp_path, "hf") == ["hf"]


def _trainer_checkpoint(path, *, complete=True):
    """A `checkpoint-N` as scripts/train_torch.py saves it: a Hugging Face directory with the
    Trainer's state beside it (`complete=False`: a save cut short, before its trainer state)."""
    _copy(HF_SRC[0], path)
    torch.save({"state": {}, "param_groups": []}, path / "optimizer.pt")
    torch.save({}, path / "scheduler.pt")
    (path / "data_state.rank0.json").write_text(json.dumps({"process_count": 1, "state": None}))
    if complete:
        (path / "trainer_state.json").write_text("{}")
    return path


def test_force_never_replaces_training_state(parity, hf_src, tmp_path, capsys):
    """--force replaces an earlier conversion, never a training run: a JAX run's steps with their
    train_state and its metrics, or a Trainer checkpoint (an optimizer and trainer state beside
    the weights). The error says what the directory holds."""
    from convert.flax_to_torch import main as flax_to_torch_main
    from convert.torch_to_flax import main as torch_to_flax_main

    run = tmp_path / "run"
    (run / "300" / "train_state").mkdir(parents=True)
    (run / "300" / "params").mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    rc, err = _run_main(torch_to_flax_main, [hf_src, "--out", run, "--force"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "refusing to replace it: use another --out" in err, err
    assert "it holds training state (train_state in step 300), metrics.jsonl" in err, err
    assert sorted(os.listdir(run)) == ["300", "metrics.jsonl"] and sorted(os.listdir(run / "300")) == \
        ["params", "train_state"]
    with pytest.raises(ConvertError, match="training state .* choose another output directory"):
        import_hf(hf_src, run, force=True)

    ckpt = _trainer_checkpoint(tmp_path / "checkpoint-10")
    files = {n: (ckpt / n).read_bytes() for n in os.listdir(ckpt)}
    rc, err = _run_main(flax_to_torch_main, [parity.ckpt, "--out", ckpt, "--force"], capsys)
    assert rc == 2 and err.count("\n") == 1, err
    assert "training state (data_state.rank0.json, optimizer.pt, scheduler.pt, trainer_state.json)" in err, err
    assert {n: (ckpt / n).read_bytes() for n in os.listdir(ckpt)} == files
    assert _no_leftovers(tmp_path, "run") == ["run"] and _no_leftovers(tmp_path, "checkpoint-10") == ["checkpoint-10"]


def test_torch_to_flax_names_the_checkpoint_of_a_trainer_directory(hf_src, tmp_path, capsys):
    from convert.torch_to_flax import main

    run = tmp_path / "run"
    for step in (3, 5):
        _trainer_checkpoint(run / f"checkpoint-{step}")
    _trainer_checkpoint(run / "checkpoint-7", complete=False)
    rc, err = _run_main(main, [run, "--out", tmp_path / "ckpt"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "is a Trainer output directory" in err, err
    assert err.endswith(f"pass one of its checkpoints, the latest: {run / 'checkpoint-5'}\n"), err


def test_max_shard_size_is_checked_before_the_checkpoint_is_read(parity, tmp_path, capsys):
    from convert.flax_to_torch import main

    for size in ("0", "0KB", "5XB"):
        with pytest.raises(SystemExit) as e:
            main([parity.ckpt, "--out", str(tmp_path / "hf"), "--max-shard-size", size])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1, err
        assert err.startswith("flax_to_torch.py: error: argument --max-shard-size: max shard size must be a positive "
                              f"size such as 50GB or 500MB, got '{size}'"), err
    assert not (tmp_path / "hf").exists()


def test_max_shard_sizes_are_decimal_as_in_save_pretrained():
    """KB, MB, GB, TB are powers of 1000, as `save_pretrained(max_shard_size=...)` reads them (not
    1024): the same flag value gives the same shards in both."""
    from convert.output import parse_max_shard_size

    assert parse_max_shard_size("1KB") == 1000 and parse_max_shard_size("300kb") == 300_000
    assert parse_max_shard_size("1.5MB") == 1_500_000 and parse_max_shard_size("50GB") == 50 * 10**9
    assert parse_max_shard_size("2TB") == 2 * 10**12
    assert parse_max_shard_size("4096") == 4096 and parse_max_shard_size(4096) == 4096  # bytes


def test_outputs_get_the_permissions_the_umask_gives_not_the_temporary_directorys(hf_src, tmp_path):
    """Both outputs are written in a `mkdtemp` directory (0700) and safetensors creates its files
    0600: once complete, every directory is `0o777 & ~umask` and every file `0o666 & ~umask`, as
    for any file the user writes (others in the group can read an export)."""
    import stat

    mask = os.umask(0o002)
    try:
        ckpt = import_hf(hf_src, tmp_path / "ckpt").out_dir
        hf = export_hf(ckpt, tmp_path / "hf").out_dir
    finally:
        os.umask(mask)
    for top in (ckpt, hf):
        modes = {top: stat.S_IMODE(os.stat(top).st_mode)}
        for root, dirs, files in os.walk(top):
            modes.update({os.path.join(root, n): stat.S_IMODE(os.stat(os.path.join(root, n)).st_mode)
                          for n in dirs + files})
        want = {p: 0o775 if os.path.isdir(p) else 0o664 for p in modes}
        assert modes == want and len(modes) > 2
    assert os.path.isfile(os.path.join(hf, "model.safetensors"))


def test_sigterm_removes_the_partial_output_as_ctrl_c_does(tmp_path):
    """A conversion stopped by SIGTERM (kill, a timeout) exits with status 143 and leaves nothing
    behind; the previous SIGTERM handler is back once an output is written."""
    code = textwrap.dedent("""
        import os, signal, sys, time
        from convert.output import atomic_output_dir
        with atomic_output_dir(sys.argv[1] + "-done") as tmp:
            open(os.path.join(tmp, "f"), "w").close()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        with atomic_output_dir(sys.argv[1]) as tmp:
            open(os.path.join(tmp, "partial"), "w").close()
            print("writing", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "out")], cwd=ROOT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == "writing\n"
        proc.terminate()
        assert proc.wait(timeout=30) == 143
    finally:
        proc.kill()
        proc.stdout.close()
    assert os.listdir(tmp_path) == ["out-done"]
    # From a command line (`cli.exit_with`): one line says so, as after Ctrl-C
    code = textwrap.dedent("""
        import sys, time
        from convert.output import atomic_output_dir
        from jaxllm.cli import exit_with

        def main():
            with atomic_output_dir(sys.argv[1]):
                print("writing", flush=True)
                time.sleep(60)

        exit_with(main, "convert.py", "nothing was written")
    """)
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "out")], cwd=ROOT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == "writing\n"
        proc.terminate()
        assert proc.wait(timeout=30) == 143
        assert proc.stderr.read() == "convert.py: SIGTERM: nothing was written\n"
    finally:
        proc.kill()
        proc.stdout.close()
        proc.stderr.close()
    assert os.listdir(tmp_path) == ["out-done"]


def test_a_second_sigterm_does_not_cut_the_removal_of_the_partial_output_short(tmp_path, monkeypatch):
    """The first SIGTERM unwinds the conversion; one more while its temporary output is removed is
    ignored (raised again, it stopped the removal part-way and left the partial output); the
    previous handler is back afterwards."""
    from convert import output
    from jaxllm.stopping import Terminated

    at_removal = []
    remove = shutil.rmtree

    def recording_rmtree(path, *args, **kwargs):
        at_removal.append(signal.getsignal(signal.SIGTERM))
        remove(path, *args, **kwargs)

    monkeypatch.setattr(output.shutil, "rmtree", recording_rmtree)
    with pytest.raises(Terminated):
        with output.atomic_output_dir(str(tmp_path / "out")) as tmp:
            open(os.path.join(tmp, "partial"), "w").close()
            signal.raise_signal(signal.SIGTERM)
    assert at_removal == [signal.SIG_IGN]
    assert os.listdir(tmp_path) == [] and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_once_the_output_is_in_place_sigterm_no_longer_says_nothing_was_written(tmp_path, monkeypatch):
    """After the final rename (a --force run then deletes the previous output) SIGTERM takes its
    default action, not the "nothing was written" line about a complete output; the handler from
    before is back at the end."""
    from convert import output

    at_removal = []
    remove = shutil.rmtree

    def recording_rmtree(path, *args, **kwargs):
        at_removal.append(signal.getsignal(signal.SIGTERM))
        remove(path, *args, **kwargs)

    def before(signum, frame):
        pass

    (tmp_path / "out").mkdir()
    monkeypatch.setattr(output.shutil, "rmtree", recording_rmtree)
    previous = signal.signal(signal.SIGTERM, before)
    try:
        with output.atomic_output_dir(str(tmp_path / "out")) as tmp:
            assert signal.getsignal(signal.SIGTERM) is output._exit_on_signal
            open(os.path.join(tmp, "new"), "w").close()
        assert at_removal == [signal.SIG_DFL] and signal.getsignal(signal.SIGTERM) is before
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert os.listdir(tmp_path / "out") == ["new"]


def test_the_temporary_output_of_a_killed_run_is_removed_by_the_next_one(tmp_path):
    """What a killed run (SIGKILL) left, a `.NAME.XXXXXXXX.tmp` directory, goes when the next
    conversion to NAME starts; kept: another name's, an `.old` one (the previous output, when the
    kill came between the two renames) and the one a running conversion holds."""
    from convert.output import atomic_output_dir

    names = [".out.k1ll3d_0.tmp", ".out.abcd1234.old", ".out.other.tmp", ".output.abcd1234.tmp"]
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "partial").write_text("x")
    with atomic_output_dir(str(tmp_path / "out")) as running:
        with atomic_output_dir(str(tmp_path / "out")):
            pass
        assert os.path.isdir(running)
    assert sorted(os.listdir(tmp_path)) == sorted(names[1:] + ["out"])


def _script(name, *args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, f"convert/{name}.py", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_command_lines_run_from_the_repository_root(parity, tmp_path, capsys):
    """The scripts as a user runs them: a conversion, and failures that print one line on stderr
    (nothing else: no traceback, no log noise) with exit status 2. (The way back runs in-process
    through the script's `main`: a third interpreter start adds time, not coverage.)"""
    from convert.torch_to_flax import main as torch_to_flax_main

    r = _script("flax_to_torch", parity.ckpt, "--out", tmp_path / "hf", "--dtype", "bfloat16")
    assert r.returncode == 0 and r.stdout.startswith(f"wrote {tmp_path / 'hf'}"), r.stderr
    rc, err = _run_main(torch_to_flax_main, [tmp_path / "hf", "--out", tmp_path / "ckpt"], capsys)
    assert rc == 0, err
    model, config = jaxllm.load(tmp_path / "ckpt")
    want = get_weights(parity.model)
    for path, v in get_weights(model).items():  # bfloat16 on the way: the rounded weights come back
        np.testing.assert_array_equal(v, want[path].astype(ml_dtypes.bfloat16).astype(np.float32)
                                      if path != BIAS else want[path])

    for name, args, message in [
        ("flax_to_torch", [tmp_path / "hf"], "a Hugging Face directory (convert/torch_to_flax.py"),
        ("torch_to_flax", [tmp_path / "ckpt", "--out", tmp_path / "x"], "is a Flax (Orbax) checkpoint already"),
    ]:
        r = _script(name, *args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
        assert r.stderr.startswith(f"{name}.py: error: ")  # as argparse's own errors


# ---- seed-973m ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_seed_973m_logits_and_loss_match_through_the_converter(tmp_path):
    """Batch 1 x 64 tokens: Flax checkpoint -> `convert/flax_to_torch.py` -> PyTorch. Memory: the
    Flax model is freed before the export (a process of its own) and the PyTorch model is built
    around the loaded tensors (`from_state_dict`, no second initialised copy)."""
    import gc

    from torch_ref import CustomLLM, CustomLLMConfig

    config = LLMConfig.from_preset("seed-973m")
    model = _host_model(config)
    ids = _ids((1, 64), seed=11, vocab=config.vocab_size)
    # One program (one compile; XLA computes the shared forward once) for the loss and the logits.
    (loss, (_, _, counts)), logits = nnx.jit(lambda m: (loss_fn(m, jnp.asarray(ids)), m(jnp.asarray(ids))))(model)
    loss, counts, logits = float(loss), np.asarray(counts), np.asarray(logits)
    ckpt = _save_flax(model, config, tmp_path / "ckpt")
    del model
    gc.collect()

    r = _script("flax_to_torch", ckpt, "--out", tmp_path / "hf", timeout=600)
    assert r.returncode == 0, r.stderr
    # 3.9 GB in float32: one file, as save_pretrained writes it (the default shard size is 50 GB).
    assert not (tmp_path / "hf" / "model.safetensors.index.json").exists()
    sd = load_file(tmp_path / "hf" / "model.safetensors")
    tm = CustomLLM.from_state_dict(CustomLLMConfig.from_pretrained(tmp_path / "hf"), sd)
    del sd
    with torch.no_grad():
        out = tm(torch.from_numpy(ids), labels=torch.from_numpy(ids))
    np.testing.assert_array_equal(counts, out.expert_counts.numpy())
    err = rel_err(logits, out.logits.numpy())
    print(f"seed-973m through the converter: logits rel err {err:.3e}, loss jax {loss:.6f} torch {out.loss.item():.6f}")
    assert err <= 1e-5
    assert abs(loss - out.loss.item()) <= 1e-5
