"""The one configuration: presets, exact parameter counts, JSON on both sides, clear errors."""

import json

import pytest

from jaxllm.config import PRESETS, LLMConfig, count_params


def test_seed_preset_has_the_seed_documents_parameter_count():
    assert count_params(LLMConfig.from_preset("seed-973m")) == 973_122_048


def test_small_preset_is_a_cpu_demo_size():
    assert 10e6 <= count_params(LLMConfig.from_preset("small")) <= 40e6


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_change_sizes_not_structure(name):
    c = LLMConfig.from_preset(name)
    assert (c.num_shared_experts, c.num_routed_experts, c.num_experts_per_tok) == (1, 7, 2)
    assert c.lm_head_bias and not c.tie_word_embeddings


def test_count_params_matches_an_abstract_flax_model():
    import jax
    import numpy as np
    from flax import nnx

    from jaxllm.model import create_model

    c = LLMConfig.from_preset("seed-973m")
    abstract = create_model(c, abstract=True)  # allocates nothing
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert n == count_params(c) == 973_122_048


def test_json_round_trip_is_identity(tmp_path):
    c = LLMConfig.from_preset("tiny", rope_theta=5000.0)
    p = tmp_path / "config.json"
    p.write_text(c.to_json_string())
    assert LLMConfig.from_json_file(p) == c
    assert json.loads(p.read_text())["model_type"] == "customllm"


def test_same_config_json_on_both_sides(tmp_path):
    from torch_ref import CustomLLMConfig

    c = LLMConfig.from_preset("tiny")
    hf = CustomLLMConfig.from_llm_config(c)
    hf.save_pretrained(tmp_path)
    back = LLMConfig.from_json_file(tmp_path / "config.json")  # HF's extra keys are ignored
    assert back == c
    assert CustomLLMConfig.from_pretrained(tmp_path).to_llm_config() == c


@pytest.mark.parametrize("overrides, field", [
    ({"hidden_size": 0}, "hidden_size"),
    ({"num_hidden_layers": -2}, "num_hidden_layers"),
    ({"num_experts_per_tok": 8}, "num_experts_per_tok"),
    ({"rope_head_dim": 7}, "rope_head_dim"),
    ({"v_head_dim": 10}, "v_head_dim"),
    ({"latent_dim": 4096}, "latent_dim"),
    ({"embedding_dropout": 1.5}, "embedding_dropout"),
    ({"eos_token_id": 10**6}, "eos_token_id"),
    ({"vocab_size": 3.5}, "vocab_size"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
])
def test_invalid_values_raise_valueerror_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        LLMConfig.from_preset("tiny", **overrides)


@pytest.mark.parametrize("cls", ["LLMConfig", "CustomLLMConfig"])
def test_numpy_numbers_are_taken_as_the_python_ones_they_equal(cls, tmp_path):
    """`hidden_size=np.int64(64)` (a size read from an array, a sweep over `np.arange`) was refused
    ("must be an integer"), np.float32 for a float field too, where OptimConfig takes NumPy numbers.
    They are now taken, stored as Python numbers (config.json stays plain JSON: the same file as
    for Python values); bools, NumPy's too, and non-integral floats for sizes are still refused."""
    import numpy as np

    from torch_ref import CustomLLMConfig

    def make(preset, **overrides):  # (CustomLLMConfig's own constructor: from_preset goes through LLMConfig)
        return (LLMConfig if cls == "LLMConfig" else CustomLLMConfig)(**{**PRESETS[preset], **overrides})

    numpy_values = dict(hidden_size=np.int64(64), num_shared_experts=np.uint8(1), bos_token_id=np.int32(1),
                        rope_theta=np.float32(5000.0), rms_norm_eps=np.float64(1e-6),
                        embedding_dropout=np.float32(0.25))
    c = make("tiny", **numpy_values)
    python_values = {k: v.item() for k, v in numpy_values.items()}
    for k, v in python_values.items():
        assert getattr(c, k) == v and type(getattr(c, k)) is type(v), (k, getattr(c, k))
    assert c.to_json_string() == make("tiny", **python_values).to_json_string()
    for bad, message in ((dict(hidden_size=np.float64(64.5)), "hidden_size must be an integer"),
                         (dict(hidden_size=True), "hidden_size must be an integer"),
                         (dict(bos_token_id=np.bool_(True)), "bos_token_id must be a non-negative integer"),
                         (dict(rope_theta=np.bool_(True)), "rope_theta must be a finite positive number"),
                         (dict(rope_theta=np.float32("nan")), "rope_theta must be a finite positive number"),
                         (dict(num_hidden_layers=np.int64(0)), "num_hidden_layers must be positive")):
        with pytest.raises(ValueError, match=message):
            make("tiny", **bad)


def test_unknown_preset_and_unknown_field_are_named():
    with pytest.raises(ValueError, match="huge"):
        LLMConfig.from_preset("huge")
    with pytest.raises(ValueError, match="hidden_szie"):
        LLMConfig.from_dict({"hidden_szie": 12})


def test_torch_config_validates_too():
    from torch_ref import CustomLLMConfig

    with pytest.raises(ValueError, match="num_experts_per_tok"):
        CustomLLMConfig.from_preset("tiny", num_experts_per_tok=9)


def test_torch_config_json_refuses_a_misspelt_field_and_the_model_an_invalid_override(tmp_path):
    """`from_pretrained` on a config.json with a typo (`num_hiden_layers`) built a 30-layer model
    of mostly untrained layers; an override after loading (`num_experts_per_tok=9` of 7 experts)
    ran as top-7. Hugging Face's own keys (a whole `to_dict()`) still load."""
    from transformers import AutoConfig

    from torch_ref import CustomLLM, CustomLLMConfig

    config = CustomLLMConfig.from_preset("tiny")
    config.save_pretrained(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    d["num_hiden_layers"] = d.pop("num_hidden_layers")
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="unknown config field.*num_hiden_layers"):
        AutoConfig.from_pretrained(tmp_path)
    assert LLMConfig.from_dict(config.to_dict()) == config.to_llm_config()  # id2label & co. ignored
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    loaded = AutoConfig.from_pretrained(tmp_path, num_experts_per_tok=9)
    assert loaded.num_experts_per_tok == 9
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        CustomLLM(loaded)
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="router_aux_loss_coef must be a finite non-negative number"):
            LLMConfig.from_preset("tiny", router_aux_loss_coef=bad)
    for name in ("rope_theta", "rms_norm_eps", "initializer_range"):  # inf: an all-zero norm, NaN weights
        for bad in (float("inf"), float("nan"), 0.0):
            with pytest.raises(ValueError, match=f"{name} must be a finite positive number"):
                LLMConfig.from_preset("tiny", **{name: bad})
            with pytest.raises(ValueError, match=f"{name} must be a finite positive number"):
                CustomLLMConfig.from_preset("tiny", **{name: bad})


