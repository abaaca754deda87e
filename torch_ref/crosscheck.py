"""Cross-framework training check: the JAX trainer and the PyTorch Trainer glue, step for step.

Both start from the same initial weights (the JAX initialisation, mapped to PyTorch names by
`convert.mapping`), see the same batches in the same order (step s, micro-batch i = rows
`i*B:(i+1)*B` of batch s), train in float32 without dropout with the same optimizer, schedule,
clipping, gradient accumulation and router-bias balancing. Their losses must agree at every step
and their final weights at the end: the strongest evidence that the two training stacks compute
the same thing. Used by `scripts/compare_frameworks.py` and tests/test_train_torch.py.

Needs JAX *and* PyTorch (unlike the rest of `torch_ref`, which runs without JAX).
"""

from __future__ import annotations

import dataclasses
import math
import tempfile

import numpy as np
import torch

from jaxllm.config import LLMConfig
from jaxllm.recipes import RunConfig


@dataclasses.dataclass
class CrossCheck:
    jax_losses: list[float]
    torch_losses: list[float]
    weight_gaps: dict[str, float]  # PyTorch tensor name -> |torch - jax| / |jax| (Frobenius norms)
    router_bias_max_abs_diff: float
    torch_stopped: str | None = None  # why the PyTorch run ended early (its later losses: NaN)

    @property
    def loss_gaps(self) -> list[float]:
        return [abs(t - j) / abs(j) for j, t in zip(self.jax_losses, self.torch_losses)]

    # A NaN gap (a loss or weight that became NaN on one side) counts as the largest, so that the
    # check fails: `max` would skip it unless it came first.
    @property
    def max_loss_gap(self) -> float:
        return max(self.loss_gaps, key=_nan_first)

    @property
    def max_weight_gap(self) -> tuple[str, float]:
        name = max(self.weight_gaps, key=lambda k: _nan_first(self.weight_gaps[k]))
        return name, self.weight_gaps[name]

    def table(self) -> str:
        """Both loss curves side by side, with the relative gap of each step."""
        lines = [f"{'step':>4}  {'JAX loss':>12}  {'PyTorch loss':>12}  {'rel. gap':>9}"]
        for s, (j, t, g) in enumerate(zip(self.jax_losses, self.torch_losses, self.loss_gaps), 1):
            lines.append(f"{s:>4}  {j:>12.7f}  {t:>12.7f}  {g:>9.2e}")
        name, gap = self.max_weight_gap
        lines.append(f"largest relative loss gap {self.max_loss_gap:.2e}; largest relative weight gap {gap:.2e} "
                     f"({name}); router_bias max |diff| {self.router_bias_max_abs_diff:.1e}")
        if self.torch_stopped:
            lines.append(f"the PyTorch run stopped: {self.torch_stopped}")
        return "\n".join(lines)


def _nan_first(gap: float) -> tuple[bool, float]:
    return math.isnan(gap), gap


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    nb = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / nb) if nb > 0 else float(np.linalg.norm(a - b))


def embedded_batches(steps: int, rows: int, seq_len: int, *, seed: int = 0):
    """`[steps, rows, seq_len]` int32 token rows from the embedded corpus through the shared data
    pipeline, and the tokenizer (its vocabulary size is the model's)."""
    from jaxllm import data as data_lib

    tokenizer = data_lib.load_tokenizer(None)
    batches = data_lib.PackedBatches(data_lib.DataConfig(seq_len=seq_len, seed=seed), tokenizer, rows=rows)
    try:
        return np.stack([next(batches) for _ in range(steps)]), tokenizer
    finally:
        batches.close()


