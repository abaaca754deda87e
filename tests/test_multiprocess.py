"""Several processes on 127.0.0.1 stand in for several hosts (jax.distributed + gloo)."""

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT

WORKER = ROOT / "tests" / "mp_worker.py"
pytestmark = pytest.mark.timeout(600)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["PYTHONPATH"] = str(ROOT)
    return env


def test_only_a_launcher_of_several_processes_starts_jax_distributed():
    from jaxllm.distributed import cluster_has_several_processes as several

    srun = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    assert not several({})
    assert not several({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"})  # a bare salloc shell: no step
    assert several({**srun, "SLURM_NTASKS": "2"}) and not several({**srun, "SLURM_NTASKS": "1"})
    assert several({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "4"})
    assert not several({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "1"})
    assert several({"TPU_WORKER_HOSTNAMES": "h0,h1"}) and not several({"TPU_WORKER_HOSTNAMES": "localhost"})
    assert several({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    assert not several({"COORDINATOR_ADDRESS": "10.0.0.1:1234"})  # (not JAX's: it would not find a coordinator)


def test_jax_coordinator_address_alone_is_refused_naming_it_and_the_flags(tmp_path):
    """JAX's coordinator variable with no cluster to give the number of processes ended the start
    in JAX's "Number of processes must be defined.", which named neither the variable nor a flag."""
    env = {**_env(), "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{free_port()}"}
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_jax.py"), "--preset", "tiny", "--steps", "1",
                        "--ckpt-dir", str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr[-3000:]
    assert r.stderr.startswith(f"train_jax.py: error: JAX_COORDINATOR_ADDRESS is set ({env['JAX_COORDINATOR_ADDRESS']})") \
        and "give --coordinator, --num-processes and --process-id, or unset it" in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()


def test_sigterm_after_jax_distributed_starts_is_not_swallowed_by_jax_s_preemption_service():
    """JAX's preemption service (on by default with `jax.distributed`) catches SIGTERM: one that
    came after `maybe_initialize` and before the training loop's handler was swallowed ("SIGTERM
    caught" in JAX's log) and the run trained on. Without a handler of ours, SIGTERM now ends it.
    The service itself stays: Orbax 0.11 (the floor) asks it at every save, unguarded, and turned
    off (`jax_enable_preemption_service`, which JAX 0.8 does not have) it raised a RuntimeError."""
    code = (f"import os, signal, time; from jaxllm.distributed import maybe_initialize; "
            f"from jax.experimental.multihost_utils import reached_preemption_sync_point; "
            f"maybe_initialize('127.0.0.1:{free_port()}', 1, 0); print('sync point', reached_preemption_sync_point(1)); "
            "os.kill(os.getpid(), signal.SIGTERM); time.sleep(10); print('trained on')")
    r = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=300)
    assert r.stdout.splitlines()[:1] == ["sync point False"], (r.stdout, r.stderr[-2000:])
    assert r.returncode == -15 and "trained on" not in r.stdout, (r.returncode, r.stdout, r.stderr[-2000:])


def test_two_processes_match_one_process(tmp_path):
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, str(WORKER), "--devices", "2", "--coordinator", f"127.0.0.1:{port}",
         "--num-processes", "2", "--process-id", str(i), "--out", str(tmp_path / f"two{i}.npz")],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    single = subprocess.run([sys.executable, str(WORKER), "--devices", "4", "--out", str(tmp_path / "one.npz")],
                            env=_env(), capture_output=True, text=True, timeout=500)
    assert single.returncode == 0, single.stdout[-2000:] + single.stderr[-2000:]
    for p in procs:
        out, _ = p.communicate(timeout=500)
        assert p.returncode == 0, out[-3000:]
    two, one = np.load(tmp_path / "two0.npz"), np.load(tmp_path / "one.npz")
    print("2 processes x 2 devices:", two["losses"])
    print("1 process  x 4 devices:", one["losses"])
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5)
    assert set(two.files) == set(one.files)
    for name in one.files:
        if name != "losses":
            np.testing.assert_allclose(two[name], one[name], rtol=1e-5, atol=1e-7, err_msg=name)


TRAIN = str(ROOT / "scripts" / "train_jax.py")
CLI = ["--preset", "tiny", "--mesh", "data=2,fsdp=2", "--batch-size", "8", "--seq-len", "32", "--log-every", "1",
       "--max-new-tokens", "0", "--no-progress", "--heartbeat-timeout", "10"]


# How a process sees a checkpoint directory through a shared file system's stale cache: without its
# newest step (Orbax's manager lists the steps once, when it opens the directory). `python -c` this,
# then train_jax.py's path and flags.
STALE_LISTING = ("import runpy, sys, orbax.checkpoint as ocp; listed = ocp.CheckpointManager.all_steps; "
                 "ocp.CheckpointManager.all_steps = lambda self, read=False: sorted(listed(self, read))[:-1]; "
                 "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def _launch(n, devices, args, stale=()):
    """`n` train_jax.py processes of `devices` CPU devices each; those in `stale` see the checkpoint
    directory without its newest step (`STALE_LISTING`)."""
    env = _env()
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    port = free_port()
    extra = lambda i: ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n), "--process-id", str(i)] \
        if n > 1 else []
    python = lambda i: [sys.executable, "-c", STALE_LISTING] if i in stale else [sys.executable]
    return [subprocess.Popen([*python(i), TRAIN, *CLI, *args, *extra(i)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for i in range(n)]


def _wait_all(procs, timeout=500):
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        assert p.returncode == 0, out[-3000:]
        outs.append(out)
    return outs


# The --steps of `_two_training`: far enough ahead of the two steps it waits for that a signal or a
# kill then comes before the end, and the --steps that the runs resuming it are given too: the train
# step's program depends on --steps (the learning-rate schedule), so they load the one it compiled.
TWO_TRAINING_STEPS = 60


def _two_training(ckpt):
    """Two processes of a run of `TWO_TRAINING_STEPS` into `ckpt`, returned once they have logged two steps."""
    p0, p1 = _launch(2, 2, ["--steps", str(TWO_TRAINING_STEPS), "--save-every", "1000", "--ckpt-dir", str(ckpt)])
    t0 = time.time()
    while time.time() - t0 < 400:
        if (ckpt / "metrics.jsonl").exists() and sum(1 for _ in open(ckpt / "metrics.jsonl")) >= 2:
            break
        assert p0.poll() is None and p1.poll() is None, "training ended early"
        time.sleep(0.2)
    return p0, p1


def test_killing_one_process_makes_the_other_fail_quickly(tmp_path):
    ckpt = tmp_path / "ck"
    p0, p1 = _two_training(ckpt)
    p1.kill()
    killed = time.time()
    out, _ = p0.communicate(timeout=120)  # bounded: the test fails instead of hanging
    waited = time.time() - killed
    print(f"survivor exited with status {p0.returncode} {waited:.1f} s after the kill")
    assert p0.returncode != 0
    # Either our one-line error (the survivor was inside a collective when its peer vanished) or
    # JAX's own (its coordination service saw the missed heartbeats first and ends the process).
    assert "did another process die?" in out or "another task died" in out, out[-2000:]
    assert waited < 60


def test_a_peer_lost_during_a_save_is_not_bad_input():
    """A process killed while the others save: Orbax's barrier raises the failed collective as a
    ValueError ("UNKNOWN: Gloo AllGather failed: ... Connection closed by peer"), which
    train_jax.py reported as bad input (exit status 2). With several processes it is a
    RuntimeError naming the save (a lost peer, exit status 1); with one, as raised."""
    from jaxllm.loop import peer_failures_as_runtime_errors

    failed = ValueError("UNKNOWN: Gloo AllGather failed: Connection closed by peer [127.0.0.1]:28051")
    with pytest.raises(RuntimeError, match=r"^saving step 15: UNKNOWN: Gloo AllGather failed") as e:
        with peer_failures_as_runtime_errors("saving step 15", 2):
            raise failed
    assert e.value.__cause__ is failed
    with pytest.raises(ValueError, match="Gloo"):
        with peer_failures_as_runtime_errors("saving step 15", 1):
            raise failed
    with peer_failures_as_runtime_errors("saving step 15", 2):
        pass


def test_data_that_fails_on_one_process_ends_every_process_with_exit_2(tmp_path):
    """One document: process 1's share of the data is empty. Process 0 could open its share and
    would wait in the next collective for process 1 (until JAX's shutdown barrier gave up after
    minutes and aborted both): the processes agree first, and both exit 2 with one line."""
    import json

    (tmp_path / "one.jsonl").write_text(json.dumps({"text": "just one document here"}) + "\n")
    started = time.time()
    procs = _launch(2, 2, ["--steps", "2", "--ckpt-dir", str(tmp_path / "ck"), "--dataset", str(tmp_path / "one.jsonl")])
    outs = [p.communicate(timeout=300)[0] for p in procs]
    took = time.time() - started
    print(f"both ended in {took:.1f} s:", *[o.strip().splitlines()[-1] for o in outs], sep="\n")
    assert [p.returncode for p in procs] == [2, 2], [o[-2000:] for o in outs]
    assert "train_jax.py: error: opening the data failed in process(es) 1 of 2" in outs[0], outs[0][-2000:]
    assert "train_jax.py: error:" in outs[1] and "process 1 of 2" in outs[1], outs[1][-2000:]
    assert took < 120
    assert not any(d.isdigit() for d in os.listdir(tmp_path / "ck")) if (tmp_path / "ck").exists() else True


def _two_processes(code: str, heartbeat_timeout: int):
    """Runs `code` (Python source: it gets the scripts folder, then train_jax.py's arguments) as
    processes 0 and 1 of a 2-process train_jax.py run of one device each: the processes (ended),
    their stderr and the seconds both took."""
    env = _env()
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    port = free_port()
    started = time.time()
    procs = [subprocess.Popen([sys.executable, "-c", code, str(ROOT / "scripts"), "--coordinator", f"127.0.0.1:{port}",
                               "--num-processes", "2", "--process-id", str(i),
                               "--heartbeat-timeout", str(heartbeat_timeout), "--compile-cache", "none"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        errs = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    return procs, errs, time.time() - started


def _two_train_jax_processes_whose_run_raises(error: str):
    """train_jax.py as 2 processes whose `run` raises `error` (Python source), process i after 3 i
    seconds: each process's return code and stderr lines (Gloo's aside)."""
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); import train_jax, jax, jaxllm.loop\n"
            "def run(rc):\n"
            "    time.sleep(3 * jax.process_index())\n"
            f"    raise {error}\n"
            "jaxllm.loop.run = run\n"
            "sys.exit(train_jax.main(sys.argv[2:]))")
    procs, errs, took = _two_processes(code, heartbeat_timeout=20)
    print(f"both ended in {took:.1f} s")
    return [(p.returncode, [line for line in err.splitlines() if not line.startswith("[Gloo]")], err)
            for p, err in zip(procs, errs)]


def test_an_error_every_process_meets_at_its_own_time_ends_each_with_its_line_and_exit_2():
    """A bad flag (here: an invalid mesh, as `run` raises it) is met by every process, but not at
    the same moment. Process 0 used to leave at once and take JAX's coordination service with it:
    process 1, 3 s behind, was aborted (SIGABRT, a stack trace, no error line of its own)."""
    for status, lines, err in _two_train_jax_processes_whose_run_raises(
            "ValueError('--mesh: expert=2 does not divide the 7 routed experts')"):
        assert status == 2, err[-2000:]
        assert lines == ["train_jax.py: error: --mesh: expert=2 does not divide the 7 routed experts"], err[-2000:]


def test_a_non_finite_loss_ends_every_process_with_its_line_and_exit_1():
    """A non-finite loss is met by every process at the same step (the loss is global), though not
    at the same moment. Each says what happened (not "did another process die?") and exits 1;
    process 0 leaving first used to take the coordination service away from the others (SIGABRT)."""
    results = _two_train_jax_processes_whose_run_raises("jaxllm.loop.NonFiniteError('non-finite loss at step 7')")
    for i, (status, lines, err) in enumerate(results):
        assert status == 1, err[-2000:]
        assert lines == [f"train_jax.py: error in process {i} of 2: non-finite loss at step 7"], err[-2000:]


def test_an_unexpected_error_in_one_process_ends_both_within_the_heartbeat_timeout():
    """An exception of no kind train_jax.py handles (a bug, a MemoryError) in process 1 while
    process 0 waits for it in a collective, as inside a step: process 1 printed its traceback,
    then sat in JAX's shutdown barrier for 300 s, its heartbeats keeping process 0 waiting too,
    and both were aborted (status 134). Now process 1 says which process failed and leaves after
    at most --heartbeat-timeout seconds (10 here), and process 0 fails soon after."""
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); import train_jax, jax, jaxllm.loop\n"
            "def run(rc):\n"
            "    import numpy as np\n"
            "    from jax.sharding import NamedSharding, PartitionSpec\n"
            "    mesh = jax.make_mesh((2,), ('data',))\n"
            "    x = jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec('data')), np.ones(1), (2,))\n"
            "    step = jax.jit(lambda a: a.sum())\n"
            "    float(step(x))  # a first step together (gloo connects)\n"
            "    if jax.process_index() == 1:\n"
            "        raise TypeError('a bug in process 1')\n"
            "    float(step(x))  # the next one, waiting for process 1\n"
            "jaxllm.loop.run = run\n"
            "sys.exit(train_jax.main(sys.argv[2:]))")
    procs, outs, took = _two_processes(code, heartbeat_timeout=10)
    print(f"both ended in {took:.1f} s, status {[p.returncode for p in procs]}")
    assert procs[1].returncode == 1, outs[1][-2000:]
    assert "TypeError: a bug in process 1" in outs[1], outs[1][-2000:]
    assert "train_jax.py: error in process 1 of 2: TypeError: a bug in process 1" in outs[1], outs[1][-2000:]
    assert procs[0].returncode != 0, outs[0][-2000:]
    assert took < 90


def test_sigterm_to_one_process_stops_both_then_the_run_resumes_as_two_and_as_one_process(tmp_path):
    """The save is collective: a signal to one process must stop every process at the same step
    (each would otherwise wait for the others inside a different collective). The checkpoint then
    resumes with two processes (the data position kept) and with one (the stream restarts)."""
    import shutil

    ckpt = tmp_path / "ck"
    p0, p1 = _two_training(ckpt)
    p1.terminate()  # SIGTERM to process 1 only
    outs = [p.communicate(timeout=120)[0] for p in (p0, p1)]
    for p, out in zip((p0, p1), outs):
        assert p.returncode == 128 + 15, out[-3000:]
    (step,) = [int(d) for d in os.listdir(ckpt) if d.isdigit()]
    assert 2 <= step < TWO_TRAINING_STEPS
    assert f"a signal to process 1: saved a checkpoint at step {step}" in outs[0], outs[0][-2000:]

    shutil.copytree(ckpt, tmp_path / "ck1")
    end = ["--steps", str(TWO_TRAINING_STEPS), "--save-every", "1000"]
    outs = _wait_all(_launch(2, 2, [*end, "--ckpt-dir", str(ckpt)]))
    assert "resuming from" in outs[0] and f"at step {step}" in outs[0]
    assert "restarts" not in outs[0]  # same process count: the data position is kept
    (out,) = _wait_all(_launch(1, 4, [*end, "--ckpt-dir", str(tmp_path / "ck1")]))
    assert "resuming from" in out and f"at step {step}" in out
    assert "data stream restarts" in out
    for d in (ckpt, tmp_path / "ck1"):
        assert max(int(x) for x in os.listdir(d) if x.isdigit()) == TWO_TRAINING_STEPS


# A run of 2 processes (2 devices each, `fsdp` across them: each process writes its own shards) with
# checkpoints at steps 1, 2 and 3. Every launch that uses it is the same command (`FSDP_RUN`): the
# train step's program depends on --steps (the learning-rate schedule), so they all compile one.
FSDP_RUN = ["--mesh", "fsdp=4", "--steps", "3", "--save-every", "1"]


@pytest.fixture(scope="module")
def fsdp_checkpoints(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("fsdp") / "ck"
    _wait_all(_launch(2, 2, [*FSDP_RUN, "--ckpt-dir", str(ckpt)]))
    assert sorted(d for d in os.listdir(ckpt) if d.isdigit()) == ["1", "2", "3"]
    return ckpt


def test_a_checkpoint_unreadable_in_one_process_only_is_set_aside_and_the_same_command_resumes_before_it(
        tmp_path, fsdp_checkpoints):
    """With `fsdp` across the processes each one reads only its own shards: a damaged file of
    process 1's fails its restore alone, while process 0 waits for it inside Orbax's restore.
    Going on to an earlier step alone used to mismatch every collective after it (Gloo aborted
    both, no error line, and every rerun again). Now process 1 sets the step aside and ends with
    exit 2 and one line; process 0 fails too (its restore's collective is broken: an error, or JAX
    ends it); the same command then resumes from the step before it."""
    import shutil

    ckpt = tmp_path / "ck"
    shutil.copytree(fsdp_checkpoints, ckpt)
    run = lambda: _launch(2, 2, [*FSDP_RUN, "--ckpt-dir", str(ckpt)])
    damaged = list((ckpt / "3" / "train_state" / "ocdbt.process_1" / "d").iterdir())
    assert damaged
    for f in damaged:
        f.write_bytes(f.read_bytes()[:3])
    procs = run()
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert procs[1].returncode == 2 and procs[0].returncode != 0, [o[-2000:] for o in outs]
    assert "train_jax.py: error: checkpoint step 3 could not be restored in process 1 of 2" in outs[1], outs[1][-2000:]
    assert "run the same command again to resume from the step before it" in outs[1]
    assert len([d for d in os.listdir(ckpt) if d.startswith("3.unreadable-")]) == 1
    outs = _wait_all(run())
    assert "resuming from" in outs[0] and "at step 2" in outs[0], outs[0][-2000:]
    assert sorted(d for d in os.listdir(ckpt) if d.isdigit()) == ["1", "2", "3"]
    assert "done: step 3" in outs[0], outs[0][-2000:]  # (step 3 trained again, not only listed)


def test_processes_that_list_other_checkpoints_end_with_exit_2_and_change_nothing(tmp_path, fsdp_checkpoints):
    """Process 1 lists the shared --ckpt-dir without its newest step (a file system's stale cache).
    Each process used to resume the newest step it listed, here process 0 step 3 and process 1 step 2,
    and both then waited inside Orbax's restore (still running when killed after 300 s; the
    heartbeat sees no process die). Now they compare what they list before reading any of it:
    both end with one line and status 2, and nothing in the directory changes."""
    import shutil

    ckpt = tmp_path / "ck"
    shutil.copytree(fsdp_checkpoints, ckpt)
    files = lambda: sorted((str(p.relative_to(ckpt)), p.stat().st_mtime_ns, p.stat().st_size)
                           for p in ckpt.rglob("*") if p.is_file())
    before = files()
    procs = _launch(2, 2, [*FSDP_RUN, "--ckpt-dir", str(ckpt)], stale=[1])
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [2, 2], [o[-2000:] for o in outs]
    lines = [[ln for ln in out.splitlines() if ln.startswith("train_jax.py: error:")] for out in outs]
    assert [len(ls) for ls in lines] == [1, 1], outs
    head = f"--ckpt-dir {ckpt}: process(es) 1 of 2 found other checkpoints there than process 0"
    assert head + " (this process: steps [1, 2, 3])" in lines[0][0], lines
    assert head + " (this process: steps [1, 2])" in lines[1][0], lines
    assert "Traceback" not in outs[0] + outs[1]
    assert files() == before


def _launch_in(homes, args, cli=CLI):
    """Two processes (2 devices each), each in its own working directory (as on two hosts with
    their own disks), given the same `cli` and `args`; their outputs once they have ended."""
    env = _env()
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    port = free_port()
    procs = [subprocess.Popen([sys.executable, TRAIN, *cli, *args, "--coordinator", f"127.0.0.1:{port}",
                               "--num-processes", "2", "--process-id", str(i)],
                              cwd=home, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i, home in enumerate(homes)]
    return procs, [p.communicate(timeout=300)[0] for p in procs]


def test_a_ckpt_dir_the_processes_do_not_share_is_refused_before_training(tmp_path):
    """Each process in its own working directory, `--ckpt-dir ck` relative: as on hosts with their
    own disks. Orbax's first save used to wait 10 minutes for directories that only process 0
    had made, then fail; now both end at start-up with one line and status 2, and nothing is left."""
    homes = [tmp_path / "hostA", tmp_path / "hostB"]
    for home in homes:
        home.mkdir()
    procs, outs = _launch_in(homes, ["--steps", "2", "--ckpt-dir", "ck"])
    assert [p.returncode for p in procs] == [2, 2], [o[-2000:] for o in outs]
    assert "is not one directory shared by all processes: process(es) 1 of 2 do not see" in outs[0], outs[0][-2000:]
    assert all(os.listdir(home) == [] for home in homes)


def test_a_file_missing_on_one_host_ends_every_process_with_exit_2(tmp_path):
    """--config, --tokenizer or --init-from (with a preset, or without: the model it holds) given as
    a path that process 1's host lacks (relative to each process's working directory), or an
    --init-from directory that is empty there (a mount point with nothing mounted), also when
    the model is --init-from's because --ckpt-dir's steps cannot be read. Process 1
    exited 2 with its line while process 0 went on to its next collective (an Orbax read of
    --init-from, say) and failed there as if process 1 had died (exit 1, "did another process
    die?") after waiting for it. Now each is checked in every process before the next collective:
    both end with one line and status 2, and nothing is written."""
    from helpers import word_tokenizer
    from jaxllm.config import LLMConfig

    homes = [tmp_path / "host0", tmp_path / "host1"]
    for home in homes:
        home.mkdir()
    (homes[0] / "cfg.json").write_text(LLMConfig.from_preset("tiny").to_json_string())
    word_tokenizer().save_pretrained(homes[0] / "tok")
    (homes[0] / "init" / "1").mkdir(parents=True)  # (process 0 finds a step directory; it does not get to read it)
    (homes[0] / "mount" / "1").mkdir(parents=True)
    (homes[1] / "mount").mkdir()  # (as a mount point where nothing is mounted)
    no_preset = [a for a in CLI if a not in ("--preset", "tiny")]
    damaged = tmp_path / "damaged"  # (a --ckpt-dir whose only step cannot be read: the model is --init-from's)
    (damaged / "1").mkdir(parents=True)
    for ckpt, cli, flag, value, what, error in (
            (None, CLI, "--config", "cfg.json", "reading the model's settings", "config file not found: cfg.json"),
            (None, CLI, "--tokenizer", "./tok", "checking the tokenizer and the dataset", "tokenizer ./tok: no such file"),
            (None, CLI, "--init-from", "init", "checking --init-from", f"--init-from {homes[1] / 'init'}: not a checkpoint"),
            (None, CLI, "--init-from", "mount", "checking --init-from", f"no checkpoint found in {homes[1] / 'mount'}"),
            (None, no_preset, "--init-from", "init", "reading the model's settings", f"--init-from {homes[1] / 'init'}: not"),
            (damaged, no_preset, "--init-from", "init", "checking --init-from", f"--init-from {homes[1] / 'init'}: not")):
        ckpt = ckpt or tmp_path / f"ck{flag}{value}{len(cli)}"
        before = sorted(ckpt.rglob("*")) if ckpt.exists() else None
        procs, outs = _launch_in(homes, ["--steps", "2", "--ckpt-dir", str(ckpt), flag, value], cli)
        assert [p.returncode for p in procs] == [2, 2], (flag, [o[-2000:] for o in outs])
        lines = [[ln for ln in out.splitlines() if ln.startswith("train_jax.py:")] for out in outs]
        assert lines[0] == [f"train_jax.py: error: {what} failed in process(es) 1 of 2 (see their error)"], outs[0][-2000:]
        assert len(lines[1]) == 1 and error in lines[1][0], outs[1][-2000:]
        assert (sorted(ckpt.rglob("*")) if ckpt.exists() else None) == before


def test_a_ckpt_dir_another_run_holds_ends_every_process_with_exit_2(tmp_path):
    """Another run training in --ckpt-dir (here: its lock, held by this test): process 0, which
    takes the lock, and the other processes all stop at start-up with one line and status 2."""
    from jaxllm import stopping

    ckpt = tmp_path / "ck"
    ckpt.mkdir()
    other = stopping.hold(str(ckpt))
    try:
        procs = _launch(2, 2, ["--steps", "2", "--ckpt-dir", str(ckpt)])
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        os.close(other)
    assert [p.returncode for p in procs] == [2, 2], [o[-2000:] for o in outs]
    assert f"train_jax.py: error: --ckpt-dir {ckpt} is in use by another training run" in outs[0], outs[0][-2000:]
    assert "train_jax.py: error: locking --ckpt-dir failed in process(es) 0 of 2" in outs[1], outs[1][-2000:]
    assert os.listdir(ckpt) == []


def test_processes_given_other_settings_end_with_exit_2_naming_them(tmp_path):
    """Each process applies its own settings: another --lr in one trained its replica apart (both
    exited 0), another --steps hung the other at the end (minutes, then SIGABRT), another
    --ckpt-dir hung the first save. Now compared at start-up: one line each, status 2."""
    env = _env()
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    port = free_port()
    given = [["--ckpt-dir", str(tmp_path / "a")], ["--ckpt-dir", str(tmp_path / "b"), "--lr", "0.1"]]
    procs = [subprocess.Popen([sys.executable, TRAIN, *CLI, "--steps", "2", *given[i], "--coordinator",
                               f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [2, 2], [o[-2000:] for o in outs]
    assert "train_jax.py: error: --lr, --ckpt-dir differ from process 0's" in outs[1], outs[1][-2000:]
    assert "comparing the processes' settings failed in process(es) 1 of 2" in outs[0], outs[0][-2000:]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_launch_local_starts_n_processes_with_the_interpreter_it_is_given(tmp_path):
    """scripts/launch_local.sh runs `$PYTHON` (else `python`, else `python3`): a hard-coded `python3`
    was another interpreter than the project's where a virtual environment's is only `python`.
    Here a stand-in interpreter records how each process was started; a bad N is refused."""
    log = tmp_path / "started"
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\nif [ "$1" = "-c" ]; then echo 12345; exit 0; fi\necho "$@" >> "$STARTED"\n')
    fake.chmod(0o755)
    script = str(ROOT / "scripts" / "launch_local.sh")
    env = {**os.environ, "PYTHON": str(fake), "STARTED": str(log), "LOG_DIR": str(tmp_path)}
    r = subprocess.run(["bash", script, "2", "--preset", "tiny"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    started = sorted(log.read_text().splitlines())
    where = ROOT / "scripts" / "train_jax.py"
    assert started == [f"{where} --coordinator 127.0.0.1:12345 --num-processes 2 --process-id 0 --preset tiny",
                       f"{where} --coordinator 127.0.0.1:12345 --num-processes 2 --process-id 1 --no-progress "
                       "--preset tiny"], started
    r = subprocess.run(["bash", script, "two"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("usage: "), r.stderr


def test_launch_local_reached_through_a_link_starts_its_own_checkout_s_train_jax_py(tmp_path):
    """As the Python scripts: launch_local.sh linked elsewhere (~/bin, say) looked for train_jax.py
    beside the link, and each process failed to start (python: can't open file .../bin/train_jax.py)."""
    log = tmp_path / "started"
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\nif [ "$1" = "-c" ]; then echo 12345; exit 0; fi\n'
                    'test -f "$1" || exit 9\necho "$1" >> "$STARTED"\n')
    fake.chmod(0o755)
    (tmp_path / "bin").mkdir()
    link = tmp_path / "bin" / "launch_local.sh"
    link.symlink_to(ROOT / "scripts" / "launch_local.sh")
    env = {**os.environ, "PYTHON": str(fake), "STARTED": str(log), "LOG_DIR": str(tmp_path)}
    r = subprocess.run(["bash", str(link), "2"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, (r.returncode, r.stderr)
    assert log.read_text().splitlines() == [str(ROOT / "scripts" / "train_jax.py")] * 2, log.read_text()


def test_launch_local_gives_the_processes_no_standard_input(tmp_path):
    """Started under job control (`set -m`, for Ctrl-C), the processes kept the launcher's standard
    input, where background jobs without it read /dev/null: from a terminal, a read by one (in a
    process group of its own) would stop it (SIGTTIN) and the launcher would wait for ever. The
    stand-in interpreter reports what it reads from the input the launcher was given."""
    log = tmp_path / "read"
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\nif [ "$1" = "-c" ]; then echo 12345; exit 0; fi\n'
                    'if read -r line; then echo "read $line" >> "$READ"; else echo "nothing" >> "$READ"; fi\n')
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "READ": str(log), "LOG_DIR": str(tmp_path)}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "launch_local.sh"), "2"], env=env, input="typed\n" * 2,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert log.read_text().splitlines() == ["nothing", "nothing"], log.read_text()


def test_launch_local_refuses_a_log_dir_it_cannot_write_before_starting_any_process(tmp_path):
    """A `LOG_DIR` that does not exist: process 1's log could not be opened, so it never started,
    and process 0 waited --init-timeout seconds (300) for it, then JAX aborted it (status 134, a C++
    stack trace). Now the launcher says so in one line, status 2, and starts nothing."""
    log = tmp_path / "started"
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\nif [ "$1" = "-c" ]; then echo 12345; exit 0; fi\necho "$@" >> "$STARTED"\n')
    fake.chmod(0o755)
    missing = tmp_path / "no-such-dir"
    env = {**os.environ, "PYTHON": str(fake), "STARTED": str(log), "LOG_DIR": str(missing)}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "launch_local.sh"), "2", "--preset", "tiny"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stderr.strip().splitlines() == [
        f"{ROOT / 'scripts' / 'launch_local.sh'}: cannot write {missing}/train_jax.process1.log (LOG_DIR must be a "
        "writable directory); nothing started"], r.stderr
    assert not log.exists() and not missing.exists()


@pytest.mark.parametrize("sig, to_group", [("SIGINT", True), ("SIGINT", False), ("SIGTERM", False)])
def test_launch_local_forwards_a_ctrl_c_or_sigterm_once_to_each_process_and_exits_with_their_status(tmp_path, sig,
                                                                                                    to_group):
    """Ctrl-C on the launcher (SIGINT to its terminal's process group) must reach each train_jax.py
    as Ctrl-C reaches one run alone: one SIGINT, with Python's handler in place from the start (one
    line and status 130 at start-up, else a save before the next step). Started as background jobs
    of a script without job control, the processes ignored SIGINT, and the launcher sent them
    SIGTERM: at start-up they ended silently with status 143, or trained on (JAX's preemption
    notifier takes SIGTERM once it has started). A stand-in interpreter reports what it got; the
    launcher's status is theirs (7 here), not that of its own interrupted `wait`."""
    report = tmp_path / "report"
    report.mkdir()
    fake = tmp_path / "python"
    fake.write_text(f"#!{sys.executable}\n" + """import os, signal, sys, time
if sys.argv[1] == "-c":
    print(12345)
    sys.exit(0)
where = os.path.join(os.environ["REPORT"], sys.argv[sys.argv.index("--process-id") + 1])
ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
def got(signum, frame):
    with open(where, "a") as f:
        f.write(f"{signal.Signals(signum).name} {'ignored' if ignored else 'handled'}\\n")
    time.sleep(0.3)  # (a second signal would be reported too)
    os._exit(7)
for s in (signal.SIGINT, signal.SIGTERM):
    signal.signal(s, got)
open(where + ".ready", "w").close()
time.sleep(60)
""")
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "REPORT": str(report), "LOG_DIR": str(tmp_path)}

    # As a terminal's shell starts it, with SIGINT at its default (this test may run where SIGINT is
    # ignored: a background job); through exec, as a preexec_fn would make JAX warn of os.fork().
    as_a_terminal_shell_starts_it = [sys.executable, "-c", "import os, signal, sys; "
                                     "signal.signal(signal.SIGINT, signal.SIG_DFL); os.execvp('bash', ['bash', *sys.argv[1:]])"]
    p = subprocess.Popen([*as_a_terminal_shell_starts_it, str(ROOT / "scripts" / "launch_local.sh"), "2", "--preset",
                          "tiny"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not all((report / f"{i}.ready").exists() for i in "01") and time.monotonic() < deadline:
            time.sleep(0.05)
        (os.killpg if to_group else os.kill)(p.pid, getattr(signal, sig))
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    got = {i: (report / i).read_text() if (report / i).exists() else "" for i in "01"}
    assert got == {"0": f"{sig} handled\n", "1": f"{sig} handled\n"}, got
    assert (p.returncode, out, err) == (7, "", ""), (p.returncode, out, err)


def test_launch_local_exits_with_the_status_of_a_process_that_ends_as_the_signal_reaches_the_launcher(tmp_path):
    """A signal caught by the launcher during its `wait` ends that `wait` early (128 + the signal);
    when the process it waited for ended at that moment (within about 100 µs), bash lost the
    process's status and the launcher exited with 143 (5 of 20 launches here), or 255 when it asked
    `wait` again. Here process 0 sends SIGTERM to the launcher and ends at once with status 7 (the
    launcher forwards SIGTERM to process 1, which ends with 7 too): every launch must report 7."""
    fake = tmp_path / "python"
    fake.write_text(f"#!{sys.executable} -S\n" + """import os, signal, sys, time
if sys.argv[1] == "-c":
    print(12345)
    sys.exit(0)
for s in (signal.SIGINT, signal.SIGTERM):
    signal.signal(s, lambda *_: os._exit(7))
time.sleep(0.1)  # the launcher is waiting for process 0 by then
if sys.argv[sys.argv.index("--process-id") + 1] == "0":
    os.kill(os.getppid(), signal.SIGTERM)
    os._exit(7)
time.sleep(60)
""")
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "LOG_DIR": str(tmp_path)}
    statuses = [subprocess.run(["bash", str(ROOT / "scripts" / "launch_local.sh"), "2"], env=env, capture_output=True,
                               timeout=30).returncode for _ in range(20)]
    assert statuses == [7] * 20, statuses
