"""The jitted train step: learning, sharding invariance, accumulation, balancing, FLOPs, resume."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import rel_err
from jaxllm import checkpoint as ckpt_lib
from jaxllm import sharding as shd
from jaxllm.config import LLMConfig
from jaxllm.flops import forward_flops_per_token
from jaxllm.model import create_model
from jaxllm.train import OptimConfig, Trainer, router_bias_update

TINY = LLMConfig.from_preset("tiny")
SEQ = 32


def _batches(n_steps, rows, seed=0):
    rng = np.random.RandomState(seed)
    return [rng.randint(0, TINY.vocab_size, (rows, SEQ)) for _ in range(n_steps)]


def _trainer(mesh_spec=None, n_devices=1, batch_size=8, grad_accum=1, lr=3e-3, warmup=0, steps=50, dropout=False,
             **kw):
    mesh = shd.make_mesh(mesh_spec, jax.devices()[:n_devices])
    oc = OptimConfig(lr=lr, warmup_steps=warmup, total_steps=steps)
    return Trainer(TINY, oc, mesh, batch_size=batch_size, grad_accum=grad_accum, seq_len=SEQ, dropout=dropout, **kw)


def _run(tr, batches, state=None):
    state = tr.init_state() if state is None else state
    losses = []
    for b in batches:
        state, m = tr.step_fn(state, tr.put_batch(b))
        losses.append(float(m["loss"]))
    return state, losses


def test_loss_falls_when_overfitting_a_fixed_batch():
    tr = _trainer(batch_size=4)
    batch = _batches(1, 4)[0]
    _, losses = _run(tr, [batch] * 25)
    assert losses[-1] < 0.6 * losses[0], losses


def _spy_grouped(monkeypatch) -> list:
    """A list that grows each time the CPU's grouped loop (`grouped_dispatch`) is traced."""
    from jaxllm import model

    ran, real = [], model.grouped_dispatch
    monkeypatch.setattr(model, "grouped_dispatch", lambda *a, **kw: ran.append(1) or real(*a, **kw))
    return ran


# The CPU's grouped loop (`sparse`; blocks of 8 rows: with the default, these few tokens would take
# the loop-free gather that decoding uses) and the GPU's dispatch (`gather`).
DISPATCHES = pytest.mark.parametrize("impl, block", [("sparse", 8), ("gather", None)])


@DISPATCHES
def test_fsdp_mesh_on_8_devices_equals_one_device(impl, block, monkeypatch):
    assert jax.device_count() >= 8, "conftest sets 8 simulated CPU devices"
    grouped = _spy_grouped(monkeypatch)
    batches = _batches(4, 8)
    s1, l1 = _run(_trainer(moe_impl=impl, moe_block=block), batches)
    tr8 = _trainer("data=2,fsdp=4", n_devices=8, moe_impl=impl, moe_block=block)
    s8, l8 = _run(tr8, batches)
    assert bool(grouped) == (impl == "sparse")
    # Parameters really are sharded over fsdp.
    spec = s8["params"]["decoder_layers"]["mlp"]["routed_experts"]["gate_proj"].sharding.spec
    assert "fsdp" in tuple(spec)
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s8["params"]), jax.tree.leaves(s1["params"])):
        assert rel_err(a, b) <= 1e-5


def test_four_micro_batches_of_one_equal_one_batch_of_four():
    batches = _batches(3, 4, seed=1)
    s_acc, l_acc = _run(_trainer(batch_size=1, grad_accum=4), batches)
    s_one, l_one = _run(_trainer(batch_size=4, grad_accum=1), batches)
    np.testing.assert_allclose(l_acc, l_one, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s_acc), jax.tree.leaves(s_one)):
        if jnp.issubdtype(a.dtype, jnp.floating) and a.size > 1:
            assert rel_err(a, b) <= 1e-5
    np.testing.assert_array_equal(np.asarray(s_acc["router_bias"]["decoder_layers"]["mlp"]["router_bias"]),
                                  np.asarray(s_one["router_bias"]["decoder_layers"]["mlp"]["router_bias"]))


def test_router_bias_update_rule_and_optimizer_never_touches_it():
    counts = jnp.array([[10, 0, 5, 5, 5, 5, 5]])
    out = router_bias_update(jnp.zeros((1, 7)), counts, 0.001)
    # mean load 1/7: expert 0 over-loaded -> down, expert 1 under-loaded -> up, the rest (5/35=1/7) equal -> 0
    np.testing.assert_allclose(np.asarray(out), [[-0.001, 0.001, 0, 0, 0, 0, 0]], atol=1e-9)
    tr = _trainer(batch_size=4)
    state = tr.init_state()
    assert "router_bias" not in str(jax.tree_util.tree_structure(state["opt_state"]))


