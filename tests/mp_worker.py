"""One process of a multi-process training test (run by tests/test_multiprocess.py, never by
pytest directly). Trains `tiny` on synthetic global batches that every process can compute, so a
2-process and a 1-process run see exactly the same data; process 0 writes losses and the final
parameters to --out."""

import argparse
import os
import sys

p = argparse.ArgumentParser()
p.add_argument("--devices", type=int, required=True)
p.add_argument("--coordinator")
p.add_argument("--num-processes", type=int)
p.add_argument("--process-id", type=int)
p.add_argument("--mesh", default="data=2,fsdp=2")
p.add_argument("--steps", type=int, default=5)
p.add_argument("--out", required=True)
args = p.parse_args()
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
from jaxllm.distributed import maybe_initialize  # noqa: E402

maybe_initialize(args.coordinator, args.num_processes, args.process_id, heartbeat_timeout=20)

from jax.experimental import multihost_utils  # noqa: E402

from jaxllm import sharding as shd  # noqa: E402
from jaxllm.config import LLMConfig  # noqa: E402
from jaxllm.train import OptimConfig, Trainer  # noqa: E402

config = LLMConfig.from_preset("tiny")
mesh = shd.make_mesh(args.mesh)
# The layer loop (not the unrolled layers that `tiny` gets by default): with the unrolled program,
# gloo's cross-process all-reduce and the in-process one sum in orders that leave one
# near-cancelling embedding gradient differing in its last bits, and Adam's normalisation turns
# that into a 4e-5 relative parameter difference after 5 steps (losses still agree to 1e-7).
# Unrolled and looped layers are tested equal in tests/test_model.py.
# Adam's eps 1e-6 (the trainer's default is 1e-8): on an Intel CPU with AVX-512 (2026-11-29) the two
# all-reduces still left one embedding gradient of the looped program differing in its last bits, and
# with eps 1e-8 Adam's m / (sqrt(v) + eps) turned that near-zero gradient into a 1.6e-5 relative
# difference of one of 32,768 weights ([489, 21]: 3.7e-7). A larger eps bounds that amplification of
# rounding without hiding a real difference: a wrong all-reduce changes gradients by whole shards.
trainer = Trainer(config, OptimConfig(lr=3e-3, warmup_steps=0, total_steps=args.steps, eps=1e-6), mesh,
                  batch_size=8, grad_accum=1, seq_len=32, dropout=False, scan_unroll=1)
state = trainer.init_state()
losses = []
for step in range(args.steps):
    global_batch = np.random.RandomState(step).randint(0, config.vocab_size, (1, 8, 32)).astype(np.int32)
    batch = jax.make_array_from_callback(global_batch.shape, trainer.batch_sharding, lambda idx: global_batch[idx])
    state, m = trainer.step_fn(state, batch)
    losses.append(float(m["loss"]))
params = multihost_utils.process_allgather(state["params"], tiled=True)
if jax.process_index() == 0:
    flat = {"/".join(str(k.key) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    np.savez(args.out, losses=np.array(losses), **flat)
    print("losses", losses, flush=True)