def cross_check(config: LLMConfig, batches_SRT: np.ndarray, *, grad_accum: int = 2, lr: float = 1e-3,
                warmup_steps: int = 5, weight_decay: float = 0.01, clip_norm: float = 1.0, seed: int = 0) -> CrossCheck:
    """Train `len(batches_SRT)` optimizer steps in each framework (micro-batch = rows / grad_accum)
    from the same initial weights; return both loss curves and the final weight gaps."""
    import jax
    from transformers import PrinterCallback

    from convert.mapping import flax_to_torch
    from jaxllm import sharding as shd
    from jaxllm.stopping import NonFiniteError
    from jaxllm.train import OptimConfig, Trainer
    from jaxllm.weights import flatten
    from torch_ref.configuration_customllm import CustomLLMConfig
    from torch_ref.modeling_customllm import CustomLLM
    from torch_ref.training import CustomLLMTrainer, FixedBatches, MetricsCallback, training_arguments

    batches_SRT = np.asarray(batches_SRT, np.int32)
    steps, rows, seq_len = batches_SRT.shape
    if rows % grad_accum:
        raise ValueError(f"{rows} rows per step cannot be split into {grad_accum} micro-batches")
    batch = rows // grad_accum

    def weights(state) -> dict[tuple[str, ...], np.ndarray]:
        flat = flatten(jax.device_get(state["params"]))
        flat.update(flatten(jax.device_get(state["router_bias"])))
        return {k: np.array(v) for k, v in flat.items()}

    # ---- JAX: jaxllm.train.Trainer on one device, full float32 matmuls ----------------------
    with jax.default_matmul_precision("highest"):
        mesh = shd.make_mesh(None, jax.devices()[:1])
        optim = OptimConfig(lr=lr, warmup_steps=warmup_steps, total_steps=steps, weight_decay=weight_decay,
                            clip_norm=clip_norm)
        jt = Trainer(config, optim, mesh, batch_size=batch, grad_accum=grad_accum, seq_len=seq_len, seed=seed,
                     dropout=False)
        state = jt.init_state()
        init = flax_to_torch(weights(state), config)
        jax_losses = []
        for b in batches_SRT:
            state, m = jt.step_fn(state, jt.put_batch(b))
            jax_losses.append(float(m["loss"]))
        jax_final = flax_to_torch(weights(state), config)

    # ---- PyTorch: the Trainer glue of scripts/train_torch.py, on the CPU in float32 -----------
    model = CustomLLM.from_state_dict(CustomLLMConfig.from_llm_config(config),
                                      {k: torch.from_numpy(v) for k, v in init.items()}).train()
    model.dropout.p = 0.0
    rc = RunConfig(steps=steps, grad_accum=grad_accum, lr=lr, warmup_steps=warmup_steps, weight_decay=weight_decay,
                   clip_norm=clip_norm, log_every=1, seed=seed, progress=False)
    metrics = MetricsCallback(None, rows * seq_len)
    stopped = None
    with tempfile.TemporaryDirectory() as tmp:
        args = training_arguments(rc, tmp, per_device_batch=batch, dtype="float32", save=False, use_cpu=True)
        trainer = CustomLLMTrainer(model=model, args=args, train_dataset=FixedBatches(batches_SRT, batch),
                                   callbacks=[metrics])
        trainer.remove_callback(PrinterCallback)  # the curves are the result; no per-step log lines
        try:
            trainer.train()
        except NonFiniteError as e:  # (the JAX step skips such an update and goes on)
            stopped = str(e)
    torch_losses = [r["loss"] for r in metrics.records]
    if stopped is not None:  # a run that diverged: its curve ends in NaN, which fails the check
        torch_losses += [math.nan] * (steps - len(torch_losses))
    if len(torch_losses) != steps:
        raise RuntimeError(f"the PyTorch run logged {len(torch_losses)} losses for {steps} steps")
    torch_final = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items() if k in jax_final}

    gaps = {k: _rel(torch_final[k], jax_final[k]) if stopped is None else math.nan  # (weights of another step)
            for k in jax_final if not k.endswith("router_bias")}
    rb_diff = float(np.max([np.max(np.abs(torch_final[k] - jax_final[k]))  # (np.max: a NaN is not passed over)
                            for k in jax_final if k.endswith("router_bias")]))
    return CrossCheck(jax_losses, torch_losses, gaps, rb_diff, stopped)