def test_non_finite_loss_leaves_the_state_untouched():
    tr = _trainer(batch_size=4)
    state = tr.init_state()
    state["params"]["lm_head"]["bias"] = state["params"]["lm_head"]["bias"].at[3].set(jnp.nan)
    before = jax.tree.map(np.asarray, state)
    after, m = tr.step_fn(state, tr.put_batch(_batches(1, 4)[0]))
    assert not bool(m["finite"])
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_a_finite_loss_with_a_non_finite_gradient_norm_leaves_the_state_untouched():
    """A logit column of 1e30: the loss (about 1e29) is finite, the squares in the gradient's norm
    overflow to inf. The step must be skipped as for a non-finite loss."""
    tr = _trainer(batch_size=4)
    state = tr.init_state()
    state["params"]["lm_head"]["kernel"] = state["params"]["lm_head"]["kernel"].at[:, 3].set(1e30)
    before = jax.tree.map(np.asarray, state)
    after, m = tr.step_fn(state, tr.put_batch(_batches(1, 4)[0]))
    assert np.isfinite(float(m["loss"])) and not np.isfinite(float(m["grad_norm"])), m
    assert not bool(m["finite"])
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, np.asarray(b))


def _losses_at_unchanged_weights(grad_accum, batch_size, rows, steps):
    """The losses of `steps` steps on `rows` with dropout on, at learning rate 1e-30 and no
    router-bias updates: the weights stay put, so the losses differ only through the dropout masks."""
    config = TINY.replace(router_bias_update_rate=0.0)
    tr = Trainer(config, OptimConfig(lr=1e-30, warmup_steps=0, total_steps=10, weight_decay=0.0),
                 shd.make_mesh(None, jax.devices()[:1]), batch_size=batch_size, grad_accum=grad_accum,
                 seq_len=rows.shape[-1], dropout=True)
    state = tr.init_state()
    p0 = jax.tree.map(np.asarray, state["params"])
    losses = []
    for _ in range(steps):
        state, m = tr.step_fn(state, tr.put_batch(rows))
        losses.append(float(m["loss"]))
    for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(state["params"])):
        np.testing.assert_allclose(a, np.asarray(b), rtol=0, atol=1e-25)
    return losses


def test_each_step_and_each_micro_batch_draws_its_own_dropout_mask():
    """The step and the micro-batch go into the dropout key: the same batch twice, or the same rows
    as both micro-batches of a step, are not dropped alike (one test of the masks themselves runs a
    single step without accumulation)."""
    x = np.random.RandomState(0).randint(0, TINY.vocab_size, (2, 16))
    # the same batch twice, at unchanged weights: another mask each step
    one = _losses_at_unchanged_weights(1, 2, x, steps=2)
    assert abs(one[0] - one[1]) > 2e-5, one
    # the same rows as both micro-batches of one step: its loss is the mean over two masks, not
    # the loss of one micro-batch under the first step's mask
    two = _losses_at_unchanged_weights(2, 2, np.concatenate([x, x]), steps=1)
    assert abs(two[0] - one[0]) > 2e-5, (two, one)