def test_remat_default_by_model_size_and_accumulation():
    from jaxllm.recipes import AUTO_REMAT_PARAMS, resolve_remat

    assert resolve_remat(None, AUTO_REMAT_PARAMS - 1) == "none"
    assert resolve_remat(None, AUTO_REMAT_PARAMS) == "dots"
    assert resolve_remat(None, AUTO_REMAT_PARAMS, grad_accum=8) == "full"
    assert resolve_remat(None, AUTO_REMAT_PARAMS, grad_accum=2) == "full"  # any accumulation holds a 2nd gradient
    assert resolve_remat("none", 10**9, grad_accum=8) == "none"
    with pytest.raises(ValueError, match="remat"):
        resolve_remat("everything", 1)


def test_the_settings_processes_compare_name_the_flags_that_differ():
    """What every process of a multi-process run must share (both trainers compare it at start-up):
    every flag as given but --no-progress; the error names each flag that differs."""
    import dataclasses

    from jaxllm.recipes import RunConfig, differing_settings, setting_digests

    rc = RunConfig(ckpt_dir="ck")
    names, digests = setting_digests(rc)
    assert differing_settings(names, digests, digests) is None
    moved = differing_settings(names, setting_digests(dataclasses.replace(rc, ckpt_dir="ck2"))[1], digests)
    assert str(moved).startswith("--ckpt-dir differs from process 0's")
    other = dataclasses.replace(rc, lr=0.1, steps=3, progress=False)
    error = differing_settings(names, setting_digests(other)[1], digests)
    assert str(error) == "--lr, --steps differ from process 0's: give every process the same settings"
    assert "--seed" in names  # another seed per process would train replicas apart
    assert str(differing_settings(names, setting_digests(dataclasses.replace(rc, seed=1))[1], digests)).startswith(
        "--seed differs")


def test_the_scripts_parser_takes_negative_numbers_as_values_as_argparse_does_and_more(monkeypatch):
    """jaxllm.cli's parser reads "-1e-3" and "-inf" as values (argparse before 3.13 took them for
    flags), and keeps whatever argparse itself reads as a number: a later argparse may take more
    (here one told that any "-digit..." is a number, as Python 3.13's is) and must not lose it."""
    import argparse
    import re

    from jaxllm import cli

    def values(parser):
        parser.add_argument("--lr", type=float)
        parser.add_argument("--prompt")
        parser.add_argument("-x", action="store_true")
        out = []
        for argv in (["--lr", "-1e-3"], ["--lr", "-inf"], ["--lr", "-0.5"], ["--prompt", "-5C"]):
            try:
                out.append(vars(parser.parse_args(argv)))
            except SystemExit:
                out.append(None)
        return out

    lr = lambda v: {"lr": v, "prompt": None, "x": False}
    prompt = {"lr": None, "prompt": "-5C", "x": False}
    assert values(cli.parser("x.py", "")) == [lr(-1e-3), lr(float("-inf")), lr(-0.5), None]
    real_init = argparse.ArgumentParser.__init__

    def broader(self, *a, **kw):
        real_init(self, *a, **kw)
        self._negative_number_matcher = re.compile(r"-\.?\d")

    monkeypatch.setattr(argparse.ArgumentParser, "__init__", broader)
    assert values(cli.parser("x.py", "")) == [lr(-1e-3), lr(float("-inf")), lr(-0.5), prompt]
