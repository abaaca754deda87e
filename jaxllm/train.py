"""The training step: one `jax.jit` over a device mesh.

The train state is a plain pytree (nested dicts of arrays, the same structure that checkpoints
hold): `params` (float32 master weights), `router_bias`, `opt_state` (optax), `step`, `rng`.
One call of the step:
1. splits the step's batch `[grad_accum, batch, seq]` into micro-batches and runs them under
   `lax.scan`, accumulating gradients; each micro-batch's loss is normalised by the token (and
   sequence) count of the *whole step*, so accumulation equals one large batch exactly;
2. clips by global norm and applies AdamW with warm-up + cosine (optax);
3. updates every layer's `router_bias` from the step's global expert loads (DeepSeek-V3's
   auxiliary-loss-free balancing: `b_e += rate * sign(mean(load) - load_e)`);
4. leaves the state untouched if the loss or the gradient norm is not finite (reported in the
   metrics, so the caller can stop or skip).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxllm import sharding as shd
from jaxllm.config import LLMConfig
from jaxllm.model import CustomLLM, RouterBias, create_model, lm_loss_sums

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up and cosine decay to 0 (the Hugging Face Trainer's
    `cosine` schedule: lr is 0 at the first step), global-norm clipping (`clip_norm` 0: none,
    as the Trainer's `max_grad_norm`)."""

    lr: float = 2e-5
    warmup_steps: int = 2000
    total_steps: int = 10_000
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float = 1.0

    def __post_init__(self):
        """ValueError naming the field for a value optax would take and train wrongly with, or fail on
        at the first step (a string, a float step count, beta 1, an infinite learning rate)."""
        for name in ("total_steps", "warmup_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise ValueError(f"{name} must be an integer, got {v!r}")
        for name in ("lr", "weight_decay", "b1", "b2", "eps", "clip_norm"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        for name in ("lr", "total_steps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "weight_decay", "eps", "clip_norm"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")
        for name in ("b1", "b2"):  # (torch.optim.AdamW's rule)
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")


def lr_schedule(oc: OptimConfig) -> optax.Schedule:
    warmup = min(oc.warmup_steps, oc.total_steps)
    return optax.warmup_cosine_decay_schedule(0.0, oc.lr, warmup, max(oc.total_steps, warmup + 1), 0.0)


def decay_mask(params) -> Any:
    """Weight decay on matrices (linear kernels, experts, embeddings), not on biases or norm
    weights: the usual practice, and what the PyTorch side's Trainer does (no decay for names
    containing "bias" or "norm")."""
    flat = nnx.traversals.flatten_mapping(params)
    return nnx.traversals.unflatten_mapping(
        {k: not (k[-1] == "bias" or any("norm" in part for part in k)) for k in flat})


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """`optax.clip_by_global_norm` written as one multiplication by a scalar.

    optax divides every element by the norm inside a select; XLA treats the divide as expensive
    and materialises the clipped gradient (a second gradient-sized buffer, 3.6 GiB for seed-973m)
    because both Adam moments read it. A multiplication by a precomputed scalar is cheap, so XLA
    fuses it into each moment's update instead. Same state (none), same result up to rounding."""

    def update_fn(updates, state, params=None):
        del params
        g_norm = optax.tree.norm(updates)
        scale = jnp.where(g_norm < max_norm, 1.0, max_norm / g_norm)
        return jax.tree.map(lambda t: t * scale.astype(t.dtype), updates), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def make_optimizer(oc: OptimConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = lr_schedule(oc)
    tx = optax.chain(
        clip_by_global_norm(oc.clip_norm) if oc.clip_norm > 0 else optax.identity(),
        optax.adamw(schedule, b1=oc.b1, b2=oc.b2, eps=oc.eps, weight_decay=oc.weight_decay, mask=decay_mask),
    )
    return tx, schedule


def router_bias_update(router_bias_LE: jax.Array, counts_LE: jax.Array, rate: float) -> jax.Array:
    """`b_e += rate * sign(mean(load) - load_e)`, per layer, with `load` the share of the step's
    (token, slot) assignments that went to each expert (`counts_LE`, integers).

    The sign is taken exactly, on the counts: that of `total - E * count_e`. In floating point, an
    expert whose load is exactly the mean (whenever E divides the assignments) got +-1 from rounding,
    not 0, and not always the PyTorch side's. With `total = q * E + r` (0 <= r < E), nothing
    overflows: the sign is + where `count_e < q`, - where `count_e > q`, else that of r."""
    counts = counts_LE.astype(jnp.int32)
    E = counts.shape[-1]
    total = jnp.sum(counts, -1, keepdims=True)
    q, r = total // E, total % E
    sign = jnp.where(counts < q, 1, jnp.where(counts > q, -1, jnp.sign(r)))
    return router_bias_LE + rate * sign.astype(F32)


class Trainer:
    """Builds the model, state and jitted step for a config, mesh and optimizer.

    `state_shardings` and `batch_sharding` say where everything lives; the step donates the old
    state. `model_kw` are the model's runtime settings (dtype, moe_impl, remat, ...)."""

    def __init__(self, config: LLMConfig, optim: OptimConfig, mesh: Mesh, *, batch_size: int,
                 grad_accum: int = 1, seq_len: int, seed: int = 0, dropout: bool = True, **model_kw):
        if grad_accum < 1:
            raise ValueError(f"grad_accum must be at least 1, got {grad_accum}")
        if seq_len < 2:  # the loss predicts each next token: one token gives no target (0 / 0)
            raise ValueError(f"sequence length must be at least 2, got {seq_len}")
        if seq_len > config.max_position_embeddings:
            raise ValueError(f"sequence length {seq_len} exceeds max_position_embeddings "
                             f"({config.max_position_embeddings}) of the model")
        shd.check_batch(batch_size, mesh)
        self.config, self.optim, self.mesh = config, optim, mesh
        self.batch_size, self.grad_accum, self.seq_len, self.seed = batch_size, grad_accum, seq_len, seed
        self.dropout = dropout
        self.model_kw = model_kw
        self.tx, self.schedule = make_optimizer(optim)
        abstract = create_model(config, abstract=True, **model_kw)
        self.graphdef, abs_params, abs_rb = nnx.split(abstract, nnx.Param, RouterBias)
        self.param_shardings = nnx.to_pure_dict(shd.state_shardings(abs_params, mesh))
        self.rb_shardings = nnx.to_pure_dict(shd.state_shardings(abs_rb, mesh))
        self.batch_sharding = NamedSharding(mesh, shd.batch_spec(mesh, batch_size, leading=1))
        self._abs_params = nnx.to_pure_dict(abs_params)
        self._abs_rb = nnx.to_pure_dict(abs_rb)
        opt_abs = jax.eval_shape(self.tx.init, self._abs_params)
        self.opt_shardings = self._opt_shardings(opt_abs)
        replicated = NamedSharding(mesh, P())
        self.state_shardings = {
            "params": self.param_shardings, "router_bias": self.rb_shardings, "opt_state": self.opt_shardings,
            "step": replicated, "rng": replicated,
        }
        self.step_fn = jax.jit(self._train_step, donate_argnums=0,
                               in_shardings=(self.state_shardings, self.batch_sharding),
                               out_shardings=(self.state_shardings, replicated))

    # ---- state ------------------------------------------------------------------------------
    def _opt_shardings(self, opt_abs):
        """Optimizer moments shard like their parameters; everything else (counts) is replicated."""
        replicated = NamedSharding(self.mesh, P())
        return optax.tree_map_params(self.tx, lambda _, sh: sh, opt_abs, self.param_shardings,
                                     transform_non_params=lambda _: replicated)

    def abstract_state(self) -> dict:
        """ShapeDtypeStructs (with shardings) of the train state: the restore target."""
        def sds(tree, shardings):
            return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

        opt_abs = jax.eval_shape(self.tx.init, self._abs_params)
        replicated = NamedSharding(self.mesh, P())
        return {
            "params": sds(self._abs_params, self.param_shardings),
            "router_bias": sds(self._abs_rb, self.rb_shardings),
            "opt_state": sds(opt_abs, self.opt_shardings),
            "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
            "rng": jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated),
        }

    def init_state(self, weights: dict | None = None) -> dict:
        """A fresh state: initialised weights (or `weights` = {"params", "router_bias"} from a
        checkpoint), a fresh optimizer, step 0."""
        if weights is None:
            def shardings(state):
                return shd.state_shardings(state, self.mesh)

            model = create_model(self.config, seed=self.seed, shardings=shardings, **self.model_kw)
            _, params, rb = nnx.split(model, nnx.Param, RouterBias)
            weights = {"params": nnx.to_pure_dict(params), "router_bias": nnx.to_pure_dict(rb)}
        params = jax.device_put(weights["params"], self.param_shardings)
        rb = jax.device_put(weights["router_bias"], self.rb_shardings)
        opt_state = jax.jit(self.tx.init, out_shardings=self.opt_shardings)(params)
        replicated = NamedSharding(self.mesh, P())
        return {
            "params": params, "router_bias": rb, "opt_state": opt_state,
            "step": jax.device_put(jnp.zeros((), jnp.int32), replicated),
            "rng": jax.device_put(jax.random.key_data(jax.random.key(self.seed + 1)), replicated),
        }

    def model(self, state: dict) -> CustomLLM:
        """The model holding the state's current weights (shares the arrays)."""
        return nnx.merge(self.graphdef, state["params"], state["router_bias"])

    # ---- the step -----------------------------------------------------------------------------
    def _train_step(self, state: dict, batch_ABT: jax.Array):
        c = self.config
        A, B, T = batch_ABT.shape
        n_tokens = A * B * (T - 1)  # every shifted label is a real token (packed data)
        n_seqs = A * B
        step_rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        rb = state["router_bias"]

        def micro_loss(params, ids_BT, rng):
            model = nnx.merge(self.graphdef, params, rb)
            with shd.tracing_on(self.mesh):
                out = model.forward(ids_BT, dropout_rng=rng if self.dropout else None)
            ce_sum, _ = lm_loss_sums(out.logits, ids_BT)
            aux_sum = jnp.sum(out.aux_loss)
            loss = ce_sum / n_tokens + c.router_aux_loss_coef * aux_sum / n_seqs
            return loss, (ce_sum, aux_sum, out.expert_counts)

        grad_fn = jax.grad(micro_loss, has_aux=True)

        def body(carry, xs):
            grads, ce, aux, counts = carry
            ids_BT, i = xs
            g, (ce_i, aux_i, counts_i) = grad_fn(state["params"], ids_BT, jax.random.fold_in(step_rng, i))
            grads = jax.tree.map(jnp.add, grads, g)
            return (grads, ce + ce_i, aux + aux_i, counts + counts_i), None

        if A == 1:  # no accumulation: no accumulator buffers, no loop
            grads, (ce, aux, counts) = grad_fn(state["params"], batch_ABT[0], jax.random.fold_in(step_rng, 0))
        else:
            zeros = jax.tree.map(jnp.zeros_like, state["params"])
            counts0 = jnp.zeros((c.num_hidden_layers, c.num_routed_experts), jnp.int32)
            init = (zeros, jnp.zeros((), F32), jnp.zeros((), F32), counts0)
            (grads, ce, aux, counts), _ = jax.lax.scan(body, init, (batch_ABT, jnp.arange(A)))

        lm_loss = ce / n_tokens
        aux_loss = aux / n_seqs
        loss = lm_loss + c.router_aux_loss_coef * aux_loss
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(state):
            updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
            return {"params": optax.apply_updates(state["params"], updates),
                    "router_bias": jax.tree.map(
                        lambda b: router_bias_update(b, counts, c.router_bias_update_rate), state["router_bias"]),
                    "opt_state": opt_state, "step": state["step"] + 1, "rng": state["rng"]}

        # A conditional, not a `where` between old and new state: the update then runs in place
        # in the donated buffers (a `where` keeps both alive: +1.3 GiB of copies for seed-973m).
        new_state = jax.lax.cond(finite, update, lambda s: s, state)
        load = counts.astype(F32) / jnp.maximum(jnp.sum(counts, -1, keepdims=True), 1)
        metrics = {
            "loss": loss, "lm_loss": lm_loss, "aux_loss": aux_loss, "grad_norm": grad_norm,
            "lr": self.schedule(state["step"]), "finite": finite,
            "expert_load_min": jnp.min(load, -1), "expert_load_max": jnp.max(load, -1),
        }
        return new_state, metrics

    def put_batch(self, local_rows) -> jax.Array:
        """This process's rows `[grad_accum * batch / processes, seq]` -> the global sharded
        `[grad_accum, batch, seq]` array."""
        import numpy as np

        local = np.asarray(local_rows, np.int32)
        per_process = self.batch_size // jax.process_count()
        local = local.reshape(self.grad_accum, per_process, local.shape[-1])
        global_shape = (self.grad_accum, self.batch_size, local.shape[-1])
        return jax.make_array_from_process_local_data(self.batch_sharding, local, global_shape)

    def rows_per_process(self) -> int:
        if self.batch_size % jax.process_count():
            raise ValueError(f"batch size {self.batch_size} cannot be split over {jax.process_count()} processes")
        return self.grad_accum * self.batch_size // jax.process_count()