def test_exact_resume_through_a_checkpoint(tmp_path):
    batches = _batches(6, 4, seed=2)
    tr = _trainer(batch_size=4, lr=1e-3, warmup=2, steps=6)
    straight, _ = _run(tr, batches)
    first, _ = _run(tr, batches[:3])
    mngr = ckpt_lib.manager(tmp_path / "ck")
    ckpt_lib.save(mngr, 3, weights={"params": first["params"], "router_bias": first["router_bias"]},
                  train_state={"opt_state": first["opt_state"], "step": first["step"], "rng": first["rng"]},
                  config=TINY)
    mngr.wait_until_finished()
    del first
    from jaxllm.loop import restore_train_state

    tr2 = _trainer(batch_size=4, lr=1e-3, warmup=2, steps=6)  # a new process would build a new trainer
    other = dataclasses.replace(TINY, num_hidden_layers=TINY.num_hidden_layers + 1)  # refused before anything is read
    with pytest.raises(ValueError, match=rf"^--ckpt-dir {tmp_path / 'ck'} holds a checkpoint of another model "
                                         r"\(differs in num_hidden_layers; it holds the tiny preset\): resume without"):
        restore_train_state(ckpt_lib.manager(tmp_path / "ck"), tr2, other)
    restored, _, _ = restore_train_state(ckpt_lib.manager(tmp_path / "ck"), tr2, TINY)
    resumed, _ = _run(tr2, batches[3:], state=restored)
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _assert_same_state(a, b):
    """Float arrays within float32 rounding of each other (rel_err 1e-5), the rest (step, counts,
    rng) equal."""
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        if jnp.issubdtype(x.dtype, jnp.floating) and x.size > 1:
            assert rel_err(x, y) <= 1e-5, jax.tree_util.keystr(path)
        else:
            np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def test_a_checkpoint_resumes_under_another_mesh_as_an_uninterrupted_run(tmp_path):
    """The run's defaults (dropout on) with accumulation: two steps on fsdp=8 equal two steps on
    one device (the whole state: weights, Adam's moments, router biases); a checkpoint saved on
    fsdp=8 resumed on one device, and one saved on one device resumed on data=2,fsdp=4, continue
    exactly as the one-device run that never stopped."""
    from jaxllm.loop import restore_train_state

    batches = _batches(4, 16, seed=4)
    kw = dict(batch_size=8, grad_accum=2, lr=1e-3, warmup=1, steps=4, dropout=True)

    def save(state, where):
        mngr = ckpt_lib.manager(where)
        ckpt_lib.save(mngr, 2, weights={"params": state["params"], "router_bias": state["router_bias"]},
                      train_state={"opt_state": state["opt_state"], "step": state["step"], "rng": state["rng"]},
                      config=TINY)
        mngr.wait_until_finished()
        mngr.close()

    def resume(where, tr):
        state, _, _ = restore_train_state(ckpt_lib.manager(where, read_only=True), tr, TINY)
        return _run(tr, batches[2:], state=state)

    one = _trainer(**kw)
    state, l_first = _run(one, batches[:2])
    save(state, tmp_path / "one")
    first = jax.tree.map(np.asarray, state)
    straight, l_rest = _run(one, batches[2:], state=state)
    straight = jax.tree.map(np.asarray, straight)

    fsdp8 = _trainer("fsdp=8", n_devices=8, **kw)
    state8, l8 = _run(fsdp8, batches[:2])
    assert "fsdp" in tuple(state8["params"]["token_embeddings"].sharding.spec)
    np.testing.assert_allclose(l8, l_first, rtol=1e-5)
    _assert_same_state(state8, first)
    save(state8, tmp_path / "fsdp8")

    for where, tr in ((tmp_path / "fsdp8", _trainer(**kw)),
                      (tmp_path / "one", _trainer("data=2,fsdp=4", n_devices=8, **kw))):
        resumed, losses = resume(where, tr)
        np.testing.assert_allclose(losses, l_rest, rtol=1e-5, err_msg=str(where))
        _assert_same_state(resumed, straight)


def test_a_checkpoint_saved_sharded_on_8_devices_loads_in_a_one_device_process(tmp_path):
    """`jaxllm.load` (generate.py, and its PyTorch path) restores onto one device whatever mesh
    saved the weights: left to Orbax's saved shardings, a process with fewer devices failed with
    "Topology mismatch detected". The converter (flax_to_torch.py) reads the same weights there."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    tr = _trainer("fsdp=8", n_devices=8, batch_size=8)
    state = tr.init_state()
    assert "fsdp" in tuple(state["params"]["lm_head"]["kernel"].sharding.spec)
    mngr = ckpt_lib.manager(tmp_path / "ck")
    ckpt_lib.save(mngr, 1, weights={"params": state["params"], "router_bias": state["router_bias"]}, config=TINY)
    mngr.wait_until_finished()
    mngr.close()
    # jaxllm.load, and the converter's reader (numpy targets) too
    code = ("import sys, numpy as np, jax, jaxllm; from jaxllm.weights import get_weights; "
            "from convert.hf_export import read_flax_checkpoint; "
            "m, _ = jaxllm.load(sys.argv[1]); assert jax.device_count() == 1; w = get_weights(m); "
            "flat = read_flax_checkpoint(sys.argv[1], None)[3]; assert flat.keys() == w.keys(); "
            "[np.testing.assert_array_equal(flat[k], v) for k, v in w.items()]; "
            "np.savez(sys.argv[2], **{'/'.join(k): v for k, v in w.items()})")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ck"), str(tmp_path / "w.npz")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = np.load(tmp_path / "w.npz")
    saved = jax.tree_util.tree_flatten_with_path({"params": state["params"], "router_bias": state["router_bias"]})[0]
    assert len(loaded.files) == len(saved)
    for path, v in saved:
        np.testing.assert_array_equal(loaded["/".join(str(k.key) for k in path[1:])], np.asarray(v))


def test_the_routed_experts_per_shard_compile_in_bfloat16_on_several_cpu_devices():
    """`map_batch_shards` in bfloat16 under a mesh with axes of size 1 (`data=2`: fsdp and expert
    1): left to the partitioner, those axes put a sharding constraint into the psum of the `whole`
    arrays' gradient, and XLA's CPU compiler aborted the process on it ("Invalid binary instruction
    opcode copy"): `--dtype bfloat16` on several CPU devices never trained. In a subprocess: an
    abort would take pytest with it."""
    import os
    import subprocess
    import sys
    import textwrap

    from conftest import ROOT

    code = textwrap.dedent("""
        import jax, jax.numpy as jnp
        from jaxllm import sharding as shd
        mesh = shd.make_mesh("data=2", jax.devices()[:2])
        x = jnp.ones((4, 8), jnp.bfloat16)
        def loss(w):
            with shd.tracing_on(mesh):
                y = shd.map_batch_shards(lambda x, w: x @ w, (x,), (w.astype(jnp.bfloat16),))
            return jnp.sum(y.astype(jnp.float32))
        print(float(jnp.sum(jax.jit(jax.grad(loss))(jnp.ones((8, 8), jnp.float32)))))
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout) == 256.0  # d(sum(x @ w))/dw = 4 per element, 64 elements


