"""Multi-host start-up through JAX's own runtime (`jax.distributed`)."""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import NoReturn

import jax
import numpy as np

_SLURM_STEP = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def cluster_has_several_processes(env=os.environ) -> bool:
    """Whether a launcher's environment, as `jax.distributed.initialize()` reads it, describes
    more than one process: JAX's coordinator variable (`JAX_COORDINATOR_ADDRESS`; JAX reads no bare
    `COORDINATOR_ADDRESS`, which another tool's may be), a Slurm step of several tasks (inside
    `srun`; a bare `salloc` shell has the job's variables but no step), an Open MPI job of several
    ranks, a Cloud TPU slice of several hosts."""
    def count(key: str) -> int:
        return int(env[key]) if env.get(key, "").strip().isdigit() else 0

    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if all(k in env for k in _SLURM_STEP):
        return count("SLURM_NTASKS") > 1
    if "OMPI_MCA_orte_hnp_uri" in env:
        return count("OMPI_COMM_WORLD_SIZE") > 1
    return len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]) > 1


# How long a process waits for the others at a point they should all reach (`all_reach`,
# `exit_together`): 30 s, or `--heartbeat-timeout` if shorter (`maybe_initialize`).
AGREE_TIMEOUT_S = 30


def maybe_initialize(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, heartbeat_timeout: int = 100, init_timeout: int = 300) -> bool:
    """Call `jax.distributed.initialize` when flags or a cluster environment ask for several
    processes; on CPU, collectives go through gloo. A process that stops answering for
    `heartbeat_timeout` seconds makes the others fail with an error instead of hanging. When not
    every process has connected within `init_timeout` seconds, JAX aborts this process (SIGABRT,
    exit status 134: it does not raise). Returns whether it initialised."""
    given = [coordinator, num_processes, process_id]
    if any(v is not None for v in given) and not all(v is not None for v in given):
        raise ValueError("--coordinator, --num-processes and --process-id go together")
    if coordinator is None and not cluster_has_several_processes():
        return False
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"--num-processes must be positive, got {num_processes}")
    if coordinator is not None:
        check_coordinator(coordinator)
    if heartbeat_timeout < 1:
        raise ValueError(f"--heartbeat-timeout must be at least 1 second, got {heartbeat_timeout}")
    if init_timeout < 1:
        raise ValueError(f"--init-timeout must be at least 1 second, got {init_timeout}")
    global AGREE_TIMEOUT_S
    AGREE_TIMEOUT_S = min(AGREE_TIMEOUT_S, heartbeat_timeout)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # JAX's preemption service catches SIGTERM (for `reached_preemption_sync_point`): one that came
    # between this and the training loop's own handler was swallowed and the run trained on. The
    # trainers agree on a stop themselves (`jaxllm.stopping`): SIGTERM's handler is put back as it
    # was. (Not `jax_enable_preemption_service` off: JAX 0.8 has no such option, and Orbax 0.11
    # asks the service at every save, which raises without it.)
    on_main_thread = threading.current_thread() is threading.main_thread()
    sigterm = signal.getsignal(signal.SIGTERM) if on_main_thread else None
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id,
                                   heartbeat_timeout_seconds=heartbeat_timeout, initialization_timeout=init_timeout)
        if sigterm is not None:
            signal.signal(signal.SIGTERM, sigterm)
    except ValueError as e:  # JAX_COORDINATOR_ADDRESS alone: JAX said "Number of processes must be defined."
        if coordinator is None and "must be defined" in str(e):
            raise ValueError(f"JAX_COORDINATOR_ADDRESS is set ({os.environ.get('JAX_COORDINATOR_ADDRESS')}) but no "
                             "cluster gives the number of processes and this one's index: give --coordinator, "
                             "--num-processes and --process-id, or unset it") from None
        raise
    return True


