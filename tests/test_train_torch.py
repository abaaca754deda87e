"""PyTorch training with the Hugging Face Trainer (torch_ref/training.py, scripts/train_torch.py):
optimizer parity with jaxllm.train, the data stream, learning, exact resume, conversion of the
saved directory to Flax, and the cross-framework check against the JAX trainer."""

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from helpers import rel_err, tree_listing
from jaxllm import data as data_lib
from jaxllm.config import LLMConfig
from jaxllm.recipes import RunConfig
from torch_ref import CustomLLM, CustomLLMConfig
from torch_ref.modeling_customllm import _CACHE_FIELD
from torch_ref.training import CustomLLMTrainer, FixedBatches, StreamDataset, run, training_arguments

# The tiny model with the embedded tokenizer's vocabulary (4,096), so that real text trains it.
TINY = LLMConfig.from_preset("tiny", vocab_size=data_lib.EMBEDDED_VOCAB_SIZE)


def _rc(tmp_path, **kw) -> RunConfig:
    cfg = tmp_path / "tiny.json"
    if not cfg.exists():
        cfg.write_text(TINY.to_json_string())
    settings = dict(config=str(cfg), seq_len=32, batch_size=4, grad_accum=2, lr=5e-3, warmup_steps=1, steps=10,
                    save_every=4, keep=3, log_every=1, prompts=("The",), max_new_tokens=8, progress=False)
    settings.update(kw)
    return RunConfig(ckpt_dir=str(tmp_path / "run"), **settings)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 10-step run of `run()` (dropout on, checkpoints at steps 4, 8, 10)."""
    tmp = tmp_path_factory.mktemp("torchtrain")
    rc = _rc(tmp)
    summary = run(rc, dtype="float32")
    return rc, summary


# ---- optimizer parity with jaxllm.train ------------------------------------------------------
def _trainer(tmp_path, model=None, **rc_kw):
    model = model or CustomLLM(CustomLLMConfig.from_llm_config(TINY))
    rc = RunConfig(**{"steps": 20, "warmup_steps": 5, "lr": 1e-3, "progress": False, **rc_kw})
    args = training_arguments(rc, str(tmp_path), per_device_batch=2, save=False, use_cpu=True)
    batches = np.zeros((1, 2, 8), np.int64)
    return CustomLLMTrainer(model=model, args=args, train_dataset=FixedBatches(batches, 2))


def test_one_process_that_sees_several_gpus_trains_on_one_and_says_how_to_use_them_all(tmp_path, monkeypatch, capsys):
    """`python scripts/train_torch.py` on a machine of several GPUs (no torchrun): the Trainer
    would wrap the model in nn.DataParallel, which averages the replicas' parts of the step's loss
    (a sum over them) and concatenates their router-bias counts, and it takes a batch that many
    times larger. One GPU trains, with a note. (No GPU here: the arguments are told they see two.)"""
    import functools

    from torch_ref import training

    class TwoGPUs(training.TrainingArguments):
        @functools.cached_property
        def _setup_devices(self):
            self._n_gpu = 2
            return torch.device("cpu")

    monkeypatch.setattr(training, "TrainingArguments", TwoGPUs)
    args = training_arguments(RunConfig(steps=2, progress=False), str(tmp_path), per_device_batch=4, save=False)
    assert (args.n_gpu, args.train_batch_size) == (1, 4)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sees 2 GPUs and trains on one" in err and "torchrun --nproc-per-node 2" in err, err


def test_evaluation_gives_the_model_s_loss_whatever_the_training_accumulated(tmp_path):
    """`evaluate()` reports each batch's loss as the model computes it: it took the training step's
    part (the balance loss divided by the last step's gradient accumulation, the loss times the
    number of processes), so that after training with --grad-accum 4 the same data scored another
    loss."""
    tr = _trainer(tmp_path)
    rows = torch.from_numpy(np.random.RandomState(0).randint(0, TINY.vocab_size, (4, 16)))
    data = [{"input_ids": r, "labels": r} for r in rows]
    with torch.no_grad():
        want = tr.model.eval()(rows, labels=rows).loss.item()
    assert abs(tr.evaluate(data)["eval_loss"] - want) < 1e-6
    tr.current_gradient_accumulation_steps = 4  # as after a training step with --grad-accum 4
    assert abs(tr.evaluate(data)["eval_loss"] - want) < 1e-6


def test_weight_decay_on_the_parameters_jax_decays(tmp_path):
    from convert.mapping import flax_to_torch
    from flax import nnx

    from jaxllm.model import RouterBias, create_model
    from jaxllm.train import decay_mask
    from jaxllm.weights import flatten

    _, params, rb = nnx.split(create_model(TINY), nnx.Param, RouterBias)
    pure = nnx.to_pure_dict(params)
    flat = {k: np.full(v.shape, m) for (k, v), m in
            zip(flatten(pure).items(), flatten(decay_mask(pure)).values())}
    flat.update({k: np.zeros(v.shape, bool) for k, v in flatten(nnx.to_pure_dict(rb)).items()})
    jax_decayed = {name for name, m in flax_to_torch(flat, TINY).items() if m.all()}
    assert all(m.all() or not m.any() for m in flax_to_torch(flat, TINY).values())

    tr = _trainer(tmp_path)
    torch_decayed = set(tr.get_decay_parameter_names(tr.model))
    assert torch_decayed == jax_decayed
    assert "lm_head.bias" not in torch_decayed and "decoder_layers.0.input_norm.weight" not in torch_decayed
    tr.create_optimizer()
    groups = {g["weight_decay"]: {id(p) for p in g["params"]} for g in tr.optimizer.param_groups}
    named = dict(tr.model.named_parameters())
    assert groups[0.01] == {id(named[n]) for n in jax_decayed}
    assert type(tr.optimizer).__name__ == "AdamW"
    assert tr.optimizer.defaults["betas"] == (0.9, 0.999) and tr.optimizer.defaults["eps"] == 1e-8


def test_an_expert_no_token_chose_still_gets_weight_decay_as_in_optax(tmp_path):
    model = CustomLLM(CustomLLMConfig.from_llm_config(TINY))
    with torch.no_grad():
        for layer in model.decoder_layers:
            layer.mlp.moe.router_bias[-1] = -10.0  # no token selects the last routed expert
    before = model.decoder_layers[0].mlp.moe.routed_experts[-1].up_proj.weight.detach().clone()
    rc = RunConfig(steps=1, warmup_steps=0, lr=1e-2, progress=False)
    args = training_arguments(rc, str(tmp_path), per_device_batch=2, save=False, use_cpu=True)
    batches = np.random.RandomState(0).randint(0, TINY.vocab_size, (1, 2, 16))
    CustomLLMTrainer(model=model, args=args, train_dataset=FixedBatches(batches, 2)).train()
    after = model.decoder_layers[0].mlp.moe.routed_experts[-1].up_proj.weight.detach()
    # Zero gradient: Adam's update is 0, decoupled weight decay still shrinks the weights.
    torch.testing.assert_close(after, before * (1 - 1e-2 * rc.weight_decay), rtol=1e-6, atol=0)


def test_a_parameter_left_out_of_a_step_is_updated_as_jax_s_optimizer_updates_it(tmp_path):
    """A parameter with no gradient in a step (`grad is None`: torch's AdamW skipped it, its moments,
    weight decay and step count) moves as under `jaxllm.train.make_optimizer`, which sees a zero
    gradient: here a decayed matrix used in steps 1 and 3 only, with a known gradient."""
    import jax.numpy as jnp

    from jaxllm.train import OptimConfig, make_optimizer

    model = CustomLLM(CustomLLMConfig.from_llm_config(TINY))
    w = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    model.register_parameter("extra", torch.nn.Parameter(torch.randn(3, 4, generator=torch.Generator().manual_seed(1))))
    start = model.extra.detach().clone()
    calls = []

    def use_extra_in_steps_1_and_3(module, inputs, out):  # one micro-batch per step; gradient w
        calls.append(None)
        if len(calls) != 2:
            out.lm_loss = out.lm_loss + (module.extra * w).sum()
        return out

    model.register_forward_hook(use_extra_in_steps_1_and_3)
    tr = _trainer(tmp_path, model=model, steps=3, warmup_steps=1, lr=1e-2, weight_decay=0.1, clip_norm=0.0)
    tr.train_dataset = FixedBatches(np.random.RandomState(0).randint(0, TINY.vocab_size, (3, 2, 8)), 2)
    assert "extra" in tr.get_decay_parameter_names(model)
    tr.train()
    assert len(calls) == 3

    tx, _ = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=1, total_steps=3, weight_decay=0.1, clip_norm=0.0))
    params = {"extra": jnp.asarray(start.numpy())}
    opt = tx.init(params)
    for g in (w.numpy(), np.zeros_like(w.numpy()), w.numpy()):
        updates, opt = tx.update({"extra": jnp.asarray(g)}, opt, params)
        params = {"extra": params["extra"] + updates["extra"]}
    np.testing.assert_allclose(model.extra.detach().numpy(), np.asarray(params["extra"]), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("major, want", [(7, "float32"), (8, "bfloat16"), (9, "bfloat16")])
def test_dtype_auto_is_bfloat16_only_on_gpus_that_compute_in_it(monkeypatch, major, want):
    """A T4 / V100 (compute capability 7.x) holds bfloat16 tensors but has no bfloat16 arithmetic:
    `--dtype auto` trains it in float32. Simulated: torch's own check runs against a fake device."""
    from types import SimpleNamespace

    from torch_ref.training import resolve_dtype

    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(major=major))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)  # emulation works
    assert resolve_dtype("auto") == want
    assert resolve_dtype("float32") == "float32" and resolve_dtype("bfloat16") == "bfloat16"


