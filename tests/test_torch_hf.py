"""The PyTorch reference as a Hugging Face model: the `PreTrainedModel` conventions a user of
transformers relies on (tiny preset, PyTorch only)."""

import pytest
import torch

from torch_ref import CustomLLM, CustomLLMConfig
from torch_ref.modeling_customllm import _CACHE_FIELD  # `cache`, or `past_key_values` before transformers 5.24


def _tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    return CustomLLM(CustomLLMConfig.from_preset("tiny", **overrides))


def _ids(shape, seed=0):
    return torch.randint(0, 512, shape, generator=torch.Generator().manual_seed(seed))


def test_every_parameter_gets_a_gradient_even_an_expert_no_token_chose():
    """What lets DDP run without `find_unused_parameters`: a routed expert with no token is still
    in the graph, with a zero gradient (not `None`)."""
    model = _tiny().train()
    model.dropout.p = 0.0
    with torch.no_grad():
        for layer in model.decoder_layers:
            layer.mlp.moe.router_bias[-1] = -10.0  # no token chooses the last routed expert
    x = _ids((2, 16))
    out = model(x, labels=x)
    assert (out.expert_counts[:, -1] == 0).all() and (out.expert_counts[:, :-1].sum(-1) > 0).all()
    out.loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    for layer in model.decoder_layers:
        for p in layer.mlp.moe.routed_experts[-1].parameters():
            assert torch.count_nonzero(p.grad) == 0
    # Without gradients (generation, evaluation) an expert with no token is skipped as before.
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, out.logits, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs", [None, {"use_reentrant": True}])
def test_gradient_checkpointing_recomputes_the_layers_and_gives_the_same_gradients(kwargs):
    x = _ids((2, 24))
    results = []
    for checkpointing in (False, True):
        model = _tiny().train()
        model.dropout.p = 0.0
        calls = []
        model.decoder_layers[0].mlp.moe.register_forward_pre_hook(lambda *a: calls.append(1))
        if checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # the name from transformers 5.24 on
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
                assert model.is_activation_checkpointing
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
                assert model.is_gradient_checkpointing
        out = model(x, labels=x)
        out.loss.backward()
        assert len(calls) == (2 if checkpointing else 1)  # recomputed in the backward pass
        results.append((out, {n: p.grad for n, p in model.named_parameters()}))
    (plain, plain_grads), (ckpt, ckpt_grads) = results
    torch.testing.assert_close(ckpt.loss, plain.loss, rtol=0, atol=0)
    assert torch.equal(ckpt.expert_counts, plain.expert_counts)
    torch.testing.assert_close(ckpt.aux_loss, plain.aux_loss, rtol=0, atol=0)
    assert plain_grads.keys() == ckpt_grads.keys()
    for name, g in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], g, rtol=1e-6, atol=1e-9, msg=name)