def test_datasheet_peaks_by_device_kind():
    """MFU's datasheet peak: known chips by name (an NVIDIA GPU's float32 is TF32, as XLA runs it),
    None for CPUs and unknown chips."""
    from types import SimpleNamespace

    from jaxllm.flops import device_peak_flops

    h200 = SimpleNamespace(device_kind="NVIDIA H200")
    assert device_peak_flops(h200, "bfloat16") == 989e12 and device_peak_flops(h200, "float32") == 494.7e12
    assert device_peak_flops(SimpleNamespace(device_kind="TPU v5 lite"), "float32") == 197e12  # bf16's
    assert device_peak_flops(SimpleNamespace(device_kind="TPU v5p")) == 459e12
    assert device_peak_flops(SimpleNamespace(device_kind="cpu")) is None
    # The longest name that matches wins: an L40S is not an L4, a PCIe H100 not the SXM part.
    for kind, want in (("NVIDIA L40S", 362e12), ("NVIDIA L40", 181e12), ("NVIDIA L4", 121e12),
                       ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12), ("NVIDIA H100 80GB HBM3", 989e12),
                       ("NVIDIA H200 NVL", 835e12)):
        assert device_peak_flops(SimpleNamespace(device_kind=kind)) == want, kind


def test_analytic_flops_terms_that_the_cost_analysis_cannot_tell_apart():
    """What the XLA comparison below (one layer, one sequence length, 10%) cannot see: the
    `lm_head` counts once, not per layer; causal attention grows by half the keys per added token;
    the MLA projections are twice the attention kernels' sizes; training is 3 forward passes."""
    from jaxllm import checkpoint
    from jaxllm.flops import training_flops_per_token

    one, two = forward_flops_per_token(TINY, 64), forward_flops_per_token(TINY.replace(num_hidden_layers=4), 64)
    assert TINY.num_hidden_layers == 2
    assert one["lm_head"] == two["lm_head"] == 2 * TINY.hidden_size * TINY.vocab_size
    for term in ("mla_projections", "attention", "router", "experts"):
        assert two[term] == 2 * one[term], term
    per_key = 2 * TINY.num_attention_heads * (TINY.qk_head_dim + TINY.v_head_dim)  # q.k and p.v per key
    assert forward_flops_per_token(TINY, 128)["attention"] - one["attention"] == TINY.num_hidden_layers * per_key * 32
    params = checkpoint.split_weights(create_model(TINY, abstract=True))["params"]
    kernels = params["decoder_layers"]["self_attn"]
    sizes = [int(np.prod(kernels[name]["kernel"].shape)) for name in kernels]  # [layers, in, out] each
    assert len(sizes) == 8 and one["mla_projections"] == 2 * sum(sizes)
    assert training_flops_per_token(TINY, 64) == 3 * one["total"]