def check_coordinator(address: str) -> None:
    """ValueError unless `address` is HOST:PORT with a port in 1-65535 (JAX would raise an
    IndexError, or wait for a coordinator that cannot exist)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host.strip("[]") or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"--coordinator must be HOST:PORT (a port in 1-65535), got {address!r}")


def processes_where(flag: bool) -> list[int]:
    """The indices of the processes where `flag` holds. Collective (one small all-gather; every
    process must call it); in a one-process run, [0] or []."""
    if jax.process_count() == 1:
        return [0] if flag else []
    from jax.experimental import multihost_utils

    flags = np.asarray(multihost_utils.process_allgather(np.int8(bool(flag)))).reshape(-1)
    return [int(i) for i in np.flatnonzero(flags)]


def check_shared_directory(path: str, flag: str = "--ckpt-dir", wait_s: float = 10.0) -> None:
    """ValueError in every process unless all of them see `path` as process 0 does
    (`jaxllm.stopping.check_shared_directory`). Collective."""
    if jax.process_count() == 1:
        return
    from jaxllm import stopping

    stopping.check_shared_directory(path, flag, index=jax.process_index(), count=jax.process_count(), wait_s=wait_s,
                                    broadcast=_from_process_0, where=processes_where)


def check_same_checkpoints(steps, path: str) -> None:
    """ValueError in every process unless all of them list the checkpoint `steps` of `path` that
    process 0 lists (`jaxllm.stopping.check_same_checkpoints`). Collective."""
    if jax.process_count() == 1:
        return
    from jaxllm import stopping

    found = f"steps {sorted(steps)}" if steps else "no checkpoint"
    stopping.check_same_checkpoints(found, path, count=jax.process_count(), broadcast=_from_process_0,
                                    where=processes_where)


def _from_process_0(value: int) -> int:
    """Process 0's int32 `value`, in every process (collective)."""
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def check_same_settings(rc) -> None:
    """ValueError in every process unless all of them were given process 0's settings (a
    `jaxllm.recipes.RunConfig`; `recipes.setting_digests`). Collective."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    from jaxllm.recipes import differing_settings, setting_digests

    names, mine = setting_digests(rc)
    first = np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(mine, np.int32))).tolist()
    raise_if_any_failed(differing_settings(names, mine, first), "comparing the processes' settings")


def as_process_0_sees(value: bool) -> bool:
    """`value` as process 0 found it, in every process (collective); `value` itself in a one-process
    run. For a decision that takes collectives on one branch only: processes deciding by what each
    sees could part ways when the file system changes between their looks (another run making the
    directory), and then wait in different collectives."""
    return bool(_from_process_0(int(bool(value)))) if jax.process_count() > 1 else bool(value)


def raise_if_any_failed(error: Exception | None, what: str) -> None:
    """`error` where it happened, and a ValueError naming the failed processes everywhere else
    (`jaxllm.stopping.raise_where_failed`). Collective."""
    from jaxllm.stopping import raise_where_failed

    raise_where_failed(error, what, processes_where, jax.process_count())


def all_reach(name: str, timeout_s: float | None = None) -> bool:
    """Whether every process reaches the point `name` (unique within a run) within `timeout_s`
    seconds (default `AGREE_TIMEOUT_S`); True at once in a one-process run. A barrier of JAX's
    coordination service, not a device collective: it answers (False, after the timeout) while
    some process is held elsewhere, e.g. inside Orbax's restore waiting for this one."""
    if jax.process_count() == 1:
        return True
    from jax._src import distributed as jax_distributed

    try:
        jax_distributed.global_state.client.wait_at_barrier(
            f"jaxllm_{name}", int(1000 * (AGREE_TIMEOUT_S if timeout_s is None else timeout_s)))
    except Exception:  # noqa: BLE001 - a deadline exceeded: some process did not come
        return False
    return True


def exit_together(status: int, timeout_s: float | None = None) -> NoReturn:
    """End this process of a multi-process run with `status` after an error that every process
    meets alike (a bad flag or mesh, data that fails to open): wait up to `timeout_s` seconds
    (default `AGREE_TIMEOUT_S`) for
    the others to get here too, then shut JAX's distributed runtime down with them. Leaving at
    once, process 0 took the coordination service with it, and JAX aborted the processes still on
    their way to the same error (SIGABRT and a stack trace instead of their one line and `status`).
    When not every process comes (one is inside a collective, waiting for this one), this one
    leaves after `timeout_s` without the shutdown barrier, which would wait for it."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        if all_reach("exit_together", timeout_s):
            jax.distributed.shutdown()
    except Exception:  # noqa: BLE001 - leave anyway
        pass
    os._exit(status)
