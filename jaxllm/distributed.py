"""Multi-host start-up through JAX's own runtime (`jax.distributed`)."""

from __future__ import annotations

import os

import jax

_SLURM_STEP = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def cluster_has_several_processes(env=os.environ) -> bool:
    """Whether a launcher's environment, as `jax.distributed.initialize()` reads it, describes
    more than one process: JAX's coordinator variables, a Slurm step of several tasks (inside
    `srun`; a bare `salloc` shell has the job's variables but no step), an Open MPI job of several
    ranks, a Cloud TPU slice of several hosts."""
    def count(key: str) -> int:
        return int(env[key]) if env.get(key, "").strip().isdigit() else 0

    if env.get("JAX_COORDINATOR_ADDRESS") or env.get("COORDINATOR_ADDRESS"):
        return True
    if all(k in env for k in _SLURM_STEP):
        return count("SLURM_NTASKS") > 1
    if "OMPI_MCA_orte_hnp_uri" in env:
        return count("OMPI_COMM_WORLD_SIZE") > 1
    return len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]) > 1


def maybe_initialize(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, heartbeat_timeout: int = 100) -> bool:
    """Call `jax.distributed.initialize` when flags or a cluster environment ask for several
    processes; on CPU, collectives go through gloo. A process that stops answering for
    `heartbeat_timeout` seconds makes the others fail with an error instead of hanging.
    Returns whether it initialised."""
    given = [coordinator, num_processes, process_id]
    if any(v is not None for v in given) and not all(v is not None for v in given):
        raise ValueError("--coordinator, --num-processes and --process-id go together")
    if coordinator is None and not cluster_has_several_processes():
        return False
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"--num-processes must be positive, got {num_processes}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id,
                               heartbeat_timeout_seconds=heartbeat_timeout)
    return True
