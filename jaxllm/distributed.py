"""Multi-host start-up through JAX's own runtime (`jax.distributed`)."""

from __future__ import annotations

import os

import jax

_ENV_HINTS = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES",
              "OMPI_COMM_WORLD_SIZE")


def maybe_initialize(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, heartbeat_timeout: int = 100) -> bool:
    """Call `jax.distributed.initialize` when flags or a cluster environment ask for several
    processes; on CPU, collectives go through gloo. A process that stops answering for
    `heartbeat_timeout` seconds makes the others fail with an error instead of hanging.
    Returns whether it initialised."""
    given = [coordinator, num_processes, process_id]
    if any(v is not None for v in given) and not all(v is not None for v in given):
        raise ValueError("--coordinator, --num-processes and --process-id go together")
    if coordinator is None and not any(os.environ.get(k) for k in _ENV_HINTS):
        return False
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"--num-processes must be positive, got {num_processes}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id,
                               heartbeat_timeout_seconds=heartbeat_timeout)
    return True