def test_analytic_flops_within_10_percent_of_xla_cost_analysis():
    # XLA's cost analysis counts a while-loop body once, so the layer scan is measured on a
    # one-layer model (same structure), with the loop-free "gather" dispatch (the CPU default's
    # loop over active blocks would be counted as one block); small blocks keep its padding small.
    config = TINY.replace(num_hidden_layers=1)
    model = create_model(config, moe_impl="gather", moe_block=8)
    B, T = 8, 64
    from flax import nnx

    graphdef, state = nnx.split(model)

    def fwd(state, ids):
        return nnx.merge(graphdef, state)(ids)

    ids = jnp.zeros((B, T), jnp.int32)
    cost = jax.jit(fwd).lower(state, ids).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    analytic = forward_flops_per_token(config, T)["total"] * B * T
    assert abs(cost["flops"] - analytic) / analytic <= 0.10, (cost["flops"], analytic)


def test_a_mesh_axis_that_would_split_nothing_is_refused():
    from jaxllm.sharding import check_mesh, make_mesh

    mesh = make_mesh("fsdp=8", jax.devices()[:8])
    check_mesh(mesh, hidden_size=64, num_routed_experts=7)
    with pytest.raises(ValueError, match="fsdp=8 does not divide hidden_size 12"):
        check_mesh(mesh, hidden_size=12, num_routed_experts=7)
    check_mesh(make_mesh("expert=7", jax.devices()[:7]), hidden_size=12, num_routed_experts=7)
    with pytest.raises(ValueError, match="expert=4 does not divide the 7 routed experts"):
        check_mesh(make_mesh("expert=4,data=2", jax.devices()[:8]), hidden_size=64, num_routed_experts=7)


def test_a_mesh_that_does_not_fit_the_physical_axes_may_split_them_before_falling_back(monkeypatch):
    """On a TPU slice JAX's `create_device_mesh` refuses a mesh axis that spans physical axes (fsdp=8
    on a 4 x 4 torus) unless asked to split them: `make_mesh` asks before it falls back to plain
    device order (which ignores the torus); where neither works, device order."""
    from jax.experimental import mesh_utils

    from jaxllm.sharding import make_mesh

    devices = jax.devices()[:8]
    calls = []

    def create(shape, devs, *, allow_split_physical_axes=False, **kw):
        calls.append(allow_split_physical_axes)
        if not allow_split_physical_axes:
            raise NotImplementedError("Failed to find assignment for logical_axis_index 1 of size 8")
        return np.asarray(devs[::-1]).reshape(shape)

    monkeypatch.setattr(mesh_utils, "create_device_mesh", create)
    mesh = make_mesh("fsdp=8", devices)
    assert calls == [False, True] and list(mesh.devices.ravel()) == devices[::-1]

    def refuse(shape, devs, **kw):
        raise NotImplementedError("no assignment")

    monkeypatch.setattr(mesh_utils, "create_device_mesh", refuse)
    assert list(make_mesh("fsdp=8", devices).devices.ravel()) == devices


def test_fsdp_splits_every_large_parameter_evenly_at_seed_973m():
    """Per-device parameter memory under fsdp=8 is an eighth of the whole (the embedding tables, the
    49,152-token lm_head and the routed experts included): only norms and biases stay whole. The
    attention's up-projections from the latent used to stay whole on every device (+8%)."""
    config = LLMConfig.from_preset("seed-973m")
    model = create_model(config, abstract=True)
    mesh = shd.make_mesh("fsdp=8", jax.devices()[:8])
    from flax import nnx

    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model)))[0]
    shardings = jax.tree.leaves(nnx.to_pure_dict(shd.state_shardings(nnx.state(model), mesh)))
    total = per_device = 0
    for (path, x), s in zip(flat, shardings):
        whole = x.size * x.dtype.itemsize
        part = int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
        total, per_device = total + whole, per_device + part
        if whole > 2**20:
            assert part * 8 == whole, f"{jax.tree_util.keystr(path)} {x.shape}: {s.spec}"
    print(f"{total / 2**20:.1f} MiB of parameters, {per_device / 2**20:.1f} MiB per device")
    assert per_device <= 1.001 * total / 8


@DISPATCHES
def test_expert_parallel_mesh_on_7_devices_equals_one_device(impl, block, monkeypatch):
    grouped = _spy_grouped(monkeypatch)
    batches = _batches(2, 7, seed=3)
    s1, l1 = _run(_trainer(batch_size=7, moe_impl=impl, moe_block=block), batches)
    tr7 = _trainer("expert=7", n_devices=7, batch_size=7, moe_impl=impl, moe_block=block)
    s7, l7 = _run(tr7, batches)
    assert bool(grouped) == (impl == "sparse")
    spec = s7["params"]["decoder_layers"]["mlp"]["routed_experts"]["gate_proj"].sharding.spec
    assert tuple(spec)[1] == "expert"  # [layers, experts, in, out]: one routed expert per device
    np.testing.assert_allclose(l7, l1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s7["params"]), jax.tree.leaves(s1["params"])):
        assert rel_err(a, b) <= 1e-5