def test_a_mixed_precision_from_accelerate_launch_that_is_not_the_dtype_is_refused(tmp_path, monkeypatch, capsys):
    """`accelerate launch --mixed_precision bf16|fp16` sets ACCELERATE_MIXED_PRECISION, which the
    Trainer would follow while the run says (and records) float32."""
    from torch_ref.training import resolve_dtype

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert resolve_dtype("float32") == "float32" and resolve_dtype("bfloat16") == "bfloat16"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert resolve_dtype("bfloat16") == "bfloat16"
    with pytest.raises(ValueError, match="mixed precision bf16 .* differs from --dtype float32;"):
        resolve_dtype("float32")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"mixed precision bf16 .* differs from --dtype auto \(float32 here\);"):
        resolve_dtype("auto")  # the flag as given (or the default), and what it resolved to
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    for dtype in ("float32", "bfloat16", "auto"):
        with pytest.raises(ValueError, match="mixed precision fp16"):
            resolve_dtype(dtype)
    assert _train_torch().main(["--preset", "tiny", "--dtype", "float32", "--ckpt-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train_torch.py: error: Accelerate's mixed precision fp16") and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("warmup, total", [(5, 20), (30, 300), (0, 10), (25, 10)])
def test_schedule_equals_jax_warmup_cosine(tmp_path, warmup, total):
    from jaxllm.train import OptimConfig, lr_schedule

    tr = _trainer(tmp_path, steps=total, warmup_steps=warmup)
    tr.create_optimizer_and_scheduler(num_training_steps=total)
    hf = []
    for _ in range(total):
        hf.append(tr.lr_scheduler.get_last_lr()[0])
        tr.optimizer.step()
        tr.lr_scheduler.step()
    jx = lr_schedule(OptimConfig(lr=1e-3, warmup_steps=warmup, total_steps=total))
    # optax evaluates the schedule in float32: agreement to float32 rounding of the peak rate.
    np.testing.assert_allclose(hf, [float(jx(s)) for s in range(total)], rtol=0, atol=1e-6 * 1e-3)


# ---- the model under a stock transformers.Trainer ---------------------------------------------
def _stock_trainer(tmp_path, rows, *, batch, grad_accum=1, callbacks=(), **config):
    """A plain `Trainer` (no CustomLLMTrainer) for one step at learning rate 0, without clipping,
    on the fixed `rows`, with a fresh seeded tiny model without dropout."""
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    llm = LLMConfig.from_preset("tiny", vocab_size=TINY.vocab_size, embedding_dropout=0.0, **config)
    model = CustomLLM(CustomLLMConfig.from_llm_config(llm))
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=batch, per_device_eval_batch_size=len(rows),
                             gradient_accumulation_steps=grad_accum, max_steps=1, learning_rate=0.0,
                             max_grad_norm=0.0, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                             disable_tqdm=True)
    data = [{"input_ids": torch.from_numpy(r), "labels": torch.from_numpy(r)} for r in rows]
    return Trainer(model=model, args=args, train_dataset=data, eval_dataset=data, callbacks=list(callbacks))