def test_a_trainer_evaluates_and_predicts_the_logits_alone(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = _tiny()
    rows = _ids((4, 16))
    data = [{"input_ids": r, "labels": r} for r in rows]
    args = TrainingArguments(str(tmp_path), per_device_eval_batch_size=2, use_cpu=True, report_to="none")
    trainer = Trainer(model=model, args=args)
    with torch.no_grad():
        want = model.eval()(rows, labels=rows)
    pred = trainer.predict(data)
    assert not isinstance(pred.predictions, tuple)
    torch.testing.assert_close(torch.from_numpy(pred.predictions), want.logits, rtol=1e-5, atol=1e-5)
    assert abs(trainer.evaluate(data)["eval_loss"] - want.loss.item()) < 1e-5


def test_eager_attention_equals_sdpa_and_output_attentions_returns_the_weights(tmp_path, monkeypatch):
    """`attn_implementation="eager"` computes the attention written out (SDPA is never called),
    with SDPA's results (plain causal, left-padded, and decoding on the cache, gradients too), and
    `output_attentions=True` returns each layer's weights: rows of probability that never look
    ahead or at padding."""
    sdpa = _tiny().eval()
    sdpa.save_pretrained(tmp_path)
    eager = CustomLLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert eager.config._attn_implementation == "eager"
    x = _ids((2, 12))
    mask = torch.ones_like(x)
    mask[1, :3] = 0  # left padding
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)

    def results(model):
        with torch.no_grad():
            logits = [model(x, **kw).logits for kw in ({}, {"attention_mask": mask})]
            tokens = model.generate(x, attention_mask=mask, **gen)
        model.zero_grad()
        model(x, labels=x).loss.backward()
        return logits, tokens, model.decoder_layers[0].self_attn.q_proj_d.weight.grad.clone()

    want = results(sdpa)

    def no_sdpa(*a, **k):
        raise AssertionError("SDPA called under attn_implementation='eager'")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", no_sdpa)
    got = results(eager)
    monkeypatch.undo()
    for a, b in zip(got[0], want[0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-6)

    with torch.no_grad():
        out = sdpa(x, attention_mask=mask, output_attentions=True)
        torch.testing.assert_close(out.logits, sdpa(x, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)
    n_layers, heads = sdpa.config.num_hidden_layers, sdpa.config.num_attention_heads
    assert len(out.attentions) == n_layers
    for w in out.attentions:
        assert w.shape == (2, heads, 12, 12)
        torch.testing.assert_close(w.sum(-1), torch.ones(2, heads, 12))
        ahead = w.triu(1)
        assert torch.all(ahead[0] == 0) and torch.all(ahead[1, :, 3:] == 0)  # no real token attends ahead
        assert torch.all(w[1, :, 3:, :3] == 0)  # nor to the padding (padded rows see every key: unused)
    assert sdpa(x).attentions is None


def test_inputs_that_are_not_a_batch_of_token_ids_are_refused_by_name():
    """A 1-D row of ids failed with "not enough values to unpack", float or bool ids inside the
    embedding's lookup, an empty batch or no tokens in a reshape, 1-D labels with "too many
    indices": each is one ValueError naming the argument and what was given (the Flax model's
    message). A single sequence is not taken as a batch of one, as Llama's and GPT-2's causal LMs
    do not take it either; int32 ids work as int64."""
    import re

    model = _tiny().eval()
    x = _ids((2, 4))
    ids = "input_ids must be an integer tensor (int64 or int32) [batch, seq] of at least one token, got "
    embeds = "inputs_embeds must be a floating-point tensor [batch, seq, hidden_size=64] of at least one token, got "
    for kw, message in (
            (dict(input_ids=x[0]), ids + "int64[4] (one sequence: give input_ids[None])"),
            (dict(input_ids=x.float()), ids + "float32[2, 4]"),
            (dict(input_ids=x.bool()), ids + "bool[2, 4]"),
            (dict(input_ids=x.to(torch.int16)), ids + "int16[2, 4]"),
            (dict(input_ids=x[:0]), ids + "int64[0, 4]"),
            (dict(input_ids=x[:, :0]), ids + "int64[2, 0]"),
            (dict(input_ids=x.tolist()), ids + "list"),
            (dict(inputs_embeds=torch.ones(4, 64)), embeds + "float32[4, 64]"),
            (dict(inputs_embeds=torch.ones(2, 4, 32)), embeds + "float32[2, 4, 32]"),
            (dict(input_ids=x, labels=x[0]), "labels must be a tensor of the inputs' shape [2, 4] (token ids or -100), "
                                             "got int64[4]")):
        with pytest.raises(ValueError, match=re.escape(message) + "$"):
            model(**kw)
    with torch.no_grad():
        want = model(x, labels=x)
        got = model(x.to(torch.int32), labels=x)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=0)


def test_inputs_embeds_stand_for_the_token_embeddings_in_forward_and_generate():
    """`inputs_embeds` (the token embeddings; the model adds the positions) give the logits, loss
    and greedy continuation of the `input_ids` they embed; giving both, or neither, is refused."""
    model = _tiny().eval()
    x = _ids((2, 10))
    emb = model.get_input_embeddings()(x).detach()
    with torch.no_grad():
        want, got = model(x, labels=x), model(inputs_embeds=emb, labels=x)
        torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
        torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=0)
        gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        new = model.generate(inputs_embeds=emb, attention_mask=torch.ones_like(x), **gen)
        assert torch.equal(new, model.generate(x, **gen)[:, x.shape[1]:])  # only the new tokens come back
    for kw in ({"input_ids": x, "inputs_embeds": emb}, {}):
        with pytest.raises(ValueError, match="give input_ids or inputs_embeds"):
            model(**kw)


