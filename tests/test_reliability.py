"""Crashes cost at most the steps since the last checkpoint; preemption saves; bad input costs nothing."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import ROOT
from helpers import tree_listing, word_tokenizer

SCRIPT = str(ROOT / "scripts" / "train_jax.py")
TINY_RUN = ["--preset", "tiny", "--seq-len", "32", "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-3",
            "--warmup-steps", "2", "--log-every", "1", "--save-every", "1", "--keep", "3", "--max-new-tokens", "0",
            "--no-progress"]
pytestmark = pytest.mark.timeout(900)


def _env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one device, like a user's laptop
    env["PYTHONPATH"] = str(ROOT)
    return env


def _start(ckpt, steps, extra=()):
    return subprocess.Popen([sys.executable, SCRIPT, *TINY_RUN, "--steps", str(steps), "--ckpt-dir", str(ckpt), *extra],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _run(ckpt, steps, extra=()):
    p = _start(ckpt, steps, extra)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]
    return out


def _final_state(ckpt, step=None):
    """Every array of a checkpoint (the newest unless `step`): weights and optimizer state, as numpy."""
    mngr = ocp.CheckpointManager(str(ckpt), item_handlers={
        "params": ocp.StandardCheckpointHandler(), "train_state": ocp.StandardCheckpointHandler()})
    step = mngr.latest_step() if step is None else step
    restored = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(),
                                                          train_state=ocp.args.StandardRestore()))
    import jax

    leaves = jax.tree_util.tree_flatten_with_path({"params": restored["params"], "train": restored["train_state"]})[0]
    return step, {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}


def _steps(ckpt):
    return sorted(int(d) for d in os.listdir(ckpt) if d.isdigit())


def _tmp_dirs(ckpt):
    return [d for d in os.listdir(ckpt) if "tmp" in d] if os.path.isdir(ckpt) else []


def _assert_same(a, b):
    assert a[0] == b[0]
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        np.testing.assert_array_equal(a[1][k], b[1][k], err_msg=k)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted 8-step run keeping every checkpoint: the reference of the tests below."""
    ref = tmp_path_factory.mktemp("reference") / "ck"
    _run(ref, 8, ["--keep", "10"])
    return ref


@pytest.mark.slow
def test_kill_minus_9_at_several_moments_then_resume_ends_identical(tmp_path, reference):
    steps = 8
    reference = _final_state(reference, steps)

    ckpt = tmp_path / "killed"
    moments = []

    def kill_when(condition, label, limit=300):
        p = _start(ckpt, steps)
        t0 = time.time()
        while p.poll() is None and time.time() - t0 < limit:
            if condition():
                p.send_signal(signal.SIGKILL)
                p.wait()
                moments.append((label, _steps(ckpt), bool(_tmp_dirs(ckpt))))
                return True
            time.sleep(0.002)
        p.kill()
        p.wait()
        return False

    # 1. during start-up / compilation, before any checkpoint exists
    assert kill_when(lambda: os.path.exists(ckpt / "metrics.jsonl") or os.path.isdir(ckpt), "start-up")
    # 2. just after a checkpoint completed
    assert kill_when(lambda: len(_steps(ckpt)) >= 1 and max(_steps(ckpt)) >= 2, "after a save")
    # 3. in the middle of writing a checkpoint (Orbax's temporary directory exists)
    mid = kill_when(lambda: bool(_tmp_dirs(ckpt)), "mid-save")
    # 4. between saves, after more progress
    assert kill_when(lambda: _steps(ckpt) and max(_steps(ckpt)) >= 5, "later")
    out = _run(ckpt, steps)
    assert "resuming" in out
    for step in _steps(ckpt):  # no checkpoint left unreadable
        mngr = ocp.CheckpointManager(str(ckpt), item_handlers={"meta": ocp.JsonCheckpointHandler()})
        assert mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]["step"] == step
    _assert_same(_final_state(ckpt), reference)
    records = [json.loads(line) for line in open(ckpt / "metrics.jsonl")]
    assert [r["step"] for r in records] == sorted({r["step"] for r in records}), "each step logged once"
    print("kills:", moments, "mid-save caught:", mid)
    assert len(moments) == (4 if mid else 3)  # (a save cut off for certain: the test below)


@pytest.mark.slow
def test_a_save_cut_off_midway_is_passed_over_and_the_run_resumes_identical(tmp_path, reference):
    """What a kill during a save leaves, made for certain (the test above catches that moment only
    when its timing allows): steps 1-5, then step 6's temporary directory half written (files cut
    short) and metrics logged up to step 6. The same command resumes from step 5 and ends as the
    uninterrupted run."""
    import shutil

    ckpt = tmp_path / "ck"
    ckpt.mkdir()
    for step in range(1, 6):
        shutil.copytree(reference / str(step), ckpt / str(step))
    partial = ckpt / "6.orbax-checkpoint-tmp-1764400000000000"
    shutil.copytree(reference / "6", partial)
    cut = 0
    for root, _, files in os.walk(partial):
        for name in files:
            with open(os.path.join(root, name), "r+b") as f:
                f.truncate(os.path.getsize(os.path.join(root, name)) // 2)
            cut += 1
    assert cut
    lines = (reference / "metrics.jsonl").read_text().splitlines(keepends=True)
    (ckpt / "metrics.jsonl").write_text("".join(line for line in lines if json.loads(line)["step"] <= 6))
    out = _run(ckpt, 8)
    assert "resuming from" in out and "at step 5" in out, out[-2000:]
    assert _steps(ckpt) == [6, 7, 8]  # (--keep 3)
    _assert_same(_final_state(ckpt), _final_state(reference, 8))
    records = [json.loads(line) for line in open(ckpt / "metrics.jsonl")]
    assert [r["step"] for r in records] == list(range(1, 9))


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, reference, monkeypatch, capsys):
    # What the 8-step run of TINY_RUN leaves (--keep 3: steps 6-8), from the reference run in place
    # of a launch of its own (the test is about the resume, not about that run)
    ckpt = tmp_path / "ck"
    shutil.copytree(reference, ckpt, ignore=lambda d, names: [n for n in names if d == str(reference)
                                                               and n.isdigit() and int(n) < 6])
    assert _steps(ckpt) == [6, 7, 8]
    # Corrupt every data file of the last step's optimizer state.
    for root, _, files in os.walk(ckpt / "8" / "train_state"):
        for f in files:
            if f not in ("_METADATA", "_sharding", "manifest.ocdbt"):
                with open(os.path.join(root, f), "r+b") as fh:
                    fh.truncate(3)
    # and step 7's Orbax record (save times; not read to restore), which Orbax logged as two ERROR
    # lines holding the whole file
    (ckpt / "7" / "_CHECKPOINT_METADATA").write_text('{"init_timestamp_nsecs": 17')
    # Refused for bad input (a tokenizer that is not there): the unreadable step stays where it is
    # and is not said to be passed over (it was set aside and said before the checks); step 7's
    # damaged record is said when the directory is opened
    before = tree_listing(ckpt)
    p = _start(ckpt, 8, ["--tokenizer", str(tmp_path / "gone.json")])
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 2, out[-3000:]
    lines = out.strip().splitlines()
    assert lines[-1] == f"train_jax.py: error: tokenizer {tmp_path / 'gone.json'}: no such file or directory", out
    assert len(lines) == 2 and "_CHECKPOINT_METADATA cannot be read" in lines[0], out[-3000:]
    assert tree_listing(ckpt) == before
    # Refused when its data does not open, the last start-up check: the same (in this process)
    import importlib.util

    from jaxllm import data as data_lib
    from jaxllm import loop

    spec = importlib.util.spec_from_file_location("train_jax_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    # (8 simulated devices here: a batch they divide)
    _, rc = script.parse_args([*TINY_RUN, "--steps", "8", "--ckpt-dir", str(ckpt), "--batch-size", "8"])

    def no_data(*args, **kwargs):
        raise ValueError("cannot read the data")

    monkeypatch.setattr(data_lib, "PackedBatches", no_data)
    capsys.readouterr()
    with pytest.raises(ValueError, match="^cannot read the data$"):
        loop.run(rc)
    said = capsys.readouterr()
    assert "cannot use checkpoint step" not in said.err and "resuming" not in said.out + said.err, said
    assert tree_listing(ckpt) == before
    monkeypatch.undo()
    out = _run(ckpt, 8)
    assert "warning: cannot use checkpoint step 8" in out
    said = [line for line in out.splitlines() if "_CHECKPOINT_METADATA" in line]
    assert len(said) == 1 and said[0].startswith(f"warning: {ckpt / '7' / '_CHECKPOINT_METADATA'} cannot be read"), said
    assert "resuming from" in out and "at step 7" in out
    # One line says so: none of the tracebacks and TensorStore specs that Orbax's abandoned reads print
    warning = next(line for line in out.splitlines() if line.startswith("warning: cannot use checkpoint step 8"))
    assert "tensorstore_spec" not in warning, warning
    for noise in ("Traceback", "exception was never retrieved", "Exception ignored", "Event loop is closed", "absl"):
        assert noise not in out, out[-3000:]
    assert any(d.startswith("8.unreadable") for d in os.listdir(ckpt))  # set aside, not deleted
    _assert_same(_final_state(ckpt), _final_state(reference, 8))


@pytest.mark.slow
def test_sigterm_saves_and_the_next_start_resumes(tmp_path, reference):
    ckpt = tmp_path / "ck"
    p = _start(ckpt, 8, ["--save-every", "100"])  # only the SIGTERM save can produce a checkpoint
    t0 = time.time()
    while time.time() - t0 < 300:
        if (ckpt / "metrics.jsonl").exists() and sum(1 for _ in open(ckpt / "metrics.jsonl")) >= 2:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, out[-2000:]  # saved, but not finished
    assert "SIGTERM: saved a checkpoint at step" in out
    assert 1 <= max(_steps(ckpt)) < 8
    out = _run(ckpt, 8, ["--save-every", "100"])
    assert "resuming" in out
    _assert_same(_final_state(ckpt), _final_state(reference, 8))


def test_a_ctrl_c_before_training_ends_in_one_line_and_status_130(tmp_path):
    """Ctrl-C while a trainer starts (its imports, the model's creation), where no handler saves
    yet: one line and exit status 130, no traceback, nothing written. Both trainers and the
    converters end the same way (`cli.exit_with`); train_torch.py is timed here."""
    # pytest-xdist's workers ignore SIGINT, and a process that starts with it ignored never gets a
    # KeyboardInterrupt: the script runs as a shell starts it, with Python's own Ctrl-C handler
    # (not through a `preexec_fn`, which would fork this multithreaded process).
    script = str(ROOT / "scripts" / "train_torch.py")
    as_from_a_shell = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                       "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    p = subprocess.Popen([sys.executable, "-c", as_from_a_shell, script, "--preset", "tiny", "--steps", "2",
                          "--ckpt-dir", str(tmp_path / "ck")], env=_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)  # (its imports take several seconds)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, (out, err)
    assert err.strip() == "train_torch.py: interrupted: nothing more was saved", err
    assert not (tmp_path / "ck").exists()