def test_clip_by_global_norm_matches_optax():
    from jaxllm.train import clip_by_global_norm
    import optax

    g = {"a": jnp.arange(12.0).reshape(3, 4) - 5.0, "b": {"c": jnp.linspace(-2.0, 3.0, 7)}}
    for max_norm in (0.5, 1e3):  # clipping and not
        ours, _ = clip_by_global_norm(max_norm).update(g, optax.EmptyState())
        ref, _ = optax.clip_by_global_norm(max_norm).update(g, optax.EmptyState())
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


def test_clip_norm_zero_means_no_clipping_and_a_negative_one_is_refused():
    """As the Hugging Face Trainer's `max_grad_norm`: 0 turns clipping off (it must not zero the
    gradient), and a negative norm is an error rather than gradient ascent."""
    from jaxllm.train import OptimConfig, make_optimizer
    import optax

    params = {"w": jnp.ones((3, 4))}
    g = {"w": jnp.full((3, 4), 50.0)}  # norm 173
    oc = dict(lr=1e-2, warmup_steps=0, total_steps=10, weight_decay=0.0)
    tx, _ = make_optimizer(OptimConfig(clip_norm=0.0, **oc))
    ours, state = tx.update(g, tx.init(params), params)
    ref_tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-2, 0, 10, 0.0), weight_decay=0.0)
    ref_tx = optax.chain(optax.identity(), ref_tx)
    ref, ref_state = ref_tx.update(g, ref_tx.init(params), params)
    np.testing.assert_allclose(np.asarray(ours["w"]), np.asarray(ref["w"]), rtol=1e-6)
    # Adam's first update is about -lr * sign(g) whatever the gradient's scale: its moments show
    # the gradient it was given (0.1 * 50, not 0.1 * 50 / 173 as clipped to 1).
    for moment in ("mu", "nu"):
        mine, theirs = optax.tree_utils.tree_get(state, moment), optax.tree_utils.tree_get(ref_state, moment)
        np.testing.assert_allclose(np.asarray(mine["w"]), np.asarray(theirs["w"]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(optax.tree_utils.tree_get(state, "mu")["w"]), 5.0, rtol=1e-6)
    for field in ("clip_norm", "weight_decay"):
        with pytest.raises(ValueError, match=f"{field} must be non-negative"):
            OptimConfig(**{**oc, field: -1.0})


def test_step_temporary_memory_is_about_one_gradient():
    """With a batch too small to matter, the step's temporaries are the gradients: the optimizer
    updates the donated state in place (no second gradient-sized buffer for the clipped gradient,
    no copies of the old state for the non-finite guard)."""

    config = dataclasses.replace(TINY, intermediate_size=512, num_hidden_layers=3)
    mesh = shd.make_mesh(None, jax.devices()[:1])
    tr = Trainer(config, OptimConfig(lr=1e-3, warmup_steps=0, total_steps=10), mesh, batch_size=1,
                 seq_len=8, dropout=False, moe_impl="dense")  # dense: no 128-row expert blocks
    state = tr.abstract_state()
    batch = jax.ShapeDtypeStruct((1, 1, 8), jnp.int32, sharding=tr.batch_sharding)
    mem = tr.step_fn.lower(state, batch).compile().memory_analysis()
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state["params"]))
    print(f"params {param_bytes / 2**20:.2f} MiB, step temporaries {mem.temp_size_in_bytes / 2**20:.2f} MiB")
    assert mem.temp_size_in_bytes < 2.0 * param_bytes  # 1.63x here; 2.33x with optax's clip and a where guard


def _step_flops_per_device(tr) -> float:
    state = tr.abstract_state()
    batch = jax.ShapeDtypeStruct((tr.grad_accum, tr.batch_size, SEQ), jnp.int32,
                                 sharding=tr.put_batch(np.zeros((tr.batch_size, SEQ), np.int32)).sharding)
    cost = tr.step_fn.lower(state, batch).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


@pytest.fixture(scope="module")
def one_device_share_flops():
    """The FLOPs of one device's step on its share (2 rows) of the meshes' 8-row batch: compiled
    once for both meshes."""
    return _step_flops_per_device(_trainer(batch_size=2, moe_impl="gather"))