def test_a_plain_call_outside_training_returns_its_cache_as_hugging_face_models_do(tmp_path):
    """`use_cache` not given: the config's `use_cache` (True by default, saved and loaded with the
    config), never while training. A hand-written decoding loop then continues the sequence: the
    next token through the returned cache has the logits of the whole sequence's last position."""
    model = _tiny().eval()
    ids = _ids((2, 6))
    out = model(ids)
    cache = getattr(out, _CACHE_FIELD)
    assert cache is not None and cache.get_seq_length() == 6
    nxt = torch.tensor([[5], [7]])
    with torch.no_grad():
        step = model(nxt, past_key_values=getattr(model(ids), _CACHE_FIELD)).logits[:, -1]
        full = model(torch.cat([ids, nxt], 1)).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # several tokens at once on a cache (a prompt fed in pieces): causal among them too
        first = getattr(model(ids[:, :2]), _CACHE_FIELD)
        rest = model(ids[:, 2:], past_key_values=first).logits
        torch.testing.assert_close(rest, model(ids).logits[:, 2:], rtol=1e-5, atol=1e-5)
    assert getattr(model.train()(ids), _CACHE_FIELD) is None  # training: no cache unless asked for
    assert getattr(model.eval()(ids, use_cache=False), _CACHE_FIELD) is None
    model.config.use_cache = False
    model.save_pretrained(tmp_path)
    loaded = CustomLLM.from_pretrained(tmp_path).eval()
    assert loaded.config.use_cache is False and getattr(loaded(ids), _CACHE_FIELD) is None


def test_a_cache_fills_the_position_table_exactly_and_one_token_more_is_refused():
    """Tokens fed on a cache count its length: a prompt and then cached steps up to exactly
    `max_position_embeddings` tokens run, with the whole sequence's logits; one token more on that
    cache is refused by name (not an embedding's IndexError) and leaves the cache as it was."""
    model = _tiny().eval()
    n = model.config.max_position_embeddings
    ids = _ids((2, n))
    with torch.no_grad():
        full = model(ids).logits
        cache = getattr(model(ids[:, :n - 4]), _CACHE_FIELD)
        steps = [model(ids[:, n - 4:n - 1], past_key_values=cache).logits,  # several tokens, then one
                 model(ids[:, n - 1:], past_key_values=cache).logits]
        torch.testing.assert_close(torch.cat(steps, 1), full[:, n - 4:], rtol=1e-5, atol=1e-5)
        assert cache.get_seq_length() == n
        with pytest.raises(ValueError, match=rf"sequence length {n + 1} exceeds max_position_embeddings \({n}\)"):
            model(ids[:, :1], past_key_values=cache)
    assert cache.get_seq_length() == n


def test_eager_attention_decodes_on_the_cache_without_padding(tmp_path):
    """Decoding with the cache and no attention mask (no padding): eager attention's default mask is
    causal over the last T of S keys (`tril(S - T)`), as SDPA's path; a one-token step sees every key."""
    from jaxllm.config import LLMConfig

    torch.manual_seed(0)
    sdpa = CustomLLM(CustomLLMConfig.from_llm_config(LLMConfig.from_preset("tiny"))).eval()
    with torch.no_grad():
        for p in sdpa.parameters():
            p.mul_(5)  # attention far from uniform
    sdpa.save_pretrained(tmp_path)
    eager = CustomLLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = torch.tensor([[5, 17, 300, 42, 7, 99, 250, 3]])
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None,
              output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        a, b = eager.generate(ids, **kw), sdpa.generate(ids, **kw)
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(torch.stack(a.logits), torch.stack(b.logits), rtol=1e-4, atol=1e-3)


def test_save_pretrained_ships_the_modeling_code_so_that_the_copy_loads_anywhere(tmp_path):
    """Every `save_pretrained` of the model writes the code and `auto_map`, as an export does: a
    model loaded from an exported directory (whose config keeps `auto_map`) and saved again wrote
    `auto_map` without the code, and `trust_remote_code=True` then failed where this project is not
    installed."""
    from helpers import logits_without_this_project

    model = _tiny().eval()
    model.save_pretrained(tmp_path / "a")
    again = CustomLLM.from_pretrained(tmp_path / "a")
    again.save_pretrained(tmp_path / "b")
    ids = _ids((1, 8))
    with torch.no_grad():
        want = model(ids).logits.numpy()
    got = logits_without_this_project(tmp_path / "b", ids.numpy(), tmp_path)
    torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(want), rtol=1e-5, atol=1e-5)
    # push_to_hub=True would upload before the code is written: refused, naming push_to_hub()
    with pytest.raises(ValueError, match=r"call model.push_to_hub\(repo_id\)"):
        model.save_pretrained(tmp_path / "c", push_to_hub=True)
    assert not (tmp_path / "c").exists()


