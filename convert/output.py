"""Writing a conversion's output all at once.

Everything goes into a temporary directory next to the target (same file system), which is
renamed into place only when complete: a failed or interrupted conversion (an error, Ctrl-C,
SIGTERM) leaves no partial output, and `force=True` replaces an existing output only after the
new one is whole. A temporary directory that a killed run (SIGKILL, power loss) left behind is
removed by the next conversion to the same target.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import tempfile
import threading
from typing import Callable, Iterator

from convert import ConvertError
from jaxllm.cli import listing, nearest_existing
from jaxllm.stopping import InUse, Terminated, hold


def check_output(out_dir: str, *, force: bool, kind: str, is_kind: Callable[[str], bool],
                 extras: Callable[[str], list[str]], source: str | None = None) -> str:
    """The absolute output path, or ConvertError: it overlaps the `source` directory, it exists
    without `force`, or it exists and is not a `kind` directory as the converter writes it: not
    `is_kind`, or holding `extras` (what such a directory does not hold: training state, other
    files). That one is never replaced, even with `force`: a mistyped path must not delete a home
    directory or a training run."""
    if not os.fspath(out_dir).strip():  # (abspath("") is the working directory: an unset "$OUT")
        raise ConvertError("the output directory is an empty string", cli="--out is an empty string")
    out = os.path.abspath(os.fspath(out_dir))
    if source is not None:
        src = os.path.abspath(os.fspath(source))
        overlap = lambda a, b: a == b or b.startswith(a + os.sep) or a.startswith(b + os.sep)  # noqa: E731
        if overlap(out, src) or overlap(os.path.realpath(out), os.path.realpath(src)):  # (also through a link)
            raise ConvertError(f"output {out} overlaps the input {src}; choose another output directory")
    if os.path.lexists(out):
        if os.path.islink(out):  # (replacing it would replace the link, not what it names)
            raise ConvertError(f"output {out} is a symbolic link (to {os.readlink(out)}); give the directory itself "
                               "as the output")
        if not os.path.isdir(out):
            raise ConvertError(f"output {out} exists and is not a {kind} directory; refusing to replace it")
        names = sorted(os.listdir(out))
        held = (extras(out) or ([] if is_kind(out) else names)) if names else []
        if held:
            msg = f"output {out} is not a {kind} directory as this converter writes it (it holds {listing(held)}); " \
                  "refusing to replace it"
            raise ConvertError(f"{msg}: choose another output directory", cli=f"{msg}: use another --out")
        if not force:
            raise ConvertError(f"output {out} already exists (force=True replaces it)",
                               cli=f"output {out} already exists (--force replaces it)")
    else:  # checked before anything is read: making it failed only after the whole conversion
        above = nearest_existing(os.path.dirname(out))
        if not os.path.isdir(above):
            raise ConvertError(f"output {out} cannot be made: {above} is not a directory")
    return out


def parse_max_shard_size(size: int | str) -> int:
    """A shard size in bytes from an int or a string such as "50GB" or "500MB" (Hugging Face's
    units: KB, MB, GB, TB, powers of 1000; digits alone are bytes); ConvertError unless positive."""
    if isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*(KB|MB|GB|TB)?\s*", size.upper())
        n = int(float(m[1]) * 1000 ** ("", "KB", "MB", "GB", "TB").index(m[2] or "")) if m else 0
    else:
        n = size if isinstance(size, int) else 0
    if n <= 0:
        raise ConvertError(f"max shard size must be a positive size such as 50GB or 500MB, got {size!r}")
    return n


@contextlib.contextmanager
def atomic_output_dir(out: str, *, force: bool = True) -> Iterator[str]:
    """Yield a fresh temporary directory next to `out`; on success rename it to `out` (replacing
    an existing `out`, which the caller has vetted with `check_output`); on any error remove it.
    Without `force`, an `out` that appeared meanwhile (another conversion to the same output,
    started at the same time, finished first) is not replaced: ConvertError, and this output is
    removed.
    SIGTERM is handled as Ctrl-C while inside (`Terminated`, a SystemExit(143), from the main thread:
    the temporary directory is removed, the process exits with status 143, and from a command line
    with a line saying so), the previous handler restored after."""
    installed = threading.current_thread() is threading.main_thread()
    if installed:
        previous = signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        with _atomic_output_dir(out, force) as tmp:
            yield tmp
    finally:
        if installed:  # (None: a handler set outside Python, which cannot be put back; the default then)
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _written() -> None:
    """The output is in place: from here a SIGTERM takes its default action again (it ended with
    "nothing was written" about a complete output); the previous handler is restored at the end."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is _exit_on_signal:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _exit_on_signal(signum, frame):
    # A second SIGTERM while the first unwinds is ignored: raised again, it cut the removal of the
    # temporary output short (`atomic_output_dir` restores the previous handler once that is done).
    signal.signal(signum, signal.SIG_IGN)
    raise Terminated(signum)


@contextlib.contextmanager
def _atomic_output_dir(out: str, force: bool) -> Iterator[str]:
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    name = os.path.basename(out)
    _remove_abandoned(parent, name)
    tmp = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent)
    lock = _lock(tmp)  # held while it is written: marks it as in use to another run's `_remove_abandoned`
    try:
        yield tmp
        _default_permissions(tmp)
        if os.path.lexists(out):
            if not force:
                raise _appeared(out)
            old = tempfile.mkdtemp(prefix=f".{name}.", suffix=".old", dir=parent)
            os.rename(out, os.path.join(old, name))
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(os.path.join(old, name), out)  # put the old output back
                os.rmdir(old)
                raise
            _written()
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.rename(tmp, out)
            except OSError as e:  # (a directory made there since, not empty: not replaced)
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST) and not force:
                    raise _appeared(out) from None
                raise
            _written()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if lock is not None:
            os.close(lock)


def _appeared(out: str) -> ConvertError:
    msg = f"output {out} was written by another process while this conversion ran; it was not replaced"
    return ConvertError(f"{msg} (force=True replaces it)", cli=f"{msg} (--force replaces it)")


def _lock(path: str) -> int | None:
    """A file descriptor of `path` holding an exclusive lock (released when closed or when the
    process dies, however), or None where `path` cannot be locked or another run holds it (on
    Windows, always: no temporary directory is ever taken for abandoned there)."""
    try:
        return hold(path)
    except InUse:
        return None


def _remove_abandoned(parent: str, name: str) -> None:
    """Remove the temporary directories of `name` (`.NAME.XXXXXXXX.tmp`, as `mkdtemp` names them
    here) that no running conversion holds locked: what a killed run left, partial files that can
    be GBs. (The `.old` directories are kept: one left between the two renames holds the only copy
    of the previous output.)"""
    pattern = re.compile(rf"\.{re.escape(name)}\.[a-z0-9_]{{8}}\.tmp")
    for entry in os.listdir(parent):
        path = os.path.join(parent, entry)
        if pattern.fullmatch(entry) and os.path.isdir(path) and not os.path.islink(path):
            lock = _lock(path)
            if lock is not None:  # no run holds it
                try:
                    shutil.rmtree(path, ignore_errors=True)
                finally:
                    os.close(lock)


def _default_permissions(top: str) -> None:
    """The permissions of files the user creates (umask), not the private ones of `mkdtemp` and
    of some writers (safetensors files are created 0600)."""
    mask = os.umask(0o022)
    os.umask(mask)
    os.chmod(top, 0o777 & ~mask)
    for root, dirs, files in os.walk(top):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~mask)
