"""Run by tests/test_train_torch.py under `torchrun --nproc-per-node N`: trains the tiny model on
fixed batches, each process on its share, and has process 0 write the losses and final weights.
A fourth argument `unused-expert` keeps every token away from the last routed expert."""

import os
import sys

import numpy as np
import torch

from jaxllm.config import LLMConfig
from jaxllm.recipes import RunConfig
from torch_ref import CustomLLM, CustomLLMConfig
from torch_ref.training import CustomLLMTrainer, FixedBatches, MetricsCallback, training_arguments


def main(batches_path: str, out_path: str, out_dir: str, variant: str = "") -> None:
    torch.set_num_threads(1)
    from accelerate import PartialState

    dist = PartialState(cpu=True)
    batches = np.load(batches_path)
    steps, rows, _ = batches.shape
    config = LLMConfig.from_preset("tiny")
    torch.manual_seed(0)
    model = CustomLLM(CustomLLMConfig.from_llm_config(config))
    model.dropout.p = 0.0
    if variant == "unused-expert":
        with torch.no_grad():
            for layer in model.decoder_layers:
                layer.mlp.moe.router_bias[-1] = -10.0
    rc = RunConfig(steps=steps, grad_accum=2, lr=2e-3, warmup_steps=1, log_every=1, progress=False)
    per_device = rows // 2 // dist.num_processes
    args = training_arguments(rc, out_dir, per_device_batch=per_device, save=False, use_cpu=True)
    assert args.world_size == dist.num_processes == int(os.environ["WORLD_SIZE"]), "not one DDP group"
    metrics = MetricsCallback(None, 1)
    data = FixedBatches(batches, rows // 2, process_index=dist.process_index, process_count=dist.num_processes)
    CustomLLMTrainer(model=model, args=args, train_dataset=data, callbacks=[metrics]).train()
    if dist.is_main_process:
        np.savez(out_path, losses=np.array([r["loss"] for r in metrics.records]),
                 **{k: v.detach().numpy() for k, v in model.state_dict().items()})
    # As train_torch.py does: left to the interpreter's exit, gloo's threads could abort the process
    # ("terminate called without an active exception"; once in a CI run)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