@pytest.mark.parametrize("mesh_spec", ["data=4", "data=2,fsdp=2"])
def test_each_batch_shard_routes_only_its_own_tokens(mesh_spec, one_device_share_flops):
    """Under a mesh, a device's step does about the work of one device's share of the batch. The
    routed experts used to sort the whole step's tokens at once, so that every device ran the
    experts on all of them (at data=4 four times its share)."""
    one = one_device_share_flops
    four = _step_flops_per_device(_trainer(mesh_spec, n_devices=4, batch_size=8, moe_impl="gather"))
    print(f"{mesh_spec}: {four / one:.3f} x one device's share")
    assert four / one < 1.15


def test_scan_unroll_setting_reaches_the_trainers_model(monkeypatch):
    """`train_jax.py --scan-unroll N` sets the run's `scan_unroll`, and `loop.run` builds its Trainer
    (hence the model) with it."""
    import importlib.util
    import pathlib

    from jaxllm import loop

    path = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "train_jax.py"
    spec = importlib.util.spec_from_file_location("train_jax_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    _, rc = script.parse_args(["--preset", "tiny", "--scan-unroll", "3", "--steps", "1"])
    assert rc.scan_unroll == 3 and script.parse_args([])[1].scan_unroll is None
    seen = {}

    class Stop(Exception):
        pass

    def fake_trainer(*args, **kw):
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(loop, "Trainer", fake_trainer)
    with pytest.raises(Stop):
        loop.run(rc)
    assert seen["scan_unroll"] == 3
    model = create_model(LLMConfig.from_preset("tiny"), abstract=True, scan_unroll=3)
    assert model.scan_unroll == 3


def test_a_resume_names_the_settings_it_changes():
    """Checkpoints record the settings that shape training (`recorded_settings`, as JSON); a resume
    names those it changes in one note (another --steps reshapes the schedule), and says nothing
    when none changed or the checkpoint recorded none (written before they were recorded)."""
    import json

    from jaxllm.recipes import RunConfig, changed_settings, recorded_settings

    rc = RunConfig()
    recorded = json.loads(json.dumps(recorded_settings(rc)))
    assert changed_settings(recorded, rc) is None and changed_settings(None, rc) is None
    assert changed_settings({}, dataclasses.replace(rc, lr=5.0)) is None
    assert changed_settings({"lr": rc.lr}, rc) is None  # settings it did not record are not "the default"
    assert changed_settings(recorded, dataclasses.replace(rc, remat="full")) == (
        "note: resumed with other settings than the checkpoint's: --remat full (was the default)")
    other = dataclasses.replace(rc, lr=2e-4, steps=600, mesh="fsdp=-1", prompts=("x",), save_every=7, dropout=False)
    assert changed_settings(recorded, other) == ("note: resumed with other settings than the checkpoint's: --lr "
                                                 "0.0002 (was 0.001), --steps 600 (was 300), --mesh fsdp=-1 (was the "
                                                 "default), dropout off (was on)")


def test_a_resume_compares_the_settings_as_the_run_resolved_them():
    """The mesh, --remat and --scan-unroll are recorded and compared as the run resolved them
    (`loop.settings_in_use`), not as typed: the same mesh spelled in another order, or a flag
    giving what the default is, is no change; the default mesh on 8 devices after 1 is one. Of a
    checkpoint that recorded these as None (saved before), nothing is said."""
    import json

    from jaxllm.loop import known_settings, settings_in_use
    from jaxllm.recipes import RunConfig, changed_settings, recorded_settings

    config, rc, devices = LLMConfig.from_preset("tiny"), RunConfig(preset="tiny"), jax.devices()
    assert len(devices) == 8 and config.num_hidden_layers <= 8

    def used(mesh=None, devices=devices, **kw):
        return settings_in_use(dataclasses.replace(rc, mesh=mesh, **kw), shd.make_mesh(mesh, devices), config)

    def note(was, now):
        return changed_settings(known_settings(json.loads(json.dumps(recorded_settings(was)))), now)

    assert used("fsdp=4,data=2").mesh == used("data=2,fsdp=-1").mesh == "data=2,fsdp=4"
    assert note(used("fsdp=4,data=2"), used("data=2,fsdp=4")) is None  # (was: "--mesh data=2,fsdp=4 (was fsdp=4,data=2)")
    assert used(devices=devices[:1]).mesh == "data=1"
    assert note(used(devices=devices[:1]), used()) == (
        "note: resumed with other settings than the checkpoint's: --mesh data=8 (was data=1)")  # (was: no note)
    base = used()
    assert (base.remat, base.scan_unroll) == ("none", config.num_hidden_layers)  # tiny: no remat, fully unrolled
    assert note(base, used(remat="none", scan_unroll=config.num_hidden_layers)) is None  # (was: two changes)
    assert note(base, used(remat="full", scan_unroll=1)) == (
        "note: resumed with other settings than the checkpoint's: --scan-unroll 1 (was 2), --remat full (was none)")
    old = recorded_settings(rc)  # a checkpoint saved before: the defaults recorded as None
    assert note(rc, base) is None and changed_settings(old, base) is not None


def test_mesh_specs_give_every_axis_its_size():
    """`--mesh`: missing axes are 1, one `-1` axis takes the devices left over (after all the
    others, `data` included); no flag puts every device on `data`; sizes of 0, or two `-1`, are
    refused in one line."""
    assert shd.parse_mesh_spec(None, 8) == shd.parse_mesh_spec("", 8) == {"data": 8, "fsdp": 1, "expert": 1}
    assert shd.parse_mesh_spec("data=2,fsdp=-1", 8) == {"data": 2, "fsdp": 4, "expert": 1}
    assert shd.parse_mesh_spec("expert=7,data=-1", 14) == {"data": 2, "fsdp": 1, "expert": 7}
    with pytest.raises(ValueError, match="--mesh: size of axis 'data' must be positive, got 0"):
        shd.parse_mesh_spec("data=0,fsdp=-1", 8)
    with pytest.raises(ValueError, match="--mesh: only one axis may be -1"):
        shd.parse_mesh_spec("data=-1,fsdp=-1", 8)


def test_a_warm_up_as_long_as_the_run_or_longer_is_named_and_the_rate_never_reaches_lr():
    """Both trainers cut such a warm-up to the run (`lr_schedule`, and the Trainer's as JAX's):
    the rate rises over every step and never gets to --lr, which each trainer's start-up says. A
    warm-up of exactly --steps does the same (the last step trains at 4/5 of --lr here) and went
    unnamed; one step shorter reaches --lr at the last step."""

    from jaxllm.recipes import RunConfig, warmup_warning
    from jaxllm.train import lr_schedule

    rc = RunConfig(steps=5, warmup_steps=30, lr=1e-3)
    assert warmup_warning(rc).startswith("warning: --warmup-steps 30 is more than --steps 5")
    assert warmup_warning(dataclasses.replace(rc, warmup_steps=5)) == (
        "warning: --warmup-steps 5 is equal to --steps 5: the learning rate rises over all 5 steps, never reaching "
        "--lr 0.001 nor decaying")
    assert warmup_warning(dataclasses.replace(rc, warmup_steps=4)) is None
    for warmup in (30, 5):
        lrs = [float(lr_schedule(OptimConfig(lr=1e-3, warmup_steps=warmup, total_steps=5))(i)) for i in range(5)]
        assert lrs == sorted(lrs) and lrs[0] == 0.0 and lrs[-1] < 1e-3
    assert float(lr_schedule(OptimConfig(lr=1e-3, warmup_steps=4, total_steps=5))(4)) == pytest.approx(1e-3)


@pytest.mark.parametrize("field, value, why", [
    ("lr", "1e-3", "lr must be a finite number"), ("lr", float("inf"), "lr must be a finite number"),
    ("total_steps", 100.0, "total_steps must be an integer"), ("warmup_steps", True, "warmup_steps must be an integer"),
    ("b1", 1.0, r"b1 must be in \[0, 1\)"), ("b2", -0.1, r"b2 must be in \[0, 1\)"),
    ("eps", -1e-8, "eps must be non-negative"), ("eps", float("nan"), "eps must be a finite number"),
    ("weight_decay", None, "weight_decay must be a finite number")])
def test_optim_config_refuses_a_value_adamw_cannot_train_with_naming_the_field(field, value, why):
    """A string learning rate failed in a comparison's TypeError, b1 = 1 (Adam's first moment
    never moves) or an infinite learning rate trained to NaN; each is now refused by name. NumPy
    numbers (a value read from an array) are numbers."""
    import numpy as np

    from jaxllm.train import OptimConfig

    with pytest.raises(ValueError, match=why):
        OptimConfig(**{field: value})
    OptimConfig(lr=np.float32(1e-3), total_steps=np.int64(10), warmup_steps=np.int32(0), b1=np.float64(0.0), eps=0)