def test_a_ctrl_c_during_an_import_is_raised_after_it(tmp_path, monkeypatch):
    """`stopping.hold_interrupts_in_imports` (on while a script's `main` runs): a Ctrl-C that
    arrives while a module is being imported (here: sent by the module's own code, then work
    after it), by an import statement or `importlib.import_module`, is held until the import ends,
    and raised there; the module imported whole. Off, it is raised inside the module, which is left
    half-imported. A handler that the module installs stays, and takes the held signal; one that
    chains to the handler it found there still reaches the script's."""
    import importlib
    import traceback

    from jaxllm.stopping import hold_interrupts_in_imports

    (tmp_path / "_interrupted_at_import.py").write_text(
        "import os, signal\nos.kill(os.getpid(), signal.SIGINT)\nsum(range(10**6))\nWHOLE = True\n")
    (tmp_path / "_own_handler.py").write_text(
        "import os, signal\nTAKEN = []\nos.kill(os.getpid(), signal.SIGINT)\n"
        "signal.signal(signal.SIGINT, lambda signum, frame: TAKEN.append(signum))\n")
    (tmp_path / "_chaining_handler.py").write_text(
        "import signal\nfound = signal.getsignal(signal.SIGINT)\nCHAINED = []\n"
        "signal.signal(signal.SIGINT, lambda signum, frame: (CHAINED.append(signum), found(signum, frame)))\n")

    def by_statement():
        import _interrupted_at_import  # noqa: F401

    monkeypatch.syspath_prepend(str(tmp_path))
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # (pytest-xdist's workers ignore it)
    try:
        for load, on in [(by_statement, True), (lambda: importlib.import_module("_interrupted_at_import"), True),
                         (by_statement, False)]:
            sys.modules.pop("_interrupted_at_import", None)
            hold_interrupts_in_imports(on)
            try:
                with pytest.raises(KeyboardInterrupt) as raised:
                    load()
            finally:
                hold_interrupts_in_imports(False)
            module_lines = [f.lineno for f in traceback.extract_tb(raised.value.__traceback__)
                            if f.filename.endswith("_interrupted_at_import.py")]
            if on:
                assert sys.modules["_interrupted_at_import"].WHOLE and not module_lines
            else:
                assert "_interrupted_at_import" not in sys.modules and module_lines, module_lines
        hold_interrupts_in_imports(True)
        try:
            import _own_handler
            assert _own_handler.TAKEN == [signal.SIGINT] and signal.getsignal(signal.SIGINT).__module__ == "_own_handler"
            signal.signal(signal.SIGINT, signal.default_int_handler)
            import _chaining_handler
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                sum(range(10**6))
            assert _chaining_handler.CHAINED == [signal.SIGINT]
        finally:
            hold_interrupts_in_imports(False)
    finally:
        signal.signal(signal.SIGINT, before)
        for name in ("_interrupted_at_import", "_own_handler", "_chaining_handler"):
            sys.modules.pop(name, None)


@pytest.mark.parametrize("signals, asked_to_stop, marker", [(1, False, True), (2, False, False), (1, True, False)])
def test_a_script_ends_in_its_line_after_an_import_a_ctrl_c_interrupted(tmp_path, signals, asked_to_stop, marker):
    """Through `cli.exit_with`, as every script runs: one Ctrl-C during an import ends the script
    with its line and status 130 once the import is done (the module ran whole); a second Ctrl-C
    during the same import, or one after a trainer was asked to stop (`SignalStop`, SIGTERM),
    ends it at once, as without the hold."""
    (tmp_path / "_interrupted_twice.py").write_text(
        f"import os, pathlib, signal\nfor _ in range({signals}):\n    os.kill(os.getpid(), signal.SIGINT)\n"
        f"sum(range(10**6))\npathlib.Path({str(tmp_path / 'imported')!r}).touch()\n")
    script = (f"import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
              f"sys.path.insert(0, {str(tmp_path)!r}); from jaxllm.cli import exit_with\n"
              "def main():\n"
              + ("    from jaxllm.stopping import SignalStop\n    SignalStop().install()\n"
                 "    import os\n    os.kill(os.getpid(), signal.SIGTERM)\n" if asked_to_stop else "")
              + "    import _interrupted_twice\n    return 0\n"
              "exit_with(main, 'probe.py', 'nothing was done')\n")
    p = subprocess.run([sys.executable, "-c", script], env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 130 and p.stderr.strip() == "probe.py: interrupted: nothing was done", (p.returncode, p.stderr)
    assert (tmp_path / "imported").exists() == marker


def test_the_first_signal_decides_and_a_ctrl_c_after_it_interrupts():
    """`SignalStop` (both trainers): SIGTERM or Ctrl-C asks to save and stop, named by the first
    signal (its exit status: 143 or 130); a Ctrl-C after a request interrupts at once; a SIGTERM
    after a Ctrl-C changes nothing. The handlers are put back on leaving."""
    import signal

    from jaxllm.stopping import SignalStop

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with SignalStop() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    with SignalStop() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_from_a_command_line_a_second_ctrl_c_ends_the_process_at_once_even_inside_a_gc_callback():
    """A trainer's second Ctrl-C (the first asked to save and stop) raised KeyboardInterrupt wherever
    the main thread was: inside JAX's garbage-collection callback, Python printed "Exception
    ignored" with a traceback and the run went on saving. From a command line (`cli.exit_with`) it
    now ends the process at once: one line, status 130 (a save in progress is passed over by the
    next start, as after `kill -9`). Here the second Ctrl-C comes inside a gc callback."""
    code = """if True:
        import gc, os, signal
        from jaxllm.cli import exit_with
        from jaxllm.stopping import SignalStop

        def main():
            with SignalStop() as stop:
                os.kill(os.getpid(), signal.SIGINT)  # asks to save and stop
                assert stop.requested == "SIGINT"
                gc.callbacks.append(lambda phase, info: phase == "start" and os.kill(os.getpid(), signal.SIGINT))
                gc.collect()
                print("went on after the second Ctrl-C")
            return 0

        exit_with(main, "train_x.py", "nothing more was saved")
    """
    r = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout, r.stderr) == (130, "", "\ntrain_x.py: interrupted: nothing more was saved\n"), r


def test_from_a_command_line_a_ctrl_c_inside_a_gc_callback_still_ends_the_script():
    """A Ctrl-C during a conversion or generation (no trainer's handler: KeyboardInterrupt) that
    landed inside JAX's garbage-collection callback printed "Exception ignored" with a traceback,
    and the script went on to exit 0. From a command line (`cli.exit_with`) it is raised again in
    the main thread: the script ends with its one line and status 130. Another exception in such a
    callback is still reported as before."""
    code = """if True:
        import gc, os, signal, time
        from jaxllm.cli import exit_with

        signal.signal(signal.SIGINT, signal.default_int_handler)  # (as from a terminal; ignored under nohup)

        def main():
            gc.callbacks.append(lambda phase, info: phase == "start" and 1 / 0)
            gc.collect()  # (reported, and the script goes on)
            gc.callbacks.clear()
            gc.callbacks.append(lambda phase, info: phase == "start" and os.kill(os.getpid(), signal.SIGINT))
            gc.collect()
            gc.callbacks.clear()
            time.sleep(10)  # (the main thread's next work)
            print("went on after the Ctrl-C")
            return 0

        exit_with(main, "convert_x.py", "nothing was written")
    """
    r = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout) == (130, ""), r
    assert r.stderr.endswith("ZeroDivisionError: division by zero\n\nconvert_x.py: interrupted: nothing was written\n"), r
    assert r.stderr.count("Exception ignored") == 1 and "KeyboardInterrupt" not in r.stderr, r