def test_the_trainer_passes_the_attention_mask_of_a_padded_batch(tmp_path):
    """A dataset of the user's, padded on the left (labels -100 there): the loss is the model's own
    with the mask, padded keys unseen."""
    model = CustomLLM(CustomLLMConfig.from_llm_config(TINY)).eval()
    ids = torch.randint(1, TINY.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    labels = ids.masked_fill(mask == 0, -100)
    trainer = _trainer(tmp_path, model=model)
    with torch.no_grad():
        got = trainer.compute_loss(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
        want = model(ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_a_stock_trainer_gets_the_models_own_loss(tmp_path):
    """`CustomLLM.loss_type` tells the Trainer the loss is a shifted causal-LM loss, so its
    `num_items_in_batch` counts `labels[:, 1:]`, the tokens the model divides by (not all T)."""
    rows = np.random.RandomState(0).randint(0, TINY.vocab_size, (8, 16))
    tr = _stock_trainer(tmp_path, rows, batch=8)
    x = torch.from_numpy(rows)
    with torch.no_grad():
        want = tr.model(x, labels=x).loss.item()
    eval_loss = tr.evaluate()["eval_loss"]
    tr.train()
    train_loss = tr.state.log_history[0]["loss"]
    print(f"model {want:.6f}  eval_loss {eval_loss:.6f}  logged training loss {train_loss:.6f}")
    assert eval_loss == pytest.approx(want, rel=1e-6)
    assert train_loss == pytest.approx(want, rel=1e-6)


def test_a_stock_trainer_counts_the_balance_loss_once_per_step_under_accumulation(tmp_path):
    """With `num_items_in_batch` each micro-batch's balance loss is weighted by its share of the
    step's tokens: 8 rows as 8x1, 4x2 or 2x4 (batch x accumulation) give the same gradient."""
    from transformers import TrainerCallback

    rows = np.random.RandomState(0).randint(0, TINY.vocab_size, (8, 16))
    grads = {}

    class RouterGrads(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads[args.gradient_accumulation_steps] = torch.stack(
                [layer.mlp.moe.router.weight.grad.clone() for layer in model.decoder_layers])

    for batch, accum in ((8, 1), (4, 2), (2, 4)):
        _stock_trainer(tmp_path, rows, batch=batch, grad_accum=accum, callbacks=[RouterGrads()],
                       router_aux_loss_coef=1.0).train()
    print({a: round(g.norm().item(), 6) for a, g in grads.items()})
    for accum in (2, 4):
        torch.testing.assert_close(grads[accum], grads[1], rtol=1e-5, atol=1e-7)


# ---- the data stream -------------------------------------------------------------------------
def test_stream_dataset_is_the_shared_packing_per_process_and_resumes_exactly():
    tok = data_lib.load_tokenizer(None)
    cfg = data_lib.DataConfig(seq_len=16)
    shares = []
    for rank in range(2):
        ds = StreamDataset(cfg, tok, rows=3, process_index=rank, process_count=2)
        it = iter(ds)
        got = [next(it) for _ in range(4)]
        state = ds.state_dict()
        nxt = next(it)["input_ids"]
        ds.close()
        ref = data_lib.PackedBatches(cfg, tok, rows=3, process_index=rank, process_count=2)
        try:
            want = [next(ref) for _ in range(5)]
        finally:
            ref.close()
        for b, w in zip(got, want):
            assert b["input_ids"].dtype == torch.int64 and b["input_ids"].shape == (3, 16)
            np.testing.assert_array_equal(b["input_ids"].numpy(), w)
            assert b["labels"] is b["input_ids"]
        resumed = StreamDataset(cfg, tok, rows=3, process_index=rank, process_count=2, state=state)
        np.testing.assert_array_equal(next(iter(resumed))["input_ids"].numpy(), nxt.numpy())
        resumed.close()
        shares.append(np.concatenate(want))
    assert not np.array_equal(shares[0], shares[1])


# ---- training, checkpoints, resume, conversion ----------------------------------------------
def test_loss_falls_and_checkpoints_are_hf_directories(trained):
    rc, summary = trained
    losses = [r["loss"] for r in summary["records"]]
    assert [r["step"] for r in summary["records"]] == list(range(1, 11))
    assert summary["start_step"] == 0 and summary["end_step"] == 10
    assert losses[-1] < losses[0] - 0.4 and losses[-1] == min(losses), losses
    rec = summary["records"][-1]
    # The metrics' loss (made from the step's lm_loss and aux_loss) is the loss the Trainer
    # optimised and logged itself at that step (logged every step: not a mean over several).
    with open(os.path.join(rc.ckpt_dir, "checkpoint-10", "trainer_state.json")) as f:
        logged = {h["step"]: h["loss"] for h in json.load(f)["log_history"] if "loss" in h}
    assert sorted(logged) == list(range(1, 11))
    for r in summary["records"]:
        assert abs(r["loss"] - logged[r["step"]]) <= 1e-5 * abs(logged[r["step"]]), (r["step"], r["loss"], logged)
    assert len(rec["expert_load_max"]) == TINY.num_hidden_layers
    assert all("mfu" in r and r["mfu"] is None for r in summary["records"])  # a CPU: no datasheet peak
    assert summary["samples"] and summary["samples"][0][1].startswith("The")

    ckpt = os.path.join(rc.ckpt_dir, "checkpoint-10")
    assert sorted(n for n in os.listdir(rc.ckpt_dir) if n.startswith("checkpoint-")) == \
        ["checkpoint-10", "checkpoint-4", "checkpoint-8"]
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "trainer_state.json", "data_state.rank0.json"):
        assert os.path.isfile(os.path.join(ckpt, name)), name
    assert LLMConfig.from_json_file(os.path.join(ckpt, "config.json")) == TINY
    # its tokenizer pads batched prompts on the left for `generate`, as an export's does
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    assert tok.padding_side == "left" and tok.bos_token_id == TINY.bos_token_id
    with open(os.path.join(ckpt, "tokenizer_config.json")) as f:
        saved = json.load(f)
    assert "is_local" not in saved and "local_files_only" not in saved  # loading options, not the tokenizer's
    sd = load_file(os.path.join(ckpt, "model.safetensors"))
    rb = sd["decoder_layers.0.mlp.moe.router_bias"]
    assert rb.shape == (TINY.num_routed_experts,) and np.any(rb != 0), "the router bias is trained and saved"
    assert not any("inv_freq" in k for k in sd)
    with open(os.path.join(rc.ckpt_dir, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == list(range(1, 11))


def test_a_checkpoint_loads_where_this_project_is_not_installed(trained, tmp_path):
    """Each `checkpoint-N` carries the modeling code and `auto_map`, as `flax_to_torch.py`'s exports
    do: `AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True)` needs only torch and
    transformers, and computes what `CustomLLM` computes here."""
    from helpers import logits_without_this_project

    rc, _ = trained
    ckpt = os.path.join(rc.ckpt_dir, "checkpoint-10")
    ids = np.array([[5, 17, 300, 42, 7, 99, 250]])
    model = CustomLLM.from_pretrained(ckpt).eval()
    with torch.no_grad():
        want = model(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(logits_without_this_project(ckpt, ids, tmp_path), want, rtol=1e-5, atol=1e-6)
    # So does the Trainer's `save_model`; the live model's config is left as it was.
    trainer = _trainer(tmp_path)
    trainer.save_model(str(tmp_path / "saved"))
    with open(tmp_path / "saved" / "config.json") as f:
        assert json.load(f)["auto_map"]["AutoModelForCausalLM"] == "modeling_customllm.CustomLLM"
    assert {"modeling_customllm.py", "configuration_customllm.py"} <= set(os.listdir(tmp_path / "saved"))
    assert getattr(trainer.model.config, "auto_map", None) is None


def test_a_checkpoint_keeps_the_models_use_cache(trained):
    """The Trainer writes its `use_cache` argument (False by default) into the model's config, which
    every checkpoint saves; the model's own setting (True) is kept, so that a loaded checkpoint's
    `model(ids)` returns its cache as Hugging Face models do."""
    rc, _ = trained
    ckpt = os.path.join(rc.ckpt_dir, "checkpoint-10")
    with open(os.path.join(ckpt, "config.json")) as f:
        assert json.load(f)["use_cache"] is True
    model = CustomLLM.from_pretrained(ckpt).eval()
    ids = torch.tensor([[5, 17, 300, 42, 7, 99, 250]])
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        first = model(ids[:, :-1])
        cache = getattr(first, _CACHE_FIELD)  # `cache`, or `past_key_values` before transformers 5.24
        step = model(ids[:, -1:], past_key_values=cache).logits[:, -1]
    assert cache is not None and torch.allclose(step, full, atol=1e-5)


def test_a_non_finite_step_stops_the_run_before_its_update_and_keeps_the_checkpoints(tmp_path, capsys):
    """As in JAX: a NaN / Inf gradient is never applied; the run stops with status 1 naming the step
    and the last checkpoint, which stays (the Trainer's rotation would have replaced it)."""
    ckpt = tmp_path / "run"
    code = _train_torch().main(["--preset", "tiny", "--seq-len", "32", "--batch-size", "2", "--steps", "6",
                                "--save-every", "2", "--keep", "1", "--warmup-steps", "4", "--lr", "1e30",
                                "--max-new-tokens", "0", "--no-progress", "--ckpt-dir", str(ckpt)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err
    assert "non-finite loss or gradient at step 3; the update was not applied and nothing was saved after " \
           f"{ckpt / 'checkpoint-2'}. Lower --lr (a resumed run takes it)" in err, err
    assert sorted(n for n in os.listdir(ckpt) if n.startswith("checkpoint-")) == ["checkpoint-2"]
    sd = load_file(str(ckpt / "checkpoint-2" / "model.safetensors"))
    assert all(np.isfinite(t).all() for t in sd.values())


def test_gradients_are_checked_before_clipping():
    """Finite gradients whose norm overflows float32 would be clipped to zeros (clip coefficient
    max_norm / inf) and pass any check after it; the check takes the norm first, as JAX does."""
    from torch_ref.training import NonFiniteError, check_finite_gradients

    model = CustomLLM(CustomLLMConfig.from_llm_config(TINY))
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.01)
    check_finite_gradients(model, 1)
    model.lm_head.weight.grad.fill_(1e30)  # finite, but its norm is not
    with pytest.raises(NonFiniteError, match="non-finite loss or gradient at step 7"):
        check_finite_gradients(model, 7)
    model.lm_head.weight.grad.fill_(0.01)
    model.lm_head.bias.grad[3] = float("nan")
    with pytest.raises(NonFiniteError):
        check_finite_gradients(model, 7)


def test_resume_continues_from_the_saved_step_exactly(trained, tmp_path):
    rc, summary = trained
    copy = tmp_path / "run"
    shutil.copytree(rc.ckpt_dir, copy)
    shutil.rmtree(copy / "checkpoint-10")
    # The saved data position belongs to one token stream: another seed (shuffling) is refused.
    with pytest.raises(ValueError, match=r"--seed 1 differs from the 0 .*start a new --ckpt-dir"):
        run(dataclasses.replace(rc, ckpt_dir=str(copy), seed=1), dtype="float32")
    resumed = run(dataclasses.replace(rc, ckpt_dir=str(copy)), dtype="float32")
    assert resumed["start_step"] == 8 and resumed["end_step"] == 10
    assert [r["step"] for r in resumed["records"]] == [9, 10]
    want = [r["loss"] for r in summary["records"][8:]]
    np.testing.assert_allclose([r["loss"] for r in resumed["records"]], want, rtol=1e-6)
    a = load_file(os.path.join(rc.ckpt_dir, "checkpoint-10", "model.safetensors"))
    b = load_file(str(copy / "checkpoint-10" / "model.safetensors"))
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_a_resumed_run_takes_the_learning_rate_it_is_given(trained, tmp_path):
    """As in JAX (whose schedule is made from the flags): resumed with half the --lr, the run's
    steps use half the learning rate of the run it continues (the saved scheduler state kept the
    first run's), on the same warm-up and cosine."""
    rc, summary = trained
    copy = tmp_path / "run"
    shutil.copytree(rc.ckpt_dir, copy)
    shutil.rmtree(copy / "checkpoint-10")
    resumed = run(dataclasses.replace(rc, ckpt_dir=str(copy), lr=rc.lr / 2, max_new_tokens=0), dtype="float32")
    assert [r["step"] for r in resumed["records"]] == [9, 10]
    np.testing.assert_allclose([r["lr"] for r in resumed["records"]],
                               [r["lr"] / 2 for r in summary["records"][8:]], rtol=1e-6)
    assert resumed["records"][0]["lr"] > 0


def test_a_resumed_run_takes_the_weight_decay_it_is_given(trained, tmp_path):
    """As in JAX: resumed with another --weight-decay, the run decays by it (the saved optimizer
    state's groups held the first run's, which the resume kept), on the parameters it decays."""
    rc, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(rc.ckpt_dir, copy)
    shutil.rmtree(copy / "checkpoint-10")
    assert rc.weight_decay != 0.5
    run(dataclasses.replace(rc, ckpt_dir=str(copy), weight_decay=0.5, max_new_tokens=0), dtype="float32")
    groups = torch.load(copy / "checkpoint-10" / "optimizer.pt", weights_only=True)["param_groups"]
    # the Trainer's groups: the decayed parameters (weights), then the others (norms, biases)
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0]


def test_generation_is_seeded_and_leaves_the_global_rng_alone(trained):
    from torch_ref.training import generate_samples

    rc, summary = trained
    model = CustomLLM.from_pretrained(os.path.join(rc.ckpt_dir, "checkpoint-10"), dtype=torch.float32)
    tok = summary["tokenizer"]
    state = torch.random.get_rng_state()
    a = generate_samples(model, tok, ["The", ""], 6, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert a == generate_samples(model, tok, ["The", ""], 6, seed=1)
    assert a[0][1].startswith("The") and len(tok(a[0][1])["input_ids"]) > 1
    greedy = generate_samples(model, tok, ["The"], 3, temperature=0)[0][1]
    ids = tok("The", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        for _ in range(3):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert greedy == tok.decode(ids, skip_special_tokens=True)


def test_samples_stop_at_the_position_table_and_leave_the_model_s_generation_settings():
    """The end's samples: --max-new-tokens beyond `max_position_embeddings` generates up to the
    table's end (not an error), with the sampling settings of the call, not those of the model's
    `generation_config` (an --init-from directory's), which stays the model's afterwards, as does
    its training mode, also when a prompt leaves no room."""
    from transformers import GenerationConfig

    from torch_ref.training import generate_samples

    n = 12
    torch.manual_seed(0)
    model = CustomLLM(CustomLLMConfig.from_llm_config(dataclasses.replace(TINY, max_position_embeddings=n)))
    tok = data_lib.load_tokenizer()
    with torch.no_grad():
        model.lm_head.bias[tok.eos_token_id] = -1e4  # never ends early: runs to the table's end
    ids = tok("The cat", add_special_tokens=False)["input_ids"]
    given = len(ids)
    assert 1 < given < n
    model.eval()
    with torch.no_grad():
        while len(ids) < n:
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    # settings that would change the greedy continuation: its first token suppressed
    own = GenerationConfig(suppress_tokens=[ids[given]], do_sample=True, temperature=5.0, top_k=3, max_new_tokens=2)
    model.generation_config = own
    model.train()
    assert generate_samples(model, tok, ["The cat"], 100, temperature=0) == \
        [("The cat", tok.decode(ids, skip_special_tokens=True))]
    assert model.generation_config is own and model.training
    with pytest.raises(ValueError, match=rf"no room left in max_position_embeddings \({n}\)"):
        generate_samples(model, tok, ["The cat " * n], 4)
    assert model.generation_config is own and model.training


def test_a_finished_run_trains_no_further(trained, tmp_path):
    rc, summary = trained
    shutil.copytree(rc.ckpt_dir, tmp_path / "run")
    again = run(dataclasses.replace(rc, ckpt_dir=str(tmp_path / "run")), dtype="float32")
    assert again["start_step"] == again["end_step"] == 10 and not again["records"]
    assert not (tmp_path / "run" / "checkpoint-11").exists()
    assert [p for p, _ in again["samples"]] == list(rc.prompts)


def test_init_from_a_hugging_face_directory_starts_from_its_weights(trained, tmp_path, capsys):
    rc, _ = trained
    source = os.path.join(rc.ckpt_dir, "checkpoint-10")
    start = dataclasses.replace(rc, ckpt_dir=str(tmp_path / "run"), init_from=source, steps=1, save_every=1,
                                max_new_tokens=0)
    out = run(start, dtype="float32")
    assert out["start_step"] == 0 and out["end_step"] == 1
    assert os.path.samefile(out["tokenizer"].name_or_path, source)  # no --tokenizer: the directory's own
    a = load_file(os.path.join(source, "model.safetensors"))
    b = load_file(str(tmp_path / "run" / "checkpoint-1" / "model.safetensors"))
    for k in a:  # step 1 has learning rate 0 (warm-up): only the router biases moved
        if not k.endswith("router_bias"):
            np.testing.assert_array_equal(b[k], a[k], err_msg=k)
    capsys.readouterr()  # the same command again resumes, and says that the starting weights are not used
    assert run(dataclasses.replace(start, steps=2), dtype="float32")["start_step"] == 1
    assert f"; --init-from {source} only starts a new run: not used" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"another model .*; without --preset, --config or a recipe naming a model, "
                                         r"--init-from trains"):
        run(dataclasses.replace(rc, ckpt_dir=str(tmp_path / "other"), init_from=source, preset="tiny", config=None))
    # neither given (`preset` None, as the command line leaves it): the directory's own model
    copy = shutil.copytree(source, tmp_path / "copy")
    its = dataclasses.replace(start, ckpt_dir=str(tmp_path / "its"), init_from=str(copy), preset=None, config=None)
    out = run(its, dtype="float32")
    assert out["end_step"] == 1 and out["model"].config.vocab_size == TINY.vocab_size
    assert f"parameters (the model of {copy})" in capsys.readouterr().out
    shutil.rmtree(copy)  # the same command resumes from the run's own checkpoint, the starting one gone
    assert run(dataclasses.replace(its, steps=2), dtype="float32")["end_step"] == 2
    assert f"parameters (the model of {its.ckpt_dir})" in capsys.readouterr().out  # was named as {copy}'s


def test_init_from_a_hugging_face_directory_without_a_tokenizer_notes_the_embedded_one(tmp_path, capsys):
    """A Hugging Face directory without tokenizer files (model weights only), of a vocabulary the
    embedded tokenizer fits: the run takes the embedded one, and one note says so (it was silent).
    The note comes once the start-up checks have passed: bad input ends in its one line.
    Resumed, or started from a checkpoint of the run (which holds its tokenizer), it says nothing."""
    tiny = LLMConfig.from_preset("tiny")
    CustomLLM(CustomLLMConfig.from_llm_config(tiny)).save_pretrained(tmp_path / "hf")
    capsys.readouterr()  # (its progress bar)
    args = ["--seq-len", "16", "--batch-size", "2", "--max-new-tokens", "0", "--no-progress"]
    run_dir = tmp_path / "run"
    code = _train_torch().main(args + ["--steps", "1", "--ckpt-dir", str(run_dir), "--init-from", str(tmp_path / "hf"),
                                       "--dataset", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and "missing" in err and "note:" not in err, err
    assert not run_dir.exists()
    code = _train_torch().main(args + ["--steps", "1", "--ckpt-dir", str(run_dir), "--init-from", str(tmp_path / "hf")])
    err = capsys.readouterr().err
    note = (f"note: {tmp_path / 'hf'} holds no tokenizer; using the embedded tokenizer (512 tokens; pass --tokenizer "
            "to choose another)")
    assert code == 0 and err.splitlines().count(note) == 1 and err.count("note:") == 1, err
    for more in (["--steps", "2", "--ckpt-dir", str(run_dir), "--init-from", str(tmp_path / "hf")],
                 ["--steps", "1", "--ckpt-dir", str(tmp_path / "other"), "--init-from", str(run_dir / "checkpoint-1")]):
        code = _train_torch().main(args + more)
        err = capsys.readouterr().err
        assert code == 0 and "note:" not in err, (more, err)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_resume_without_model_flags_trains_the_model_it_holds(trained, tmp_path, capsys):
    """`train_torch.py` run again without --config/--preset resumes the model of its checkpoint (it
    was refused as another model than the default preset's); a new directory gets the default."""
    rc, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(rc.ckpt_dir, copy)
    train_torch = _train_torch()
    assert train_torch.parse_args(["--ckpt-dir", str(tmp_path / "new")])[1].preset == "small"
    parsed = train_torch.parse_args(["--ckpt-dir", str(copy)])[1]
    assert parsed.preset is None and parsed.config is None
    capsys.readouterr()
    out = run(dataclasses.replace(rc, ckpt_dir=str(copy), config=None, preset=None, steps=11), dtype="float32")
    assert out["start_step"] == 10 and out["end_step"] == 11 and out["model"].config.to_llm_config() == TINY
    # the settings it changes are named (not the model flags: the model is the checkpoint's)
    log = capsys.readouterr().out
    assert "note: resumed with other settings than the checkpoint's: --steps 11 (was 10)\n" in log, log


def test_a_resume_asking_for_another_model_names_the_flag_and_is_refused_changing_nothing(trained, tmp_path):
    """It said "holds another model (differs in ...)" and nothing of which flag asked for which model."""
    rc, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(rc.ckpt_dir, copy)
    before = tree_listing(copy)
    with pytest.raises(ValueError) as refused:
        run(dataclasses.replace(rc, ckpt_dir=str(copy), config=None, preset="small", steps=11), dtype="float32")
    said = str(refused.value)
    assert said.startswith(f"--ckpt-dir {copy} (checkpoint-10) holds a checkpoint of another model than --preset small "
                           "(differs in "), said
    assert said.endswith("resume without --preset, --config or a recipe naming a model to train the model it holds, "
                         "or use another --ckpt-dir"), said
    assert "it holds the" not in said  # (TINY here is no preset: its vocabulary is the embedded tokenizer's)
    assert tree_listing(copy) == before


def test_a_resume_compares_the_precision_trained_in_not_the_dtype_flag(trained, tmp_path, capsys):
    """Checkpoints record the precision `--dtype auto` chose, and a resume compares that: on a CPU
    `auto` after float32 changes nothing (it was named a change, and a run moved from a GPU's
    bfloat16 to a CPU's float32 under `auto` changed unnoticed). A checkpoint that recorded `auto`
    (saved before) names no change of --dtype."""
    rc, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(rc.ckpt_dir, copy)
    capsys.readouterr()
    run(dataclasses.replace(rc, ckpt_dir=str(copy), steps=11, dtype="auto"), dtype="auto")
    log = capsys.readouterr().out
    assert "note: resumed with other settings than the checkpoint's: --steps 11 (was 10)\n" in log, log
    state_file = copy / "checkpoint-11" / "data_state.rank0.json"
    state = json.loads(state_file.read_text())
    assert state["settings"]["dtype"] == "float32"
    state["settings"]["dtype"] = "auto"
    state_file.write_text(json.dumps(state))
    run(dataclasses.replace(rc, ckpt_dir=str(copy), steps=12), dtype="float32")
    log = capsys.readouterr().out
    assert "note: resumed with other settings than the checkpoint's: --steps 12 (was 11)\n" in log, log


def test_init_from_refuses_what_the_converter_refuses(trained, tmp_path, capsys):
    """--init-from reads the directory's tensors as convert/torch_to_flax.py does (a missing one
    would start from random values); a JAX checkpoint or a Trainer output directory is named as
    such, with what to pass instead. One line, exit status 2, nothing written."""
    from safetensors.numpy import save_file

    rc, _ = trained
    source = os.path.join(rc.ckpt_dir, "checkpoint-10")
    truncated, missing, orbax = (shutil.copytree(source, tmp_path / "truncated"),
                                 shutil.copytree(source, tmp_path / "missing"), tmp_path / "orbax")
    _truncate(truncated / "model.safetensors")
    sd = load_file(str(missing / "model.safetensors"))
    del sd["lm_head.bias"]
    save_file(sd, str(missing / "model.safetensors"), metadata={"format": "pt"})
    (orbax / "0").mkdir(parents=True)
    for init_from, message in [
        (truncated, f"{truncated / 'model.safetensors'}: not a readable safetensors file"),
        (missing, "missing tensor lm_head.bias"),
        (orbax, f"is a JAX (Orbax) checkpoint, not a Hugging Face directory; convert it first "
                f"(python convert/flax_to_torch.py {orbax} --out HF_DIR)"),
        (rc.ckpt_dir, f"is a Trainer output directory (checkpoint-N folders, no config.json), not a Hugging Face "
                      f"model directory; pass one of its checkpoints, the latest: {source}"),
    ]:
        code = _train_torch().main(["--config", rc.config, "--seq-len", "32", "--ckpt-dir", str(tmp_path / "x"),
                                    "--init-from", str(init_from)])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("train_torch.py: error: --init-from") and err.count("\n") == 1, err
        assert message in err, err
    # Without --preset or --config, the model is read from --init-from first (it said "[Errno 2] ...").
    code = _train_torch().main(["--seq-len", "32", "--ckpt-dir", str(tmp_path / "x"), "--init-from", str(tmp_path / "gone")])
    err = capsys.readouterr().err
    assert (code, err) == (2, f"train_torch.py: error: --init-from: Hugging Face directory {tmp_path / 'gone'} does "
                              "not exist\n")
    # ... where a JAX checkpoint, or one of its steps, said "has no config.json (not a Hugging Face model directory)"
    for init_from, what in ((orbax, "a JAX (Orbax) checkpoint"), (orbax / "0", f"step 0 of the JAX (Orbax) checkpoint {orbax}")):
        code = _train_torch().main(["--seq-len", "32", "--ckpt-dir", str(tmp_path / "x"), "--init-from", str(init_from)])
        err = capsys.readouterr().err
        assert (code, err) == (2, f"train_torch.py: error: --init-from {init_from} is {what}, not a Hugging Face "
                                  f"directory; convert it first (python convert/flax_to_torch.py {orbax} --out HF_DIR) "
                                  "and pass --init-from HF_DIR\n"), err
    assert not (tmp_path / "x").exists()


def test_a_directory_another_run_is_training_in_is_refused_and_left_alone(trained, tmp_path, capsys, monkeypatch):
    """The same command started twice: the second run stops (exit 2, one line) before it reads,
    sets aside, truncates or saves anything in the first one's output directory, also when that
    directory appears only while the second run starts. A run's lock ends with it."""
    from jaxllm import stopping
    from torch_ref import training

    out = tmp_path / "run"
    shutil.copytree(trained[0].ckpt_dir, out)
    before = tree_listing(out)
    args = ["--preset", "tiny", "--seq-len", "16", "--steps", "12", "--max-new-tokens", "0", "--no-progress"]
    other = stopping.hold(str(out))  # (another open file description: as another process's)
    try:
        code = _train_torch().main(args + ["--ckpt-dir", str(out)])
    finally:
        os.close(other)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "is in use by another training run" in err, err
    assert tree_listing(out) == before

    fresh, held = tmp_path / "fresh", []
    real_check_prompts = training.check_prompts

    def another_run_starts_meanwhile(*a):
        fresh.mkdir()
        held.append(stopping.hold(str(fresh)))
        return real_check_prompts(*a)

    monkeypatch.setattr(training, "check_prompts", another_run_starts_meanwhile)
    try:
        code = _train_torch().main(args + ["--ckpt-dir", str(fresh)])
    finally:
        os.close(held[0])
    err = capsys.readouterr().err
    assert code == 2 and "is in use by another training run" in err and os.listdir(fresh) == [], err

    def another_run_saved_meanwhile(*a):  # ... and ended: this run takes the lock, then looks again
        shutil.copytree(out, fresh, dirs_exist_ok=True)
        return real_check_prompts(*a)

    fresh.rmdir()
    monkeypatch.setattr(training, "check_prompts", another_run_saved_meanwhile)
    code = _train_torch().main(args + ["--ckpt-dir", str(fresh)])
    err = capsys.readouterr().err
    assert code == 2 and "another run saved checkpoints there" in err, err
    os.close(stopping.hold(str(fresh)))  # released by the run that took it (InUse otherwise)


def test_a_jax_run_that_saved_in_a_new_directory_while_this_run_started_is_left_alone(tmp_path, capsys,
                                                                                        monkeypatch):
    """train_jax.py and train_torch.py started together on a new --ckpt-dir, the JAX run saving and
    ending before the PyTorch run took the directory's lock: the PyTorch run looked again for its
    own kind of checkpoint only, truncated the JAX run's metrics.jsonl to nothing and trained beside
    its steps. Now one line and exit status 2, as for a JAX run found at the start."""
    from torch_ref import training

    fresh = tmp_path / "fresh"
    real_check_prompts = training.check_prompts
    metrics = "".join(json.dumps({"step": s, "loss": 6.0, "lr": 1e-3}) + "\n" for s in (1, 2))

    def a_jax_run_saved_meanwhile(*a):
        (fresh / "2" / "params").mkdir(parents=True)
        (fresh / "metrics.jsonl").write_text(metrics)
        return real_check_prompts(*a)

    monkeypatch.setattr(training, "check_prompts", a_jax_run_saved_meanwhile)
    code = _train_torch().main(["--preset", "tiny", "--seq-len", "16", "--steps", "2", "--max-new-tokens", "0",
                                "--no-progress", "--ckpt-dir", str(fresh)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "holds a JAX (Orbax) checkpoint" in err, err
    assert sorted(os.listdir(fresh)) == ["2", "metrics.jsonl"] and (fresh / "metrics.jsonl").read_text() == metrics


def test_a_checkpoint_inside_a_run_or_a_model_directory_is_refused_as_the_output_directory(trained, tmp_path,
                                                                                           capsys):
    """--ckpt-dir pointing at the checkpoint to resume from (or at a JAX step, or at a model
    directory) started a new run from random weights inside it, exit status 0: now one line, exit
    status 2 and the way out."""
    out = os.path.abspath(trained[0].ckpt_dir)
    jax_step, model_dir = tmp_path / "jax-run" / "8", tmp_path / "model-hf"
    for d in ("params", "meta"):
        (jax_step / d).mkdir(parents=True)
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    (model_dir / "model.safetensors").write_bytes(b"")
    args = ["--preset", "tiny", "--seq-len", "16", "--steps", "12", "--max-new-tokens", "0", "--no-progress"]
    for path, needle in ((os.path.join(out, "checkpoint-8"), f"to resume that run, pass the directory above it ({out})"),
                         (jax_step, f"convert/flax_to_torch.py {jax_step.parent} makes a Hugging Face directory"),
                         (model_dir, f"--init-from {model_dir} starts from its weights")):
        before = sorted(os.listdir(path))
        code = _train_torch().main(args + ["--ckpt-dir", str(path)])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and needle in err, err
        assert sorted(os.listdir(path)) == before


def test_a_directory_of_a_finished_run_without_a_checkpoint_is_refused_and_kept(tmp_path, capsys):
    """A finished run's loss curve, or checkpoints set aside as unloadable, with no checkpoint left
    to resume: one line, exit status 2, its metrics.jsonl and loss.png as they were (a new run would
    have truncated and replaced them). A run stopped before its first checkpoint starts again."""
    for leftover in ("loss.png", "unloadable-checkpoint-8-20250101-000000"):
        ckpt = tmp_path / leftover
        ckpt.mkdir()
        (ckpt / "metrics.jsonl").write_text(json.dumps({"step": 4, "loss": 5.0}) + "\n")
        if leftover == "loss.png":
            (ckpt / leftover).write_bytes(b"png")
        else:
            (ckpt / leftover).mkdir()
        before = sorted(os.listdir(ckpt))
        code = _train_torch().main(["--preset", "tiny", "--seq-len", "16", "--steps", "1", "--ckpt-dir", str(ckpt)])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "holds an earlier run" in err and leftover in err, err
        assert sorted(os.listdir(ckpt)) == before
        assert (ckpt / "metrics.jsonl").read_text() == json.dumps({"step": 4, "loss": 5.0}) + "\n"
    from torch_ref.training import check_no_earlier_run

    (tmp_path / "stopped").mkdir()
    (tmp_path / "stopped" / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 5.0}) + "\n")
    check_no_earlier_run(str(tmp_path / "stopped"))


def test_a_resumed_run_keeps_its_tokenizer_without_the_flag(tmp_path):
    """Resumed without --tokenizer (or where the directory it names is gone), a run continues with
    the tokenizer its checkpoint holds, not the embedded one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "the": 1, "a": 2, "[UNK]": 3}
    words = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, eos_token="<|endoftext|>").save_pretrained(tmp_path / "tok")
    rc = _rc(tmp_path, steps=1, save_every=1, grad_accum=1, max_new_tokens=0, tokenizer=str(tmp_path / "tok"))
    run(rc, dtype="float32")
    shutil.rmtree(tmp_path / "tok")
    out = run(dataclasses.replace(rc, steps=2, tokenizer=None), dtype="float32")
    assert out["start_step"] == 1 and out["end_step"] == 2 and out["tokenizer"].get_vocab() == vocab


def test_saved_directory_converts_to_flax_with_the_same_logits(trained, tmp_path):
    from convert import import_hf

    import jaxllm
    from jaxllm.weights import get_weights

    rc, _ = trained
    ckpt = os.path.join(rc.ckpt_dir, "checkpoint-10")
    import_hf(ckpt, tmp_path / "flax")
    jm, config = jaxllm.load(tmp_path / "flax")
    assert config == TINY
    tm = CustomLLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ids = np.random.RandomState(0).randint(0, TINY.vocab_size, (2, 24))
    with torch.no_grad():
        want = tm(torch.from_numpy(ids)).logits.numpy()
    assert rel_err(np.asarray(jm(ids)), want) < 1e-5
    rb = get_weights(jm)[("decoder_layers", "mlp", "router_bias")]
    np.testing.assert_array_equal(rb[0], tm.decoder_layers[0].mlp.moe.router_bias.numpy())


def _train_torch():
    """scripts/train_torch.py as a module."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
    try:
        import train_torch
    finally:
        sys.path.pop(0)
    return train_torch


def test_command_line_errors_are_one_line(tmp_path, capsys):
    train_torch = _train_torch()
    assert train_torch.main(["--steps", "0", "--ckpt-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train_torch.py: error: --steps must be positive") and err.count("\n") == 1
    (tmp_path / "file").write_text("")
    assert train_torch.main(["--ckpt-dir", str(tmp_path / "file")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert train_torch.main(["--seq-len", "1", "--ckpt-dir", str(tmp_path / "x")]) == 2
    assert "--seq-len must be at least 2" in capsys.readouterr().err
    assert train_torch.main(["--lr", "1e38", "--ckpt-dir", str(tmp_path / "x")]) == 2  # (Adam's overflow: a traceback)
    assert "--lr 1e+38 is too large" in capsys.readouterr().err
    # (argparse took "-1e-3" for a flag: "argument --lr: expected one argument")
    assert train_torch.main(["--lr", "-1e-3", "--ckpt-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err == "train_torch.py: error: --lr must be positive, got -0.001\n", err
    assert train_torch.main(["--shuffle-buffer", "64", "--ckpt-dir", str(tmp_path / "x")]) == 2
    assert "--shuffle-buffer 64: the embedded corpus is shuffled whole every epoch" in capsys.readouterr().err
    # The data is read before anything is written (a model, a progress bar, the output directory).
    (tmp_path / "blank.txt").write_text("\n\n \n")
    for dataset, needle in (("blank.txt", "has no text"), ("missing.parquet", "no such file")):
        assert train_torch.main(["--dataset", str(tmp_path / dataset), "--ckpt-dir", str(tmp_path / "x")]) == 2
        out, err = capsys.readouterr()
        assert needle in err and err.count("\n") == 1 and "model:" not in out, (out, err)
    assert train_torch.main(["--preset", "tiny", "--prompt", "x " * 200, "--ckpt-dir", str(tmp_path / "x")]) == 2
    assert "no room for new tokens" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    args, rc = train_torch.parse_args(["--recipe", "seed", "--steps", "7"])
    assert rc.preset == "seed-973m" and rc.grad_accum == 8 and rc.steps == 7 and rc.lr == 2e-5
    assert train_torch.parse_args([])[1].ckpt_dir == "ckpt-torch"


def _main_keeping_the_summary(monkeypatch, argv) -> tuple[int, dict]:
    """train_torch.py's `main(argv)` in this process, and the summary of its `run`."""
    from torch_ref import training

    train_torch, kept = _train_torch(), {}

    def run_and_keep(*args, **kwargs):
        kept.update(run(*args, **kwargs))  # (this file's `run`: torch_ref.training's own)
        return kept

    monkeypatch.setattr(training, "run", run_and_keep)
    return train_torch.main(argv), kept


def _tiny_command(tmp_path, *flags) -> list[str]:
    cfg = tmp_path / "tiny.json"
    cfg.write_text(TINY.to_json_string())
    return ["--config", str(cfg), "--seq-len", "16", "--batch-size", "2", "--steps", "3", "--save-every", "100",
            "--prompt", "The", "--max-new-tokens", "4", "--no-progress", *flags]


def test_no_dropout_turns_the_training_model_s_dropout_off_and_keeps_the_saved_config(tmp_path, monkeypatch):
    """--no-dropout reaches the run: the model trained has no embedding dropout (a runtime switch),
    its saved config.json keeps the model's `embedding_dropout`; without the flag it is on."""
    for flags, p in (((), TINY.embedding_dropout), (("--no-dropout",), 0.0)):
        out_dir = tmp_path / f"run{len(flags)}"
        status, summary = _main_keeping_the_summary(
            monkeypatch, _tiny_command(tmp_path, "--steps", "1", "--ckpt-dir", str(out_dir), *flags))
        assert status == 0 and summary["end_step"] == 1
        assert summary["model"].dropout.p == p and summary["model"].training
        with open(out_dir / "checkpoint-1" / "config.json") as f:
            assert json.load(f)["embedding_dropout"] == TINY.embedding_dropout


def test_a_signal_stops_with_128_plus_its_number_unless_it_comes_in_the_last_step(tmp_path, monkeypatch, capsys):
    """A Ctrl-C (SIGINT) or SIGTERM in step 2 of 3 saves step 2 and exits with 130 / 143, without the
    end's samples; one in the last step changes nothing: the run finishes (its samples, exit 0)."""
    import signal

    from torch_ref import training

    before, before_term = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    for signum, at, status, end in ((signal.SIGINT, 2, 130, 2), (signal.SIGTERM, 2, 143, 2), (signal.SIGINT, 3, 0, 3)):
        class SignalInStep(training.MPSCallback):  # (on_step_end: before the stop callback's own)
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == at:
                    os.kill(os.getpid(), signum)

        monkeypatch.setattr(training, "MPSCallback", SignalInStep)
        out_dir = tmp_path / f"run-{signum.name}-{at}"
        got, summary = _main_keeping_the_summary(monkeypatch, _tiny_command(tmp_path, "--ckpt-dir", str(out_dir)))
        out = capsys.readouterr().out
        assert (got, summary["end_step"]) == (status, end), out[-2000:]
        assert [n for n in os.listdir(out_dir) if n.startswith("checkpoint-")] == [f"checkpoint-{end}"]
        assert (out_dir / f"checkpoint-{end}" / "trainer_state.json").is_file()
        assert signal.getsignal(signal.SIGINT) is before and signal.getsignal(signal.SIGTERM) is before_term
        if status:
            assert summary["stopped_by"] == signum.name and not summary["samples"] and "generated text:" not in out
            assert f"{signum.name}: saved a checkpoint at step {end} in {out_dir}; run the same command" in out
        else:
            assert summary["stopped_by"] is None and [p for p, _ in summary["samples"]] == ["The"]
            assert "generated text:" in out and "saved a checkpoint" not in out


def test_metrics_record_the_logging_steps_own_loss(tmp_path):
    """As on the JAX side, a record of metrics.jsonl holds its step's loss and parts, whatever
    --log-every (the Trainer's console loss is a mean since the last log)."""
    kw = dict(steps=6, save_every=6, keep=1, max_new_tokens=0, dropout=False)
    records = {}
    for every in (1, 3):
        (tmp_path / str(every)).mkdir()
        rc = _rc(tmp_path / str(every), log_every=every, **kw)
        run(rc, dtype="float32")
        with open(os.path.join(rc.ckpt_dir, "metrics.jsonl")) as f:
            records[every] = {r["step"]: r for r in map(json.loads, f)}
    assert sorted(records[3]) == [1, 3, 6]
    keys = ("loss", "lm_loss", "aux_loss")
    for step in (3, 6):
        sparse, each = records[3][step], records[1][step]
        print(step, {k: (sparse[k], each[k]) for k in keys})
        assert [sparse[k] for k in keys] == [each[k] for k in keys]


def test_the_data_position_is_saved_before_the_trainer_state(tmp_path, monkeypatch):
    """The Trainer's save writes trainer_state.json (a resumable checkpoint) and rotates old ones:
    the data position must already be there, or a crash in between loses it."""
    from transformers import Trainer

    seen = []
    save = Trainer._save_checkpoint

    def checked_save(self, model, trial):
        ckpt = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}")
        seen.append((self.state.global_step, os.path.isfile(os.path.join(ckpt, "data_state.rank0.json"))))
        save(self, model, trial)

    monkeypatch.setattr(Trainer, "_save_checkpoint", checked_save)
    run(_rc(tmp_path, steps=2, save_every=1, grad_accum=1, max_new_tokens=0), dtype="float32")
    assert seen == [(1, True), (2, True)]


def test_a_data_position_of_another_process_count_is_dropped_with_one_warning(tmp_path, capsys):
    """A checkpoint written by one process, resumed by two: each process starts its data stream
    from the beginning, and the run's first process alone says so (not one line per process)."""
    from torch_ref.training import read_data_state

    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    for i in (0, 1):
        (ckpt / f"data_state.rank{i}.json").write_text(json.dumps({"process_count": 1, "state": {}}))
    assert [read_data_state(str(ckpt), i, 2) for i in (0, 1)] == [None, None]
    assert capsys.readouterr().err == (f"warning: {ckpt} was written by 1 process(es), this run has 2; "
                                       "the data stream starts from its beginning\n")


def test_a_damaged_data_position_restarts_the_stream_with_a_warning_naming_it(tmp_path, capsys):
    """A data position that cannot be read (truncated, overwritten) is treated as a missing one: a
    warning naming the file, and the stream starts from its beginning. It ended the run with the bare
    JSON error ("train_torch.py: error: Unterminated string starting at: line 1 column 45"), naming no
    file, or with a traceback for JSON holding no position."""
    from torch_ref.training import read_data_state

    ckpt = tmp_path / "checkpoint-3"
    ckpt.mkdir()
    path = ckpt / "data_state.rank0.json"
    whole = json.dumps({"process_count": 1, "state": {"epoch": 0, "documents": 2, "offset": 40}})
    for damaged, why in ((whole[:50], "Unterminated string"), ("[1, 2]", "no data position in it"),
                         ('{"process_count": 1, "state": null}', "no data position in it")):
        path.write_text(damaged)
        assert read_data_state(str(ckpt), 0, 1) is None
        err = capsys.readouterr().err
        assert err.startswith(f"warning: {path} cannot be read (") and why in err, err
        assert err.endswith("); the data stream starts from its beginning\n") and err.count("\n") == 1, err
    path.write_text(whole)
    assert read_data_state(str(ckpt), 0, 1) == {"epoch": 0, "documents": 2, "offset": 40}


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    """config.json and model.safetensors of a tiny model, for checkpoints made by hand."""
    path = tmp_path_factory.mktemp("weights")
    CustomLLM(CustomLLMConfig.from_llm_config(TINY)).save_pretrained(path)
    return path


def test_resume_skips_a_checkpoint_whose_save_was_interrupted(weights_dir, tmp_path, capsys):
    from torch_ref.training import latest_checkpoint

    def checkpoint(step, *names):
        path = tmp_path / f"checkpoint-{step}"
        if not path.exists():
            shutil.copytree(weights_dir, path)
            for state in ("optimizer.pt", "scheduler.pt"):  # (a checkpoint lacking them cannot be resumed)
                torch.save({}, path / state)
        for name in names:
            (path / name).write_text(json.dumps({"process_count": 2, "state": None}))

    checkpoint(2, "trainer_state.json", "data_state.rank0.json", "data_state.rank1.json")
    checkpoint(4, "trainer_state.json", "data_state.rank0.json")  # process 1 had not written its position
    checkpoint(6, "data_state.rank0.json", "data_state.rank1.json")  # no trainer state yet
    assert latest_checkpoint(str(tmp_path)) == (str(tmp_path / "checkpoint-2"), 2)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "checkpoint-6 lacks trainer_state.json" in err[0], err
    assert "checkpoint-4 lacks data_state.rank1.json" in err[1], err
    (tmp_path / "checkpoint-4" / "data_state.rank0.json").write_text('{"process_count": 2, "sta')  # cut short
    assert latest_checkpoint(str(tmp_path)) == (str(tmp_path / "checkpoint-2"), 2)
    err = capsys.readouterr().err.splitlines()
    assert "checkpoint-4 has an unreadable data_state.rank0.json (an interrupted save)" in err[1], err
    checkpoint(4, "data_state.rank0.json", "data_state.rank1.json")
    assert latest_checkpoint(str(tmp_path)) == (str(tmp_path / "checkpoint-4"), 4)
    # None complete: the newest with a trainer state still resumes (not a new run over the old one).
    shutil.rmtree(tmp_path / "checkpoint-2")
    (tmp_path / "checkpoint-4" / "data_state.rank0.json").unlink()
    capsys.readouterr()
    assert latest_checkpoint(str(tmp_path), warn=False) == (str(tmp_path / "checkpoint-4"), 4)
    assert capsys.readouterr().err == ""


def test_resume_skips_a_checkpoint_that_cannot_be_loaded_and_keeps_it(trained, tmp_path, capsys):
    """A damaged checkpoint (here a truncated model.safetensors) is skipped with a warning, as the
    JAX trainer skips one: the run resumes exactly from the one before. The damaged one is kept,
    renamed out of the Trainer's way (it would save into it, and its rotation deletes old ones)."""
    rc, summary = trained
    copy = tmp_path / "run"
    shutil.copytree(rc.ckpt_dir, copy)
    damaged = copy / "checkpoint-10" / "model.safetensors"
    _truncate(damaged)
    data = damaged.read_bytes()
    # Refused for bad input: its one line only (the damaged checkpoint is said once the checks pass)
    # and nothing moved
    before = tree_listing(copy)
    code = _train_torch().main(["--config", rc.config, "--seq-len", "32", "--ckpt-dir", str(copy),
                                "--tokenizer", str(tmp_path / "gone.json")])
    assert (code, capsys.readouterr().err) == (
        2, f"train_torch.py: error: tokenizer {tmp_path / 'gone.json'}: no such file or directory\n")
    assert tree_listing(copy) == before
    resumed = run(dataclasses.replace(rc, ckpt_dir=str(copy), max_new_tokens=0), dtype="float32")
    err = capsys.readouterr().err
    assert f"warning: {copy / 'checkpoint-10'} cannot be loaded: {damaged}: not a readable safetensors file" in err, err
    assert resumed["start_step"] == 8 and resumed["end_step"] == 10
    np.testing.assert_allclose([r["loss"] for r in resumed["records"]], [r["loss"] for r in summary["records"][8:]],
                               rtol=1e-6)
    kept = [n for n in os.listdir(copy) if n.startswith("unloadable-checkpoint-10-")]
    assert len(kept) == 1 and (copy / kept[0] / "model.safetensors").read_bytes() == data
    assert os.path.isfile(copy / "checkpoint-10" / "trainer_state.json")


def test_resume_skips_damaged_optimizer_state_and_refuses_when_nothing_loads(trained, tmp_path, capsys):
    """A truncated optimizer.pt, a cut trainer_state.json, truncated weights: each checkpoint is
    skipped; when none is left, a one-line error (exit status 2) and every file stays as it was."""
    from torch_ref.training import latest_checkpoint

    rc, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(rc.ckpt_dir, copy)
    _truncate(copy / "checkpoint-10" / "optimizer.pt")
    assert latest_checkpoint(str(copy)) == (str(copy / "checkpoint-8"), 8)
    err = capsys.readouterr().err
    assert f"checkpoint-10 cannot be loaded: {copy / 'checkpoint-10' / 'optimizer.pt'}: not a readable PyTorch " \
           "file" in err, err
    (copy / "checkpoint-8" / "trainer_state.json").write_text("{")
    _truncate(copy / "checkpoint-4" / "model.safetensors")
    files = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    code = _train_torch().main(["--config", rc.config, "--seq-len", "32", "--ckpt-dir", str(copy)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"train_torch.py: error: no checkpoint of {copy} can be resumed: {copy / 'checkpoint-10'} "
                          "cannot be loaded (") and "nothing was deleted" in err, err
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == files


@pytest.mark.parametrize("lost", ["optimizer.pt", "scheduler.pt", "config.json"])
def test_resume_skips_a_checkpoint_that_lost_a_file_and_keeps_it(lost, trained, tmp_path, capsys):
    """A checkpoint whose optimizer.pt or scheduler.pt is gone was resumed from: the Trainer loads
    neither then, silently, and trained on with a new optimizer state and the schedule from its
    start (a learning rate of 0 after step 10 of a 1-step warm-up). It is skipped with a warning,
    as a damaged one is, and set aside; a missing config.json is named as missing, not as JSON
    that cannot be read."""
    from torch_ref.training import latest_checkpoint, set_aside_damaged

    rc, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(rc.ckpt_dir, copy)
    os.remove(copy / "checkpoint-10" / lost)
    assert latest_checkpoint(str(copy)) == (str(copy / "checkpoint-8"), 8)
    err = capsys.readouterr().err
    assert err == f"warning: {copy / 'checkpoint-10'} cannot be loaded: {copy / 'checkpoint-10' / lost} is missing; " \
                  "not resuming from it\n", err
    kept = set_aside_damaged(str(copy), 8)
    assert len(kept) == 1 and os.path.basename(kept[0]).startswith("unloadable-checkpoint-10-")
    assert os.path.isfile(os.path.join(kept[0], "trainer_state.json"))


def test_a_checkpoint_of_another_version_is_refused_not_skipped(trained, tmp_path, capsys):
    """A config.json with a field this version does not know is no damage: resume refuses it by
    name instead of skipping to an older checkpoint (which would throw the newer steps away)."""
    rc, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(rc.ckpt_dir, copy)
    config = json.loads((copy / "checkpoint-10" / "config.json").read_text())
    (copy / "checkpoint-10" / "config.json").write_text(json.dumps({**config, "a_field_of_a_newer_version": 1}))
    names = sorted(os.listdir(copy))
    code = _train_torch().main(["--config", rc.config, "--seq-len", "32", "--ckpt-dir", str(copy)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"{copy / 'checkpoint-10'}: cannot read its config.json (unknown config field(s): " \
           "a_field_of_a_newer_version)" in err, err
    assert sorted(os.listdir(copy)) == names


def test_a_stream_logs_no_epoch(tmp_path):
    """The Trainer's `epoch` counts passes over a dataset of known length: on a stream it means
    nothing and is left out of the logs; a dataset with a length keeps it."""
    rows = np.random.RandomState(0).randint(0, TINY.vocab_size, (1, 2, 8))
    batch = {"input_ids": torch.from_numpy(rows[0]), "labels": torch.from_numpy(rows[0])}
    for dataset, epoch in ((FixedBatches(rows, 2), False), ([batch, batch], True)):
        tr = _trainer(tmp_path, steps=2, warmup_steps=0, log_every=1)
        tr.train_dataset = dataset
        tr.train()
        assert sum("loss" in h for h in tr.state.log_history) == 2
        assert all(("epoch" in h) == epoch for h in tr.state.log_history), tr.state.log_history


# ---- the cross-framework check ----------------------------------------------------------------
@pytest.mark.slow
def test_jax_and_torch_trainers_agree_for_20_steps_with_accumulation():
    from torch_ref.crosscheck import cross_check, embedded_batches

    batches, _ = embedded_batches(20, 8, 32)
    result = cross_check(TINY, batches, grad_accum=2, lr=2e-3, warmup_steps=5)
    print(result.table())
    assert result.max_loss_gap <= 1e-5, result.table()
    assert result.max_weight_gap[1] <= 5e-5, result.table()
    assert result.router_bias_max_abs_diff == 0.0
    assert result.jax_losses[-1] < result.jax_losses[0] - 0.3  # it trained


@pytest.mark.slow
def test_two_processes_train_exactly_like_one(tmp_path):
    """torchrun with 2 CPU processes (gloo): the loss normalised over both processes, the DDP
    gradient average, the all-reduced expert counts and unused experts give the one-process run.
    No token ever chooses the last routed expert (`unused-expert`), and DDP (which does not search
    for unused parameters) still reduces every gradient; the other six route and update their
    biases as usual. (One run covers both: a plain variant doubled the test's 25-30 s.)"""
    variant = "unused-expert"
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    batches = np.random.RandomState(0).randint(0, 512, (3, 8, 16))
    np.save(tmp_path / "batches.npy", batches)
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    for n in (1, 2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
               os.path.join(root, "tests", "ddp_worker.py"), str(tmp_path / "batches.npy"),
               str(tmp_path / f"out{n}.npz"), str(tmp_path / f"run{n}"), variant]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "find_unused_parameters" not in proc.stderr  # DDP's warning about a needless search
    one, two = np.load(tmp_path / "out1.npz"), np.load(tmp_path / "out2.npz")
    print("1 process  :", one["losses"])
    print("2 processes:", two["losses"])
    assert len(one["losses"]) == 3
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-6)
    for k in one.files:
        if k != "losses":
            assert rel_err(two[k], one[k]) <= 1e-5 if np.any(one[k]) else np.array_equal(two[k], one[k]), k


def test_the_torch_side_trains_without_jax(tmp_path):
    """scripts/train_torch.py in a process where `import jax` fails (and flax, optax, orbax)."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = tmp_path / "tiny.json"
    cfg.write_text(TINY.to_json_string())
    code = ("import sys; sys.modules.update(dict.fromkeys(['jax', 'flax', 'optax', 'orbax'])); "
            "sys.argv = ['train_torch.py'] + sys.argv[1:]; import runpy; "
            f"runpy.run_path({os.path.join(root, 'scripts', 'train_torch.py')!r}, run_name='__main__')")
    cmd = [sys.executable, "-c", code, "--config", str(cfg), "--steps", "2", "--batch-size", "2", "--seq-len", "16",
           "--ckpt-dir", str(tmp_path / "run"), "--max-new-tokens", "4", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done: step 2" in proc.stdout and "generated text:" in proc.stdout
    assert os.path.isfile(tmp_path / "run" / "checkpoint-2" / "model.safetensors")


def _start_long_torch_runs(tmp_path, n: int):
    """`n` train_torch.py processes (a DDP group over gloo when n > 1, as torchrun starts them) of a
    1000-step run into tmp_path / "run", returned once they have logged two steps."""
    import socket
    import subprocess
    import time

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, os.path.join(root, "scripts", "train_torch.py"), "--preset", "tiny", "--seq-len", "16",
           "--batch-size", "2", "--steps", "1000", "--save-every", "1000", "--log-every", "1", "--max-new-tokens", "4",
           "--no-progress", "--ckpt-dir", str(tmp_path / "run")]
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
    group = lambda i: {"RANK": str(i), "LOCAL_RANK": str(i), "WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)} if n > 1 else {}
    procs = [subprocess.Popen(cmd, env={**env, **group(i)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(n)]
    metrics, t0 = tmp_path / "run" / "metrics.jsonl", time.time()
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert all(p.poll() is None for p in procs) and time.time() - t0 < 240, "training ended early"
        time.sleep(0.2)
    return procs


def test_sigterm_saves_a_checkpoint_and_the_same_command_resumes(tmp_path):
    """As in JAX: SIGTERM ends the running step, saves it and exits with 128 + 15, without the end's
    samples; the same command resumes there. (The Trainer alone died and lost the steps since its
    last save.)"""
    (proc,) = _start_long_torch_runs(tmp_path, 1)
    proc.terminate()
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + 15, out[-3000:]
    (step,) = [int(n.split("-")[1]) for n in os.listdir(tmp_path / "run") if n.startswith("checkpoint-")]
    assert f"SIGTERM: saved a checkpoint at step {step} in {tmp_path / 'run'}; run the same command again" in out
    assert f"stopped: step {step}" in out and "generated text:" not in out
    resumed = run(RunConfig(preset="tiny", seq_len=16, batch_size=2, steps=step + 1, save_every=1000, log_every=1,
                            max_new_tokens=0, progress=False, ckpt_dir=str(tmp_path / "run")), dtype="float32")
    assert resumed["start_step"] == step and resumed["end_step"] == step + 1 and resumed["stopped_by"] is None


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
    """The save is collective: the request is all-reduced after each step, so a signal to process 1
    alone stops both after the same step, which they save together."""
    p0, p1 = _start_long_torch_runs(tmp_path, 2)
    p1.terminate()
    outs = [p.communicate(timeout=120)[0] for p in (p0, p1)]
    assert [p.returncode for p in (p0, p1)] == [128 + 15] * 2, [o[-2000:] for o in outs]
    (step,) = [int(n.split("-")[1]) for n in os.listdir(tmp_path / "run") if n.startswith("checkpoint-")]
    assert f"a signal to process 1: saved a checkpoint at step {step}" in outs[0], outs[0][-2000:]
    assert {"data_state.rank0.json", "data_state.rank1.json", "trainer_state.json"} <= \
        set(os.listdir(tmp_path / "run" / f"checkpoint-{step}"))


def test_a_data_error_mid_run_saves_the_steps_taken_and_a_mended_stream_resumes_exactly(tmp_path, monkeypatch):
    """A corrupt record met mid-run (a second jsonl shard, reached in the second micro-batch of step
    23) ends the run with the reader's error after saving the steps since the last checkpoint. Mended
    in place (the same file size: the same stream), the data resumes where it stopped, at the first
    micro-batch of the step that failed: the resumed steps equal those of a run that read the mended
    data without stopping."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "a.jsonl").write_text("".join(json.dumps({"text": f"Doc {i}."}) + "\n" for i in range(1100)))
    good = json.dumps({"text": "The end of the data, now readable."})
    bad = "this line is not JSON".ljust(len(good))
    (shards / "b.jsonl").write_text(bad + "\n")
    # 5-row micro-batches, 2 a step: the first shard fills 45 of them, so the error comes mid-step
    rc = _rc(tmp_path, dataset=str(shards), batch_size=5, grad_accum=2, steps=30, save_every=10, keep=10,
             max_new_tokens=0)
    with pytest.raises(ValueError, match=r"JSON parse error.*\(saved .*checkpoint-(\d+) first\)$") as e:
        run(rc, dtype="float32")
    assert "\n" not in str(e.value)
    step = int(str(e.value).rsplit("checkpoint-", 1)[1].split()[0])
    assert 10 < step < 30 and step % 10
    assert sorted(int(n.split("-")[1]) for n in os.listdir(rc.ckpt_dir) if n.startswith("checkpoint-")) \
        == list(range(10, step, 10)) + [step]
    (shards / "b.jsonl").write_text(good + "\n")  # mended, the same size
    resumed = run(rc, dtype="float32")
    assert resumed["start_step"] == step and [r["step"] for r in resumed["records"]] == list(range(step + 1, 31))
    straight = run(dataclasses.replace(rc, ckpt_dir=str(tmp_path / "straight")), dtype="float32")
    np.testing.assert_allclose([r["loss"] for r in resumed["records"]],
                               [r["loss"] for r in straight["records"][step:]], rtol=1e-6)


def test_the_metrics_mfu_uses_the_gpus_bfloat16_datasheet_peak(monkeypatch):
    """MFU in metrics.jsonl as on the JAX side (counted FLOPs per second over the peak of all the
    run's devices): on known NVIDIA GPUs in bfloat16; not in float32 (the datasheet's float32 figure
    is TF32's, which PyTorch does not use by default) and not on CPUs."""
    from torch_ref import training

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    assert training._peak_flops("bfloat16", 2) == 2 * 989e12
    assert training._peak_flops("float32", 2) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Some Future GPU")
    assert training._peak_flops("bfloat16", 1) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert training._peak_flops("bfloat16", 1) is None
    cb = training.MetricsCallback(None, 1000, flops_per_step=5e12, peak_flops=1e13)
    state = SimpleNamespace(global_step=2, is_world_process_zero=True)
    cb._t, cb._step = time.perf_counter() - 2.0, 0  # two steps in about 2 s
    cb.on_log(None, state, None, logs={"loss": 1.0, "lm_loss": 1.0, "aux_loss": 0.0},
              model=SimpleNamespace(config=SimpleNamespace(router_aux_loss_coef=0.0)))
    rec = cb.records[-1]
    assert rec["step_time_s"] > 0.9 and rec["mfu"] == pytest.approx(5e12 / rec["step_time_s"] / 1e13)


def test_a_checkpoint_save_is_left_out_of_the_throughput_of_its_logging_window(tmp_path, monkeypatch):
    """As on the JAX side: each save (2 s long here) was counted in the tokens/s, step time and MFU
    of the logging window it fell in (a falsely low throughput). They are the steps' own now, and
    `save_s` holds the seconds spent saving in the window."""
    from jaxllm.flops import training_flops_per_token
    from torch_ref import training

    real_save = CustomLLMTrainer._save_and_rotate

    def slow_save(self, model, trial):
        time.sleep(2.0)
        real_save(self, model, trial)

    monkeypatch.setattr(CustomLLMTrainer, "_save_and_rotate", slow_save)
    monkeypatch.setattr(training, "_peak_flops", lambda dtype, devices: 1e12)
    rc = _rc(tmp_path, steps=4, save_every=1, log_every=2, keep=5, max_new_tokens=0)
    records = run(rc, dtype="float32")["records"]
    # logged at steps 1 (the first), 2 and 4; saves after steps 1, 2, 3 and 4 (each after its step's line)
    assert [r["step"] for r in records] == [1, 2, 4]
    tokens_per_step = rc.batch_size * rc.grad_accum * rc.seq_len
    flops_per_token = training_flops_per_token(TINY, rc.seq_len)
    for r in records:
        # the windows of steps 2 and 4 hold saves: the steps alone take less than a second (a save's
        # 2 s counted made them >= 1 s); step 1's window holds the first step and no save
        assert r["step"] == 1 or r["step_time_s"] < 1.0, r
        assert r["tokens_per_sec"] == pytest.approx(tokens_per_step / r["step_time_s"])
        assert r["mfu"] == pytest.approx(r["tokens_per_sec"] * flops_per_token / 1e12)
    assert records[0]["save_s"] == 0.0
    assert records[1]["save_s"] >= 2.0 and records[2]["save_s"] >= 4.0  # one save, then two


# How a process sees an output directory through a shared file system's stale cache: without its
# newest checkpoint-N. `python -c` this, then train_torch.py's path and flags.
STALE_LISTING = (
    "import glob, runpy, sys, types; from torch_ref import training; "
    "step = lambda path: int(path.rsplit('-', 1)[1]) if path.rsplit('-', 1)[1].isdigit() else -1; "
    "training.glob = types.SimpleNamespace(glob=lambda pattern: sorted(glob.glob(pattern), key=step)[:-1] "
    "if pattern.endswith('checkpoint-*') else glob.glob(pattern)); "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def _two_torch_processes(args_of, cwd_of=lambda i: None, stale=()):
    """Two train_torch.py processes (a DDP group over gloo, as torchrun starts them), process `i`
    given the flags `args_of(i)` in the working directory `cwd_of(i)`; those in `stale` see the
    output directory without its newest checkpoint (`STALE_LISTING`). Their exit statuses and
    the lines of stderr that start with "train_torch.py:" and their whole stderr, once both have ended."""
    import socket
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    python = lambda i: [sys.executable, "-c", STALE_LISTING] if i in stale else [sys.executable]
    procs = [subprocess.Popen(python(i) + [os.path.join(root, "scripts", "train_torch.py")] + args_of(i),
                              cwd=cwd_of(i), env={**env, "RANK": str(i), "LOCAL_RANK": str(i)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        errs = [p.communicate(timeout=240)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert "Traceback" not in errs[0] + errs[1], errs
    return ([p.returncode for p in procs],
            [[ln for ln in err.splitlines() if ln.startswith("train_torch.py:")] for err in errs], errs)


def test_processes_given_other_settings_or_failing_to_open_their_data_all_end_with_exit_2(tmp_path):
    """Two DDP processes (gloo, as torchrun starts them). One given another --lr trained its own
    replica apart from the other's; one that could not open its data or its --config (`data.txt`,
    `cfg.json` relative to its working directory, as on a host without the file) exited 2 while
    the other died in its next collective with a traceback; given a --ckpt-dir that they do not
    share (`ck`, relative: one on each host's disk), both trained (exit 0), process 1's
    checkpoint-2 holding only its data position and random state, and process 0's lacking process
    1's data position. Now every process ends with one line and status 2."""
    from jaxllm.config import LLMConfig

    homes = [tmp_path / "host0", tmp_path / "host1"]
    for home in homes:
        home.mkdir()
    (homes[0] / "data.txt").write_text("a document about lists\n\nanother one about dicts\n")
    (homes[0] / "cfg.json").write_text(LLMConfig.from_preset("tiny").to_json_string())
    base = ["--preset", "tiny", "--seq-len", "16", "--batch-size", "2", "--steps", "2", "--max-new-tokens", "0",
            "--no-progress"]
    not_shared = "/ck is not one directory shared by all processes: process(es) 1 of 2 do not see"
    for case, rank1, needle, rank0 in (
            ("lr", ["--lr", "0.1"], "--lr differs from process 0's", "failed in process(es) 1 of 2"),
            ("data", ["--dataset", "data.txt"], "data.txt", "failed in process(es) 1 of 2"),
            ("config", ["--config", "cfg.json"], "config file not found: cfg.json", "failed in process(es) 1 of 2"),
            ("shared", ["--ckpt-dir", "ck"], not_shared, not_shared)):  # (each its own ck: no shared disk)
        given = [rank1 if case != "lr" else [], rank1]  # (the same flags but --lr; a file on host 0 only)
        codes, lines, errs = _two_torch_processes(lambda i: base + ["--ckpt-dir", str(tmp_path / case)] + given[i],
                                                  cwd_of=lambda i: homes[i])
        assert codes == [2, 2], errs
        assert len(lines[1]) == 1 and needle in lines[1][0], lines
        assert len(lines[0]) == 1 and rank0 in lines[0][0], lines
        assert not (tmp_path / case).exists() and not any((home / "ck").exists() for home in homes)


def test_processes_that_would_resume_other_checkpoints_end_with_exit_2_and_change_nothing(tmp_path):
    """Process 1 lists the shared output directory without its newest checkpoint (a file system's
    stale cache). Each process used to resume the newest checkpoint it listed on its own (process
    0 checkpoint-4, process 1 checkpoint-2), and both then waited in collectives that did not
    match (still running when killed after 240 s). Now they compare their choices before reading
    any of them: both end with one line and status 2, and nothing in the directory changes."""
    out = tmp_path / "run"
    flags = ["--preset", "tiny", "--seq-len", "16", "--batch-size", "2", "--max-new-tokens", "0", "--no-progress",
             "--save-every", "2", "--ckpt-dir", str(out)]
    run(RunConfig(preset="tiny", seq_len=16, batch_size=2, steps=4, save_every=2, max_new_tokens=0, progress=False,
                  ckpt_dir=str(out)), dtype="float32")
    files = lambda: sorted((str(p.relative_to(out)), p.stat().st_mtime_ns, p.stat().st_size)
                           for p in out.rglob("*") if p.is_file())
    before = files()
    codes, lines, errs = _two_torch_processes(lambda i: flags + ["--steps", "6"], stale=[1])
    assert codes == [2, 2], errs
    assert [len(ls) for ls in lines] == [1, 1], lines
    head = f"--ckpt-dir {out}: process(es) 1 of 2 found other checkpoints there than process 0"
    assert head + " (this process: checkpoint-4)" in lines[0][0], lines
    assert head + " (this process: checkpoint-2)" in lines[1][0], lines
    assert files() == before


def test_a_checkpoint_that_cannot_be_written_ends_the_run_naming_the_last_complete_one(tmp_path, monkeypatch):
    """torch.save on a full disk says "unexpected pos ..." (safetensors: "No space left on device"),
    in a traceback: now a `SaveError` (train_torch.py: one line, exit status 1) naming the checkpoint,
    the last complete one and what to do; the earlier checkpoints are left as they were."""
    from torch_ref.training import SaveError

    real_save = torch.save

    def save(obj, f, *args, **kw):
        if "checkpoint-4" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 435008 vs 434900")
        return real_save(obj, f, *args, **kw)

    monkeypatch.setattr(torch, "save", save)
    rc = _rc(tmp_path, steps=6, save_every=2, max_new_tokens=0)
    with pytest.raises(SaveError) as e:
        run(rc, dtype="float32")
    assert str(e.value) == (f"saving checkpoint-4 in {rc.ckpt_dir} failed ([enforce fail at inline_container.cc:672] . "
                            "unexpected pos 435008 vs 434900); the last complete checkpoint is checkpoint-2, and the "
                            "steps after it are lost. Make room there (or mend the directory) and run the same command "
                            "again to resume")
    assert os.path.isfile(os.path.join(rc.ckpt_dir, "checkpoint-2", "trainer_state.json"))
    assert not os.path.exists(os.path.join(rc.ckpt_dir, "checkpoint-6"))
    # a lost peer's error in a save (gloo raises plain RuntimeErrors) is no failed write
    tr = _trainer(tmp_path / "peer")
    lost = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection reset by peer")
    monkeypatch.setattr(tr, "_save_and_rotate", lambda *a: (_ for _ in ()).throw(lost))
    with pytest.raises(RuntimeError) as e:
        tr._save_checkpoint(tr.model, None)
    assert e.value is lost


@contextlib.contextmanager
def _trainer_utils_warnings():
    """The messages `transformers.trainer_utils` logs meanwhile (they bypass pytest's capture)."""
    import logging

    warnings = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logger = logging.getLogger("transformers.trainer_utils")
    logger.addHandler(handler)
    try:
        yield warnings
    finally:
        logger.removeHandler(handler)


def test_keep_leaves_an_interrupted_save_above_the_resumed_step_out_of_its_count(trained, tmp_path):
    """An incomplete checkpoint above the step a run resumed from (an interrupted save, which the
    resume passed over) is not one of the --keep kept: counted, with --keep 1 it took the place of
    the checkpoint just written, which was deleted, and with it every complete one."""
    rc, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(rc.ckpt_dir, copy)
    shutil.copytree(copy / "checkpoint-10", copy / "checkpoint-12")
    os.remove(copy / "checkpoint-12" / "trainer_state.json")
    run(dataclasses.replace(rc, ckpt_dir=str(copy), steps=11, keep=1, max_new_tokens=0), dtype="float32")
    assert sorted(d for d in os.listdir(copy) if d.startswith("checkpoint-")) == ["checkpoint-11", "checkpoint-12"]
    assert os.path.isfile(copy / "checkpoint-11" / "trainer_state.json")


def test_keep_deletes_the_oldest_steps_whatever_the_folders_times(trained, tmp_path):
    """--keep deletes the oldest steps, as in JAX. The Trainer's own rotation went by the folders'
    modification times, which a copy or a restore can leave out of step order: it kept checkpoint-4
    and deleted checkpoint-10, the newest before this run's. Nor does it say anything about the
    filesystem's times ("mtime may not be reliable", its line when they are within a second)."""
    rc, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(rc.ckpt_dir, copy)
    now = time.time()
    for age, step in zip((300, 200, 100), (10, 8, 4)):  # checkpoint-10's folder the oldest
        os.utime(copy / f"checkpoint-{step}", (now - age, now - age))
    with _trainer_utils_warnings() as warnings:
        run(dataclasses.replace(rc, ckpt_dir=str(copy), steps=12, max_new_tokens=0), dtype="float32")
    assert sorted(int(d.split("-")[1]) for d in os.listdir(copy) if d.startswith("checkpoint-")) == [8, 10, 12]
    assert not any("mtime" in w for w in warnings), warnings


def test_a_resumed_run_saves_and_logs_at_its_own_intervals(tmp_path):
    """The Trainer took a resumed run's save and logging intervals from the checkpoint's
    `trainer_state.json` (the first run's --save-every and --log-every), with a warning: a resume
    with --save-every 6 --log-every 6 saved at 6, 8, 10, 12 and logged every step. Its warning about
    another batch per device is dropped too: the project's note names another --batch-size."""
    rc = _rc(tmp_path, steps=4, save_every=2, log_every=1, grad_accum=1, max_new_tokens=0, keep=10)
    run(rc, dtype="float32")
    with _trainer_utils_warnings() as warnings:
        out = run(dataclasses.replace(rc, steps=12, save_every=6, log_every=6, batch_size=2 * rc.batch_size),
                  dtype="float32")
    assert sorted(int(d.split("-")[1]) for d in os.listdir(rc.ckpt_dir) if d.startswith("checkpoint-")) == [2, 4, 6, 12]
    # logged at its own interval, its first step and its last (as the JAX side logs a resumed run)
    assert [r["step"] for r in out["records"]] == [5, 6, 12]
    steps = [json.loads(line)["step"] for line in open(os.path.join(rc.ckpt_dir, "metrics.jsonl"))]
    assert steps == [1, 2, 3, 4, 5, 6, 12]
    assert not any(name in w for w in warnings for name in ("save_steps", "logging_steps", "per_device")), warnings
