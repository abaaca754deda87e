"""What stops a training run, shared by both trainers (pure Python: the PyTorch side imports no
JAX): another run already training in the same directory, an input that fails in some of its
processes, a non-finite step, and a signal asking to save and stop."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import threading
from typing import Callable, Iterator

try:
    import fcntl
except ImportError:  # Windows: no locks (`hold` returns None)
    fcntl = None


class InUse(OSError):
    """Another open file description holds the lock on the path (another run, or another
    `hold` of it in this process)."""


def hold(path: str) -> int | None:
    """A file descriptor of `path` (a directory or a file) holding an exclusive advisory lock
    (`flock`), released when it is closed or when the process ends, however it ends. None where
    `path` cannot be opened or its file system takes no locks (and on Windows): the caller goes on
    unlocked. InUse when another holds it."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise InUse(e.errno, f"{path} is locked") from None
        return None  # (ENOLCK, EBADF, ...: a file system without such locks)
    return fd


class RunLock:
    """What a training run holds on its checkpoint directory while it runs (`take`), so that a
    second run started in the same directory (the same command in another terminal, a job queued
    twice) stops with an error before it touches anything there: the two would otherwise save
    over each other's steps and interleave their metrics. Taken by one process of a multi-process
    run. Held until `release` (or the process ends); no file is left behind: the directory itself
    is locked."""

    def __init__(self):
        self.fd: int | None = None

    def take(self, path: str, flag: str = "--ckpt-dir") -> ValueError | None:
        """Lock the directory `path` and check that a file can be made in it (once; later calls do
        nothing). Returns, does not raise, the error when another run holds it or when it cannot
        be written (a resume into a read-only directory trained up to its first save), so that a
        multi-process run can agree on it first."""
        if self.fd is not None:
            return None
        import tempfile

        try:
            self.fd = hold(path)
        except InUse:
            return ValueError(f"{flag} {path} is in use by another training run (it holds the directory's lock); "
                              f"wait for that run to end, or use another {flag}")
        if self.fd is None and fcntl is not None:  # (NFS takes no `flock` on a directory; Lustre without -o flock)
            print(f"warning: {flag} {path} cannot be locked on its file system: a second run started in it would "
                  "not be stopped", file=sys.stderr, flush=True)
        try:
            with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
                pass
        except OSError as e:
            self.release()
            return ValueError(f"{flag} {path} cannot be written ({e.strerror or e}): the run saves its checkpoints "
                              "there")
        return None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def raise_where_failed(error: Exception | None, what: str, where: Callable[[bool], list[int]], count: int) -> None:
    """Collective over a trainer's `count` processes, through its `where` (the processes where a
    flag holds; every process must call it): raise `error` where it happened, and a ValueError
    naming the failed processes everywhere else. An input that fails on some processes only (a
    file missing on one host, an empty data share) then ends every process with its one-line
    error, instead of leaving the others waiting in the next collective."""
    failed = where(error is not None)
    if error is not None:
        raise error
    if failed:
        raise ValueError(f"{what} failed in process(es) {', '.join(map(str, failed))} of {count} (see their error)")


@contextlib.contextmanager
def failing_together(what: str, agree: Callable[[Exception | None, str], None]) -> Iterator[None]:
    """`with failing_together("opening the data", raise_if_any_failed): ...` around start-up checks
    that every process of a run makes and that may fail in some of them only (a file missing on
    one host). The block must make no collective. Its exception (a ValueError or OSError for bad
    input) is held until the block has ended, then `agree(error, what)` (each trainer's
    `raise_where_failed`) raises it where it happened and a ValueError naming the failed processes
    everywhere else: every process ends with one line, where the others went on to their next
    collective and died there with a traceback (PyTorch) or a lost peer (JAX)."""
    error = None
    try:
        yield
    except Exception as e:  # noqa: BLE001 - (a bug too: the others must not wait for this process)
        error = e
    agree(error, what)