def test_an_error_that_a_ctrl_c_caused_ends_as_interrupted():
    """A compiled module interrupted while it was imported (tensorstore, under Orbax, early in a
    trainer's start-up) raised an ImportError caused by the KeyboardInterrupt: a traceback and exit
    status 1. Errors that no interrupt caused are raised as before."""
    code = """if True:
        import sys
        from jaxllm.cli import exit_with

        def main():
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt as e:
                if sys.argv[1] == "cause":
                    raise ImportError("initialization failed") from e
                raise RuntimeError("while handling it")

        def other():
            raise ImportError("no module named x")

        exit_with(other if sys.argv[1] == "other" else main, "x.py", "stopped")
    """
    for how in ("cause", "context"):
        r = subprocess.run([sys.executable, "-c", code, how], env=_env(), capture_output=True, text=True, timeout=120)
        assert (r.returncode, r.stderr) == (130, "\nx.py: interrupted: stopped\n"), (how, r)
    r = subprocess.run([sys.executable, "-c", code, "other"], env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.endswith("ImportError: no module named x\n"), r


def test_after_main_a_ctrl_c_in_the_interpreter_s_exit_is_python_s_own():
    """Once `main` has returned, a KeyboardInterrupt that Python reports as unraisable (one raised
    in an atexit callback) is reported as Python reports it, not raised again: raised again, it cut
    off every later atexit callback (JAX's clean-up among them) and the process ended silently."""
    code = """if True:
        import atexit, os, signal, time
        from jaxllm.cli import exit_with

        signal.signal(signal.SIGINT, signal.default_int_handler)  # (as from a terminal; ignored under nohup)

        def first():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)

        def second():
            time.sleep(0.5)
            print("the next callback ran", flush=True)

        def main():
            atexit.register(second)
            atexit.register(first)  # (the last registered runs first)
            return 0

        exit_with(main, "x.py", "stopped")
    """
    r = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert r.stdout == "the next callback ran\n" and "KeyboardInterrupt" in r.stderr, r
    assert "x.py: interrupted" not in r.stderr, r


def test_a_stop_before_the_first_step_saves_nothing_and_says_so(tmp_path, capsys, monkeypatch):
    """A signal during start-up or the compile: no step was taken, so no checkpoint of the
    initial weights is written; the run still exits as stopped (128 + SIGTERM)."""
    from jaxllm import loop

    monkeypatch.setattr(loop._Stop, "agreed", lambda self: "SIGTERM")
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import train_jax
    finally:
        sys.path.pop(0)
    code = train_jax.main(BASE + ["--ckpt-dir", str(tmp_path / "ck")])
    out = capsys.readouterr().out
    assert code == 128 + signal.SIGTERM
    assert "SIGTERM: stopped before the first step; nothing to save" in out, out
    assert not [d for d in os.listdir(tmp_path / "ck") if d.isdigit()]


def test_the_same_command_again_loads_the_train_step_from_the_compilation_cache(tmp_path):
    """`--compile-cache DIR` (default ~/.cache/jaxllm/xla): the first run compiles the train step and
    keeps it; a second run of the same command loads it and trains to the same state."""
    cache = tmp_path / "xla"
    first = _run(tmp_path / "a", 1, ["--compile-cache", str(cache)])
    assert "compiled the train step in" in first
    assert any(f.startswith("jit__train_step") for f in os.listdir(cache))
    second = _run(tmp_path / "b", 1, ["--compile-cache", str(cache)])
    assert "loaded the train step from the compilation cache in" in second
    _assert_same(_final_state(tmp_path / "a"), _final_state(tmp_path / "b"))
    # (`--compile-cache none`, the default and the environment's directory: tests/test_xla_cache.py)


def test_without_a_progress_bar_each_logged_step_prints_a_line_and_the_bar_follows_the_compile(
        tmp_path, capsys, monkeypatch):
    """--no-progress (or no terminal): one line per logged step. With a bar, it is made after the
    compile, so that it has a line of its own and its rate leaves the compile time out."""
    from types import SimpleNamespace

    from jaxllm import loop

    assert train_jax_main(BASE + ["--ckpt-dir", str(tmp_path / "a"), "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"the train step (from the compilation cache )?in .*\n"
                     r"step 1/2: loss \d+\.\d{4}, lr \S+, grad norm \S+, [\d,]+ tokens/s\n"
                     r"step 2/2: loss .*\ndone: step 2", out), out
    events = []

    class Bar:
        def __init__(self, **kw):
            events.append(f"bar from step {kw['initial']}")

        def __getattr__(self, name):
            return lambda *a, **kw: None

    monkeypatch.setitem(sys.modules, "tqdm", SimpleNamespace(tqdm=Bar))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.setattr(loop, "log", events.append)
    argv = [a for a in BASE if a != "--no-progress"]
    assert train_jax_main(argv + ["--ckpt-dir", str(tmp_path / "b"), "--steps", "2"]) == 0
    start = events.index("compiling the train step (or loading it from the compilation cache) ...")
    assert " the train step " in events[start + 1] and events[start + 2] == "bar from step 0", events
    assert not [e for e in events if e.startswith("step ")], events


# ---- bad input: one line, exit status 2, nothing overwritten ----------------------------------
def _main(argv, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import train_jax
    finally:
        sys.path.pop(0)
    try:
        code = train_jax.main(argv)
    except SystemExit as e:  # argparse's own checks (choices) exit from the parser
        code = e.code
    err = capsys.readouterr().err.strip()
    return code, err


# In-process runs see conftest's 8 simulated devices: the batch divides over them.
BASE = ["--preset", "tiny", "--seq-len", "32", "--batch-size", "8", "--steps", "2", "--max-new-tokens", "0",
        "--no-progress"]


def test_a_save_that_meets_a_lost_peer_ends_the_run_as_a_lost_peer(tmp_path, capsys, monkeypatch):
    """train_jax.py's saves (and the wait for the last one) go through
    `loop.peer_failures_as_runtime_errors`: here as in a run of two processes, where Orbax's barrier
    raises the failed collective of a dead peer as ValueError. The run ends with exit status 1 and
    the save named, not as bad input (2)."""
    from jaxllm import loop

    real_guard, real_save, guarded = loop.peer_failures_as_runtime_errors, loop.ckpt_lib.save, []

    def as_two_processes(what, process_count):
        guarded.append(what)
        return real_guard(what, 2)

    def save(mngr, step, **kw):
        if step == 2:
            raise ValueError("UNKNOWN: Gloo AllGather failed: Connection closed by peer [127.0.0.1]:28051")
        return real_save(mngr, step, **kw)

    monkeypatch.setattr(loop, "peer_failures_as_runtime_errors", as_two_processes)
    monkeypatch.setattr(loop.ckpt_lib, "save", save)
    code, err = _main(BASE + ["--save-every", "1", "--ckpt-dir", str(tmp_path / "ck")], capsys)
    assert code == 1 and "train_jax.py: error: saving step 2: UNKNOWN: Gloo AllGather failed" in err, (code, err)
    assert guarded == ["saving step 1", "saving step 2", "finishing the last save"]
    assert sorted(os.listdir(tmp_path / "ck")).count("1") == 1


def test_a_save_that_finds_no_space_ends_the_run_in_one_line_naming_the_last_checkpoint(tmp_path, capsys,
                                                                                         monkeypatch):
    """A full disk (Orbax raises TensorStore's RESOURCE_EXHAUSTED as ValueError, after its threads
    log their tracebacks): not bad input (exit status 2) but the run's failure (1), in one line that
    names the step, the last complete checkpoint and what to do; the threads' records are dropped."""
    import logging

    from jaxllm import loop

    real_save = loop.ckpt_lib.save
    full = ('RESOURCE_EXHAUSTED: Error writing "params.lm_head.bias/0" in OCDBT database at local file "/x/2.orbax-'
            'checkpoint-tmp/params.orbax-checkpoint-tmp/ocdbt.process_0/": Failed to write 1030416 bytes to file 27: '
            "No space left on device [os_error_code='28']")

    def save(mngr, step, **kw):
        if step == 2:
            raise ValueError(full)
        return real_save(mngr, step, **kw)

    monkeypatch.setattr(loop.ckpt_lib, "save", save)
    ck = tmp_path / "ck"
    code, err = _main(BASE + ["--save-every", "1", "--ckpt-dir", str(ck)], capsys)
    assert (code, err) == (1, f"train_jax.py: error: saving step 2 in {ck} failed (No space left on device); the last "
                              "complete checkpoint is step 1, and the steps after it are lost. Make room there (or "
                              "mend the directory) and run the same command again to resume")
    assert _steps(ck) == [1]
    logger = logging.getLogger("absl")
    record = logger.makeRecord("absl", logging.ERROR, __file__, 0, "[process=0][thread=array_type_handler]"
                               "[operation_id=2] _SignalingThread.run() raised an exception: " + full, (), None)
    assert not logger.filter(record)


def test_a_data_error_whose_progress_save_fails_is_still_the_error_named(tmp_path, capsys, monkeypatch):
    """The save of the steps taken before a data error can fail too (a full disk): the data error
    stays the one named, exit status 2, with the failed save in its parentheses."""
    from jaxllm import loop

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "a.jsonl").write_text("".join(json.dumps({"text": f"Doc {i}."}) + "\n" for i in range(1100)))
    (shards / "b.jsonl").write_text("this line is not JSON\n")
    real_save = loop.ckpt_lib.save

    def save(mngr, step, **kw):
        if step % 10:
            raise ValueError("RESOURCE_EXHAUSTED: Failed to write: No space left on device [os_error_code='28']")
        return real_save(mngr, step, **kw)

    monkeypatch.setattr(loop.ckpt_lib, "save", save)
    ck = tmp_path / "ck"
    code, err = _main(["--preset", "tiny", "--seq-len", "32", "--batch-size", "8", "--steps", "60", "--save-every", "10",
                       "--max-new-tokens", "0", "--no-progress", "--ckpt-dir", str(ck), "--dataset", str(shards)], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "JSON parse error" in err, err
    assert re.search(r"\(at step (\d+); saving it failed: saving step \1 in .* failed \(No space left on device\); the "
                     r"last complete checkpoint is step \d0, and the steps after it are lost", err), err


def _case_files(tmp_path):
    (tmp_path / "bad_config.json").write_text(json.dumps({"hidden_size": 0}))
    (tmp_path / "no_text.jsonl").write_text(json.dumps({"body": "hello"}) + "\n")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.txt").write_text("\n\n  \n\n")
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\nnot json\n')
    (tmp_path / "a_file").write_text("precious")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")


BAD_INPUTS = [
    ("invalid config value", ["--config", "{tmp}/bad_config.json"], "hidden_size"),
    ("config path that is a directory", ["--config", "{tmp}"], "cannot read config file"),
    ("missing checkpoint for --init-from", ["--init-from", "{tmp}/nowhere"], "nowhere"),
    ("dataset without the text column", ["--dataset", "{tmp}/no_text.jsonl"], "text"),
    ("empty dataset", ["--dataset", "{tmp}/empty.jsonl"], "empty"),
    ("dataset of blank documents", ["--dataset", "{tmp}/blank.txt"], "has no text"),
    ("dataset that is not JSON lines", ["--dataset", "{tmp}/broken.jsonl"], "JSON parse error"),
    ("sequence longer than max_position_embeddings", ["--seq-len", "4096"], "max_position_embeddings"),
    ("sequence of one token", ["--seq-len", "1"], "--seq-len must be at least 2"),
    ("negative warm-up", ["--warmup-steps", "-1"], "--warmup-steps must be non-negative"),
    ("negative clip norm", ["--clip-norm", "-1"], "--clip-norm must be non-negative"),
    ("negative weight decay", ["--weight-decay", "-0.1"], "--weight-decay must be non-negative"),
    ("negative sample length", ["--max-new-tokens", "-1"], "--max-new-tokens must be non-negative"),
    ("zero learning rate", ["--lr", "0"], "--lr must be positive"),
    # argparse took a negative number with an exponent, or -inf, for a flag ("expected one argument")
    ("negative learning rate with an exponent", ["--lr", "-1e-3"], "--lr must be positive, got -0.001"),
    ("negative weight decay with an exponent", ["--weight-decay", "-1E-2"], "--weight-decay must be non-negative"),
    ("minus infinite learning rate", ["--lr", "-inf"], "--lr must be a finite number, got -inf"),
    ("negative peak FLOP/s", ["--peak-flops", "-1"], "--peak-flops must be positive"),
    ("infinite learning rate", ["--lr", "inf"], "--lr must be a finite number, got inf"),
    ("learning rate whose first update overflows", ["--lr", "1e38"], "--lr 1e+38 is too large: AdamW's first update"),
    ("infinite weight decay", ["--weight-decay", "inf"], "--weight-decay must be a finite number"),
    ("NaN clip norm", ["--clip-norm", "nan"], "--clip-norm must be a finite number, got nan"),
    ("infinite peak FLOP/s", ["--peak-flops", "inf"], "--peak-flops must be a finite number"),
    ("seed beyond 32 bits", ["--seed", str(2**64)], "argument --seed: must be in 0 .. 2**32 - 1"),
    ("negative seed", ["--seed", "-5"], "argument --seed: must be in 0 .. 2**32 - 1, got -5"),
    ("seed of exactly 2**32", ["--seed", str(2**32)], "argument --seed: must be in 0 .. 2**32 - 1"),
    ("no checkpoint kept", ["--keep", "0"], "--keep must be positive, got 0"),
    ("remat policy and --no-remat", ["--remat", "full", "--no-remat"], "--no-remat: not allowed with argument --remat"),
    ("missing local dataset directory", ["--dataset", "nowhere/"], "dataset nowhere/: no such file or directory"),
    ("split of local files", ["--dataset", "{tmp}/broken.jsonl", "--split", "test"],
     "--split 'test': only a Hub dataset has splits; local files are read whole"),
    ("split of the embedded corpus", ["--split", "validation"], "--split 'validation': only a Hub dataset has splits"),
    ("text column of the embedded corpus", ["--text-column", "content"], "the embedded corpus has no columns"),
    ("config of the embedded corpus", ["--dataset-config", "bogus"],
     "--dataset-config 'bogus': only a Hub dataset has configs; the embedded corpus is read as it is"),
    ("config of local files", ["--dataset", "{tmp}/broken.jsonl", "--dataset-config", "bogus"],
     "--dataset-config 'bogus': only a Hub dataset has configs; local files are read as they are"),
    ("negative shuffle buffer", ["--dataset", "{tmp}/broken.jsonl", "--shuffle-buffer", "-1"],
     "--shuffle-buffer must be non-negative, got -1"),
    ("shuffle buffer of the embedded corpus", ["--shuffle-buffer", "100"],
     "--shuffle-buffer 100: the embedded corpus is shuffled whole every epoch"),
    ("prompt filling the positions", ["--prompt", "x " * 200, "--max-new-tokens", "4"], "no room for new tokens"),
    ("batch the mesh cannot divide", ["--batch-size", "3"], "batch size 3"),
    ("Hub dataset id while offline", ["--dataset", "someorg/somedata"], "offline"),
    ("Hub tokenizer id while offline", ["--tokenizer", "someorg/sometok"], "offline"),
    ("output directory that is a file", ["--ckpt-dir", "{tmp}/a_file"], "not a directory"),
    ("unknown preset", ["--preset", "huge"], "huge"),
    ("bad mesh flag", ["--mesh", "data=two"], "mesh"),
    ("mesh axis given twice", ["--mesh", "data=4,data=2"], "given twice"),
    ("heartbeat timeout of zero", ["--heartbeat-timeout", "0"], "--heartbeat-timeout must be at least 1"),
    ("start-up timeout of zero", ["--init-timeout", "0"], "--init-timeout must be at least 1"),
    ("coordinator without a port", ["--coordinator", "notahost", "--num-processes", "1", "--process-id", "0"],
     "HOST:PORT"),
    ("expert axis that does not divide the experts", ["--mesh", "expert=2,data=4"], "expert=2 does not divide"),
    ("unknown remat policy", ["--remat", "some"], "remat"),
    ("cuDNN attention without a GPU", ["--attn-impl", "cudnn", "--dtype", "bfloat16"], "needs an NVIDIA GPU"),
    ("scan unrolled zero layers at a time", ["--scan-unroll", "0"], "--scan-unroll must be at least 1, got 0"),
    ("compilation cache under a file", ["--compile-cache", "{tmp}/a_file/xla"], "--compile-cache: cannot create"),
    # an unset variable: the working directory, or a flag not given (a run from random weights)
    ("empty --ckpt-dir", ["--ckpt-dir", ""], "argument --ckpt-dir: an empty path"),
    ("empty --init-from", ["--init-from", " "], "argument --init-from: an empty path"),
    ("empty --config", ["--config", ""], "argument --config: an empty path"),
    # bytes that are not UTF-8, as Python passes them on from the command line: lone surrogates
    ("prompt that is not UTF-8", ["--prompt", "ab\udcffcd"], "argument --prompt: not UTF-8 text (byte b'\\xff'"),
    ("path that is not UTF-8", ["--ckpt-dir", "bad\udcffdir"], "argument --ckpt-dir: not UTF-8 text"),
    ("output directory that is a broken link", ["--ckpt-dir", "{tmp}/dangling"], "is a symbolic link to"),
]


@pytest.mark.parametrize("label, args, needle", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_one_line_exit_2(label, args, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # relative paths are looked for here
    _case_files(tmp_path)
    argv = BASE + ["--ckpt-dir", str(tmp_path / "ck")] + [a.format(tmp=tmp_path) for a in args]
    code, err = _main(argv, capsys)
    print(f"{label}: {err}")
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("train_jax.py: error:"), err
    assert needle.lower() in err.lower()
    assert (tmp_path / "a_file").read_text() == "precious"
    assert not (tmp_path / "ck").exists() or not os.listdir(tmp_path / "ck"), "nothing written"


def test_a_tilde_the_shell_left_is_the_home_directory(monkeypatch, tmp_path):
    """`--ckpt-dir=~/runs` (the shell expands no `~` after `=`) made a directory named `~` here."""
    monkeypatch.setenv("HOME", str(tmp_path))
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import train_jax
    finally:
        sys.path.pop(0)
    rc = train_jax.parse_args(["--ckpt-dir=~/runs", "--init-from", "~/start", "--config", "~/c.json"])[1]
    assert (rc.ckpt_dir, rc.init_from, rc.config) == tuple(str(tmp_path / n) for n in ("runs", "start", "c.json"))


def test_generate_seed_must_fit_in_32_bits(capsys):
    """The sampling seed is checked when parsing, naming the flag (not an OverflowError traceback)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import generate
    finally:
        sys.path.pop(0)
    base = ["--checkpoint", "ck", "--prompt", "x"]
    for seed, needle in ((str(2**64), "must be in 0 .. 2**32 - 1"), ("-5", "got -5"), ("1.5", "expected an integer")):
        with pytest.raises(SystemExit) as e:
            generate.parse_args(base + ["--seed", seed])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and "argument --seed: " in err and needle in err, err
    assert generate.parse_args(base + ["--seed", str(2**32 - 1)]).seed == 2**32 - 1


def test_init_timeout_bounds_jax_s_wait_for_the_other_processes(monkeypatch):
    """`--init-timeout` reaches `jax.distributed.initialize` (which aborts the process after it: no
    slow test of that here)."""
    from types import SimpleNamespace

    from jaxllm import distributed

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import train_jax
    finally:
        sys.path.pop(0)
    calls = []
    fake = SimpleNamespace(config=SimpleNamespace(update=lambda *a: None),
                           distributed=SimpleNamespace(initialize=lambda **kw: calls.append(kw)))
    monkeypatch.setattr(distributed, "jax", fake)
    flags = ["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "0"]
    for extra, want in (([], 300), (["--init-timeout", "7"], 7)):
        args, _ = train_jax.parse_args(flags + extra)
        assert distributed.maybe_initialize(args.coordinator, args.num_processes, args.process_id,
                                            args.heartbeat_timeout, args.init_timeout)
        assert calls.pop()["initialization_timeout"] == want


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory):
    """A one-step checkpoint directory, made once for the tests below (they copy it)."""
    ckpt = tmp_path_factory.mktemp("trained") / "ck"
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import train_jax
    finally:
        sys.path.pop(0)
    assert train_jax.main(BASE + ["--ckpt-dir", str(ckpt), "--steps", "1"]) == 0
    return ckpt


def test_each_checkpoint_step_saves_the_run_s_tokenizer(trained_ckpt):
    from jaxllm import checkpoint, data
    from jaxllm.config import LLMConfig

    with checkpoint.reading(trained_ckpt) as mngr:
        step = checkpoint.resolve_step(mngr, None)
        meta, files = checkpoint.read_meta(mngr, step), checkpoint.read_tokenizer_files(mngr, step)
    config = LLMConfig.from_dict(meta["config"])
    saved, used = data.tokenizer_from_files(files, config), data.model_tokenizer(meta["tokenizer"], config)
    text = "Once upon a time, 42 cats sat on the mat."
    assert saved(text)["input_ids"] == used(text)["input_ids"] and len(saved) == len(used) == config.vocab_size
    assert saved.eos_token_id == used.eos_token_id == config.eos_token_id
    import jaxllm

    assert jaxllm.load_tokenizer(trained_ckpt)(text)["input_ids"] == used(text)["input_ids"]
    assert saved.padding_side == "left"  # batched prompts for generate, as in exports


def test_init_from_trains_with_the_starting_checkpoint_s_tokenizer(trained_ckpt, tmp_path, capsys):
    """Without --tokenizer, --init-from takes the starting checkpoint's saved tokenizer (here one
    whose recorded path is gone, as on another machine), and the new run saves it in turn."""
    import jaxllm
    from jaxllm import checkpoint, data

    files = data.tokenizer_files(word_tokenizer())
    model, config = jaxllm.load(trained_ckpt)
    mngr = checkpoint.manager(tmp_path / "start")
    checkpoint.save(mngr, 0, weights=checkpoint.split_weights(model), config=config,
                    tokenizer=str(tmp_path / "gone"), tokenizer_files=files)
    mngr.wait_until_finished()
    mngr.close()
    capsys.readouterr()
    assert train_jax_main(BASE[2:] + ["--ckpt-dir", str(tmp_path / "run"), "--steps", "1",
                                      "--init-from", str(tmp_path / "start")]) == 0  # its model: no --preset
    out = capsys.readouterr().out
    assert "with its tokenizer" in out and f"parameters (the model of {tmp_path / 'start'})" in out
    with checkpoint.reading(tmp_path / "run") as mngr:
        meta, saved = checkpoint.read_meta(mngr, 1), checkpoint.read_tokenizer_files(mngr, 1)
    assert meta["tokenizer"] == meta["data"]["source"]["tokenizer"] == str(tmp_path / "gone")
    assert json.loads(saved["tokenizer.json"])["model"]["vocab"] == json.loads(files["tokenizer.json"])["model"]["vocab"]
    # The same command again resumes, and says that the starting weights are not used.
    assert train_jax_main(BASE[2:] + ["--ckpt-dir", str(tmp_path / "run"), "--steps", "2",
                                      "--init-from", str(tmp_path / "start")]) == 0
    out = capsys.readouterr().out  # the model is the run's own (it was named as the starting checkpoint's)
    assert f"at step 1 (--init-from {tmp_path / 'start'} only starts a new run: not used)" in out
    assert f"parameters (the model of {tmp_path / 'run'})" in out
    # Weights only (no optimizer state) cannot be resumed: the error says to pass them as --init-from.
    code, err = _main(BASE + ["--ckpt-dir", str(tmp_path / "start")], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "pass it as --init-from" in err, err
    # ... but steps emptied by hand hold no weights either: named as unreadable, not as weights only
    emptied = tmp_path / "emptied"
    shutil.copytree(tmp_path / "start", emptied)
    for step in [d for d in emptied.iterdir() if d.name.isdigit()]:
        shutil.rmtree(step)
        step.mkdir()
    code, err = _main(BASE + ["--ckpt-dir", str(emptied)], capsys)
    assert code == 2 and "cannot read its metadata" in err.splitlines()[-1] and "--init-from" not in err, err
    # --tokenizer still wins.
    assert train_jax_main(BASE + ["--ckpt-dir", str(tmp_path / "run2"), "--steps", "1",
                                  "--init-from", str(tmp_path / "start"), "--tokenizer", "embedded"]) == 0
    with checkpoint.reading(tmp_path / "run2") as mngr:
        assert checkpoint.read_meta(mngr, 1)["tokenizer"].startswith("embedded:")


def test_a_resumed_run_keeps_its_tokenizer_without_the_flag(tmp_path):
    """The same command without --tokenizer (or on a machine where the file it names is gone)
    resumes with the checkpoint's own tokenizer instead of refusing the embedded one."""
    from jaxllm import checkpoint

    word_tokenizer().save_pretrained(tmp_path / "tok")
    ck = str(tmp_path / "ck")
    assert train_jax_main(BASE + ["--ckpt-dir", ck, "--steps", "1", "--tokenizer", str(tmp_path / "tok")]) == 0
    shutil.rmtree(tmp_path / "tok")
    assert train_jax_main(BASE + ["--ckpt-dir", ck, "--steps", "2"]) == 0
    with checkpoint.reading(ck) as mngr:
        assert mngr.all_steps() == [1, 2]
        meta, files = checkpoint.read_meta(mngr, 2), checkpoint.read_tokenizer_files(mngr, 2)
    assert meta["data"]["source"]["tokenizer"] == str(tmp_path / "tok")
    assert json.loads(files["tokenizer.json"])["model"]["vocab"] == {"<|endoftext|>": 0, "the": 1, "a": 2, "[UNK]": 3}
    # The same command, naming the tokenizer that is gone (as a recipe's Hub id offline): the saved copy.
    assert train_jax_main(BASE + ["--ckpt-dir", ck, "--steps", "3", "--tokenizer", str(tmp_path / "tok")]) == 0


def _cut_saved_tokenizer_json(item):
    """The tokenizer item stays valid JSON; the tokenizer.json text inside it is cut in half."""
    saved = json.loads((item / "metadata").read_text())
    text = saved["files"]["tokenizer.json"]
    saved["files"]["tokenizer.json"] = text[: len(text) // 2]
    (item / "metadata").write_text(json.dumps(saved))


@pytest.mark.parametrize("damage, resume_flags", [("unreadable item", []),
                                                  ("cut tokenizer.json", ["--tokenizer", "embedded"])])
def test_an_unreadable_saved_tokenizer_costs_nothing_but_the_copy(damage, resume_flags, trained_ckpt, tmp_path,
                                                                  capsys):
    """Damaged tokenizer files in a step (an item that is not JSON, or valid JSON holding a cut
    tokenizer.json): readers warn, in one line naming no temporary directory, and use the tokenizer
    the metadata names; the step's weights and optimizer state still resume (the step is not set
    aside), with or without a --tokenizer naming the recorded one."""
    import jaxllm
    from convert.hf_export import export_hf
    from jaxllm import checkpoint

    ckpt = tmp_path / "ck"
    shutil.copytree(trained_ckpt, ckpt)
    step = checkpoint.latest_step(ckpt)
    if damage == "unreadable item":
        for f in (ckpt / str(step) / "tokenizer").iterdir():
            f.write_text("not json {")
    else:
        _cut_saved_tokenizer_json(ckpt / str(step) / "tokenizer")
    text = "Once upon a time"
    capsys.readouterr()
    assert jaxllm.load_tokenizer(ckpt)(text)["input_ids"] == jaxllm.load_tokenizer(trained_ckpt)(text)["input_ids"]
    err = capsys.readouterr().err.strip()
    assert "saved tokenizer cannot be read" in err and len(err.splitlines()) == 1, err
    assert "jaxllm-tokenizer-" not in err, err
    result = export_hf(ckpt, tmp_path / "hf")
    assert result.tokenizer and (tmp_path / "hf" / "tokenizer.json").is_file()
    assert train_jax_main(BASE + ["--ckpt-dir", str(ckpt), "--steps", str(step + 1), *resume_flags]) == 0
    assert checkpoint.latest_step(ckpt) == step + 1
    assert not [p for p in os.listdir(ckpt) if "unreadable" in p]


def train_jax_main(argv):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import train_jax
    finally:
        sys.path.pop(0)
    return train_jax.main(argv)


def test_checkpoint_of_another_model_is_refused_and_kept(trained_ckpt, tmp_path, capsys):
    ckpt = tmp_path / "ck"
    shutil.copytree(trained_ckpt, ckpt)
    before = {p: os.path.getmtime(os.path.join(r, p)) for r, _, fs in os.walk(ckpt) for p in fs}
    other = ["--config", str(tmp_path / "other.json")]
    from jaxllm.config import LLMConfig

    (tmp_path / "other.json").write_text(LLMConfig.from_preset("tiny", hidden_size=128, v_head_dim=32).to_json_string())
    for argv in (BASE + other + ["--ckpt-dir", str(ckpt)],  # resume into another shape
                 BASE + other + ["--ckpt-dir", str(tmp_path / "new"), "--init-from", str(ckpt)]):
        code, err = _main(argv, capsys)
        print(err)
        assert code == 2 and len(err.splitlines()) == 1 and "another model" in err
        if "--init-from" not in argv:  # the flag that asked, and the model saved
            assert f"--ckpt-dir {ckpt} holds a checkpoint of another model than --config {tmp_path / 'other.json'} " \
                   "(differs in hidden_size, v_head_dim; it holds the tiny preset): resume without --preset" in err, err
    after = {p: os.path.getmtime(os.path.join(r, p)) for r, _, fs in os.walk(ckpt) for p in fs}
    assert before == after
    assert not (tmp_path / "new").exists()


def _weights_only_checkpoint(path, config, **tokenizer):
    """A checkpoint as convert/torch_to_flax.py writes one (step 0, no optimizer state) of fresh
    weights; `tokenizer`: `checkpoint.save`'s tokenizer and tokenizer_files."""
    from jaxllm import checkpoint
    from jaxllm.model import create_model

    mngr = checkpoint.manager(path)
    checkpoint.save(mngr, 0, weights=checkpoint.split_weights(create_model(config)), config=config, **tokenizer)
    mngr.wait_until_finished()
    mngr.close()


def test_init_from_another_model_size_says_so_before_its_tokenizer_is_tried(tmp_path, capsys):
    """A starting checkpoint with a larger vocabulary (and its tokenizer) is another model: said
    as such, not as a tokenizer too large for this model."""
    from jaxllm import data
    from jaxllm.config import LLMConfig

    bigger = LLMConfig.from_preset("tiny", vocab_size=1024)
    _weights_only_checkpoint(tmp_path / "start", bigger,
                             tokenizer_files=data.tokenizer_files(data.model_tokenizer(None, bigger)))
    code, err = _main(BASE + ["--ckpt-dir", str(tmp_path / "run"), "--init-from", str(tmp_path / "start")], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "holds a checkpoint of another model (differs in vocab_size)" in err, err
    assert "without --preset, --config or a recipe naming a model, --init-from trains the model it holds" in err, err
    assert not (tmp_path / "run").exists()
    # without --preset (and --config): the model the checkpoint holds, with its tokenizer
    assert BASE[:2] == ["--preset", "tiny"]
    code, err = _main(BASE[2:] + ["--ckpt-dir", str(tmp_path / "run"), "--init-from", str(tmp_path / "start")], capsys)
    assert code == 0, err
    from jaxllm.checkpoint import read_step_info

    assert LLMConfig.from_dict(read_step_info(tmp_path / "run")[1]["config"]) == bigger
    # the same command resumes from the run's own checkpoint, also where the starting one is gone
    shutil.rmtree(tmp_path / "start")
    code, err = _main(BASE[2:] + ["--ckpt-dir", str(tmp_path / "run"), "--init-from", str(tmp_path / "start"),
                                  "--steps", "3"], capsys)
    assert code == 0 and read_step_info(tmp_path / "run")[0] == 3, err


def test_init_from_a_large_vocabulary_naming_no_tokenizer_asks_for_one(tmp_path, capsys):
    """A converted checkpoint without tokenizer files, of a vocabulary larger than the embedded
    tokenizer's: training refuses to guess (as generation does) instead of using the embedded one."""
    from jaxllm.config import LLMConfig

    config = LLMConfig.from_preset("tiny", vocab_size=8192)
    (tmp_path / "config.json").write_text(config.to_json_string())
    _weights_only_checkpoint(tmp_path / "start", config)
    code, err = _main(BASE + ["--config", str(tmp_path / "config.json"), "--ckpt-dir", str(tmp_path / "run"),
                              "--init-from", str(tmp_path / "start")], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"{tmp_path / 'start'} names no tokenizer" in err and "(--tokenizer)" in err, err
    assert not (tmp_path / "run").exists()


def test_init_from_a_checkpoint_naming_no_tokenizer_notes_the_embedded_one(tmp_path, capsys):
    """A converted checkpoint without tokenizer files, of a vocabulary the embedded tokenizer fits:
    the run takes the embedded one, and one note says so (it was silent), once the start-up checks
    have passed: bad input ends in its one line. The run's checkpoints name that tokenizer, so
    resuming says nothing."""
    from jaxllm.config import LLMConfig

    _weights_only_checkpoint(tmp_path / "start", LLMConfig.from_preset("tiny"))
    argv = BASE + ["--ckpt-dir", str(tmp_path / "run"), "--init-from", str(tmp_path / "start")]
    code, err = _main(argv + ["--steps", "1", "--dataset", str(tmp_path / "missing")], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "missing" in err and "note:" not in err, err
    assert not (tmp_path / "run").exists()
    code, err = _main(argv + ["--steps", "1"], capsys)
    note = (f"note: {tmp_path / 'start'} holds no tokenizer; using the embedded tokenizer (512 tokens; pass "
            "--tokenizer to choose another)")
    assert code == 0 and err.splitlines().count(note) == 1 and err.count("note:") == 1, err
    code, err = _main(argv, capsys)
    assert code == 0 and "note:" not in err, err


def test_a_step_whose_saved_config_is_invalid_is_unreadable_not_the_user_s_config(trained_ckpt, tmp_path, capsys):
    """Resume sets such a step aside with a warning and goes on from the one before; --init-from
    and generation name the checkpoint step."""
    ckpt = tmp_path / "ck"
    shutil.copytree(trained_ckpt, ckpt)
    shutil.copytree(ckpt / "1", ckpt / "2")
    meta = json.loads((ckpt / "2" / "meta" / "metadata").read_text())
    meta["config"]["rope_theta"], meta["step"] = -1, 2
    (ckpt / "2" / "meta" / "metadata").write_text(json.dumps(meta))
    shutil.copytree(ckpt, tmp_path / "broken")
    shutil.rmtree(tmp_path / "broken" / "1")
    needle = "checkpoint step 2 in {}: its saved model config is invalid (rope_theta must be a finite positive number"
    code, err = _main(BASE + ["--ckpt-dir", str(tmp_path / "run"), "--init-from", str(tmp_path / "broken")], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and needle.format(tmp_path / "broken") in err, err
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import generate
    finally:
        sys.path.pop(0)
    with pytest.raises(ValueError, match=re.escape(needle.format(tmp_path / "broken"))):
        generate.checkpoint_info(str(tmp_path / "broken"), "orbax")
    assert train_jax_main(BASE + ["--ckpt-dir", str(ckpt), "--steps", "2"]) == 0
    out = capsys.readouterr()
    assert f"warning: cannot use checkpoint step 2 ({needle.format(ckpt)}" in out.err, out.err
    assert f"resuming from {ckpt} at step 1" in out.out
    assert [d for d in os.listdir(ckpt) if d.startswith("2.unreadable-")]  # set aside, not deleted


def test_a_step_saved_with_config_fields_this_version_does_not_know_is_refused_not_set_aside(
        trained_ckpt, tmp_path, capsys):
    """Not damage: resuming from an older step would throw the newer ones' training away."""
    ckpt = tmp_path / "ck"
    shutil.copytree(trained_ckpt, ckpt)
    shutil.copytree(ckpt / "1", ckpt / "2")
    meta = json.loads((ckpt / "2" / "meta" / "metadata").read_text())
    meta["config"]["a_field_of_a_newer_version"], meta["step"] = 1, 2
    (ckpt / "2" / "meta" / "metadata").write_text(json.dumps(meta))
    code, err = _main(BASE + ["--ckpt-dir", str(ckpt), "--steps", "3"], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert (f"checkpoint step 2 in {ckpt}: its config has fields this version of jaxllm does not know "
            "(a_field_of_a_newer_version)") in err, err
    assert sorted(os.listdir(ckpt)) == sorted(os.listdir(trained_ckpt) + ["2"])


def test_an_unreadable_array_is_reported_in_one_line(trained_ckpt, tmp_path):
    """TensorStore's error runs over many lines (its spec after "See full TensorStore details"): the
    CheckpointError (the resume warning, the error) keeps its first sentence."""
    import jaxllm
    from jaxllm import checkpoint

    ckpt = tmp_path / "ck"
    shutil.copytree(trained_ckpt, ckpt)
    for f in (ckpt / "1" / "params" / "ocdbt.process_0" / "d").iterdir():
        with open(f, "r+b") as fh:
            fh.truncate(3)
    with pytest.raises(checkpoint.CheckpointError, match="cannot restore weights") as e:
        jaxllm.load(ckpt)
    assert len(str(e.value).splitlines()) == 1 and "TensorStore details" not in str(e.value), str(e.value)
    assert "earlier steps" not in str(e.value)
    # The latest step unreadable, an earlier one not: the error names the earlier (generate.py and
    # flax_to_torch.py read one with --step, jaxllm.load with step=)
    ckpt = tmp_path / "ck2"
    shutil.copytree(trained_ckpt, ckpt)
    shutil.copytree(ckpt / "1", ckpt / "2")
    for f in (ckpt / "2" / "params" / "ocdbt.process_0" / "d").iterdir():
        with open(f, "r+b") as fh:
            fh.truncate(3)
    with pytest.raises(checkpoint.CheckpointError, match=r"cannot restore weights .*; earlier steps saved there: 1$"):
        jaxllm.load(ckpt)
    jaxllm.load(ckpt, step=1)
    for step in (3, 4, 5, 6):  # more earlier steps: the newest are named first
        shutil.copytree(ckpt / "1", ckpt / str(step))
    shutil.move(ckpt / "2", ckpt / "7")
    with pytest.raises(checkpoint.CheckpointError, match=r"; earlier steps saved there: 6, 5, 4, 3 and 1 more$"):
        jaxllm.load(ckpt)


def test_tensorstore_specs_are_cut_from_the_one_line_error():
    from jaxllm.checkpoint import one_line

    spec = "{\"driver\":\"zarr\",\"kvstore\":{\"path\":\"/ck/6/train_state/\"}}"
    e = ValueError(f'OUT_OF_RANGE: Error opening "cast" driver: Requested byte range [0, 3343) is not valid for '
                   f"value of size 3 [tensorstore_spec='{spec}'] [tensorstore_spec[1]='{spec}']")
    assert one_line(e) == ('OUT_OF_RANGE: Error opening "cast" driver: Requested byte range [0, 3343) is not valid '
                           "for value of size 3")


def test_only_orbax_s_leftovers_of_a_failed_restore_are_dropped(monkeypatch):
    """The unraisable exceptions, asyncio reports and never-awaited warnings that Orbax's abandoned
    reads leave behind are dropped (`checkpoint.quiet_orbax_read_leftovers`, installed by every checkpoint manager); others
    of the same kinds still reach the previous hook and the log."""
    import logging
    import types

    from jaxllm import checkpoint

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    logger = logging.getLogger("asyncio")
    monkeypatch.setattr(logger, "filters", [])
    checkpoint.quiet_orbax_read_leftovers()
    checkpoint.quiet_orbax_read_leftovers()  # once per process: no second wrapper
    assert sys.unraisablehook._jaxllm_hooks == {"orbax"} and len(logger.filters) == 1

    async def _read_array_index_and_device_put():
        pass

    async def other_read():
        pass

    orbax_read, other = _read_array_index_and_device_put(), other_read()
    try:
        cases = [(orbax_read, Exception("Encountered error while reading array index")),  # dropped
                 (None, RuntimeError("Event loop is closed")),  # dropped
                 (other, Exception("Encountered error while reading array index")),
                 (None, RuntimeError("something else")),
                 (print, RuntimeError("Event loop is closed"))]
        for obj, exc in cases:
            sys.unraisablehook(types.SimpleNamespace(object=obj, exc_value=exc, exc_type=type(exc),
                                                     exc_traceback=None, err_msg=None))
    finally:
        orbax_read.close()
        other.close()
    assert [(u.object, str(u.exc_value)) for u in seen] == [(other, "Encountered error while reading array index"),
                                                           (None, "something else"), (print, "Event loop is closed")]

    def logged(msg, exc=None):
        record = logging.LogRecord("asyncio", logging.ERROR, __file__, 1, msg, None,
                                   (type(exc), exc, exc.__traceback__) if exc else None)
        return logger.filter(record)

    site = "/venv/lib/python3.11/site-packages/orbax/checkpoint/_src/serialization/serialization.py:328"
    assert not logged("Task exception was never retrieved\nfuture: <Task finished name='Task-9' "
                      f"coro=<_read_array_index_and_device_put() done, defined at {site}>>")
    assert not logged("Future exception was never retrieved\nfuture: <Future finished exception=ValueError(...)>",
                      ValueError('DATA_LOSS: Error opening "zarr" driver: Error reading "params.x/.zarray"'))
    assert logged("Future exception was never retrieved\nfuture: <Future finished exception=ValueError('boom')>",
                  ValueError("boom"))
    assert logged("Task was destroyed but it is pending!")

    # and the read of an item's array metadata files, created and never started: Python's warning
    # when it is collected (others still warn)
    import gc
    import warnings

    from orbax.checkpoint._src.metadata import array_metadata_store

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checkpoint.quiet_orbax_read_leftovers()
        array_metadata_store.Store()._get_array_metadatas(ROOT / "array_metadatas")
        other_read()
        gc.collect()
    assert [str(w.message) for w in caught] == [f"coroutine '{other_read.__qualname__}' was never awaited"]


def test_metrics_of_a_crashed_run_are_truncated_to_the_step_resumed_from(tmp_path):
    """Records after the resumed step go (step 0: a crash before the first checkpoint), and so does
    a last line that a kill cut short, which the next record would otherwise be appended to."""
    from jaxllm.metrics import MetricsWriter, read_metrics, truncate_metrics

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (10, 20, 30)]
    path.write_text("".join(lines) + '{"step": 40, "lo')
    truncate_metrics(str(path), 20)
    MetricsWriter(str(tmp_path), tensorboard=False).write({"step": 30, "loss": 2.0})
    assert [(r["step"], r["loss"]) for r in read_metrics(str(path))] == [(10, 1.0), (20, 1.0), (30, 2.0)]
    truncate_metrics(str(path), 0)
    assert path.read_text() == ""
    kept = "".join(lines)
    path.write_text(kept)
    truncate_metrics(str(path), 30)  # nothing to drop: left as it is
    assert path.read_text() == kept
    path.write_text(kept + '{"step": 40, "lo')  # a cut last line and no record past the step: the line goes
    truncate_metrics(str(path), 30)
    MetricsWriter(str(tmp_path), tensorboard=False).write({"step": 40, "loss": 3.0})
    assert [r["step"] for r in read_metrics(str(path))] == [10, 20, 30, 40]


def test_the_loss_curve_plots_each_logged_step_once_and_is_replaced_whole(tmp_path, monkeypatch):
    """loss.png: loss and learning rate against the steps metrics.jsonl holds (a line a kill cut
    short left out), written under a temporary name and renamed; nothing to plot, no picture."""
    import matplotlib.pyplot as plt

    from jaxllm.metrics import plot_loss_curve

    path, png = tmp_path / "metrics.jsonl", tmp_path / "loss.png"
    assert plot_loss_curve(str(path), str(png)) is None and not png.exists()
    records = [{"step": s, "loss": 9.0 - s / 10, "lr": s * 1e-4} for s in (1, 10, 20)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 30, "lo')
    png.write_bytes(b"an older picture")
    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), close(fig)))
    assert plot_loss_curve(str(path), str(png)) == str(png)
    (fig,) = figures
    curves = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
              for ax in fig.axes for line in ax.get_lines()}
    steps = [r["step"] for r in records]
    assert curves == {"loss": (steps, [r["loss"] for r in records]), "learning rate": (steps, [r["lr"] for r in records])}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path)) == ["loss.png", "metrics.jsonl"]


def test_tensorboard_drops_what_a_crashed_run_logged_after_the_step_resumed_from(tmp_path):
    """A run logged steps 1-6 and crashed after its checkpoint at step 3; the resumed run logs 4-6
    again. As metrics.jsonl is truncated, TensorBoard (which reads every event file of the
    directory) shows each step once, the resumed run's: the writer starts with a restart event."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator

    from jaxllm.metrics import MetricsWriter

    def log(steps, loss, start):
        writer = MetricsWriter(str(tmp_path), start_step=start)
        for step in steps:
            writer.write({"step": step, "loss": loss})
        writer.close()
        time.sleep(1.1)  # (event files are named by the second they were opened in)

    log(range(1, 7), 1.0, start=0)
    log(range(4, 7), 2.0, start=3)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    got = [(e.step, round(float(np.asarray(e.tensor_proto.float_val[0])), 1)) for e in events.Tensors("loss")]
    assert got == [(1, 1.0), (2, 1.0), (3, 1.0), (4, 2.0), (5, 2.0), (6, 2.0)], got
    assert "loss" in events.Tags()["tensors"] and "step" not in events.Tags()["tensors"]  # the x axis, not a curve


def test_readers_take_the_newest_step_when_a_running_trainer_rotates_theirs_away(trained_ckpt, tmp_path):
    """`generate.py` or `flax_to_torch.py` on a run still training with `--keep`: the step they read
    was deleted under them (an unreadable-looking error). They read the newest one instead; a step
    that is still there and fails is damage and raised at once, as is any failure of a named step."""
    from jaxllm import checkpoint

    run = tmp_path / "run"
    shutil.copytree(trained_ckpt, run)
    calls = []

    def read(mngr, step):
        calls.append(step)
        if len(calls) == 1:  # meanwhile the trainer saves step 2 and deletes step 1
            shutil.copytree(run / "1", run / "2")
            shutil.rmtree(run / "1")
            raise checkpoint.CheckpointError("cannot restore weights (Truncated Zstd-compressed stream)")
        return checkpoint.read_meta(mngr, step)["config"]["vocab_size"]

    assert checkpoint.read_step(str(run), None, read) == 512 and calls == [1, 2]

    def damaged(mngr, step):
        calls.append(step)
        raise checkpoint.CheckpointError("damaged")

    for step in (None, 2):
        calls.clear()
        with pytest.raises(checkpoint.CheckpointError, match="damaged"):
            checkpoint.read_step(str(run), step, damaged)
        assert calls == [2]
    model, config = checkpoint.load(run)
    assert config.vocab_size == 512


def test_readers_leave_a_save_in_progress_alone(trained_ckpt, tmp_path):
    """Generation, `jaxllm.load`, `--init-from` and the export read a directory that a trainer may be
    saving into: none of them deletes the save's temporary directory (a writer's manager would)."""
    import jaxllm
    from convert.hf_export import read_flax_checkpoint
    from jaxllm import checkpoint

    ckpt = tmp_path / "ck"
    shutil.copytree(trained_ckpt, ckpt)
    in_progress = ckpt / "2.orbax-checkpoint-tmp-1764400000000000"
    (in_progress / "params").mkdir(parents=True)
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import generate
    finally:
        sys.path.pop(0)
    config, _, _ = generate.checkpoint_info(str(ckpt), "orbax")
    assert jaxllm.load(ckpt)[1] == config and checkpoint.latest_step(ckpt) == 1
    read_flax_checkpoint(str(ckpt), None)
    assert in_progress.is_dir()


def test_resuming_on_another_token_stream_is_refused_and_the_checkpoint_kept(trained_ckpt, tmp_path, capsys):
    """The saved data position points into one stream (dataset, tokenizer, seed, ...): continuing it
    on another would not give the batches the run would have seen."""
    ckpt = tmp_path / "ck"
    shutil.copytree(trained_ckpt, ckpt)
    before = sorted(os.listdir(ckpt))
    (tmp_path / "other.txt").write_text("Another corpus.\n\nWith two documents.\n")
    from jaxllm import data
    from jaxllm.config import LLMConfig

    # another tokenizer that fits the model (the embedded one trained to 300 tokens); the run's own,
    # saved elsewhere, would tokenize alike and resume (`data.same_tokenization`)
    data.model_tokenizer(None, LLMConfig.from_preset("tiny", vocab_size=300)).save_pretrained(tmp_path / "tok")
    for args, flag in ((["--dataset", str(tmp_path / "other.txt")], "--dataset"), (["--seed", "5"], "--seed"),
                       (["--tokenizer", str(tmp_path / "tok")], "--tokenizer")):
        code, err = _main(BASE + ["--ckpt-dir", str(ckpt), "--steps", "2"] + args, capsys)
        assert code == 2 and len(err.splitlines()) == 1, err
        assert err.startswith(f"train_jax.py: error: {flag} ") and "start a new --ckpt-dir" in err, err
    assert sorted(os.listdir(ckpt)) == before
    code, _ = _main(BASE + ["--ckpt-dir", str(ckpt), "--steps", "2"], capsys)  # the same settings resume
    assert code == 0 and "2" in os.listdir(ckpt)


def test_a_shuffled_dataset_resumes_exactly_and_only_with_the_same_buffer(tmp_path, capsys, monkeypatch):
    """`--shuffle-buffer`: a run resumed from its step 2 ends with the losses it had running
    straight through (the resumed stream re-reads the same shuffled order); the buffer is part of
    the stream, so a resume with another one is refused and the checkpoint kept."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for k in range(2):
        (data_dir / f"part-{k}.jsonl").write_text(
            "".join(json.dumps({"text": f"Document {k}-{i}: " + "word " * (i % 23)}) + "\n" for i in range(60)))

    def argv(ck, steps, buffer="16"):
        return BASE + ["--steps", str(steps), "--save-every", "2", "--log-every", "1", "--ckpt-dir", str(ck),
                       "--dataset", str(data_dir), "--shuffle-buffer", buffer]

    def losses(ck):
        return [json.loads(line)["loss"] for line in (ck / "metrics.jsonl").read_text().splitlines()]

    assert _main(argv(tmp_path / "straight", 4), capsys)[0] == 0
    shutil.copytree(tmp_path / "straight", tmp_path / "ck")
    shutil.rmtree(tmp_path / "ck" / "4")  # as if stopped after the checkpoint of step 2
    before = sorted(os.listdir(tmp_path / "ck"))
    code, err = _main(argv(tmp_path / "ck", 4, buffer="8"), capsys)
    assert code == 2 and err.startswith("train_jax.py: error: --shuffle-buffer 8 differs from the 16 that "), err
    assert sorted(os.listdir(tmp_path / "ck")) == before
    assert _main(argv(tmp_path / "ck", 4), capsys)[0] == 0
    np.testing.assert_allclose(losses(tmp_path / "ck"), losses(tmp_path / "straight"), rtol=1e-6)
    assert _main(argv(tmp_path / "unshuffled", 2, buffer="0"), capsys)[0] == 0
    assert losses(tmp_path / "unshuffled") != losses(tmp_path / "straight")[:2]


def test_a_resume_without_model_flags_trains_the_model_it_holds(trained_ckpt, tmp_path, capsys):
    """Run again without --preset (or with neither of a run started from --init-from's flags): the
    run resumes the model its checkpoint holds. It was refused as another model than the default
    preset's. A new directory still gets the default preset."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import train_jax
    finally:
        sys.path.pop(0)
    ckpt = tmp_path / "ck"
    shutil.copytree(trained_ckpt, ckpt)
    without = [a for a in BASE if a not in ("--preset", "tiny")]
    assert train_jax.parse_args(without + ["--ckpt-dir", str(tmp_path / "new")])[1].preset == "small"
    assert train_jax.parse_args(without + ["--ckpt-dir", str(ckpt), "--preset", "tiny"])[1].preset == "tiny"
    code = train_jax.main(without + ["--ckpt-dir", str(ckpt), "--steps", "2"])
    out = capsys.readouterr().out
    assert code == 0 and _steps(ckpt) == [1, 2], out
    assert f"M parameters (the model of {ckpt})" in out and "resum" in out, out
    # The settings a resume changes are named (the checkpoint of step 1 recorded --steps 1).
    assert "note: resumed with other settings than the checkpoint's: --steps 2 (was 1)\n" in out, out
    assert train_jax.main(without + ["--ckpt-dir", str(ckpt), "--steps", "3"]) == 0
    assert "--steps 3 (was 2)" in capsys.readouterr().out
    assert train_jax.main(without + ["--ckpt-dir", str(ckpt), "--steps", "3"]) == 0  # nothing changed: no note
    assert "note: resumed" not in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["missing", "not JSON"])
def test_a_resume_without_model_flags_passes_over_a_latest_step_whose_metadata_is_unreadable(
        damage, trained_ckpt, tmp_path, capsys):
    """Its model was taken to be the default preset's, and the step before it, which the resume
    falls back to, was refused as "another model"; it resumes that step, the unreadable one set
    aside, as with --preset."""
    ckpt = tmp_path / "ck"
    shutil.copytree(trained_ckpt, ckpt)
    shutil.copytree(ckpt / "1", ckpt / "2")
    if damage == "missing":
        shutil.rmtree(ckpt / "2" / "meta")
    else:
        (ckpt / "2" / "meta" / "metadata").write_text("{")
    without = [a for a in BASE if a not in ("--preset", "tiny")]
    code = train_jax_main(without + ["--ckpt-dir", str(ckpt), "--steps", "1"])  # (nothing to train: no compile)
    out = capsys.readouterr()
    assert code == 0, out.err
    assert f"resuming from {ckpt} at step 1" in out.out and f"(the model of {ckpt})" in out.out, out.out
    assert "warning: cannot use checkpoint step 2" in out.err, out.err
    assert _steps(ckpt) == [1] and [d for d in os.listdir(ckpt) if d.startswith("2.unreadable-")]  # kept


def test_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path, capsys):
    from jaxllm.data import load_tokenizer

    tok = load_tokenizer(None, vocab_size=1024)  # tiny's vocabulary is 512
    tok.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    code, err = _main(BASE + ["--ckpt-dir", str(tmp_path / "ck"), "--tokenizer", str(tmp_path / "tokenizer.json")],
                      capsys)
    print(err)
    assert code == 2 and "vocab_size" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "ck").exists()


def test_no_resume_refuses_a_directory_with_checkpoints(trained_ckpt, capsys):
    before = sorted(os.listdir(trained_ckpt))
    code, err = _main(BASE + ["--ckpt-dir", str(trained_ckpt), "--no-resume"], capsys)
    assert code == 2 and "--no-resume" in err and len(err.splitlines()) == 1
    assert sorted(os.listdir(trained_ckpt)) == before


def test_a_directory_another_run_is_training_in_is_refused_and_left_alone(trained_ckpt, tmp_path, capsys,
                                                                          monkeypatch):
    """The same command started twice: the second run stops (exit 2, one line) before it reads,
    moves, truncates or saves anything in the first one's --ckpt-dir, also when that directory
    appears only while the second run starts. A run's lock ends with it."""
    from jaxllm import loop, stopping

    ckpt = tmp_path / "ck"
    shutil.copytree(trained_ckpt, ckpt)
    (ckpt / "2.orbax-checkpoint-tmp-1764400000000000").mkdir()  # the other run's save in progress
    before = tree_listing(ckpt)
    other = stopping.hold(str(ckpt))  # (another open file description: as another process's)
    assert other is not None
    try:
        code, err = _main(BASE + ["--ckpt-dir", str(ckpt), "--steps", "3"], capsys)
    finally:
        os.close(other)
    assert code == 2 and len(err.splitlines()) == 1 and "is in use by another training run" in err, err
    assert tree_listing(ckpt) == before

    fresh, held = tmp_path / "fresh", []
    real_check_prompts = loop.check_prompts

    def another_run_starts_meanwhile(*args):
        fresh.mkdir()
        held.append(stopping.hold(str(fresh)))
        return real_check_prompts(*args)

    monkeypatch.setattr(loop, "check_prompts", another_run_starts_meanwhile)
    try:
        code, err = _main(BASE + ["--ckpt-dir", str(fresh)], capsys)
    finally:
        os.close(held[0])
    assert code == 2 and "is in use by another training run" in err and os.listdir(fresh) == [], err

    def another_run_saved_meanwhile(*args):  # ... and ended: this run takes the lock, then looks again
        shutil.copytree(trained_ckpt, fresh, dirs_exist_ok=True)
        return real_check_prompts(*args)

    fresh.rmdir()
    monkeypatch.setattr(loop, "check_prompts", another_run_saved_meanwhile)
    code, err = _main(BASE + ["--ckpt-dir", str(fresh)], capsys)
    assert code == 2 and "another run saved checkpoints there (steps [1])" in err, err
    assert _steps(fresh) == [1]
    os.close(stopping.hold(str(fresh)))  # released by the run that took it (InUse otherwise)


def test_a_pytorch_run_that_saved_in_a_new_directory_while_this_run_started_is_left_alone(tmp_path, capsys,
                                                                                            monkeypatch):
    """train_torch.py and train_jax.py started together on a new --ckpt-dir, the PyTorch run saving
    and ending before the JAX run took the directory's lock: the JAX run looked again for its own
    kind of checkpoint only, truncated the PyTorch run's metrics.jsonl to nothing, trained and
    saved its steps beside the Trainer's (exit status 0). Now one line and exit status 2, as for a
    PyTorch run found at the start."""
    from jaxllm import loop

    fresh = tmp_path / "fresh"
    real_check_prompts = loop.check_prompts
    metrics = "".join(json.dumps({"step": s, "loss": 6.0, "lr": 1e-3}) + "\n" for s in (1, 2))

    def a_pytorch_run_saved_meanwhile(*args):
        (fresh / "checkpoint-2").mkdir(parents=True)
        (fresh / "metrics.jsonl").write_text(metrics)
        return real_check_prompts(*args)

    monkeypatch.setattr(loop, "check_prompts", a_pytorch_run_saved_meanwhile)
    code, err = _main(BASE + ["--ckpt-dir", str(fresh)], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "holds a PyTorch run" in err, err
    assert sorted(os.listdir(fresh)) == ["checkpoint-2", "metrics.jsonl"]
    assert (fresh / "metrics.jsonl").read_text() == metrics


def test_a_directory_of_an_earlier_run_without_a_readable_step_is_refused_and_kept(tmp_path, capsys):
    """A PyTorch Trainer's output directory, or one whose steps were all set aside as unreadable:
    exit 2 naming what is there, before its metrics.jsonl is truncated or its loss.png replaced.
    What a run stopped before its first checkpoint leaves starts again, and --no-resume into an
    empty directory still trains."""
    cases = {"torch": (["checkpoint-4", "checkpoint-8"], "holds a PyTorch run (Hugging Face Trainer checkpoints: "
                                                        "checkpoint-4, checkpoint-8), no JAX checkpoint"),
             "set aside": (["4.unreadable-20250101-000000"], "holds an earlier run (4.unreadable-20250101-000000, "
                                                             "loss.png, metrics.jsonl) but no readable checkpoint")}
    for name, (dirs, needle) in cases.items():
        ckpt = tmp_path / name
        for d in dirs:
            (ckpt / d).mkdir(parents=True)
        (ckpt / "metrics.jsonl").write_text(json.dumps({"step": 4, "loss": 5.0}) + "\n")
        (ckpt / "loss.png").write_bytes(b"png")
        before = sorted(os.listdir(ckpt))
        code, err = _main(BASE + ["--ckpt-dir", str(ckpt)], capsys)
        assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
        assert sorted(os.listdir(ckpt)) == before and (ckpt / "loss.png").read_bytes() == b"png"
        assert (ckpt / "metrics.jsonl").read_text() == json.dumps({"step": 4, "loss": 5.0}) + "\n"
    crashed = tmp_path / "crashed"
    (crashed / "tensorboard").mkdir(parents=True)
    (crashed / "2.orbax-checkpoint-tmp-1764400000000000").mkdir()
    (crashed / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 5.0}) + "\n")
    from jaxllm.loop import check_no_earlier_run

    check_no_earlier_run(str(crashed))
    for leftover in ("4.unreadable-20250101-000000", "loss.png"):  # each alone is an earlier run too
        alone = tmp_path / f"only {leftover}"
        alone.mkdir()
        if leftover == "loss.png":
            (alone / leftover).write_bytes(b"png")
        else:
            (alone / leftover).mkdir()
        with pytest.raises(ValueError, match=f"holds an earlier run \\({re.escape(leftover)}\\) but no readable"):
            check_no_earlier_run(str(alone))
    (tmp_path / "empty").mkdir()
    capsys.readouterr()
    assert train_jax_main(BASE + ["--ckpt-dir", str(tmp_path / "empty"), "--steps", "1", "--no-resume"]) == 0
    assert _steps(tmp_path / "empty") == [1]
    # (BASE keeps the default warm-up of 30 steps: more than the run)
    assert "warning: --warmup-steps 30 is more than --steps 1" in capsys.readouterr().out


def test_a_directory_that_takes_no_locks_is_trained_in_with_a_warning(tmp_path, monkeypatch, capsys):
    """NFS takes no `flock` on a directory (EBADF), nor Lustre without `-o flock`: the run goes on,
    and says that a second run would not be stopped."""
    import errno
    import fcntl

    from jaxllm import stopping

    def no_locks(fd, op):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    lock = stopping.RunLock()
    assert lock.take(str(tmp_path)) is None and lock.fd is None
    assert "cannot be locked on its file system: a second run started in it would not be stopped" in \
        capsys.readouterr().err


def test_a_directory_that_cannot_be_written_is_refused_before_training(trained_ckpt, tmp_path, capsys, monkeypatch):
    """A resume into a read-only --ckpt-dir (`chattr +i`, a read-only mount: here a refused test
    file) trained up to its first save, then failed: now exit 2 at the start, the lock released."""
    import tempfile

    from jaxllm import stopping

    run = tmp_path / "run"
    shutil.copytree(trained_ckpt, run)
    before = tree_listing(run)
    real = tempfile.NamedTemporaryFile

    def read_only(*args, dir=None, **kw):
        if dir == str(run):
            raise PermissionError(1, "Operation not permitted")
        return real(*args, dir=dir, **kw)

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    code, err = _main(BASE + ["--ckpt-dir", str(run), "--steps", "3"], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"--ckpt-dir {run} cannot be written (Operation not permitted)" in err, err
    assert tree_listing(run) == before
    os.close(stopping.hold(str(run)))  # (InUse if the refused run had kept its lock)


def test_a_checkpoint_inside_a_run_or_a_model_directory_is_refused_as_the_run_s_directory(trained_ckpt, tmp_path,
                                                                                            capsys):
    """--ckpt-dir pointing at the step to resume from (or at a PyTorch checkpoint, or at a model
    directory) started a new run from random weights inside it, exit status 0: now one line, exit
    status 2, the way to resume or convert, and the directory as it was."""
    run = tmp_path / "run"
    shutil.copytree(trained_ckpt, run)
    trainer_ckpt, model_dir = tmp_path / "torch-run" / "checkpoint-4", tmp_path / "model-hf"
    for d in (trainer_ckpt, model_dir):
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
        (d / "model.safetensors").write_bytes(b"")
    (trainer_ckpt / "trainer_state.json").write_text("{}")
    for path, needle in ((run / "1", f"is one step of a JAX run's checkpoint directory, not a training run's "
                                     f"directory: to resume that run, pass the directory above it ({run})"),
                         (trainer_ckpt, f"is one checkpoint of a PyTorch (Trainer) run, not a training run's directory: "
                                        f"convert/torch_to_flax.py {trainer_ckpt} makes"),
                         (model_dir, "is a Hugging Face model directory (config.json and weights), not a training "
                                     "run's directory")):
        before = tree_listing(path)
        code, err = _main(BASE + ["--ckpt-dir", str(path)], capsys)
        assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
        assert tree_listing(path) == before
    # a run's directory that keeps the user's --config file (no weights) is a run's directory
    from jaxllm.cli import not_a_run_directory

    (model_dir / "model.safetensors").unlink()
    assert not_a_run_directory(str(model_dir), "jax") is None and not_a_run_directory(str(model_dir), "torch") is None


def test_the_small_helpers_of_messages_and_listings(tmp_path):
    """`listing` shows up to four items; `step_dirs` counts numbered directories only (a file
    named `7` is no step); a signal that only other processes got is named by the first of them."""
    from jaxllm.cli import listing, step_dirs
    from jaxllm.stopping import SignalStop

    assert listing(list("abcd")) == "a, b, c, d" and listing(list("abcde")) == "a, b, c, d and 1 more"
    (tmp_path / "3").mkdir()
    (tmp_path / "7").write_text("")
    (tmp_path / "x1").mkdir()
    assert step_dirs(str(tmp_path)) == [3] and step_dirs(str(tmp_path / "7")) == []
    stop = SignalStop()
    assert stop.agreed([]) is None and stop.agreed([0, 1]) == "a signal to process 0"
    stop.requested = "SIGINT"
    assert stop.agreed([0, 1]) == "SIGINT"


def test_non_finite_loss_stops_the_run_naming_the_step_or_is_skipped(tmp_path, capsys):
    # A learning rate of 1e30 overflows the weights after the first real update: the loss of a
    # following step is not finite.
    argv = BASE + ["--lr", "1e30", "--warmup-steps", "0", "--steps", "4", "--save-every", "1"]
    code, err = _main(argv + ["--ckpt-dir", str(tmp_path / "stop")], capsys)
    print(err)
    assert code == 1 and "non-finite loss or gradient at step" in err
    saved = _steps(tmp_path / "stop")
    assert saved and max(saved) < 4  # nothing after the bad step was saved
    # Skipping: the overflowed weights never recover, so after 10 skipped batches in a row the run
    # gives up with a message instead of looping for ever.
    code, err = _main(argv + ["--ckpt-dir", str(tmp_path / "skip"), "--skip-nonfinite"], capsys)
    print(err)
    assert code == 1 and "10 batches in a row" in err


def test_the_last_line_names_the_steps_of_the_losses_it_shows():
    """Both trainers end with `metrics.end_line`: after a resume the first logged loss is the
    resumed run's (step 61 here), not the training's first, and the line says so."""
    from jaxllm.metrics import end_line

    first, last = {"step": 61, "loss": 6.36151}, {"step": 200, "loss": 6.04068}
    assert end_line(False, 200, first, last, 12.34) == "done: step 200, loss 6.3615 at step 61 -> 6.0407 at step 200 in 12.3 s"
    assert end_line(True, 7, None, None, 1.0) == "stopped: step 7 in 1.0 s"


def _non_finite_calls(monkeypatch, bad):
    """Make train_jax.py's step report a non-finite loss at its calls numbered in `bad` (from 1,
    counted over every run of the test; a stand-in: what the loop does with such a step is what is
    tested). Returns the list that grows by one item a call."""
    from types import SimpleNamespace

    import jax
    import jax.numpy as jnp

    from jaxllm import train

    calls = []
    real_init = train.Trainer.__init__

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        jitted = self.step_fn

        def lower(*args):
            compiled = jitted.lower(*args).compile()

            def run(state, batch):
                calls.append(None)
                if len(calls) not in bad:
                    return compiled(state, batch)
                # the state unchanged (as the step's guard leaves it), the metrics of a step
                _, m = compiled(jax.tree.map(jnp.copy, state), batch)
                return state, {**m, "finite": jnp.asarray(False)}
            return SimpleNamespace(compile=lambda: run)
        self.step_fn = SimpleNamespace(lower=lower)

    monkeypatch.setattr(train.Trainer, "__init__", init)
    return calls


def test_the_count_of_skipped_non_finite_steps_carries_over_a_resume(tmp_path, capsys, monkeypatch):
    """`skipped_nonfinite` in metrics.jsonl counts the whole training's skipped steps: the resumed
    run continues from the checkpoint's count (it restarted at 0). The second step call of the
    first run is reported non-finite here (a stand-in: what the loop does with such a step is what
    is tested)."""
    calls = _non_finite_calls(monkeypatch, {2})
    ck = tmp_path / "ck"
    # (each run saves its last step only: the resume is from step 3, after the skipped step)
    argv = BASE + ["--save-every", "100", "--log-every", "1", "--skip-nonfinite", "--ckpt-dir", str(ck)]
    assert _main([*argv, "--steps", "3"], capsys)[0] == 0
    assert _steps(ck) == [3]
    assert _main([*argv, "--steps", "5"], capsys)[0] == 0
    records = [json.loads(line) for line in (ck / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["skipped_nonfinite"]) for r in records] == [(1, 0), (2, 1), (3, 1), (4, 1), (5, 1)]
    assert len(calls) == 6


def test_the_streak_of_skipped_non_finite_steps_carries_over_a_resume(tmp_path, capsys, monkeypatch):
    """--skip-nonfinite gives up after MAX_CONSECUTIVE_SKIPS non-finite steps in a row (4 here). A
    checkpoint saved inside a streak (a SIGTERM after two skipped batches, saving step 3) carries
    the streak: the resumed run gives up after two more, as a run that was not stopped would (the
    streak restarted at 0 and it went on). A checkpoint saved before the streak was recorded
    resumes with none."""
    from jaxllm import checkpoint as ckpt_lib
    from jaxllm import loop

    calls = _non_finite_calls(monkeypatch, {4, 5, 6, 7})
    monkeypatch.setattr(loop, "MAX_CONSECUTIVE_SKIPS", 4)
    real_agreed = loop._Stop.agreed

    def agreed(self):  # SIGTERM once, after the second skipped batch (the fifth call)
        if len(calls) == 5 and not stopped:
            stopped.append("SIGTERM")
            return "SIGTERM"
        return real_agreed(self)

    stopped = []
    monkeypatch.setattr(loop._Stop, "agreed", agreed)
    ck = tmp_path / "ck"
    argv = BASE + ["--save-every", "2", "--log-every", "1", "--skip-nonfinite", "--steps", "6", "--ckpt-dir", str(ck)]
    code, err = _main(argv, capsys)
    assert code == 143 and _steps(ck) == [2, 3], err
    data = ckpt_lib.read_step_info(str(ck))[1]["data"]
    old = tmp_path / "old"  # the same checkpoint as saved before the streak was recorded
    shutil.copytree(ck, old)
    meta_file = old / "3" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["data"].pop("consecutive_nonfinite", None)
    meta_file.write_text(json.dumps(meta))
    code, err = _main(argv, capsys)
    assert code == 1 and "4 batches in a row gave a non-finite loss or gradient at step 4" in err, err
    assert len(calls) == 7 and _steps(ck) == [2, 3]
    assert (data["skipped_nonfinite"], data["consecutive_nonfinite"]) == (2, 2)
    code, err = _main([*argv[:-1], str(old)], capsys)  # (the calls from the eighth on are finite)
    assert code == 0 and _steps(old)[-1] == 6, err


def test_a_checkpoint_save_is_left_out_of_the_throughput_of_its_logging_window(tmp_path, capsys, monkeypatch):
    """Each save (2 s long here) was counted in the tokens/s, step time and MFU of the logging
    window it fell in: a window with a save showed a falsely low throughput. They are the steps'
    own now, and `save_s` holds the seconds spent saving in the window (its wall time is the steps'
    time plus that)."""
    import jax

    from jaxllm import checkpoint as ckpt_lib
    from jaxllm.config import LLMConfig
    from jaxllm.flops import training_flops_per_token

    real_save = ckpt_lib.save

    def slow_save(*a, **kw):
        time.sleep(2.0)
        return real_save(*a, **kw)

    monkeypatch.setattr(ckpt_lib, "save", slow_save)
    ck = tmp_path / "ck"
    argv = BASE + ["--steps", "4", "--save-every", "1", "--log-every", "2", "--peak-flops", "1e12", "--ckpt-dir", str(ck)]
    code, err = _main(argv, capsys)
    assert code == 0, err
    records = [json.loads(line) for line in (ck / "metrics.jsonl").read_text().splitlines()]
    # logged at steps 1 (the first), 2 and 4; saves after steps 1, 2, 3 and 4 (the last, after its line)
    assert [r["step"] for r in records] == [1, 2, 4]
    tokens_per_step = 8 * 32
    flops_per_token = training_flops_per_token(LLMConfig.from_preset("tiny"), 32)
    for r in records:
        # the windows of steps 2 and 4 hold saves: their steps alone take milliseconds (a save's 2 s
        # counted made them >= 1 s); step 1's window holds no save but the first step's compile
        assert r["step"] == 1 or r["step_time_s"] < 1.0, r
        assert r["tokens_per_sec"] == pytest.approx(tokens_per_step / r["step_time_s"])
        assert r["mfu"] == pytest.approx(r["tokens_per_sec"] * flops_per_token / (1e12 * jax.device_count()))
    assert records[0]["save_s"] == 0.0
    assert records[1]["save_s"] >= 2.0 and records[2]["save_s"] >= 4.0  # one save, then two


def test_a_data_error_mid_run_saves_the_steps_taken_first(tmp_path, capsys, monkeypatch):
    """A corrupt record met mid-run (a second jsonl shard that is not JSON, reached after some 38
    steps: the first shard's 1,100 documents outlast the 1,024-row batch read at the start) ends
    the run with its one line, exit 2, after saving the steps since the last checkpoint. A resume
    meets the same error at once and writes nothing more; once the shard is mended in place (the
    same size: the same stream), it resumes where the data stopped, with the losses of a run that
    read the mended data without stopping."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "a.jsonl").write_text("".join(json.dumps({"text": f"Doc {i}."}) + "\n" for i in range(1100)))
    good = json.dumps({"text": "The end of the data, now readable."})
    (shards / "b.jsonl").write_text("this line is not JSON".ljust(len(good)) + "\n")
    steps = 45  # (the error comes at step 38: the resume then trains 7 steps on the mended data)

    def argv(ck):
        return ["--preset", "tiny", "--seq-len", "32", "--batch-size", "8", "--steps", str(steps), "--save-every", "10",
                "--keep", "10", "--log-every", "1", "--max-new-tokens", "0", "--no-progress", "--ckpt-dir", str(ck),
                "--dataset", str(shards)]

    def losses(ck):
        return {r["step"]: r["loss"] for r in map(json.loads, (ck / "metrics.jsonl").read_text().splitlines())}

    ck = tmp_path / "ck"
    code, err = _main(argv(ck), capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "JSON parse error" in err, err
    m = re.search(r"\(saved a checkpoint at step (\d+) in .* first\)$", err)
    assert m, err
    step = int(m.group(1))
    saved = list(range(10, step, 10)) + [step]  # the periodic saves kept, then the one before the error
    assert 10 < step < steps - 3 and step % 10 and _steps(ck) == saved
    code, err = _main(argv(ck), capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "JSON parse error" in err, err
    assert _steps(ck) == saved
    (shards / "b.jsonl").write_text(good + "\n")  # mended, the same size
    code, err = _main(argv(ck), capsys)
    assert code == 0, err
    # (its one save at the end: its saves do not change its losses)
    code, err = _main(argv(tmp_path / "straight") + ["--save-every", str(steps)], capsys)
    assert code == 0, err
    resumed, straight = losses(ck), losses(tmp_path / "straight")
    assert sorted(resumed) == sorted(straight) == list(range(1, steps + 1))
    np.testing.assert_allclose([resumed[s] for s in range(step + 1, steps + 1)],
                               [straight[s] for s in range(step + 1, steps + 1)], rtol=1e-6)