def test_the_fresh_process_of_the_shipped_code_tests_works_where_the_project_is_installed(tmp_path):
    """After `pip install ".[dev]"` (not -e) site-packages holds jaxllm, torch_ref and convert beside
    numpy, torch and transformers: `logits_without_this_project` took every directory holding a
    jaxllm package off sys.path, site-packages with it, and its process (three tests) ended in
    "No module named 'numpy'". Here, in a virtual environment laid out as such an installation."""
    import os
    import shutil
    import site
    import subprocess
    import venv

    from conftest import ROOT
    from helpers import logits_without_this_project

    venv.EnvBuilder(symlinks=True).create(tmp_path / "venv")
    python = str(tmp_path / "venv" / "bin" / "python")
    packages = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                              capture_output=True, text=True, check=True).stdout.strip()
    ours = ("jaxllm", "torch_ref", "convert")
    for where in filter(os.path.isdir, site.getsitepackages()):  # this interpreter's packages, linked,
        for name in os.listdir(where):                           # but not this project's (if installed)
            if name not in ours and "jaxllm" not in name and not os.path.lexists(os.path.join(packages, name)):
                os.symlink(os.path.join(where, name), os.path.join(packages, name))
    for package in ours:  # as `pip install .` copies them
        shutil.copytree(ROOT / package, os.path.join(packages, package), ignore=shutil.ignore_patterns("__pycache__"))
    model = _tiny().eval()
    model.save_pretrained(tmp_path / "hf")
    ids = _ids((1, 8))
    with torch.no_grad():
        want = model(ids).logits.numpy()
    got = logits_without_this_project(tmp_path / "hf", ids.numpy(), tmp_path, python=python)
    torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(want), rtol=1e-5, atol=1e-5)


def test_save_pretrained_leaves_the_model_s_own_config_as_it_was(tmp_path):
    """The saved config.json names the shipped code in `auto_map`; the live config gets no
    `auto_map` (a new model) or keeps its own (here one naming code in another Hub repository).
    A process other than the main one writes nothing."""
    import json

    from torch_ref.modeling_customllm import AUTO_MAP

    def config_json(path):
        with open(path / "config.json") as f:
            return json.load(f)

    def rest(config):  # transformers' own save sets `architectures` and `dtype`, as for any model
        return {k: v for k, v in config.to_dict().items() if k not in ("architectures", "dtype")}

    model = _tiny()
    before = rest(model.config)
    model.save_pretrained(tmp_path / "a")
    assert config_json(tmp_path / "a")["auto_map"] == AUTO_MAP
    assert "auto_map" not in model.config.to_dict() and rest(model.config) == before
    loaded = CustomLLM.from_pretrained(tmp_path / "a")
    own = {k: f"someone/customllm-code--{v}" for k, v in AUTO_MAP.items()}
    loaded.config.auto_map = own
    loaded.save_pretrained(tmp_path / "b")
    assert config_json(tmp_path / "b")["auto_map"] == AUTO_MAP
    assert loaded.config.auto_map == own
    model.save_pretrained(tmp_path / "c", is_main_process=False)
    assert list((tmp_path / "c").glob("*")) == []


def test_a_trainer_s_label_smoothing_shifts_the_labels_as_for_other_causal_lms(tmp_path):
    """With `label_smoothing_factor` the Trainer takes the loss from the logits and shifts the
    labels only for the causal LMs transformers lists by name; unlisted, CustomLLM was trained to
    predict each token from itself (the balance loss is not in that loss: README)."""
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_pt_utils import LabelSmoother

    model = _tiny(embedding_dropout=0.0).eval()
    rows = _ids((4, 16))
    args = TrainingArguments(str(tmp_path), label_smoothing_factor=0.1, per_device_eval_batch_size=4, use_cpu=True,
                             report_to="none")
    got = Trainer(model=model, args=args).evaluate([{"input_ids": r, "labels": r} for r in rows])["eval_loss"]
    with torch.no_grad():
        want = LabelSmoother(0.1)({"logits": model(rows).logits}, rows, shift_labels=True).item()
    assert abs(got - want) < 1e-5, (got, want)


