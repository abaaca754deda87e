"""The PyTorch reference as a Hugging Face model: the `PreTrainedModel` conventions a user of
transformers relies on (tiny preset, PyTorch only)."""

import pytest
import torch

from torch_ref import CustomLLM, CustomLLMConfig


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
    assert abs(trainer.evaluate(data)["eval_loss"] - want.loss.item()) < 1e-4