def check_shared_directory(path: str, flag: str, *, index: int, count: int, broadcast: Callable[[int], int],
                           where: Callable[[bool], list[int]], wait_s: float = 10.0) -> None:
    """ValueError in every process unless all of them see `path` (or, while it does not exist, its
    nearest existing parent) as process 0 does: a file that process 0 writes there (and removes
    right after) is found by each within `wait_s` seconds. The processes of a multi-host run save
    their checkpoints together (JAX: Orbax's process 0 creates each step's directories and every
    process writes its shards into them; PyTorch: each process writes its data position and random
    state beside process 0's weights), so on per-host disks a first save hung or a resume saw
    different checkpoints in different processes. Collective, over a trainer's `count` processes
    (this one: `index`), through its `broadcast` (process 0's int to all) and `where` (as in
    `raise_where_failed`)."""
    import secrets
    import time

    seen = path
    while not os.path.isdir(seen) and os.path.dirname(seen) != seen:
        seen = os.path.dirname(seen)
    marker = os.path.join(seen, f".jaxllm-shared-{broadcast(secrets.randbits(31) if index == 0 else 0)}")
    error = None
    if index == 0:
        try:
            with open(marker, "w") as f:
                f.write("written by process 0 to check that every process sees this directory\n")
        except OSError as e:
            error = ValueError(f"{flag} {path}: cannot write in {seen} ({e})")
    raise_where_failed(error, f"writing in {flag}", where, count)
    deadline = time.monotonic() + wait_s
    while not os.path.exists(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    missing = where(not os.path.exists(marker))
    if index == 0:
        os.remove(marker)
    if missing:
        raise ValueError(f"{flag} {path} is not one directory shared by all processes: process(es) "
                         f"{', '.join(map(str, missing))} of {count} do not see what process 0 wrote in "
                         f"{seen}; a multi-host run needs a directory that every host sees (a shared file system)")


def check_same_checkpoints(found: str, path: str, *, count: int, broadcast: Callable[[int], int],
                           where: Callable[[bool], list[int]]) -> None:
    """ValueError in every process unless all of them found in the checkpoint directory `path` what
    process 0 found there (`found`: this process's account of it, such as the steps listed or the
    checkpoint it would resume). Each process used to choose on its own: one that saw the
    directory late (a shared file system's cache not yet up to date) resumed another step than the
    others, or started afresh, and their collectives then parted ways. Nothing is changed: the same
    command, run again, looks again. Collective (`broadcast` and `where` as in
    `check_shared_directory`)."""
    import zlib

    mine = zlib.crc32(found.encode()) & 0x7FFFFFFF  # (an int32, as every collective here carries)
    differ = where(mine != broadcast(mine))
    if differ:
        raise ValueError(f"--ckpt-dir {path}: process(es) {', '.join(map(str, differ))} of {count} found other "
                         f"checkpoints there than process 0 (this process: {found}); the processes must see the same "
                         "files (a shared file system not yet up to date?). Nothing was changed: run the same "
                         "command again")


class NonFiniteError(RuntimeError):
    """A step's loss or gradient was NaN or infinite; its update was not applied."""


class SaveError(RuntimeError):
    """A checkpoint could not be written (a full disk, a directory made read-only or removed):
    the run itself went wrong, not its input. The checkpoints before it are left as they were."""


def save_failed(what: str, ckpt_dir: str, last: str | None, reason: str) -> str:
    """The message of a `SaveError`: `what` (the step's checkpoint) could not be written in
    `ckpt_dir` for `reason` (an error's one line; where it quotes a full disk or a read-only file
    system, the operating system's words alone: TensorStore's run to several hundred characters of
    paths); `last` names the newest complete checkpoint (None: none yet)."""
    reason = next((os.strerror(code) for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
                   if os.strerror(code) in reason), reason)
    kept = (f"the last complete checkpoint is {last}, and the steps after it are lost" if last is not None
            else "no checkpoint of this run was written")
    return (f"saving {what} in {ckpt_dir} failed ({reason}); {kept}. Make room there (or mend the directory) and run "
            "the same command again to resume")


class Terminated(SystemExit):
    """SystemExit(128 + signal) from a signal handler that ends the work under way as Ctrl-C does
    (a conversion's SIGTERM, `convert.output.atomic_output_dir`): `jaxllm.cli.exit_with` says so
    in one line naming the signal before the process exits with that status."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


# The line a command line ends with when Ctrl-C comes again after a stop was asked (`exit_at_once`).
_interrupted_line: str | None = None


def exit_at_once(line: str | None) -> None:
    """From a command line (`jaxllm.cli.exit_with`): a Ctrl-C after a stop was asked (`SignalStop`)
    prints `line` and ends the process with status 130 at once, as `kill -9` would (a save in
    progress is left unfinished, and the next start passes it over). Raised as KeyboardInterrupt
    instead, it landed wherever the main thread was, and where that was a callback whose exceptions
    Python ignores (JAX's garbage-collection callback, a finalizer) it printed "Exception ignored"
    with a traceback and the run went on. Without it (None, the default: a notebook, a library
    caller) the second Ctrl-C raises KeyboardInterrupt."""
    global _interrupted_line
    _interrupted_line = line


def end_interrupted(line: str, leave: Callable[[int], None] = os._exit) -> None:
    """End the process with status 130 after printing `line` (stdout flushed first): by default at
    once, with no clean-up and no waiting for other threads; `leave(130)` does it otherwise (a
    multi-process run's processes leave together)."""
    for write in (sys.stdout.flush, lambda: print(f"\n{line}", file=sys.stderr, flush=True)):
        try:
            write()
        except Exception:  # noqa: BLE001 - (a write the signal interrupted): leave anyway
            pass
    leave(130)
    os._exit(130)


# Whether a KeyboardInterrupt lost in a callback is raised again (`raise_lost_interrupts`).
_raising_lost_interrupts = False


def raise_lost_interrupts(on: bool) -> None:
    """From a command line (`jaxllm.cli.exit_with`, on while its `main` runs): a KeyboardInterrupt
    that Python reports as unraisable (a Ctrl-C that arrived while the main thread ran a callback
    whose exceptions are ignored, such as JAX's garbage-collection callback, or a finalizer) is not
    reported but raised again in the main thread (another thread sends it SIGINT, as if Ctrl-C came
    once more), where the script ends with its one line. Off (after `main`, in the interpreter's
    exit: an atexit callback's exceptions are unraisable too), every report goes to the previous
    hook, as do other unraisable exceptions. The hook is installed once per process."""
    global _raising_lost_interrupts
    _raising_lost_interrupts = on
    import _thread
    import time

    def again():  # (raised while the main thread is still in the callback or this hook, it would be
        time.sleep(0.05)  # lost again; in another such callback, this hook asks once more)
        if not _raising_lost_interrupts:
            return
        if hasattr(signal, "pthread_kill"):  # (a signal: it also wakes a main thread that waits in a system call)
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        else:
            _thread.interrupt_main(signal.SIGINT)

    def take(unraisable) -> bool:
        if not (_raising_lost_interrupts and isinstance(unraisable.exc_value, KeyboardInterrupt)):
            return False
        threading.Thread(target=again, daemon=True).start()
        return True

    add_unraisable_hook("interrupts", take)


# Whether the main thread's imports hold a Ctrl-C back until they end (`hold_interrupts_in_imports`).
_holding_in_imports = False


def hold_interrupts_in_imports(on: bool) -> None:
    """From a command line (`jaxllm.cli.exit_with`, on while its `main` runs): a Ctrl-C that arrives
    while the main thread imports a module is held back until the outermost import ends, and then
    handled as it would have been (KeyboardInterrupt raised where the import stands, or a
    trainer's request to save and stop). Raised inside the import, it could land in a compiled
    module's initialisation: PyTorch's (pybind11) then aborted the process ("terminate called after
    throwing an instance of 'pybind11::error_already_set' what(): KeyboardInterrupt": no line, no
    clean-up), once in 300 tries of a Ctrl-C while `torch_ref.training` was imported here, and
    NumPy's ended in an ImportError that names no interrupt (a traceback, exit status 1). So a first
    Ctrl-C during start-up takes effect when the import under way ends (`import torch_ref.training`:
    about 4 s on 2 CPU cores); a Ctrl-C after another, or after a trainer was asked to stop, ends
    the process at once, as without the hold (`end_interrupted`, no exception: safe in compiled code).

    Held: import statements (`builtins.__import__`) and `importlib.import_module` calls, with the
    imports that compiled code starts inside them; not `from importlib import import_module`
    bindings made before this is installed. The import runs under a SIGINT handler that only notes
    the signal (not a blocked signal: another thread would take it, and Python would still raise it
    in the main thread). Installed once per process; nothing is held in other threads, while off, or
    under a handler that is not Python's (ignored, or the system's default). A handler that the
    imported module installs stays and takes the held signal; code that kept the noting handler as
    the previous one reaches the restored handler through it."""
    global _holding_in_imports
    _holding_in_imports = on
    import builtins
    import importlib

    if getattr(builtins.__import__, "_jaxllm_holding", False):
        return
    depth = 0

    def holding(load):
        def held_load(*args, **kwargs):
            nonlocal depth
            if depth or not _holding_in_imports or threading.get_ident() != threading.main_thread().ident:
                return load(*args, **kwargs)
            previous = signal.getsignal(signal.SIGINT)
            if not callable(previous):
                return load(*args, **kwargs)
            held, done = [], False

            def note(signum, frame):
                if done:  # (kept past the import as someone's previous handler)
                    return previous(signum, frame)
                held.append(frame)
                stop = getattr(previous, "__self__", None)
                if _interrupted_line is not None and (len(held) > 1 or getattr(stop, "requested", None)):
                    end_interrupted(_interrupted_line)

            signal.signal(signal.SIGINT, note)
            depth = 1
            try:
                return load(*args, **kwargs)
            finally:
                depth, done = 0, True
                taker = previous
                if signal.getsignal(signal.SIGINT) is note:
                    signal.signal(signal.SIGINT, previous)
                else:  # the imported module installed a handler of its own: it takes the signal
                    taker = signal.getsignal(signal.SIGINT)
                if held and callable(taker):
                    taker(signal.SIGINT, held[0])

        held_load._jaxllm_holding = True
        return held_load

    builtins.__import__ = holding(builtins.__import__)
    importlib.import_module = holding(importlib.import_module)


def add_unraisable_hook(name: str, take: Callable[[object], bool]) -> None:
    """Put a `sys.unraisablehook` in front of the present one: `take(unraisable)` handles a report
    (True) or leaves it to the previous hook (False). Once per `name` and process: each of this
    project's hooks carries the names of those under it."""
    previous = sys.unraisablehook
    marks = getattr(previous, "_jaxllm_hooks", frozenset())
    if name in marks:
        return

    def hook(unraisable):
        if not take(unraisable):
            previous(unraisable)

    hook._jaxllm_hooks = marks | {name}
    sys.unraisablehook = hook


class SignalStop:
    """SIGTERM or a first Ctrl-C ask the run to save and stop (`requested`: the first signal's
    name, which decides the exit status); a Ctrl-C after such a request interrupts at once
    (`exit_at_once`). The handlers are installed by `install()` (from the main thread only) or on
    entering the context, and put back by `restore()` or on leaving it. Each trainer agrees on the
    request over its processes (`agreed`)."""

    def __init__(self):
        self.requested: str | None = None
        self._old = {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            if _interrupted_line is not None:
                end_interrupted(_interrupted_line)
            raise KeyboardInterrupt
        self.requested = self.requested or signal.Signals(signum).name

    def restore(self) -> None:
        for sig, old in self._old.items():  # (None: a handler set outside Python; the default then)
            signal.signal(sig, signal.SIG_DFL if old is None else old)
        self._old = {}

    def __enter__(self):
        self.install()
        return self

    def __exit__(self, *exc):
        self.restore()

    def agreed(self, asked: list[int]) -> str | None:
        """The request as every process sees it, given the processes `asked` where one was made
        (one process: [0] or []): a signal to any one of them stops all at the same step (the
        save is collective: a process that saved alone would hang the others)."""
        return (self.requested or f"a signal to process {asked[0]}") if asked else None