def test_set_attn_implementation_switches_a_loaded_model_to_eager(monkeypatch):
    """transformers guessed from the module's source that the attention could not be switched, and
    `set_attn_implementation("eager")` only logged so; the model reads the setting at every call."""
    model = _tiny().eval()
    x = _ids((2, 12))
    with torch.no_grad():
        want = model(x).logits
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"

    def no_sdpa(*a, **k):
        raise AssertionError("SDPA called under attn_implementation='eager'")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", no_sdpa)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, want, rtol=1e-5, atol=1e-5)


def test_a_config_a_quantized_load_saved_loads_again(tmp_path):
    """`quantization_config`, which a quantized load writes into config.json, is Hugging Face's,
    not a misspelt field: such a saved config loads."""
    from transformers import AutoConfig

    config = CustomLLMConfig.from_preset("tiny")
    config.quantization_config = {"quant_method": "bitsandbytes"}
    config.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).quantization_config == {"quant_method": "bitsandbytes"}


def test_logits_to_keep_gives_the_last_positions_logits():
    """`logits_to_keep=k` (generate() passes 1, assisted decoding more) applies the head to the last
    k positions only: the full call's last k logits; 0 keeps every position."""
    model = _tiny().eval()
    x = _ids((2, 10))
    with torch.no_grad():
        full = model(x).logits
        for k in (1, 3):
            torch.testing.assert_close(model(x, logits_to_keep=k).logits, full[:, -k:], rtol=1e-6, atol=1e-6)
        assert torch.equal(model(x, logits_to_keep=0).logits, full)


def test_resize_token_embeddings_grows_the_vocabulary_and_keeps_the_old_tokens_logits(tmp_path):
    """`resize_token_embeddings` (tokens added to a tokenizer) goes through the model's input and
    output embeddings: the table, `lm_head` and its bias grow, the old tokens' logits stay as they
    were, a new token runs, and the model saves and loads at its new size."""
    model = _tiny().eval()
    x = _ids((2, 8))
    with torch.no_grad():
        want = model(x).logits
    model.resize_token_embeddings(520)
    assert model.config.vocab_size == 520 and model.lm_head.bias.shape == (520,)
    x = torch.cat([x, torch.tensor([[519], [512]])], 1)
    with torch.no_grad():
        got = model(x).logits
    assert got.shape == (2, 9, 520)
    torch.testing.assert_close(got[:, :8, :512], want, rtol=1e-6, atol=1e-6)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(CustomLLM.from_pretrained(tmp_path).eval()(x).logits, got, rtol=0, atol=0)


def test_a_device_map_that_offloads_a_layer_to_disk_computes_what_the_model_in_memory_computes(tmp_path):
    """Under an offloading `device_map` (a layer on "disk"; on a GPU, layers on "cpu") accelerate
    loads a module's weights as the module is called. The router's weight was read from outside its
    module and stayed on the meta device: `F.linear` of a CPU input and a meta weight returns
    uninitialised memory without an error, so that layer routed tokens at random (logits off by
    ~1e-2, other generated tokens)."""
    model = _tiny().eval()
    model.save_pretrained(tmp_path / "model")
    device_map = {"token_embeddings": "cpu", "position_embeddings": "cpu", "dropout": "cpu",
                  "decoder_layers.0": "cpu", "decoder_layers.1": "disk", "lm_head": "cpu"}
    offloaded = CustomLLM.from_pretrained(tmp_path / "model", device_map=device_map,
                                          offload_folder=str(tmp_path / "offload")).eval()
    assert offloaded.hf_device_map["decoder_layers.1"] == "disk"
    x = _ids((2, 16))
    with torch.no_grad():
        want = model(x)
        got = offloaded(x)
    assert torch.equal(got.expert_counts, want.expert_counts)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
    prompt = _ids((1, 5), seed=1)
    assert torch.equal(offloaded.generate(prompt, max_new_tokens=8, do_sample=False),
                       model.generate(prompt, max_new_tokens=8, do_sample=False))
